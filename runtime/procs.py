"""Child processes: spawn them (dying with us, or outliving us), signal them, stop them
for sure, and read what the kernel says about any process in ``/proc``.

    proc = spawn([sys.executable, "-m", "dynrt.cli", "worker", ...], log_path)
    send_signal(proc, signal.SIGSTOP)         # a Popen or a pid; a gone process is no error
    code = stop_process(proc, timeout=10)     # SIGCONT + SIGTERM, SIGKILL after the timeout
    stat = read_stat(pid)                     # ProcStat: state, start time, CPU ticks (or None)
    argv = read_cmdline(pid)

Every child gets stdin from /dev/null and writes stdout and stderr to one log file
(appended), or to /dev/null without one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# Children of ``dynrt up`` and of test runs must die with them, even when they are
# SIGKILLed: on Linux the kernel does that for a child that set PR_SET_PDEATHSIG (kept
# across exec). subprocess's ``preexec_fn`` could set it, but only by fork()ing this
# process, and a fork taken while gRPC's threads run can crash the child before it execs
# (SIGABRT, "epoll_wait error: Bad file descriptor"). So a tiny launcher sets it and execs
# the real program; subprocess spawns the launcher without forking us. The "parent" is
# the spawning *thread*: spawn from the event loop's thread, not from a worker thread.
_DIE_WITH_PARENT_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(1)\n"  # the parent died before the prctl: nothing to serve
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def die_with_parent_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` (an absolute program path first) behind the PDEATHSIG launcher (Linux;
    elsewhere unchanged)."""
    if not sys.platform.startswith("linux"):
        return list(argv)
    return [sys.executable, "-S", "-c", _DIE_WITH_PARENT_LAUNCHER, str(os.getpid()), *argv]


def spawn(argv: Sequence[str], log_path: Path | None = None, *, env: Mapping[str, str] | None = None,
          new_session: bool = False) -> subprocess.Popen[bytes]:
    """Start ``argv`` (an absolute program path first) as a child that gets SIGTERM when
    this process dies, even by SIGKILL (see ``die_with_parent_argv``). ``env`` is added
    to this process's environment. ``new_session``: its own session, so a terminal's
    Ctrl-C reaches only us and we stop our children in order."""
    return _popen(die_with_parent_argv(argv), log_path, env, new_session)


def spawn_detached(argv: Sequence[str], log_path: Path | None = None, *,
                   env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session and without a parent-death signal: a child that
    must outlive this process (a controller's replicas keep serving when it dies)."""
    return _popen(list(argv), log_path, env, new_session=True)


def _popen(argv: list[str], log_path: Path | None, env: Mapping[str, str] | None,
           new_session: bool) -> subprocess.Popen[bytes]:
    full_env = None if env is None else {**os.environ, **env}
    if log_path is None:
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                stdin=subprocess.DEVNULL, env=full_env, start_new_session=new_session)
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=full_env, start_new_session=new_session)


def send_signal(target: subprocess.Popen[bytes] | int, sig: int) -> bool:
    """Send ``sig`` to a child (``Popen``) or any pid; False if the process is gone (a
    child already reaped, no such pid). A pid we may not signal raises PermissionError."""
    if isinstance(target, subprocess.Popen):
        if target.poll() is not None:
            return False
        target.send_signal(sig)
        return True
    try:
        os.kill(target, sig)
    except ProcessLookupError:
        return False
    return True


def wait_process(proc: subprocess.Popen[bytes], timeout: float | None = None) -> int | None:
    """The exit code, or None if ``proc`` still runs after ``timeout`` seconds."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def stop_processes(procs: Iterable[subprocess.Popen[bytes]], timeout: float = 10.0) -> list[int]:
    """Stop every child for sure: SIGCONT (a stopped process cannot act on SIGTERM) and
    SIGTERM to all of them at once, then SIGKILL to any still running ``timeout`` seconds
    later. Returns their exit codes; a child that already exited just reports its own."""
    procs = list(procs)
    for proc in procs:
        if send_signal(proc, signal.SIGCONT):
            send_signal(proc, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    codes = []
    for proc in procs:
        code = wait_process(proc, max(0.0, deadline - time.monotonic()))
        if code is None:
            proc.kill()
            code = proc.wait()
        codes.append(code)
    return codes


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """``stop_processes`` for one child: its exit code."""
    return stop_processes([proc], timeout)[0]


@dataclass(frozen=True)
class ProcStat:
    """The fields of ``/proc/<pid>/stat`` this project reads (proc(5))."""

    pid: int
    name: str  # comm: the executable's name as the kernel keeps it (may hold spaces and ")")
    state: str  # R running, S sleeping, T stopped, Z zombie, X dead...
    ppid: int
    user_ticks: int  # CPU time in user mode, in clock ticks (threads included)
    system_ticks: int
    start_time: int  # clock ticks after boot: with the pid, names one process across pid reuse

    @property
    def running(self) -> bool:
        """The process exists and has not exited (a zombie has)."""
        return self.state not in ("Z", "X")

    @property
    def cpu_seconds(self) -> float:
        """User + system CPU seconds so far."""
        return (self.user_ticks + self.system_ticks) / os.sysconf("SC_CLK_TCK")


def parse_stat(data: bytes) -> ProcStat:
    """``/proc/<pid>/stat`` contents → ProcStat. The name sits in parentheses and may
    contain spaces and parentheses itself, so it ends at the *last* ``)``. ValueError if
    the text is not a stat line."""
    head, close, rest = data.rpartition(b")")
    pid_text, open_paren, name = head.partition(b" (")
    fields = rest.split()
    if not close or not open_paren or len(fields) < 20:
        raise ValueError(f"not a /proc/<pid>/stat line: {data[:80]!r}")
    # fields[0] is stat field 3 (state); field N of proc(5) is fields[N - 3].
    return ProcStat(pid=int(pid_text), name=name.decode(errors="replace"), state=fields[0].decode(),
                    ppid=int(fields[1]), user_ticks=int(fields[11]), system_ticks=int(fields[12]),
                    start_time=int(fields[19]))


def read_stat(pid: int) -> ProcStat | None:
    """The process's stat, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return parse_stat(f.read())
    except (OSError, ValueError):
        return None


def read_cmdline(pid: int) -> list[str] | None:
    """The process's argv, or None if there is no such process (a zombie's is empty)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            data = f.read()
    except OSError:
        return None
    args = data.split(b"\0")
    if args[-1] == b"":  # argv ends with a NUL (unless the process rewrote it)
        args.pop()
    return [arg.decode(errors="replace") for arg in args]


def is_running(pid: int) -> bool:
    """A process with this pid exists and is not a zombie."""
    stat = read_stat(pid)
    return stat is not None and stat.running


def all_pids() -> list[int]:
    """Every pid in ``/proc`` now (processes come and go while you look)."""
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
