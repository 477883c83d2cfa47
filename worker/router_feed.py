"""What routers hear from a worker: load reports (with a heartbeat, so a hung worker is
noticed) and KV cache events, both published on NATS from the worker's event loop; and
the per-sender count of generate requests received that the reports carry.

A report proves the loop that serves streams and answers pings is running, so it is sent
from that loop (never a thread): every ``load_interval`` while the load changes, and at
least every ``load_heartbeat`` when it does not (routers take an instance whose reports
stop for ``--suspect-after`` as hung) — or every ``load_heartbeat_idle`` while the engine
has nothing running or waiting. Each report says which heartbeat it keeps
(``LoadReport.heartbeat``), so routers wait for three of those before suspecting; an idle
worker that gets a request reports at once (its received count changed), so a hung idle
one is suspect as soon as a router's request to it goes unacknowledged for
``--suspect-after`` (``RouterState.is_suspect``). Idle heartbeats are what most of a large
pool sends: with 1,000 workers, 10 a second each reach every frontend and router
(``benchmarks/scale.py``).
"""

from __future__ import annotations

import asyncio
import time

from dynrt.runtime import metrics
from dynrt.runtime.config import WorkerConfig
from dynrt.runtime.log import get_logger
from dynrt.runtime.protocol import GenerateRequest, KvEventBatch, encode, kv_events_subject, load_subject
from dynrt.runtime.transport import NatsTransport
from dynrt.worker.engine import Engine

log = get_logger("worker")

KV_USAGE = metrics.gauge("dynrt_worker_kv_usage_ratio", "fraction of KV blocks in use")
RUNNING = metrics.gauge("dynrt_worker_running_requests",
                        "requests in the engine's running batch, as in the last load report (vLLM: num_running_reqs)")
WAITING = metrics.gauge("dynrt_worker_waiting_requests",
                        "requests queued in the engine for a place in the batch, as in the last load report")


class RouterFeed:
    """Load reports and KV events of one worker instance."""

    def __init__(self, config: WorkerConfig, engine: Engine, instance_id: str, model_name: str) -> None:
        self.config = config
        self.engine = engine
        self.instance_id = instance_id
        self.model_name = model_name
        # Generate requests received per sender (frontend id, standalone router id),
        # published in load reports so routers can tell which assignments they reflect.
        self.received: dict[str, int] = {}
        self.received_total = 0

    def count_received(self, request: GenerateRequest) -> None:
        """Count a generate request under its frontend and (if any) its router. Called
        before the request's first await, so a report showing the count reflects it."""
        received = self.received
        received[request.frontend_id] = received.get(request.frontend_id, 0) + 1
        if request.router_id:
            received[request.router_id] = received.get(request.router_id, 0) + 1
        self.received_total += 1

    def forget_sender(self, sender_id: str) -> None:
        """A frontend is gone (and its router with it): stop reporting its count."""
        self.received.pop(sender_id, None)

    async def publish_load(self, transport: NatsTransport) -> None:
        """A report every ``load_interval`` while the load changes, and at least every
        ``load_heartbeat`` (idle too). Runs until cancelled."""
        subject = load_subject(self.config.namespace, self.model_name)
        busy_heartbeat = self.config.load_heartbeat
        idle_heartbeat = max(self.config.load_heartbeat_idle, busy_heartbeat)
        tick = min(self.config.load_interval, busy_heartbeat)
        last: tuple[int, int, int, int, int] | None = None
        last_sent = 0.0
        while True:
            await asyncio.sleep(tick)
            report = self.engine.load()
            report.instance_id = self.instance_id
            report.model = self.model_name
            report.timestamp = time.time()
            report.received = dict(self.received)
            heartbeat = idle_heartbeat if report.running == 0 and report.waiting == 0 else busy_heartbeat
            report.heartbeat = heartbeat
            KV_USAGE.set(report.kv_usage)
            RUNNING.set(report.running)
            WAITING.set(report.waiting)
            # (The heartbeat follows running and waiting: a change of it changes the shape.)
            shape = (report.kv_blocks_used, report.running, report.waiting, report.active_prefill_tokens,
                     self.received_total)
            # Half a tick of slack: a sleep that overshoots must not skip a heartbeat.
            if shape != last or time.monotonic() - last_sent >= heartbeat - tick / 2:
                try:
                    await transport.publish(subject, encode(report))
                    last, last_sent = shape, time.monotonic()
                except Exception as exc:  # NATS reconnecting: the next report catches up
                    log.debug("load_publish_failed", error=str(exc))

    async def publish_kv_events(self, transport: NatsTransport) -> None:
        """Every batch of KV cache events the engine yields. Runs until cancelled."""
        subject = kv_events_subject(self.config.namespace, self.model_name)
        async for events in self.engine.kv_events():
            if not events:
                continue
            batch = KvEventBatch(instance_id=self.instance_id, model=self.model_name, events=events)
            try:
                await transport.publish(subject, encode(batch))
            except Exception as exc:  # routers see the event-id gap and resync
                log.debug("kv_events_publish_failed", error=str(exc))
