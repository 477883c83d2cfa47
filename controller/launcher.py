"""How the controller starts, finds and stops replica processes.

``Launcher`` is the interface; ``LocalProcessLauncher`` runs ``dynrt worker ...``
subprocesses on this host with a log file each. Another launcher (Kubernetes pods,
compose services) implements the same five methods.

Replicas must outlive the controller (a dead controller never takes serving down), so
local workers start in their own session and *without* a parent-death signal. After a
controller restart, ``adopt`` finds them again by pid — and checks that the pid still
runs that replica (its command line carries ``--replica-id``), so a pid reused after a
host restart is never mistaken for a replica.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Protocol

from dynrt.runtime.log import get_logger

log = get_logger("launcher")


class Launcher(Protocol):
    host: str

    def launch(self, replica_id: str, argv: list[str], env: dict[str, str]) -> tuple[int, str]:
        """Start ``dynrt <argv>`` for ``replica_id``; returns (pid, log path)."""
        ...

    def adopt(self, replica_id: str, pid: int, host: str) -> bool:
        """True if ``pid`` on ``host`` is still that replica (then it is managed again)."""
        ...

    def find(self, replica_id: str) -> int | None:
        """A live process of ``replica_id`` this launcher can see, if any."""
        ...

    def alive(self, replica_id: str, pid: int) -> bool:
        ...

    def exit_code(self, pid: int) -> int | None:
        """The exit code if the process was ours and has exited (None if unknown)."""
        ...

    def signal(self, pid: int, sig: int) -> None:
        ...


def _proc_state(pid: int) -> str | None:
    """The process state letter from /proc (None if there is no such process)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # "pid (comm) S ..." — comm may contain spaces or parentheses: split after the last ')'.
    return data[data.rfind(b")") + 2:][:1].decode() or None


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


class LocalProcessLauncher:
    """``python -m dynrt.cli worker ...`` on this host, logs in ``log_dir``."""

    def __init__(self, log_dir: Path, python: str = sys.executable) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.python = python
        self.host = socket.gethostname()
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._exit_codes: dict[int, int] = {}

    def launch(self, replica_id: str, argv: list[str], env: dict[str, str]) -> tuple[int, str]:
        log_path = self.log_dir / f"{replica_id}.log"
        with open(log_path, "ab") as log_file:
            # Own session, no PDEATHSIG: replicas keep serving when the controller dies.
            proc = subprocess.Popen([self.python, "-m", "dynrt.cli", *argv], stdout=log_file,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env={**os.environ, **env}, close_fds=True)
        self._children[proc.pid] = proc
        log.info("replica_launched", replica_id=replica_id, pid=proc.pid, log=str(log_path))
        return proc.pid, str(log_path)

    def _is_replica(self, replica_id: str, pid: int) -> bool:
        state = _proc_state(pid)
        if state is None or state in ("Z", "X"):
            return False
        argv = _cmdline(pid)
        return any(a == replica_id for a in argv) or f"--replica-id={replica_id}" in argv

    def adopt(self, replica_id: str, pid: int, host: str) -> bool:
        if host != self.host or pid <= 0:
            return False
        return self._is_replica(replica_id, pid)

    def find(self, replica_id: str) -> int | None:
        """The pid of a live process on this host running ``replica_id`` (a replica
        launched just before the controller died, before its pid was stored)."""
        for entry in os.listdir("/proc"):
            if entry.isdigit() and self._is_replica(replica_id, int(entry)):
                argv = _cmdline(int(entry))
                if "--replica-id" in argv and "worker" in argv:
                    return int(entry)
        return None

    def alive(self, replica_id: str, pid: int) -> bool:
        proc = self._children.get(pid)
        if proc is not None:
            code = proc.poll()
            if code is None:
                return True
            self._exit_codes[pid] = code
            del self._children[pid]
            return False
        return self._is_replica(replica_id, pid)

    def exit_code(self, pid: int) -> int | None:
        return self._exit_codes.get(pid)

    def signal(self, pid: int, sig: int) -> None:
        if pid <= 0:
            return
        try:
            if sig in (signal.SIGTERM, signal.SIGKILL):
                os.kill(pid, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError as exc:
            log.warning("replica_signal_denied", pid=pid, error=str(exc))
