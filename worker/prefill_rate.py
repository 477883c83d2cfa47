"""A worker's measured prefill rate (prompt tokens per second) and step time, for its
load reports (``LoadReport.prefill_tokens_per_s``, ``step_seconds``).

Routers turn queued prefill work into a projected time to first token with them
(``dynrt.router.ttft``), so the rate must be the one a prompt queued *now* will get:
prompt tokens computed by recent steps that prefilled, divided by those steps' wall time.
A step that also decodes counts whole, decode part included — a prompt queued behind a
decode batch gets only what the batch leaves. That share differs a lot (on the mock an
800-token prompt alone takes ~29 ms, beside a decode batch ~55 ms), so steps that
prefilled alone and steps that prefilled beside decoding sequences are measured apart,
and the report gives the rate that matches the worker's state at that moment (decoding
or not; the other one while that one has no samples yet).

Each window is the last ``window`` prefilling steps of its kind, a ratio of sums (Σ
tokens / Σ seconds), not an EWMA of per-step rates: a per-step rate average would let a
short step (a few cached-prefix tokens, dominated by the fixed step overhead) weigh as
much as a long one, while the ratio weighs each step by its duration, as the queue
experiences it. A count window rather than a time window: an idle worker keeps its last
rates (a rate of "unknown" after every idle second would switch the TTFT rule off
exactly when the next burst arrives), and it follows a change of load mix within
``window`` steps (~0.5–2 s at the mock's step times).

``step_seconds`` is the mean wall time of the last ``window`` steps of any kind: a
request that arrives while the engine is busy first waits for the step in progress.

Hand-written: running sums over a ``deque`` are a few lines, and no library offers
exactly this.
"""

from __future__ import annotations

from collections import deque

# Steps per window: enough to smooth timer jitter, few enough to follow a change of
# the load mix within a second or two.
DEFAULT_WINDOW = 32


class _RatioWindow:
    """Σ numerator / Σ seconds over the last ``size`` samples."""

    __slots__ = ("_samples", "_amount", "_seconds")

    def __init__(self, size: int) -> None:
        self._samples: deque[tuple[float, float]] = deque(maxlen=size)
        self._amount = 0.0
        self._seconds = 0.0

    def add(self, amount: float, seconds: float) -> None:
        samples = self._samples
        if len(samples) == samples.maxlen:
            old_amount, old_seconds = samples[0]
            self._amount -= old_amount
            self._seconds -= old_seconds
        samples.append((amount, seconds))
        self._amount += amount
        self._seconds += seconds

    def per_second(self) -> float:
        """0.0 with no samples (unknown)."""
        return self._amount / self._seconds if self._samples and self._seconds > 0 else 0.0

    def mean_seconds(self) -> float:
        return self._seconds / len(self._samples) if self._samples else 0.0


class PrefillRateMeter:
    """Prompt tokens per second over the last ``window`` steps that prefilled, apart for
    steps with and without decoding sequences; mean step time over the last ``window``
    steps."""

    __slots__ = ("_alone", "_beside_decode", "_steps")

    def __init__(self, window: int = DEFAULT_WINDOW) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self._alone = _RatioWindow(window)
        self._beside_decode = _RatioWindow(window)
        self._steps = _RatioWindow(window)

    def record(self, prefill_tokens: int, seconds: float, decode_seqs: int = 0) -> None:
        """One engine step computed ``prefill_tokens`` prompt tokens beside
        ``decode_seqs`` decoding sequences in ``seconds`` of wall time. A step of no
        measurable duration is ignored; one without prefill counts for the step time
        only."""
        if seconds <= 0:
            return
        self._steps.add(1, seconds)
        if prefill_tokens > 0:
            (self._beside_decode if decode_seqs > 0 else self._alone).add(prefill_tokens, seconds)

    def tokens_per_s(self, decoding: bool) -> float:
        """The rate a prompt queued now gets on an engine that is (``decoding``) or is
        not running decoding sequences; the other kind's while this one has no samples;
        0.0 before any prefilling step (unknown)."""
        first, second = (self._beside_decode, self._alone) if decoding else (self._alone, self._beside_decode)
        return first.per_second() or second.per_second()

    @property
    def step_seconds(self) -> float:
        """Mean wall time of the recent steps (0.0 before the first)."""
        return self._steps.mean_seconds()
