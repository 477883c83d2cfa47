"""Pure logic of resumable streams' checkpoints (no I/O; ``stream_checkpoints.py`` does
the JetStream side): when a request's checkpoint is written and what, how the messages
of a key fold back into one state, the API-key check, and request ids (the SSE event
ids are frontend/event_ids.py's).

A request's key in the bucket holds a full :class:`StreamCheckpoint` (a *snapshot*,
written with a rollup header so it replaces the key's earlier messages) followed by
:class:`CheckpointDelta`\\ s, each carrying only the token ids generated since the
previous write. Why deltas and not the full state on every write: a full write repeats
the prompt and every token so far, so its bytes grow with the request's length and the
total per request grows with its square. benchmarks/checkpoint.py (64 streams of 500
tokens at 50 tokens/s, 1000-token prompts, one write per 0.2 s): the same ~87 messages
per 1k tokens either way, but 33 KiB per 1k tokens with deltas against 496 KiB with the
full state (``results/checkpoint.json``), and it grows with longer prompts and outputs;
the price is a read of up to ``max_deltas + 1`` messages instead of one (~4 ms). A snapshot is still written every ``max_deltas`` deltas
(so a resume reads at most that many messages) and at least every
``snapshot_max_age`` seconds: the bucket's TTL drops each message that age after it was
written, so the snapshot a delta builds on must not expire before the delta's grace
period ends (``bucket_ttl``).

Writes are batched: at most one per ``interval`` seconds per request, sooner once
``max_pending_tokens`` token ids wait; the first write (the prompt) happens at once.
"""

from __future__ import annotations

import hmac
import re
import secrets
from dataclasses import dataclass

import msgspec

from dynrt.runtime.config import ResumeConfig
from dynrt.runtime.protocol import CheckpointDelta, CheckpointEntry, StreamCheckpoint

__all__ = ["CheckpointLog", "CheckpointPolicy", "IncompleteCheckpoint", "api_key_hash", "bucket_ttl", "fold",
           "is_request_id", "key_matches", "new_request_id"]

# A request id is one NATS subject token and a key-value key: no '.', no wildcard.
_REQUEST_ID = re.compile(r"[A-Za-z0-9_=-]{1,200}")


def new_request_id(prefix: str) -> str:
    """``prefix`` + 128 bits from the OS's CSPRNG (``secrets``), in hex: a resume
    names its stream by this id, so it must not be guessable."""
    return prefix + secrets.token_hex(16)


def is_request_id(value: str) -> bool:
    return _REQUEST_ID.fullmatch(value) is not None


def api_key_hash(request_id: str, api_key: str) -> bytes:
    """HMAC-SHA256 of the API key keyed by the request id: what a checkpoint keeps
    instead of the key (a per-request salt: one digest says nothing about another
    request's). No key (open endpoints) hashes the empty string."""
    return hmac.digest(request_id.encode(), api_key.encode("utf-8", "surrogateescape"), "sha256")


def key_matches(checkpoint: StreamCheckpoint, api_key: str) -> bool:
    """Whether ``api_key`` started this request; constant time (``hmac.compare_digest``)."""
    return hmac.compare_digest(api_key_hash(checkpoint.request_id, api_key), checkpoint.key_hash)


@dataclass(frozen=True)
class CheckpointPolicy:
    """How often a request's checkpoint is written.

    ``max_deltas = 0``: every write is a snapshot (the full state each time)."""

    grace: float = 30.0  # seconds a checkpoint stays resumable after its last write
    interval: float = 0.2  # at most one write per this many seconds ...
    max_pending_tokens: int = 64  # ... unless this many token ids wait
    max_deltas: int = 32  # a snapshot after this many deltas

    def __post_init__(self) -> None:
        if self.grace <= 0 or self.interval < 0 or self.max_pending_tokens < 1 or not 0 <= self.max_deltas <= 62:
            # 62: the bucket keeps 64 messages per key (nats-py's KV history limit);
            # a snapshot and its deltas must all fit.
            raise ValueError(f"invalid checkpoint policy {self}")

    @property
    def snapshot_max_age(self) -> float:
        return self.grace / 2

    @classmethod
    def from_config(cls, config: ResumeConfig) -> "CheckpointPolicy":
        return cls(grace=config.resume_grace, interval=config.checkpoint_interval,
                   max_pending_tokens=config.checkpoint_tokens, max_deltas=config.checkpoint_deltas)


def bucket_ttl(policy: CheckpointPolicy) -> float:
    """The bucket's max age: a delta written at ``t`` must find its snapshot (written at
    ``t - snapshot_max_age`` at the earliest) until ``t + grace``. Everything a request
    wrote is gone at most this long after its last write, even if nobody deletes it."""
    return policy.grace + policy.snapshot_max_age


