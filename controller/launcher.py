"""How the controller starts, finds and stops replica processes.

``Launcher`` is the interface; ``LocalProcessLauncher`` runs ``dynrt worker ...``
subprocesses on this host with a log file each. Another launcher (Kubernetes pods,
compose services) implements the same six methods. ``replica_command`` is what a
replica runs: the same whatever launches it.

Replicas must outlive the controller (a dead controller never takes serving down), so
local workers start in their own session and *without* a parent-death signal. After a
controller restart, ``adopt`` finds them again by pid — and checks that the pid still
runs that replica (its command line carries ``--replica-id``), so a pid reused after a
host restart is never mistaken for a replica.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Protocol

from dynrt.controller.spec import ModelSpec
from dynrt.runtime.config import ControllerConfig
from dynrt.runtime.log import get_logger
from dynrt.runtime.procs import all_pids, is_running, read_cmdline, send_signal, spawn_detached

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


def replica_command(config: ControllerConfig, replica_id: str, m: ModelSpec) -> tuple[list[str], dict[str, str]]:
    """``dynrt`` arguments and extra environment of a replica of ``m``."""
    c = config
    argv = ["worker", "--namespace", c.namespace, "--etcd-endpoints", c.etcd_endpoints, "--nats-url", c.nats_url,
            "--replica-id", replica_id, *m.worker_args()]
    env = dict(m.env)
    # credentials by environment, not on the command line (ps shows argv to everyone)
    for name, value in (("DYNRT_ETCD_USER", c.etcd_user), ("DYNRT_ETCD_PASSWORD", c.etcd_password),
                        ("DYNRT_ETCD_CA", c.etcd_ca), ("DYNRT_ETCD_CERT", c.etcd_cert),
                        ("DYNRT_ETCD_KEY", c.etcd_key), ("DYNRT_NATS_CREDS", c.nats_creds)):
        if value:
            env[name] = value
    return argv, env


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
        # Own session, no PDEATHSIG: replicas keep serving when the controller dies.
        proc = spawn_detached([self.python, "-m", "dynrt.cli", *argv], log_path, env=env)
        self._children[proc.pid] = proc
        log.info("replica_launched", replica_id=replica_id, pid=proc.pid, log=str(log_path))
        return proc.pid, str(log_path)

    def _is_replica(self, replica_id: str, pid: int) -> bool:
        if not is_running(pid):
            return False
        argv = read_cmdline(pid) or []
        return any(a == replica_id for a in argv) or f"--replica-id={replica_id}" in argv

    def adopt(self, replica_id: str, pid: int, host: str) -> bool:
        if host != self.host or pid <= 0:
            return False
        return self._is_replica(replica_id, pid)

    def find(self, replica_id: str) -> int | None:
        """The pid of a live process on this host running ``replica_id`` (a replica
        launched just before the controller died, before its pid was stored)."""
        for pid in all_pids():
            if self._is_replica(replica_id, pid):
                argv = read_cmdline(pid) or []
                if "--replica-id" in argv and "worker" in argv:
                    return pid
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
                send_signal(pid, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            send_signal(pid, sig)
        except PermissionError as exc:
            log.warning("replica_signal_denied", pid=pid, error=str(exc))
