"""The scenario framework of the fault-tolerance suite: a whole deployment of real
processes, fault injectors, and the checks that follow a fault.

    async with Deployment(tmp_path, workers=3, frontends=2, etcd_members=3, router=True) as d:
        load = Load(d.urls, requests=24, concurrency=8, max_tokens=300, tag="x")
        ...
        d.send(d.workers[0], signal.SIGKILL)            # fault injectors
        await d.kill_etcd_member(await d.etcd.leader())
        await d.restart_nats(down=0.5)
        ...
        await d.assert_kv_idle()                        # checkers
        assert await d.migrations() == {"killed": 3}

Every component is a subprocess with its own log file in the test's ``tmp_path`` and a
health URL: etcd members (``/health``), NATS (monitoring ``/healthz``), the standalone
router and the controller (system port ``/health``), workers (``WorkerProcess``) and
frontends (``FrontendProcess``). Children are spawned from the event loop's thread with
``die_with_parent_argv``, so they die with the test process even if it is SIGKILLed; leaving
the ``async with`` stops every one of them (SIGCONT first, so stopped processes can exit;
SIGKILL after a timeout) — also when the test failed, in which case the tail of every log
is printed. ``Deployment.assert_all_gone`` checks that no child is left.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from dynrt.runtime.discovery import EtcdClient
from dynrt.runtime.embedded import EtcdServer, ManagedProcess, NatsServer, free_port
from dynrt.runtime.protocol import InstanceRecord, instance_record_decoder, instances_prefix
from tests.helpers.frontend_proc import FrontendProcess, parse_metrics
from tests.helpers.procs import DynrtProcess, spawn_dynrt
from tests.helpers.worker_proc import WorkerProcess

# Child processes (workers, frontends) must find the venv's binaries.
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")

LOOPBACK = "127.0.0.1"


async def get_json(session: aiohttp.ClientSession, url: str, timeout: float = 2.0) -> tuple[int, Any] | None:
    """(status, JSON body), or None when nothing answers (dead, stopped, not yet up)."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            return response.status, await response.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
        return None


def spawn_server(name: str, argv: list[str], log_path: Path) -> ManagedProcess:
    """etcd / nats-server as a ``ManagedProcess`` (which dies with the test process)."""
    process = ManagedProcess(name, argv, log_path)
    process.spawn()
    return process


# ---------------------------------------------------------------------------
# etcd: one member or a cluster
# ---------------------------------------------------------------------------


class EtcdCluster:
    """``members`` etcd processes on loopback ports forming one cluster. A stopped member
    restarts from its data dir on the same ports (it rejoins as the member it was)."""

    def __init__(self, base_dir: Path, members: int = 1) -> None:
        self.members = [EtcdServer(base_dir / "etcd", name=f"etcd{i}") for i in range(members)]
        cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            m.initial_cluster = cluster

    @property
    def endpoints(self) -> str:
        """What components get as ``--etcd-endpoints``."""
        return ",".join(m.endpoint for m in self.members)

    def health_url(self, member: EtcdServer) -> str:
        return f"http://{member.endpoint}/health"

    def alive(self, member: EtcdServer) -> bool:
        return member.process is not None and member.process.alive()

    def spawn(self, member: EtcdServer) -> None:
        """Start ``member`` (from its data dir if it has one) without waiting."""
        member.data_dir.mkdir(parents=True, exist_ok=True)
        member.process = spawn_server(f"etcd-{member.name}", member.argv(), member.data_dir / f"{member.name}.log")

    async def start(self, timeout: float = 30.0) -> None:
        for m in self.members:
            self.spawn(m)
        await asyncio.gather(*(asyncio.to_thread(m.wait_ready, timeout) for m in self.members))

    def kill(self, member: EtcdServer, sig: int = signal.SIGKILL) -> None:
        assert member.process is not None and member.process.proc is not None
        member.process.proc.send_signal(sig)
        member.process.proc.wait(10)

    async def restart(self, member: EtcdServer, timeout: float = 30.0) -> None:
        if self.alive(member):
            await asyncio.to_thread(member.stop)
        self.spawn(member)
        await asyncio.to_thread(member.wait_ready, timeout)

    def status(self, member: EtcdServer) -> dict[str, Any] | None:
        """``/v3/maintenance/status`` through etcd's HTTP gateway (None if it does not answer)."""
        request = urllib.request.Request(f"http://{member.endpoint}/v3/maintenance/status", data=b"{}",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=1.0) as response:
                return json.loads(response.read())
        except (OSError, ValueError):
            return None

    async def leader(self, timeout: float = 10.0) -> EtcdServer:
        """The member that is the raft leader now."""
        deadline = time.monotonic() + timeout
        while True:
            for m in self.members:
                if not self.alive(m):
                    continue
                status = await asyncio.to_thread(self.status, m)
                if status and status.get("leader") and status["leader"] == status.get("header", {}).get("member_id"):
                    return m
            if time.monotonic() > deadline:
                raise AssertionError("no etcd leader found")
            await asyncio.sleep(0.1)

    async def followers(self) -> list[EtcdServer]:
        leader = await self.leader()
        return [m for m in self.members if m is not leader and self.alive(m)]

    def stop(self) -> None:
        for m in self.members:
            m.stop()


