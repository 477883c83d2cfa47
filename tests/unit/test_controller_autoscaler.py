"""The autoscaler as pure functions of (spec, state, load, clock), and driven through a
deployment's passes with a fake launcher and clock."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from dynrt.controller.autoscaler import MAX_DECISIONS, SAMPLE_EVERY, AutoscalerStep, autoscale, measure_load
from dynrt.controller.records import AutoscalerState, Decision, ReplicaState
from dynrt.controller.spec import ModelSpec, parse_spec
from dynrt.runtime.protocol import LoadReport
from tests.unit.controller_harness import Harness, events

T0 = 1_000_000.0


@pytest.fixture(autouse=True)
def _capture(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dynrt")


def scaled(**autoscaling: Any) -> ModelSpec:
    """``m``: 1 replica, 1..4, in_flight target 4, a 3 s window; cooldowns as given."""
    settings = {"metric": "in_flight", "target": 4, "window": 3, "upscale_cooldown": 0, "downscale_cooldown": 2,
                **autoscaling}
    return parse_spec({"models": [{"name": "m", "replicas": 1, "min_replicas": 1, "max_replicas": 4,
                                   "health_check": {"period": 1, "timeout": 4}, "autoscaling": settings}]}).models[0]


def run(m: ModelSpec, loads: list[float | None], state: AutoscalerState | None = None,
        start: float = T0) -> tuple[AutoscalerState, list[AutoscalerStep]]:
    """One step a second with these loads."""
    steps = []
    last = 0.0
    for i, load in enumerate(loads):
        now = start + i * SAMPLE_EVERY
        step = autoscale(m, state, now, last_sample_at=last, load=load)
        if step.sampled:
            last = now
        steps.append(step)
        state = step.state
    assert state is not None
    return state, steps


def test_not_autoscaled_keeps_the_spec_count() -> None:
    m = parse_spec({"models": [{"name": "m", "replicas": 3}]}).models[0]
    assert autoscale(m, None, T0, last_sample_at=0.0, load=100.0) == AutoscalerStep(None, 3)


def test_scale_up_on_the_recent_average_within_the_ceiling() -> None:
    state, steps = run(scaled(), [4.0, 9.0, 30.0])
    # the last 1.5 s: ceil(avg(4, 9) / 4) = 2, then ceil(avg(9, 30) / 4) = 5 → max_replicas 4
    assert [s.target for s in steps] == [1, 2, 4]
    assert [(d.from_replicas, d.to_replicas, d.reason) for d in state.decisions] == [
        (1, 2, "load above target"), (2, 4, "load above target")]
    assert state.decisions[0] == Decision(at=T0 + 1, from_replicas=1, to_replicas=2, load=6.5,
                                          reason="load above target")
    assert steps[2].load == pytest.approx(19.5) and state.last_scale_at == T0 + 2


def test_upscale_cooldown() -> None:
    state, steps = run(scaled(upscale_cooldown=5), [9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0])
    assert [s.target for s in steps] == [3, 3, 3, 3, 3, 3, 3]  # the first decision: no previous one
    state, steps = run(scaled(upscale_cooldown=5), [20.0] * 7, state=state, start=T0 + 2)
    assert [s.target for s in steps] == [3, 3, 3, 4, 4, 4, 4]  # 5 s after the last decision


def test_scale_down_on_the_peak_of_a_full_window_after_the_cooldown() -> None:
    m = scaled(window=4, downscale_cooldown=3)
    up, _ = run(m, [16.0])
    assert up.target_replicas == 4
    # one spike inside the window holds the count up; the window must be full
    down, steps = run(m, [1.0, 1.0, 16.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], state=up, start=T0 + 1)
    targets = [s.target for s in steps]
    assert targets[:7] == [4] * 7  # the spike at +3 is within the 4 s window until +7
    assert targets[7:] == [1, 1]
    assert down.decisions[-1].reason == "load below target for the window" and down.decisions[-1].load == 1.0


def test_downscale_cooldown_counts_from_the_last_decision() -> None:
    m = scaled(window=2, downscale_cooldown=10)
    up, _ = run(m, [16.0])
    _, steps = run(m, [0.0] * 12, state=up, start=T0 + 1)
    assert [s.target for s in steps].index(1) == 9  # at +10 s, though the window was full long before


def test_samples_once_a_second_and_only_within_the_window() -> None:
    m = scaled(window=3)
    state = autoscale(m, None, T0, last_sample_at=0.0, load=1.0).state
    step = autoscale(m, state, T0 + 0.5, last_sample_at=T0, load=2.0)
    assert not step.sampled and step.state is not None and step.state.samples == [(T0, 1.0)]
    state, _ = run(m, [1.0, 2.0, 3.0, 4.0, 5.0, None])
    assert [v for _, v in state.samples] == [3.0, 4.0, 5.0]  # no report now: no sample, old ones age out


def test_bounds_and_decision_history() -> None:
    m = scaled()
    state = AutoscalerState(model="m", target_replicas=9)  # a spec that lowered max_replicas
    assert autoscale(m, state, T0, last_sample_at=T0, load=None).target == 4
    flapping = [40.0 if i % 8 < 4 else 0.0 for i in range(8 * 15)]
    state, _ = run(scaled(downscale_cooldown=0, window=1), flapping)
    assert len(state.decisions) == MAX_DECISIONS


def test_measure_load_by_metric_over_ready_replicas_with_fresh_reports() -> None:
    replicas = [ReplicaState(replica_id="a", model="m", digest="", state="ready", instance_id="ia"),
                ReplicaState(replica_id="b", model="m", digest="", state="ready", instance_id="ib"),
                ReplicaState(replica_id="c", model="m", digest="", state="starting", instance_id="ic"),
                ReplicaState(replica_id="d", model="other", digest="", state="ready", instance_id="id")]
    fresh = {iid: LoadReport(running=2, waiting=3, kv_blocks_used=50, kv_blocks_total=100)
             for iid in ("ia", "ic", "id")}
    assert measure_load(scaled(), replicas, fresh) == 5.0  # only a: ready, of m, fresh
    assert measure_load(scaled(metric="waiting"), replicas, fresh) == 3.0
    assert measure_load(scaled(metric="kv_usage", target=0.8), replicas, fresh) == 0.5
    assert measure_load(scaled(), replicas, {}) is None


def test_deployment_scales_up_under_load_and_drains_after(caplog: pytest.LogCaptureFixture) -> None:
    h = Harness(scaled(upscale_cooldown=0, downscale_cooldown=2))
    [first] = h.ready(1)
    first.instance_id = "i0"
    h.loads = {"i0": LoadReport(running=12)}
    for _ in range(12):
        h.tick(0.5)
        h.answer_probes()
    assert len(h.replicas()) == 3 and all(r.state == "ready" for r in h.replicas())
    assert h.state.autoscalers["m"].target_replicas == 3
    for i, r in enumerate(h.replicas()):
        r.instance_id = f"i{i}"
    h.loads = {f"i{i}": LoadReport(running=1 if i == 1 else 0) for i in range(3)}
    for _ in range(16):
        h.tick(0.5)
        h.answer_probes()
    survivors = [r for r in h.replicas() if r.state != "draining"]
    assert [r.instance_id for r in survivors] == ["i1"]  # the loaded one stays
    decisions = [(e["from_replicas"], e["to_replicas"]) for e in events(caplog, "autoscaler_decision")]
    assert decisions == [(1, 3), (3, 1)]
