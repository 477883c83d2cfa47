"""vLLM's stat loggers: the per-step scheduler stats kept for the worker's load reports,
and vLLM's own Prometheus series on the worker's ``/metrics``.

vLLM calls its stat loggers (``StatLoggerBase``) after every engine step; dynrt's keeps
the last ``SchedulerStats`` (KV usage, running, waiting) and re-exports vLLM's
prefix-cache counters (queries/hits, in tokens) as ``dynrt_vllm_prefix_cache_*_total``.
Beside it runs vLLM's ``PrometheusStatLogger``: the ``vllm:*`` series ``vllm serve``
has (``vllm:num_requests_running``, ``vllm:kv_cache_usage_perc``,
``vllm:e2e_request_latency_seconds``...), registered in ``prometheus_client``'s default
registry and served from dynrt's (``metrics.serve_default_registry``).

The prefill figures of the load reports (``LoadReport.prefill_tokens_per_s``,
``prefill_base_seconds``, ``step_seconds``; ``dynrt.worker.prefill_rate``) come from
vLLM's per-step ``SchedulerStats.iteration_details`` (``SchedulerIterationDetails``):
``num_ctx_tokens`` (prompt tokens the step scheduled, chunks of a chunked prefill
included) and ``num_generation_requests`` (decoding beside them).
vLLM fills it only with ``enable_logging_iteration_details`` (a dynrt default:
``dynrt.worker.vllm_config.DYNRT_DEFAULTS``); without it the rate is 0, unknown, and
routers judge the instance by their other rules. (The coarser alternative, the
``IterationStats`` the logger also gets, credits a prompt's tokens to the step its
prefill *completes* in, so it is not used.)

A step's duration is *not* its ``elapsed_ms``: vLLM 0.32 starts that clock after
``execute_model(non_block=True)`` has returned, and on the CPU executor the model has
already run by then — measured on a live CPU worker, ``elapsed_ms`` made a 135M model's
prefill look like 2.5 M tokens/s. It is the wall time between two consecutive steps'
stats instead, taken only when the earlier step left requests running or waiting (the
engine core goes straight on to the next step; after an idle spell the gap would count
the idle time). That includes scheduling and output processing — what a queued prompt
really waits for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from dynrt.runtime import metrics
from dynrt.runtime.protocol import LoadReport
from dynrt.worker.prefill_rate import PrefillRateMeter

PREFIX_QUERIES = metrics.counter("dynrt_vllm_prefix_cache_queries_total",
                                 "prompt tokens looked up in vLLM's prefix cache (vLLM's own stats)")
PREFIX_HITS = metrics.counter("dynrt_vllm_prefix_cache_hits_total",
                              "prompt tokens found in vLLM's prefix cache (vLLM's own stats)")


class VllmStepStats:
    """The scheduler stats of vLLM's last step."""

    def __init__(self) -> None:
        self.last: Any = None  # vLLM SchedulerStats
        self.prefill_rate = PrefillRateMeter()
        self.decoding = False  # the last step decoded
        self._recorded_at = 0.0  # time.monotonic() of the last step's stats
        self._busy = False  # the last step left requests running or waiting

    def record(self, scheduler_stats: Any, now: float | None = None) -> None:
        """Called by the stat logger for every engine step (``now``: for tests)."""
        self.last = scheduler_stats
        now = time.monotonic() if now is None else now
        previous_at, busy_before = self._recorded_at, self._busy
        self._recorded_at = now
        self._busy = (int(getattr(scheduler_stats, "num_running_reqs", 0))
                      + int(getattr(scheduler_stats, "num_waiting_reqs", 0))) > 0
        details = getattr(scheduler_stats, "iteration_details", None)
        if details is not None and not details.is_dummy:
            if busy_before and previous_at > 0:
                self.prefill_rate.record(details.num_ctx_tokens, now - previous_at, details.num_generation_requests)
            self.decoding = details.num_generation_requests > 0
        prefix = getattr(scheduler_stats, "prefix_cache_stats", None)
        if prefix is not None and prefix.queries:
            PREFIX_QUERIES.inc(prefix.queries)
            PREFIX_HITS.inc(prefix.hits)

    def load_report(self, model: str, kv_blocks_total: int, *, in_flight: int, prefill_tokens: int) -> LoadReport:
        """The load report for ``in_flight`` requests, ``prefill_tokens`` of whose
        prompts have no output yet."""
        stats = self.last
        meter = self.prefill_rate
        if not in_flight or stats is None:
            # Nothing in flight here: whatever the last step said, vLLM holds nothing.
            fit = meter.fit(False)
            return LoadReport(model=model, kv_blocks_used=0, kv_blocks_total=kv_blocks_total, timestamp=time.time(),
                              prefill_tokens_per_s=fit.tokens_per_s, prefill_base_seconds=fit.base_seconds,
                              step_seconds=meter.step_seconds)
        fit = meter.fit(self.decoding)
        return LoadReport(model=model, kv_blocks_used=round(stats.kv_cache_usage * kv_blocks_total),
                          kv_blocks_total=kv_blocks_total, running=int(stats.num_running_reqs),
                          waiting=int(stats.num_waiting_reqs) + int(getattr(stats, "num_skipped_waiting_reqs", 0)),
                          active_prefill_tokens=prefill_tokens, timestamp=time.time(),
                          prefill_tokens_per_s=fit.tokens_per_s, prefill_base_seconds=fit.base_seconds,
                          step_seconds=meter.step_seconds)

    def stat_loggers(self) -> list[Any]:
        """What ``AsyncLLM.from_engine_args(stat_loggers=...)`` takes: dynrt's logger
        (:meth:`stat_logger_factory`) and vLLM's Prometheus logger, whose series this
        process's ``/metrics`` then serves. Imports vLLM.

        Given explicitly although vLLM's ``StatLoggerManager`` adds it by itself when it
        is missing: the ``vllm:*`` series must not depend on that detail. With custom
        loggers ``AsyncLLM`` collects stats whatever ``disable_log_stats`` says; that flag
        then only keeps vLLM's periodic log lines off."""
        from vllm.v1.metrics.loggers import PrometheusStatLogger

        metrics.serve_default_registry("vllm:")
        return [self.stat_logger_factory(), PrometheusStatLogger]

    def stat_logger_factory(self) -> Callable[..., Any]:
        """What ``AsyncLLM.from_engine_args(stat_loggers=[...])`` takes: a factory of
        vLLM stat loggers that feed :meth:`record`. Imports vLLM."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        stats = self

        class DynrtStatLogger(StatLoggerBase):
            """Keeps the scheduler's stats of every step for ``VllmEngine.load``."""

            def __init__(self) -> None:  # noqa: D107  (StatLoggerBase.__init__ is abstract only)
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                       engine_idx: int = 0) -> None:
                if scheduler_stats is not None:
                    stats.record(scheduler_stats)

            def log_engine_initialized(self) -> None:
                pass

        def factory(vllm_config: Any, engine_index: int = 0) -> Any:
            return DynrtStatLogger()

        return factory
