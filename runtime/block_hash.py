"""Chained KV block hashes, shared by engines (which publish them) and routers (which
index them) so both sides agree bit for bit.

Block ``i`` of a sequence covers tokens ``[i*block_size, (i+1)*block_size)``; only full
blocks are hashed. Its hash is ``H(hash of block i-1, its tokens)``, so equal hashes mean
equal whole prefixes, as in vLLM's prefix cache. H is BLAKE2b truncated to 63 bits:
C-speed from the standard library, stable across processes and Python versions (the
built-in ``hash`` is salted per process), and non-negative so it fits msgpack int64.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

ROOT_PARENT_HASH = 0
_MASK_63 = (1 << 63) - 1


def hash_block(parent_hash: int, token_ids: Sequence[int]) -> int:
    """Hash of one full block given the hash of the block before it."""
    data = parent_hash.to_bytes(8, "little") + array("q", token_ids).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & _MASK_63


def block_hashes(token_ids: Sequence[int], block_size: int, parent_hash: int = ROOT_PARENT_HASH) -> list[int]:
    """Chained hashes of every full block of ``token_ids`` (same values as chaining
    ``hash_block``; the prompt is packed to bytes once and sliced per block, which is
    what routing a 2k-token prompt spends most of its time on)."""
    hashes: list[int] = []
    parent = parent_hash
    full = len(token_ids) - len(token_ids) % block_size
    data = array("q", token_ids[:full]).tobytes()
    stride = block_size * 8
    blake2b = hashlib.blake2b
    for start in range(0, len(data), stride):
        digest = blake2b(parent.to_bytes(8, "little") + data[start : start + stride], digest_size=8).digest()
        parent = int.from_bytes(digest, "little") & _MASK_63
        hashes.append(parent)
    return hashes


def extend_block_hashes(
    hashes: list[int], token_ids: Sequence[int], block_size: int
) -> list[int]:
    """Hash the full blocks of ``token_ids`` not yet covered by ``hashes`` (in place);
    returns the newly added hashes. Lets an engine hash a growing sequence
    incrementally instead of rehashing it every step."""
    added: list[int] = []
    parent = hashes[-1] if hashes else ROOT_PARENT_HASH
    start = len(hashes) * block_size
    while start + block_size <= len(token_ids):
        parent = hash_block(parent, token_ids[start : start + block_size])
        hashes.append(parent)
        added.append(parent)
        start += block_size
    return added
