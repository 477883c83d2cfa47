"""Router state, policies, KV cost, pending assignments and load shedding on constructed states."""

from __future__ import annotations

import random
from collections import Counter

import msgspec
import pytest

from dynrt.router.cost import BusyThresholds, BusyThresholdSettings, InstanceLoad
from dynrt.router.policies import Busy, Choice, NoInstance, Router
from dynrt.router.state import RouterState
from dynrt.runtime.block_hash import block_hashes
from dynrt.runtime.protocol import (
    CachedBlocks,
    InstanceRecord,
    KvBlockRemoved,
    KvBlockStored,
    KvEvent,
    KvEventBatch,
    LoadReport,
    TokenizerSpec,
)

BS = 4
MODEL = "m"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(iid: str, *, model: str = MODEL, kv_blocks_total: int = 1000, max_num_seqs: int = 64) -> InstanceRecord:
    return InstanceRecord(
        instance_id=iid,
        namespace="ns",
        component="backend",
        endpoint="generate",
        model=model,
        subject=f"dynrt.ns.backend.generate.{iid}",
        engine="mock",
        block_size=BS,
        kv_blocks_total=kv_blocks_total,
        context_length=8192,
        max_num_seqs=max_num_seqs,
        tokenizer=TokenizerSpec(),
    )


def make_state(ids: str = "abcd", thresholds: BusyThresholds | None = None, sender_id: str | None = None,
               **kw: int) -> tuple[RouterState, Clock]:
    """Instances in sync with empty caches and no load reports yet."""
    clock = Clock()
    state = RouterState(thresholds=thresholds, clock=clock, sender_id=sender_id)
    for iid in ids:
        assert state.add_instance(record(iid, **kw))
        assert not state.on_resync(CachedBlocks(instance_id=iid, block_hashes=[], last_event_id=0))
    return state, clock


def chose(state: RouterState, iid: str, **fields: float) -> Choice:
    """The ``Choice`` of instance ``iid`` (with its record as the state holds it)."""
    return Choice(record=next(r for r in state.instances(MODEL) if r.instance_id == iid), **fields)  # type: ignore[arg-type]


def store(state: RouterState, iid: str, tokens: list[int]) -> None:
    """The worker caches the full blocks of ``tokens``."""
    last = state.index._instances[iid].last_event_id
    event = KvEvent(event_id=last + 1, data=KvBlockStored(block_hashes=block_hashes(tokens, BS)))
    assert not state.on_kv_events(KvEventBatch(instance_id=iid, model=MODEL, events=[event]))


def load(state: RouterState, iid: str, used: int = 0, running: int = 0, waiting: int = 0, total: int = 1000,
         received: dict[str, int] | None = None, prefill: int = 0) -> None:
    state.on_load(
        LoadReport(instance_id=iid, model=MODEL, kv_blocks_used=used, kv_blocks_total=total, running=running,
                   waiting=waiting, received=received, active_prefill_tokens=prefill)
    )


SYSTEM = list(range(1000, 1064))  # 16 blocks


def prompt(k: int, suffix_tokens: int = 16) -> list[int]:
    """The shared system prompt + a user turn of its own (``suffix_tokens`` long)."""
    return SYSTEM + [50_000 + k] * suffix_tokens


# -- KV policy: prefix vs load ----------------------------------------------


def test_prefix_cached_on_b_goes_to_b() -> None:
    state, _ = make_state()
    store(state, "b", prompt(1))
    for iid in "abcd":
        load(state, iid, used=100)
    choice = Router(state, rng=random.Random(0)).choose(MODEL, prompt(1))
    assert choice == chose(state, "b", overlap_blocks=20, prompt_blocks=20, cost=100.0)


def test_eviction_on_b_is_reflected() -> None:
    state, _ = make_state("ab")
    store(state, "b", prompt(1))
    load(state, "a", used=10)
    load(state, "b", used=20)
    router = Router(state, rng=random.Random(0))
    assert router.choose(MODEL, prompt(1)).instance_id == "b"  # 0 + 20 < 20 + 10
    evict = KvEvent(event_id=2, data=KvBlockRemoved(block_hashes=block_hashes(prompt(1), BS)[2:]))
    state.on_kv_events(KvEventBatch(instance_id="b", model=MODEL, events=[evict]))
    choice = router.choose(MODEL, prompt(1))
    assert choice == chose(state, "a", overlap_blocks=0, prompt_blocks=20, cost=30.0)  # b: 18 + 20


