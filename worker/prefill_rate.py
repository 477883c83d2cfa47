"""A worker's measured prefill rate (prompt tokens per second), for its load reports.

Routers turn queued prefill work into a projected time to first token with it
(``dynrt.router.ttft``), so it must be the rate a *queued* prompt will actually get:
prompt tokens computed by recent steps that prefilled, divided by those steps' wall time.
A step that also decodes counts whole, decode part included — a prompt queued behind a
decode batch gets only what the batch leaves, and the measured rate says so.

The window is the last ``window`` prefilling steps, a ratio of sums (Σ tokens / Σ
seconds), not an EWMA of per-step rates: a per-step rate average would let a short step
(a few cached-prefix tokens, dominated by the fixed step overhead) weigh as much as a
long one, while the ratio weighs each step by its duration, as the queue experiences
it. A count window rather than a time window: an idle worker keeps its last rate (a
rate of "unknown" after every idle second would switch the TTFT rule off exactly when
the next burst arrives), and it follows a change of load mix within ``window`` steps
(~0.5–2 s at the mock's step times). Hand-written: a running sum over a ``deque`` is a
few lines, and no library offers exactly this.
"""

from __future__ import annotations

from collections import deque

# Prefilling steps in the window: enough to smooth timer jitter, few enough to follow
# a change of the load mix within a second or two.
DEFAULT_WINDOW = 32


class PrefillRateMeter:
    """Prompt tokens per second over the last ``window`` steps that prefilled."""

    __slots__ = ("_steps", "_tokens", "_seconds")

    def __init__(self, window: int = DEFAULT_WINDOW) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self._steps: deque[tuple[int, float]] = deque(maxlen=window)
        self._tokens = 0
        self._seconds = 0.0

    def record(self, prefill_tokens: int, seconds: float) -> None:
        """One engine step computed ``prefill_tokens`` prompt tokens (any decode work
        alongside) in ``seconds`` of wall time. Steps without prefill, or with no
        measurable duration, are not samples of the rate and are ignored."""
        if prefill_tokens <= 0 or seconds <= 0:
            return
        steps = self._steps
        if len(steps) == steps.maxlen:
            old_tokens, old_seconds = steps[0]
            self._tokens -= old_tokens
            self._seconds -= old_seconds
        steps.append((prefill_tokens, seconds))
        self._tokens += prefill_tokens
        self._seconds += seconds

    @property
    def tokens_per_s(self) -> float:
        """The rate, or 0.0 before any prefilling step (unknown)."""
        if not self._steps or self._seconds <= 0:
            return 0.0
        return self._tokens / self._seconds
