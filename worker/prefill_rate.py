"""A worker's measured prefill speed and step time, for its load reports
(``LoadReport.prefill_tokens_per_s``, ``prefill_base_seconds``, ``step_seconds``).

Routers turn queued prefill work into a projected time to first token with them
(``dynrt.router.ttft``), so they must describe the step a prompt queued *now* will be
prefilled in. A step costs a fixed part (launching it, and the decode batch beside the
prompts) plus a part per prompt token; on the mock at speedup 1 an 800-token prompt
alone takes ~29 ms, of which 16.5 ms is fixed, and beside a decode batch ~54 ms, of which
~41 ms is fixed. A plain ratio (tokens / step time) would charge the fixed part once per
queued prompt and project two prompts prefilled together at twice one's time, when they
take ~1.25×. So each window fits ``seconds = base + tokens / rate`` to its steps by
least squares: ``base`` is the fixed part, ``rate`` the marginal prompt tokens per
second. While the window's steps all prefilled about the same number of tokens (no
spread to fit a slope to) it falls back to the ratio of sums, ``base`` 0: conservative.

Steps that prefilled alone and steps that prefilled beside decoding sequences are
measured apart (their fixed parts differ by the decode batch), and the report gives the
fit matching the worker's state at that moment (decoding or not; the other one while
that one has no samples yet). Every step counts whole, decode part included: a prompt
queued behind a decode batch gets only what the batch leaves.

Count windows (the last ``window`` prefilling steps of each kind) rather than time
windows: an idle worker keeps its last figures (a rate of "unknown" after every idle
second would switch the TTFT rule off exactly when the next burst arrives), and they
follow a change of load mix within ``window`` steps (~0.5–2 s at the mock's step times).

``step_seconds`` is the mean wall time of the last ``window`` steps of any kind: a
request that arrives while the engine is busy first waits for the step in progress.

Hand-written: a least-squares line over 32 points and a running mean are a few lines;
numpy's ``polyfit`` would do the fit but numpy is not a dependency of the worker.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection

# Steps per window: enough to smooth timer jitter, few enough to follow a change of
# the load mix within a second or two.
DEFAULT_WINDOW = 32


# Least squares needs prompt sizes that differ by at least this share of their mean;
# below it the slope is mostly timer noise.
MIN_RELATIVE_SPREAD = 0.2


class PrefillFit:
    """``seconds = base_seconds + tokens / tokens_per_s`` for a prefilling step;
    ``tokens_per_s`` 0: unknown."""

    __slots__ = ("base_seconds", "tokens_per_s")

    def __init__(self, base_seconds: float = 0.0, tokens_per_s: float = 0.0) -> None:
        self.base_seconds = base_seconds
        self.tokens_per_s = tokens_per_s

    def __repr__(self) -> str:
        return f"PrefillFit(base_seconds={self.base_seconds!r}, tokens_per_s={self.tokens_per_s!r})"


UNKNOWN = PrefillFit()


def fit_steps(samples: Collection[tuple[int, float]]) -> PrefillFit:
    """The line through (prompt tokens, seconds) of prefilling steps (module docstring);
    the ratio of sums when the sizes hardly differ or the line makes no sense (a
    negative fixed part or slope: noise)."""
    n = len(samples)
    if not n:
        return UNKNOWN
    sum_x = sum(x for x, _ in samples)
    sum_y = sum(y for _, y in samples)
    if sum_x <= 0 or sum_y <= 0:
        return UNKNOWN
    mean_x, mean_y = sum_x / n, sum_y / n
    var_x = sum((x - mean_x) ** 2 for x, _ in samples) / n
    if n >= 3 and var_x ** 0.5 >= MIN_RELATIVE_SPREAD * mean_x:
        slope = sum((x - mean_x) * (y - mean_y) for x, y in samples) / n / var_x
        base = mean_y - slope * mean_x
        if slope > 0 and base >= 0:
            return PrefillFit(base, 1.0 / slope)
    return PrefillFit(0.0, sum_x / sum_y)


class PrefillRateMeter:
    """Fits of the last ``window`` steps that prefilled, apart for steps with and
    without decoding sequences; mean step time over the last ``window`` steps."""

    __slots__ = ("_alone", "_beside_decode", "_step_times")

    def __init__(self, window: int = DEFAULT_WINDOW) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self._alone: deque[tuple[int, float]] = deque(maxlen=window)
        self._beside_decode: deque[tuple[int, float]] = deque(maxlen=window)
        self._step_times: deque[float] = deque(maxlen=window)

    def record(self, prefill_tokens: int, seconds: float, decode_seqs: int = 0) -> None:
        """One engine step computed ``prefill_tokens`` prompt tokens beside
        ``decode_seqs`` decoding sequences in ``seconds`` of wall time. A step of no
        measurable duration is ignored; one without prefill counts for the step time
        only."""
        if seconds <= 0:
            return
        self._step_times.append(seconds)
        if prefill_tokens > 0:
            (self._beside_decode if decode_seqs > 0 else self._alone).append((prefill_tokens, seconds))

    def fit(self, decoding: bool) -> PrefillFit:
        """The step model a prompt queued now gets on an engine that is (``decoding``)
        or is not running decoding sequences; the other kind's while this one has no
        samples; ``UNKNOWN`` before any prefilling step."""
        first, second = (self._beside_decode, self._alone) if decoding else (self._alone, self._beside_decode)
        return fit_steps(first or second)

    @property
    def step_seconds(self) -> float:
        """Mean wall time of the recent steps (0.0 before the first)."""
        times = self._step_times
        return sum(times) / len(times) if times else 0.0