# ---------------------------------------------------------------------------
# other components
# ---------------------------------------------------------------------------


class SystemPortProcess(DynrtProcess):
    """A ``dynrt`` subcommand with ``--system-port`` (``/health`` there), e.g. the
    router; or, with ``ready_line``, one without (the controller): ready once its log
    has that event."""

    def __init__(self, log_dir: Path, name: str, argv: list[str], ready_line: str = "") -> None:
        self.name = name
        self.port = 0 if ready_line else free_port()
        self.ready_line = ready_line
        self.log_path = log_dir / f"{name}.log"
        self.argv = [*argv] if ready_line else [*argv, "--system-port", str(self.port)]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def health_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/health"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/metrics"

    async def start(self, timeout: float = 30.0) -> "SystemPortProcess":
        self.proc = spawn_dynrt(self.argv, self.log_path)
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(f"{self.name} exited ({self.proc.returncode}); log:\n{self.log_tail()}")
                if self.ready_line:
                    if f"event={self.ready_line}" in self.log_text():
                        return self
                else:
                    answer = await get_json(session, self.health_url, timeout=1.0)
                    if answer is not None and answer[0] == 200:
                        return self
                if time.monotonic() > deadline:
                    raise AssertionError(f"{self.name} not healthy after {timeout}s; log:\n{self.log_tail()}")
                await asyncio.sleep(0.05)



# ---------------------------------------------------------------------------
# the deployment
# ---------------------------------------------------------------------------


