"""Routing decisions: the router's view of the pool (``RouterState``), the policies that
pick an instance (``round-robin``, ``random``, ``least-loaded``, ``kv``), and the
``Router`` that puts them together with load shedding.

Pure logic with no I/O: the NATS/etcd wiring feeds ``RouterState`` (instances, load
reports, KV events, dumps, assignments, completions) and asks ``Router.choose``.

Admission rule (the same for every policy): an instance is a candidate when it serves
the model, is not excluded by the caller, and is not marked down; a candidate is *busy*
when its projected load (latest report + pending assignments, ``cost.InstanceLoad``)
breaks a threshold. Busy candidates are skipped; if all are busy the answer is
``Busy(retry_after)``. Pending assignments count toward busyness, so a burst between two
load reports is admitted up to exactly the capacity the thresholds leave, whatever order
or instance the policy picks — the same burst against the same state always gets the
same number admitted.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Collection, Sequence
from typing import ClassVar, Protocol

import msgspec

from dynrt.router.cost import (
    BusyThresholds,
    InstanceLoad,
    PendingAssignments,
    busy_reason,
    kv_cost,
    load_cost,
    retry_after,
)
from dynrt.router.kv_index import KvIndex
from dynrt.runtime.block_hash import block_hashes
from dynrt.runtime.protocol import CachedBlocks, InstanceRecord, KvEventBatch, LoadReport, RouteDecision

# ---------------------------------------------------------------------------
# Outcomes
# ---------------------------------------------------------------------------


class Choice(msgspec.Struct, frozen=True, kw_only=True):
    """Send the request to the instance of ``record``; it holds ``overlap_blocks`` of the
    prompt's ``prompt_blocks`` full blocks. ``cost`` is the policy's score (0 for non-KV
    ones)."""

    record: InstanceRecord
    overlap_blocks: int = 0
    prompt_blocks: int = 0
    cost: float = 0.0
    router_id: str = ""  # the standalone router that chose ("" = this process's router)

    @property
    def instance_id(self) -> str:
        return self.record.instance_id

    def to_decision(self) -> RouteDecision:
        return RouteDecision(instance_id=self.record.instance_id, overlap_blocks=self.overlap_blocks)


class Busy(msgspec.Struct, frozen=True, kw_only=True):
    """Every candidate is over a threshold: answer 503 with ``Retry-After: retry_after``.
    ``reason`` is ``kv_usage``, ``queue_depth`` or ``mixed`` (candidates differ)."""

    retry_after: int
    reason: str

    def to_decision(self) -> RouteDecision:
        return RouteDecision(busy=True, retry_after=float(self.retry_after), reason=self.reason)


class NoInstance(msgspec.Struct, frozen=True, kw_only=True):
    """No live instance serves the model (``no_instance``), or all are excluded or
    marked down (``all_excluded``), or the standalone router chose one this process
    does not know (``unknown_instance``)."""

    reason: str = "no_instance"

    def to_decision(self) -> RouteDecision:
        return RouteDecision(reason=self.reason)


Outcome = Choice | Busy | NoInstance


class Candidate:
    """An instance eligible for a request, with its projected load."""

    __slots__ = ("record", "load")

    def __init__(self, record: InstanceRecord, load: InstanceLoad) -> None:
        self.record = record
        self.load = load


# ---------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------


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
        long double-counts (sheds early)."""
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
        self.index.remove_instance(iid)

    def instances(self, model: str) -> list[InstanceRecord]:
        """Live instances of a model (including ones marked down)."""
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

    # -- inputs from workers -------------------------------------------------

    def on_load(self, report: LoadReport) -> None:
        """Take a load report; it absorbs the assignments it acknowledges (``__init__``).
        Reports of unknown instances are ignored (the next one after discovery counts)."""
        iid = report.instance_id
        if iid not in self._records:
            return
        self._loads[iid] = report
        self._projected.pop(iid, None)
        pending = self._pending.get(iid)
        if pending is None:
            return
        if self.sender_id is not None and report.received is not None:
            pending.ack(report.received.get(self.sender_id, 0))
            if pending.unacknowledged:
                pending.expire(self.clock() - self.ack_timeout)
        else:
            pending.absorb(self.clock() - self.absorb_delay)

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
        """Instances of the model that are not excluded or down, with projected loads."""
        now = self.clock()
        down = self._down_until
        return [
            Candidate(rec, self._load(iid, rec))
            for iid, rec in self._by_model.get(model, {}).items()
            if iid not in exclude and not (down and self.is_down(iid, now))
        ]

    def _load(self, instance_id: str, record: InstanceRecord) -> InstanceLoad:
        load = self._projected.get(instance_id)
        if load is None:
            load = self._projected[instance_id] = InstanceLoad.project(
                record, self._loads.get(instance_id), self._pending.get(instance_id))
        return load


