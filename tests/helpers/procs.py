"""Helpers for tests that run real processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from dynrt.runtime.embedded import die_with_parent_argv

def spawn_python(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A Python child that gets SIGTERM when the test process dies, even by SIGKILL."""
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(die_with_parent_argv([sys.executable, *args]), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    finally:
        log.close()


def spawn_dynrt(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return spawn_python(["-m", "dynrt.cli", *args], log_path, env)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGCONT (in case it was stopped), SIGTERM, then SIGKILL after ``timeout``."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


async def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.02,
                   what: str = "condition") -> float:
    """Poll ``predicate`` until true; returns the seconds it took, fails after ``timeout``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)
    return time.monotonic() - start


def wait_line(log_path: Path, text: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> str:
    """Block until ``text`` appears in the log file; returns that line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log_path.exists():
            for line in log_path.read_text(errors="replace").splitlines():
                if text in line:
                    return line
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before '{text}'; log:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"'{text}' not in {log_path} after {timeout}s:\n{log_path.read_text()[-3000:] if log_path.exists() else ''}")


class DynrtProcess:
    """What tests do with any ``dynrt`` child process: signal it, wait for its exit
    code, read its log, stop it for sure. Subclasses set ``proc``, ``name`` and
    ``log_path`` and implement ``start()``."""

    proc: subprocess.Popen[bytes] | None
    name: str
    log_path: Path

    async def start(self) -> Any:
        raise NotImplementedError

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
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def wait(self, timeout: float) -> int:
        """The exit code; AssertionError (with the log) if still running after ``timeout``."""
        assert self.proc is not None
        try:
            return await asyncio.to_thread(self.proc.wait, timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout}s; log:\n{self.log_tail()}") from None

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
