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

# Children must die with the test process (even when it is SIGKILLed), but subprocess's
# ``preexec_fn`` would make it fork() the test process, and a fork taken while gRPC's
# threads run (the test's own etcd clients) can crash the child before it execs
# (SIGABRT, "epoll_wait error: Bad file descriptor"). So a tiny launcher sets
# PR_SET_PDEATHSIG (kept across exec) and execs the real program; subprocess spawns it
# without forking the test process. The parent is the spawning *thread*: spawn from the
# event loop's thread, not from ``asyncio.to_thread``.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(1)\n"  # the parent died before the prctl: nothing to serve
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def die_with_parent_argv(argv: list[str]) -> list[str]:
    """``argv`` (an absolute program path first) behind the PDEATHSIG launcher (Linux)."""
    if not sys.platform.startswith("linux"):
        return list(argv)
    return [sys.executable, "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv]


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
