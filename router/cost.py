"""The router's load model: what an instance is carrying, what a request would cost it,
when it counts as busy, and how long a rejected client should wait.

Everything here is measured in KV *blocks*, the unit both the load reports and the KV
index speak:

* ``blocks_used``: KV blocks in use according to the instance's latest load report, plus
  the *new* blocks of requests this router sent it that the report does not reflect yet
  (*pending assignments*);
* ``prefill_blocks``: prefill work queued on the instance — the report's
  ``active_prefill_tokens`` in blocks, plus the uncached blocks of pending assignments.

A pending assignment's new blocks are what it adds on that instance: its uncached full
prompt blocks (``prompt_blocks − overlap_blocks``) plus ``DECODE_BLOCKS`` for the
prompt's partial last block and the first output tokens — a block no prefix cache can
supply. The cached part of the prompt is not counted: those blocks are already resident
(shared with the sequences using them), and counting them made a worker that holds a hot
prefix look as loaded as one that must compute it, so ``kv`` degenerated into
least-loaded. Decode growth beyond the first block is not modelled (the router is not
told ``max_tokens``); the next load report carries it.

A pending assignment stops counting when a load report *acknowledges* it: workers count
the generate requests they receive per sender (``LoadReport.received``: frontend id, and
the standalone router's id for requests it routed) and count a request before their
load figures can include it. The router numbers its assignments to each instance in
send order (1, 2, 3, …), so a report saying "received n from you" covers exactly the
first n — see ``PendingAssignments``.

KV cost of a request on an instance (lowest wins)::

    prefill_weight × (prompt_blocks − overlap_blocks + prefill_blocks) + blocks_used

The first term is the prefill the request would cause (and wait behind); the second the
decode load it would share the instance with. Every assignment raises the instance's
cost by ``(prefill_weight + 1) × uncached + DECODE_BLOCKS``, so a worker that holds a
popular prefix stops winning once it carries ``prefill_weight × overlap`` blocks of cost
more than another (Dynamo #737): by its pending assignments' uncached prefill and decode
blocks until a load report arrives, by the KV usage and queued prefill the report shows
after.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Literal

import msgspec

from dynrt.runtime.protocol import InstanceRecord, LoadReport

BusyReason = Literal["kv_usage", "queue_depth", "prefill_tokens", "ttft"]

# KV blocks every request allocates beyond its cached prefix besides its uncached full
# prompt blocks: the partial last prompt block / first output tokens.
DECODE_BLOCKS = 1

RETRY_AFTER_MIN = 1
RETRY_AFTER_MAX = 30


class BusyThresholdSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """JSON body of ``GET /busy_threshold`` (every field set) and ``POST /busy_threshold``
    (only the fields to change; ``null`` disables that rule; an unknown field is an error)."""

    kv_usage: float | None | msgspec.UnsetType = msgspec.UNSET
    queue_depth: int | None | msgspec.UnsetType = msgspec.UNSET
    prefill_tokens: int | None | msgspec.UnsetType = msgspec.UNSET
    ttft_slo: float | None | msgspec.UnsetType = msgspec.UNSET


def _count_or_none(name: str, value: int | None) -> int | None:
    """``value`` if it is a valid count threshold (an integer >= 0) or ``None``."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{name} threshold must be an integer >= 0 or null, got {value!r}")
    return value


