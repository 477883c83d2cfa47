"""Admission by TTFT objective (``dynrt.router.ttft`` applied by ``Router``) on
constructed states: block size 4, prefill rates in tokens/s from the load reports."""

from __future__ import annotations

import random

import msgspec
import pytest

from dynrt.router.cost import BusyThresholds, BusyThresholdSettings, InstanceLoad
from dynrt.router.policies import Busy, Choice, Router
from dynrt.router.state import RouterState
from dynrt.router.ttft import projected_ttft, retry_after_seconds, ttft_excess
from dynrt.runtime.protocol import LoadReport
from tests.unit.test_router_policy import BS, MODEL, make_state, store

SLO = 0.5


def report(state: RouterState, iid: str, *, rate: float, prefill: int = 0, running: int = 0, waiting: int = 0,
           used: int = 0, step: float = 0.0, base: float = 0.0) -> None:
    state.on_load(LoadReport(instance_id=iid, model=MODEL, kv_blocks_used=used, kv_blocks_total=1000,
                             running=running, waiting=waiting, active_prefill_tokens=prefill,
                             prefill_tokens_per_s=rate, prefill_base_seconds=base, step_seconds=step))


def tokens(k: int, n: int) -> list[int]:
    """A prompt of ``n`` tokens of its own (no blocks shared with other ``k``)."""
    return [10_000 * (k + 1) + i for i in range(n)]


def slo_state(ids: str = "ab", slo: float | None = SLO, **kw: int) -> RouterState:
    state, _ = make_state(ids, thresholds=BusyThresholds(kv_usage=0.95, ttft_slo=slo), **kw)
    return state


def test_request_fits_where_its_projection_is_within_the_objective() -> None:
    state = slo_state("a")
    report(state, "a", rate=1000.0, prefill=300)
    router = Router(state)
    # (300 queued + 100 own) / 1000 tok/s = 0.4 s <= 0.5 s
    assert isinstance(router.choose(MODEL, tokens(1, 100)), Choice)
    # (300 + 400) / 1000 = 0.7 s > 0.5 s
    busy = router.choose(MODEL, tokens(2, 400))
    assert busy == Busy(retry_after=1, reason="ttft")
    assert router.rejections == {"ttft": 1}


def test_the_fitting_instance_is_chosen_even_when_the_policy_prefers_another() -> None:
    state = slo_state("ab")
    report(state, "a", rate=1000.0, prefill=800)  # 0.8 s of queued work: nothing fits
    report(state, "b", rate=1000.0, prefill=0, used=900)  # heavily loaded KV, but no queue
    for k in range(5):
        choice = Router(state, "least-loaded", rng=random.Random(k)).choose(MODEL, tokens(k, 100))
        assert isinstance(choice, Choice) and choice.instance_id == "b"


def test_unknown_rate_is_judged_by_the_other_rules_only() -> None:
    state = slo_state("a")
    report(state, "a", rate=0.0, prefill=1_000_000)
    router = Router(state)
    assert isinstance(router.choose(MODEL, tokens(1, 4000)), Choice)
    report(state, "a", rate=0.0, prefill=1_000_000, used=990)  # the KV rule still applies
    assert router.choose(MODEL, tokens(1, 4000)) == Busy(retry_after=1, reason="kv_usage")
    assert projected_ttft(state.candidates(MODEL)[0].load, 10, 4.0) is None


def test_cached_prefix_is_not_charged_kv_policy() -> None:
    state = slo_state("ab")
    cached = tokens(7, 400)
    store(state, "a", cached)
    report(state, "a", rate=1000.0, prefill=400)
    report(state, "b", rate=1000.0, prefill=400)
    request = cached + tokens(8, 40)
    # On b: (400 + 440) / 1000 = 0.84 s. On a: (400 + 40) / 1000 = 0.44 s.
    choice = Router(state, "kv").choose(MODEL, request)
    assert isinstance(choice, Choice) and choice.instance_id == "a" and choice.overlap_blocks == 400 // BS
    # A policy that knows nothing of caches charges the whole prompt everywhere.
    assert Router(state, "round-robin").choose(MODEL, request) == Busy(retry_after=1, reason="ttft")


