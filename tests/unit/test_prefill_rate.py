"""Workers' measured prefill rate (``LoadReport.prefill_tokens_per_s``): the meter, the
mock engine's report from its measured steps, and vLLM's from its iteration details."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dynrt.worker.mock_engine import MockEngine, MockEngineConfig
from dynrt.worker.prefill_rate import PrefillRateMeter, fit_steps
from dynrt.worker.vllm_stats import VllmStepStats
from tests.unit.test_mock_engine import collect, prompt, request


def test_same_sized_steps_give_the_ratio_of_sums() -> None:
    meter = PrefillRateMeter(window=3)
    assert meter.fit(False).tokens_per_s == 0.0 and meter.step_seconds == 0.0  # unknown
    meter.record(1000, 0.1)
    meter.record(10, 0.0)  # no duration: not a sample
    assert (meter.fit(False).base_seconds, meter.fit(False).tokens_per_s) == (0.0, pytest.approx(10_000))
    meter.record(1000, 0.12)
    meter.record(1100, 0.11)  # sizes within 20 % of each other: no slope to fit
    assert meter.fit(False).tokens_per_s == pytest.approx(3100 / 0.33)
    meter.record(1000, 0.1)  # the first sample leaves the window
    assert meter.fit(False).tokens_per_s == pytest.approx(3100 / 0.33)
    with pytest.raises(ValueError):
        PrefillRateMeter(window=0)


def test_varied_steps_fit_a_fixed_part_and_a_marginal_rate() -> None:
    meter = PrefillRateMeter()
    for tokens in (800, 1600, 2400, 800, 3200):  # the mock's fit, beside nothing
        meter.record(tokens, (16.5 + 0.0152 * tokens) / 1e3)
    fit = meter.fit(False)
    assert fit.base_seconds == pytest.approx(0.0165)
    assert fit.tokens_per_s == pytest.approx(1e3 / 0.0152)
    # Noise that makes the line absurd (a negative fixed part): the ratio of sums.
    noisy = fit_steps([(800, 0.030), (1600, 0.031), (2400, 0.090)])
    assert noisy.base_seconds == 0.0 and noisy.tokens_per_s == pytest.approx(4800 / 0.151)
    assert fit_steps([]).tokens_per_s == 0.0


def test_meter_keeps_prefill_beside_decoding_apart() -> None:
    meter = PrefillRateMeter(window=4)
    meter.record(800, 0.030)  # alone
    assert meter.fit(True).tokens_per_s == pytest.approx(800 / 0.030)  # none beside decode yet: the other
    meter.record(800, 0.055, decode_seqs=7)
    meter.record(0, 0.025, decode_seqs=8)  # decode only: step time, not a prefill sample
    assert meter.fit(False).tokens_per_s == pytest.approx(800 / 0.030)
    assert meter.fit(True).tokens_per_s == pytest.approx(800 / 0.055)
    assert meter.step_seconds == pytest.approx((0.030 + 0.055 + 0.025) / 3)


async def test_mock_engine_reports_the_rate_of_its_measured_steps() -> None:
    # Speedup 20: steps sleep their modelled time / 20, so the rate is measured, not modelled.
    engine = MockEngine(MockEngineConfig(speedup=20.0))
    await engine.start()
    try:
        assert engine.load().prefill_tokens_per_s == 0.0
        await collect(engine, request("r1", prompt(800, seed=1), 4))
        await collect(engine, request("r2", prompt(1600, seed=2), 4))
        steps = [s for s in engine.step_log if s.prefill_tokens]
        assert [s.prefill_tokens for s in steps] == [800, 1600]
        expected = 2400 / (sum(s.measured_ms for s in steps) / 1e3)
        assert all(s.decode_seqs == 0 for s in steps)  # one request at a time: prefilled alone
        report = engine.load()
        rate = report.prefill_tokens_per_s
        assert report.prefill_base_seconds == 0.0  # two points: the ratio of sums
        assert rate == pytest.approx(expected)
        assert engine.load().step_seconds == pytest.approx(
            sum(s.measured_ms for s in engine.step_log) / len(engine.step_log) / 1e3)
        # Near the timing fit's rate at speedup 20 (the pacer pays timer overshoot back
        # on the next step, so a measured step can be shorter or longer than its model).
        modelled = 2400 / (sum(s.model_ms for s in steps) / 20 / 1e3)
        assert modelled / 4 < rate < modelled * 4
    finally:
        await engine.shutdown()
    assert engine.load().prefill_tokens_per_s == pytest.approx(expected)  # kept while idle


def _scheduler_stats(ctx_tokens: int, dummy: bool = False, decoding: int = 0, running: int = 2,
                     elapsed_ms: float = 0.5) -> SimpleNamespace:
    # elapsed_ms as vLLM 0.32's CPU path reports it: ~0, the model ran before its clock started.
    details = SimpleNamespace(num_ctx_tokens=ctx_tokens, elapsed_ms=elapsed_ms, is_dummy=dummy,
                              num_generation_requests=decoding)
    return SimpleNamespace(iteration_details=details, prefix_cache_stats=None, kv_cache_usage=0.5,
                           num_running_reqs=running, num_waiting_reqs=0)


def test_vllm_rate_comes_from_the_wall_time_between_busy_steps() -> None:
    stats = VllmStepStats()
    stats.record(SimpleNamespace(iteration_details=None, prefix_cache_stats=None), now=1.0)  # flag off: no samples
    assert stats.load_report("m", 100, in_flight=0, prefill_tokens=0).prefill_tokens_per_s == 0.0
    stats.record(_scheduler_stats(512), now=10.0)  # after idle: its duration is unknown, not counted
    assert stats.load_report("m", 100, in_flight=1, prefill_tokens=0).prefill_tokens_per_s == 0.0
    stats.record(_scheduler_stats(512), now=10.04)  # 40 ms after a step that left work
    stats.record(_scheduler_stats(999, dummy=True), now=10.05)  # data-parallel dummy step
    stats.record(_scheduler_stats(512), now=10.11)  # 60 ms
    stats.record(_scheduler_stats(256, decoding=2), now=10.19)  # prefill beside 2 decoding, 80 ms
    stats.record(_scheduler_stats(0, decoding=3), now=10.21)  # decode step: the engine is decoding now
    report = stats.load_report("m", 100, in_flight=3, prefill_tokens=0)
    assert report.prefill_tokens_per_s == pytest.approx(256 / 0.08)
    assert report.step_seconds == pytest.approx((0.04 + 0.06 + 0.08 + 0.02) / 4)
    assert report.running == 2
    stats.record(_scheduler_stats(512, running=0), now=10.26)  # 50 ms; leaves nothing to run
    assert stats.load_report("m", 100, in_flight=1, prefill_tokens=0).prefill_tokens_per_s == \
        pytest.approx(1536 / 0.15)
    stats.record(_scheduler_stats(512), now=20.0)  # after the idle spell: not a 9.7 s step
    # An idle worker keeps reporting what it measured prefilling alone.
    assert stats.load_report("m", 100, in_flight=0, prefill_tokens=0).prefill_tokens_per_s == \
        pytest.approx(1536 / 0.15)