class BusyThresholds:
    """Load-shedding thresholds, changeable at runtime.

    An instance is busy when its projected KV usage is *above* ``kv_usage`` (a fraction,
    0..1), a request sent to it now would make its projected waiting queue *longer than*
    ``queue_depth`` (``InstanceLoad.queue_if_sent``: with 0, whenever that request would
    have to wait for a sequence slot), or its projected queued prefill work (tokens still
    to prefill: the report's ``active_prefill_tokens`` plus the uncached prompt tokens of
    pending assignments) is *above* ``prefill_tokens``. ``None`` disables a rule. ``mean_request_seconds`` is the typical
    request lifetime used to turn an excess of load into a ``Retry-After`` (see
    ``retry_after``).

    ``ttft_slo`` (seconds; ``None``: off) is the objective of the TTFT rule, which
    depends on the request and so is judged per (request, instance) by the router
    (``dynrt.router.ttft``): a request goes only to an instance where its projected time
    to first token — queued prefill work ahead of it plus its own uncached tokens, at the
    instance's reported prefill rate, plus any wait for a sequence slot — fits.

    Which rules to use. The TTFT rule replaces guessing the queue and prefill thresholds:
    it admits exactly what the objective allows, whatever the prompt lengths, cache hits
    and engine speed. The static rules still make sense:

    * ``kv_usage`` as a memory guard, with or without an objective: a KV cache near full
      preempts running sequences (recompute), which no TTFT projection sees coming;
    * ``queue_depth`` and ``prefill_tokens`` for instances that report no prefill rate
      (``LoadReport.prefill_tokens_per_s`` 0: before their first prefill, or an engine
      that cannot measure it) — the TTFT rule judges those by the other rules only — and
      when no objective is set. The prefill rule is the static one that bounds an
      admitted request's TTFT: the queue rule still lets ``max_num_seqs`` requests start
      together, and their prefills share the engine's step budget, so the last of them
      waits for all the others' prompts. With ``prefill_tokens = 0`` a request is
      admitted only onto an instance with no prefill in progress, so it waits for at
      most its own prompt and the decode batch it joins — which also turns away a burst
      the engine could have prefilled together well within any objective.
    """

    def __init__(
        self,
        kv_usage: float | None = 0.95,
        queue_depth: int | None = None,
        prefill_tokens: int | None = None,
        mean_request_seconds: float = 4.0,
        ttft_slo: float | None = None,
    ) -> None:
        self._kv_usage: float | None = None
        self._queue_depth: int | None = None
        self._prefill_tokens: int | None = None
        self._ttft_slo: float | None = None
        self.kv_usage = kv_usage
        self.queue_depth = queue_depth
        self.prefill_tokens = prefill_tokens
        self.ttft_slo = ttft_slo
        if mean_request_seconds <= 0:
            raise ValueError("mean_request_seconds must be > 0")
        self.mean_request_seconds = mean_request_seconds

    @classmethod
    def from_flags(cls, busy_kv_threshold: float, busy_queue_threshold: int,
                   busy_prefill_threshold: int = -1, ttft_slo: float = 0.0) -> BusyThresholds:
        """From the ``--busy-kv-threshold`` / ``--busy-queue-threshold`` /
        ``--busy-prefill-threshold`` / ``--ttft-slo`` flags, where a number off the scale
        disables the rule (the flags cannot say ``null``): KV usage ``<= 0`` (no instance
        runs anything with 0 blocks in use), queue depth and prefill tokens ``< 0``, TTFT
        objective ``<= 0``. Queue depth 0 is a real rule (busy when a request sent now
        would wait), and so is prefill tokens 0 (busy while any prompt is being
        prefilled)."""
        return cls(kv_usage=busy_kv_threshold if busy_kv_threshold > 0 else None,
                   queue_depth=busy_queue_threshold if busy_queue_threshold >= 0 else None,
                   prefill_tokens=busy_prefill_threshold if busy_prefill_threshold >= 0 else None,
                   ttft_slo=ttft_slo if ttft_slo > 0 else None)

    @property
    def kv_usage(self) -> float | None:
        return self._kv_usage

    @kv_usage.setter
    def kv_usage(self, value: float | None) -> None:
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"kv_usage threshold must be within 0..1 or null, got {value}")
        self._kv_usage = value

    @property
    def queue_depth(self) -> int | None:
        return self._queue_depth

    @queue_depth.setter
    def queue_depth(self, value: int | None) -> None:
        self._queue_depth = _count_or_none("queue_depth", value)

    @property
    def prefill_tokens(self) -> int | None:
        return self._prefill_tokens

    @prefill_tokens.setter
    def prefill_tokens(self, value: int | None) -> None:
        self._prefill_tokens = _count_or_none("prefill_tokens", value)

    @property
    def ttft_slo(self) -> float | None:
        return self._ttft_slo

    @ttft_slo.setter
    def ttft_slo(self, value: float | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 < value < math.inf):
            raise ValueError(f"ttft_slo must be a number of seconds > 0 or null, got {value!r}")
        self._ttft_slo = None if value is None else float(value)

    def settings(self) -> BusyThresholdSettings:
        """Current values, for ``GET /busy_threshold``."""
        return BusyThresholdSettings(kv_usage=self._kv_usage, queue_depth=self._queue_depth,
                                     prefill_tokens=self._prefill_tokens, ttft_slo=self._ttft_slo)

    def update(self, settings: BusyThresholdSettings) -> BusyThresholdSettings:
        """Apply the fields set in ``settings`` (all or nothing: every one is validated
        before any changes); returns the resulting values. Raises ``ValueError`` if invalid."""
        kv = self._kv_usage if settings.kv_usage is msgspec.UNSET else settings.kv_usage
        queue = self._queue_depth if settings.queue_depth is msgspec.UNSET else settings.queue_depth
        prefill = self._prefill_tokens if settings.prefill_tokens is msgspec.UNSET else settings.prefill_tokens
        slo = self._ttft_slo if settings.ttft_slo is msgspec.UNSET else settings.ttft_slo
        old = (self._kv_usage, self._queue_depth, self._prefill_tokens, self._ttft_slo)
        try:
            self.kv_usage = kv
            self.queue_depth = queue
            self.prefill_tokens = prefill
            self.ttft_slo = slo
        except ValueError:
            self._kv_usage, self._queue_depth, self._prefill_tokens, self._ttft_slo = old
            raise
        return self.settings()