def test_burst_between_reports_admits_exactly_what_the_objective_allows() -> None:
    # 1,000 tok/s and 0.5 s: 500 tokens per instance, i.e. five 100-token prompts each.
    state = slo_state("ab")
    report(state, "a", rate=1000.0)
    report(state, "b", rate=1000.0)
    router = Router(state, "kv", rng=random.Random(1))
    outcomes = [router.route(MODEL, tokens(k, 100), f"r{k}") for k in range(30)]
    chosen = [o.instance_id for o in outcomes if isinstance(o, Choice)]
    assert sorted(chosen) == ["a"] * 5 + ["b"] * 5
    assert all(isinstance(o, Busy) and o.reason == "ttft" for o in outcomes[10:])
    # The same burst on the same state, another policy: the same number admitted.
    state2 = slo_state("ab")
    report(state2, "a", rate=1000.0)
    report(state2, "b", rate=1000.0)
    router2 = Router(state2, "random", rng=random.Random(2))
    assert sum(isinstance(router2.route(MODEL, tokens(k, 100), f"r{k}"), Choice) for k in range(30)) == 10


def test_burst_stops_at_the_free_sequence_slots() -> None:
    # Prefill would allow 5 per instance, but only 3 slots each: a 4th would wait for a
    # running request to finish (4 s / 3 running > 0.5 s).
    state = slo_state("ab", max_num_seqs=3)
    report(state, "a", rate=1000.0)
    report(state, "b", rate=1000.0)
    router = Router(state)
    admitted = sum(isinstance(router.route(MODEL, tokens(k, 100), f"r{k}"), Choice) for k in range(12))
    assert admitted == 6


def test_completed_and_acknowledged_assignments_free_the_objective() -> None:
    state = slo_state("a")
    report(state, "a", rate=1000.0)
    router = Router(state)
    for k in range(5):
        assert isinstance(router.route(MODEL, tokens(k, 100), f"r{k}"), Choice)
    assert isinstance(router.route(MODEL, tokens(9, 100), "r9"), Busy)
    state.on_completed("a", "r0")
    assert isinstance(router.route(MODEL, tokens(9, 100), "r9"), Choice)


def test_retry_after_comes_from_the_projection() -> None:
    state = slo_state("ab", slo=1.0)
    report(state, "a", rate=1000.0, prefill=20_000)  # 20.1 s projected: 19.1 s over
    report(state, "b", rate=1000.0, prefill=10_000)  # 10.1 s projected: 9.1 s over
    assert Router(state).choose(MODEL, tokens(1, 100)) == Busy(retry_after=10, reason="ttft")
    report(state, "b", rate=1000.0, prefill=100_000)
    report(state, "a", rate=1000.0, prefill=100_000)
    assert Router(state).choose(MODEL, tokens(1, 100)).retry_after == 30  # type: ignore[union-attr]  # clamped
    assert retry_after_seconds(0.2) == 1 and retry_after_seconds(float("inf")) == 1


def test_mixed_reasons_take_the_soonest_retry() -> None:
    state = slo_state("ab", slo=1.0)
    report(state, "a", rate=1000.0, prefill=5_000)  # 4.1 s over the objective
    report(state, "b", rate=1000.0, used=990, running=10)  # KV over 0.95
    busy = Router(state).choose(MODEL, tokens(1, 100))
    assert busy == Busy(retry_after=1, reason="mixed")  # b: (990 - 950) / 990 x 4 s -> 1 s


def test_slot_wait_is_part_of_the_projection() -> None:
    load = InstanceLoad(0, 1000, running=8, waiting=0, prefill_blocks=0, block_size=BS, max_num_seqs=8,
                        prefill_rate=1000.0)
    # Every slot taken: waits for one of 8 to finish, 4 s / 8, plus its own 100 tokens.
    assert projected_ttft(load, 100, 4.0) == pytest.approx(0.6)
    assert ttft_excess(load, 100, 0.5, 4.0) == pytest.approx(0.1)
    free = InstanceLoad(0, 1000, running=7, waiting=0, prefill_blocks=25, block_size=BS, max_num_seqs=8,
                        prefill_rate=1000.0)
    assert projected_ttft(free, 100, 4.0) == pytest.approx(0.2)


def test_a_busy_engine_adds_the_step_in_progress() -> None:
    state = slo_state("a")
    report(state, "a", rate=1000.0, running=0, step=0.2)
    router = Router(state)
    assert isinstance(router.choose(MODEL, tokens(1, 400)), Choice)  # idle: 0.4 s, no step to wait for
    report(state, "a", rate=1000.0, running=1, step=0.2)
    assert isinstance(router.choose(MODEL, tokens(1, 400)), Busy)  # 0.2 + 0.4 s
    assert isinstance(router.choose(MODEL, tokens(1, 300)), Choice)  # 0.2 + 0.3 s
    # A burst: the first assignment starts a step the next ones wait for.
    report(state, "a", rate=1000.0, running=0, step=0.2)
    assert isinstance(router.route(MODEL, tokens(1, 100), "r1"), Choice)  # 0.1 s
    assert isinstance(router.route(MODEL, tokens(2, 100), "r2"), Choice)  # 0.2 + 0.2 s
    assert isinstance(router.route(MODEL, tokens(3, 104), "r3"), Busy)  # 0.2 + (0.2 + 0.104) s
    assert isinstance(router.route(MODEL, tokens(4, 100), "r4"), Choice)  # 0.2 + 0.3 s: just fits


