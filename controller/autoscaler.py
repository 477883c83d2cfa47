"""How many replicas a model should have: pure functions of (spec, autoscaler state,
measured load, clock) → the next autoscaler state and, maybe, a decision.

About once a second (``SAMPLE_EVERY``) the model's total load — by its metric, summed
over its ready replicas with a fresh load report — is sampled; samples older than the
window are dropped. Scale up to ``ceil(load / target)`` on the average of the last few
samples once ``upscale_cooldown`` has passed since the last decision; scale down on the
*peak* of a full window, after ``downscale_cooldown``. Always within
``min_replicas..max_replicas``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import msgspec

from dynrt.controller.records import AutoscalerState, Decision, ReplicaState
from dynrt.controller.spec import ModelSpec
from dynrt.runtime.protocol import LoadReport

LOAD_FRESH = 5.0  # a load report older than this is ignored
SAMPLE_EVERY = 1.0
MAX_DECISIONS = 20


@dataclass(frozen=True, slots=True)
class AutoscalerStep:
    """``state`` to keep (None: the model is not autoscaled), the replica count it asks
    for, whether a sample was taken now, and the decision made now (if any) with the
    load it was made on."""

    state: AutoscalerState | None
    target: int
    sampled: bool = False
    decision: Decision | None = None
    load: float = 0.0


def measure_load(m: ModelSpec, replicas: Iterable[ReplicaState], fresh: Mapping[str, LoadReport]) -> float | None:
    """Total load of ``m`` by its metric over its ready replicas that have a fresh report
    in ``fresh`` (instance id → report); None when none has."""
    assert m.autoscaling is not None
    metric = m.autoscaling.metric
    total, n = 0.0, 0
    for r in replicas:
        if r.model != m.name or r.state != "ready" or r.instance_id not in fresh:
            continue
        report = fresh[r.instance_id]
        n += 1
        if metric == "in_flight":
            total += report.running + report.waiting
        elif metric == "waiting":
            total += report.waiting
        else:
            total += report.kv_usage
    return total if n else None


def autoscale(m: ModelSpec, state: AutoscalerState | None, now: float, *, last_sample_at: float,
              load: float | None) -> AutoscalerStep:
    """One step for model ``m`` at wall time ``now``: ``load`` is what ``measure_load``
    says now; a sample is taken if ``SAMPLE_EVERY`` has passed since ``last_sample_at``."""
    a = m.autoscaling
    if a is None:
        return AutoscalerStep(None, m.initial_replicas)
    if state is None:
        state = AutoscalerState(model=m.name, target_replicas=m.initial_replicas)
    state = msgspec.structs.replace(state, target_replicas=max(m.min_replicas, min(m.ceiling, state.target_replicas)))
    if now - last_sample_at < SAMPLE_EVERY:
        return AutoscalerStep(state, state.target_replicas)
    samples = [*state.samples, (now, load)] if load is not None else state.samples
    state = msgspec.structs.replace(state, samples=[s for s in samples if now - s[0] <= a.window])
    wanted = decide(m, state, now)
    if wanted is None:
        return AutoscalerStep(state, state.target_replicas, sampled=True)
    to_replicas, load, reason = wanted
    decision = Decision(at=now, from_replicas=state.target_replicas, to_replicas=to_replicas, load=round(load, 3),
                        reason=reason)
    state = msgspec.structs.replace(state, target_replicas=to_replicas, last_scale_at=now,
                                    decisions=[*state.decisions, decision][-MAX_DECISIONS:])
    return AutoscalerStep(state, to_replicas, sampled=True, decision=decision, load=load)


def decide(m: ModelSpec, state: AutoscalerState, now: float) -> tuple[int, float, str] | None:
    """(new target, the load it is for, why), or None to stay: up on the recent average,
    down on the window's peak; each after its cooldown."""
    a = m.autoscaling
    assert a is not None
    if not state.samples:
        return None
    current = state.target_replicas
    recent = [v for t, v in state.samples if now - t <= max(SAMPLE_EVERY * 1.5, a.window / 3)]
    up_load = sum(recent) / len(recent) if recent else 0.0
    want_up = _replicas_for(m, up_load)
    since = now - state.last_scale_at
    if want_up > current and since >= a.upscale_cooldown:
        return want_up, up_load, "load above target"
    # samples are ~1 s apart and pruned past the window: "full" = spanning it
    window_full = now - state.samples[0][0] >= max(0.0, a.window - 1.5 * SAMPLE_EVERY)
    down_load = max(v for _, v in state.samples)
    want_down = _replicas_for(m, down_load)
    if want_down < current and window_full and since >= a.downscale_cooldown:
        return want_down, down_load, "load below target for the window"
    return None


def _replicas_for(m: ModelSpec, load: float) -> int:
    assert m.autoscaling is not None
    return max(m.min_replicas, min(m.ceiling, math.ceil(load / m.autoscaling.target - 1e-9)))
