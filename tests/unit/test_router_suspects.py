"""Suspect instances (load reports stopped: a hung worker) on constructed router states:
out of routing while silent, back when reports resume, never before a first report,
never when the router itself stopped hearing from everyone."""

from __future__ import annotations

from dynrt.router.policies import Choice, NoInstance, Router
from dynrt.router.state import RouterState
from dynrt.runtime.protocol import LoadReport
from tests.unit.test_router_policy import MODEL, Clock, make_state

HEARTBEAT = 0.1


def beat(state: RouterState, *ids: str, heartbeat: float = HEARTBEAT) -> None:
    for iid in ids:
        state.on_load(LoadReport(instance_id=iid, model=MODEL, kv_blocks_total=1000, heartbeat=heartbeat))


def run(state: RouterState, clock: Clock, seconds: float, reporting: str, step: float = HEARTBEAT) -> None:
    """``seconds`` pass; the instances in ``reporting`` report every ``step``."""
    end = clock.now + seconds
    while clock.now + step <= end + 1e-9:
        clock.now += step
        beat(state, *reporting)
    clock.now = end


def chosen(state: RouterState, n: int = 40) -> set[str]:
    router = Router(state, "round-robin")
    picks = set()
    for _ in range(n):
        outcome = router.choose(MODEL, [1, 2, 3, 4])
        assert isinstance(outcome, Choice)
        picks.add(outcome.instance_id)
    return picks


def test_silent_instance_is_suspect_and_not_chosen() -> None:
    state, clock = make_state("abc")
    beat(state, "a", "b", "c")
    run(state, clock, 0.25, "ab")
    assert state.suspects() == []  # 0.25 s < suspect_after (0.3 s)
    run(state, clock, 0.1, "ab")
    assert state.suspects() == ["c"]
    assert chosen(state) == {"a", "b"}


def test_suspect_is_back_with_its_next_report() -> None:
    state, clock = make_state("abc")
    beat(state, "a", "b", "c")
    run(state, clock, 1.0, "ab")
    assert state.is_suspect("c")
    beat(state, "c")  # SIGCONT: its loop runs again
    assert not state.is_suspect("c")
    assert chosen(state) == {"a", "b", "c"}


def test_no_instance_is_suspect_before_its_first_report() -> None:
    state, clock = make_state("abc")
    run(state, clock, 5.0, "ab")
    assert state.suspects() == []
    assert chosen(state) == {"a", "b", "c"}


def test_worker_without_heartbeat_is_never_suspect() -> None:
    state, clock = make_state("abc")
    beat(state, "c", heartbeat=0.0)  # an older worker: reports only when its load changes
    run(state, clock, 5.0, "ab")
    assert not state.is_suspect("c")


def test_everyone_silent_is_the_observer_not_the_workers() -> None:
    """The router's own loop stalled (or NATS is down): every instance went quiet at once
    and none is singled out, however long the silence."""
    state, clock = make_state("abc")
    beat(state, "a", "b", "c")
    clock.now += 3.0
    assert state.suspects() == []
    beat(state, "a")  # the first queued report is processed: the others' are right behind it
    assert state.suspects() == []


def test_threshold_is_at_least_three_heartbeats() -> None:
    state, clock = make_state("ab")
    beat(state, "a", "b", heartbeat=0.2)
    run(state, clock, 0.5, "a")  # 0.5 s silent > suspect_after 0.3 but < 3 x 0.2 s
    assert not state.is_suspect("b")
    run(state, clock, 0.2, "a")
    assert state.is_suspect("b")


def test_suspect_after_zero_disables() -> None:
    clock = Clock()
    state = RouterState(clock=clock, suspect_after=0)
    base, _ = make_state("ab")
    for rec in base.instances(MODEL):
        state.add_instance(rec)
    beat(state, "a", "b")
    run(state, clock, 5.0, "a")
    assert state.suspects() == []


def test_only_suspects_left_is_no_instance_for_new_requests() -> None:
    state, clock = make_state("ab")
    beat(state, "a", "b")
    run(state, clock, 1.0, "a")
    router = Router(state, "kv")
    outcome = router.choose(MODEL, [1, 2, 3, 4], exclude={"a"})
    assert isinstance(outcome, NoInstance) and outcome.reason == "all_excluded"


def test_removed_instance_forgets_its_reports() -> None:
    state, clock = make_state("ab")
    beat(state, "a", "b")
    run(state, clock, 1.0, "a")
    assert state.is_suspect("b")
    record = next(r for r in state.instances(MODEL) if r.instance_id == "b")
    state.remove_instance("b")
    state.add_instance(record)  # a worker re-registering: a first report again before suspicion
    assert not state.is_suspect("b")


def test_after_a_pool_wide_silence_suspicion_restarts_from_the_first_report() -> None:
    state, clock = make_state("abc")
    beat(state, "a", "b", "c")
    clock.now += 3.0
    beat(state, "a")
    run(state, clock, 0.2, "abc")
    assert state.suspects() == []
    run(state, clock, 0.4, "ab")  # c really is silent now
    assert state.suspects() == ["c"]


IDLE_HEARTBEAT = 1.0


def test_idle_heartbeat_stretches_silence_but_a_request_sent_there_does_not_wait_for_it() -> None:
    """An idle worker reports every second (and says so): silent 2 s it is not suspect.
    Sent a request, a live worker reports at once (its received count changed); no report
    for suspect_after after the request while the others keep reporting: suspect."""
    state, clock = make_state("abc", sender_id="fe")
    beat(state, "a", "b", "c", heartbeat=IDLE_HEARTBEAT)
    run(state, clock, 2.0, "ab")
    assert state.suspects() == []
    state.on_assigned("c", "req-1", prompt_blocks=4)
    run(state, clock, 0.2, "ab")
    assert not state.is_suspect("c")  # 0.2 s < suspect_after
    run(state, clock, 0.2, "ab")
    assert state.suspects() == ["c"]
    state.on_load(LoadReport(instance_id="c", model=MODEL, kv_blocks_total=1000, heartbeat=HEARTBEAT,
                             received={"fe": 1}))
    assert not state.is_suspect("c")


def test_an_acknowledged_request_leaves_an_idle_worker_unsuspected() -> None:
    state, clock = make_state("ab", sender_id="fe")
    beat(state, "a", "b", heartbeat=IDLE_HEARTBEAT)
    state.on_assigned("b", "req-1", prompt_blocks=4)
    clock.now += 0.05
    state.on_load(LoadReport(instance_id="b", model=MODEL, kv_blocks_total=1000, heartbeat=IDLE_HEARTBEAT,
                             received={"fe": 1}))  # served already, idle again
    run(state, clock, 2.0, "a")
    assert not state.is_suspect("b")


def test_a_request_sent_while_everyone_is_silent_is_the_observer_again() -> None:
    state, clock = make_state("ab", sender_id="fe")
    beat(state, "a", "b", heartbeat=IDLE_HEARTBEAT)
    state.on_assigned("b", "req-1", prompt_blocks=4)
    clock.now += 1.0  # nobody heard since the request: this router's loop or NATS stalled
    assert state.suspects() == []
