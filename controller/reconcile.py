"""What to do about the replicas: pure functions of (spec, observed state, clock) →
actions. Nothing here launches, signals, probes or writes; ``state.DeploymentState``
carries the actions out, one at a time, each failing alone.

The target state is the spec (and each model's autoscaler target); the observed state is
the replica records, which processes have exited, load reports, probe results. As in
Ray Serve's ``deployment_state.py``, a pass compares the two and returns the steps that
bring the observed state towards the target:

1. ``plan_exits``: a process that exited → ``Fail`` (relaunch, with exponential backoff
   for a replica that keeps failing), or ``Drained`` if it was draining; a drain past
   ``drain_timeout + DRAIN_GRACE`` → ``Kill``.
2. ``plan_removed``: replicas of a model no longer in the spec → ``Drain``.
3. ``plan_scale``: per model, ``Create`` missing replicas; a rolling update surges one
   current-digest replica at a time, waits until it is ready, then drains one outdated
   replica; surplus replicas → ``Drain`` (not-yet-serving, then least loaded first).
4. ``plan_launches``: ``Launch`` pending replicas whose relaunch time has come (once
   their slot is stored), ``Probe`` those whose health check is due.

``plan_probe_result`` turns one health check into ``MarkHealthy`` / ``MarkUnhealthy`` /
``Kill``; ``plan_recovery`` turns a new leader's view of the stored replicas into
``Adopt`` / ``Forget`` / ``Fail``.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass

from dynrt.controller.records import AutoscalerState, ReplicaState, SpecRecord
from dynrt.controller.spec import ModelSpec
from dynrt.runtime.protocol import LoadReport

BACKOFF_BASE = 1.0  # seconds before the second relaunch in a row; doubles after
BACKOFF_MAX = 60.0
BACKOFF_RESET = 30.0  # healthy this long → a later failure starts the backoff over
DRAIN_GRACE = 20.0  # beyond drain_timeout before a draining replica is SIGKILLed
DEFAULT_DRAIN_TIMEOUT = 30.0  # for a replica whose model left the spec

LIVE = ("starting", "ready", "unhealthy", "draining")  # states with a process
PROBED = ("starting", "ready", "unhealthy")  # states whose process is health-checked


# -- actions ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Create:
    """A new replica slot of ``model`` (launched by a later pass, once stored)."""

    model: ModelSpec


@dataclass(frozen=True, slots=True)
class Retarget:
    """A pending replica starts with the current spec's ``digest`` (nothing runs yet)."""

    replica_id: str
    digest: str


@dataclass(frozen=True, slots=True)
class Launch:
    replica_id: str
    model: ModelSpec


@dataclass(frozen=True, slots=True)
class Probe:
    """Health-check the replica now; the next check is due ``period`` from now."""

    replica_id: str
    model: ModelSpec
    period: float


@dataclass(frozen=True, slots=True)
class Fail:
    """Its process is gone: count a failure, relaunch after ``backoff_delay``."""

    replica_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Kill:
    """SIGKILL; ``reason`` becomes the failure reason once the process is seen gone."""

    replica_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Drain:
    """SIGTERM and wait (a replica without a process is removed at once)."""

    replica_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Drained:
    """A draining replica's process exited: the slot is gone."""

    replica_id: str
    exit_code: int | None


@dataclass(frozen=True, slots=True)
class Forget:
    """Drop the slot without a word (a draining replica that died while no controller ran)."""

    replica_id: str


@dataclass(frozen=True, slots=True)
class Adopt:
    """Manage the running process ``pid`` again; ``orphan``: found by its replica id, not
    at the stored pid (launched just before the last controller died)."""

    replica_id: str
    pid: int
    orphan: bool


@dataclass(frozen=True, slots=True)
class MarkHealthy:
    replica_id: str


@dataclass(frozen=True, slots=True)
class MarkUnhealthy:
    replica_id: str
    reason: str


Action = Create | Retarget | Launch | Probe | Fail | Kill | Drain | Drained | Forget | Adopt | MarkHealthy | MarkUnhealthy


def backoff_delay(consecutive_failures: int) -> float:
    """0 for the first failure (replace at once), then 1, 2, 4 ... 60 s."""
    if consecutive_failures <= 1:
        return 0.0
    return min(BACKOFF_BASE * 2 ** (consecutive_failures - 2), BACKOFF_MAX)


# -- a pass -------------------------------------------------------------------------


def plan_exits(replicas: Iterable[ReplicaState], exited: Mapping[str, int | None], models: Mapping[str, ModelSpec],
               kill_reasons: Mapping[str, str], now: float) -> list[Action]:
    """``exited``: replica id → exit code (None: unknown) of the live replicas whose
    process is gone; ``kill_reasons``: why the controller SIGKILLed a replica."""
    actions: list[Action] = []
    for r in replicas:
        if r.state not in LIVE or r.pid == 0:
            continue
        if r.replica_id in exited:
            code = exited[r.replica_id]
            if r.state == "draining":
                actions.append(Drained(r.replica_id, code))
            else:
                why = kill_reasons.get(r.replica_id, "") or \
                    f"process exited ({'code ' + str(code) if code is not None else 'not our child'})"
                actions.append(Fail(r.replica_id, why))
        elif r.state == "draining":
            m = models.get(r.model)
            limit = (m.drain_timeout if m else DEFAULT_DRAIN_TIMEOUT) + DRAIN_GRACE
            if now - r.drain_started_at > limit:
                actions.append(Kill(r.replica_id, "drain overdue"))
    return actions


