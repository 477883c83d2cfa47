"""Routing decisions: the outcomes (``Choice``, ``Busy``, ``NoInstance``), the policies
that pick an instance (``round-robin``, ``random``, ``least-loaded``, ``kv``), and the
``Router`` that puts them together with load shedding, on the pool as ``RouterState``
(``dynrt.router.state``) sees it.

Pure logic with no I/O: the NATS/etcd wiring feeds ``RouterState`` (instances, load
reports, KV events, dumps, assignments, completions) and asks ``Router.choose``.

Admission rule (the same for every policy): an instance is a candidate when it serves
the model, is not excluded by the caller, and is not marked down or suspect (its load
reports stopped: ``RouterState.is_suspect``); a candidate is *busy*
when its projected load (latest report + pending assignments, ``cost.InstanceLoad``)
breaks a threshold. Busy candidates are skipped; if all are busy the answer is
``Busy(retry_after)``. Pending assignments count toward busyness, so a burst between two
load reports is admitted up to exactly the capacity the thresholds leave, whatever order
or instance the policy picks — the same burst against the same state always gets the
same number admitted.

TTFT objective (``BusyThresholds.ttft_slo``, ``dynrt.router.ttft``): it depends on the
request — its prompt, and how much of it each instance caches — so it is judged per
(request, instance) after the load rules: of the candidates that are not busy, only
those where the request's projected TTFT fits the objective are offered to the policy
(instances of unknown prefill rate always are). The policy tells the router each
candidate's cached prefix (``RoutingPolicy.overlaps``: the KV index for ``kv``, nothing
for the others) and picks among the fitting ones with the same overlaps. None fits:
``Busy(reason="ttft")`` with ``Retry-After`` from the projection (how long until the
best instance's projection fits). ``Router.admission`` asks it without a prompt (zero
own tokens: the queued work alone) — a necessary condition, so shedding stays cheap.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import ClassVar, Protocol

import msgspec

from dynrt.router.cost import busy_reason, kv_cost, load_cost, retry_after
from dynrt.router.kv_index import KvIndex
from dynrt.router.state import Candidate, RouterState
from dynrt.router.ttft import retry_after_seconds, ttft_excess
from dynrt.runtime.block_hash import block_hashes
from dynrt.runtime.protocol import InstanceRecord, RouteDecision

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
    ``reason`` is ``kv_usage``, ``queue_depth``, ``prefill_tokens``, ``ttft`` or ``mixed``
    (candidates differ)."""

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


# ---------------------------------------------------------------------------
# Policies
# ---------------------------------------------------------------------------


# Instance id -> full prompt blocks it caches (absent: none known).
Overlaps = Mapping[str, int]
NO_OVERLAPS: Overlaps = {}


class RoutingPolicy(Protocol):
    """Picks one of the non-busy candidates (never called with an empty list)."""

    name: ClassVar[str]

    def overlaps(self, token_ids: Sequence[int], candidates: Sequence[Candidate]) -> Overlaps:
        """The prompt's cached full blocks on each candidate, as far as this policy
        knows (the TTFT rule charges a request only its uncached tokens)."""
        ...

    def pick(self, model: str, token_ids: Sequence[int], candidates: Sequence[Candidate],
             overlaps: Overlaps | None = None) -> Choice:
        """``overlaps``: what ``overlaps`` answered for these candidates, if asked."""
        ...


class _BlindPolicy:
    """A policy that does not look at cached prefixes."""

    def overlaps(self, token_ids: Sequence[int], candidates: Sequence[Candidate]) -> Overlaps:
        return NO_OVERLAPS


def _prompt_blocks(token_ids: Sequence[int], record: InstanceRecord) -> int:
    return len(token_ids) // record.block_size


def _argmin(costs: Sequence[float], rng: random.Random) -> int:
    """Index of the lowest cost; ties broken uniformly at random."""
    best = min(costs)
    tied = [i for i, c in enumerate(costs) if c <= best + 1e-9]
    return tied[0] if len(tied) == 1 else rng.choice(tied)


class RoundRobinPolicy(_BlindPolicy):
    """Cycles through instances in id order, per model; stable when instances come and
    go (continues after the last id it picked)."""

    name: ClassVar[str] = "round-robin"

    def __init__(self) -> None:
        self._last: dict[str, str] = {}

    def pick(self, model: str, token_ids: Sequence[int], candidates: Sequence[Candidate],
             overlaps: Overlaps | None = None) -> Choice:
        last = self._last.get(model)
        ids = sorted(c.record.instance_id for c in candidates)
        chosen = next((i for i in ids if last is None or i > last), ids[0])
        self._last[model] = chosen
        record = next(c.record for c in candidates if c.record.instance_id == chosen)
        return Choice(record=record, prompt_blocks=_prompt_blocks(token_ids, record))


class RandomPolicy(_BlindPolicy):
    """Uniformly random."""

    name: ClassVar[str] = "random"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def pick(self, model: str, token_ids: Sequence[int], candidates: Sequence[Candidate],
             overlaps: Overlaps | None = None) -> Choice:
        record = self._rng.choice(candidates).record
        return Choice(record=record, prompt_blocks=_prompt_blocks(token_ids, record))


