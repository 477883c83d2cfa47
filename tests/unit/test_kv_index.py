"""KvIndex: events, gaps and resync, removal, leading-block overlaps."""

from __future__ import annotations

from dynrt.router.kv_index import KvIndex
from dynrt.runtime.block_hash import block_hashes
from dynrt.runtime.protocol import CachedBlocks, KvAllCleared, KvBlockRemoved, KvBlockStored, KvEvent

BS = 4


def stored(event_id: int, hashes: list[int]) -> KvEvent:
    return KvEvent(event_id=event_id, data=KvBlockStored(block_hashes=hashes))


def removed(event_id: int, hashes: list[int]) -> KvEvent:
    return KvEvent(event_id=event_id, data=KvBlockRemoved(block_hashes=hashes))


def synced(index: KvIndex, *instance_ids: str) -> KvIndex:
    """Bring instances into sync with an empty dump at event id 0."""
    for iid in instance_ids:
        assert not index.resync(CachedBlocks(instance_id=iid, block_hashes=[], last_event_id=0)).needs_resync
    return index


PROMPT = list(range(100, 140))  # 10 blocks
H = block_hashes(PROMPT, BS)


def test_overlap_counts_leading_blocks_per_instance() -> None:
    index = synced(KvIndex(), "a", "b", "c")
    index.apply("a", [stored(1, H[:3])])
    index.apply("b", [stored(1, H)])
    # c holds blocks 0, 1 and 3 but not 2: only the two leading ones count.
    index.apply("c", [stored(1, H[:2] + H[3:4])])
    assert index.overlaps(H) == {"a": 3, "b": 10, "c": 2}
    assert index.overlaps(H[:1]) == {"a": 1, "b": 1, "c": 1}
    # A prompt whose first block nobody holds overlaps nowhere.
    assert index.overlaps(block_hashes(list(range(40)), BS)) == {}
    assert index.overlaps([]) == {}


def test_removed_and_cleared_events_are_reflected() -> None:
    index = synced(KvIndex(), "a", "b")
    index.apply("a", [stored(1, H)])
    index.apply("b", [stored(1, H[:5])])
    r = index.apply("a", [removed(2, H[6:])])  # evict a's tail
    assert (r.status, r.applied) == ("ok", 1)
    assert index.overlaps(H) == {"a": 6, "b": 5}
    index.apply("b", [KvEvent(event_id=2, data=KvAllCleared())])
    assert index.overlaps(H) == {"a": 6}
    assert index.blocks_of("b") == 0
    assert len(index) == 6
    index.apply("a", [removed(3, H)])
    assert len(index) == 0 and index.overlaps(H) == {}


def test_duplicate_events_are_skipped() -> None:
    index = synced(KvIndex(), "a")
    assert index.apply("a", [stored(1, H[:2]), stored(2, H[2:4])]).applied == 2
    r = index.apply("a", [stored(2, H[2:4]), removed(1, H[:1]), stored(3, H[4:5])])
    assert (r.status, r.applied) == ("ok", 1)
    assert index.overlaps(H) == {"a": 5}


def test_unknown_instance_needs_resync_and_buffers_until_dump() -> None:
    index = KvIndex()
    r = index.apply("a", [stored(5, H[:2]), stored(6, H[2:3])])
    assert r.status == "unknown" and r.needs_resync and r.request_dump
    assert index.overlaps(H) == {} and index.is_stale("a")
    # The dump reflects events up to 5; the buffered event 6 is replayed on top.
    r = index.resync(CachedBlocks(instance_id="a", block_hashes=H[:2], last_event_id=5))
    assert (r.status, r.applied) == ("ok", 1)
    assert index.overlaps(H) == {"a": 3} and not index.is_stale("a")


def test_tracked_instance_is_stale_without_a_second_dump_request() -> None:
    index = KvIndex()
    index.track("a")
    r = index.apply("a", [stored(1, H[:1])])
    assert r.status == "stale" and r.needs_resync and not r.request_dump
    assert index.stale_instances() == ["a"]


