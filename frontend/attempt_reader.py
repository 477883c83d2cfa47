"""Reading one attempt's worker stream: frames in, batches of token deltas out.

A ``Generation`` (``frontend/migration.py``) sends a request to a worker, possibly several
times (migrations); each attempt's ``ResponseStream`` is read by one ``AttemptReader``.
The reader is the frontend's per-token hot path: per turn it waits for a frame, takes
every token frame already received after it (without waiting) and yields their tokens as
one batch, so the consumer answers with one write per batch. When the stream goes silent
longer than its recent inter-token time suggests, the reader pings the worker; every way
the attempt can end early becomes ``StreamInterrupted`` with its migration cause, which
the ``Generation`` turns into a migration (or a client error).
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from dynrt.frontend.errors import InvalidRequest, StreamTakenOver
from dynrt.runtime.config import MigrationConfig
from dynrt.runtime.log import get_logger
from dynrt.runtime.protocol import ErrorFrame, FinishReason, Frame, MigrateFrame, TokenFrame, TokenLogprobs
from dynrt.runtime.transport import (
    NatsTransport,
    NoRespondersError,
    PingTimeoutError,
    ResponseStream,
    StreamBrokenError,
    StreamSilent,
)

log = get_logger("migration")

# Silence longer than this multiple of the stream's recent inter-token time gets the
# worker pinged.
SILENCE_ITL_MULTIPLE = 2.0
# Longest wait between pings while a live worker is busy (long prefill, big batch).
MAX_SILENCE_WINDOW = 0.5

# For benchmarks (``benchmarks/serve.py --chunking one``): with this set to 1 in the
# frontend's environment every token is its own delta, hence its own SSE chunk (event) —
# the tokens of frames already received are not merged into one delta and a frame of
# several tokens is split; they still go out in one write, as the events of a batch —
# so the per-token cost of a frontend that cannot coalesce can be measured. Off by
# default: coalescing costs clients nothing and saves CPU.
ONE_TOKEN_PER_CHUNK_ENV = "DYNRT_FRONTEND_ONE_TOKEN_PER_CHUNK"
_ONE_TOKEN_PER_CHUNK = os.environ.get(ONE_TOKEN_PER_CHUNK_ENV, "") == "1"


@dataclass(slots=True)
class TokenDelta:
    """New token ids for the client; the last one has ``finish_reason``. ``logprobs``
    (when the request asked for them) has one entry per id, across migrations too: a
    resent request returns only the tokens after the ones already delivered."""

    token_ids: list[int]
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprobs] | None = None


class StreamInterrupted(Exception):
    """The attempt ended early; ``cause`` is the migration cause."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


def _interrupted(exc: EOFError | NoRespondersError | StreamBrokenError) -> StreamInterrupted:
    """The migration cause of a stream that ended early or broke."""
    if isinstance(exc, NoRespondersError):
        return StreamInterrupted("no_responders")
    if isinstance(exc, StreamBrokenError):
        return StreamInterrupted("nats_restart" if exc.cause == "nats_disconnected" else exc.cause)
    return StreamInterrupted("ended_early")


