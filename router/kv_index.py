"""The router's KV block index: which instances hold which prefix-cache blocks.

Workers publish their cache changes as numbered ``KvEvent`` batches; this index applies
them and answers, for a request's chained block hashes, how many *leading* blocks each
instance already holds.

Layout (chosen for the 1M-block scale of the routing benchmark):

* every instance gets a small integer *slot*; the holders of a block are one Python int
  used as a bit set over slots (``dict[hash, int]``) — far smaller than a ``set`` per
  block, and intersecting the holders of consecutive blocks is a single ``&``;
* every instance also keeps the ``set`` of hashes it holds, so removing or clearing an
  instance costs O(its blocks), never O(index).

Overlap lookup walks the request's chain: the instances that hold blocks ``0..i+1`` are
those that hold ``0..i`` *and* block ``i+1``, so one dict lookup and one ``&`` per block
suffice, stopping as soon as nobody is left — O(prompt blocks), independent of index size.

Consistency: each instance's event ids must increase by exactly 1. An unknown instance,
or a gap, makes the instance *stale*: later events are buffered (never applied past the
gap) until ``resync`` replaces its entries wholesale from the worker's
``dump_cached_blocks`` answer; buffered events newer than the dump are then replayed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import msgspec

from dynrt.runtime.protocol import CachedBlocks, KvAllCleared, KvBlockRemoved, KvBlockStored, KvEvent

ApplyStatus = Literal["ok", "gap", "unknown", "stale"]
"""``ok``: in sync. ``gap``/``unknown``: the instance just became stale — ask it for a dump.
``stale``: still waiting for a dump asked for earlier (nothing new to do)."""


class ApplyResult(msgspec.Struct, frozen=True):
    """Outcome of ``KvIndex.apply`` / ``KvIndex.resync``."""

    status: ApplyStatus
    applied: int = 0

    @property
    def needs_resync(self) -> bool:
        """The instance's entries are not trustworthy until ``resync``."""
        return self.status != "ok"

    @property
    def request_dump(self) -> bool:
        """The instance *just* went stale: the caller should ask it for a dump now."""
        return self.status in ("gap", "unknown")


class _Instance:
    """Per-instance bookkeeping."""

    __slots__ = ("bit", "blocks", "last_event_id", "stale", "buffer")

    def __init__(self, slot: int) -> None:
        self.bit = 1 << slot
        self.blocks: set[int] = set()
        self.last_event_id = -1
        self.stale = True  # until the first resync
        self.buffer: list[KvEvent] = []


