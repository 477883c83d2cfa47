"""Resumable streams' checkpoints in a NATS JetStream key-value bucket: what a frontend
writes while it streams a completion, so that if both it and the worker die, another
frontend can continue the request from the prompt and the token ids generated so far
(issue 18). The decisions (when to write, snapshot or delta, folding, the key check)
are pure, in ``checkpoint_log.py``; this module is the I/O.

Lifecycle: ``store = await CheckpointStore.open(nc, namespace, policy)`` creates the
bucket if it does not exist (idempotent: every frontend does it at start);
``await store.close()`` at shutdown stops its flusher (the one task that writes every
request's due checkpoint, running while any writer is open). Per request:
``writer = store.writer(checkpoint)``, ``await writer.start()`` (the first write, at
once), ``writer.record(...)`` for each batch of events sent, ``await writer.finish()``
when the stream ends (the key is deleted) or ``await writer.close()`` to leave it for a
resume. ``await store.load(request_id, api_key)`` reads one back, or raises
:class:`CheckpointNotFound` / :class:`CheckpointExpired` / :class:`CheckpointForbidden`.

The bucket is one of nats-py's key-value buckets (``js.create_key_value``: a stream
``KV_<bucket>`` on subjects ``$KV.<bucket>.<key>``, a max age, 64 messages kept per
key). nats-py's ``KeyValue.put`` sends no headers, so writes go through
``js.publish`` on the key's subject with two JetStream headers the KV API uses itself
(``KeyValue.update``, ``KeyValue.purge``): ``Nats-Expected-Last-Subject-Sequence`` (a
write fails if another frontend wrote since: it resumed the request and owns it now)
and, on a snapshot, ``Nats-Rollup: sub`` (the server drops the key's earlier messages).
A read is ``KeyValue.history`` (a watch): one ordered consumer delivers the key's
messages (a snapshot and at most ``max_deltas`` deltas), ~4 ms on loopback for 31
messages where fetching them one ``js.get_msg`` at a time took ~21 ms (that walk is the
fallback, ``_read``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from dynrt.runtime.checkpoint_log import (CheckpointLog, CheckpointPolicy, IncompleteCheckpoint, bucket_ttl, fold,
                                          is_request_id, key_matches)
from dynrt.runtime import metrics
from dynrt.runtime.log import get_logger
from dynrt.runtime.protocol import (CheckpointEntry, StreamCheckpoint, checkpoint_entry_decoder, encode,
                                    stream_checkpoints_bucket)

__all__ = ["CheckpointError", "CheckpointExpired", "CheckpointForbidden", "CheckpointNotFound", "CheckpointStore",
           "CheckpointSuperseded", "CheckpointUnavailable", "CheckpointWriter", "LoadedCheckpoint"]

log = get_logger("checkpoints")

WRITES = metrics.counter("dynrt_checkpoint_writes_total",
                         "resumable-stream checkpoint messages written to JetStream, by kind (snapshot: the full "
                         "state; delta: the tokens since the previous write)", ("kind",))
WRITE_BYTES = metrics.counter("dynrt_checkpoint_write_bytes_total",
                              "bytes of resumable-stream checkpoint messages written to JetStream, by kind", ("kind",))

_KV_HISTORY = 64  # the most nats-py's create_key_value allows; a snapshot + max_deltas fit
_ROLLUP = {"Nats-Rollup": "sub"}
_EXPECTED_LAST = "Nats-Expected-Last-Subject-Sequence"
# A write NATS has not acknowledged by then is retried (as a snapshot) after an interval;
# bounds how long finish() can wait for an in-flight write while NATS is away.
_WRITE_TIMEOUT = 2.0
_READER_INACTIVE = 1.0  # seconds a read's consumer outlives the read
_STREAM_IN_USE = 10058  # JSStreamNameExistErr: the bucket exists with another configuration
_WRONG_LAST_SEQUENCE = (10071, 10164)  # as nats-py's KeyValue._update
_NATS_FAILURES = (nats.errors.Error, asyncio.TimeoutError, OSError)


class CheckpointError(Exception):
    """Base of this module's errors."""


