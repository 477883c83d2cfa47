"""vLLM KV events → dynrt KV events: the translated hashes are the router's own, and
the relay counts what it loses."""

from __future__ import annotations

import msgspec

from dynrt.runtime.block_hash import block_hashes
from dynrt.runtime.protocol import KvAllCleared, KvBlockRemoved, KvBlockStored
from dynrt.worker.kv_events import KvEventLog
from dynrt.worker.vllm_kv_events import KvEventTranslator
from dynrt.worker.vllm_kv_relay import KV_EVENTS_LOST, VllmKvEventRelay

BS = 4


def stored(hashes: list, tokens: list[int], parent: object = None, **extra: object) -> dict:
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent, "token_ids": tokens,
            "block_size": BS, "lora_id": None, "medium": "GPU", **extra}


def removed(hashes: list) -> dict:
    return {"type": "BlockRemoved", "block_hashes": hashes, "medium": "GPU"}


def test_stored_blocks_get_the_routers_hashes() -> None:
    t = KvEventTranslator()
    tokens = list(range(100, 112))
    t.apply(stored([11, 12, 13], tokens))
    assert [e.event_id for e in t.log.pending] == [1]
    data = t.log.pending[0].data
    assert isinstance(data, KvBlockStored)
    assert data.block_hashes == block_hashes(tokens, BS) and data.parent_hash is None
    # A continuation chains from the parent's dynrt hash: same as hashing the whole sequence.
    more = list(range(200, 208))
    t.apply(stored([14, 15], more, parent=13))
    data = t.log.pending[1].data
    full = block_hashes(tokens + more, BS)
    assert data.block_hashes == full[3:] and data.parent_hash == full[2]
    assert sorted(t.cached_hashes()) == sorted(full)
    assert t.log.last_event_id == 2


def test_removals_map_back_and_ids_stay_contiguous() -> None:
    t = KvEventTranslator()
    tokens = list(range(8))
    t.apply(stored([b"\x01a", b"\x01b"], tokens))  # vLLM hashes may be bytes
    t.apply(removed([b"\x01b"]))
    t.apply(removed([b"unknown"]))  # nothing known: no event
    assert [e.event_id for e in t.log.pending] == [1, 2]
    assert t.log.pending[1].data == KvBlockRemoved(block_hashes=[block_hashes(tokens, BS)[1]])
    assert t.cached_hashes() == block_hashes(tokens, BS)[:1]


def test_unknown_parent_is_untranslatable() -> None:
    t = KvEventTranslator()
    t.apply(stored([5], [1, 2, 3, 4], parent=999))
    assert t.log.pending == [] and t.untranslatable == 1


def test_all_cleared_and_other_groups() -> None:
    t = KvEventTranslator()
    t.apply(stored([1], [1, 2, 3, 4], group_idx=1))  # a sliding-window group: not indexed
    assert t.log.pending == []
    t.apply(stored([1], [1, 2, 3, 4]))
    t.apply({"type": "AllBlocksCleared"})
    assert isinstance(t.log.pending[-1].data, KvAllCleared)
    assert t.cached_hashes() == [] and t.to_dynrt == {}


def test_same_tokens_under_two_vllm_hashes_are_stored_once() -> None:
    # vLLM hashes include extra keys (LoRA, cache salt); dynrt's only the tokens.
    t = KvEventTranslator()
    t.apply(stored([1], [1, 2, 3, 4]))
    t.apply(stored([2], [1, 2, 3, 4], extra_keys=[("salt",)]))
    assert len(t.log.pending) == 1
    t.apply(removed([1]))
    assert len(t.log.pending) == 1  # still held under vLLM hash 2
    t.apply(removed([2]))
    assert isinstance(t.log.pending[-1].data, KvBlockRemoved) and t.cached_hashes() == []


def test_wire_format_as_vllm_encodes_it() -> None:
    """A batch encoded the way vLLM's ZmqEventPublisher does (msgspec tagged structs in an
    array-like batch) decodes into events the translator takes."""

    class BlockStored(msgspec.Struct, tag=True, omit_defaults=True):
        block_hashes: list[int]
        parent_block_hash: int | None
        token_ids: list[int]
        block_size: int
        lora_id: int | None
        medium: str | None

    class Batch(msgspec.Struct, array_like=True, omit_defaults=True):
        ts: float
        events: list[BlockStored]
        data_parallel_rank: int | None = None

    payload = msgspec.msgpack.encode(Batch(1.0, [BlockStored([7, 8], None, list(range(8)), BS, None, "GPU")]))
    batch = msgspec.msgpack.decode(payload)
    t = KvEventTranslator()
    for event in batch[1]:
        t.apply(event)
    assert t.log.pending[0].data == KvBlockStored(block_hashes=block_hashes(list(range(8)), BS), parent_hash=None)


def test_relay_messages_gaps_and_bad_batches() -> None:
    """What the relay does with each ZMQ message of vLLM's publisher ([topic,] seq, batch)."""

    def message(seq: int, events: list) -> list[bytes]:
        return [b"", seq.to_bytes(8, "big"), msgspec.msgpack.encode([1.0, events, None])]

    def lost() -> float:
        return sum(s.value for m in KV_EVENTS_LOST.collect() for s in m.samples if s.name.endswith("_total"))

    log = KvEventLog()
    relay = VllmKvEventRelay(log)
    start = lost()
    relay.on_message(message(0, [stored([1], [1, 2, 3, 4])]))
    relay.on_message(message(1, [stored([2], [5, 6, 7, 8], parent=1)]))
    assert [e.event_id for e in log.pending] == [1, 2] and lost() == start
    relay.on_message(message(4, [removed([2])]))  # seqs 2 and 3 never arrived
    assert lost() == start + 2
    assert log.pending[-1].data == KvBlockRemoved(block_hashes=[block_hashes([1, 2, 3, 4, 5, 6, 7, 8], BS)[1]])
    relay.on_message(message(5, [stored([9], [1, 2, 3, 4], parent=777)]))  # unknown parent
    relay.on_message([b"", (6).to_bytes(8, "big"), b"\xc1"])  # not msgpack
    assert lost() == start + 4
    assert relay.translator.cached_hashes() == block_hashes([1, 2, 3, 4], BS)
    assert log.last_event_id == 3