class KvIndex:
    """Chained block hash → instances holding it, fed by KV events.

    Not thread-safe; meant to be driven from one event loop.
    """

    def __init__(self, max_buffered_events: int = 4096) -> None:
        """``max_buffered_events`` bounds what a stale instance buffers while its dump is
        in flight; past it the oldest are dropped, and the replay after the dump then
        finds a gap and asks for another dump."""
        self._holders: dict[int, int] = {}
        self._instances: dict[str, _Instance] = {}
        self._slot_ids: list[str | None] = []
        self._free_slots: list[int] = []
        self._max_buffered = max_buffered_events

    # -- queries -------------------------------------------------------------

    def overlaps(self, hashes: Sequence[int]) -> dict[str, int]:
        """For each instance holding at least the first block: how many leading blocks of
        ``hashes`` it holds. Instances absent from the result hold none."""
        result: dict[str, int] = {}
        if not hashes:
            return result
        holders = self._holders
        current = holders.get(hashes[0], 0)
        depth = 1
        n = len(hashes)
        while current and depth < n:
            nxt = current & holders.get(hashes[depth], 0)
            if nxt != current:
                self._credit(result, current & ~nxt, depth)
                current = nxt
            depth += 1
        self._credit(result, current, depth)
        return result

    def _credit(self, result: dict[str, int], bits: int, depth: int) -> None:
        slot_ids = self._slot_ids
        while bits:
            low = bits & -bits
            result[slot_ids[low.bit_length() - 1]] = depth  # type: ignore[index]
            bits ^= low

    def is_stale(self, instance_id: str) -> bool:
        """True when the instance's entries await a resync (or it was never synced)."""
        inst = self._instances.get(instance_id)
        return inst is None or inst.stale

    def stale_instances(self) -> list[str]:
        """Known instances awaiting a dump — for retrying dump requests that failed."""
        return [iid for iid, inst in self._instances.items() if inst.stale]

    def blocks_of(self, instance_id: str) -> int:
        """Number of blocks the index believes the instance holds."""
        inst = self._instances.get(instance_id)
        return len(inst.blocks) if inst else 0

    def __len__(self) -> int:
        """Number of distinct block hashes indexed."""
        return len(self._holders)

    # -- updates -------------------------------------------------------------

    def track(self, instance_id: str) -> None:
        """Register an instance whose dump is being requested: its events are buffered
        (``apply`` returns ``stale``, not ``unknown``) until ``resync``. No-op if known."""
        if instance_id not in self._instances:
            self._add(instance_id)

    def apply(self, instance_id: str, events: Iterable[KvEvent]) -> ApplyResult:
        """Apply one batch of an instance's events, in order, up to the first gap."""
        inst = self._instances.get(instance_id)
        if inst is None:
            inst = self._add(instance_id)
            self._buffer(inst, events)
            return ApplyResult("unknown")
        if inst.stale:
            self._buffer(inst, events)
            return ApplyResult("stale")
        applied = 0
        it = iter(events)
        for event in it:
            if event.event_id <= inst.last_event_id:
                continue  # already reflected (duplicate, or covered by the last dump)
            if event.event_id != inst.last_event_id + 1:
                inst.stale = True
                inst.buffer.append(event)
                self._buffer(inst, it)
                return ApplyResult("gap", applied)
            self._apply_one(inst, event)
            applied += 1
        return ApplyResult("ok", applied)

    def resync(self, dump: CachedBlocks) -> ApplyResult:
        """Replace the instance's entries with a worker's dump, then replay the events
        buffered meanwhile that are newer than it. ``gap`` if those do not follow on."""
        inst = self._instances.get(dump.instance_id) or self._add(dump.instance_id)
        self._clear(inst)
        bit = inst.bit
        holders = self._holders
        blocks = inst.blocks
        for h in dump.block_hashes:
            if h not in blocks:
                blocks.add(h)
                held_by = holders.get(h)
                holders[h] = bit if held_by is None else held_by | bit
        inst.last_event_id = dump.last_event_id
        inst.stale = False
        buffered = sorted(inst.buffer, key=lambda e: e.event_id)
        inst.buffer = []
        return self.apply(dump.instance_id, buffered)

    def remove_instance(self, instance_id: str) -> None:
        """Forget an instance and drop all its entries now."""
        inst = self._instances.pop(instance_id, None)
        if inst is None:
            return
        self._clear(inst)
        slot = inst.bit.bit_length() - 1
        self._slot_ids[slot] = None
        self._free_slots.append(slot)

    # -- internals -----------------------------------------------------------

    def _add(self, instance_id: str) -> _Instance:
        if self._free_slots:
            slot = self._free_slots.pop()
            self._slot_ids[slot] = instance_id
        else:
            slot = len(self._slot_ids)
            self._slot_ids.append(instance_id)
        inst = _Instance(slot)
        self._instances[instance_id] = inst
        return inst

    def _buffer(self, inst: _Instance, events: Iterable[KvEvent]) -> None:
        inst.buffer.extend(events)
        overflow = len(inst.buffer) - self._max_buffered
        if overflow > 0:
            del inst.buffer[:overflow]

    def _apply_one(self, inst: _Instance, event: KvEvent) -> None:
        data = event.data
        holders = self._holders
        blocks = inst.blocks
        bit = inst.bit
        if isinstance(data, KvBlockStored):
            # Chained hashes already encode the whole prefix: parent_hash is not needed.
            for h in data.block_hashes:
                if h not in blocks:
                    blocks.add(h)
                    # A block held by one instance shares that instance's bit object.
                    held_by = holders.get(h)
                    holders[h] = bit if held_by is None else held_by | bit
        elif isinstance(data, KvBlockRemoved):
            for h in data.block_hashes:
                if h in blocks:
                    blocks.discard(h)
                    self._drop_holder(h, bit)
        elif isinstance(data, KvAllCleared):
            self._clear(inst)
        inst.last_event_id = event.event_id

    def _clear(self, inst: _Instance) -> None:
        bit = inst.bit
        for h in inst.blocks:
            self._drop_holder(h, bit)
        inst.blocks = set()

    def _drop_holder(self, h: int, bit: int) -> None:
        remaining = self._holders[h] & ~bit
        if remaining:
            self._holders[h] = remaining
        else:
            del self._holders[h]