class CheckpointLog:
    """One request's checkpoint as its frontend produces it: ``record`` what was sent,
    ask ``due_at`` when to write, take the message with ``next_entry`` and confirm it
    with ``written`` (or ``failed``: the next write is then a snapshot, which is
    idempotent whether or not the failed one reached the server)."""

    def __init__(self, checkpoint: StreamCheckpoint, policy: CheckpointPolicy, now: float) -> None:
        self.state = msgspec.structs.replace(checkpoint, output_token_ids=list(checkpoint.output_token_ids),
                                             delta_sizes=list(checkpoint.delta_sizes),
                                             created=checkpoint.created or now, updated=now)
        self.policy = policy
        self._written_tokens = 0
        self._written_deltas = 0
        self._written_seq = -1  # nothing written yet: the first write is due at once
        self._written_instance = self.state.instance_id
        self._last_write_at = float("-inf")
        self._snapshot_at = float("-inf")
        self._deltas = 0
        self._need_snapshot = True

    def record(self, token_ids: list[int], last_event_seq: int, instance_id: str | None = None) -> None:
        """The frontend turned one delta of ``token_ids`` into events and has sent
        events up to ``last_event_seq`` (``instance_id``: the request moved to that
        worker)."""
        if token_ids:
            self.state.output_token_ids.extend(token_ids)
            self.state.delta_sizes.append(len(token_ids))
        self.state.last_event_seq = last_event_seq
        if instance_id is not None:
            self.state.instance_id = instance_id

    @property
    def pending_tokens(self) -> int:
        return len(self.state.output_token_ids) - self._written_tokens

    @property
    def dirty(self) -> bool:
        return (self.pending_tokens > 0 or self.state.last_event_seq != self._written_seq
                or self.state.instance_id != self._written_instance)

    def due_at(self) -> float:
        """When the next write should happen. With nothing new, a snapshot keeps a
        request that produces nothing for a while (queued, a long prefill) resumable."""
        if self._written_seq < 0:
            return float("-inf")
        if not self.dirty:
            return self._snapshot_at + self.policy.snapshot_max_age
        if self.pending_tokens >= self.policy.max_pending_tokens:
            return self._last_write_at
        return self._last_write_at + self.policy.interval

    def next_entry(self, now: float) -> CheckpointEntry:
        """The message to write now: a snapshot or a delta. ``updated`` is the write's
        time: a reader takes a checkpoint not written for ``grace`` seconds as expired."""
        self.state.updated = now
        if self._snapshot_due(now) or not self.dirty:  # nothing new: a keep-alive snapshot
            return msgspec.structs.replace(self.state, output_token_ids=list(self.state.output_token_ids),
                                           delta_sizes=list(self.state.delta_sizes))
        return CheckpointDelta(
            output_token_ids=self.state.output_token_ids[self._written_tokens:],
            delta_sizes=self.state.delta_sizes[self._written_deltas:],
            last_event_seq=self.state.last_event_seq, updated=self.state.updated,
            instance_id=self.state.instance_id if self.state.instance_id != self._written_instance else None)

    def _snapshot_due(self, now: float) -> bool:
        return (self._need_snapshot or self._deltas >= self.policy.max_deltas
                or now - self._snapshot_at >= self.policy.snapshot_max_age)

    def written(self, entry: CheckpointEntry, now: float) -> None:
        """``entry`` (from ``next_entry``) is stored."""
        if isinstance(entry, StreamCheckpoint):
            self._written_tokens = len(entry.output_token_ids)
            self._written_deltas = len(entry.delta_sizes)
            self._snapshot_at = now
            self._deltas = 0
            self._need_snapshot = False
        else:
            self._written_tokens += len(entry.output_token_ids)
            self._written_deltas += len(entry.delta_sizes)
            self._deltas += 1
        self._written_seq = entry.last_event_seq
        if entry.instance_id is not None:
            self._written_instance = entry.instance_id
        self._last_write_at = now

    def failed(self, now: float) -> None:
        """The last write may or may not have been stored: rewrite the whole state."""
        self._need_snapshot = True
        self._last_write_at = now


class IncompleteCheckpoint(Exception):
    """Deltas without the snapshot they build on (it expired first)."""


def fold(entries: list[CheckpointEntry]) -> StreamCheckpoint | None:
    """The state a key's messages (oldest first) describe; None for none. Each snapshot
    replaces what came before it, so messages removed by a concurrent rollup (a read
    racing a write) only make the fold start later."""
    state: StreamCheckpoint | None = None
    for entry in entries:
        if isinstance(entry, StreamCheckpoint):
            state = msgspec.structs.replace(entry, output_token_ids=list(entry.output_token_ids),
                                            delta_sizes=list(entry.delta_sizes))
        elif state is None:
            raise IncompleteCheckpoint
        else:
            state.output_token_ids.extend(entry.output_token_ids)
            state.delta_sizes.extend(entry.delta_sizes)
            state.last_event_seq = entry.last_event_seq
            state.updated = entry.updated
            if entry.instance_id is not None:
                state.instance_id = entry.instance_id
    return state
