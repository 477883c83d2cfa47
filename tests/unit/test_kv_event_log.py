"""KvEventLog: contiguous ids, the cap on pending events, wake-ups only on notify, and
an iterator that drains what is pending before it ends on close."""

from __future__ import annotations

import asyncio

import pytest

from dynrt.runtime.protocol import KvAllCleared, KvBlockRemoved, KvBlockStored, KvEvent
from dynrt.worker.kv_events import KvEventLog


def stored(h: int) -> KvBlockStored:
    return KvBlockStored(block_hashes=[h], parent_hash=None)


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


def test_ids_are_contiguous_from_one() -> None:
    log = KvEventLog()
    log.append(stored(1))
    log.append(KvBlockRemoved(block_hashes=[1]))
    log.append(KvAllCleared())
    assert [e.event_id for e in log.pending] == [1, 2, 3]
    assert log.last_event_id == 3


def test_cap_drops_the_oldest_half_and_keeps_counting() -> None:
    log = KvEventLog(max_pending=4)
    for h in range(5):
        log.append(stored(h))
    # The fifth event overflows the cap of 4: the oldest 2 go, the id gap shows it.
    assert [e.event_id for e in log.pending] == [3, 4, 5]
    assert log.last_event_id == 5
    with pytest.raises(ValueError):
        KvEventLog(max_pending=1)


async def test_consumer_wakes_on_notify_with_one_batch() -> None:
    log = KvEventLog()
    batches: list[list[KvEvent]] = []

    async def consume() -> None:
        async for batch in log.batches():
            batches.append(batch)

    consumer = asyncio.create_task(consume())
    await settle()
    log.append(stored(1))
    log.append(stored(2))
    await settle()
    assert batches == []  # appended, not notified: the step is not over
    log.notify()
    await settle()
    assert [[e.event_id for e in b] for b in batches] == [[1, 2]]
    assert log.pending == []
    log.notify()  # nothing pending: no empty batch
    await settle()
    assert len(batches) == 1
    log.append(stored(3))
    log.close()
    await asyncio.wait_for(consumer, 1.0)
    assert [[e.event_id for e in b] for b in batches] == [[1, 2], [3]]


async def test_closed_log_yields_what_is_pending_then_ends() -> None:
    log = KvEventLog()
    log.append(stored(1))
    log.close()
    assert [[e.event_id for e in b] async for b in log.batches()] == [[1]]
    assert [b async for b in log.batches()] == []