class Deployment:
    def __init__(self, tmp_path: Path, *, workers: int = 3, frontends: int = 1, etcd_members: int = 1,
                 router: bool = False, controller_spec: Path | None = None, controller_replicas: int = 0,
                 speedup: float = 1.0,
                 frontend_args: Sequence[str] = (), worker_args: Sequence[str] = (),
                 router_args: Sequence[str] = (), namespace: str = "") -> None:
        """``router``: a standalone ``dynrt router``, and frontends in ``--router-mode
        remote``. ``controller_spec``: also run ``dynrt controller -f SPEC``; it launches
        the spec's ``controller_replicas`` workers itself (``workers`` are extra)."""
        self.dir = Path(tmp_path)
        self.namespace = namespace or "ft" + uuid.uuid4().hex[:10]
        self.num_workers = workers
        self.num_frontends = frontends
        self.speedup = speedup
        self.etcd = EtcdCluster(self.dir, etcd_members)
        self.nats = NatsServer(self.dir / "nats", extra_args=["-m", str(free_port())])
        self.with_router = router
        self.controller_spec = controller_spec
        self.controller_replicas = controller_replicas
        self.controllers: list[SystemPortProcess] = []  # every controller process ever started
        # Fast drains by default: a test that wants the worker's SIGTERM behaviour sets
        # its own --drain-timeout (args come last and win).
        self.worker_args = ["--drain-timeout", "1", "--load-interval", "0.05", *worker_args]
        remote = ["--router-mode", "remote", "--remote-router-timeout", "0.5"] if router else []
        self.frontend_args = [*remote, *frontend_args]
        self.router_args = list(router_args)
        self.workers: list[WorkerProcess] = []  # every worker ever started, dead ones included
        self.frontends: list[FrontendProcess] = []
        self.router: SystemPortProcess | None = None
        self.routers: list[SystemPortProcess] = []  # every router process ever started
        self.controller: SystemPortProcess | None = None
        self.http: aiohttp.ClientSession | None = None
        self._names = 0

    # -- start / stop ---------------------------------------------------------------
    async def __aenter__(self) -> "Deployment":
        try:
            await self.start()
        except BaseException:
            self.print_logs()
            await self.stop()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if exc is not None:
            self.print_logs()
        await self.stop()
        self.assert_all_gone()

    async def start(self) -> None:
        self.http = aiohttp.ClientSession()
        await self.etcd.start()
        self.nats.port = free_port()
        await self._start_nats_async()
        if self.with_router:
            await self.start_router()
        if self.controller_spec is not None:
            await self.start_controller()
        await asyncio.gather(*(self.add_worker() for _ in range(self.num_workers)))
        expected = self.num_workers + self.controller_replicas
        await asyncio.gather(*(self.add_frontend(expect_instances=None) for _ in range(self.num_frontends)))
        await self.wait_instances(expected, timeout=60)

    def common_args(self) -> list[str]:
        return ["--namespace", self.namespace, "--etcd-endpoints", self.etcd.endpoints, "--nats-url", self.nats.url]

    def _name(self, kind: str) -> str:
        self._names += 1
        return f"{kind}{self._names}"

    async def add_worker(self, args: Sequence[str] = (), start_timeout: float = 60.0) -> WorkerProcess:
        """Start one more mock worker; returns once it is registered in etcd."""
        worker = self.new_worker(args, start_timeout)
        await worker.start()
        return worker

    def new_worker(self, args: Sequence[str] = (), start_timeout: float = 60.0) -> WorkerProcess:
        """A worker not yet started (``await worker.start()``, e.g. as a task while etcd is down)."""
        worker = WorkerProcess(self.dir, namespace=self.namespace, etcd_endpoints=self.etcd.endpoints,
                               nats_url=self.nats.url, speedup=self.speedup, name=self._name("worker"),
                               args=[*self.worker_args, *args], start_timeout=start_timeout)
        self.workers.append(worker)
        return worker

    async def add_frontend(self, expect_instances: int | None = None, args: Sequence[str] = ()) -> FrontendProcess:
        frontend = FrontendProcess(self.dir, namespace=self.namespace, etcd_endpoints=self.etcd.endpoints,
                                   nats_url=self.nats.url, expect_instances=expect_instances,
                                   name=self._name("frontend"), args=[*self.frontend_args, *args],
                                   start_timeout=60.0)
        self.frontends.append(frontend)
        await frontend.start()
        return frontend

    async def start_controller(self) -> SystemPortProcess:
        """``dynrt controller -f SPEC`` (no system port: ready once elected). It stops its
        replicas when stopped (``--stop-replicas-on-exit``), so teardown leaves none."""
        assert self.controller_spec is not None
        controller = SystemPortProcess(self.dir, self._name("controller"), [
            "controller", "-f", str(self.controller_spec), *self.common_args(), "--election-ttl", "2",
            "--stop-replicas-on-exit", "--state-dir", str(self.dir / "controller-state")],
            ready_line="controller_elected")
        self.controllers.append(controller)
        self.controller = await controller.start(timeout=60)
        return controller

    async def start_router(self) -> SystemPortProcess:
        router = SystemPortProcess(self.dir, self._name("router"), ["router", *self.common_args(), *self.router_args])
        self.routers.append(router)
        self.router = await router.start()
        return router

    async def stop(self) -> None:
        """Stop everything: frontends first (no new requests), then the router and
        the controller, the workers, NATS and etcd. Stopped processes get SIGCONT."""
        await asyncio.gather(*(f.stop() for f in self.frontends), return_exceptions=True)
        await asyncio.gather(*(r.stop() for r in self.routers), return_exceptions=True)
        await asyncio.gather(*(c.stop(timeout=20) for c in self.controllers), return_exceptions=True)
        await asyncio.gather(*(w.stop() for w in self.workers), return_exceptions=True)
        # Anything else of this deployment (e.g. replicas a controller launched in their
        # own session) still running at this point is killed.
        for pid in self.namespace_processes():
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        await asyncio.to_thread(self.nats.stop)
        await asyncio.to_thread(self.etcd.stop)
        if self.http is not None:
            await self.http.close()
            self.http = None

    def children(self) -> dict[str, subprocess.Popen[bytes] | None]:
        procs: dict[str, subprocess.Popen[bytes] | None] = {}
        for proc_owner in [*self.frontends, *self.routers, *self.controllers, *self.workers]:
            procs[proc_owner.name] = proc_owner.proc
        for m in self.etcd.members:
            procs[m.name] = m.process.proc if m.process else None
        procs["nats"] = self.nats.process.proc if self.nats.process else None
        return procs

    def namespace_processes(self) -> list[int]:
        """Live processes (not zombies) whose command line names this deployment's namespace."""
        pids = []
        needle = self.namespace.encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if needle in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
        return pids

    def namespace_processes_of(self, subcommand: str) -> list[int]:
        """Live ``dynrt SUBCOMMAND`` processes of this deployment (e.g. a controller's replicas)."""
        out = []
        for pid in self.namespace_processes():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if subcommand.encode() in argv and b"dynrt.cli" in argv:
                out.append(pid)
        return out

    def assert_all_gone(self) -> None:
        left = {name: p.pid for name, p in self.children().items() if p is not None and p.poll() is None}
        assert not left, f"processes left behind: {left}"
        strays = self.namespace_processes()
        assert not strays, f"processes of namespace {self.namespace} left behind: {strays}"

    def print_logs(self, lines: int = 40) -> None:
        """The tail of every component's log (pytest shows it for a failed test)."""
        logs = sorted(self.dir.glob("*.log")) + sorted(self.dir.glob("*/*.log"))
        for path in logs:
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            print(f"----- {path.name} (last {len(tail)} lines) -----")
            print("\n".join(tail))

    # -- what tests look at ---------------------------------------------------------------
    @property
    def session(self) -> aiohttp.ClientSession:
        assert self.http is not None
        return self.http

    @property
    def urls(self) -> list[str]:
        return [f.url for f in self.frontends if f.alive()]

    def live_workers(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.alive() and w._record is not None]

    def pids(self) -> dict[str, int]:
        """Every live component's pid (to prove nothing was restarted)."""
        return {name: p.pid for name, p in self.children().items() if p is not None and p.poll() is None}

    async def worker_health(self, worker: WorkerProcess) -> dict[str, Any] | None:
        answer = await get_json(self.session, worker.health_url, timeout=1.0)
        return None if answer is None else answer[1]

    async def in_flight(self) -> dict[str, int]:
        """Requests in flight on every live worker, by worker name."""
        out = {}
        for w in self.live_workers():
            health = await self.worker_health(w)
            if health is not None:
                out[w.name] = health["in_flight"]
        return out

    async def busiest_worker(self) -> tuple[WorkerProcess, int]:
        """The live worker with the most requests in flight, and that number."""
        counts = await self.in_flight()
        assert counts and max(counts.values()) > 0, f"no worker is serving: {counts}"
        name = max(counts, key=lambda n: counts[n])
        return next(w for w in self.workers if w.name == name), counts[name]

    async def worker_for(self, start: Any, timeout: float = 10.0) -> WorkerProcess:
        """The worker that takes the request(s) ``start()`` (a coroutine function) sends:
        in-flight counts before and after. Only meaningful while nothing else arrives."""
        before = await self.in_flight()
        await start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            after = await self.in_flight()
            grew = [n for n, c in after.items() if c > before.get(n, 0)]
            if len(grew) == 1:
                return next(w for w in self.workers if w.name == grew[0])
            await asyncio.sleep(0.02)
        raise AssertionError("could not tell which worker took the request")

    async def frontend_metrics(self, frontend: FrontendProcess) -> dict[Any, float]:
        return parse_metrics(await frontend.metrics_text())

    async def metric_sum(self, name: str, frontends: Sequence[FrontendProcess] | None = None,
                         **labels: str) -> float:
        """A frontend counter summed over (live) frontends and over unnamed labels."""
        total = 0.0
        for fe in frontends if frontends is not None else [f for f in self.frontends if f.alive()]:
            for (sample, sample_labels), value in (await self.frontend_metrics(fe)).items():
                if sample == name and all(dict(sample_labels).get(k) == v for k, v in labels.items()):
                    total += value
        return total

    async def metric_by(self, name: str, label: str,
                        frontends: Sequence[FrontendProcess] | None = None) -> dict[str, int]:
        """A frontend counter by the values of one label, summed over (live) frontends."""
        out: dict[str, int] = {}
        for fe in frontends if frontends is not None else [f for f in self.frontends if f.alive()]:
            for (sample, labels), value in (await self.frontend_metrics(fe)).items():
                if sample == name and value:
                    key = dict(labels).get(label, "")
                    out[key] = out.get(key, 0) + int(value)
        return out

    async def migrations(self, frontends: Sequence[FrontendProcess] | None = None) -> dict[str, int]:
        """``dynrt_frontend_migrations_total`` by cause, summed over frontends."""
        out: dict[str, int] = {}
        for fe in frontends if frontends is not None else [f for f in self.frontends if f.alive()]:
            for (sample, labels), value in (await self.frontend_metrics(fe)).items():
                if sample == "dynrt_frontend_migrations_total" and value:
                    cause = dict(labels)["cause"]
                    out[cause] = out.get(cause, 0) + int(value)
        return out

    def migrated_requests(self, frontends: Sequence[FrontendProcess] | None = None) -> dict[str, list[tuple[str, str]]]:
        """From the frontends' logs: request id → [(cause, from_instance)] per migration."""
        out: dict[str, list[tuple[str, str]]] = {}
        for fe in frontends if frontends is not None else self.frontends:
            for line in fe.log_text().splitlines():
                if "event=migrating" not in line and '"event": "migrating"' not in line:
                    continue
                fields = _log_fields(line)
                out.setdefault(fields.get("request_id", "?"), []).append(
                    (fields.get("cause", "?"), fields.get("from_instance", "?")))
        return out

    def migration_events(self, frontends: Sequence[FrontendProcess] | None = None) -> list[dict[str, Any]]:
        """From the frontends' logs, one dict per migration: ``ts`` (epoch seconds),
        ``request_id``, ``cause``, ``from_instance``."""
        from datetime import datetime

        events = []
        for fe in frontends if frontends is not None else self.frontends:
            for line in fe.log_text().splitlines():
                if "event=migrating" not in line:
                    continue
                fields = _log_fields(line)
                try:
                    ts = datetime.fromisoformat(fields["ts"].replace("Z", "+00:00")).timestamp()
                except (KeyError, ValueError):
                    ts = float("nan")
                events.append({"ts": ts, "request_id": fields.get("request_id", "?"),
                               "cause": fields.get("cause", "?"), "from_instance": fields.get("from_instance", "?")})
        return events

    async def worker_outcomes(self, worker: WorkerProcess) -> dict[str, int]:
        """``dynrt_worker_requests_total`` by outcome."""
        answer = await self.session.get(worker.metrics_url, timeout=aiohttp.ClientTimeout(total=2))
        async with answer:
            samples = parse_metrics(await answer.text())
        return {dict(labels)["outcome"]: int(v) for (name, labels), v in samples.items()
                if name == "dynrt_worker_requests_total" and v}

    async def frontend_instances(self, frontend: FrontendProcess) -> int | None:
        answer = await get_json(self.session, f"{frontend.url}/health", timeout=1.0)
        return None if answer is None else len(answer[1].get("instances", []))

    async def wait_instances(self, count: int, timeout: float = 20.0,
                             frontends: Sequence[FrontendProcess] | None = None) -> float:
        """Until every (live) frontend's ``/health`` lists ``count`` instances; seconds taken."""
        start = time.monotonic()
        for fe in frontends if frontends is not None else [f for f in self.frontends if f.alive()]:
            await fe.wait_instances(count, timeout=max(0.1, timeout - (time.monotonic() - start)))
        return time.monotonic() - start

    # -- checkers ------------------------------------------------------------------------
    async def registered_instances(self) -> list[InstanceRecord]:
        """Every instance record in etcd now (workers started here or by a controller)."""
        etcd = EtcdClient(self.etcd.endpoints)
        try:
            _, values = await etcd.get_prefix(instances_prefix(self.namespace))
        finally:
            await etcd.close()
        return [instance_record_decoder.decode(v) for v in values.values()]

    async def kv_state(self, workers: Sequence[WorkerProcess] | None = None) -> dict[str, dict[str, int] | None]:
        """KV blocks and requests of ``workers``, by default of every live worker: the
        ones started here, and any other registered instance (a controller's replicas)."""
        targets = {w.name: w.health_url for w in (workers if workers is not None else self.live_workers())}
        if workers is None:
            known = {w.pid for w in self.workers if w.proc is not None}
            for record in await self.registered_instances():
                if record.pid not in known:
                    targets[f"pid{record.pid}"] = f"http://{LOOPBACK}:{record.system_port}/health"
        out: dict[str, dict[str, int] | None] = {}
        for name, url in targets.items():
            answer = await get_json(self.session, url, timeout=1.0)
            out[name] = None if answer is None else {k: answer[1][k] for k in ("kv_blocks_used", "in_flight",
                                                                               "running", "waiting")}
        return out

    async def assert_kv_idle(self, timeout: float = 5.0, workers: Sequence[WorkerProcess] | None = None) -> float:
        """Every live worker (or ``workers``) back to 0 KV blocks and 0 requests within
        ``timeout``; returns the seconds it took."""
        start = time.monotonic()
        while True:
            state = await self.kv_state(workers)
            if state and all(s is not None and s["kv_blocks_used"] == 0 and s["in_flight"] == 0 and s["running"] == 0
                             and s["waiting"] == 0 for s in state.values()):
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise AssertionError(f"KV not freed after {timeout}s: {state}")
            await asyncio.sleep(0.05)

    async def leaked_blocks(self, settle: float = 5.0) -> int:
        """KV blocks still used on live workers after up to ``settle`` seconds."""
        deadline = time.monotonic() + settle
        while True:
            state = await self.kv_state()
            used = sum(s["kv_blocks_used"] for s in state.values() if s is not None)
            if used == 0 or time.monotonic() > deadline:
                return used
            await asyncio.sleep(0.1)

    # -- fault injectors -------------------------------------------------------------
    def send(self, component: Any, sig: int) -> None:
        """Send ``sig`` to a worker, frontend, router or controller."""
        component.send_signal(sig)

    async def restart_nats(self, down: float = 0.0) -> float:
        """Stop NATS, wait ``down`` seconds, start it on the same port; returns the
        seconds it was unreachable."""
        stopped_at = time.monotonic()
        await asyncio.to_thread(self.nats.stop)
        if down:
            await asyncio.sleep(down)
        # Spawn from the event loop's thread (die_with_parent_argv), wait without blocking it.
        await self._start_nats_async()
        return time.monotonic() - stopped_at

    async def _start_nats_async(self, timeout: float = 10.0) -> None:
        nats = self.nats
        # A fresh monitoring port each start: while NATS was down, the old one may have
        # become some connection's ephemeral port (seen in CI: "bind: address already in
        # use"). Clients only need the client port to stay the same.
        nats.extra_args = ["-m", str(free_port())]
        ports_dir = nats.work_dir / "nats-ports"
        ports_dir.mkdir(parents=True, exist_ok=True)
        argv = [_nats_binary(), "-a", LOOPBACK, "-p", str(nats.port), "--ports_file_dir",
                str(ports_dir), *nats.extra_args]
        nats.process = spawn_server("nats", argv, nats.work_dir / "nats.log")
        deadline = time.monotonic() + timeout
        while not await asyncio.to_thread(_port_accepts, nats.port):
            assert nats.process.alive(), f"nats-server exited; see {nats.process.log_path}"
            assert time.monotonic() < deadline, "nats-server not back in time"
            await asyncio.sleep(0.02)

    async def kill_etcd_member(self, member: EtcdServer, sig: int = signal.SIGKILL) -> None:
        await asyncio.to_thread(self.etcd.kill, member, sig)

    async def restart_etcd_member(self, member: EtcdServer) -> None:
        await self.etcd.restart(member)

    async def etcd_outage(self, seconds: float, during: Any = None) -> float:
        """Kill every etcd member (SIGKILL), keep them down ``seconds`` (running the
        coroutine ``during()`` meanwhile, if given), start them again from their data;
        returns the seconds etcd was down."""
        down_at = time.monotonic()
        for m in self.etcd.members:
            await asyncio.to_thread(self.etcd.kill, m)
        if during is not None:
            await during()
        await asyncio.sleep(max(0.0, seconds - (time.monotonic() - down_at)))
        for m in self.etcd.members:
            self.etcd.spawn(m)
        await asyncio.gather(*(asyncio.to_thread(m.wait_ready, 30.0) for m in self.etcd.members))
        return time.monotonic() - down_at


def _nats_binary() -> str:
    from dynrt.runtime.embedded import find_nats_server

    return find_nats_server()


def _port_accepts(port: int) -> bool:
    import socket

    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


def _log_fields(line: str) -> dict[str, str]:
    """key=value pairs of a log line (or the fields of a JSON log line)."""
    line = line.strip()
    if line.startswith("{"):
        try:
            return {k: str(v) for k, v in json.loads(line).items()}
        except ValueError:
            return {}
    return dict(part.split("=", 1) for part in line.split() if "=" in part)


__all__ = ["Deployment", "EtcdCluster", "SystemPortProcess", "get_json", "spawn_server"]
