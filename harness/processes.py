"""``dynrt`` (and other Python) child processes of a test or benchmark.

Every child is spawned with ``dynrt.runtime.procs.spawn``: it gets SIGTERM when the test
or benchmark process dies, even by SIGKILL, and writes stdout and stderr to its own log
file. Spawn from the event loop's thread (the parent-death signal follows the spawning
thread).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import aiohttp

from dynrt.runtime.embedded import free_port
from dynrt.runtime.procs import send_signal, spawn, stop_process, wait_process
from harness.http import get_json

LOOPBACK = "127.0.0.1"
T = TypeVar("T")

# Child processes (workers, frontends) must find the venv's binaries.
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")


def spawn_python(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``python ARGS`` (this interpreter) that dies with this process; ``env`` is added to ours."""
    return spawn([sys.executable, *args], log_path, env=env)


def spawn_dynrt(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``dynrt ARGS`` (as ``python -m dynrt.cli``) that dies with this process."""
    return spawn_python(["-m", "dynrt.cli", *args], log_path, env)


class DynrtProcess:
    """What tests do with any ``dynrt`` child process: signal it, wait for its exit
    code, read its log, stop it for sure. Subclasses set ``proc``, ``name`` and
    ``log_path`` (and ``env``, added to ours) and implement ``start()``, usually with
    ``spawn_until_ready``."""

    proc: subprocess.Popen[bytes] | None
    name: str
    log_path: Path
    env: dict[str, str] | None = None
    started_at = 0.0  # monotonic, when the process was last spawned
    ready_after = 0.0  # seconds from that spawn until it was ready

    async def start(self) -> Any:
        raise NotImplementedError

    async def spawn_until_ready(self, argv: list[str], ready: Callable[[], Awaitable[T]]) -> T:
        """Spawn ``dynrt ARGV`` and return what ``await ready()`` returns; if that fails,
        the process is stopped and the error raised."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.started_at = time.monotonic()
        self.proc = spawn_dynrt(argv, self.log_path, self.env)
        try:
            result = await ready()
        except BaseException:
            await self.stop()
            raise
        self.ready_after = time.monotonic() - self.started_at
        return result

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send_signal(self, sig: int) -> None:
        """``sig`` to the process (nothing if it has exited)."""
        assert self.proc is not None
        send_signal(self.proc, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def wait(self, timeout: float) -> int:
        """The exit code; AssertionError (with the log) if still running after ``timeout``."""
        assert self.proc is not None
        code = await asyncio.to_thread(wait_process, self.proc, timeout)
        if code is None:
            raise AssertionError(f"{self.name} still running after {timeout}s; log:\n{self.log_tail()}")
        return code

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]

    async def stop(self, timeout: float = 10.0) -> int | None:
        """SIGCONT + SIGTERM, SIGKILL after ``timeout``; the exit code."""
        if self.proc is None:
            return None
        return await asyncio.to_thread(stop_process, self.proc, timeout)

    async def __aenter__(self) -> Any:
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()


class ComponentProcess(DynrtProcess):
    """A ``dynrt`` component of a deployment: it joins ``namespace`` through the etcd at
    ``etcd_endpoints`` and the NATS at ``nats_url``; ``name`` (default KIND and a number)
    names its log file in ``log_dir``."""

    _numbers = itertools.count()

    def __init__(self, log_dir: Path, kind: str, *, namespace: str, etcd_endpoints: str, nats_url: str,
                 env: dict[str, str] | None, name: str, start_timeout: float) -> None:
        self.namespace = namespace
        self.etcd_endpoints = etcd_endpoints
        self.nats_url = nats_url
        self.env = env
        self.name = name or f"{kind}{next(self._numbers)}"
        self.log_path = Path(log_dir) / f"{self.name}.log"
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def connection_args(self) -> list[str]:
        return ["--namespace", self.namespace, "--etcd-endpoints", self.etcd_endpoints, "--nats-url", self.nats_url]


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
        async def ready() -> SystemPortProcess:
            assert self.proc is not None
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

        return await self.spawn_until_ready(self.argv, ready)