def plan_removed(replicas: Iterable[ReplicaState], models: Container[str]) -> list[Action]:
    return [Drain(r.replica_id, "model removed from spec") for r in replicas
            if r.model not in models and r.state != "draining"]


def drain_order(r: ReplicaState, loads: Mapping[str, LoadReport]) -> tuple[int, float]:
    """Not-yet-serving replicas first, then the least loaded."""
    rank = {"pending": 0, "starting": 1, "unhealthy": 2, "ready": 3}.get(r.state, 4)
    report = loads.get(r.instance_id)
    return rank, (report.running + report.waiting) if report is not None else 0.0


def plan_scale(m: ModelSpec, desired: int, replicas: Iterable[ReplicaState],
               loads: Mapping[str, LoadReport]) -> list[Action]:
    """Bring ``m`` to ``desired`` replicas of its current launch digest. ``loads``:
    instance id → latest load report (which replica to drain first)."""
    digest = m.launch_digest()
    members = [r for r in replicas if r.model == m.name and r.state != "draining"]
    # a pending replica runs nothing yet: it simply starts with the new spec
    actions: list[Action] = [Retarget(r.replica_id, digest) for r in members
                             if r.state == "pending" and r.digest != digest]
    current = [r for r in members if r.state == "pending" or r.digest == digest]
    outdated = [r for r in members if r.state != "pending" and r.digest != digest]
    missing = desired - len(current)
    if missing > 0:
        if not outdated:
            actions += [Create(m) for _ in range(missing)]
        elif not any(r.state in ("pending", "starting") for r in current):
            actions.append(Create(m))  # rolling update: one surge replica at a time
    ready_current = sum(1 for r in current if r.state == "ready")
    while outdated and ready_current + len(outdated) - 1 >= desired:
        victim = min(outdated, key=lambda r: drain_order(r, loads))
        outdated.remove(victim)
        actions.append(Drain(victim.replica_id, "rolling update"))
    if not outdated and len(current) > desired:
        for victim in sorted(current, key=lambda r: drain_order(r, loads))[:len(current) - desired]:
            actions.append(Drain(victim.replica_id, "scale down"))
    return actions


def plan_launches(m: ModelSpec, replicas: Iterable[ReplicaState], *, stored: Container[str],
                  next_check: Mapping[str, float], checking: Container[str], now: float) -> list[Action]:
    """``stored``: replica ids whose record is in etcd — a replica is launched only once
    its slot is stored, so a controller dying right after the launch finds the process
    again (``Launcher.find``). ``checking``: replica ids with a probe in flight."""
    actions: list[Action] = []
    for r in replicas:
        if r.model != m.name:
            continue
        if r.state == "pending" and now >= r.next_launch_at and r.replica_id in stored:
            actions.append(Launch(r.replica_id, m))
        elif r.state in PROBED and r.replica_id not in checking and now >= next_check.get(r.replica_id, 0.0):
            period = m.health_check.period if r.state == "ready" else min(0.5, m.health_check.period)
            actions.append(Probe(r.replica_id, m, period))
    return actions


# -- one health check ---------------------------------------------------------------


def plan_probe_result(r: ReplicaState, m: ModelSpec, healthy: bool, why: str, *, took: float,
                      now: float) -> list[Action]:
    """What a finished health check of ``r`` means; ``took``: seconds it ran."""
    if not healthy and took > m.health_check.period + 3.0:
        return []  # the probe outlived its own timeouts: we were stalled, not the replica
    if healthy:
        return [MarkHealthy(r.replica_id)]
    if r.state == "starting":
        if now - r.started_at > m.startup_timeout:
            return [Kill(r.replica_id, f"startup timeout ({m.startup_timeout}s): {why}")]
        return []
    actions: list[Action] = []
    if r.state == "ready":
        actions.append(MarkUnhealthy(r.replica_id, why))
    if now - r.last_healthy_at > m.health_check.timeout:
        actions.append(Kill(r.replica_id, f"health check failing for {m.health_check.timeout}s: {why}"))
    return actions


# -- a new leader -------------------------------------------------------------------


def plan_recovery(stored: Iterable[ReplicaState], found: Mapping[str, tuple[int, bool]]) -> list[Action]:
    """A new leader's steps for the stored replicas. ``found``: replica id → (pid,
    orphan) of its live process — at the stored pid (orphan False), or found by replica
    id (orphan True); missing: no process runs it."""
    actions: list[Action] = []
    for r in stored:
        if r.replica_id in found:
            pid, orphan = found[r.replica_id]
            actions.append(Adopt(r.replica_id, pid, orphan))
        elif r.state not in LIVE or r.pid == 0:
            continue  # pending: launched by the next pass
        elif r.state == "draining":
            actions.append(Forget(r.replica_id))
        else:
            actions.append(Fail(r.replica_id, "gone while the controller was down"))
    return actions


# -- a rollout ----------------------------------------------------------------------


def rollout_finished(spec: SpecRecord, generation: int, replicas: Iterable[ReplicaState],
                     autoscalers: Iterable[AutoscalerState]) -> bool:
    """Every replica runs the spec of ``generation`` (or later) and is ready, each model
    has as many as it should, and no replica of a removed model is left."""
    if spec.generation < generation:
        return False
    targets = {a.model: a.target_replicas for a in autoscalers}
    replicas = list(replicas)
    for m in spec.spec.models:
        mine = [r for r in replicas if r.model == m.name]
        want = targets.get(m.name, m.initial_replicas) if m.autoscaling else m.initial_replicas
        digest = m.launch_digest()
        if len(mine) != want or any(r.state != "ready" or r.digest != digest for r in mine):
            return False
    names = {m.name for m in spec.spec.models}
    return not [r for r in replicas if r.model not in names]
