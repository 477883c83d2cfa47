"""The vLLM engine-process watchdog (no vLLM needed): it kills the listed processes when
its pipe closes, and only those still started at the listed time."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from dynrt.runtime.procs import read_stat
from dynrt.worker.vllm_watchdog import EngineProcessWatchdog, kill_listed

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(["sleep", "60"])
    yield process
    if process.poll() is None:
        process.kill()
    process.wait()


def test_kill_listed_checks_start_time(sleeper: subprocess.Popen[bytes]) -> None:
    stat = read_stat(sleeper.pid)
    assert stat is not None
    start = stat.start_time
    kill_listed(io.StringIO(f"{sleeper.pid} {start + 1}\nnot a line\n"))  # a reused pid: spared
    assert sleeper.poll() is None
    kill_listed(io.StringIO(f"{sleeper.pid} {start}\n"))
    assert sleeper.wait(5) == -signal.SIGKILL


def test_watchdog_process_kills_on_stop(sleeper: subprocess.Popen[bytes]) -> None:
    watchdog = EngineProcessWatchdog()
    watchdog.start([sleeper.pid])
    assert sleeper.poll() is None
    watchdog.stop()  # python -m dynrt.worker.vllm_watchdog sees EOF
    assert sleeper.wait(5) == -signal.SIGKILL
    watchdog.stop()  # idempotent


def test_nothing_to_watch_starts_nothing() -> None:
    watchdog = EngineProcessWatchdog()
    watchdog.start([])
    watchdog.stop()
