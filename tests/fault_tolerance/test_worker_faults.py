"""Workers failing under load: SIGKILL, SIGSTOP, SIGTERM, and a rolling restart.

The promise (docs/architecture.md, failure table): in-flight streams migrate and the client sees one
continuous answer; the dead / hung / draining instance leaves routing. The wave scenarios
send 2 x WAVE requests at concurrency WAVE, so when the fault hits, every slot is
mid-answer, none has finished and none is waiting: the victim's in-flight count read just
before the signal is exactly the number of streams that must migrate.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from harness.load import Load
from harness.reference import check
from tests.fault_tolerance.framework import Deployment

WAVE = 9  # concurrent streams: 3 per worker
MAX_TOKENS = 300  # ~2 s per answer at speedup 1: long enough to be hit mid-stream
LEASE_TTL = 3  # workers' lease: a dead or hung worker leaves discovery within this


async def _wave_fault(d: Deployment, sig: int, tag: str) -> tuple[Load, object, int, float]:
    """Send the wave, signal the busiest worker once every slot streams; returns
    (load, victim, its in-flight count at the signal, signal time)."""
    load = Load(d.urls, requests=2 * WAVE, concurrency=WAVE, max_tokens=MAX_TOKENS, tag=tag)
    load.start()
    await load.wait_streaming(WAVE, min_chunks=10)
    victim, in_flight = await d.busiest_worker()
    d.send(victim, sig)
    signalled_at = time.monotonic()
    return load, victim, in_flight, signalled_at


async def test_worker_sigkill_under_load(tmp_path: Path) -> None:
    async with Deployment(tmp_path, workers=3, worker_args=["--lease-ttl", str(LEASE_TTL)]) as d:
        load, victim, moved, killed_at = await _wave_fault(d, signal.SIGKILL, "kill")
        # The dead instance leaves discovery at lease expiry at the latest (routing drops
        # it at once: no-responders marks it down).
        await d.wait_instances(2, timeout=LEASE_TTL + 2)
        left_after = time.monotonic() - killed_at
        streams = await load.task  # type: ignore[misc]
        report = await check(streams)
        report.assert_perfect(expected=2 * WAVE)
        assert moved >= 1
        assert await d.migrations() == {"killed": moved}
        assert all(source == victim.record.instance_id  # type: ignore[attr-defined]
                   for moves in d.migrated_requests().values() for _, source in moves)
        assert report.max_gap < 1.5, report.max_gap  # ping detection, far below the stall timeout
        assert left_after <= LEASE_TTL + 2, left_after
        # The first stream whose ping finds the victim gone moves the victim's other
        # streams at once: one such event, naming the victim, whenever more than one moved.
        victim_id = victim.record.instance_id  # type: ignore[attr-defined]
        moved_together = [line for fe in d.frontends for line in fe.log_text().splitlines()
                          if "event=dead_instance_streams_moving" in line]
        assert len(moved_together) == (1 if moved >= 2 else 0), moved_together
        assert all(f"instance_id={victim_id}" in line for line in moved_together), moved_together
        await d.assert_kv_idle(timeout=3)


async def test_worker_sigstop_under_load(tmp_path: Path) -> None:
    async with Deployment(tmp_path, workers=3, worker_args=["--lease-ttl", str(LEASE_TTL)]) as d:
        load, victim, moved, stopped_at = await _wave_fault(d, signal.SIGSTOP, "stop")
        try:
            # Its load reports stop: suspect, pinged, its streams moved (not after the
            # 2 s stall timeout); lease expiry then removes the hung instance.
            await d.wait_instances(2, timeout=LEASE_TTL + 3)
            removed_after = time.monotonic() - stopped_at
            streams = await load.task  # type: ignore[misc]
        finally:
            d.send(victim, signal.SIGCONT)
        report = await check(streams)
        report.assert_perfect(expected=2 * WAVE)
        assert moved >= 1
        assert await d.migrations() == {"suspect": moved}
        assert removed_after <= LEASE_TTL + 3
        assert report.max_gap < 1.0, report.max_gap  # missed load reports, far below the 2 s stall timeout
        # Resumed: the worker gets the frontend's cancels, frees the KV, re-registers by
        # itself (same process) and serves again.
        await d.wait_instances(3, timeout=10)
        assert victim.alive()  # type: ignore[attr-defined]
        await d.assert_kv_idle(timeout=5)
        after = Load(d.urls, requests=6, concurrency=6, max_tokens=40, tag="stop-after")
        (await check(await after.run())).assert_perfect(expected=6)
        assert await d.migrations() == {"suspect": moved}


async def test_stopped_worker_leaves_routing_at_once_and_returns_on_sigcont(tmp_path: Path) -> None:
    """A SIGSTOPped worker keeps its key (lease TTL 10 s) and its subscriptions; only its
    load reports stop. Within a second no new request goes to it (one that did would
    have to migrate); after SIGCONT its reports resume and it is routed to again."""
    async with Deployment(tmp_path, workers=3, worker_args=["--lease-ttl", "30"]) as d:
        load, victim, moved, stopped_at = await _wave_fault(d, signal.SIGSTOP, "stop-route")
        try:
            streams = await load.task  # type: ignore[misc]
            (await check(streams)).assert_perfect(expected=2 * WAVE)
            assert await d.migrations() == {"suspect": moved}
            # The second half of the wave was sent after the SIGSTOP: none of it went there.
            assert all(source == victim.record.instance_id  # type: ignore[attr-defined]
                       for moves in d.migrated_requests().values() for _, source in moves)
            # Still registered, still stopped: 24 new requests, none routed to it.
            assert len(await d.registered_instances()) == 3
            during = Load(d.urls, requests=24, concurrency=8, max_tokens=20, tag="stop-during")
            (await check(await during.run())).assert_perfect(expected=24)
            assert await d.migrations() == {"suspect": moved}
        finally:
            d.send(victim, signal.SIGCONT)
        await d.assert_kv_idle(timeout=5)  # the moved streams' cancels reach it: KV freed
        before = sum((await d.worker_outcomes(victim)).values())  # type: ignore[arg-type]
        after = Load(d.urls, requests=30, concurrency=6, max_tokens=20, tag="stop-resumed")
        (await check(await after.run())).assert_perfect(expected=30)
        served = sum((await d.worker_outcomes(victim)).values()) - before  # type: ignore[arg-type]
        assert served > 0, "the resumed worker got no requests"
        assert await d.migrations() == {"suspect": moved}


async def test_heavy_load_no_worker_is_suspect_and_nothing_migrates(tmp_path: Path) -> None:
    """Many concurrent streams with long prompts on two workers and one frontend, all
    competing for the CPU: the workers keep reporting from their event loops, so none
    is ever suspect and no stream moves."""
    async with Deployment(tmp_path, workers=2) as d:
        load = Load(d.urls, requests=128, concurrency=64, max_tokens=100, tag="heavy", prompt_words=600,
                    request_timeout=180)
        report = await check(await load.run())
        report.assert_perfect(expected=128)
        assert await d.migrations() == {}
        assert "instance_suspect" not in d.frontends[0].log_text()
        await d.assert_kv_idle(timeout=5)


async def test_worker_sigterm_under_load(tmp_path: Path) -> None:
    async with Deployment(tmp_path, workers=3, worker_args=["--drain-timeout", "0.3"]) as d:
        load, victim, moved, _ = await _wave_fault(d, signal.SIGTERM, "term")
        # Deregistered first: no new request reaches it.
        await d.wait_instances(2, timeout=3)
        assert await victim.wait(15) == 0  # type: ignore[attr-defined]
        streams = await load.task  # type: ignore[misc]
        report = await check(streams)
        report.assert_perfect(expected=2 * WAVE)
        assert moved >= 1
        # Past its 0.3 s drain timeout the worker hands every open stream back.
        assert await d.migrations() == {"drained": moved}
        assert f"requests={moved}" in victim.log_text()  # type: ignore[attr-defined]
        await d.assert_kv_idle(timeout=3)


@pytest.mark.slow
async def test_rolling_restart_under_load(tmp_path: Path) -> None:
    """Every worker, one at a time: SIGTERM (drain 0.5 s, then hand-off), wait for exit
    0, start its replacement, wait until the frontend routes to it."""
    async with Deployment(tmp_path, workers=3, worker_args=["--drain-timeout", "0.5"]) as d:
        originals = list(d.workers)
        load = Load(d.urls, requests=400, concurrency=6, max_tokens=150, tag="roll")
        load.start()
        await load.wait_finished(6)
        for worker in originals:
            d.send(worker, signal.SIGTERM)
            assert await worker.wait(20) == 0
            await d.add_worker()
            await d.wait_instances(3, timeout=15)
            await load.wait_finished(len(load.finished()) + 6)  # the new worker takes traffic
        load.stop_issuing()
        streams = await load.task  # type: ignore[misc]
        report = await check(streams)
        report.assert_perfect()
        assert report.sent >= 30
        # Every migration was a drain hand-off, and as many as the workers reported.
        handed_off = sum(int(field.split("=", 1)[1]) for w in originals for line in w.log_text().splitlines()
                         if "event=drain_timeout_migrating" in line for field in line.split()
                         if field.startswith("requests="))
        migrations = await d.migrations()
        # A request that reached a worker between its SIGTERM and the frontend seeing its
        # draining record is refused ("busy": the worker is draining; "no_responders": it
        # has unsubscribed already; "killed": another stream of this frontend on the same
        # instance, moved at once by that no-responders answer) and re-routed at once; the
        # client does not notice.
        assert set(migrations) <= {"drained", "busy", "no_responders", "killed"}, migrations
        refused = migrations.get("busy", 0) + migrations.get("no_responders", 0) + migrations.get("killed", 0)
        assert refused <= len(originals) * 6
        # A stream the worker handed off may already have been moved by the frontend
        # (cause "killed") when a sibling's no-responders answer arrived first (seen in CI:
        # handed off 3, drained 2, killed 1), so the frontend never counts it as drained.
        drained = migrations.get("drained", 0)
        assert drained <= handed_off <= drained + migrations.get("killed", 0), (handed_off, migrations)
        assert all(not w.alive() for w in originals)
        assert len(d.live_workers()) == 3
        await d.assert_kv_idle(timeout=3)