# ---------------------------------------------------------------------------
# Policies
# ---------------------------------------------------------------------------


class RoutingPolicy(Protocol):
    """Picks one of the non-busy candidates (never called with an empty list)."""

    name: ClassVar[str]

    def pick(self, model: str, token_ids: Sequence[int], candidates: Sequence[Candidate]) -> Choice: ...


def _prompt_blocks(token_ids: Sequence[int], record: InstanceRecord) -> int:
    return len(token_ids) // record.block_size


def _argmin(costs: Sequence[float], rng: random.Random) -> int:
    """Index of the lowest cost; ties broken uniformly at random."""
    best = min(costs)
    tied = [i for i, c in enumerate(costs) if c <= best + 1e-9]
    return tied[0] if len(tied) == 1 else rng.choice(tied)


class RoundRobinPolicy:
    """Cycles through instances in id order, per model; stable when instances come and
    go (continues after the last id it picked)."""

    name: ClassVar[str] = "round-robin"

    def __init__(self) -> None:
        self._last: dict[str, str] = {}

    def pick(self, model: str, token_ids: Sequence[int], candidates: Sequence[Candidate]) -> Choice:
        last = self._last.get(model)
        ids = sorted(c.record.instance_id for c in candidates)
        chosen = next((i for i in ids if last is None or i > last), ids[0])
        self._last[model] = chosen
        record = next(c.record for c in candidates if c.record.instance_id == chosen)
        return Choice(record=record, prompt_blocks=_prompt_blocks(token_ids, record))


class RandomPolicy:
    """Uniformly random."""

    name: ClassVar[str] = "random"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def pick(self, model: str, token_ids: Sequence[int], candidates: Sequence[Candidate]) -> Choice:
        record = self._rng.choice(candidates).record
        return Choice(record=record, prompt_blocks=_prompt_blocks(token_ids, record))


class LeastLoadedPolicy:
    """Lowest projected load (``cost.load_cost``), ignoring cached prefixes."""

    name: ClassVar[str] = "least-loaded"

    def __init__(self, rng: random.Random, prefill_weight: float) -> None:
        self._rng = rng
        self._prefill_weight = prefill_weight

    def pick(self, model: str, token_ids: Sequence[int], candidates: Sequence[Candidate]) -> Choice:
        costs = [load_cost(c.load, self._prefill_weight) for c in candidates]
        i = _argmin(costs, self._rng)
        record = candidates[i].record
        return Choice(record=record, prompt_blocks=_prompt_blocks(token_ids, record), cost=costs[i])


class KvPolicy:
    """Lowest ``cost.kv_cost``: prefix overlap from the KV index against projected load.

    ``temperature`` 0 takes the argmin (random among ties); above 0 samples with
    probability ∝ ``exp(−(cost − min) / (temperature × (max − min)))`` — costs are
    normalised by their spread so the temperature does not depend on prompt length.
    """

    name: ClassVar[str] = "kv"

    def __init__(self, index: KvIndex, rng: random.Random, prefill_weight: float, temperature: float) -> None:
        if temperature < 0:
            raise ValueError("temperature must be >= 0")
        self._index = index
        self._rng = rng
        self._prefill_weight = prefill_weight
        self._temperature = temperature

    def pick(self, model: str, token_ids: Sequence[int], candidates: Sequence[Candidate]) -> Choice:
        overlaps_by_size: dict[int, dict[str, int]] = {}
        costs: list[float] = []
        overlaps: list[int] = []
        blocks: list[int] = []
        for c in candidates:
            size = c.record.block_size
            by_instance = overlaps_by_size.get(size)
            if by_instance is None:
                by_instance = overlaps_by_size[size] = self._index.overlaps(block_hashes(token_ids, size))
            overlap = by_instance.get(c.record.instance_id, 0)
            prompt_blocks = len(token_ids) // size
            overlaps.append(overlap)
            blocks.append(prompt_blocks)
            costs.append(kv_cost(c.load, prompt_blocks, overlap, self._prefill_weight))
        i = self._sample(costs) if self._temperature > 0 else _argmin(costs, self._rng)
        return Choice(
            record=candidates[i].record,
            overlap_blocks=overlaps[i],
            prompt_blocks=blocks[i],
            cost=costs[i],
        )

    def _sample(self, costs: Sequence[float]) -> int:
        low, span = min(costs), max(costs) - min(costs)
        if span <= 0:
            return self._rng.randrange(len(costs))
        scale = self._temperature * span
        weights = [math.exp(-(c - low) / scale) for c in costs]
        return self._rng.choices(range(len(costs)), weights=weights)[0]


