"""Resumable streamed completions for the official ``openai`` SDK.

A streamed completion served by dynrt survives the loss of the frontend that carries
it: the client sends the same request again, to any frontend, with the id of the last
event it received, and gets every event after it exactly once (docs/resumable-streams.md).
This module does that transparently around the SDK's own streaming call::

    from openai import OpenAI
    from dynrt.client import resumable_stream

    client = OpenAI(base_url="http://dynrt-lb:8000/v1", api_key="...")
    for chunk in resumable_stream(client, model="m", messages=[...]):
        print(chunk.choices[0].delta.content or "", end="")

It yields the SDK's own typed objects (``ChatCompletionChunk``; ``Completion`` for
:func:`resumable_completion_stream`), and has async twins for ``AsyncOpenAI``.

What it does on a failure (:class:`ResumeState` holds these decisions, without I/O):

- a connection error, a timeout, a stream that ended without ``[DONE]``, or a
  408/409/429/502/503/504 answer is retried after a backoff (the server's ``Retry-After``
  when it gave one), each try on the next of ``base_urls`` when several are given, at
  most ``RetryPolicy.max_retries`` times and ``RetryPolicy.max_wait`` seconds in a row
  without an event received in between; then the last error is raised;
- once an event id was received, a retry is a resume (``Last-Event-ID``); a resume
  answered 400/403/404/410 raises :class:`ResumeError`: it never turns into a fresh
  generation;
- when no event was received yet, the retry is the request sent fresh;
- a stream whose events carry no ids (a server that does not support resuming) cannot
  be resumed once an event was received: its error is raised as is.

The generator is lazy: the request is sent on the first ``next()``; an async caller
that stops early should close it (``contextlib.aclosing``) to release the connection at
once. A frontend that hangs rather than dies is noticed only when the SDK's read
timeout fires (600 s by default): pass ``timeout=`` for a shorter one. The SDK's own
retries are turned off for the helper's requests (``max_retries=0``) so that the retry
budget above is the whole of it.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import openai
from openai import AsyncOpenAI, AsyncStream, OpenAI, Stream
from openai.types import Completion
from openai.types.chat import ChatCompletionChunk

__all__ = [
    "RESUMABLE_HEADER",
    "LAST_EVENT_ID_HEADER",
    "RetryPolicy",
    "ResumeError",
    "StreamEndedEarly",
    "ResumeState",
    "resumable_stream",
    "resumable_completion_stream",
    "async_resumable_stream",
    "async_resumable_completion_stream",
]

RESUMABLE_HEADER = "Dynrt-Resumable"
LAST_EVENT_ID_HEADER = "Last-Event-ID"

# A resume answered with one of these failed for good (unknown or finished request,
# another API key, grace period over, a body unlike the original's).
RESUME_REFUSED_STATUSES = frozenset({400, 403, 404, 410})
# Answers that say "not now": a frontend or load balancer without capacity, or between
# instances. 500 is a server bug and is raised, like any other status.
# 409: the stream is held by another connection (a previous attempt of ours the server
# has not yet seen closed): it is free again a moment later.
RETRY_STATUSES = frozenset({408, 409, 429, 502, 503, 504})

# Standard logging, not dynrt.runtime.log: a client library logs into its application's
# logging setup, and this module needs nothing of dynrt but itself (only ``openai``).
# The last event id in each line names the stream (it carries the request id).
_log = logging.getLogger(__name__)

_Chunk = TypeVar("_Chunk")

# openai < 3 (httpx) lets a transport error that happens while a stream is read out
# unwrapped (httpx.RemoteProtocolError for a cut chunked body, httpx.ReadTimeout, ...);
# openai 3 (httpx2) wraps it in APIConnectionError. Whichever of the two the SDK uses
# is imported by now.
_TRANSPORT_ERRORS: tuple[type[Exception], ...] = tuple(
    sys.modules[name].TransportError for name in ("httpx", "httpx2") if name in sys.modules)


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep trying through one outage (failures with no event between them)."""

    max_retries: int = 8
    """Retries after consecutive failed attempts; the budget starts over at every event."""
    max_wait: float = 30.0
    """Seconds from the first failure of an outage after which no retry starts (dynrt's
    default resume grace period is about 30 s: a resume after it gets 410)."""
    initial_backoff: float = 0.1
    max_backoff: float = 2.0

    def backoff(self, failures: int) -> float:
        """Exponential backoff with jitter (half fixed, half random) before retry
        ``failures``; none before the first: a lost stream is resumed at once (the
        next frontend is most likely fine, and every millisecond is a gap the user sees)."""
        if failures <= 1:
            return 0.0
        ceiling = min(self.max_backoff, self.initial_backoff * 2 ** (failures - 2))
        return ceiling / 2 + random.uniform(0, ceiling / 2)


class ResumeError(openai.APIStatusError):
    """A resume was refused (400, 403, 404 or 410): the rest of the answer cannot be had.

    An ``openai.APIStatusError`` (``status_code``, ``code`` such as ``resume_not_found``
    or ``resume_expired``, ``body``), plus the id of the last event received."""

    def __init__(self, error: openai.APIStatusError, last_event_id: str) -> None:
        super().__init__(f"resume after event {last_event_id!r} refused: {error.message}",
                         response=error.response, body=error.body)
        self.last_event_id = last_event_id


