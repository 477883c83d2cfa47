"""The controller's reconcile passes without processes, etcd or NATS
(``controller_harness``: a fake launcher, hooks and clock)."""

from __future__ import annotations

import logging
import signal

import pytest

from dynrt.controller.reconcile import (
    Adopt,
    Create,
    Drain,
    Fail,
    Forget,
    Retarget,
    plan_probe_result,
    plan_recovery,
    plan_scale,
    rollout_finished,
)
from dynrt.controller.records import AutoscalerState, ReplicaState, SpecRecord
from dynrt.controller.spec import DeploymentSpec
from dynrt.runtime.protocol import LoadReport
from tests.unit.controller_harness import HOST, Harness, events, model


@pytest.fixture(autouse=True)
def _capture(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dynrt")


# -- start, kill, crash loop ---------------------------------------------------------


def test_new_slots_launch_once_stored_then_become_ready() -> None:
    h = Harness(model(replicas=2))
    h.tick()
    assert [r.state for r in h.replicas()] == ["pending", "pending"] and h.launcher.launched == []
    h.tick()  # stored by now: launched
    assert [r.state for r in h.replicas()] == ["starting", "starting"]
    rid, argv, _ = h.launcher.launched[0]
    assert argv[:3] == ["worker", "--replica-id", rid] and "--served-model-name" in argv
    h.tick()
    assert len(h.hooks.probes) == 2  # a new replica is probed at once
    h.answer_probes()
    assert [r.state for r in h.replicas()] == ["ready", "ready"]


def test_killed_replica_is_relaunched_in_the_same_pass(caplog: pytest.LogCaptureFixture) -> None:
    h = Harness(model(replicas=2))
    victim, other = h.ready(2)
    old_pid = victim.pid
    h.launcher.exit(old_pid, -9)
    h.tick()
    assert victim.state == "starting" and victim.pid != old_pid
    assert (victim.restarts, victim.last_failure) == (1, "process exited (code -9)")
    assert (other.pid, other.restarts, other.state) == (other.pid, 0, "ready")
    assert (victim.replica_id, old_pid) in h.hooks.gone  # its instance record goes at once
    [failed] = events(caplog, "replica_failed")
    assert (failed["replica_id"], failed["relaunch_in"]) == (victim.replica_id, 0.0)


def test_crash_loop_backs_off_exponentially_and_resets_after_30s_healthy() -> None:
    h = Harness(model(replicas=1))
    [r] = h.ready(1)
    delays = []
    for _ in range(5):
        h.launcher.exit(r.pid, 1)
        h.tick()
        delays.append(round(r.next_launch_at - h.clock.now, 3) if r.state == "pending" else 0.0)
        while r.state == "pending":
            assert h.clock.now < r.next_launch_at  # never before its time
            h.tick()
        assert r.state == "starting"
    assert delays == [0.0, 1.0, 2.0, 4.0, 8.0]
    assert (r.restarts, r.consecutive_failures) == (5, 5)
    h.tick()
    h.answer_probes()
    assert r.state == "ready" and r.consecutive_failures == 5
    h.clock.advance(30)
    h.tick()
    h.answer_probes()
    assert r.consecutive_failures == 0  # healthy 30 s: the backoff starts over
    h.launcher.exit(r.pid, 1)
    h.tick()
    assert r.state == "starting" and r.restarts == 6


def test_probe_failures_kill_after_timeout_and_startup_timeout() -> None:
    h = Harness(model(replicas=1, startup_timeout=5))
    h.tick()
    h.tick()
    [r] = h.replicas()
    assert r.state == "starting"
    for _ in range(3):  # failing while starting: nothing until startup_timeout
        h.tick(1.0)
        h.answer_probes(healthy=False, why="not registered")
    assert h.launcher.signals == []
    h.tick(3.0)
    h.answer_probes(healthy=False, why="not registered")
    assert h.launcher.signals == [(r.pid, signal.SIGKILL)]
    h.launcher.exit(r.pid, -9)
    h.tick()
    assert r.last_failure == "startup timeout (5.0s): not registered" and r.state == "starting"
    h.tick()
    h.answer_probes()
    assert r.state == "ready"
    # ready → unhealthy at the first failed check; SIGKILL once failing for `timeout` (4 s)
    h.tick(1.0)
    h.answer_probes(healthy=False, why="ping: PingTimeoutError")
    assert r.state == "unhealthy" and len(h.launcher.signals) == 1
    for _ in range(4):
        h.tick(1.0)
        h.answer_probes(healthy=False, why="ping: PingTimeoutError")
    assert h.launcher.signals[1:] == [(r.pid, signal.SIGKILL)]
    h.launcher.exit(r.pid, -9)
    h.tick()
    assert r.last_failure == "health check failing for 4.0s: ping: PingTimeoutError"


def test_a_stalled_probe_or_a_replaced_replica_does_not_count() -> None:
    m = model(replicas=1)
    r = ReplicaState(replica_id="m-1", model="m", digest="d", state="ready", pid=5, last_healthy_at=0.0)
    assert plan_probe_result(r, m, False, "x", took=m.health_check.period + 3.5, now=100.0) == []
    assert plan_probe_result(r, m, False, "x", took=0.1, now=100.0) != []
    h = Harness(m)
    [ready] = h.ready(1)
    h.tick(1.0)
    assert [r for r, _, _ in h.hooks.probes] == [ready]
    h.launcher.exit(ready.pid, -9)
    h.tick()  # relaunched while the probe was in flight
    h.answer_probes(healthy=False)
    assert ready.state == "starting" and h.launcher.signals == []


# -- scaling and rolling update ------------------------------------------------------


def test_scale_down_drains_the_least_loaded_first() -> None:
    h = Harness(model(replicas=3))
    a, b, c = h.ready(3)
    a.instance_id, b.instance_id, c.instance_id = "ia", "ib", "ic"
    h.loads = {"ia": LoadReport(running=5), "ib": LoadReport(running=1), "ic": LoadReport(waiting=9)}
    h.spec = DeploymentSpec(models=[model(replicas=1)])
    h.tick()
    assert [r.state for r in (a, b, c)] == ["draining", "draining", "ready"]
    assert h.launcher.signals == [(b.pid, signal.SIGTERM), (a.pid, signal.SIGTERM)]
    # the drained processes exit: their slots are gone
    h.launcher.exit(a.pid, 0)
    h.launcher.exit(b.pid, 0)
    h.tick()
    assert h.replicas() == [c]


def test_drain_overdue_is_killed() -> None:
    h = Harness(model(replicas=1))
    [r] = h.ready(1)
    h.spec = DeploymentSpec(models=[model(replicas=0, min_replicas=0)])
    h.tick()
    assert r.state == "draining"
    h.tick(10 + 20 - 0.5)
    assert h.launcher.signals == [(r.pid, signal.SIGTERM)]
    h.tick(1.0)
    assert h.launcher.signals[-1] == (r.pid, signal.SIGKILL)


def test_model_removed_from_spec_is_drained(caplog: pytest.LogCaptureFixture) -> None:
    h = Harness(model(replicas=1), model(name="other", replicas=1))
    h.ready(2)
    [o] = h.replicas("other")
    h.spec = DeploymentSpec(models=[model(replicas=1)])
    h.tick()
    assert o.state == "draining"
    assert [e["reason"] for e in events(caplog, "replica_draining")] == ["model removed from spec"]


def test_plan_scale_rolling_update_surges_one_then_drains_one() -> None:
    old = model(replicas=2)
    new = model(replicas=2, args={"max-num-seqs": 128})
    a = ReplicaState(replica_id="a", model="m", digest=old.launch_digest(), state="ready", pid=1, instance_id="ia")
    b = ReplicaState(replica_id="b", model="m", digest=old.launch_digest(), state="ready", pid=2, instance_id="ib")
    assert plan_scale(new, 2, [a, b], {}) == [Create(new)]  # surge one; drain nothing yet
    s1 = ReplicaState(replica_id="s1", model="m", digest=new.launch_digest(), state="starting", pid=3)
    assert plan_scale(new, 2, [a, b, s1], {}) == []  # wait until it is ready
    s1.state = "ready"
    loads = {"ia": LoadReport(running=3)}
    assert plan_scale(new, 2, [a, b, s1], loads) == [Create(new), Drain("b", "rolling update")]  # least loaded
    pending = ReplicaState(replica_id="p", model="m", digest=old.launch_digest())
    assert plan_scale(new, 1, [pending], {}) == [Retarget("p", new.launch_digest())]  # nothing runs: no rollout


def test_rolling_update_order_end_to_end(caplog: pytest.LogCaptureFixture) -> None:
    h = Harness(model(replicas=2))
    old = h.ready(2)
    caplog.clear()
    h.spec = DeploymentSpec(models=[model(replicas=2, args={"max-num-seqs": 128})])
    for _ in range(30):
        h.tick()
        h.answer_probes()
        for r in list(h.state.replicas.values()):
            if r.state == "draining" and r.pid in h.launcher.running:
                h.launcher.exit(r.pid, 0)
        if not any(r.replica_id in h.state.replicas for r in old) and \
                all(r.state == "ready" for r in h.state.replicas.values()):
            break
    lines = [(e["_event"], e["replica_id"]) for r in caplog.records
             if (e := getattr(r, "dynrt_fields", {})).get("_event") in ("replica_ready", "replica_draining")]
    assert [kind for kind, _ in lines] == ["replica_ready", "replica_draining", "replica_ready", "replica_draining"]
    assert sorted(rid for kind, rid in lines if kind == "replica_draining") == sorted(r.replica_id for r in old)
    new = h.replicas()
    assert len(new) == 2 and {r.digest for r in new} == {h.spec.models[0].launch_digest()}


# -- a new leader --------------------------------------------------------------------


def test_recovery_adopts_live_pids_finds_orphans_and_relaunches_the_dead(caplog: pytest.LogCaptureFixture) -> None:
    h = Harness(model(replicas=3))
    alive = ReplicaState(replica_id="m-alive", model="m", digest="d", state="ready", pid=11, host=HOST)
    dead = ReplicaState(replica_id="m-dead", model="m", digest="d", state="ready", pid=12, host=HOST, restarts=2)
    orphan = ReplicaState(replica_id="m-orphan", model="m", digest="d", state="pending")
    gone_draining = ReplicaState(replica_id="m-drain", model="m", digest="d", state="draining", pid=14, host=HOST)
    other_host = ReplicaState(replica_id="m-moved", model="m", digest="d", state="ready", pid=15, host="elsewhere")
    h.launcher.running = {11: "m-alive", 13: "m-orphan", 16: "m-moved"}
    adopted, relaunching = h.state.recover([alive, dead, orphan, gone_draining, other_host], [], h.clock.now)
    assert (adopted, relaunching) == (3, 1)
    assert (alive.pid, alive.state) == (11, "ready")
    assert (orphan.pid, orphan.state, orphan.host) == (13, "starting", HOST)
    assert (other_host.pid, other_host.host) == (16, HOST)
    assert (dead.state, dead.restarts, dead.last_failure) == ("pending", 3, "gone while the controller was down")
    assert "m-drain" not in h.state.replicas
    assert h.launcher.launched == []  # nothing launched by recovery itself
    assert {e["replica_id"] for e in events(caplog, "replica_orphan_found")} == {"m-orphan", "m-moved"}


def test_plan_recovery() -> None:
    pending = ReplicaState(replica_id="p", model="m", digest="d")
    live = ReplicaState(replica_id="l", model="m", digest="d", state="starting", pid=3)
    draining = ReplicaState(replica_id="d", model="m", digest="d", state="draining", pid=4)
    assert plan_recovery([pending, live, draining], {}) == [Fail("l", "gone while the controller was down"),
                                                             Forget("d")]
    assert plan_recovery([pending, live], {"p": (7, True), "l": (3, False)}) == [Adopt("p", 7, True),
                                                                               Adopt("l", 3, False)]


# -- one bad action ------------------------------------------------------------------


def test_one_failing_action_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    h = Harness(model(replicas=3))
    a, b, c = h.ready(3)
    h.launcher.fail_signal[a.pid] = RuntimeError("EPERM, say")
    h.spec = DeploymentSpec(models=[model(replicas=0, min_replicas=0)])
    h.tick()
    assert (a.state, b.state, c.state) == ("ready", "draining", "draining")
    [failed] = events(caplog, "controller_action_failed")
    assert (failed["replica_id"], failed["action"], failed["retry_in"]) == (a.replica_id, "Drain", 1.0)
    h.tick(0.25)  # held back: not retried at once
    assert len(events(caplog, "controller_action_failed")) == 1
    h.tick(1.0)  # retried after its backoff, fails again, held longer
    assert [e["retry_in"] for e in events(caplog, "controller_action_failed")] == [1.0, 2.0]
    del h.launcher.fail_signal[a.pid]
    h.tick(2.0)
    assert a.state == "draining"


def test_a_launch_that_raises_is_a_replica_failure_with_backoff() -> None:
    h = Harness(model(replicas=2))
    h.tick()
    bad, good = h.replicas()
    h.launcher.fail_launch[bad.replica_id] = ValueError("bad env")
    h.tick()
    assert good.state == "starting"
    assert (bad.state, bad.last_failure, bad.restarts) == ("pending", "launch failed: bad env", 1)
    h.tick()
    assert bad.restarts == 2 and bad.next_launch_at - h.clock.now == 1.0  # backing off, not looping


def test_a_probe_that_cannot_start_does_not_stop_the_others() -> None:
    h = Harness(model(replicas=2))
    h.tick()
    bad, good = h.replicas()
    h.hooks.fail_probe_of.add(bad.replica_id)
    h.tick()
    h.tick()
    assert [r.replica_id for r, _, _ in h.hooks.probes] == [good.replica_id]
    h.hooks.fail_probe_of.clear()
    h.tick(1.0)  # not stuck "in flight": probed once its hold has passed
    assert bad.replica_id in [r.replica_id for r, _, _ in h.hooks.probes]


# -- apply --wait --------------------------------------------------------------------


def test_rollout_finished() -> None:
    m = model(replicas=2)
    record = SpecRecord(spec=DeploymentSpec(models=[m]), generation=2)
    ready = [ReplicaState(replica_id=f"r{i}", model="m", digest=m.launch_digest(), state="ready") for i in range(2)]
    assert rollout_finished(record, 2, ready, [])
    assert not rollout_finished(record, 3, ready, [])
    assert not rollout_finished(record, 2, ready[:1], [])
    assert not rollout_finished(record, 2, [*ready, ReplicaState(replica_id="x", model="gone", digest="")], [])
    scaled = SpecRecord(spec=DeploymentSpec(models=[model(replicas=1, max_replicas=3, autoscaling={})]), generation=2)
    scaled_ready = [ReplicaState(replica_id=f"r{i}", model="m", digest=scaled.spec.models[0].launch_digest(),
                                 state="ready") for i in range(2)]
    assert rollout_finished(scaled, 2, scaled_ready, [AutoscalerState(model="m", target_replicas=2)])
    assert not rollout_finished(scaled, 2, scaled_ready, [])
