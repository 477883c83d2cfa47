"""The worker's load reports: a heartbeat even when idle (routers take a worker whose
reports stop as hung; ``--load-heartbeat-idle`` while nothing runs or waits), more often
while the load changes. A fake transport counts them."""

from __future__ import annotations

import asyncio

import pytest

from dynrt.runtime.config import WorkerConfig
from dynrt.runtime.protocol import LoadReport, load_report_decoder
from dynrt.worker.mock_engine import MockEngine, MockEngineConfig
from dynrt.worker.router_feed import RouterFeed


class CountingTransport:
    def __init__(self) -> None:
        self.reports: list[LoadReport] = []

    async def publish(self, subject: str, payload: bytes) -> None:
        self.reports.append(load_report_decoder.decode(payload))


async def reports_in(seconds: float, **config: float) -> list[LoadReport]:
    engine = MockEngine(MockEngineConfig(speedup=float("inf")))
    await engine.start()
    feed = RouterFeed(WorkerConfig(engine="mock", **config), engine, "a", "mock-model")  # type: ignore[arg-type]
    transport = CountingTransport()
    task = asyncio.create_task(feed.publish_load(transport))  # type: ignore[arg-type]
    try:
        await asyncio.sleep(seconds)
    finally:
        task.cancel()
        await engine.shutdown()
    return transport.reports


@pytest.mark.parametrize(("heartbeat", "expected"), [(0.1, 10), (0.2, 5)])
async def test_idle_worker_reports_every_idle_heartbeat(heartbeat: float, expected: int) -> None:
    reports = await reports_in(1.05, load_interval=0.1, load_heartbeat=0.1, load_heartbeat_idle=heartbeat)
    # (a busy machine delays the sleeps: fewer, never more)
    assert expected // 2 <= len(reports) <= expected + 1, len(reports)
    assert all(r.heartbeat == heartbeat for r in reports)


async def test_idle_heartbeat_defaults_to_a_second_and_is_never_below_the_heartbeat() -> None:
    reports = await reports_in(1.05, load_interval=0.1, load_heartbeat=0.1)
    assert 1 <= len(reports) <= 2, len(reports)  # the first one, then every second
    assert all(r.heartbeat == 1.0 for r in reports)
    reports = await reports_in(0.5, load_interval=0.1, load_heartbeat=0.2, load_heartbeat_idle=0.05)
    assert all(r.heartbeat == 0.2 for r in reports) and len(reports) <= 4


async def test_idle_worker_reports_no_more_often_than_its_heartbeat() -> None:
    reports = await reports_in(1.05, load_interval=0.05, load_heartbeat=0.5)
    assert 1 <= len(reports) <= 3, len(reports)  # the first one, then every 0.5 s
