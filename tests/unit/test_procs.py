"""dynrt.runtime.procs: /proc/<pid>/stat parsing, and spawning, signalling and stopping
real children (``sleep`` and small Python programs)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dynrt.runtime.procs import (
    ProcStat,
    is_running,
    parse_stat,
    read_cmdline,
    read_stat,
    send_signal,
    spawn,
    stop_process,
    stop_processes,
    wait_process,
)

SLEEP = shutil.which("sleep") or "/bin/sleep"
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG are Linux")


def stat_line(name: str, state: str = "S") -> bytes:
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
    # utime stime cutime cstime priority nice threads itrealvalue starttime vsize ...
    return (f"4242 ({name}) {state} 17 4242 4242 0 -1 4194304 120 0 0 0 "
            f"31 7 0 0 20 0 3 0 987654 1000000 200 18446744073709551615").encode()


# ---------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------


def test_parse_stat_plain_name() -> None:
    assert parse_stat(stat_line("sleep")) == ProcStat(pid=4242, name="sleep", state="S", ppid=17, user_ticks=31,
                                                     system_ticks=7, start_time=987654)


@pytest.mark.parametrize("name", ["my worker", "a) (b", "x) R 1 2 (", ")", "(("])
def test_parse_stat_name_with_spaces_and_parentheses(name: str) -> None:
    stat = parse_stat(stat_line(name, state="T"))
    assert (stat.name, stat.state, stat.ppid, stat.start_time) == (name, "T", 17, 987654)


@pytest.mark.parametrize("state, running", [("R", True), ("S", True), ("T", True), ("Z", False), ("X", False)])
def test_running_is_false_for_zombies_and_dead(state: str, running: bool) -> None:
    assert parse_stat(stat_line("w", state)).running is running


def test_cpu_seconds_counts_user_and_system_ticks() -> None:
    assert parse_stat(stat_line("w")).cpu_seconds == pytest.approx(38 / os.sysconf("SC_CLK_TCK"))


@pytest.mark.parametrize("data", [b"", b"4242 sleep S 1", b"4242 (sleep) S 1 2 3"])
def test_parse_stat_rejects_what_is_not_a_stat_line(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse_stat(data)


# ---------------------------------------------------------------------------
# real processes
# ---------------------------------------------------------------------------


@linux_only
def test_read_stat_and_cmdline_of_a_live_child(tmp_path: Path) -> None:
    proc = spawn([SLEEP, "30"], tmp_path / "sleep.log")
    try:
        stat = read_stat(proc.pid)
        assert stat is not None and stat.pid == proc.pid and stat.running
        assert stat.start_time > 0
        wait_for_cmdline(proc.pid, [SLEEP, "30"])  # the launcher execs into sleep
        assert read_stat(proc.pid).start_time == stat.start_time  # type: ignore[union-attr]  # exec keeps it
    finally:
        stop_process(proc)
    assert read_stat(proc.pid) is None and read_cmdline(proc.pid) is None and not is_running(proc.pid)


def python_child_with_sigterm_handler(handler: str, tmp_path: Path) -> subprocess.Popen[bytes]:
    """A Python child with ``handler`` for SIGTERM, once it is installed."""
    log = tmp_path / "child.log"
    proc = spawn([sys.executable, "-c", f"import signal, sys, time\nsignal.signal(signal.SIGTERM, {handler})\n"
                  "print('ready', flush=True)\ntime.sleep(60)\n"], log)
    wait_for_text(log, "ready")
    return proc


@linux_only
def test_stop_resumes_a_stopped_child_and_returns_its_exit_code(tmp_path: Path) -> None:
    proc = python_child_with_sigterm_handler("lambda *_: sys.exit(3)", tmp_path)
    assert send_signal(proc, signal.SIGSTOP)
    wait_for_state(proc.pid, "T")
    started = time.monotonic()
    assert stop_process(proc, timeout=10) == 3  # its own SIGTERM handler ran
    assert time.monotonic() - started < 5


@linux_only
def test_stop_kills_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    proc = python_child_with_sigterm_handler("signal.SIG_IGN", tmp_path)
    started = time.monotonic()
    assert stop_process(proc, timeout=0.5) == -signal.SIGKILL
    assert 0.4 < time.monotonic() - started < 5


@linux_only
def test_stop_processes_stops_all_at_once_and_tolerates_exited_ones(tmp_path: Path) -> None:
    done = spawn([sys.executable, "-c", "raise SystemExit(5)"])
    assert wait_process(done, 10) == 5
    sleepers = [spawn([SLEEP, "60"]) for _ in range(3)]
    assert stop_processes([done, *sleepers], timeout=10) == [5] + [-signal.SIGTERM] * 3
    assert not send_signal(done, signal.SIGTERM)  # gone: no error


def test_wait_process_times_out_with_none() -> None:
    proc = spawn([SLEEP, "60"])
    try:
        assert wait_process(proc, 0.1) is None
    finally:
        stop_process(proc)


@linux_only
def test_spawn_adds_env_to_ours_and_logs_both_streams(tmp_path: Path) -> None:
    log = tmp_path / "env.log"
    proc = spawn([sys.executable, "-c", "import os, sys\n"
                  "print(os.environ['DYNRT_PROCS_TEST'], bool(os.environ.get('PATH')), flush=True)\n"
                  "print('to stderr', file=sys.stderr)\n"], log, env={"DYNRT_PROCS_TEST": "yes"})
    assert wait_process(proc, 10) == 0
    assert log.read_text().split("\n")[:2] == ["yes True", "to stderr"]


# A parent that starts a ``sleep`` with the given spawn function, prints its pid, and
# waits to be killed.
_PARENT = """
import sys, time
from dynrt.runtime.procs import {function}
child = {function}([{sleep!r}, "60"])
print(child.pid, flush=True)
time.sleep(60)
"""


def _child_of_killed_parent(function: str, tmp_path: Path) -> int:
    """Run a parent that spawns a sleep with ``function``, SIGKILL the parent, return the sleep's pid."""
    parent = subprocess.Popen([sys.executable, "-c", _PARENT.format(function=function, sleep=SLEEP)],
                              stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        wait_for_cmdline(child, [SLEEP, "60"])
    finally:
        parent.kill()
        parent.wait()
    return child


@linux_only
def test_spawned_child_dies_with_its_parent_even_by_sigkill(tmp_path: Path) -> None:
    child = _child_of_killed_parent("spawn", tmp_path)
    wait_until(lambda: not is_running(child), "the child to die with its SIGKILLed parent")


@linux_only
def test_detached_child_outlives_its_parent_in_its_own_session(tmp_path: Path) -> None:
    child = _child_of_killed_parent("spawn_detached", tmp_path)
    try:
        time.sleep(0.3)
        assert is_running(child)
        assert os.getsid(child) == child  # its own session
    finally:
        send_signal(child, signal.SIGKILL)


@linux_only
def test_signal_to_a_pid_that_does_not_exist_is_no_error() -> None:
    no_such_pid = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    assert not send_signal(no_such_pid, signal.SIGTERM)
    assert read_stat(no_such_pid) is None and read_cmdline(no_such_pid) is None


# ---------------------------------------------------------------------------


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def wait_for_text(path: Path, text: str) -> None:
    wait_until(lambda: path.exists() and text in path.read_text(), f"{text!r} in {path}")


def wait_for_state(pid: int, state: str) -> None:
    wait_until(lambda: getattr(read_stat(pid), "state", None) == state, f"pid {pid} in state {state}")


def wait_for_cmdline(pid: int, argv: list[str]) -> None:
    wait_until(lambda: read_cmdline(pid) == argv, f"pid {pid} running {argv}")
