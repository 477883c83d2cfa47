"""Waiting for something to become true, with a deadline and a message that says what
did not happen."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


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
    """Block until ``text`` appears in the log file; returns that line. Fails at once if
    ``proc`` (the process writing the log) exits first."""
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