class PendingAssignments:
    """Requests this router sent to one instance that its load reports do not reflect
    yet, with running totals so reading them is O(1): ``count``, ``prefill_blocks``
    (uncached full prompt blocks) and ``kv_blocks`` (new KV blocks: uncached +
    ``DECODE_BLOCKS``).

    Every assignment gets the next sequence number (``sent`` is the last one given) and
    waits in ``_unacked`` until ``ack(n)`` — a load report saying the instance has
    received ``n`` requests from this router — covers it: sequence number ≤ ``n +
    offset``. It stops counting as load then, or earlier when it completes (it keeps its
    place in ``_unacked``: its number still has to be matched by the worker's count).

    ``offset`` keeps numbers and counts aligned when they part:

    * an assignment never acknowledged after ``ack_timeout`` (the request was never
      delivered: the frontend gave up before sending, the message was lost) is dropped by
      ``expire`` and ``offset`` grows by one, so later counts still line up;
    * a count above ``sent − offset`` is impossible unless an expired one arrived after
      all: ``offset`` shrinks back to fit (every assignment is then acknowledged);
    * a count that goes *down* means the worker forgot this sender (e.g. a frontend
      lease blip made it drop the count): what it had counted moves into ``offset``.

    Requests that one sender's several routers route in different orders from their
    sends (concurrent requests of one frontend; many frontends through one standalone
    router) are acknowledged by count: the oldest ``n`` are dropped, which may briefly
    be the wrong ones of equal number.
    """

    __slots__ = ("_by_request", "_unacked", "sent", "offset", "last_count", "count", "prefill_blocks",
                 "kv_blocks")

    def __init__(self) -> None:
        # request id -> (sequence number, uncached blocks, new KV blocks): counted as load
        self._by_request: dict[str, tuple[int, int, int]] = {}
        # (sequence number, assigned at, request id), in sequence (and time) order
        self._unacked: deque[tuple[int, float, str]] = deque()
        self.sent = 0
        self.offset = 0
        self.last_count = 0
        self.count = 0
        self.prefill_blocks = 0
        self.kv_blocks = 0

    def add(self, request_id: str, assigned_at: float, prompt_blocks: int, overlap_blocks: int = 0) -> None:
        """Record an assignment (the next sequence number) of a prompt of
        ``prompt_blocks`` full blocks of which the instance holds ``overlap_blocks``.
        Re-adding a request id stops counting the earlier one's load (it is a resend)."""
        self.complete(request_id)
        self.sent += 1
        uncached = max(0, prompt_blocks - overlap_blocks)
        entry = (self.sent, uncached, uncached + DECODE_BLOCKS)
        self._by_request[request_id] = entry
        self._unacked.append((self.sent, assigned_at, request_id))
        self.count += 1
        self.prefill_blocks += entry[1]
        self.kv_blocks += entry[2]

    def complete(self, request_id: str) -> None:
        """Stop counting a request's load (finished, failed, or cancelled). Unknown ids
        are ignored."""
        entry = self._by_request.pop(request_id, None)
        if entry is not None:
            self._subtract(entry)

    @property
    def unacknowledged(self) -> int:
        """Assignments not acknowledged yet, completed ones included."""
        return len(self._unacked)

    @property
    def oldest_unacknowledged_at(self) -> float | None:
        """When the oldest assignment no report has acknowledged yet was made (None: all are)."""
        return self._unacked[0][1] if self._unacked else None

    def ack(self, received: int) -> None:
        """A load report says the instance has received ``received`` requests from this
        router (cumulative): drop the assignments it covers."""
        if received < self.last_count:
            self.offset += self.last_count  # the worker started counting us afresh
        self.last_count = received
        if received + self.offset > self.sent:
            self.offset = max(0, self.sent - received)
        covered = received + self.offset
        unacked = self._unacked
        while unacked and unacked[0][0] <= covered:
            self._drop(unacked.popleft())

    def expire(self, cutoff: float) -> None:
        """Give up on assignments made at or before ``cutoff`` that no report has
        acknowledged: they were lost on the way, and ``offset`` grows for each."""
        unacked = self._unacked
        while unacked and unacked[0][1] <= cutoff:
            self._drop(unacked.popleft())
            self.offset += 1

    def absorb(self, cutoff: float) -> None:
        """Take assignments made at or before ``cutoff`` as reflected (for workers whose
        reports carry no ``received`` counts: a timer instead of an acknowledgement)."""
        unacked = self._unacked
        while unacked and unacked[0][1] <= cutoff:
            self._drop(unacked.popleft())

    def _drop(self, item: tuple[int, float, str]) -> None:
        seq, _, request_id = item
        entry = self._by_request.get(request_id)
        if entry is not None and entry[0] == seq:  # not completed, nor re-sent since
            del self._by_request[request_id]
            self._subtract(entry)

    def _subtract(self, entry: tuple[int, int, int]) -> None:
        self.count -= 1
        self.prefill_blocks -= entry[1]
        self.kv_blocks -= entry[2]


