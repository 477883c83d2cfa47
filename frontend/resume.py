"""Resumable streams on the frontend (issue 18; ``docs/resumable-streams.md``).

A client opts in per request (``Dynrt-Resumable: 1``, or ``"resumable": true``). Its
stream's events then carry ids (``event_ids.py``), its checkpoint — prompt, sampling,
the output token ids — is written to JetStream as it streams (``CheckpointWriter``), and
its generate request asks the worker to keep it for ``--resume-grace`` seconds if this
frontend goes away. A client that lost its connection sends the same request to any
frontend with ``Last-Event-ID`` (or ``"last_event_id"``): that frontend loads the
checkpoint (404 / 410 / 403 when there is none, it expired, or another key started it),
checks the request is the same one (400), takes the checkpoint over (409 while another
connection holds it), reattaches to the worker if it is alive (``Generation.resume``: no
recompute) or migrates from the checkpoint, re-reads the output up to where the client
stopped (:class:`ResumeFeed`) and sends the rest (:class:`StreamEvents`).

This module: the options (``ResumeOptions``), loading a resumption (``Resumes``), the
token feed that puts a resumed generation back at the client's position, and the event
tagging that skips what the client has and records what it sends.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass

import msgspec
from aiohttp import web

from dynrt.frontend import errors
from dynrt.frontend.choices import Choice, event_bytes
from dynrt.frontend.event_ids import OPENING, EventPosition, parse_event_id, split_events, tag_events
from dynrt.frontend.attempt_reader import TokenDelta
from dynrt.frontend.migration import Generation
from dynrt.frontend.openai_protocol import ChatCompletionRequest, CompletionRequest
from dynrt.frontend.sse import ChatChunkEncoder, CompletionChunkEncoder
from dynrt.frontend.text_stream import TextDelta, TokenSource
from dynrt.runtime.auth import bearer_key
from dynrt.runtime.checkpoint_log import api_key_hash
from dynrt.runtime.log import get_logger
from dynrt.runtime.protocol import SamplingParams, StreamCheckpoint
from dynrt.runtime.stream_checkpoints import (CheckpointExpired, CheckpointForbidden, CheckpointNotFound,
                                              CheckpointStore, CheckpointSuperseded, CheckpointUnavailable,
                                              CheckpointWriter, LoadedCheckpoint)

log = get_logger("frontend")

RESUMABLE_HEADER = "Dynrt-Resumable"
LAST_EVENT_ID_HEADER = "Last-Event-ID"
_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")
_UNAVAILABLE_RETRY_AFTER = 1.0


@dataclass(frozen=True, slots=True)
class ResumeOptions:
    """What a request asks for: a resumable stream, and whether it resumes one."""

    resumable: bool
    resume_from: tuple[str, EventPosition] | None  # (request id, the client's last event)

    @classmethod
    def of(cls, request: web.Request, req: ChatCompletionRequest | CompletionRequest) -> "ResumeOptions":
        header = request.headers.get(RESUMABLE_HEADER, "").strip().lower()
        if header and header not in _TRUE + _FALSE:
            raise errors.bad_request(f"{RESUMABLE_HEADER} must be 1 or 0", RESUMABLE_HEADER)
        last = request.headers.get(LAST_EVENT_ID_HEADER) or req.last_event_id
        resume_from = None
        if last is not None:
            try:
                resume_from = parse_event_id(last)
            except ValueError as exc:
                raise errors.bad_request(str(exc), LAST_EVENT_ID_HEADER) from None
        resumable = req.resumable or header in _TRUE or resume_from is not None
        if resumable:
            _check_resumable(req)
        return cls(resumable, resume_from)


def _check_resumable(req: ChatCompletionRequest | CompletionRequest) -> None:
    """What a resumable stream cannot be (yet): every refusal names its parameter."""
    if not req.stream:
        raise errors.bad_request("Resumable streams need 'stream': true", "resumable")
    if req.num_choices() > 1:
        raise errors.unsupported_param("n", "> 1 is not supported with resumable streams")
    if req.top_logprobs_count() is not None:
        # The checkpoint keeps token ids, not their logprobs: a resumed stream could not
        # send the logprobs of the tokens between the checkpoint and the client.
        raise errors.unsupported_param("logprobs", "are not supported with resumable streams")


def api_key_of(request: web.Request) -> str:
    return bearer_key(request.headers.get("Authorization")) or ""


class Resumes:
    """Loads a resumption from the checkpoint store; ``store`` None = JetStream is not
    available (every resumable request gets 503)."""

    def __init__(self, store: CheckpointStore | None) -> None:
        self.store = store

    @property
    def grace(self) -> float:
        """The resume grace the workers are asked to keep a request for: the checkpoint
        policy's (0 without a store: no request is resumable then)."""
        return self.store.policy.grace if self.store is not None else 0.0

    def require_store(self) -> CheckpointStore:
        if self.store is None:
            raise errors.resume_unavailable(_UNAVAILABLE_RETRY_AFTER)
        return self.store

    async def load(self, request_id: str, api_key: str) -> LoadedCheckpoint:
        store = self.require_store()
        try:
            return await store.load(request_id, api_key)
        except CheckpointNotFound:
            raise errors.resume_not_found(request_id) from None
        except CheckpointExpired:
            raise errors.resume_expired(request_id) from None
        except CheckpointForbidden:
            log.warning("resume_forbidden", request_id=request_id)
            raise errors.resume_forbidden() from None
        except CheckpointUnavailable as exc:
            log.warning("resume_store_unavailable", request_id=request_id, error=str(exc))
            raise errors.resume_unavailable(_UNAVAILABLE_RETRY_AFTER) from None

    async def new_writer(self, request_id: str, api_key: str, model: str, prompt_ids: list[int],
                         sampling: SamplingParams, frontend_id: str) -> CheckpointWriter:
        """A new request's checkpoint, its first write done (the prompt)."""
        store = self.require_store()
        now = time.time()
        checkpoint = StreamCheckpoint(request_id=request_id, key_hash=api_key_hash(request_id, api_key), model=model,
                                      prompt_token_ids=prompt_ids, sampling=sampling, frontend_id=frontend_id,
                                      created=now, updated=now)
        writer = store.writer(checkpoint)
        try:
            await writer.start()
        except CheckpointUnavailable as exc:
            log.warning("resume_store_unavailable", request_id=request_id, error=str(exc))
            raise errors.resume_unavailable(_UNAVAILABLE_RETRY_AFTER) from None
        return writer

    async def start(self, generation: Generation, loaded: LoadedCheckpoint | None, options: ResumeOptions,
                    api_key: str, frontend_id: str, arrived: float) -> tuple[StreamEvents, TokenSource]:
        """A resumable stream's checkpoint writer and event ids, and the token source its
        text reads; resuming (``loaded``), the checkpoint taken over and the generation
        put back where the client stopped. ``arrived``: when the request arrived
        (``time.monotonic()``), for the log."""
        if loaded is None:
            writer = await self.new_writer(generation.request_id, api_key, generation.model,
                                           generation.prompt_ids, generation.sampling, frontend_id)
            return StreamEvents(generation.request_id, writer, generation), generation
        check_same_request(loaded.checkpoint, generation.model, generation.prompt_ids, generation.sampling)
        writer, loaded = await self.take_over(loaded, api_key, frontend_id)
        checkpoint = loaded.checkpoint
        assert options.resume_from is not None
        position = options.resume_from[1]
        generation.resume(checkpoint.output_token_ids, checkpoint.instance_id)
        log.info("resuming", request_id=generation.request_id, instance_id=checkpoint.instance_id,
                 checkpointed=len(checkpoint.output_token_ids), client_at=position.end,
                 from_frontend=checkpoint.frontend_id, ms=round((time.monotonic() - arrived) * 1000, 1))
        events = StreamEvents(generation.request_id, writer, generation, position, len(checkpoint.output_token_ids))
        return events, ResumeFeed(generation, checkpoint.output_token_ids, position)

    async def take_over(self, loaded: LoadedCheckpoint, api_key: str, frontend_id: str) -> tuple[CheckpointWriter, LoadedCheckpoint]:
        """The resumed request's checkpoint, now written by this frontend. Once more
        on a write that lost the race (the previous frontend's last write, as its client
        left); 409 if someone else holds it still."""
        store = self.require_store()
        request_id = loaded.checkpoint.request_id
        for attempt in range(2):
            writer = store.writer(_owned_by(loaded.checkpoint, frontend_id), loaded.revision)
            try:
                await writer.start()
                return writer, loaded
            except CheckpointSuperseded:
                if attempt == 1:
                    raise errors.resume_conflict(request_id) from None
                loaded = await self.load(request_id, api_key)
            except CheckpointUnavailable:
                raise errors.resume_unavailable(_UNAVAILABLE_RETRY_AFTER) from None
        raise AssertionError("unreachable")


