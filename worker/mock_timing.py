"""The mock engine's timing model: how long a step takes, and steps paced to it.

A step takes as long as Dynamo's mocker's published fit says (:func:`step_model_ms`),
divided by the engine's ``speedup``; :class:`StepPacer` sleeps each step to that.
"""

from __future__ import annotations

import asyncio
import math
import time

import msgspec

# How far the step clock may fall behind real time before it is reset (see StepPacer).
_MAX_CLOCK_LAG_S = 0.005


class StepTiming(msgspec.Struct, frozen=True, kw_only=True):
    """One engine step: what it did, what the timing model asked for, what it took."""

    prefill_tokens: int
    decode_seqs: int
    kv_usage: float
    model_ms: float
    measured_ms: float


def prefill_ms(new_tokens: int) -> float:
    """Dynamo mocker's fit of a prefill step over ``new_tokens`` uncached tokens."""
    return 4.209989e-7 * new_tokens * new_tokens + 1.518344e-2 * new_tokens + 16.50142


def decode_ms(kv_usage: float) -> float:
    """Dynamo mocker's fit of a decode step at KV usage fraction ``kv_usage``."""
    return max(1.0, -25.74 * kv_usage * kv_usage + 54.01 * kv_usage + 5.74)


def step_model_ms(prefill_tokens: int, decode_seqs: int, kv_usage: float) -> float:
    """Modelled duration of one step at speedup 1. A step that both prefills and
    decodes costs the sum of both fits (the GPU runs both parts of the batch)."""
    ms = 0.0
    if prefill_tokens:
        ms += prefill_ms(prefill_tokens)
    if decode_seqs:
        ms += decode_ms(kv_usage)
    return ms


class StepPacer:
    """Makes each step last its modelled time divided by ``speedup`` (``inf``: no
    sleeping, only a yield to the event loop)."""

    def __init__(self, speedup: float) -> None:
        self._sleep_s_per_ms = 0.0 if math.isinf(speedup) else 1e-3 / speedup
        self._clock = 0.0  # when the previous step should have ended (perf_counter)

    async def wait(self, start: float, model_ms: float) -> None:
        """Sleep out the step that began at ``start`` (``time.perf_counter()``)."""
        if self._sleep_s_per_ms:
            # Sleep until an absolute deadline chained from the previous step's, so
            # timer overshoot (event loops wake on millisecond ticks) is paid back
            # by the next step instead of adding up; a lag beyond a few ms (after
            # idling, or when this process cannot keep up) resets the chain.
            if start - self._clock > _MAX_CLOCK_LAG_S:
                self._clock = start
            self._clock += model_ms * self._sleep_s_per_ms
            await asyncio.sleep(self._clock - time.perf_counter())
        else:
            await asyncio.sleep(0)
