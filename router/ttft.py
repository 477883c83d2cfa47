"""Admission by TTFT objective: a request's projected time to first token on an instance,
and how long until it would fit the objective. Pure arithmetic on ``cost.InstanceLoad``;
``dynrt.router.policies.Router`` applies it per (request, instance).

Projected TTFT of a request with ``uncached`` prompt tokens on an instance (its prompt
minus what the instance caches: the ``kv`` policy knows the overlap from the KV index;
the other policies take the whole prompt)::

    step_in_progress  +  prefill_base + (prefill_tokens + uncached) / prefill_rate  +  slot_wait

* ``prefill_tokens``: prefill work queued ahead of it — the latest report's
  ``active_prefill_tokens`` plus the uncached tokens of this router's pending
  assignments (``cost.InstanceLoad``). Pending assignments count at once, so a burst
  between two load reports is admitted up to exactly what the objective allows.
* ``prefill_base`` and ``prefill_rate``: the step that prefills it, as the instance's
  own recent prefilling steps measured it — a fixed part plus prompt tokens at a
  marginal rate, beside decoding sequences if it is decoding now, alone if not
  (``LoadReport.prefill_base_seconds`` / ``prefill_tokens_per_s``,
  ``dynrt.worker.prefill_rate``). The queued prompts and this one are taken to be
  prefilled together, in one step: right while the queue is short, which it is under
  any objective of a few step times; a queue longer than one step's token budget costs
  a fixed part per step, which this leaves out. Rate 0 is unknown: the instance is
  judged by the other rules only (``ttft_excess`` says it fits).
* ``step_in_progress``: an engine that is running anything (a running sequence, queued
  prefill, or a pending assignment) is in the middle of a step, or about to start one
  without this request: it waits for that step first. Estimated as the instance's mean
  recent step time (``LoadReport.step_seconds``); on the mock at speedup 1 a decode
  step is ~25 ms and one that also prefills a prompt ~55 ms, a large part of an
  objective of a few times the unloaded TTFT (33 ms for an 800-token prompt,
  ``benchmarks/results/routing-slo.json``).
* ``slot_wait``: when every sequence slot is taken (``queue_if_sent`` = q > 0), the
  request waits for q running requests to finish first. Engines do not say when that
  will be (a request's length is decided by its EOS), so it is the retry-after model's
  estimate: ``mean_request_seconds × q / running``. With an objective of a few times
  the unloaded TTFT this is larger than the objective: a request is admitted only where
  it gets a slot at once.

The projection leaves out the frontend's own time (parsing, tokenizing, routing, the
first SSE event) and takes the step in progress at its mean (one that is a long prefill
lasts longer): an objective should leave room for both. The frontend's part is small
alone (~4 ms of the 33 ms unloaded TTFT above) but not in a burst: 96 requests at once
on a 2-core machine (load generator included) cost ~50–90 ms before the first token
of the two that ``queue 0 / prefill 0`` admitted, whose engine time is ~29 ms
(``benchmarks.routing_slo``).
"""

from __future__ import annotations

import math

from dynrt.router.cost import RETRY_AFTER_MAX, RETRY_AFTER_MIN, InstanceLoad


def projected_ttft(load: InstanceLoad, uncached_tokens: int, mean_request_seconds: float) -> float | None:
    """Seconds to the first token of a request with ``uncached_tokens`` of prompt to
    prefill on the instance (module docstring); ``None`` when the instance reports no
    prefill rate."""
    rate = load.prefill_rate
    if rate <= 0:
        return None
    seconds = load.prefill_base + (load.prefill_tokens + uncached_tokens) / rate
    if load.running or load.prefill_blocks:
        seconds += load.step_seconds
    queued = load.queue_if_sent
    if queued:
        seconds += mean_request_seconds * queued / max(load.running, 1)
    return seconds


def ttft_excess(load: InstanceLoad, uncached_tokens: int, objective: float, mean_request_seconds: float) -> float:
    """Seconds by which the projected TTFT exceeds ``objective`` (≤ 0: it fits; an
    instance of unknown rate always fits). Both parts of the projection shrink in real
    time — queued prompts drain at the prefill rate, running requests finish — so this
    is also about how long until the request would fit."""
    ttft = projected_ttft(load, uncached_tokens, mean_request_seconds)
    return -math.inf if ttft is None else ttft - objective


def retry_after_seconds(wait: float) -> int:
    """A wait in seconds as ``Retry-After``: whole seconds, clamped like
    ``cost.retry_after`` (``RETRY_AFTER_MIN..RETRY_AFTER_MAX``)."""
    if math.isinf(wait) or math.isnan(wait):
        wait = RETRY_AFTER_MIN
    return max(RETRY_AFTER_MIN, min(RETRY_AFTER_MAX, math.ceil(wait)))
