"""Kill vLLM's engine processes when the worker that started them dies.

vLLM may run parts of its engine as child processes (the engine core on GPU hosts,
~2 GB each). A worker killed with SIGKILL cannot stop them, so the worker starts this
module as a small separate process (``python -m dynrt.worker.vllm_watchdog``, in its
own session) and writes it one ``PID START_TIME`` line per engine process on a pipe.
When the pipe closes — the worker shut down, or died — the watchdog SIGKILLs every
listed process whose start time (field 22 of ``/proc/PID/stat``) is still the listed
one, so a reused pid is never hit, and exits.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterable
from typing import TextIO

from dynrt.runtime.log import get_logger
from dynrt.runtime.procs import read_cmdline, read_stat, send_signal

log = get_logger("vllm_engine")


def child_pids() -> set[int]:
    """Every descendant of this process (empty without psutil)."""
    try:
        import psutil

        return {p.pid for p in psutil.Process().children(recursive=True)}
    except Exception:
        return set()


class EngineProcessWatchdog:
    """The worker's side: start the watchdog for the processes vLLM started, stop it
    (which kills whatever of them is left) at shutdown."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, pids: Iterable[int]) -> None:
        """Watch ``pids`` (vLLM's new child processes). Linux only; a no-op when there
        is nothing to watch."""
        if not sys.platform.startswith("linux"):
            return
        lines = []
        for pid in sorted(pids):
            argv, stat = read_cmdline(pid), read_stat(pid)
            if argv is None or stat is None:
                continue  # gone already
            if "resource_tracker" in " ".join(argv):
                continue  # exits by itself once its pipe closes
            lines.append(f"{pid} {stat.start_time}\n")
        if not lines:
            return
        try:
            self._process = subprocess.Popen([sys.executable, "-m", "dynrt.worker.vllm_watchdog"], stdin=subprocess.PIPE,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                             start_new_session=True)
            assert self._process.stdin is not None
            self._process.stdin.write("".join(lines).encode())
            self._process.stdin.flush()
        except Exception as exc:
            log.warning("vllm_watchdog_failed", error=f"{type(exc).__name__}: {exc}")

    def stop(self) -> None:
        """Close the pipe: the watchdog kills whatever engine process is left, and exits."""
        process, self._process = self._process, None
        if process is None:
            return
        try:
            assert process.stdin is not None
            process.stdin.close()
            process.wait(5)
        except Exception:
            process.kill()


def kill_listed(lines: TextIO) -> None:
    """Read ``PID START_TIME`` lines until EOF, then SIGKILL each listed process that is
    still the one listed."""
    pids = []
    for line in lines:
        parts = line.split()
        if len(parts) == 2:
            pids.append((int(parts[0]), int(parts[1])))
    for pid, start in pids:
        stat = read_stat(pid)
        if stat is not None and stat.start_time == start:
            try:
                send_signal(pid, signal.SIGKILL)
            except PermissionError:
                pass


if __name__ == "__main__":
    kill_listed(sys.stdin)