POLICY_NAMES = ("round-robin", "random", "least-loaded", "kv")


def make_policy(
    name: str, index: KvIndex, rng: random.Random, prefill_weight: float = 1.0, temperature: float = 0.0
) -> RoutingPolicy:
    """Build a policy by its command-line name (``POLICY_NAMES``)."""
    if name == "round-robin":
        return RoundRobinPolicy()
    if name == "random":
        return RandomPolicy(rng)
    if name == "least-loaded":
        return LeastLoadedPolicy(rng, prefill_weight)
    if name == "kv":
        return KvPolicy(index, rng, prefill_weight, temperature)
    raise ValueError(f"unknown routing policy {name!r}; choose from {', '.join(POLICY_NAMES)}")


# ---------------------------------------------------------------------------
# Router
# ---------------------------------------------------------------------------


class Router:
    """``choose`` = candidates → skip busy → policy. Counts rejections by reason in
    ``rejections`` and reports each to ``on_reject`` (e.g. a Prometheus counter)."""

    def __init__(
        self,
        state: RouterState,
        policy: str = "kv",
        *,
        prefill_weight: float = 1.0,
        temperature: float = 0.0,
        rng: random.Random | None = None,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        self.state = state
        self.rng = rng or random.Random()
        self.policy = make_policy(policy, state.index, self.rng, prefill_weight, temperature)
        self.rejections: dict[str, int] = {}
        self._on_reject = on_reject

    def choose(self, model: str, token_ids: Sequence[int], exclude: Collection[str] = ()) -> Outcome:
        """Pick an instance for a prompt. Does not record the assignment: call
        ``state.on_assigned`` once the request is sent (or use ``route``)."""
        candidates = self.state.candidates(model, exclude)
        if not candidates:
            reason = "all_excluded" if self.state.instances(model) else "no_instance"
            self._reject(reason)
            return NoInstance(reason=reason)
        free, busy = self._not_busy(candidates)
        if busy is not None:
            return busy
        return self.policy.pick(model, token_ids, free)

    def admission(self, model: str) -> Busy | None:
        """``Busy`` (the rejection counted) when every instance of ``model`` is busy,
        else ``None``. The busy rules read load only, never the prompt, so a frontend
        asks this before it templates and tokenizes a request: under overload most
        requests are rejected, and rejecting must cost as little as possible. Having no
        instance at all is ``choose``'s to answer (``None`` here)."""
        candidates = self.state.candidates(model)
        if not candidates:
            return None
        return self._not_busy(candidates)[1]

    def _not_busy(self, candidates: list[Candidate]) -> tuple[list[Candidate], Busy | None]:
        """The candidates that are not busy, and ``Busy`` (counted) if that is none."""
        thresholds = self.state.thresholds
        free: list[Candidate] = []
        reasons: set[str] = set()
        for c in candidates:
            why = busy_reason(c.load, thresholds)
            if why is None:
                free.append(c)
            else:
                reasons.add(why)
        if free:
            return free, None
        reason = reasons.pop() if len(reasons) == 1 else "mixed"
        self._reject(reason)
        return free, Busy(retry_after=retry_after([c.load for c in candidates], thresholds), reason=reason)

    def route(self, model: str, token_ids: Sequence[int], request_id: str, exclude: Collection[str] = ()) -> Outcome:
        """``choose`` and, on a ``Choice``, record the assignment at once — so a burst
        of calls sees each other's load with no await in between."""
        outcome = self.choose(model, token_ids, exclude)
        if isinstance(outcome, Choice):
            self.state.on_assigned(outcome.instance_id, request_id, outcome.prompt_blocks, outcome.overlap_blocks)
        return outcome

    def _reject(self, reason: str) -> None:
        self.rejections[reason] = self.rejections.get(reason, 0) + 1
        if self._on_reject is not None:
            self._on_reject(reason)