def test_gap_stops_applying_until_resync_replaces_entries() -> None:
    index = synced(KvIndex(), "a")
    index.apply("a", [stored(1, H[:2])])
    # Event 3 follows a missed event 2: 3 and everything after it must wait.
    r = index.apply("a", [stored(3, H[2:4]), stored(4, H[4:6])])
    assert (r.status, r.applied) == ("gap", 0) and r.request_dump
    assert index.overlaps(H) == {"a": 2}
    r = index.apply("a", [stored(5, H[6:7])])
    assert r.status == "stale" and not r.request_dump
    assert index.overlaps(H) == {"a": 2}
    # The worker's dump is taken after event 4 (its cache holds H[:6] and an unrelated
    # block X the index never heard of); event 5 is replayed on top of it.
    x = 12345
    r = index.resync(CachedBlocks(instance_id="a", block_hashes=H[:6] + [x], last_event_id=4))
    assert (r.status, r.applied) == ("ok", 1)
    assert index.overlaps(H) == {"a": 7}
    assert index.overlaps([x]) == {"a": 1}
    assert index.apply("a", [stored(6, H[7:])]).status == "ok"
    assert index.overlaps(H) == {"a": 10}


def test_gap_within_a_batch_applies_the_events_before_it() -> None:
    index = synced(KvIndex(), "a")
    r = index.apply("a", [stored(1, H[:1]), stored(2, H[1:2]), stored(4, H[2:3])])
    assert (r.status, r.applied) == ("gap", 2)
    assert index.overlaps(H) == {"a": 2}


def test_resync_reports_a_gap_left_in_the_buffered_events() -> None:
    index = synced(KvIndex(), "a")
    index.apply("a", [stored(3, H[:1])])  # gap: 1 and 2 missed
    r = index.resync(CachedBlocks(instance_id="a", block_hashes=[], last_event_id=1))
    assert r.status == "gap" and index.is_stale("a")
    r = index.resync(CachedBlocks(instance_id="a", block_hashes=H[:1], last_event_id=3))
    assert r.status == "ok" and index.overlaps(H) == {"a": 1}


def test_buffer_overflow_forces_another_resync() -> None:
    index = KvIndex(max_buffered_events=2)
    index.track("a")
    index.apply("a", [stored(1, H[:1]), stored(2, H[1:2]), stored(3, H[2:3])])
    # Event 1 was dropped from the buffer: a dump at event 0 cannot be completed.
    assert index.resync(CachedBlocks(instance_id="a", block_hashes=[], last_event_id=0)).status == "gap"


def test_remove_instance_drops_its_entries_and_frees_its_slot() -> None:
    index = synced(KvIndex(), "a", "b")
    index.apply("a", [stored(1, H)])
    index.apply("b", [stored(1, H[:4])])
    index.remove_instance("a")
    assert index.overlaps(H) == {"b": 4}
    assert len(index) == 4 and index.blocks_of("a") == 0
    assert index.is_stale("a")  # unknown again
    # A new instance reusing a's slot must not inherit any of a's blocks.
    synced(index, "c")
    assert index.overlaps(H) == {"b": 4}
    index.apply("c", [stored(1, H[:1])])
    assert index.overlaps(H) == {"b": 4, "c": 1}
    index.remove_instance("missing")  # no-op


class _CountingDict(dict[int, int]):
    lookups = 0

    def get(self, key: int, default: int | None = None) -> int | None:  # type: ignore[override]
        _CountingDict.lookups += 1
        return super().get(key, default)


def test_overlap_lookup_is_proportional_to_prompt_blocks_not_index_size() -> None:
    index = synced(KvIndex(), *[f"w{i}" for i in range(8)])
    for i in range(8):
        prompts = block_hashes(list(range(i * 10_000, i * 10_000 + 2_000)), BS)
        index.apply(f"w{i}", [stored(1, prompts)])
    index.apply("w0", [stored(2, H[:3])])
    counting = _CountingDict(index._holders)
    index._holders = counting
    assert index.overlaps(H) == {"w0": 3}
    # Stops right after the chain runs out: 3 held blocks + the first miss.
    assert _CountingDict.lookups == 4