class CheckpointNotFound(CheckpointError):
    """No checkpoint for this request id (never existed, finished, or long expired): 404."""


class CheckpointExpired(CheckpointError):
    """The checkpoint exists but its grace period ended: 410."""


class CheckpointForbidden(CheckpointError):
    """The API key presented is not the one that started the request: 403."""


class CheckpointSuperseded(CheckpointError):
    """Another frontend wrote this request's checkpoint since this writer's last write
    (the client resumed there): this writer must stop."""


class CheckpointUnavailable(CheckpointError):
    """JetStream did not answer (NATS down, or JetStream not enabled on the server)."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    checkpoint: StreamCheckpoint
    revision: int  # the key's last message: a writer taking over expects it


class CheckpointStore:
    def __init__(self, js: JetStreamContext, kv: KeyValue, bucket: str, policy: CheckpointPolicy,
                 clock: Callable[[], float] = time.time) -> None:
        self.js = js
        self.kv = kv
        self.bucket = bucket
        self.stream = f"KV_{bucket}"
        self.policy = policy
        self.clock = clock
        self.messages_written = 0  # totals of this process, for benchmarks/checkpoint.py
        self.bytes_written = 0
        self._writers: set[CheckpointWriter] = set()
        self._flusher: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, nc: NatsClient, namespace: str, policy: CheckpointPolicy, *, replicas: int = 1,
                   clock: Callable[[], float] = time.time) -> "CheckpointStore":
        """Create the namespace's bucket, or use it if it exists. ``replicas``: 3 on a
        NATS cluster, so a checkpoint survives a NATS server too."""
        js = nc.jetstream()
        bucket = stream_checkpoints_bucket(namespace)
        config = KeyValueConfig(bucket=bucket, history=_KV_HISTORY, ttl=bucket_ttl(policy), storage=StorageType.FILE,
                                replicas=replicas, description="dynrt resumable-stream checkpoints")
        try:
            try:
                kv = await js.create_key_value(config)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != _STREAM_IN_USE:
                    raise
                # Another frontend made it with other settings (another --resume-grace).
                # A longer max age only keeps leftovers longer: use it. A shorter one
                # would drop a snapshot before this frontend's grace period ends: raise
                # it (every frontend then gets at least the max age it needs).
                kv = await js.key_value(bucket)
                info = await js.stream_info(f"KV_{bucket}")
                log.warning("checkpoint_bucket_settings_differ", bucket=bucket, ttl=info.config.max_age,
                            wanted_ttl=config.ttl)
                assert config.ttl is not None
                if info.config.max_age is not None and 0 < info.config.max_age < config.ttl:
                    info.config.max_age = config.ttl
                    await js.update_stream(info.config)
        except _NATS_FAILURES as exc:
            raise CheckpointUnavailable(f"JetStream bucket {bucket}: {exc!r} (is JetStream enabled?)") from exc
        return cls(js, kv, bucket, policy, clock)

    # -- reading ----------------------------------------------------------------------
    def _subject(self, request_id: str) -> str:
        return f"$KV.{self.bucket}.{request_id}"

    async def load(self, request_id: str, api_key: str) -> LoadedCheckpoint:
        """The request's checkpoint, if ``api_key`` started it and its grace period
        has not ended."""
        if not is_request_id(request_id):
            raise CheckpointNotFound(request_id)
        try:
            messages = await self._read(request_id)
        except _NATS_FAILURES as exc:
            raise CheckpointUnavailable(f"reading checkpoint {request_id}: {exc!r}") from exc
        # A purge or delete marker has no value.
        entries = [checkpoint_entry_decoder.decode(data) for _, data in messages if data]
        try:
            checkpoint = fold(entries)
        except IncompleteCheckpoint:
            raise CheckpointExpired(request_id) from None
        if checkpoint is None:
            raise CheckpointNotFound(request_id)
        if not key_matches(checkpoint, api_key):
            raise CheckpointForbidden(request_id)
        if self.clock() - checkpoint.updated > self.policy.grace:
            raise CheckpointExpired(request_id)
        return LoadedCheckpoint(checkpoint, messages[-1][0])

    async def _read(self, request_id: str) -> list[tuple[int, bytes | None]]:
        """The key's messages, oldest first, as (revision, data)."""
        # KeyValue.history, with the watcher's consumer gone 1 s after the read
        # (history's own watcher keeps it for 5 min: a burst of resumes would leave one
        # consumer on the server per resume).
        watcher = await self.kv.watch(request_id, include_history=True, inactive_threshold=_READER_INACTIVE)
        history: list[KeyValue.Entry] = []
        try:
            async for entry in watcher:
                if entry is None:  # the end of what was stored when the read began
                    break
                history.append(entry)
        finally:
            await watcher.stop()
        if history:
            return [(entry.revision or 0, entry.value) for entry in history]
        # nats-py 2.16's watcher can report "no messages" when the server delivered them
        # all before its consumer_info call returned (seen under load: a live key read as
        # empty); it never reports some of them only. So "none" is confirmed by walking
        # the key one message at a time, which costs one round trip when there is none.
        messages: list[tuple[int, bytes | None]] = []
        seq = 1
        while True:
            try:
                raw = await self.js.get_msg(self.stream, seq=seq, subject=self._subject(request_id), next=True)
            except nats.js.errors.NotFoundError:
                return messages
            assert raw.seq is not None
            messages.append((raw.seq, raw.data))
            seq = raw.seq + 1

    # -- writing ----------------------------------------------------------------------
    def writer(self, checkpoint: StreamCheckpoint, revision: int = 0) -> "CheckpointWriter":
        """A writer for a request: a new one (``revision`` 0), or one taken over from
        ``load`` (its ``revision``: the take-over fails if anyone wrote since)."""
        if not is_request_id(checkpoint.request_id):
            raise ValueError(f"request id {checkpoint.request_id!r} cannot be a checkpoint key")
        return CheckpointWriter(self, CheckpointLog(checkpoint, self.policy, self.clock()), revision)

    async def put(self, request_id: str, entry: CheckpointEntry, expected_revision: int | None) -> int:
        """Store one message of the key; its revision. ``expected_revision``: fail with
        :class:`CheckpointSuperseded` unless it is the key's last (None: no check)."""
        data = encode(entry)
        headers = dict(_ROLLUP) if isinstance(entry, StreamCheckpoint) else {}
        if expected_revision is not None:
            headers[_EXPECTED_LAST] = str(expected_revision)
        try:
            ack = await self.js.publish(self._subject(request_id), data, headers=headers or None,
                                        timeout=_WRITE_TIMEOUT)
        except nats.js.errors.APIError as exc:
            if exc.err_code in _WRONG_LAST_SEQUENCE:
                raise CheckpointSuperseded(request_id) from None
            raise
        self.messages_written += 1
        self.bytes_written += len(data)
        kind = "snapshot" if isinstance(entry, StreamCheckpoint) else "delta"
        WRITES.labels(kind).inc()
        WRITE_BYTES.labels(kind).inc(len(data))
        return ack.seq

    async def delete(self, request_id: str) -> None:
        """Remove every message of the request's key (no marker is left)."""
        if is_request_id(request_id):
            await self.js.purge_stream(self.stream, subject=self._subject(request_id))

    # -- the flusher: one task writes every due checkpoint ------------------------------
    # Why one task for all requests and not one per request: the writes due in a tick go
    # out together, so the event loop wakes once per tick, not once per write. A write
    # on its own cost ~375 us of CPU here, 64 written together ~105 us each
    # (sequential vs concurrent puts on loopback, 2-core VM).
    def _register(self, writer: "CheckpointWriter") -> None:
        self._writers.add(writer)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop(), name="checkpoint-flusher")

    def _unregister(self, writer: "CheckpointWriter") -> None:
        self._writers.discard(writer)

    async def _flush_loop(self) -> None:
        tick = max(self.policy.interval, 0.01)
        while self._writers:  # it ends with the last writer; the next one starts it again
            await asyncio.sleep(tick)
            # A writer is due when its interval has passed since the tick that wrote it
            # (a write is timed when it starts); a 10% slack absorbs the loop's jitter.
            now = self.clock() + tick * 0.1
            due = [w for w in self._writers if not w.busy and w.log.due_at() <= now]
            if due:
                await asyncio.gather(*(w.write_now() for w in due))

    async def close(self) -> None:
        """Stop the flusher (writers still open write no more; their checkpoints stay)."""
        for writer in list(self._writers):
            writer._shut()
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None