class InstanceLoad:
    """An instance's projected load: latest report plus pending assignments."""

    __slots__ = ("blocks_used", "blocks_total", "running", "waiting", "prefill_blocks", "block_size",
                 "max_num_seqs", "prefill_rate", "prefill_base", "step_seconds")

    def __init__(
        self, blocks_used: int, blocks_total: int, running: int, waiting: int, prefill_blocks: float,
        block_size: int = 16, max_num_seqs: int = 256, prefill_rate: float = 0.0, prefill_base: float = 0.0,
        step_seconds: float = 0.0,
    ) -> None:
        self.blocks_used = blocks_used
        self.blocks_total = blocks_total
        self.running = running
        self.waiting = waiting
        self.prefill_blocks = prefill_blocks
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        # The instance's prefilling step: prefill_base + tokens / prefill_rate seconds (0: unknown)
        self.prefill_rate = prefill_rate
        self.prefill_base = prefill_base
        self.step_seconds = step_seconds  # its mean recent step time (0: unknown)

    @classmethod
    def project(
        cls, record: InstanceRecord, report: LoadReport | None, pending: PendingAssignments | None
    ) -> InstanceLoad:
        """Combine the report with pending assignments. A pending request is assumed to
        start running if the instance has a free sequence slot and nobody waiting
        (the engine's queue is FIFO), and to wait otherwise."""
        if report is None:
            used, total, running, waiting = 0, record.kv_blocks_total, 0, 0
            prefill = rate = base = step = 0.0
        else:
            used = report.kv_blocks_used
            total = report.kv_blocks_total or record.kv_blocks_total
            running, waiting = report.running, report.waiting
            prefill = report.active_prefill_tokens / record.block_size
            rate, base, step = report.prefill_tokens_per_s, report.prefill_base_seconds, report.step_seconds
        if pending is not None and pending.count:
            used += pending.kv_blocks
            prefill += pending.prefill_blocks
            starts = 0 if waiting else min(pending.count, max(0, record.max_num_seqs - running))
            running += starts
            waiting += pending.count - starts
        return cls(used, total, running, waiting, prefill, record.block_size, record.max_num_seqs, rate, base,
                   step)

    @property
    def kv_usage(self) -> float:
        return self.blocks_used / self.blocks_total if self.blocks_total else 0.0

    @property
    def queue_if_sent(self) -> int:
        """The waiting queue if one more request arrived now: it waits too when others
        already wait (the queue is FIFO) or every sequence slot is taken."""
        if self.waiting or self.running >= self.max_num_seqs:
            return self.waiting + 1
        return 0

    @property
    def prefill_tokens(self) -> float:
        """Queued prefill work in tokens (pending assignments count whole blocks)."""
        return self.prefill_blocks * self.block_size