class LeastLoadedPolicy(_BlindPolicy):
    """Lowest projected load (``cost.load_cost``), ignoring cached prefixes."""

    name: ClassVar[str] = "least-loaded"

    def __init__(self, rng: random.Random, prefill_weight: float) -> None:
        self._rng = rng
        self._prefill_weight = prefill_weight

    def pick(self, model: str, token_ids: Sequence[int], candidates: Sequence[Candidate],
             overlaps: Overlaps | None = None) -> Choice:
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

    def pick(self, model: str, token_ids: Sequence[int], candidates: Sequence[Candidate],
             overlaps: Overlaps | None = None) -> Choice:
        if overlaps is None:
            overlaps = self.overlaps(token_ids, candidates)
        costs: list[float] = []
        held: list[int] = []
        blocks: list[int] = []
        for c in candidates:
            overlap = overlaps.get(c.record.instance_id, 0)
            prompt_blocks = len(token_ids) // c.record.block_size
            held.append(overlap)
            blocks.append(prompt_blocks)
            costs.append(kv_cost(c.load, prompt_blocks, overlap, self._prefill_weight))
        i = self._sample(costs) if self._temperature > 0 else _argmin(costs, self._rng)
        return Choice(
            record=candidates[i].record,
            overlap_blocks=held[i],
            prompt_blocks=blocks[i],
            cost=costs[i],
        )

    def overlaps(self, token_ids: Sequence[int], candidates: Sequence[Candidate]) -> Overlaps:
        """From the KV index, hashing the prompt once per block size among the candidates."""
        by_size: dict[int, dict[str, int]] = {}
        found: dict[str, int] = {}
        for c in candidates:
            size = c.record.block_size
            by_instance = by_size.get(size)
            if by_instance is None:
                by_instance = by_size[size] = self._index.overlaps(block_hashes(token_ids, size))
            found[c.record.instance_id] = by_instance.get(c.record.instance_id, 0)
        return found

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

    def choose(self, model: str, token_ids: Sequence[int], exclude: Collection[str] = (),
               continuing: bool = False) -> Outcome:
        """Pick an instance for a prompt. Does not record the assignment: call
        ``state.on_assigned`` once the request is sent (or use ``route``).
        ``continuing``: a request whose client already has tokens (it is migrating) — the
        TTFT objective is about first tokens and does not apply (its prompt + output is
        long, so under load it would almost never fit, and the request would be lost
        mid-answer); the load rules still do."""
        candidates = self.state.candidates(model, exclude)
        if not candidates:
            reason = "all_excluded" if self.state.instances(model) else "no_instance"
            self._reject(reason)
            return NoInstance(reason=reason)
        free, busy = self._not_busy(candidates)
        if busy is not None:
            return busy
        if self.state.thresholds.ttft_slo is None or continuing:
            return self.policy.pick(model, token_ids, free)
        overlaps = self.policy.overlaps(token_ids, free)
        fitting, busy = self._within_objective(candidates, free, len(token_ids), overlaps)
        if busy is not None:
            return busy
        return self.policy.pick(model, token_ids, fitting, overlaps)

    def admission(self, model: str) -> Busy | None:
        """``Busy`` (the rejection counted) when every instance of ``model`` is busy,
        else ``None``. The load rules read load only, never the prompt, and the TTFT
        objective is asked for a request of no tokens of its own (the queued work alone
        exceeds it: no prompt can fit), so a frontend asks this before it templates and
        tokenizes a request: under overload most requests are rejected, and rejecting
        must cost as little as possible. Having no instance at all is ``choose``'s to
        answer (``None`` here)."""
        candidates = self.state.candidates(model)
        if not candidates:
            return None
        free, busy = self._not_busy(candidates)
        if busy is None and self.state.thresholds.ttft_slo is not None:
            busy = self._within_objective(candidates, free, 0, NO_OVERLAPS)[1]
        return busy

    def _within_objective(self, candidates: list[Candidate], free: list[Candidate], prompt_tokens: int,
                          overlaps: Overlaps) -> tuple[list[Candidate], Busy | None]:
        """The ``free`` candidates where a prompt of ``prompt_tokens`` (``overlaps``
        blocks of it cached) fits the TTFT objective, and ``Busy`` (counted) if none
        does: ``Retry-After`` is the soonest any candidate is expected to take it — a
        ``free`` one's projected excess, or a busy one's ``cost.retry_after``."""
        thresholds = self.state.thresholds
        objective = thresholds.ttft_slo
        assert objective is not None
        fitting: list[Candidate] = []
        soonest = math.inf
        for c in free:
            uncached = max(0, prompt_tokens - overlaps.get(c.record.instance_id, 0) * c.record.block_size)
            excess = ttft_excess(c.load, uncached, objective, thresholds.mean_request_seconds)
            if excess <= 0:
                fitting.append(c)
            else:
                soonest = min(soonest, excess)
        if fitting:
            return fitting, None
        wait = retry_after_seconds(soonest)
        reason = "ttft"
        if len(free) < len(candidates):
            free_ids = {c.record.instance_id for c in free}
            busy_loads = [c.load for c in candidates if c.record.instance_id not in free_ids]
            wait = min(wait, retry_after(busy_loads, thresholds))
            reason = "mixed"
        self._reject(reason)
        return fitting, Busy(retry_after=wait, reason=reason)

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

    def route(self, model: str, token_ids: Sequence[int], request_id: str, exclude: Collection[str] = (),
              continuing: bool = False) -> Outcome:
        """``choose`` and, on a ``Choice``, record the assignment at once — so a burst
        of calls sees each other's load with no await in between."""
        outcome = self.choose(model, token_ids, exclude, continuing)
        if isinstance(outcome, Choice):
            self.state.on_assigned(outcome.instance_id, request_id, outcome.prompt_blocks, outcome.overlap_blocks)
        return outcome

    def _reject(self, reason: str) -> None:
        self.rejections[reason] = self.rejections.get(reason, 0) + 1
        if self._on_reject is not None:
            self._on_reject(reason)
