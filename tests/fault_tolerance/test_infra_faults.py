"""etcd and NATS failing under load, and a storm of client cancellations.

- one etcd member of three killed (the leader, then a follower): nothing visible — no
  request fails, no stream moves, no instance leaves discovery, no lease is lost, and a
  new worker registers;
- all of etcd down for 10 s: serving goes on from the last view, a worker started during
  the outage registers once etcd is back, no component restarted;
- NATS restarted: in-flight streams migrate or finish, later requests succeed;
- half the clients disconnect mid-stream: every one of their requests is aborted on the
  worker and its KV freed; the other half get their exact answers.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from harness.load import Load
from harness.metrics import metric
from harness.reference import check
from tests.fault_tolerance.framework import Deployment


class InstanceMonitor:
    """Polls every frontend's ``/health`` and remembers the fewest instances any listed."""

    def __init__(self, d: Deployment) -> None:
        self.d = d
        self.fewest: int | None = None
        self.samples = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            for fe in self.d.frontends:
                count = await self.d.frontend_instances(fe)
                if count is not None:
                    self.samples += 1
                    self.fewest = count if self.fewest is None else min(self.fewest, count)
            await asyncio.sleep(0.05)

    def __enter__(self) -> "InstanceMonitor":
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


def lease_grants(log_text: str) -> int:
    return log_text.count("event=etcd_lease_granted")


@pytest.mark.slow
async def test_etcd_member_killed_leader_then_follower(tmp_path: Path) -> None:
    async with Deployment(tmp_path, workers=3, frontends=1, etcd_members=3) as d:
        originals = list(d.workers)
        load = Load(d.urls, requests=400, concurrency=6, max_tokens=100, tag="etcd-member")
        load.start()
        await load.wait_finished(6)
        with InstanceMonitor(d) as monitor:
            for role in ("leader", "follower"):
                victim = await d.etcd.leader() if role == "leader" else (await d.etcd.followers())[0]
                await d.kill_etcd_member(victim)
                done = len(load.finished())
                # Registrations go on with two members: a new worker registers.
                started = time.monotonic()
                await d.add_worker(start_timeout=20)
                await d.wait_instances(len(d.live_workers()), timeout=10)
                registered_after = time.monotonic() - started
                assert registered_after < 15, registered_after
                await load.wait_finished(done + 12)
                # The member comes back and rejoins (from its data dir, same ports).
                await d.restart_etcd_member(victim)
        load.stop_issuing()
        report = await check(await load.task)  # type: ignore[misc]
        report.assert_perfect()
        assert report.sent >= 30
        assert await d.migrations() == {}  # nothing visible: no stream moved
        assert monitor.samples > 0 and monitor.fewest is not None and monitor.fewest >= 3  # nobody left discovery
        assert [lease_grants(w.log_text()) for w in originals] == [1, 1, 1]  # no lease lost
        assert lease_grants(d.frontends[0].log_text()) == 1
        assert len(d.live_workers()) == 5
        await d.assert_kv_idle(timeout=3)


@pytest.mark.slow
async def test_etcd_fully_down_for_10s(tmp_path: Path) -> None:
    async with Deployment(tmp_path, workers=2, frontends=1, etcd_members=1) as d:
        load = Load(d.urls, requests=600, concurrency=6, max_tokens=100, tag="etcd-down")
        load.start()
        await load.wait_finished(6)
        pids = {name: pid for name, pid in d.pids().items() if not name.startswith("etcd")}
        late = d.new_worker(start_timeout=60)
        late_start: list[asyncio.Task[object]] = []

        async def during_outage() -> None:
            await asyncio.sleep(1.0)
            late_start.append(asyncio.create_task(late.start()))  # cannot register yet

        down_at = time.monotonic()
        down_for = await d.etcd_outage(10.0, during=during_outage)
        back_at = time.monotonic()
        served_during = sum(1 for s in load.finished() if s.sent_at > down_at and s.ended_at < back_at)
        assert not late_start[0].done()
        # Back: the late worker registers by itself, every frontend sees it.
        await asyncio.wait_for(late_start[0], 30)
        registered_after = time.monotonic() - back_at
        await d.wait_instances(3, timeout=10)
        done = len(load.finished())
        await load.wait_finished(done + 12)
        load.stop_issuing()
        report = await check(await load.task)  # type: ignore[misc]
        report.assert_perfect()
        assert down_for >= 10.0
        assert served_during >= 12, served_during  # served from the last view meanwhile
        assert await d.migrations() == {}
        # No component restarted: the same processes, all alive.
        assert {name: pid for name, pid in d.pids().items() if name in pids} == pids
        assert registered_after < 10, registered_after
        assert len(d.live_workers()) == 3
        await d.assert_kv_idle(timeout=3)
        print(f"served {served_during} requests during the outage; late worker registered "
              f"{registered_after:.2f}s after etcd came back")