class StreamEndedEarly(openai.APIConnectionError):
    """The response body ended without ``data: [DONE]``: the server went away mid-stream."""


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """The wait a 429/503 answer asks for: ``retry-after-ms``, or ``Retry-After`` in
    seconds (a float is accepted, as the SDK does) or as an HTTP date."""
    if (millis := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class ResumeState:
    """What one resumable stream has seen and what to do after a failure; no I/O.

    The I/O loops tell it every server-sent event (:meth:`saw_event`) and every failed
    attempt (:meth:`after_failure`, which returns the wait before the next attempt or
    raises); they ask it for the next attempt's base URL and headers."""

    def __init__(self, policy: RetryPolicy, base_urls: Sequence[str] = ()) -> None:
        self.policy = policy
        self.base_urls = tuple(base_urls)
        self.last_event_id: str | None = None
        self.events = 0
        self.done = False
        self.events_without_id = False
        self.failures = 0
        self._outage_started: float | None = None
        self._url_index = 0

    @property
    def base_url(self) -> str | None:
        """The frontend for the next attempt; ``None``: the client's own base URL."""
        return self.base_urls[self._url_index % len(self.base_urls)] if self.base_urls else None

    def headers(self) -> dict[str, str]:
        headers = {RESUMABLE_HEADER: "1"}
        if self.last_event_id is not None:
            headers[LAST_EVENT_ID_HEADER] = self.last_event_id
        return headers

    def saw_event(self, event_id: str | None, data: str) -> None:
        """An event arrived complete. ``event_id`` is the SSE last-event-id after it."""
        if data.startswith("[DONE]"):
            self.done = True
        else:
            self.events += 1
            self.failures = 0
            self._outage_started = None
        if event_id:
            self.last_event_id = event_id
        elif not self.done:
            self.events_without_id = True

    def after_failure(self, error: openai.APIError, now: float) -> float:
        """Seconds to wait before the next attempt, or raises: ``error`` itself when it
        is not worth a retry or the budget is spent, :class:`ResumeError` when a resume
        was refused."""
        retry_after: float | None = None
        if isinstance(error, openai.APIStatusError):
            if self.last_event_id is not None and error.status_code in RESUME_REFUSED_STATUSES:
                raise ResumeError(error, self.last_event_id) from error
            if error.status_code not in RETRY_STATUSES:
                raise error
            retry_after = retry_after_seconds(error.response.headers)
        elif not isinstance(error, openai.APIConnectionError):
            raise error  # an error event in the stream: the server's answer, not an outage
        if self.events and self.events_without_id:
            _log.warning("stream lost after %d events without ids: the server does not "
                         "resume this stream; not retrying", self.events)
            raise error
        self.failures += 1
        if self._outage_started is None:
            self._outage_started = now
        if self.failures > self.policy.max_retries:
            raise error
        wait = retry_after if retry_after is not None else self.policy.backoff(self.failures)
        if now + wait - self._outage_started > self.policy.max_wait:
            raise error
        self._url_index += 1
        return wait

    def log_retry(self, error: BaseException, wait: float) -> None:
        _log.warning("stream attempt failed (%s: %s); retry %d/%d in %.2fs on %s, %s",
                     type(error).__name__, error, self.failures, self.policy.max_retries, wait,
                     self.base_url or "the client's base URL",
                     f"resuming after event {self.last_event_id}" if self.last_event_id
                     else "sent fresh (no event received)")


class _SSEDecoder(Protocol):
    def iter_bytes(self, iterator: Iterator[bytes]) -> Iterator[Any]: ...
    def aiter_bytes(self, iterator: AsyncIterator[bytes]) -> AsyncIterator[Any]: ...


class _EventTap:
    """Stands in for a stream's SSE decoder: passes every event on, telling the state.

    Why a tap on the SDK's decoder: the SDK parses the event ids (``ServerSentEvent.id``)
    but its ``Stream`` yields only the parsed data. The alternatives were worse: reading
    the body ourselves (``with_streaming_response`` + our own SSE parser + building the
    chunk models) would duplicate what the SDK does to an event (``[DONE]``, error
    events, strict or lenient model building), and the chunks could differ from the
    SDK's; a client subclass overriding ``_make_sse_decoder`` would make callers build
    our client instead of theirs. The tap touches one private attribute of the stream
    (``_decoder``, read on the first iteration) and leaves everything else to the SDK;
    :func:`_tap` fails loudly if an SDK version lacks it."""

    def __init__(self, inner: _SSEDecoder, state: ResumeState) -> None:
        self._inner = inner
        self._state = state

    def iter_bytes(self, iterator: Iterator[bytes]) -> Iterator[Any]:
        for event in self._inner.iter_bytes(iterator):
            self._state.saw_event(event.id, event.data)
            yield event

    async def aiter_bytes(self, iterator: AsyncIterator[bytes]) -> AsyncIterator[Any]:
        async for event in self._inner.aiter_bytes(iterator):
            self._state.saw_event(event.id, event.data)
            yield event


def _tap(stream: Stream[Any] | AsyncStream[Any], state: ResumeState) -> None:
    decoder = getattr(stream, "_decoder", None)
    if decoder is None:
        raise RuntimeError(f"openai {openai.__version__}: its Stream has no _decoder; "
                           "dynrt.client cannot read event ids from this SDK version")
    stream._decoder = _EventTap(decoder, state)  # type: ignore[union-attr]


def _attempt_options(state: ResumeState) -> dict[str, Any]:
    options: dict[str, Any] = {"max_retries": 0}
    if state.base_url is not None:
        options["base_url"] = state.base_url
    return options


def _request_kwargs(create_kwargs: dict[str, Any], state: ResumeState) -> dict[str, Any]:
    if create_kwargs.get("stream", True) is not True:
        raise ValueError("a resumable stream is streamed: leave out stream= or pass stream=True")
    extra_headers = {**(create_kwargs.get("extra_headers") or {}), **state.headers()}
    return {**create_kwargs, "stream": True, "extra_headers": extra_headers}


def _resume_sync(client: OpenAI, create: Callable[[OpenAI], Callable[..., Stream[_Chunk]]],
                 base_urls: Sequence[str], retry: RetryPolicy,
                 create_kwargs: dict[str, Any]) -> Iterator[_Chunk]:
    state = ResumeState(retry, base_urls)
    while True:
        try:
            stream = create(client.with_options(**_attempt_options(state)))(
                **_request_kwargs(create_kwargs, state))
            _tap(stream, state)
            with stream:
                try:
                    yield from stream
                except _TRANSPORT_ERRORS as lost:
                    raise openai.APIConnectionError(message=f"{type(lost).__name__}: {lost}",
                                                    request=stream.response.request) from lost
            if state.done:
                return
            raise StreamEndedEarly(message="stream ended without [DONE]", request=stream.response.request)
        except (openai.APIStatusError, openai.APIConnectionError) as error:
            wait = state.after_failure(error, time.monotonic())
            state.log_retry(error, wait)
        time.sleep(wait)


async def _resume_async(client: AsyncOpenAI,
                        create: Callable[[AsyncOpenAI], Callable[..., Awaitable[AsyncStream[_Chunk]]]],
                        base_urls: Sequence[str], retry: RetryPolicy,
                        create_kwargs: dict[str, Any]) -> AsyncIterator[_Chunk]:
    state = ResumeState(retry, base_urls)
    while True:
        try:
            stream = await create(client.with_options(**_attempt_options(state)))(
                **_request_kwargs(create_kwargs, state))
            _tap(stream, state)
            async with stream:
                try:
                    async for chunk in stream:
                        yield chunk
                except _TRANSPORT_ERRORS as lost:
                    raise openai.APIConnectionError(message=f"{type(lost).__name__}: {lost}",
                                                    request=stream.response.request) from lost
            if state.done:
                return
            raise StreamEndedEarly(message="stream ended without [DONE]", request=stream.response.request)
        except (openai.APIStatusError, openai.APIConnectionError) as error:
            wait = state.after_failure(error, time.monotonic())
            state.log_retry(error, wait)
        await asyncio.sleep(wait)


def resumable_stream(client: OpenAI, *, base_urls: Sequence[str] = (), retry: RetryPolicy = RetryPolicy(),
                     **create_kwargs: Any) -> Iterator[ChatCompletionChunk]:
    """``client.chat.completions.create(stream=True, **create_kwargs)``, resumed across
    lost connections. ``base_urls`` (each like the client's ``base_url``, e.g.
    ``http://host:8000/v1``): frontends to rotate through on failure, starting with the
    first; empty: the client's own base URL (a load balancer in front of the frontends)."""
    return _resume_sync(client, lambda c: c.chat.completions.create, base_urls, retry, create_kwargs)


def resumable_completion_stream(client: OpenAI, *, base_urls: Sequence[str] = (),
                                retry: RetryPolicy = RetryPolicy(),
                                **create_kwargs: Any) -> Iterator[Completion]:
    """:func:`resumable_stream` for ``client.completions.create`` (legacy completions)."""
    return _resume_sync(client, lambda c: c.completions.create, base_urls, retry, create_kwargs)


def async_resumable_stream(client: AsyncOpenAI, *, base_urls: Sequence[str] = (),
                           retry: RetryPolicy = RetryPolicy(),
                           **create_kwargs: Any) -> AsyncIterator[ChatCompletionChunk]:
    """:func:`resumable_stream` for ``AsyncOpenAI``: ``async for chunk in ...``."""
    return _resume_async(client, lambda c: c.chat.completions.create, base_urls, retry, create_kwargs)


def async_resumable_completion_stream(client: AsyncOpenAI, *, base_urls: Sequence[str] = (),
                                      retry: RetryPolicy = RetryPolicy(),
                                      **create_kwargs: Any) -> AsyncIterator[Completion]:
    """:func:`resumable_completion_stream` for ``AsyncOpenAI``."""
    return _resume_async(client, lambda c: c.completions.create, base_urls, retry, create_kwargs)
