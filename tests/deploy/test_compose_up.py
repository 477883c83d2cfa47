"""``docker compose --profile mock up --wait`` for real, then faults in its containers.

The images are built here from the project's own Dockerfile, on a Debian base made with
debootstrap (no registry is reachable on these machines), with stand-ins for etcd, NATS,
HAProxy and Prometheus (deploy/standins/, selected through the compose file's ``*_IMAGE``
variables); Grafana and the NATS exporter belong to the ``observability`` profile and do
not run. The stack is started exactly as deploy/README.md says, and each test sends a
bounded load of streamed requests through the load balancer while one fault happens:

    worker container killed        docker kill (a manual stop: no restart)
    worker process crashed         SIGKILL of its main process (the restart policy applies)
    etcd leader killed             the member that leads, docker kill
    NATS restarted                 docker restart
    worker paused 10 s             docker pause / unpause
    worker partitioned 10 s        docker network disconnect / connect (same aliases)
    frontend killed                docker kill frontend1 under 20 resuming clients: each
                                   resumes on the other frontend (Last-Event-ID)

Every request must complete with the answer of the failure-free run (the mock engine's
output is a pure function of prompt and seed: ``harness.reference.references``),
and afterwards every worker must hold no KV and no request. A killed frontend's own open
streams break; their clients (resumable streams) resume on the other frontend and get
the rest of the same answer.

Skips where no Docker engine answers; .ci/run starts one (DYNRT_REQUIRE_DOCKER=1 then
turns the skip into a failure). The fault table is printed at the end of the run
(tests/deploy/conftest.py); DYNRT_COMPOSE_REPORT=path also writes it as JSON.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest

from harness.load import Load, Stream
from harness.reference import Report, check
from harness.stats import percentile
from tests.deploy.compose_stack import ComposeStack, engine_problem

PROBLEM = engine_problem()
if PROBLEM and os.environ.get("DYNRT_REQUIRE_DOCKER") == "1":
    raise RuntimeError(f"DYNRT_REQUIRE_DOCKER=1 but {PROBLEM}")
pytestmark = [pytest.mark.skipif(PROBLEM is not None, reason=f"no Docker engine: {PROBLEM}"),
              pytest.mark.docker, pytest.mark.timeout(1800)]

PROJECT = "dynrt-citest"
# Mock workers at real speed (the modelled decode step): a 1000-token stream lasts ~7 s, so
# a fault lands mid-answer even when `docker` calls take a second on a loaded machine.
STACK_ENV = {"MOCK_SPEEDUP": "1", "MOCK_WORKERS": "2"}


@dataclass
class FaultRow:
    fault: str
    sent: int
    ok: int
    failed: int
    identical: int
    migrations: dict[str, int]
    max_gap_s: float
    gap_p50_s: float
    notes: dict[str, Any] = field(default_factory=dict)


ROWS: list[FaultRow] = []


def fault_table(rows: list[FaultRow]) -> list[str]:
    lines = [f"{'fault':48} {'ok/sent':>8} {'identical':>9} {'migrations':24} {'max gap s':>9}  notes"]
    for r in rows:
        causes = ",".join(f"{k}={v}" for k, v in sorted(r.migrations.items())) or "-"
        notes = {k: v for k, v in r.notes.items() if k not in ("images", "aliases")}
        lines.append(f"{r.fault:48} {f'{r.ok}/{r.sent}':>8} {r.identical:>9} {causes:24} {r.max_gap_s:>9}  {notes}")
    return lines


@pytest.fixture(scope="module")
def stack() -> Iterator[ComposeStack]:
    stack = ComposeStack(PROJECT, ["mock"], STACK_ENV)
    stack.down()  # what a killed earlier run left
    started = time.monotonic()
    images = stack.build_images()
    build_s = time.monotonic() - started
    stack.make_secrets()
    try:
        up_s = stack.up(timeout=300)
        ROWS.append(FaultRow("bring-up", 0, 0, 0, 0, {}, math.nan, math.nan,
                             {"build_s": round(build_s, 1), "up_wait_s": round(up_s, 1), "images": images}))
        yield stack
    except BaseException:
        print(stack.logs(80))
        raise
    finally:
        report = os.environ.get("DYNRT_COMPOSE_REPORT")
        if report:
            Path(report).write_text(json.dumps([asdict(r) for r in ROWS], indent=2) + "\n")
        stack.down()


def auth(stack: ComposeStack) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.api_key}"}


async def under_load(stack: ComposeStack, name: str, fault: Callable[[Load], Awaitable[dict[str, Any]]], *,
                     requests: int = 24, concurrency: int = 8, max_tokens: int = 1000,
                     resumable: bool = False) -> tuple[Report, FaultRow, list[Stream]]:
    """Bounded load through the load balancer; ``fault(load)`` runs once every slot is
    mid-answer. Returns the checked report and the table row."""
    await asyncio.to_thread(stack.up)  # whatever an earlier fault stopped is back
    before = await asyncio.to_thread(stack.metric_by, "dynrt_frontend_migrations_total", "cause")
    load = Load(stack.url, requests=requests, concurrency=concurrency, max_tokens=max_tokens, tag=name,
                headers=auth(stack), request_timeout=180, resumable=resumable)
    task = load.start()
    try:
        await load.wait_streaming(concurrency, min_chunks=10, timeout=60)
        notes = await fault(load)
        streams = await asyncio.wait_for(task, 300)
    finally:
        load.stop_issuing()
        if not task.done():
            task.cancel()
    report = await check(streams)
    after = await asyncio.to_thread(stack.metric_by, "dynrt_frontend_migrations_total", "cause")
    # Counted by the frontends that ran throughout (a killed one's counters are gone).
    migrations: dict[str, int] = {}
    for frontend, counts in after.items():
        for cause, value in counts.items():
            if value - before.get(frontend, {}).get(cause, 0):
                migrations[cause] = migrations.get(cause, 0) + value - before.get(frontend, {}).get(cause, 0)
    gaps = [s.max_gap for s in streams if s.ok]
    row = FaultRow(name, report.sent, report.ok, report.failed, report.identical, migrations,
                   round(report.max_gap, 3), round(percentile(gaps, 50), 3), notes)
    ROWS.append(row)
    return report, row, streams


def assert_streams_moved(report: Report, row: FaultRow, causes: set[str]) -> None:
    """A worker fault's exact outcome: every request completed with the failure-free
    answer, at least one stream moved (how many: in the table), for one of ``causes``.
    A pause or cut as long as the lease TTL (10 s) may also expire the worker's lease:
    a stream the frontend had not yet seen go silent then moves for that reason."""
    report.assert_perfect()
    assert sum(row.migrations.values()) >= 1, row
    assert set(row.migrations) <= causes, row


async def assert_idle(stack: ComposeStack) -> float:
    return await asyncio.to_thread(stack.assert_idle, 20.0)


# ---------------------------------------------------------------------------------- tests
def test_stack_is_up_and_serves(stack: ComposeStack) -> None:
    """Every service healthy, none restarted; the API answers through the LB with the key
    only; the frontend image owns its Hugging Face cache volume."""
    containers = stack.containers()
    services = {c.service for c in containers}
    assert services == {"etcd1", "etcd2", "etcd3", "nats", "router", "frontend1", "frontend2", "lb",
                        "mock-worker", "controller-mock", "prometheus"}, services
    for c in containers:
        assert c.running and c.health == "healthy" and c.restart_count == 0, c
    assert len(stack.containers("mock-worker")) == 2
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{stack.url}/v1/models", headers=auth(stack))
    with urllib.request.urlopen(request, timeout=10) as response:
        assert [m["id"] for m in json.load(response)["data"]] == ["mock-model"]
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(f"{stack.url}/v1/models", timeout=10)
    assert denied.value.code == 401
    for fe in ("frontend1", "frontend2"):
        name = stack.containers(fe)[0].name
        stack.exec(name, "touch", "/home/dynrt/.cache/huggingface/.writable")


async def test_worker_container_killed(stack: ComposeStack) -> None:
    async def fault(load: Load) -> dict[str, Any]:
        worker, in_flight = await asyncio.to_thread(stack.busiest_worker)
        await asyncio.to_thread(stack.kill, worker.name)
        await asyncio.sleep(3)
        after = await asyncio.to_thread(stack.container, worker.name)
        # `docker kill` is a manual stop: the restart policy does not bring it back.
        assert not after.running and after.restart_count == worker.restart_count, after
        return {"container": worker.name, "streams_on_it": in_flight, "restarted_by_docker": after.running}

    report, row, _ = await under_load(stack, "worker container killed (docker kill)", fault)
    assert_streams_moved(report, row, causes={"killed", "no_responders", "lease_expired"})
    await assert_idle(stack)


async def test_worker_process_crash_is_restarted(stack: ComposeStack) -> None:
    async def fault(load: Load) -> dict[str, Any]:
        worker, in_flight = await asyncio.to_thread(stack.busiest_worker)
        crashed_at = time.monotonic()
        await asyncio.to_thread(stack.crash, worker.name)
        # The restart policy (unless-stopped) restarts a container whose process died.
        healthy_s = await asyncio.to_thread(
            stack.wait_container, worker.name,
            lambda c: c.running and c.restart_count == worker.restart_count + 1 and c.health == "healthy", 90,
            "restarted and healthy")
        return {"container": worker.name, "streams_on_it": in_flight,
                "restarted_healthy_after_s": round(time.monotonic() - crashed_at, 1), "wait_s": round(healthy_s, 1)}

    report, row, _ = await under_load(stack, "worker process crashed (SIGKILL of its pid 1)", fault,
                                      requests=32)
    assert_streams_moved(report, row, causes={"killed", "no_responders", "lease_expired"})
    await assert_idle(stack)


async def test_etcd_leader_killed(stack: ComposeStack) -> None:
    async def fault(load: Load) -> dict[str, Any]:
        leader = await asyncio.to_thread(stack.etcd_leader)
        await asyncio.to_thread(stack.kill, leader)
        elected_s = None
        start = time.monotonic()
        while time.monotonic() - start < 30:
            try:
                new_leader = await asyncio.to_thread(stack.etcd_leader)
            except (AssertionError, json.JSONDecodeError, KeyError, StopIteration):
                await asyncio.sleep(0.5)
                continue
            if new_leader != leader:
                elected_s = round(time.monotonic() - start, 2)
                break
        assert elected_s is not None, "no new etcd leader within 30 s"
        return {"killed": leader, "new_leader_after_s": elected_s}

    report, row, _ = await under_load(stack, "etcd leader killed", fault, requests=32)
    report.assert_perfect()
    assert row.migrations == {}, row  # serving does not touch etcd
    # New registrations and watches still work on the remaining quorum: a frontend's
    # view is read from etcd.
    assert len(await asyncio.to_thread(stack.instances)) == 3
    await assert_idle(stack)


async def test_nats_restarted(stack: ComposeStack) -> None:
    async def fault(load: Load) -> dict[str, Any]:
        nats = stack.containers("nats")[0].name
        start = time.monotonic()
        await asyncio.to_thread(stack.restart, nats)
        await asyncio.to_thread(stack.wait_container, nats, lambda c: c.running and c.health == "healthy", 60,
                                "healthy")
        return {"restart_healthy_s": round(time.monotonic() - start, 1)}

    report, row, _ = await under_load(stack, "NATS restarted (docker restart)", fault, requests=32)
    report.assert_perfect()
    assert sum(row.migrations.values()) >= 1, row
    assert set(row.migrations) <= {"nats_restart", "killed", "no_responders", "suspect", "stalled"}, row
    await assert_idle(stack)


async def test_worker_paused_10s(stack: ComposeStack) -> None:
    async def fault(load: Load) -> dict[str, Any]:
        worker, in_flight = await asyncio.to_thread(stack.busiest_worker)
        await asyncio.to_thread(stack.pause, worker.name)
        await asyncio.sleep(10)
        await asyncio.to_thread(stack.unpause, worker.name)
        return {"container": worker.name, "streams_on_it": in_flight}

    report, row, _ = await under_load(stack, "worker paused 10 s (docker pause)", fault, requests=40)
    assert_streams_moved(report, row, causes={"suspect", "stalled", "killed", "no_responders", "lease_expired"})
    await assert_idle(stack)


async def test_worker_partitioned_10s(stack: ComposeStack) -> None:
    async def fault(load: Load) -> dict[str, Any]:
        worker, in_flight = await asyncio.to_thread(stack.busiest_worker)
        aliases = await asyncio.to_thread(stack.disconnect, worker.name)
        await asyncio.sleep(10)
        await asyncio.to_thread(stack.reconnect, worker.name, aliases)
        return {"container": worker.name, "streams_on_it": in_flight, "aliases": aliases}

    report, row, _ = await under_load(stack, "worker partitioned 10 s (network disconnect)", fault, requests=40)
    assert_streams_moved(report, row, causes={"suspect", "stalled", "killed", "no_responders", "lease_expired"})
    # Back on the network, the worker serves again: registered (its lease may have
    # expired: then under a new one) and reachable by the frontends.
    container = row.notes["container"]
    deadline = time.monotonic() + 30
    while not any(stack.worker_container(i.get("host", "")) is not None
                  and stack.worker_container(i["host"]).name == container  # type: ignore[union-attr]
                  and (i.get("health") or {}).get("status") == "ready" for i in stack.instances()):
        assert time.monotonic() < deadline, f"{container} not registered and ready 30 s after reconnecting"
        await asyncio.sleep(1)
    await assert_idle(stack)


async def test_frontend_killed(stack: ComposeStack) -> None:
    """Kill the frontend holding half of 20 resumable streams: every client whose
    connection broke resumes through the load balancer on the other frontend, and all
    20 get the failure-free answer (before resumable streams: 5 of 20 cut)."""

    async def fault(load: Load) -> dict[str, Any]:
        frontend = stack.containers("frontend1")[0].name
        samples = await asyncio.to_thread(stack.frontend_metrics, frontend)
        open_streams = int(sum(v for (n, _), v in samples.items() if n == "dynrt_frontend_in_flight_requests"))
        await asyncio.to_thread(stack.kill, frontend)
        return {"container": frontend, "open_streams_at_kill": open_streams}

    report, row, streams = await under_load(stack, "frontend killed, 20 resuming clients", fault, requests=20,
                                            concurrency=20, resumable=True)
    resumed = [s for s in streams if s.resumes]
    row.notes["resumed"] = len(resumed)
    row.notes["resume_errors"] = sorted({e.split(":")[0] for s in resumed for e in s.resume_errors})
    # The gap a resumed client saw: the longest pause in its stream (it spans the kill).
    row.notes["resume_gap_p50_s"] = round(percentile([s.max_gap for s in resumed], 50), 3) if resumed else None
    report.assert_perfect()  # 20/20 complete, identical to the failure-free answers
    assert report.sent == 20
    assert 1 <= len(resumed) <= row.notes["open_streams_at_kill"], row
    await assert_idle(stack)  # nothing left on the workers