def test_gap_needs_resync_and_resync_fixes_routing() -> None:
    state, _ = make_state("ab")
    load(state, "a", used=5)
    router = Router(state, rng=random.Random(0))
    hashes = block_hashes(prompt(1), BS)
    gap = KvEventBatch(instance_id="b", model=MODEL, events=[KvEvent(event_id=3, data=KvBlockStored(block_hashes=hashes))])
    assert state.on_kv_events(gap) is True  # ask b for a dump
    assert router.choose(MODEL, prompt(1)).instance_id == "b"  # b idle, its blocks not trusted: 20 < 25
    load(state, "b", used=10)
    assert router.choose(MODEL, prompt(1)).instance_id == "a"  # 25 < 30
    later = KvEventBatch(instance_id="b", model=MODEL, events=[KvEvent(event_id=4, data=KvBlockStored(block_hashes=[7]))])
    assert state.on_kv_events(later) is False  # dump already asked for
    assert state.on_resync(CachedBlocks(instance_id="b", block_hashes=hashes, last_event_id=3)) is False
    assert router.choose(MODEL, prompt(1)) == chose(state, "b", overlap_blocks=20, prompt_blocks=20, cost=10.0)


def test_removed_instance_is_never_chosen_and_its_entries_are_dropped() -> None:
    state, _ = make_state("ab")
    store(state, "b", prompt(1))
    state.remove_instance("b")
    assert state.index.overlaps(block_hashes(prompt(1), BS)) == {}
    router = Router(state, rng=random.Random(0))
    assert {router.choose(MODEL, prompt(k)).instance_id for k in range(20)} == {"a"}
    # Events and dumps of a removed instance are ignored.
    assert not state.on_resync(CachedBlocks(instance_id="b", block_hashes=[1], last_event_id=9))
    assert len(state.index) == 0


def test_shared_system_prompt_does_not_pin_a_busier_worker() -> None:
    """a holds the 16-block system prompt; b holds nothing. With prefill_weight 1, a's
    advantage is worth 16 blocks of load: within it a wins, beyond it b wins."""
    state, _ = make_state("ab")
    store(state, "a", SYSTEM)
    router = Router(state, rng=random.Random(0))
    load(state, "a", used=115)
    load(state, "b", used=100)
    assert router.choose(MODEL, prompt(1)).instance_id == "a"  # 4 + 115 < 20 + 100
    load(state, "a", used=117)
    assert router.choose(MODEL, prompt(1)) == chose(state, "b", overlap_blocks=0, prompt_blocks=20, cost=120.0)


def test_shared_system_prompt_traffic_spreads_as_workers_cache_it() -> None:
    """16 conversations sharing a system prompt, no load report in between: each worker
    that serves one caches the prompt, pending assignments keep the load visible."""
    state, _ = make_state()
    router = Router(state, rng=random.Random(1))
    counts: Counter[str] = Counter()
    for k in range(16):
        choice = router.route(MODEL, prompt(k), f"r{k}")
        assert isinstance(choice, Choice)
        counts[choice.instance_id] += 1
        store(state, choice.instance_id, prompt(k))
    # Once every worker has the prompt, they are symmetric: 4 each.
    assert counts == {"a": 4, "b": 4, "c": 4, "d": 4}


def test_burst_of_32_identical_prefix_requests_spreads_by_load() -> None:
    """a caches the 8-block prefix of 16-block prompts. Each assignment adds its new KV
    blocks (uncached + 1 decode block: 9 on a, 17 elsewhere) + its uncached prefill (8 on
    a, 16 elsewhere) to the chosen instance's cost: a's cost is 8 + 17·n_a, the others'
    16 + 33·n. Greedy argmin keeps every cost within one increment of the others, which
    gives exactly a = 13 and 6/6/7 (final costs 229 vs 214/214/247), whatever order ties
    are broken in."""
    prefix = list(range(2000, 2032))
    for seed in range(3):
        state, _ = make_state()
        store(state, "a", prefix)
        router = Router(state, rng=random.Random(seed))
        counts: Counter[str] = Counter()
        for k in range(32):
            choice = router.route(MODEL, prefix + [k] * 32, f"r{k}")
            assert isinstance(choice, Choice)
            counts[choice.instance_id] += 1
        assert counts["a"] == 13
        assert sorted(counts[i] for i in "bcd") == [6, 6, 7]


