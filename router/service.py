"""The router's live view of the pool: ``RouterState`` fed from etcd (instance records)
and NATS (load reports, KV events, cache dumps), plus ``Router`` decisions on it.

Runs inside every frontend (local routing) and inside the standalone ``dynrt router``.
A new instance, or a gap in an instance's KV event ids, triggers a resync from that
instance's ``DumpCachedBlocks``; dumps that fail are retried until they succeed or the
instance leaves. Every ``SUSPECT_CHECK_INTERVAL`` it looks for instances whose load
reports stopped (``RouterState.is_suspect``; they are out of routing from that moment
anyway), logs each change, and tells the ``on_suspect`` listeners (the frontend pings
their streams).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Sequence

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from dynrt.router.cost import BusyThresholds
from dynrt.router.policies import Busy, Outcome, Router
from dynrt.router.state import RouterState
from dynrt.runtime import metrics
from dynrt.runtime.config import RoutingConfig
from dynrt.runtime.discovery import EtcdClient, PrefixWatcher
from dynrt.runtime.log import get_logger
from dynrt.runtime.protocol import (
    CachedBlocks,
    DumpCachedBlocks,
    InstanceRecord,
    instance_record_decoder,
    instances_prefix,
    kv_event_batch_decoder,
    kv_events_subject_wildcard,
    load_report_decoder,
    load_subject_wildcard,
)
from dynrt.runtime.transport import NatsTransport, TransportError

log = get_logger("router")

REJECTIONS = metrics.counter("dynrt_router_rejections_total", "requests refused by the router, by reason", ("reason",))
RESYNCS = metrics.counter("dynrt_router_resyncs_total", "KV index resyncs from a worker's cache dump")
SUSPECTED = metrics.counter("dynrt_router_instances_suspected_total",
                            "times an instance became suspect: its load reports stopped for --suspect-after")
SUSPECT_NOW = metrics.gauge("dynrt_router_suspect_instances", "instances suspect now (reports stopped)")

# How often to look for instances that became suspect or came back. Routing itself
# reads suspicion at decision time; this only bounds how late listeners hear of it.
SUSPECT_CHECK_INTERVAL = 0.02

InstanceListener = Callable[[InstanceRecord], None]


class RoutingService:
    def __init__(self, etcd: EtcdClient, transport: NatsTransport, namespace: str, *, policy: str = "kv",
                 config: RoutingConfig | None = None, sender_id: str | None = None) -> None:
        """``config``: thresholds (changeable at runtime through ``state.thresholds``),
        prefill weight and temperature. ``sender_id``: how workers count this router's
        requests (``RouterState``)."""
        config = config or RoutingConfig()
        self.etcd = etcd
        self.transport = transport
        self.namespace = namespace
        thresholds = BusyThresholds.from_flags(
            config.busy_kv_threshold, config.busy_queue_threshold, config.busy_prefill_threshold, config.ttft_slo)
        self.state = RouterState(thresholds=thresholds, sender_id=sender_id, suspect_after=config.suspect_after)
        self.router = Router(self.state, policy, prefill_weight=config.prefill_weight,
                             temperature=config.router_temperature,
                             on_reject=lambda reason: REJECTIONS.labels(reason).inc())
        self.records: dict[str, InstanceRecord] = {}
        self.draining: dict[str, InstanceRecord] = {}
        self._instance_by_key: dict[str, str] = {}
        self.on_removed: list[InstanceListener] = []
        self.on_added: list[InstanceListener] = []
        self.on_suspect: list[InstanceListener] = []
        self.suspected: set[str] = set()
        self._watcher = PrefixWatcher(etcd, instances_prefix(namespace), self._on_put, self._on_delete)
        self._subs: list[Subscription] = []
        self._resync_wanted: set[str] = set()
        self._resync_wake = asyncio.Event()
        self._resync_task: asyncio.Task[None] | None = None
        self._suspect_task: asyncio.Task[None] | None = None

    async def start(self, wait: float | None = 30.0) -> None:
        ns = self.namespace
        self._subs.append(await self.transport.subscribe(load_subject_wildcard(ns), self._on_load))
        self._subs.append(await self.transport.subscribe(kv_events_subject_wildcard(ns), self._on_kv_events))
        self._resync_task = asyncio.create_task(self._resync_loop(), name="router-resync")
        self._suspect_task = asyncio.create_task(self._suspect_loop(), name="router-suspects")
        await self._watcher.start(wait=wait)

    async def close(self) -> None:
        await self._watcher.close()
        for task in (self._resync_task, self._suspect_task):
            if task is not None:
                task.cancel()
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:  # connection already closed
                pass

    # -- discovery --------------------------------------------------------------
    def _on_put(self, key: str, value: bytes) -> None:
        try:
            record = instance_record_decoder.decode(value)
        except Exception:
            log.warning("bad_instance_record", key=key)
            return
        if not record.routable:  # a worker still loading its engine: nothing to route to yet
            return
        self._instance_by_key[key] = record.instance_id
        if record.draining:
            # No new requests for it; its open streams finish there (see InstanceRecord).
            if self.records.pop(record.instance_id, None) is not None:
                self.state.remove_instance(record.instance_id)
                self._resync_wanted.discard(record.instance_id)
                log.info("instance_draining", instance_id=record.instance_id)
            self.draining[record.instance_id] = record
            return
        is_new = record.instance_id not in self.records
        self.records[record.instance_id] = record
        if self.state.add_instance(record):
            self._want_resync(record.instance_id)
        if is_new:
            log.info("instance_added", instance_id=record.instance_id, model=record.model, subject=record.subject)
            for listener in self.on_added:
                listener(record)

    def _on_delete(self, key: str) -> None:
        instance_id = self._instance_by_key.pop(key, None)
        if instance_id is None:
            return
        record = self.records.pop(instance_id, None) or self.draining.pop(instance_id, None)
        self.state.remove_instance(instance_id)
        self._resync_wanted.discard(instance_id)
        log.info("instance_removed", instance_id=instance_id)
        if record is not None:
            for listener in self.on_removed:
                listener(record)

    # -- router inputs ----------------------------------------------------------
    async def _on_load(self, msg: Msg) -> None:
        try:
            self.state.on_load(load_report_decoder.decode(msg.data))
        except Exception:
            log.warning("bad_load_report", subject=msg.subject)

    async def _on_kv_events(self, msg: Msg) -> None:
        try:
            batch = kv_event_batch_decoder.decode(msg.data)
        except Exception:
            log.warning("bad_kv_events", subject=msg.subject)
            return
        if self.state.on_kv_events(batch):
            self._want_resync(batch.instance_id)

    def _want_resync(self, instance_id: str) -> None:
        self._resync_wanted.add(instance_id)
        self._resync_wake.set()

    async def _resync_loop(self) -> None:
        while True:
            await self._resync_wake.wait()
            self._resync_wake.clear()
            for instance_id in list(self._resync_wanted):
                record = self.records.get(instance_id)
                if record is None:
                    self._resync_wanted.discard(instance_id)
                    continue
                try:
                    dump = await self.transport.request_control(record.control_subject, DumpCachedBlocks(), timeout=2.0)
                except TransportError as exc:
                    log.debug("resync_failed", instance_id=instance_id, error=type(exc).__name__)
                    continue
                if not isinstance(dump, CachedBlocks):
                    continue
                RESYNCS.inc()
                if not self.state.on_resync(dump):
                    self._resync_wanted.discard(instance_id)
                log.debug("resynced", instance_id=instance_id, blocks=len(dump.block_hashes))
            if self._resync_wanted:
                await asyncio.sleep(0.5)  # retry the ones that failed
                self._resync_wake.set()

    # -- hung instances ---------------------------------------------------------
    async def _suspect_loop(self) -> None:
        while True:
            await asyncio.sleep(SUSPECT_CHECK_INTERVAL)
            self.check_suspects()

    def check_suspects(self) -> None:
        """Note instances that became suspect (log, count, tell ``on_suspect``) or whose
        reports resumed (log)."""
        now = set(self.state.suspects())
        if now == self.suspected:
            return
        for instance_id in self.suspected - now:
            log.info("instance_resumed", instance_id=instance_id)
        became = now - self.suspected
        self.suspected = now
        SUSPECT_NOW.set(len(now))
        for instance_id in became:
            record = self.records.get(instance_id)
            if record is None:
                continue
            SUSPECTED.inc()
            silent = self.state.silent_for(instance_id) or 0.0
            log.warning("instance_suspect", instance_id=instance_id, silent_ms=round(silent * 1000))
            for listener in self.on_suspect:
                listener(record)

    def is_suspect(self, instance_id: str) -> bool:
        return self.state.is_suspect(instance_id)

    # -- decisions --------------------------------------------------------------
    def route(self, model: str, token_ids: Sequence[int], request_id: str, exclude: Collection[str] = (),
              continuing: bool = False) -> Outcome:
        return self.router.route(model, token_ids, request_id, exclude, continuing)

    async def route_async(self, model: str, token_ids: Sequence[int], request_id: str,
                          exclude: Collection[str] = (), continuing: bool = False) -> Outcome:
        """``route`` behind the awaitable interface the frontend calls, so a service that
        asks over the network (``dynrt.router.remote.RemoteRoutingService``) fits in."""
        return self.router.route(model, token_ids, request_id, exclude, continuing)

    def admission(self, model: str) -> Busy | None:
        """``Busy`` if every instance of ``model`` is busy (``Router.admission``)."""
        return self.router.admission(model)

    def complete(self, instance_id: str, request_id: str) -> None:
        self.state.on_completed(instance_id, request_id)

    async def wait_synced(self, timeout: float) -> bool:
        """Wait until every known instance's KV entries came from a dump (or its events
        since); False if some are still awaiting one after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._resync_wanted or self.state.index.stale_instances():
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    def mark_down(self, instance_id: str, seconds: float) -> None:
        self.state.mark_down(instance_id, seconds)

    def models(self) -> dict[str, list[InstanceRecord]]:
        by_model: dict[str, list[InstanceRecord]] = {}
        for record in self.records.values():
            by_model.setdefault(record.model, []).append(record)
        return by_model