class CheckpointWriter:
    """Writes one request's checkpoint, batched by its :class:`CheckpointPolicy`: the
    store's flusher writes it when due; ``record`` is cheap and synchronous (called per
    event batch on the streaming path) and only writes at once when
    ``max_pending_tokens`` wait. Never two writes of one request at a time. A failed
    write is logged and redone as a snapshot; the stream never waits for or fails with
    its checkpoint. ``start`` must complete before ``finish``/``close``."""

    def __init__(self, store: CheckpointStore, log_: CheckpointLog, revision: int) -> None:
        self.store = store
        self.log = log_
        self.request_id = log_.state.request_id
        self._revision: int | None = revision  # None: unknown after a failed write
        self._lock = asyncio.Lock()
        self._closed = False
        self._urgent: asyncio.Task[None] | None = None
        self.superseded = False

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    @property
    def closed(self) -> bool:
        """Finished, closed, superseded or failed: it writes no more."""
        return self._closed

    async def start(self) -> None:
        """The first write (a snapshot), now: raises :class:`CheckpointSuperseded` when
        taking over a request someone else wrote since it was loaded, or
        :class:`CheckpointUnavailable`. Then the store's flusher writes it when due."""
        async with self._lock:
            try:
                await self._write()
            except _NATS_FAILURES as exc:
                raise CheckpointUnavailable(f"checkpoint {self.request_id}: {exc!r}") from exc
        self.store._register(self)

    def record(self, token_ids: list[int], last_event_seq: int, instance_id: str | None = None) -> None:
        """One delta of ``token_ids`` became events; events up to ``last_event_seq`` are sent."""
        self.log.record(token_ids, last_event_seq, instance_id)
        if (self.log.pending_tokens >= self.log.policy.max_pending_tokens and not self.busy and not self._closed
                and (self._urgent is None or self._urgent.done())):
            self._urgent = asyncio.create_task(self.write_now())

    async def write_now(self) -> None:
        """One write, unless this writer is closed or superseded. Never raises."""
        if self._closed:
            return
        async with self._lock:
            if self._closed:
                return
            try:
                await self._write()
            except CheckpointSuperseded:
                self._shut()
            except _NATS_FAILURES as exc:
                self.log.failed(self.store.clock())
                self._revision = None
                log.warning("checkpoint_write_failed", request_id=self.request_id, error=repr(exc))
            except Exception:  # a bug here must not reach the stream: stop checkpointing it
                log.exception("checkpoint_writer_failed", request_id=self.request_id)
                self._shut()

    async def finish(self) -> None:
        """The stream ended: stop writing and delete the checkpoint (unless another
        frontend owns it now)."""
        self._shut()
        async with self._lock:  # a write in flight lands before the delete, not after
            pass
        if not self.superseded:
            try:
                await self.store.delete(self.request_id)
            except _NATS_FAILURES as exc:  # it expires with the bucket's max age
                log.warning("checkpoint_delete_failed", request_id=self.request_id, error=repr(exc))

    async def close(self) -> None:
        """Write what is pending, stop writing, and keep the checkpoint (this frontend
        is going away while the request may be resumed elsewhere)."""
        self.store._unregister(self)
        async with self._lock:
            if self.log.dirty and not self._closed:
                with contextlib.suppress(CheckpointSuperseded, *_NATS_FAILURES):
                    await self._write()
            self._closed = True

    def _shut(self) -> None:
        self._closed = True
        self.store._unregister(self)

    async def _write(self) -> None:
        now = self.store.clock()
        entry = self.log.next_entry(now)
        try:
            revision = await self.store.put(self.request_id, entry, self._revision)
        except CheckpointSuperseded:
            self.superseded = True
            log.info("checkpoint_superseded", request_id=self.request_id)
            raise
        self._revision = revision
        self.log.written(entry, now)