def _owned_by(checkpoint: StreamCheckpoint, frontend_id: str) -> StreamCheckpoint:
    return msgspec.structs.replace(checkpoint, frontend_id=frontend_id)


def check_same_request(checkpoint: StreamCheckpoint, model: str, prompt_ids: list[int],
                       sampling: SamplingParams) -> None:
    """A resume must send the request it resumes: another prompt or other parameters
    would splice two different answers."""
    if checkpoint.model != model or checkpoint.prompt_token_ids != prompt_ids or checkpoint.sampling != sampling:
        raise errors.bad_request("The request differs from the one that started this stream: a resume must send "
                                 "the same body", LAST_EVENT_ID_HEADER)


class DivergedOutput(errors.MigrationExhausted):
    """A resumed request regenerated from its checkpoint ended before the position the
    client had reached: the output is not the one the client was reading."""

    def __init__(self) -> None:
        super().__init__("the resumed stream could not be continued exactly")


class ResumeFeed:
    """A resumed generation's token deltas, re-cut so that the text pipeline reaches the
    client's position the way the first frontend did: ``[0, start)`` (read, sent to
    nobody), then ``[start, end)`` as one delta (final if it was), then the rest as it
    comes. ``known``: the ids the checkpoint had (the generation starts after them)."""

    def __init__(self, generation: Generation, known: list[int], position: EventPosition) -> None:
        self.generation = generation
        self.prompt_ids = generation.prompt_ids
        self.known = known
        self.position = position

    @property
    def cached_tokens(self) -> int:
        return self.generation.cached_tokens

    async def token_batches(self) -> AsyncIterator[list[TokenDelta]]:
        tokens = list(self.known)
        position = self.position
        async with aclosing(self.generation.token_batches()) as batches:
            if position.opening:
                if tokens:
                    yield [TokenDelta(tokens)]
                async for batch in batches:
                    yield batch
                return
            finish = None
            while finish is None and (len(tokens) < position.end or (len(tokens) == position.end and position.final)):
                try:
                    batch = await anext(batches)
                except StopAsyncIteration:
                    break
                for delta in batch:
                    tokens += delta.token_ids
                    finish = delta.finish_reason
            if len(tokens) < position.end:
                raise DivergedOutput()
            start, end = position.start, position.end
            yield [TokenDelta(tokens[:start])]
            if len(tokens) == end and finish is not None:
                yield [TokenDelta(tokens[start:end], finish)]
                return
            yield [TokenDelta(tokens[start:end])]
            if len(tokens) > end or finish is not None:
                yield [TokenDelta(tokens[end:], finish)]
            if finish is not None:
                return
            async for batch in batches:
                yield batch