def test_fully_cached_burst_wins_only_up_to_the_prefix_worth() -> None:
    """a holds all 20 blocks of the prompt: an assignment there adds no prefill and one
    KV block (the decode block), elsewhere 20 + 21. a's cost is n_a against 20 on an
    idle b: a wins up to n_a = 20 (the tie at 20 goes either way), then b takes one and
    costs 20 + 41 = 61: of 24 requests a gets 23 and b 1, in either order."""
    for seed in range(4):
        state, _ = make_state("ab")
        store(state, "a", prompt(1))
        router = Router(state, rng=random.Random(seed))
        counts = Counter(router.route(MODEL, prompt(1), f"r{k}").instance_id for k in range(24))  # type: ignore[union-attr]
        assert counts == {"a": 23, "b": 1}
        a, _ = state.candidates(MODEL)
        assert (a.load.blocks_used, a.load.prefill_blocks) == (counts["a"], 0)


def test_burst_without_cached_prefix_is_spread_evenly() -> None:
    state, _ = make_state()
    router = Router(state, rng=random.Random(3))
    counts = Counter(router.route(MODEL, prompt(0), f"r{k}").instance_id for k in range(32))  # type: ignore[union-attr]
    assert counts == {"a": 8, "b": 8, "c": 8, "d": 8}


def test_temperature_samples_mostly_the_cheapest() -> None:
    state, _ = make_state("ab")
    store(state, "b", prompt(1))
    router = Router(state, temperature=0.5, rng=random.Random(7))
    counts = Counter(router.choose(MODEL, prompt(1)).instance_id for _ in range(2000))  # type: ignore[union-attr]
    # Costs 20 vs 0, normalised spread 1: P(a) = e^-2 / (1 + e^-2) ≈ 0.12.
    assert 150 < counts["a"] < 330 and counts["a"] + counts["b"] == 2000
    with pytest.raises(ValueError):
        Router(state, temperature=-1)


# -- pending assignments ------------------------------------------------------


def pending(state: RouterState, iid: str = "a") -> tuple[int, float, int]:
    """(pending requests, their prefill blocks, their KV blocks) as the router projects them."""
    p = state._pending[iid]
    return p.count, p.prefill_blocks, p.kv_blocks


def test_load_report_acknowledges_exactly_the_assignments_it_counts() -> None:
    state, clock = make_state("ab", sender_id="fe")
    # A burst between two reports: every assignment counts, whatever the timing.
    for k in range(5):
        state.on_assigned("a", f"r{k + 1}", prompt_blocks=10 + k)  # 10+k uncached + 1 decode block each
    state.on_assigned("b", "rb1", prompt_blocks=4)
    assert pending(state) == (5, 60, 65)
    a, b = state.candidates(MODEL)
    assert (a.load.blocks_used, a.load.running, b.load.blocks_used) == (65, 5, 5)
    # A report long after, counting only other senders' requests, absorbs nothing.
    clock.now += 2.0
    load(state, "a", used=100, running=2, received={"other": 9})
    assert pending(state) == (5, 60, 65)
    # "3 received from fe": exactly r1..r3 (sequence numbers 1..3) stop counting.
    load(state, "a", used=140, running=5, received={"fe": 3, "other": 9})
    assert pending(state) == (2, 13 + 14, 13 + 14 + 2)
    (a, _) = state.candidates(MODEL)
    assert (a.load.blocks_used, a.load.running) == (140 + 29, 5 + 2)
    # The same count again changes nothing; b's count does not touch a.
    load(state, "a", used=140, running=5, received={"fe": 3})
    load(state, "b", used=5, running=1, received={"fe": 1})
    assert pending(state) == (2, 27, 29) and pending(state, "b") == (0, 0, 0)
    load(state, "a", used=170, running=7, received={"fe": 5})
    assert pending(state) == (0, 0, 0)
    (a, _) = state.candidates(MODEL)
    assert (a.load.blocks_used, a.load.running) == (170, 7)