def busy_reason(load: InstanceLoad, thresholds: BusyThresholds) -> BusyReason | None:
    """Why the instance is busy, or ``None`` if it can take a request. Rules are checked
    in the order KV usage, queue depth, prefill tokens: an instance over several reports
    the first."""
    kv = thresholds.kv_usage
    if kv is not None and load.kv_usage > kv:
        return "kv_usage"
    queue = thresholds.queue_depth
    if queue is not None and load.queue_if_sent > queue:
        return "queue_depth"
    prefill = thresholds.prefill_tokens
    if prefill is not None and load.prefill_tokens > prefill:
        return "prefill_tokens"
    return None


def kv_cost(load: InstanceLoad, prompt_blocks: int, overlap_blocks: int, prefill_weight: float) -> float:
    """Cost of sending a request to the instance (module docstring)."""
    return prefill_weight * (prompt_blocks - overlap_blocks + load.prefill_blocks) + load.blocks_used


def load_cost(load: InstanceLoad, prefill_weight: float) -> float:
    """The instance's load alone: ``kv_cost`` without the request's own prefill."""
    return prefill_weight * load.prefill_blocks + load.blocks_used


def retry_after(loads: list[InstanceLoad], thresholds: BusyThresholds) -> int:
    """Seconds until the first busy instance is expected to take requests again.

    With ``D = mean_request_seconds`` (a request's typical lifetime), an instance running
    ``r`` requests completes about ``r / D`` per second. For each instance:

    * queue rule: ``q − queue_depth`` requests must leave the queue (or free a slot),
      ``q`` = ``queue_if_sent`` → ``D × (q − queue_depth) / max(r, 1)``;
    * KV rule: a share ``(used − kv_usage × total) / used`` of its KV must be freed,
      and all of it is freed within ``D`` → ``D × (used − kv_usage × total) / used``;
    * prefill rule: queued prompts drain within a few engine steps (well under a
      second), so it adds no wait of its own beyond the ``RETRY_AFTER_MIN`` floor.

    The instance's wait is the largest of these (all must clear); the answer is the
    smallest over instances, rounded up to whole seconds and clamped to
    ``RETRY_AFTER_MIN..RETRY_AFTER_MAX`` (the ``Retry-After`` header wants integers).
    """
    d = thresholds.mean_request_seconds
    kv, queue = thresholds.kv_usage, thresholds.queue_depth
    best = math.inf
    for load in loads:
        wait = 0.0
        if queue is not None and load.queue_if_sent > queue:
            wait = d * (load.queue_if_sent - queue) / max(load.running, 1)
        if kv is not None and load.blocks_used > kv * load.blocks_total:
            wait = max(wait, d * (load.blocks_used - kv * load.blocks_total) / load.blocks_used)
        best = min(best, wait)
    if math.isinf(best):
        best = RETRY_AFTER_MIN
    return max(RETRY_AFTER_MIN, min(RETRY_AFTER_MAX, math.ceil(best)))