class StreamEvents:
    """The events of one resumable stream, with their ids: leaves out what a resuming
    client has, records what is sent in the checkpoint (``writer``)."""

    def __init__(self, request_id: str, writer: CheckpointWriter, generation: Generation,
                 resume_at: EventPosition | None = None, checkpointed: int = 0) -> None:
        self.request_id = request_id
        self.writer = writer
        self.generation = generation
        self.resume_at = resume_at
        self.end = 0  # output tokens read so far
        self.deltas = 0  # deltas read so far
        self.checkpointed = checkpointed  # ids the checkpoint already has (a resumed one)
        self.created = writer.log.state.created  # the chunks' "created", resumed or not

    def opening(self, data: bytes) -> bytes:
        """The opening events (chat role, completions echo)."""
        events = split_events(data)
        at = self.resume_at
        skip = 0 if at is None else at.index + 1 if at.opening else len(events)
        return tag_events(events, self.request_id, 0, 0, False, skip)

    def delta(self, delta: TextDelta, data: bytes) -> bytes:
        """The events of the next delta (``data``: its SSE events, for the last one with
        the usage and ``[DONE]`` events after them); records its tokens."""
        count = delta.token_count
        self.end += count
        self.deltas += 1
        events = split_events(data)
        skip = 0
        at = self.resume_at
        if at is not None and not at.opening:
            # A resumed stream's first delta re-reads what the client has; the second is
            # the delta the client's last event came from (ResumeFeed).
            if self.deltas == 1:
                skip = len(events)
            elif self.deltas == 2:
                skip = at.index + 1
        if self.end > self.checkpointed:
            new = delta.token_ids[max(0, count - (self.end - self.checkpointed)):]
            self.checkpointed = self.end
            instance = self.generation.instance
            self.writer.record(new, self.end, instance.instance_id if instance is not None else None)
        return tag_events(events, self.request_id, self.end, count, delta.finish_reason is not None, skip)


async def write_resumable(response: web.StreamResponse, choice: Choice, encoder: ChatChunkEncoder | CompletionChunkEncoder,
                          opening: bytes, events: StreamEvents, endpoint: str, trailer: Callable[[], bytes],
                          observe: Callable[[int], None]) -> None:
    """Stream one resumable choice: each delta's events tagged (and, resuming, the ones
    the client has left out), a batch per write; the last write (finish, usage,
    ``[DONE]``, all with ids) ends the body. ``trailer``: the usage and ``[DONE]``
    events, asked for once the last delta is read."""
    pending = events.opening(opening)  # goes out with the first output, as vLLM sends the role
    async for batch in choice.text.batches():
        observe(sum(delta.token_count for delta in batch))
        data = b""
        for delta in batch:
            out = event_bytes(choice, encoder, delta, endpoint)
            if delta.finish_reason is not None:
                out += trailer()
            data += events.delta(delta, out)
        if batch[-1].finish_reason is not None:
            await response.write_eof(pending + data)
            return
        if data:
            await response.write(pending + data)
            pending = b""


__all__ = ["DivergedOutput", "LAST_EVENT_ID_HEADER", "OPENING", "RESUMABLE_HEADER", "ResumeFeed", "ResumeOptions",
           "Resumes", "StreamEvents", "api_key_of", "check_same_request", "write_resumable"]