def test_completed_assignment_keeps_its_number_until_acknowledged() -> None:
    state, _ = make_state("a", sender_id="fe")
    for k in range(3):
        state.on_assigned("a", f"r{k + 1}", prompt_blocks=10)
    state.on_completed("a", "r1")  # finished before any report: its load goes at once
    assert pending(state) == (2, 20, 22)
    load(state, "a", received={"fe": 1})  # covers r1 (number 1), not r2
    assert pending(state) == (2, 20, 22)
    load(state, "a", received={"fe": 2})
    assert pending(state) == (1, 10, 11)
    state.on_completed("a", "r2")  # already acknowledged: no-op
    assert pending(state) == (1, 10, 11)


def test_unacknowledged_assignment_expires_and_counts_stay_aligned() -> None:
    state, clock = make_state("a", sender_id="fe")  # ack_timeout 5 s
    state.on_assigned("a", "lost", prompt_blocks=10)  # never reaches the worker
    clock.now += 1.0
    state.on_assigned("a", "r2", prompt_blocks=20)
    load(state, "a", received={"fe": 1})  # r2 arrived: the oldest one is dropped by count
    assert pending(state) == (1, 20, 21)
    clock.now += 4.9
    load(state, "a", received={"fe": 1})
    assert pending(state) == (1, 20, 21)  # 4.9 s old: not yet given up
    clock.now += 0.1
    load(state, "a", received={"fe": 1})  # 5 s old and not covered: lost
    assert pending(state) == (0, 0, 0) and state._pending["a"].offset == 1
    # Numbering carries on: r3 is number 3, which the worker counts as its 2nd.
    state.on_assigned("a", "r3", prompt_blocks=30)
    load(state, "a", received={"fe": 1})
    assert pending(state) == (1, 30, 31)
    load(state, "a", received={"fe": 2})
    assert pending(state) == (0, 0, 0)
    # The "lost" one turns up after all: a count above what was sent shrinks the offset.
    load(state, "a", received={"fe": 3})
    assert state._pending["a"].offset == 0
    state.on_assigned("a", "r4", prompt_blocks=10)
    load(state, "a", received={"fe": 3})
    assert pending(state) == (1, 10, 11)
    load(state, "a", received={"fe": 4})
    assert pending(state) == (0, 0, 0)
    # The worker forgets this sender (count restarts from 0): what it had counted carries over.
    state.on_assigned("a", "r5", prompt_blocks=10)
    load(state, "a", received={})
    assert pending(state) == (1, 10, 11)
    load(state, "a", received={"fe": 1})
    assert pending(state) == (0, 0, 0)


def test_reports_without_counts_absorb_by_time() -> None:
    """A worker that does not count (``received`` None): the ``absorb_delay`` timer."""
    state, clock = make_state("a", sender_id="fe")
    state.on_assigned("a", "r1", prompt_blocks=10)
    clock.now += 0.05
    load(state, "a")
    assert pending(state) == (1, 10, 11)
    clock.now += 0.06
    load(state, "a")
    assert pending(state) == (0, 0, 0)


def test_load_report_counts_decode_from_old_and_new_peers() -> None:
    class OldLoadReport(msgspec.Struct, kw_only=True):
        instance_id: str = ""
        kv_blocks_used: int = 0

    old = msgspec.msgpack.decode(msgspec.msgpack.encode(OldLoadReport(instance_id="a", kv_blocks_used=3)),
                                 type=LoadReport)
    assert (old.instance_id, old.kv_blocks_used, old.received) == ("a", 3, None)
    new = LoadReport(instance_id="a", received={"fe": 2})
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(new), type=OldLoadReport).instance_id == "a"
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(new), type=LoadReport).received == {"fe": 2}


