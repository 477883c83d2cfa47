"""vLLM's KV cache events translated into dynrt's (no vLLM import: unit-testable anywhere).

vLLM (``vllm.distributed.kv_events``) publishes msgpack batches ``[ts, [events], dp_rank]``
over ZMQ; each event is a tagged msgspec struct, decoded here as a dict with ``type``
(``BlockStored``: block_hashes, parent_block_hash, token_ids, block_size, ...;
``BlockRemoved``: block_hashes; ``AllBlocksCleared``) or, for array-like encodings, a list
starting with the tag.
"""

from __future__ import annotations

from typing import Any

from dynrt.runtime.block_hash import ROOT_PARENT_HASH, hash_block
from dynrt.runtime.protocol import KvAllCleared, KvBlockRemoved, KvBlockStored
from dynrt.worker.kv_events import KvEventLog


class KvEventTranslator:
    """vLLM KV events → dynrt KV events (dynrt hashes, contiguous ids).

    dynrt hashes are chained from the token ids of each stored block, so they equal what
    a router computes for a prompt with ``block_hashes(prompt, block_size)``. vLLM hashes
    are mapped to dynrt hashes for removals; a dynrt hash held by several vLLM blocks
    (only possible with extra keys such as LoRA or cache salts) is reported stored once
    and removed when the last one goes. Translated events go to ``log``."""

    def __init__(self, log: KvEventLog | None = None) -> None:
        self.to_dynrt: dict[Any, int] = {}
        self.refs: dict[int, int] = {}
        self.log = log if log is not None else KvEventLog()
        self.untranslatable = 0

    def cached_hashes(self) -> list[int]:
        return list(self.refs)

    def apply(self, event: Any) -> None:
        """One decoded vLLM event: a dict with ``type`` (msgspec tagged struct) or a list
        whose first item is the tag."""
        if isinstance(event, (list, tuple)):
            kind, fields = event[0], _positional(event[0], event[1:])
        elif isinstance(event, dict):
            kind, fields = event.get("type"), event
        else:
            self.untranslatable += 1
            return
        group = fields.get("group_idx")
        if group not in (None, 0):  # hybrid models: only the full-attention group is indexed
            return
        if kind == "BlockStored":
            self._stored(fields)
        elif kind == "BlockRemoved":
            self._removed(fields)
        elif kind == "AllBlocksCleared":
            self.to_dynrt.clear()
            self.refs.clear()
            self.log.append(KvAllCleared())
        else:
            self.untranslatable += 1

    def _stored(self, fields: dict[str, Any]) -> None:
        vllm_hashes = [_hashable(h) for h in fields.get("block_hashes") or []]
        tokens = fields.get("token_ids") or []
        block_size = int(fields.get("block_size") or 0)
        if not vllm_hashes or block_size <= 0 or len(tokens) < block_size * len(vllm_hashes):
            self.untranslatable += 1
            return
        vllm_parent = fields.get("parent_block_hash")
        if vllm_parent is None:
            parent = ROOT_PARENT_HASH
        else:
            mapped = self.to_dynrt.get(_hashable(vllm_parent))
            if mapped is None:  # its parent's event was lost: the chain cannot be rebuilt
                self.untranslatable += 1
                return
            parent = mapped
        run: list[int] = []
        run_parent: int | None = None
        prev = parent
        for i, vllm_hash in enumerate(vllm_hashes):
            h = hash_block(prev, tokens[i * block_size : (i + 1) * block_size])
            old = self.to_dynrt.get(vllm_hash)
            if old is not None:  # stored twice without removal: keep one reference
                self._unref(old)
            self.to_dynrt[vllm_hash] = h
            count = self.refs.get(h, 0)
            self.refs[h] = count + 1
            if count == 0:
                if not run:
                    run_parent = None if (i == 0 and vllm_parent is None) else prev
                run.append(h)
            elif run:
                self.log.append(KvBlockStored(block_hashes=run, parent_hash=run_parent))
                run = []
            prev = h
        if run:
            self.log.append(KvBlockStored(block_hashes=run, parent_hash=run_parent))

    def _removed(self, fields: dict[str, Any]) -> None:
        gone: list[int] = []
        for vllm_hash in fields.get("block_hashes") or []:
            h = self.to_dynrt.pop(_hashable(vllm_hash), None)
            if h is not None and self._unref(h):
                gone.append(h)
        if gone:
            self.log.append(KvBlockRemoved(block_hashes=gone))

    def _unref(self, h: int) -> bool:
        """Drop one vLLM block's reference to ``h``; True when it was the last."""
        count = self.refs.get(h, 0) - 1
        if count > 0:
            self.refs[h] = count
            return False
        self.refs.pop(h, None)
        return True


_POSITIONAL_FIELDS = {
    "BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size"),
    "BlockRemoved": ("block_hashes",),
    "AllBlocksCleared": (),
}


def _positional(kind: Any, values: Any) -> dict[str, Any]:
    names = _POSITIONAL_FIELDS.get(kind, ())
    return dict(zip(names, values))


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value