async def test_nats_restart_under_load(tmp_path: Path) -> None:
    wave = 9
    async with Deployment(tmp_path, workers=3) as d:
        load = Load(d.urls, requests=2 * wave, concurrency=wave, max_tokens=300, tag="nats")
        load.start()
        streaming = await load.wait_streaming(wave, min_chunks=10)
        down_for = await d.restart_nats(down=0.5)
        report = await check(await load.task)  # type: ignore[misc]
        # Count failures (target: 0): the streams cut by the restart migrate.
        assert report.failed == 0, report.errors
        report.assert_perfect(expected=2 * wave)
        # Every stream cut by the restart moved once, and nothing else moved: no worker
        # was taken for dead while it re-subscribed.
        migrations = await d.migrations()
        assert migrations == {"nats_restart": len(streaming)}, migrations
        # After the restart: new requests succeed, no leaked KV.
        after = Load(d.urls, requests=6, concurrency=6, max_tokens=40, tag="nats-after")
        (await check(await after.run())).assert_perfect(expected=6)
        await d.assert_kv_idle(timeout=5)
        print(f"NATS down {down_for:.2f}s; migrations {migrations}; longest gap {report.max_gap:.2f}s")


async def test_client_cancellation_storm(tmp_path: Path) -> None:
    clients = 16
    async with Deployment(tmp_path, workers=2) as d:
        # Even clients ask for 3000 tokens (~20 s: they cannot finish by themselves during
        # the test) and hang up after 20 chunks; odd ones read their 200-token answer.
        cancel = {i: 20 for i in range(0, clients, 2)}
        load = Load(d.urls, requests=clients, concurrency=clients, tag="cancel", cancel_after=cancel,
                    max_tokens=[3000 if i in cancel else 200 for i in range(clients)])
        streams = await load.run()
        report = await check(streams)
        assert report.cancelled == clients // 2
        assert report.failed == 0, report.errors
        assert report.ok == report.identical == clients // 2  # the others: unaffected
        # Every abandoned request was aborted on its worker and its KV freed.
        await d.assert_kv_idle(timeout=3)
        outcomes: dict[str, int] = {}
        for w in d.live_workers():
            for outcome, count in (await d.worker_outcomes(w)).items():
                outcomes[outcome] = outcomes.get(outcome, 0) + count
        assert outcomes.get("length", 0) == clients // 2
        assert sum(v for k, v in outcomes.items() if k != "length") == clients // 2, outcomes
        samples = await d.frontend_metrics(d.frontends[0])
        assert metric(samples, "dynrt_frontend_cancellations_total", model="mock-model") == clients // 2
        assert metric(samples, "dynrt_frontend_requests_total", model="mock-model", endpoint="chat",
                      status="499") == clients // 2
        assert metric(samples, "dynrt_frontend_requests_total", model="mock-model", endpoint="chat",
                      status="200") == clients // 2
        assert await d.migrations() == {}


async def test_nats_restart_worker_reconnects_late(tmp_path: Path) -> None:
    """The frontend is back on NATS before the (only) worker is: its re-sent requests
    get no-responders for a moment. That is no proof of death — the streams must wait
    for the worker instead of failing, and it must not be marked down."""
    async with Deployment(tmp_path, workers=1) as d:
        (worker,) = d.workers
        load = Load(d.urls, requests=8, concurrency=4, max_tokens=300, tag="nats-late")
        load.start()
        await load.wait_streaming(4, min_chunks=10)
        d.send(worker, signal.SIGSTOP)  # it cannot reconnect until SIGCONT
        try:
            await d.restart_nats(down=0.2)
            await asyncio.sleep(0.5)  # the frontend reconnects and re-sends meanwhile
        finally:
            d.send(worker, signal.SIGCONT)
        report = await check(await load.task)  # type: ignore[misc]
        report.assert_perfect(expected=8)
        assert await d.migrations() == {"nats_restart": 4}
        assert "resend_after_nats_reconnect" in d.frontends[0].log_text()
        after = Load(d.urls, requests=4, concurrency=4, max_tokens=40, tag="nats-late-after")
        (await check(await after.run())).assert_perfect(expected=4)
        await d.assert_kv_idle(timeout=5)