def test_pending_assignment_is_absorbed_by_a_later_load_report_without_sender_id() -> None:
    """Without a ``sender_id`` (nothing to match counts against) reports absorb by time."""
    state, clock = make_state("a")
    # New blocks only: 15 uncached prompt blocks + 1 decode block; the 5 cached are resident.
    state.on_assigned("a", "r1", prompt_blocks=20, overlap_blocks=5)
    (c,) = state.candidates(MODEL)
    assert (c.load.blocks_used, c.load.prefill_blocks, c.load.running) == (16, 15, 1)
    clock.now += 0.05
    load(state, "a", used=7, running=3)  # too soon to reflect r1 (absorb_delay 0.1 s)
    (c,) = state.candidates(MODEL)
    assert (c.load.blocks_used, c.load.running) == (23, 4)
    clock.now += 0.1
    state.on_assigned("a", "r2", prompt_blocks=10)
    load(state, "a", used=30, running=4)  # reflects r1, not r2 (assigned just now)
    (c,) = state.candidates(MODEL)
    assert (c.load.blocks_used, c.load.running) == (41, 5)
    state.on_completed("a", "r2")
    state.on_completed("a", "r1")  # already absorbed: no-op
    (c,) = state.candidates(MODEL)
    assert (c.load.blocks_used, c.load.running) == (30, 4)


def test_pending_assignments_queue_behind_full_slots_or_waiting_requests() -> None:
    state, _ = make_state("ab", max_num_seqs=4)
    load(state, "a", running=3)
    load(state, "b", running=1, waiting=2)
    for k in range(3):
        state.on_assigned("a", f"ra{k}", 1)
        state.on_assigned("b", f"rb{k}", 1)
    a, b = state.candidates(MODEL)
    assert (a.load.running, a.load.waiting) == (4, 2)
    assert (b.load.running, b.load.waiting) == (1, 5)


# -- load shedding ------------------------------------------------------------


def test_all_busy_gives_busy_with_retry_after_and_counts_the_reason() -> None:
    rejected: list[str] = []
    thresholds = BusyThresholds(kv_usage=0.5, queue_depth=2, mean_request_seconds=4.0)
    state, _ = make_state("ab", thresholds=thresholds)
    router = Router(state, on_reject=rejected.append)
    # a: KV 100/100 > 0.5 → must free 50 of 100 blocks → 4 s × 0.5 = 2 s.
    # b: 5 waiting, one more would make 6 > 2, with 2 running → 4 must leave the queue
    # → 4 s × 4 / 2 = 8 s.
    load(state, "a", used=100, running=4, total=100)
    load(state, "b", used=10, running=2, waiting=5, total=100)
    assert router.choose(MODEL, prompt(1)) == Busy(retry_after=2, reason="mixed")
    load(state, "a", used=10, running=1, waiting=50, total=100)  # 4 × 49 / 1 = 196 s; b: 8 s
    assert router.choose(MODEL, prompt(1)) == Busy(retry_after=8, reason="queue_depth")
    load(state, "b", used=10, running=1, waiting=8, total=100)  # 4 × 7 / 1 = 28 s
    assert router.choose(MODEL, prompt(1)) == Busy(retry_after=28, reason="queue_depth")
    load(state, "b", used=10, running=1, waiting=20, total=100)  # 72 s → capped at 30
    assert router.choose(MODEL, prompt(1)) == Busy(retry_after=30, reason="queue_depth")
    assert router.rejections == {"mixed": 1, "queue_depth": 3}
    assert rejected == ["mixed"] + ["queue_depth"] * 3
    decision = Busy(retry_after=30, reason="queue_depth").to_decision()
    assert (decision.busy, decision.retry_after, decision.instance_id) == (True, 30.0, "")


def test_busy_instances_are_skipped() -> None:
    state, _ = make_state("ab", thresholds=BusyThresholds(kv_usage=0.9))
    store(state, "a", prompt(1))
    load(state, "a", used=950)
    assert Router(state).choose(MODEL, prompt(1)).instance_id == "b"  # type: ignore[union-attr]