class AttemptReader:
    """Reads one attempt's ``stream`` (see the module docstring). Every token id read is
    appended to ``generated`` (the request's list, shared across attempts) before its
    batch is yielded. ``last_token_at`` (time.monotonic() of the latest token, or of the
    send) and ``cached_tokens`` (the worker's prefix-cache hits) are read by the owner.
    ``is_suspect`` says whether the instance's load reports have stopped."""

    __slots__ = ("stream", "request_id", "config", "transport", "generated", "with_logprobs", "is_suspect",
                 "last_token_at", "cached_tokens", "_stashed")

    def __init__(self, stream: ResponseStream, *, request_id: str, config: MigrationConfig,
                 transport: NatsTransport, generated: list[int], with_logprobs: bool,
                 is_suspect: Callable[[], bool], last_token_at: float) -> None:
        self.stream = stream
        self.request_id = request_id
        self.config = config
        self.transport = transport
        self.generated = generated
        self.with_logprobs = with_logprobs
        self.is_suspect = is_suspect
        self.last_token_at = last_token_at
        self.cached_tokens = 0
        self._stashed: Frame | None = None

    async def batches(self) -> AsyncIterator[list[TokenDelta]]:
        """Per turn: wait for a frame, take every token frame already received after it
        (without waiting), and yield their tokens as one batch — one delta (coalesced),
        or one delta per token (``DYNRT_FRONTEND_ONE_TOKEN_PER_CHUNK``); the last delta
        of the last batch has the finish reason. Per frame, i.e. per token when tokens
        arrive one at a time: kept lean."""
        stream = self.stream
        generated = self.generated
        itl = 0.0
        floor = self.config.silence_floor
        window = floor
        with_logprobs = self.with_logprobs
        coalesce = not _ONE_TOKEN_PER_CHUNK
        while True:
            frame = self._ready_frame()
            if frame is None:
                try:
                    await stream.wait(window)  # awaited here: one coroutine frame less per wake-up
                    continue
                except StreamSilent:
                    pass
            if type(frame) is not TokenFrame:
                if frame is None:  # silent for ``window``: is the worker still there?
                    await self._check_alive()
                    window = min(window * 2, MAX_SILENCE_WINDOW)
                elif isinstance(frame, MigrateFrame):
                    raise StreamInterrupted("drained")
                elif isinstance(frame, ErrorFrame):
                    if frame.code == "bad_request":
                        raise InvalidRequest(frame.message)
                    if frame.code == "in_flight":
                        # A resumed request routed to the worker still running it (its
                        # previous frontend had moved it there): take that stream over.
                        raise StreamInterrupted("in_flight")
                    if frame.code == "cancelled":
                        # Another frontend reattached to this request (its client
                        # resumed there): this one's client is gone; nothing to continue,
                        # and nothing to cancel — the request is the other frontend's now.
                        stream.release()
                        raise StreamTakenOver(frame.message)
                    raise StreamInterrupted(frame.code)
                continue
            token_ids = frame.token_ids  # decoded for this read: ours to extend
            if token_ids:
                now = time.monotonic()
                gap = now - self.last_token_at
                itl = gap if itl == 0.0 else 0.8 * itl + 0.2 * gap
                window = max(floor, min(MAX_SILENCE_WINDOW, SILENCE_ITL_MULTIPLE * itl))
                self.last_token_at = now
            logprobs = self._logprobs_of(frame, None) if with_logprobs else None
            finish = frame.finish_reason
            usage = frame.usage
            # The frames that are already here join this batch (the consumer writes a
            # batch at once); anything else waits for the next turn, after these tokens.
            while finish is None and stream.pending():
                more = self._ready_frame()
                if type(more) is not TokenFrame:
                    self._stashed = more
                    break
                token_ids.extend(more.token_ids)
                if with_logprobs:
                    logprobs = self._logprobs_of(more, logprobs)
                finish, usage = more.finish_reason, more.usage
            generated.extend(token_ids)
            if usage is not None and usage.cached_tokens > self.cached_tokens:
                self.cached_tokens = usage.cached_tokens
            aborted = finish == "abort"  # aborted on the worker without our asking
            finish = None if aborted else "stop" if finish == "cancelled" else finish
            if coalesce or len(token_ids) <= 1:
                batch = [TokenDelta(token_ids, finish, logprobs)]
            elif logprobs is None:
                batch = [TokenDelta([t]) for t in token_ids]
                batch[-1].finish_reason = finish
            else:
                batch = [TokenDelta([t], None, logprobs[i:i + 1]) for i, t in enumerate(token_ids)]
                batch[-1].finish_reason = finish
            if aborted:
                if token_ids:
                    yield batch
                raise StreamInterrupted("aborted")
            yield batch
            if finish is not None:
                return

    def _logprobs_of(self, frame: TokenFrame, so_far: list[TokenLogprobs] | None) -> list[TokenLogprobs] | None:
        """``so_far`` extended by the frame's logprobs, one per token, when requested. A
        worker that sends none (or too few) is faulty: the request moves elsewhere."""
        if not self.with_logprobs:
            return None
        if not frame.token_ids:
            return so_far if so_far is not None else []
        if frame.logprobs is None or len(frame.logprobs) != len(frame.token_ids):
            log.error("logprobs_missing", request_id=self.request_id, tokens=len(frame.token_ids),
                      logprobs=len(frame.logprobs or ()))
            raise StreamInterrupted("engine_error")
        return frame.logprobs if so_far is None else so_far + frame.logprobs

    def _ready_frame(self) -> Frame | None:
        """The next frame if one has been received, else None (no waiting); end of
        stream or a broken one becomes ``StreamInterrupted``."""
        if self._stashed is not None:
            frame, self._stashed = self._stashed, None
            return frame
        try:
            return self.stream.ready()
        except (EOFError, NoRespondersError, StreamBrokenError) as exc:
            raise _interrupted(exc) from None

    async def _check_alive(self) -> None:
        """The stream is silent: is the worker still there?"""
        stream = self.stream
        silent_for = time.monotonic() - stream.last_activity
        if silent_for >= self.config.stream_stall_timeout:
            raise StreamInterrupted("stalled")
        try:
            await self.transport.ping(stream.subject, timeout=self.config.ping_timeout)
        except NoRespondersError:
            raise StreamInterrupted("killed") from None
        except PingTimeoutError:
            # Busy or hung. Hung if its load reports stopped too; else the stall timeout decides.
            if self.is_suspect():
                raise StreamInterrupted("suspect") from None
        except StreamBrokenError:
            raise StreamInterrupted("nats_restart") from None
