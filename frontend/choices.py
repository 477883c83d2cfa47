"""The choices of one request: each is its own generation (migrating on its own), with
its text stream, its logprob rendering and, for chat, the rules that read its text as
reasoning, content and tool calls. n > 1 and batched completion prompts give several;
their streams are merged as they arrive, and one failing (or the client leaving) ends
them all.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import msgspec

from dynrt.frontend.chat_output import ChatDeltaAssembler, ChatOutputRules, finish_reason_of, parse_message
from dynrt.frontend.chat_sse import delta_event, message_fields
from dynrt.frontend.logprobs import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, LogprobRenderer
from dynrt.frontend.migration import Generation
from dynrt.frontend.openai_protocol import AssistantMessage
from dynrt.frontend.sse import ChatChunkEncoder, CompletionChunkEncoder
from dynrt.frontend.text_stream import TextDelta, TextStream
from dynrt.runtime.protocol import SamplingParams


def choice_sampling(sampling: SamplingParams, i: int) -> SamplingParams:
    """The sampling of choice ``i`` of ``n``: vLLM gives child ``i`` the seed ``seed + i``
    (``vllm/v1/engine/parallel_sampling.py``); without a seed they share the parameters."""
    if sampling.seed is None or i == 0:
        return sampling
    return msgspec.structs.replace(sampling, seed=sampling.seed + i)


@dataclass(eq=False)
class Choice:
    """One choice of a request: its generation, text, logprob rendering and output."""

    index: int
    generation: Generation
    text: TextStream
    renderer: LogprobRenderer | None
    top_logprobs: int
    echo: str = ""  # completions ``echo``: the prompt text, before the output
    output: ChatOutputRules | None = None  # chat: text read as reasoning / content / tool calls
    assembler: ChatDeltaAssembler | None = None  # ... streamed
    event_header: tuple[str, str, int] = ("", "", 0)  # (id, model, created) of streamed chunks
    parts: list[str] = field(default_factory=list)
    chat_logprobs: list[ChatTokenLogprob] = field(default_factory=list)
    completion_logprobs: list[CompletionLogprobs] = field(default_factory=list)

    def first_of_prompt(self, n: int) -> bool:
        return self.index % n == 0

    def render(self, delta: TextDelta, endpoint: str) -> ChatLogprobs | CompletionLogprobs:
        assert self.renderer is not None and delta.logprobs is not None
        if endpoint == "chat":
            return ChatLogprobs(content=self.renderer.chat(delta.token_ids, delta.logprobs, self.top_logprobs))
        return self.renderer.completion(delta.token_ids, delta.logprobs, self.top_logprobs)

    def message(self) -> AssistantMessage:
        """The chat message of a finished, non-streamed choice."""
        content = "".join(self.parts)
        if self.output is None:
            return AssistantMessage(content=content)
        return AssistantMessage(**message_fields(parse_message(content, self.output)))  # type: ignore[arg-type]

    def finish_reason(self, *, streamed: bool) -> str:
        if self.output is None:
            return self.text.finish_reason
        tools_called = self.assembler.tools_called if streamed and self.assembler is not None else \
            bool(parse_message("".join(self.parts), self.output).tool_calls)
        return finish_reason_of(self.output, tools_called, self.text.finish_reason, streamed=streamed)

    def parsed_events(self, delta: TextDelta) -> bytes:
        """A streamed chat delta read by the output rules: reasoning, content, tool calls."""
        assert self.assembler is not None
        message = self.assembler.feed(delta.text) if delta.text else None
        events = delta_event(*self.event_header, message, self.index) if message else b""
        if delta.finish_reason is not None:
            message = self.assembler.finish()
            if message:
                events += delta_event(*self.event_header, message, self.index)
        return events

    async def collect(self, observe: Callable[[int], None], endpoint: str) -> None:
        """Read the whole choice (non-streaming responses)."""
        async for batch in self.text.batches():
            observe(sum(delta.token_count for delta in batch))
            for delta in batch:
                self.parts.append(delta.text)
                if self.renderer is not None and delta.token_ids:
                    rendered = self.render(delta, endpoint)
                    if isinstance(rendered, ChatLogprobs):
                        self.chat_logprobs += rendered.content or []
                    else:
                        self.completion_logprobs.append(rendered)


def event_bytes(choice: Choice, encoder: ChatChunkEncoder | CompletionChunkEncoder, delta: TextDelta,
                 endpoint: str) -> bytes:
    """The SSE events for one delta of a choice: its text (with the logprobs of the
    tokens it came from, if asked for), and the finish event after the last one. With
    chat output rules (tools, reasoning) the text goes out as parsed deltas, and the
    logprobs in a chunk of their own with empty content."""
    if choice.assembler is not None:
        data = choice.parsed_events(delta)
        if choice.renderer is not None and delta.token_ids:
            data = encoder.content_with_logprobs("", choice.render(delta, endpoint)) + data  # type: ignore[arg-type]
    elif choice.renderer is None:
        data = encoder.content(delta.text) if delta.text else b""
    elif delta.text or delta.token_ids:
        data = encoder.content_with_logprobs(delta.text, choice.render(delta, endpoint))  # type: ignore[arg-type]
    else:
        data = b""
    if delta.finish_reason is not None:
        finish = delta.finish_reason if choice.output is None else choice.finish_reason(streamed=True)
        data += encoder.finish(finish)  # type: ignore[arg-type]
    return data


def batch_bytes(choice: Choice, encoder: ChatChunkEncoder | CompletionChunkEncoder, batch: list[TextDelta],
                endpoint: str) -> bytes:
    """The SSE events of a batch of deltas of a choice (see ``TextStream.batches``),
    written at once: :func:`event_bytes` of each, joined. Plain text without logprobs
    (the hot path) is spliced into the encoder's template in one join."""
    if choice.assembler is not None or choice.renderer is not None:
        return b"".join([event_bytes(choice, encoder, delta, endpoint) for delta in batch])
    texts = [delta.text for delta in batch if delta.text]
    data = encoder.contents(texts) if texts else b""
    finish = batch[-1].finish_reason
    if finish is not None:  # output is None here (output rules come with an assembler)
        data += encoder.finish(finish)
    return data


async def merged(streams: list[TextStream]) -> AsyncIterator[tuple[int, TextDelta]]:
    """The deltas of several choices as they arrive, each tagged with its position. A
    failure of one ends all; so does closing this iterator (the readers are cancelled)."""
    queue: asyncio.Queue[tuple[int, TextDelta | None, Exception | None]] = asyncio.Queue()

    async def read(k: int, stream: TextStream) -> None:
        try:
            async for delta in stream:
                await queue.put((k, delta, None))
        except Exception as exc:  # handed to the consumer, which raises it
            await queue.put((k, None, exc))
            return
        await queue.put((k, None, None))

    readers = [asyncio.ensure_future(read(k, s)) for k, s in enumerate(streams)]
    try:
        open_streams = len(readers)
        while open_streams:
            k, delta, exc = await queue.get()
            if exc is not None:
                raise exc
            if delta is None:
                open_streams -= 1
                continue
            yield k, delta
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


async def all_or_none(coros: list[Coroutine[Any, Any, None]]) -> None:
    """Await all; if one fails (or this is cancelled), cancel the rest first."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