def test_same_burst_against_same_state_admits_the_same_count() -> None:
    """KV threshold 0.9 of 100 blocks, 10-block prompts (each adds 10 + 1 decode block),
    reported usage 50/60/70/85: an instance takes requests while its projected usage is
    ≤ 90, i.e. 4 + 3 + 2 + 1 = 10 of a 48-request burst — for any policy and any
    tie-breaking."""

    def burst(policy: str, seed: int) -> tuple[int, Counter[str]]:
        state, _ = make_state(thresholds=BusyThresholds(kv_usage=0.9))
        for iid, used in zip("abcd", (50, 60, 70, 85)):
            load(state, iid, used=used, total=100)
        router = Router(state, policy, rng=random.Random(seed))
        outcomes = [router.route(MODEL, list(range(40)), f"r{k}") for k in range(48)]
        admitted = Counter(o.instance_id for o in outcomes if isinstance(o, Choice))
        assert all(isinstance(o, Busy) and o.reason == "kv_usage" for o in outcomes if not isinstance(o, Choice))
        assert router.rejections == {"kv_usage": 48 - admitted.total()}
        return admitted.total(), admitted

    for policy in ("kv", "random", "least-loaded", "round-robin"):
        for seed in (1, 2):
            total, per_instance = burst(policy, seed)
            assert total == 10
            assert per_instance == {"a": 4, "b": 3, "c": 2, "d": 1}


def test_queue_threshold_counts_pending_assignments() -> None:
    """Every slot taken: each request sent waits; the third would make the queue 3 > 2."""
    state, _ = make_state("a", thresholds=BusyThresholds(kv_usage=None, queue_depth=2), max_num_seqs=2)
    load(state, "a", running=2)
    router = Router(state)
    admitted = [router.route(MODEL, prompt(k), f"r{k}") for k in range(5)]
    assert [isinstance(o, Choice) for o in admitted] == [True, True, False, False, False]


def test_thresholds_change_at_runtime() -> None:
    thresholds = BusyThresholds()
    state, _ = make_state("a", thresholds=thresholds)
    load(state, "a", used=960)
    router = Router(state)
    assert isinstance(router.choose(MODEL, prompt(1)), Busy)
    body = msgspec.json.decode(b'{"kv_usage": 0.99}', type=BusyThresholdSettings)
    assert thresholds.update(body) == BusyThresholdSettings(kv_usage=0.99, queue_depth=None, prefill_tokens=None,
                                                            ttft_slo=None)
    assert isinstance(router.choose(MODEL, prompt(1)), Choice)
    assert msgspec.json.encode(thresholds.settings()) == \
        b'{"kv_usage":0.99,"queue_depth":null,"prefill_tokens":null,"ttft_slo":null}'
    thresholds.update(BusyThresholdSettings(kv_usage=None, queue_depth=0, prefill_tokens=4096))
    assert (thresholds.kv_usage, thresholds.queue_depth, thresholds.prefill_tokens) == (None, 0, 4096)
    with pytest.raises(ValueError):
        thresholds.update(BusyThresholdSettings(kv_usage=0.5, queue_depth=-1))
    with pytest.raises(ValueError):
        thresholds.update(BusyThresholdSettings(kv_usage=0.5, prefill_tokens=-1))
    # all or nothing
    assert (thresholds.kv_usage, thresholds.queue_depth, thresholds.prefill_tokens) == (None, 0, 4096)
    with pytest.raises(ValueError):
        thresholds.kv_usage = 1.5


# -- candidates: exclude, mark_down, no instance ------------------------------


def test_exclude_and_mark_down_are_respected() -> None:
    state, clock = make_state("abc")
    store(state, "a", prompt(1))
    store(state, "b", prompt(1))
    router = Router(state, rng=random.Random(0))
    assert router.choose(MODEL, prompt(1), exclude={"a"}).instance_id == "b"  # type: ignore[union-attr]
    state.mark_down("b", 5.0)
    assert router.choose(MODEL, prompt(1), exclude={"a"}).instance_id == "c"  # type: ignore[union-attr]
    assert router.choose(MODEL, prompt(1), exclude={"a", "c"}) == NoInstance(reason="all_excluded")
    clock.now += 5.0
    assert router.choose(MODEL, prompt(1), exclude={"a"}).instance_id == "b"  # type: ignore[union-attr]
    state.mark_down("b", 60.0)
    assert not state.add_instance(record("b"))  # same record: keeps its KV entries, clears the mark
    assert router.choose(MODEL, prompt(1), exclude={"a"}).instance_id == "b"  # type: ignore[union-attr]


