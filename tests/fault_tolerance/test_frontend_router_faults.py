"""A frontend or the standalone router failing under load.

- frontend SIGKILL with two frontends: only the dead frontend's own connections fail; the
  other frontend serves every request; the workers abort the dead frontend's requests and
  free their KV within its lease TTL + 2 s.
- standalone router SIGKILL: frontends route locally (bypass), no request fails; a new
  router process: frontends go back to it, and no request bypasses it any more.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from harness.http import get_json
from harness.load import Load
from harness.reference import check
from tests.fault_tolerance.framework import Deployment

FRONTEND_LEASE_TTL = 2


@pytest.mark.slow
async def test_frontend_sigkill_other_frontend_serves_and_kv_freed(tmp_path: Path) -> None:
    async with Deployment(tmp_path, workers=3, frontends=2,
                          frontend_args=["--lease-ttl", str(FRONTEND_LEASE_TTL)]) as d:
        victim, survivor = d.frontends
        # Long answers on the frontend that dies (~20 s each: they cannot end by themselves
        # within the bound below), short ones on the survivor, before and after the kill.
        doomed = Load([victim.url], requests=4, concurrency=4, max_tokens=3000, tag="doomed")
        doomed.start()
        served = Load([survivor.url], requests=400, concurrency=4, max_tokens=60, tag="survivor")
        served.start()
        await doomed.wait_streaming(4, min_chunks=10)
        await served.wait_finished(4)
        d.send(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        await victim.wait(5)
        # The survivor goes on for 1 s after the kill, then stops taking new requests so
        # that only the dead frontend's requests could still hold KV.
        await asyncio.sleep(1.0)
        served.stop_issuing()

        # The workers abort every one of the dead frontend's requests...
        async def aborted() -> int:
            total = 0
            for w in d.live_workers():
                outcomes = await d.worker_outcomes(w)
                total += sum(v for k, v in outcomes.items() if k not in ("length", "stop"))
            return total

        deadline = killed_at + FRONTEND_LEASE_TTL + 2
        while await aborted() < 4:
            assert time.monotonic() < deadline, f"dead frontend's requests not aborted: {await d.kv_state()}"
            await asyncio.sleep(0.05)
        aborted_after = time.monotonic() - killed_at
        # ...and every block is free by then (the survivor's short answers are done).
        await served.wait_until(lambda: not served.in_flight(), timeout=max(0.1, deadline - time.monotonic()),
                                what="the survivor's last requests")
        await d.assert_kv_idle(timeout=max(0.1, deadline - time.monotonic()))
        freed_after = time.monotonic() - killed_at
        assert await aborted() == 4
        assert freed_after <= FRONTEND_LEASE_TTL + 2, freed_after

        # Only the dead frontend's own connections failed.
        doomed_streams = await doomed.task  # type: ignore[misc]
        assert [s.failed for s in doomed_streams] == [True] * 4
        survivor_streams = await served.task  # type: ignore[misc]
        report = await check(survivor_streams)
        report.assert_perfect()
        assert report.sent >= 8
        assert sum(1 for s in survivor_streams if s.sent_at > killed_at) >= 1
        # And it keeps serving.
        after = Load([survivor.url], requests=8, concurrency=4, max_tokens=60, tag="after")
        (await check(await after.run())).assert_perfect(expected=8)
        assert await d.migrations() == {}
        print(f"aborted after {aborted_after:.2f}s, KV freed after {freed_after:.2f}s")


async def _router_decisions(d: Deployment) -> float:
    assert d.router is not None
    async with d.session.get(d.router.metrics_url) as response:
        text = await response.text()
    from harness.metrics import metric, parse_metrics

    return metric(parse_metrics(text), "dynrt_router_decisions_total", outcome="chosen")


async def _remote_up(d: Deployment) -> list[float]:
    from harness.metrics import metric

    return [metric(await d.frontend_metrics(fe), "dynrt_frontend_router_remote_up") for fe in d.frontends]


@pytest.mark.slow
async def test_router_sigkill_bypass_then_back_to_remote(tmp_path: Path) -> None:
    async with Deployment(tmp_path, workers=3, frontends=2, router=True) as d:
        # Remote routing: the router decides every request, nobody bypasses it.
        before = Load(d.urls, requests=16, concurrency=8, max_tokens=60, tag="remote")
        (await check(await before.run())).assert_perfect(expected=16)
        assert await d.metric_sum("dynrt_frontend_router_bypass_total") == 0
        assert await _router_decisions(d) == 16
        assert await _remote_up(d) == [1, 1]

        # SIGKILL the router under load: every request still succeeds, routed locally.
        load = Load(d.urls, requests=400, concurrency=8, max_tokens=60, tag="bypass")
        load.start()
        await load.wait_finished(8)
        first_router = d.router
        assert first_router is not None
        d.send(first_router, signal.SIGKILL)
        killed_at = time.monotonic()
        await first_router.wait(5)
        await load.wait_until(lambda: sum(1 for s in load.finished() if s.sent_at > killed_at + 0.2) >= 24,
                              timeout=60, what="24 requests sent after the kill")
        load.stop_issuing()
        report = await check(await load.task)  # type: ignore[misc]
        report.assert_perfect()
        after_kill = sum(1 for s in load.sent() if s.sent_at > killed_at)
        # Asking the router just before the kill: no answer within the 0.5 s timeout.
        asking = sum(1 for s in load.sent() if killed_at - 0.6 <= s.sent_at <= killed_at)
        bypassed = await d.metric_sum("dynrt_frontend_router_bypass_total")
        causes = await d.metric_by("dynrt_frontend_router_bypass_total", "cause")
        # Every request routed after the kill was routed locally: the first one of each
        # frontend got no-responders, the next ones skipped the router ("down"), and the
        # ones the router was deciding when it died timed out.
        assert after_kill <= bypassed <= after_kill + asking, (bypassed, after_kill, asking, causes)
        assert set(causes) <= {"no_responders", "down", "timeout"}, causes
        assert 1 <= causes.get("no_responders", 0) + causes.get("timeout", 0) <= 2 + asking, causes
        assert await _remote_up(d) == [0, 0]
        assert await d.migrations() == {}

        # A new router: the frontends' probes find it, routing goes back to remote.
        await d.start_router()
        deadline = time.monotonic() + 10
        while await _remote_up(d) != [1, 1]:
            assert time.monotonic() < deadline, "frontends did not go back to the new router"
            await asyncio.sleep(0.1)
        assert all("router_bypass_off" in fe.log_text() for fe in d.frontends)
        again = Load(d.urls, requests=16, concurrency=8, max_tokens=60, tag="remote-again")
        (await check(await again.run())).assert_perfect(expected=16)
        assert await d.metric_sum("dynrt_frontend_router_bypass_total") == bypassed  # none bypassed
        assert await _router_decisions(d) == 16  # the new router decided every one
        answer = await get_json(d.session, d.router.health_url)  # type: ignore[union-attr]
        assert answer is not None and answer[0] == 200
        await d.assert_kv_idle(timeout=3)


@pytest.mark.slow
async def test_controller_sigkill_serving_continues_and_new_controller_adopts(tmp_path: Path) -> None:
    """The controller dies: serving continues; a new controller recovers its state from
    etcd and adopts the live workers instead of relaunching them (same pids)."""
    spec = tmp_path / "deployment.yaml"
    spec.write_text("models:\n  - name: mock-model\n    engine: mock\n    replicas: 2\n    drain_timeout: 1\n"
                    "    args: {speedup: 1, load-interval: 0.05}\n")
    async with Deployment(tmp_path, workers=0, frontends=1, controller_spec=spec, controller_replicas=2) as d:
        def replica_pids() -> list[int]:
            return sorted(d.namespace_processes_of("worker"))

        before = replica_pids()
        assert len(before) == 2
        load = Load(d.urls, requests=400, concurrency=6, max_tokens=100, tag="controller")
        load.start()
        await load.wait_finished(6)
        first = d.controller
        assert first is not None
        d.send(first, signal.SIGKILL)
        await first.wait(5)
        done = len(load.finished())
        await load.wait_finished(done + 12)  # serving continues without a controller
        second = await d.start_controller()
        await load.wait_finished(len(load.finished()) + 12)
        load.stop_issuing()
        report = await check(await load.task)  # type: ignore[misc]
        report.assert_perfect()
        assert await d.migrations() == {}
        assert replica_pids() == before  # adopted, not relaunched
        assert second.log_text().count("event=replica_adopted") == 2
        await d.wait_instances(2, timeout=5)
        await d.assert_kv_idle(timeout=3)
