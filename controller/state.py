"""The active controller's view of its replicas and autoscalers, and the transitions
that change it: ``DeploymentState`` runs a reconcile pass (``reconcile.plan_*``, pure) and
carries out the resulting actions through a ``Launcher``.

Each action is carried out alone: one that raises is logged (``controller_action_failed``)
and its replica (or model, for a new slot) is held back with exponential backoff, while
every other action of the pass goes on — a bad replica never ends leadership, and the
hold outlives a re-election, so it is not retried in a loop either.

No etcd, NATS or HTTP here: the controller supplies ``Hooks`` (is a replica's record
stored, its instance record must go, start a health check), so unit tests drive this
class with a fake launcher and a fake clock.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Protocol

from dynrt.controller.autoscaler import autoscale, measure_load
from dynrt.controller.launcher import Launcher
from dynrt.controller.reconcile import (
    BACKOFF_RESET,
    LIVE,
    PROBED,
    Action,
    Adopt,
    Create,
    Drain,
    Drained,
    Fail,
    Forget,
    Kill,
    Launch,
    MarkHealthy,
    MarkUnhealthy,
    Probe,
    Retarget,
    backoff_delay,
    plan_exits,
    plan_launches,
    plan_probe_result,
    plan_recovery,
    plan_removed,
    plan_scale,
)
from dynrt.controller.records import AutoscalerState, ReplicaState, key_token
from dynrt.controller.spec import DeploymentSpec, ModelSpec
from dynrt.runtime.log import get_logger
from dynrt.runtime.protocol import LoadReport

log = get_logger("controller")

ReplicaCommand = Callable[[str, ModelSpec], tuple[list[str], dict[str, str]]]


class Hooks(Protocol):
    def is_stored(self, r: ReplicaState) -> bool:
        """The replica's record is in etcd (it may be launched)."""
        ...

    def replica_gone(self, r: ReplicaState) -> None:
        """Its process is gone: remove its instance record now rather than at lease
        expiry, so routers stop choosing it at once."""
        ...

    def start_probe(self, r: ReplicaState, m: ModelSpec) -> None:
        """Health-check ``r`` in the background; report with ``probe_finished`` and
        ``probe_result``."""
        ...


