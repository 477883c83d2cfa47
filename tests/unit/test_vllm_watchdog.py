"""The vLLM engine-process watchdog (no vLLM needed): it kills the listed processes when
its pipe closes, and only those still started at the listed time."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from dynrt.worker.vllm_watchdog import EngineProcessWatchdog, kill_listed, proc_start_time

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(["sleep", "60"])
    yield process
    if process.poll() is None:
        process.kill()
    process.wait()


def test_proc_start_time() -> None:
    assert proc_start_time(1) is not None
    assert proc_start_time(2**22 + 1) is None  # above pid_max: never a process


def test_kill_listed_checks_start_time(sleeper: subprocess.Popen[bytes]) -> None:
    start = proc_start_time(sleeper.pid)
    assert start is not None
    kill_listed(io.StringIO(f"{sleeper.pid} {int(start) + 1}\nnot a line\n"))  # a reused pid: spared
    assert sleeper.poll() is None
    kill_listed(io.StringIO(f"{sleeper.pid} {start}\n"))
    assert sleeper.wait(5) == -signal.SIGKILL


def test_watchdog_process_kills_on_stop(sleeper: subprocess.Popen[bytes]) -> None:
    pytest.importorskip("psutil")
    watchdog = EngineProcessWatchdog()
    watchdog.start([sleeper.pid])
    assert sleeper.poll() is None
    watchdog.stop()  # python -m dynrt.worker.vllm_watchdog sees EOF
    assert sleeper.wait(5) == -signal.SIGKILL
    watchdog.stop()  # idempotent


def test_nothing_to_watch_starts_nothing() -> None:
    pytest.importorskip("psutil")
    watchdog = EngineProcessWatchdog()
    watchdog.start([])
    watchdog.stop()
