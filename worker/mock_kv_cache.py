"""The mock engine's paged KV cache with vLLM's prefix caching.

``num_blocks`` blocks of ``block_size`` tokens. A sequence holds blocks for the tokens
it has computed. With prefix caching, a block full of computed tokens is registered
under its chained hash (``dynrt.runtime.block_hash``; ``KvBlockStored``), a new or
resumed sequence reuses the blocks of its longest cached prefix, and blocks no sequence
references stay cached in LRU order; they are evicted (``KvBlockRemoved``) only when a
new block is needed and no never-cached free block is left.

Events go to the engine's :class:`~dynrt.worker.kv_events.KvEventLog`; the engine wakes
its consumer once per step.
"""

from __future__ import annotations

from collections import OrderedDict

from dynrt.runtime.block_hash import extend_block_hashes
from dynrt.runtime.protocol import KvAllCleared, KvBlockRemoved, KvBlockStored
from dynrt.worker.kv_events import KvEventLog
from dynrt.worker.mock_sequence import MockSequence

NO_HASH = -1


class MockKvCache:
    """The block pool. A block is in exactly one of: in use (``ref[block] > 0``), free
    and never cached (``free``), free and cached (``lru``, hash → block, oldest first).
    ``cached`` maps the hash of every cached block, in use or not, to its block, and
    ``block_hash`` each block to its hash (``NO_HASH`` if none). The scheduler reads
    these; only this class changes them."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool, events: KvEventLog) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = enable_prefix_caching
        self.ref: list[int] = [0] * num_blocks
        self.block_hash: list[int] = [NO_HASH] * num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))
        self.lru: OrderedDict[int, int] = OrderedDict()
        self.cached: dict[int, int] = {}
        self._events = events

    @property
    def used(self) -> int:
        """Blocks held by sequences; cached blocks no sequence holds count as free,
        as in vLLM's KV usage."""
        return self.num_blocks - len(self.free) - len(self.lru)

    def available(self) -> int:
        """Blocks that can be allocated now (never-cached free ones, then evictions)."""
        return len(self.free) + len(self.lru)

    def release(self, seq: MockSequence) -> None:
        """Release a sequence's blocks; the last blocks of a sequence go first into
        the LRU so shared prefixes outlive their tails (as vLLM does)."""
        ref, lru, block_hash, free = self.ref, self.lru, self.block_hash, self.free
        for block in reversed(seq.block_ids):
            ref[block] -= 1
            if ref[block] == 0:
                h = block_hash[block]
                if h == NO_HASH:
                    free.append(block)
                else:
                    lru[h] = block
        seq.block_ids = []
        seq.num_registered = 0
        seq.num_computed = 0
        seq.decoding = False

    def allocate(self, seq: MockSequence, count: int) -> None:
        """Give ``count`` new blocks to ``seq`` (the caller checked availability),
        evicting least recently used cached blocks when no never-cached block is left."""
        removed: list[int] = []
        for _ in range(count):
            if self.free:
                block = self.free.pop()
            else:
                h, block = self.lru.popitem(last=False)
                del self.cached[h]
                self.block_hash[block] = NO_HASH
                removed.append(h)
            self.ref[block] = 1
            seq.block_ids.append(block)
        if removed:
            self._events.append(KvBlockRemoved(block_hashes=removed))

    def cached_prefix(self, seq: MockSequence) -> list[int]:
        """Blocks of the longest cached prefix of ``seq`` (at most all but its last
        token, which must be computed to sample the next one)."""
        if not self.prefix_caching:
            return []
        bs = self.block_size
        extend_block_hashes(seq.hashes, seq.tokens, bs)
        limit = (len(seq.tokens) - 1) // bs
        hits: list[int] = []
        cached = self.cached
        for h in seq.hashes[:limit]:
            block = cached.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def available_besides(self, hits: list[int]) -> int:
        """Blocks left to allocate once the cached blocks ``hits`` are taken (those no
        sequence holds leave the LRU)."""
        ref = self.ref
        revived = sum(1 for block in hits if ref[block] == 0)
        return len(self.free) + len(self.lru) - revived

    def take(self, seq: MockSequence, hits: list[int]) -> None:
        """Start ``seq`` on the cached blocks ``hits`` (its prefix, already registered)."""
        ref = self.ref
        for block in hits:
            if ref[block] == 0:
                del self.lru[self.block_hash[block]]
            ref[block] += 1
        seq.block_ids = hits
        seq.num_registered = len(hits)

    def register_full_blocks(self, seq: MockSequence) -> None:
        """Put the sequence's blocks that are now full of computed tokens into the
        prefix cache. A block whose hash is already cached (the same prefix computed
        concurrently) stays private and is freed uncached."""
        bs = self.block_size
        full = seq.num_computed // bs
        if len(seq.hashes) < full:
            extend_block_hashes(seq.hashes, seq.tokens, bs)
        cached, block_hash, hashes, block_ids = self.cached, self.block_hash, seq.hashes, seq.block_ids
        run: list[int] = []
        run_parent: int | None = None
        for i in range(seq.num_registered, full):
            h = hashes[i]
            if h in cached:
                if run:
                    self._events.append(KvBlockStored(block_hashes=run, parent_hash=run_parent))
                    run = []
                continue
            block = block_ids[i]
            cached[h] = block
            block_hash[block] = h
            if not run:
                run_parent = hashes[i - 1] if i else None
            run.append(h)
        if run:
            self._events.append(KvBlockStored(block_hashes=run, parent_hash=run_parent))
        seq.num_registered = full

    def clear(self) -> bool:
        """Drop every cached block (``KvAllCleared``). Like vLLM, refuses (returns
        False) while any sequence holds blocks."""
        if self.used:
            return False
        for block in self.lru.values():
            self.block_hash[block] = NO_HASH
            self.free.append(block)
        self.lru.clear()
        self.cached.clear()
        self._events.append(KvAllCleared())
        return True