def test_the_fixed_part_of_a_step_is_paid_once_by_a_burst() -> None:
    # Steps cost 0.1 s + tokens at 2,000 tok/s; an objective of 0.5 s allows 800 tokens
    # in the step that prefills them: eight 100-token prompts on an idle instance.
    state = slo_state("a")
    report(state, "a", rate=2000.0, base=0.1)
    router = Router(state)
    assert sum(isinstance(router.route(MODEL, tokens(k, 100), f"r{k}"), Choice) for k in range(20)) == 8


def test_admission_before_tokenizing_rejects_only_when_queued_work_alone_exceeds() -> None:
    state = slo_state("a")
    report(state, "a", rate=1000.0, prefill=450)
    router = Router(state)
    assert router.admission(MODEL) is None  # an empty prompt would fit: tokenize and ask choose
    assert isinstance(router.choose(MODEL, tokens(1, 100)), Busy)
    report(state, "a", rate=1000.0, prefill=600)
    assert router.admission(MODEL) == Busy(retry_after=1, reason="ttft")


def test_objective_changes_at_runtime() -> None:
    thresholds = BusyThresholds()
    state, _ = make_state("a", thresholds=thresholds)
    report(state, "a", rate=1000.0, prefill=900)
    router = Router(state)
    assert isinstance(router.choose(MODEL, tokens(1, 200)), Choice)  # no objective: admitted
    body = msgspec.json.decode(b'{"ttft_slo": 0.5}', type=BusyThresholdSettings)
    assert thresholds.update(body).ttft_slo == 0.5
    assert isinstance(router.choose(MODEL, tokens(1, 200)), Busy)
    thresholds.update(BusyThresholdSettings(ttft_slo=2))
    assert thresholds.ttft_slo == 2.0 and isinstance(router.choose(MODEL, tokens(1, 200)), Choice)
    assert msgspec.json.encode(thresholds.settings()).endswith(b'"ttft_slo":2.0}')
    for bad in (0, -1.0, True, float("inf")):
        with pytest.raises(ValueError):
            thresholds.update(BusyThresholdSettings(kv_usage=0.5, ttft_slo=bad))  # type: ignore[arg-type]
    assert (thresholds.kv_usage, thresholds.ttft_slo) == (0.95, 2.0)  # all or nothing
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"ttft_slo": "fast"}', type=BusyThresholdSettings)
    thresholds.update(msgspec.json.decode(b'{"ttft_slo": null}', type=BusyThresholdSettings))
    assert thresholds.ttft_slo is None


def test_flag_values() -> None:
    assert BusyThresholds.from_flags(0.95, -1, -1, 0.0).ttft_slo is None
    assert BusyThresholds.from_flags(0.95, -1, -1, -3).ttft_slo is None
    assert BusyThresholds.from_flags(0.95, -1, -1, 0.25).ttft_slo == 0.25


@pytest.mark.parametrize("config_type", ["FrontendConfig", "RouterConfig"])
def test_ttft_slo_flag_on_frontend_and_standalone_router(config_type: str) -> None:
    import argparse

    from dynrt.runtime import config

    cls = getattr(config, config_type)
    parser = argparse.ArgumentParser()
    config.add_arguments(parser, cls)
    assert config.from_args(cls, parser.parse_args([])).routing.ttft_slo == 0.0  # off
    parsed = config.from_args(cls, parser.parse_args(["--ttft-slo", "0.25"]))
    r = parsed.routing
    thresholds = BusyThresholds.from_flags(r.busy_kv_threshold, r.busy_queue_threshold, r.busy_prefill_threshold,
                                           r.ttft_slo)
    assert thresholds.ttft_slo == 0.25


def test_a_continuing_request_is_not_held_to_the_objective_but_still_to_the_load_rules() -> None:
    """A migrating request (its client already has tokens) is admitted work: the TTFT
    objective would almost never fit its prompt + output under load and would lose it
    mid-answer. The KV memory guard still applies."""
    state = slo_state("a")
    report(state, "a", rate=1000.0, prefill=800)
    router = Router(state)
    assert router.choose(MODEL, tokens(1, 400)) == Busy(retry_after=1, reason="ttft")
    assert isinstance(router.choose(MODEL, tokens(1, 400), continuing=True), Choice)
    report(state, "a", rate=1000.0, prefill=800, used=990)
    assert router.choose(MODEL, tokens(1, 400), continuing=True) == Busy(retry_after=1, reason="kv_usage")
