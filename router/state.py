"""The router's view of the pool: ``RouterState`` — instances, their latest load
reports, the assignments those reports do not reflect yet, instances marked down or
suspect, and the KV index — and the ``Candidate`` instances a request may go to, with
their projected load (``cost.InstanceLoad``).

Suspect instances: a worker reports its load at least every heartbeat
(``LoadReport.heartbeat``; longer while it is idle) from its event loop, and at once
when it receives a request. One whose reports stop for ``suspect_after`` seconds (at
least ``SUSPECT_HEARTBEATS`` heartbeats), or that sent no report for ``suspect_after``
after a request this router assigned it, is probably hung (SIGSTOP, a partition): it
gets no new requests until its next report arrives. Two
guards against false suspicion: an instance is never suspect before its first report
(nor one whose reports carry no heartbeat); and when this router's own event loop
stalls, or NATS is down, every instance goes quiet at once — so an instance is suspect
only while another has been heard from since (``OBSERVER_LAG_HEARTBEATS`` of its
heartbeats after its last report), and after a silence of the whole pool its silence
counts from the first report heard again (the reports queued behind it are processed
one at a time, not all in the same instant).

Pure logic with no I/O: the NATS/etcd wiring (``dynrt.router.service``) feeds it, and
``dynrt.router.policies.Router`` decides on it. Times come from an injectable clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

from dynrt.router.cost import BusyThresholds, InstanceLoad, PendingAssignments
from dynrt.router.kv_index import KvIndex
from dynrt.runtime.protocol import CachedBlocks, InstanceRecord, KvEventBatch, LoadReport

# An instance is suspect after at least this many of its heartbeats without a report...
SUSPECT_HEARTBEATS = 3.0
# ...and only while another instance was heard from at least this many of its heartbeats
# after its last report (a router whose own loop stalled sees every instance go quiet);
# no report from anyone for this many heartbeats is a silence of the whole pool.
OBSERVER_LAG_HEARTBEATS = 2.0


class Candidate:
    """An instance eligible for a request, with its projected load."""

    __slots__ = ("record", "load")

    def __init__(self, record: InstanceRecord, load: InstanceLoad) -> None:
        self.record = record
        self.load = load


class RouterState:
    """What one router knows about the pool. Feed it from discovery and NATS; not
    thread-safe (one event loop). Times come from ``clock`` (monotonic seconds by
    default; injectable for tests)."""

    def __init__(
        self,
        *,
        thresholds: BusyThresholds | None = None,
        sender_id: str | None = None,
        ack_timeout: float = 5.0,
        absorb_delay: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        index: KvIndex | None = None,
        suspect_after: float = 0.3,
    ) -> None:
        """``sender_id``: who this router's requests come from in the workers' eyes —
        the frontend's id for a frontend's own router, the standalone router's id
        (``GenerateRequest.router_id``) for it. A load report whose ``received`` count
        for ``sender_id`` is ``n`` covers this router's first ``n`` assignments to that
        instance, which stop counting as pending (``cost.PendingAssignments``); one not
        covered by a report received ``ack_timeout`` seconds after it was made is taken
        as lost and dropped.

        ``absorb_delay``: the fallback when acknowledgements are not available (no
        ``sender_id``, or a worker whose reports carry no counts): a report received at
        local time ``t`` is taken to reflect the assignments made up to
        ``t − absorb_delay``. Too short lets a burst slip through between reports (the
        request and the report that reflects it take longer than that under load); too
        long double-counts (sheds early).

        ``suspect_after``: seconds without a load report before an instance is suspect
        (module docstring); 0 or below: never."""
        self.thresholds = thresholds or BusyThresholds()
        self.index = index or KvIndex()
        self.sender_id = sender_id
        self.ack_timeout = ack_timeout
        self.absorb_delay = absorb_delay
        self.clock = clock
        self._records: dict[str, InstanceRecord] = {}
        self._by_model: dict[str, dict[str, InstanceRecord]] = {}
        self._loads: dict[str, LoadReport] = {}
        self._pending: dict[str, PendingAssignments] = {}
        self._down_until: dict[str, float] = {}
        self.suspect_after = suspect_after
        # Local clock time of each instance's latest report, its heartbeat, and the
        # latest report from any instance.
        self._heard_at: dict[str, float] = {}
        self._heartbeat: dict[str, float] = {}
        # When each instance's silence would reach its threshold (``might_be_suspect``).
        self._quiet_at: dict[str, float] = {}
        self._heard_any_at = float("-inf")
        self._pool_heard_again_at = float("-inf")  # the first report after a silence of the whole pool
        # ``InstanceLoad.project`` of each instance, computed when first asked for and
        # dropped when its record, report or pending assignments change: admission and
        # the choice that follows it read one computation.
        self._projected: dict[str, InstanceLoad] = {}

    # -- instances -----------------------------------------------------------

    def add_instance(self, record: InstanceRecord) -> bool:
        """Add or refresh an instance (clears a ``mark_down``). Returns True when its KV
        entries are unknown — a new instance, or one whose record changed (a restarted
        worker reusing its id) — and the caller should ask it for ``dump_cached_blocks``
        and pass the answer to ``on_resync``."""
        iid = record.instance_id
        self._down_until.pop(iid, None)
        old = self._records.get(iid)
        if old == record:
            return False
        if old is not None:
            self._forget(old)
        self._projected.pop(iid, None)
        self._records[iid] = record
        self._by_model.setdefault(record.model, {})[iid] = record
        self.index.track(iid)
        return True

    def remove_instance(self, instance_id: str) -> None:
        """Drop an instance with its load, pending assignments and KV entries."""
        record = self._records.get(instance_id)
        if record is not None:
            self._forget(record)
        self._down_until.pop(instance_id, None)

    def _forget(self, record: InstanceRecord) -> None:
        iid = record.instance_id
        del self._records[iid]
        models = self._by_model[record.model]
        del models[iid]
        if not models:
            del self._by_model[record.model]
        self._loads.pop(iid, None)
        self._pending.pop(iid, None)
        self._projected.pop(iid, None)
        self._heard_at.pop(iid, None)
        self._heartbeat.pop(iid, None)
        self._quiet_at.pop(iid, None)
        self.index.remove_instance(iid)

    def instances(self, model: str) -> list[InstanceRecord]:
        """Live instances of a model (including ones marked down or suspect)."""
        return list(self._by_model.get(model, {}).values())

    def mark_down(self, instance_id: str, seconds: float) -> None:
        """Exclude an instance from choices for ``seconds`` (e.g. after NATS
        no-responders) or until it is added again."""
        self._down_until[instance_id] = self.clock() + seconds

    def is_down(self, instance_id: str, now: float | None = None) -> bool:
        until = self._down_until.get(instance_id)
        if until is None:
            return False
        if (self.clock() if now is None else now) < until:
            return True
        del self._down_until[instance_id]
        return False

    def down_instances(self) -> list[str]:
        """Instances marked down right now."""
        if not self._down_until:
            return []
        now = self.clock()
        return [iid for iid in list(self._down_until) if self.is_down(iid, now)]

    def is_suspect(self, instance_id: str, now: float | None = None) -> bool:
        """True while the instance's load reports have stopped (module docstring)."""
        if self.suspect_after <= 0:
            return False
        heard = self._heard_at.get(instance_id)
        heartbeat = self._heartbeat.get(instance_id, 0.0)
        if heard is None or heartbeat <= 0:
            return False  # no report yet (still within its grace), or no heartbeat promised
        now = self.clock() if now is None else now
        silent = now - max(heard, self._pool_heard_again_at)
        if (silent > max(self.suspect_after, SUSPECT_HEARTBEATS * heartbeat)
                and self._heard_any_at - heard > OBSERVER_LAG_HEARTBEATS * heartbeat):
            return True
        # A worker reports within its load interval of receiving a request (its count
        # changed), idle heartbeat or not: silence since a request this router sent it,
        # for suspect_after while others were heard since, is a hung worker.
        pending = self._pending.get(instance_id)
        sent_at = pending.oldest_unacknowledged_at if pending is not None else None
        return (sent_at is not None and heard < sent_at and now - max(sent_at, self._pool_heard_again_at)
                > self.suspect_after and self._heard_any_at > sent_at)

    def might_be_suspect(self, instance_id: str, now: float) -> bool:
        """False if the instance surely is not suspect (the cheap test ``candidates`` and
        ``suspects`` run on every instance; ``is_suspect`` decides the rest): it was heard
        within its silence threshold and has no request this router sent it waiting for a
        report."""
        quiet_at = self._quiet_at.get(instance_id)
        if quiet_at is None:
            return False
        if now > quiet_at:
            return True
        pending = self._pending.get(instance_id)
        return pending is not None and pending.unacknowledged > 0

    def suspects(self) -> list[str]:
        """Instances suspect right now."""
        if self.suspect_after <= 0:
            return []
        now = self.clock()
        return [iid for iid in self._quiet_at if self.might_be_suspect(iid, now) and self.is_suspect(iid, now)]

    def silent_for(self, instance_id: str) -> float | None:
        """Seconds since the instance's latest report (None: none yet)."""
        heard = self._heard_at.get(instance_id)
        return None if heard is None else self.clock() - heard

    # -- inputs from workers -------------------------------------------------

    def on_load(self, report: LoadReport) -> None:
        """Take a load report; it absorbs the assignments it acknowledges (``__init__``).
        Reports of unknown instances are ignored (the next one after discovery counts)."""
        iid = report.instance_id
        if iid not in self._records:
            return
        now = self.clock()
        if now - self._heard_any_at > OBSERVER_LAG_HEARTBEATS * (report.heartbeat or self.suspect_after):
            self._pool_heard_again_at = now
        self._heard_at[iid] = self._heard_any_at = now
        self._heartbeat[iid] = report.heartbeat
        if report.heartbeat > 0:
            self._quiet_at[iid] = now + max(self.suspect_after, SUSPECT_HEARTBEATS * report.heartbeat)
        else:
            self._quiet_at.pop(iid, None)
        self._loads[iid] = report
        self._projected.pop(iid, None)
        pending = self._pending.get(iid)
        if pending is None:
            return
        if self.sender_id is not None and report.received is not None:
            pending.ack(report.received.get(self.sender_id, 0))
            if pending.unacknowledged:
                pending.expire(now - self.ack_timeout)
        else:
            pending.absorb(now - self.absorb_delay)

    def on_kv_events(self, batch: KvEventBatch) -> bool:
        """Apply a worker's KV events. True when the caller should now ask the worker for
        a dump (a gap in its event ids); while that dump is awaited, later batches are
        buffered and return False. ``index.stale_instances()`` lists instances still
        awaiting one, for retrying failed dump requests. Unknown instances are ignored."""
        if batch.instance_id not in self._records:
            return False
        return self.index.apply(batch.instance_id, batch.events).request_dump

    def on_resync(self, dump: CachedBlocks) -> bool:
        """Replace an instance's KV entries with its dump. True if events buffered since
        do not follow on from the dump, so another dump is needed."""
        if dump.instance_id not in self._records:
            return False
        return self.index.resync(dump).request_dump

    # -- assignments ---------------------------------------------------------

    def on_assigned(self, instance_id: str, request_id: str, prompt_blocks: int, overlap_blocks: int = 0) -> None:
        """A request was sent to the instance, which holds ``overlap_blocks`` of its
        ``prompt_blocks``: count its new blocks (``cost.PendingAssignments``) as load
        until a load report acknowledges it or it completes. Call in the order the
        requests are sent (assignments are numbered)."""
        if instance_id not in self._records:
            return
        pending = self._pending.get(instance_id)
        if pending is None:
            pending = self._pending[instance_id] = PendingAssignments()
        pending.add(request_id, self.clock(), prompt_blocks, overlap_blocks)
        self._projected.pop(instance_id, None)

    def on_completed(self, instance_id: str, request_id: str) -> None:
        """A request ended (any way); stop counting it if still pending."""
        pending = self._pending.get(instance_id)
        if pending is not None:
            pending.complete(request_id)
            self._projected.pop(instance_id, None)

    def expire_assignments(self, max_age: float) -> None:
        """Stop counting assignments older than ``max_age`` seconds that no load report
        acknowledged (an instance whose load reports stopped)."""
        cutoff = self.clock() - max_age
        for iid, pending in self._pending.items():
            pending.expire(cutoff)
            self._projected.pop(iid, None)

    # -- view for policies ---------------------------------------------------

    def candidates(self, model: str, exclude: Collection[str] = ()) -> list[Candidate]:
        """Instances of the model that are not excluded, down or suspect, with projected
        loads."""
        now = self.clock()
        down = self._down_until
        check = self.suspect_after > 0
        return [
            Candidate(rec, self._load(iid, rec))
            for iid, rec in self._by_model.get(model, {}).items()
            if iid not in exclude and not (down and self.is_down(iid, now))
            and not (check and self.might_be_suspect(iid, now) and self.is_suspect(iid, now))
        ]

    def _load(self, instance_id: str, record: InstanceRecord) -> InstanceLoad:
        load = self._projected.get(instance_id)
        if load is None:
            load = self._projected[instance_id] = InstanceLoad.project(
                record, self._loads.get(instance_id), self._pending.get(instance_id))
        return load
