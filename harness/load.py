"""A bounded load of streamed chat completions whose every answer is known in advance.

``Load`` sends at most ``requests`` streamed chat completions, at most ``concurrency`` at
a time, over one or more frontends (request ``i`` goes to ``urls[i % len(urls)]``).
Every request has its own prompt and seed, ``ignore_eos`` and ``max_tokens``, so its
exact answer is known in advance: ``harness.reference.references`` computes it with the
mock engine in this process (its output is a pure function of the token ids so far and
the seed), and ``check`` compares every stream with it token for token (as text, and the
usage's token counts).

    load = Load([fe.url], requests=24, concurrency=8, max_tokens=300, tag="kill")
    task = load.start()
    await load.wait_streaming(8, min_chunks=10)     # every slot is mid-answer
    ...fault...
    streams = await task
    report = await check(streams)                   # Report: ok, failed, identical, ...
    report.assert_perfect()

``resumable=True``: every request opts in to a resumable stream (``Dynrt-Resumable: 1``)
and a client whose connection breaks (or whose stream ends without ``[DONE]``) sends it
again with ``Last-Event-ID`` (to the next URL), up to ``max_resumes`` times: the stream
counts its ``resumes`` and the gap each cost.

A stream can be made to disconnect mid-answer (``cancel_after={index: chunks}``): the
client closes the connection after that many content chunks, as a user pressing stop.
``stop_issuing()`` ends an open-ended run: requests not yet sent are dropped (not
counted), the ones in flight finish.

Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from harness.sse import SseStream

MODEL = "mock-model"


def messages(tag: str, index: int, prompt_words: int = 0) -> list[dict[str, str]]:
    """A prompt of its own per (tag, index): no two requests share a first KV block.
    ``prompt_words``: that many words more of it (long prompts: long prefills)."""
    filler = "".join(f" word{(index + i) % 97}" for i in range(prompt_words))
    return [{"role": "user",
             "content": f"{tag} request {index}: tell me a long story about the river and the city{filler}"}]


@dataclass
class Stream:
    """One streamed request and everything the client saw of it."""

    index: int
    url: str
    tag: str
    max_tokens: int
    seed: int
    cancel_after: int | None = None  # content chunks after which the client disconnects
    prompt_words: int = 0  # words added to the prompt (``messages``)
    sent: bool = False
    sent_at: float = math.nan  # time.monotonic()
    ended_at: float = math.nan
    status: int | None = None
    request_id: str = ""
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    error: str = ""  # "" when the stream ended normally
    done: bool = False  # saw data: [DONE]
    cancelled: bool = False  # the client disconnected on purpose
    last_event_id: str | None = None  # resumable streams: the last event's id
    resumes: int = 0  # times the client resumed it (Last-Event-ID)
    resume_errors: list[str] = field(default_factory=list)  # why each resume was needed
    resumed_at: list[float] = field(default_factory=list)  # monotonic, when each resume was sent
    chunk_times: list[float] = field(default_factory=list)  # monotonic, one per content chunk

    @property
    def ok(self) -> bool:
        return self.sent and not self.cancelled and not self.error and self.done and self.finish_reason is not None

    @property
    def failed(self) -> bool:
        return self.sent and not self.cancelled and not self.ok

    @property
    def max_gap(self) -> float:
        """Longest client-visible pause: from sending to the first chunk, then between chunks."""
        start, end = self.longest_gap()
        return end - start

    def longest_gap(self) -> tuple[float, float]:
        """When the longest client-visible pause (``max_gap``) began and ended (monotonic);
        (0, 0) before any chunk."""
        times = [self.sent_at, *self.chunk_times]
        return max(zip(times, times[1:]), key=lambda gap: gap[1] - gap[0], default=(0.0, 0.0))

    def in_flight_at(self, t: float) -> bool:
        return self.sent and self.sent_at <= t and (math.isnan(self.ended_at) or t <= self.ended_at)

    def overlaps(self, start: float, end: float) -> bool:
        return self.sent and self.sent_at <= end and (math.isnan(self.ended_at) or self.ended_at >= start)

    def body(self) -> dict[str, Any]:
        return {"model": MODEL, "messages": messages(self.tag, self.index, self.prompt_words), "max_tokens": self.max_tokens,
                "seed": self.seed, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


class Load:
    def __init__(self, urls: str | Sequence[str], *, requests: int, concurrency: int, max_tokens: int | Sequence[int],
                 tag: str = "ft", cancel_after: dict[int, int] | None = None, first_index: int = 0,
                 request_timeout: float = 120.0, headers: dict[str, str] | None = None,
                 prompt_words: int = 0, resumable: bool = False, max_resumes: int = 5) -> None:
        """``max_tokens``: one value, or one per request. ``cancel_after``: request index
        → content chunks after which that client disconnects. ``headers``: sent with every
        request (e.g. ``Authorization``). ``prompt_words``: longer prompts (``messages``)."""
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        self.headers = dict(headers or {})
        self.resumable = resumable
        self.max_resumes = max_resumes
        if resumable:
            self.headers["Dynrt-Resumable"] = "1"
        self.concurrency = concurrency
        self.request_timeout = request_timeout
        cancel_after = cancel_after or {}
        per_request = [max_tokens] * requests if isinstance(max_tokens, int) else list(max_tokens)
        assert len(per_request) == requests
        self.streams = [Stream(index=i, url=self.urls[i % len(self.urls)], tag=tag, max_tokens=per_request[i - first_index],
                               seed=i, cancel_after=cancel_after.get(i), prompt_words=prompt_words)
                        for i in range(first_index, first_index + requests)]
        self._next = 0
        self._stop = False
        self._changed = asyncio.Event()
        self.task: asyncio.Task[list[Stream]] | None = None
        self.started_at = math.nan
        self.ended_at = math.nan

    # -- running ----------------------------------------------------------------
    def start(self) -> "asyncio.Task[list[Stream]]":
        self.task = asyncio.create_task(self.run(), name="load")
        return self.task

    async def run(self) -> list[Stream]:
        self.started_at = time.monotonic()
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        timeout = aiohttp.ClientTimeout(total=self.request_timeout, sock_connect=10)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await asyncio.gather(*(self._user(session) for _ in range(self.concurrency)))
        self.ended_at = time.monotonic()
        return self.sent()

    def stop_issuing(self) -> None:
        """Send no more requests; the ones in flight finish."""
        self._stop = True

    async def _user(self, session: aiohttp.ClientSession) -> None:
        while not self._stop and self._next < len(self.streams):
            stream = self.streams[self._next]
            self._next += 1
            await self._one(session, stream)

    async def _one(self, session: aiohttp.ClientSession, stream: Stream) -> None:
        stream.sent = True
        stream.sent_at = time.monotonic()
        self._poke()
        url = stream.url
        try:
            while True:
                broken = await self._attempt(session, stream, url)
                if not (self.resumable and broken and stream.last_event_id is not None) \
                        or stream.resumes >= self.max_resumes:
                    return
                # Broken mid-answer: resume (a 503 or 409 on a resume is retried too).
                stream.resume_errors.append(stream.error)
                stream.resumes += 1
                stream.error = ""
                url = self.urls[(self.urls.index(url) + 1) % len(self.urls)] if url in self.urls else url
                await asyncio.sleep(0.05 * (stream.resumes - 1))  # the first at once
        finally:
            stream.ended_at = time.monotonic()
            self._poke()

    async def _attempt(self, session: aiohttp.ClientSession, stream: Stream, url: str) -> bool:
        """One request (or resume); True if the connection broke or the stream ended
        without ``[DONE]`` or the answer is "retry" (503, 409): worth resuming."""
        headers = self.headers
        if stream.last_event_id is not None:
            headers = {**headers, "Last-Event-ID": stream.last_event_id}
            stream.resumed_at.append(time.monotonic())
        try:
            async with session.post(f"{url}/v1/chat/completions", json=stream.body(), headers=headers) as response:
                stream.status = response.status
                if response.status != 200:
                    stream.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                    return response.status in (409, 503)
                events = SseStream(response)
                async for chunk in events:
                    stream.last_event_id = events.last_event_id or stream.last_event_id
                    if "error" in chunk:
                        error = chunk["error"]
                        stream.error = f"stream error {error.get('code')}: {error.get('message', '')[:200]}"
                        continue
                    stream.request_id = chunk.get("id") or stream.request_id
                    if chunk.get("usage"):
                        stream.usage = chunk["usage"]
                    for choice in chunk.get("choices", []):
                        content = choice.get("delta", {}).get("content")
                        if content:
                            stream.text += content
                            stream.chunk_times.append(time.monotonic())
                            self._poke()
                        if choice.get("finish_reason"):
                            stream.finish_reason = choice["finish_reason"]
                    if stream.cancel_after is not None and len(stream.chunk_times) >= stream.cancel_after:
                        stream.cancelled = True
                        response.close()  # drop the connection mid-answer
                        return False
                stream.last_event_id = events.last_event_id or stream.last_event_id
                stream.done = events.done
                if not stream.done and not stream.error:
                    stream.error = "stream ended without [DONE]"
                    return True
                return False
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            stream.error = f"{type(exc).__name__}: {exc}"[:300]
            return not stream.cancelled

    def _poke(self) -> None:
        self._changed.set()

    # -- observing ----------------------------------------------------------------
    def sent(self) -> list[Stream]:
        return [s for s in self.streams if s.sent]

    def in_flight(self) -> list[Stream]:
        return [s for s in self.streams if s.sent and math.isnan(s.ended_at)]

    def finished(self) -> list[Stream]:
        return [s for s in self.streams if s.sent and not math.isnan(s.ended_at)]

    async def wait_until(self, predicate: Callable[[], bool], timeout: float, what: str) -> float:
        """Wait (event-driven) until ``predicate()``; returns the seconds it took."""
        start = time.monotonic()
        while not predicate():
            if self.task is not None and self.task.done():
                self.task.result()  # re-raise a crash of the load itself
                raise AssertionError(f"load ended before {what}")
            remaining = timeout - (time.monotonic() - start)
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.1))
            except asyncio.TimeoutError:
                pass
        return time.monotonic() - start

    async def wait_streaming(self, count: int, min_chunks: int = 10, timeout: float = 30.0) -> list[Stream]:
        """Until ``count`` requests are in flight with at least ``min_chunks`` chunks each."""
        def streaming() -> list[Stream]:
            return [s for s in self.in_flight() if len(s.chunk_times) >= min_chunks]

        await self.wait_until(lambda: len(streaming()) >= count, timeout,
                              f"{count} streams with {min_chunks}+ chunks")
        return streaming()

    async def wait_finished(self, count: int, timeout: float = 60.0) -> None:
        await self.wait_until(lambda: len(self.finished()) >= count, timeout, f"{count} finished requests")