class DeploymentState:
    """The replicas (``replicas``: replica id → record) and autoscalers (model → state)
    the active controller manages, and what it knows between passes: when each
    replica's next probe is due, which probes are in flight, why a replica was killed."""

    def __init__(self, launcher: Launcher, command: ReplicaCommand, hooks: Hooks) -> None:
        self.launcher = launcher
        self.command = command
        self.hooks = hooks
        self.replicas: dict[str, ReplicaState] = {}
        self.autoscalers: dict[str, AutoscalerState] = {}
        self.next_check: dict[str, float] = {}  # replica id → when its next probe is due
        self.checking: set[str] = set()  # replica ids with a probe in flight
        self.kill_reasons: dict[str, str] = {}
        self.last_sample: dict[str, float] = {}  # model → when its load was last sampled
        self._held: dict[str, tuple[int, float]] = {}  # replica id / model → (errors in a row, until)

    # -- a pass -------------------------------------------------------------------
    def reconcile(self, spec: DeploymentSpec, now: float, *, loads: Mapping[str, LoadReport],
                  fresh_loads: Mapping[str, LoadReport]) -> None:
        """One pass. ``loads``: the latest report of each instance; ``fresh_loads``: those
        recent enough to autoscale on."""
        models = {m.name: m for m in spec.models}
        self.apply(plan_exits(self.replicas.values(), self._exited(), models, self.kill_reasons, now), now)
        self.apply(plan_removed(self.replicas.values(), models), now)
        for m in spec.models:
            try:
                desired = self._autoscale(m, now, fresh_loads)
                self.apply(plan_scale(m, desired, list(self.replicas.values()), loads), now)
                stored = {r.replica_id for r in self.replicas.values() if self.hooks.is_stored(r)}
                self.apply(plan_launches(m, list(self.replicas.values()), stored=stored, next_check=self.next_check,
                                         checking=self.checking, now=now), now)
            except Exception as exc:  # a bug for one model must not stop the others
                log.error("controller_model_reconcile_failed", model=m.name, error=repr(exc))

    def _exited(self) -> dict[str, int | None]:
        exited: dict[str, int | None] = {}
        for r in self.replicas.values():
            if r.state not in LIVE or r.pid == 0:
                continue
            try:
                if not self.launcher.alive(r.replica_id, r.pid):
                    exited[r.replica_id] = self.launcher.exit_code(r.pid)
            except Exception as exc:
                log.error("controller_observe_failed", replica_id=r.replica_id, pid=r.pid, error=repr(exc))
        return exited

    def _autoscale(self, m: ModelSpec, now: float, fresh_loads: Mapping[str, LoadReport]) -> int:
        if m.autoscaling is None:
            self.autoscalers.pop(m.name, None)
            return m.initial_replicas
        step = autoscale(m, self.autoscalers.get(m.name), now, last_sample_at=self.last_sample.get(m.name, 0.0),
                         load=measure_load(m, self.replicas.values(), fresh_loads))
        assert step.state is not None
        self.autoscalers[m.name] = step.state
        if step.sampled:
            self.last_sample[m.name] = now
        if step.decision is not None:
            d = step.decision
            log.info("autoscaler_decision", model=m.name, from_replicas=d.from_replicas, to_replicas=d.to_replicas,
                     load=round(step.load, 2), reason=d.reason)
        return step.target

    def restart_health_clocks(self, now: float) -> None:
        """The controller was not running (frozen, overloaded): the replicas' silence
        during that time is ours, not theirs."""
        for r in self.replicas.values():
            r.last_healthy_at = max(r.last_healthy_at, now)

    # -- a new leader -------------------------------------------------------------
    def recover(self, stored: list[ReplicaState], autoscalers: list[AutoscalerState], now: float) -> tuple[int, int]:
        """Take over the stored replicas: adopt those whose process still runs, relaunch
        the others. Returns (adopted, relaunching)."""
        self.replicas = {r.replica_id: r for r in stored}
        for a in autoscalers:
            self.autoscalers[a.model] = a
        found: dict[str, tuple[int, bool]] = {}
        for r in stored:
            try:
                process = self._find_process(r)
            except Exception as exc:
                log.error("controller_observe_failed", replica_id=r.replica_id, pid=r.pid, error=repr(exc))
                continue
            if process is not None:
                found[r.replica_id] = process
        actions = plan_recovery(stored, found)
        self.apply(actions, now)
        return (sum(isinstance(a, Adopt) for a in actions), sum(isinstance(a, Fail) for a in actions))

    def _find_process(self, r: ReplicaState) -> tuple[int, bool] | None:
        """(pid, orphan) of the process running ``r``: its stored pid if that is still
        the replica, else one found by replica id (launched just before the last
        controller died, before its pid was stored)."""
        if r.state in LIVE and self.launcher.adopt(r.replica_id, r.pid, r.host):
            return r.pid, False
        orphan = self.launcher.find(r.replica_id)
        if orphan is not None and self.launcher.adopt(r.replica_id, orphan, self.launcher.host):
            return orphan, True
        return None

    # -- health checks ------------------------------------------------------------
    def probe_finished(self, replica_id: str) -> None:
        self.checking.discard(replica_id)

    def probe_result(self, r: ReplicaState, m: ModelSpec, pid: int, healthy: bool, why: str, *, took: float,
                     now: float) -> None:
        """A health check of ``r`` (started while it ran ``pid``) answered."""
        if self.replicas.get(r.replica_id) is not r or r.pid != pid or r.state not in PROBED:
            return  # it changed while we were asking
        self.apply(plan_probe_result(r, m, healthy, why, took=took, now=now), now)

    # -- carrying out -------------------------------------------------------------
    def apply(self, actions: list[Action], now: float) -> None:
        for action in actions:
            key = action.model.name if isinstance(action, Create) else action.replica_id
            r = None if isinstance(action, Create) else self.replicas.get(key)
            if r is None and not isinstance(action, Create):
                continue  # gone earlier in this batch
            errors, until = self._held.get(key, (0, 0.0))
            if now < until:
                continue
            try:
                self._apply(action, r, now)
            except Exception as exc:
                delay = backoff_delay(errors + 2)  # 1, 2, 4 ... 60 s
                self._held[key] = (errors + 1, now + delay)
                log.error("controller_action_failed", action=type(action).__name__, replica_id=key,
                          error=repr(exc), retry_in=delay)
            else:
                self._held.pop(key, None)

    def _apply(self, action: Action, r: ReplicaState | None, now: float) -> None:
        if isinstance(action, Create):
            self._create(action.model, now)
            return
        assert r is not None
        match action:
            case Retarget(digest=digest):
                r.digest = digest
            case Launch(model=m):
                self._launch(r, m, now)
            case Probe(model=m, period=period):
                self.hooks.start_probe(r, m)  # first: if it raises, the probe is not in flight
                self.next_check[r.replica_id] = now + period
                self.checking.add(r.replica_id)
            case Fail(reason=reason):
                self._fail(r, reason, now)
            case Kill(reason=reason):
                log.warning("replica_killing", replica_id=r.replica_id, model=r.model, pid=r.pid, reason=reason)
                self.kill_reasons[r.replica_id] = reason
                self.launcher.signal(r.pid, signal.SIGKILL)
            case Drain(reason=reason):
                self._drain(r, reason, now)
            case Drained(exit_code=code):
                log.info("replica_drained", replica_id=r.replica_id, model=r.model, pid=r.pid, exit_code=code)
                self._forget(r)
            case Forget():
                self._forget(r)
            case Adopt(pid=pid, orphan=orphan):
                self._adopt(r, pid, orphan, now)
            case MarkHealthy():
                self._healthy(r, now)
            case MarkUnhealthy(reason=reason):
                log.warning("replica_unhealthy", replica_id=r.replica_id, model=r.model, pid=r.pid, reason=reason)
                r.state = "unhealthy"

    def _create(self, m: ModelSpec, now: float) -> None:
        r = ReplicaState(replica_id=f"{key_token(m.name)[:24]}-{uuid.uuid4().hex[:8]}", model=m.name,
                         digest=m.launch_digest(), created_at=now, next_launch_at=now)
        self.replicas[r.replica_id] = r
        log.info("replica_created", replica_id=r.replica_id, model=m.name)

    def _launch(self, r: ReplicaState, m: ModelSpec, now: float) -> None:
        argv, env = self.command(r.replica_id, m)
        try:
            pid, log_path = self.launcher.launch(r.replica_id, argv, env)
        except Exception as exc:
            self._fail(r, f"launch failed: {exc}", now)
            return
        r.digest = m.launch_digest()
        r.pid, r.host, r.log_path = pid, self.launcher.host, log_path
        r.state = "starting"
        r.started_at = now
        r.last_healthy_at = now
        r.next_launch_at = 0.0
        self.next_check[r.replica_id] = 0.0

    def _fail(self, r: ReplicaState, reason: str, now: float) -> None:
        self.kill_reasons.pop(r.replica_id, None)
        self.hooks.replica_gone(r)
        if r.ready_at and now - r.ready_at >= BACKOFF_RESET:
            r.consecutive_failures = 0
        r.consecutive_failures += 1
        r.restarts += 1
        delay = backoff_delay(r.consecutive_failures)
        log.warning("replica_failed", replica_id=r.replica_id, model=r.model, pid=r.pid, reason=reason,
                    restarts=r.restarts, relaunch_in=delay)
        r.last_failure = reason
        r.state = "pending"
        r.pid = 0
        r.instance_id = ""
        r.ready_at = 0.0
        r.next_launch_at = now + delay
        self.next_check.pop(r.replica_id, None)

    def _drain(self, r: ReplicaState, reason: str, now: float) -> None:
        if r.state == "pending" or r.pid == 0:
            log.info("replica_removed", replica_id=r.replica_id, model=r.model, reason=reason)
            self._forget(r)
            return
        self.launcher.signal(r.pid, signal.SIGTERM)  # first: if it raises, the drain is retried
        log.info("replica_draining", replica_id=r.replica_id, model=r.model, pid=r.pid, reason=reason)
        r.state = "draining"
        r.drain_started_at = now

    def _forget(self, r: ReplicaState) -> None:
        self.replicas.pop(r.replica_id, None)
        self.hooks.replica_gone(r)

    def _adopt(self, r: ReplicaState, pid: int, orphan: bool, now: float) -> None:
        if orphan:
            log.info("replica_orphan_found", replica_id=r.replica_id, pid=pid)
            r.pid, r.host = pid, self.launcher.host
            if r.state == "pending":
                r.state, r.started_at, r.last_healthy_at = "starting", now, now
        r.last_healthy_at = now  # its health clock restarts with us
        self.next_check[r.replica_id] = 0.0
        log.info("replica_adopted", replica_id=r.replica_id, model=r.model, pid=r.pid, state=r.state)
        if r.state == "draining" and not r.drain_started_at:
            r.drain_started_at = now

    def _healthy(self, r: ReplicaState, now: float) -> None:
        if r.state != "ready":
            log.info("replica_ready", replica_id=r.replica_id, model=r.model, pid=r.pid,
                     instance_id=r.instance_id, after=round(now - r.started_at, 2))
            if r.state == "starting":
                r.ready_at = now
        r.state = "ready"
        r.last_healthy_at = now
        if not r.ready_at:
            r.ready_at = now
        if r.ready_at and now - r.ready_at >= BACKOFF_RESET:
            r.consecutive_failures = 0

    # -- stopping -----------------------------------------------------------------
    async def stop_all(self, now: float, timeout: float) -> int:
        """Drain every replica with a process, SIGKILL what still runs after
        ``timeout``, and forget them all. Returns how many there were."""
        live = [r for r in self.replicas.values() if r.state in LIVE and r.pid]
        self._held.clear()  # stopping: every replica gets its drain
        self.apply([Drain(r.replica_id, "controller stopping") for r in live if r.state != "draining"], now)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(self.launcher.alive(r.replica_id, r.pid) for r in live):
            await asyncio.sleep(0.1)
        for r in live:
            if self.launcher.alive(r.replica_id, r.pid):
                self.launcher.signal(r.pid, signal.SIGKILL)
        self.replicas.clear()
        self.autoscalers.clear()
        return len(live)