def test_down_instances_lists_the_marks_still_running() -> None:
    state, clock = make_state("abc")
    assert state.down_instances() == []
    state.mark_down("a", 1.0)
    state.mark_down("b", 5.0)
    assert sorted(state.down_instances()) == ["a", "b"]
    clock.now += 1.0
    assert state.down_instances() == ["b"]


def test_expire_assignments_drops_only_unacknowledged_old_ones() -> None:
    state, clock = make_state("ab", sender_id="fe")
    state.on_assigned("a", "old", prompt_blocks=10)
    clock.now += 30.0
    state.on_assigned("b", "new", prompt_blocks=10)
    state.expire_assignments(20.0)
    assert pending(state, "a") == (0, 0, 0) and pending(state, "b") == (1, 10, 11)
    a, b = state.candidates(MODEL)
    assert (a.load.blocks_used, b.load.blocks_used) == (0, 11)


def test_admission_and_the_choice_after_it_read_one_load_computation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loads are projected once and reused until a report, an assignment or a completion
    changes them: admission then choose cost one projection per instance."""
    state, _ = make_state("ab", thresholds=BusyThresholds(kv_usage=0.9))
    router = Router(state, rng=random.Random(0))
    projected: list[str] = []
    project = InstanceLoad.project

    def counting(record: InstanceRecord, *args: object) -> InstanceLoad:
        projected.append(record.instance_id)
        return project(record, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(InstanceLoad, "project", staticmethod(counting))
    assert router.admission(MODEL) is None
    choice = router.route(MODEL, prompt(1), "r1")
    assert sorted(projected) == ["a", "b"]
    assert isinstance(choice, Choice)
    router.admission(MODEL)  # the assignment changed the chosen instance's load only
    assert sorted(projected) == sorted(["a", "b", choice.instance_id])
    load(state, "a", used=950)
    state.on_completed(choice.instance_id, "r1")
    assert router.admission(MODEL) is None
    (a, _) = state.candidates(MODEL)
    assert a.load.blocks_used == 950


def test_restarted_instance_with_new_record_needs_resync() -> None:
    state, _ = make_state("a")
    store(state, "a", prompt(1))
    assert state.add_instance(msgspec.structs.replace(record("a"), pid=99))
    assert state.index.overlaps(block_hashes(prompt(1), BS)) == {}
    assert state.index.stale_instances() == ["a"]


def test_no_instance_for_unknown_model() -> None:
    state, _ = make_state("a")
    router = Router(state)
    assert router.choose("other", prompt(1)) == NoInstance(reason="no_instance")
    assert router.rejections == {"no_instance": 1}
    assert NoInstance().to_decision().instance_id == ""


def test_instances_of_other_models_are_not_candidates() -> None:
    state, _ = make_state("ab")
    state.add_instance(record("x", model="other"))
    router = Router(state, "random", rng=random.Random(0))
    assert {router.choose(MODEL, prompt(1)).instance_id for _ in range(50)} == {"a", "b"}  # type: ignore[union-attr]


# -- other policies -----------------------------------------------------------


def test_round_robin_cycles_in_id_order_and_survives_membership_changes() -> None:
    state, _ = make_state("abc")
    router = Router(state, "round-robin")
    assert [router.choose(MODEL, prompt(1)).instance_id for _ in range(4)] == ["a", "b", "c", "a"]  # type: ignore[union-attr]
    state.remove_instance("b")
    assert [router.choose(MODEL, prompt(1)).instance_id for _ in range(3)] == ["c", "a", "c"]  # type: ignore[union-attr]


def test_random_policy_uses_every_instance() -> None:
    state, _ = make_state()
    router = Router(state, "random", rng=random.Random(5))
    counts = Counter(router.choose(MODEL, prompt(1)).instance_id for _ in range(400))  # type: ignore[union-attr]
    assert set(counts) == set("abcd") and min(counts.values()) > 60


def test_least_loaded_ignores_prefixes() -> None:
    state, _ = make_state("abc")
    store(state, "a", prompt(1))
    load(state, "a", used=30)
    load(state, "b", used=20)
    load(state, "c", used=25)
    router = Router(state, "least-loaded")
    assert router.choose(MODEL, prompt(1)) == chose(state, "b", prompt_blocks=20, cost=20.0)


def test_unknown_policy_is_rejected() -> None:
    state, _ = make_state("a")
    with pytest.raises(ValueError, match="unknown routing policy"):
        Router(state, "fastest")


def test_thresholds_from_flags_disable_off_the_scale_and_queue_zero_means_any_waiting() -> None:
    t = BusyThresholds.from_flags(0.95, -1)  # the defaults
    assert (t.kv_usage, t.queue_depth, t.prefill_tokens) == (0.95, None, None)
    assert BusyThresholds.from_flags(0.95, -1, 0).prefill_tokens == 0
    t = BusyThresholds.from_flags(0, 0)
    assert (t.kv_usage, t.queue_depth) == (None, 0)
    assert (BusyThresholds.from_flags(-1, 3).kv_usage, BusyThresholds.from_flags(-1, 3).queue_depth) == (None, 3)
    # queue_depth 0: busy when a request sent now would wait. One of 2 slots taken: the
    # first request takes the other; the second would wait behind full slots.
    state, _ = make_state("a", thresholds=BusyThresholds.from_flags(-1, 0), max_num_seqs=2)
    load(state, "a", running=1)
    router = Router(state)
    admitted = [router.route(MODEL, prompt(k), f"r{k}") for k in range(3)]
    assert [isinstance(o, Choice) for o in admitted] == [True, False, False]
    # A report with every slot taken and nobody waiting: full, so busy (it used not to be).
    state, _ = make_state("a", thresholds=BusyThresholds.from_flags(-1, 0), max_num_seqs=2)
    load(state, "a", running=2)
    assert Router(state).choose(MODEL, prompt(1)) == Busy(retry_after=2, reason="queue_depth")


def test_prefill_threshold_counts_reported_and_pending_prefill_work() -> None:
    """Busy while queued prefill tokens > threshold: the report's active_prefill_tokens
    plus the uncached prompt tokens of pending assignments (``prompt(k)``: 80 tokens, 20
    blocks of 4, none cached)."""
    state, _ = make_state("ab", thresholds=BusyThresholds(kv_usage=None, prefill_tokens=0))
    router = Router(state, "least-loaded")
    load(state, "a", prefill=100)
    load(state, "b", prefill=0)
    first = router.route(MODEL, prompt(1), "r1")
    assert isinstance(first, Choice) and first.instance_id == "b"
    # b now has r1's 80 tokens pending (> 0): both busy.
    assert router.route(MODEL, prompt(2), "r2") == Busy(retry_after=1, reason="prefill_tokens")
    assert router.rejections == {"prefill_tokens": 1}
    load(state, "a", prefill=0)  # a's prompt is done
    assert router.choose(MODEL, prompt(3)).instance_id == "a"  # type: ignore[union-attr]
    # Threshold 200: a reports 40 (admits at 40, 120, 200; busy at 280), b has r1's 80
    # pending (admits at 80, 160; busy at 240): 5 admitted, then busy.
    state.thresholds.prefill_tokens = 200
    load(state, "a", prefill=40)
    outcomes = [router.route(MODEL, prompt(k), f"s{k}") for k in range(7)]
    admitted = Counter(o.instance_id for o in outcomes if isinstance(o, Choice))
    assert admitted == {"a": 3, "b": 2}
    assert outcomes[5:] == [Busy(retry_after=1, reason="prefill_tokens")] * 2


def test_admission_rejects_before_the_prompt_is_known_only_when_every_instance_is_busy() -> None:
    state, _ = make_state("ab", thresholds=BusyThresholds(kv_usage=0.5))
    router = Router(state)
    assert Router(make_state("")[0]).admission(MODEL) is None  # no instance: choose answers that
    load(state, "a", used=600)
    assert router.admission(MODEL) is None
    load(state, "b", used=700)
    assert router.admission(MODEL) == Busy(retry_after=1, reason="kv_usage")
    assert router.rejections == {"kv_usage": 1}
    # The same rule as choose: whatever admission turns away, choose would too.
    assert router.choose(MODEL, prompt(1)) == Busy(retry_after=1, reason="kv_usage")
