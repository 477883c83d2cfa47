"""Resumable streams, the pure part: event ids, and the claim they rest on — a stream cut
after ANY event and resumed from that event's id, with the output arriving in other
batches and a checkpoint at any point, gives the client the uninterrupted answer
exactly once (the real TextStream, detokenizer, stop strings and SSE encoders)."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

from dynrt.frontend.choices import Choice
from dynrt.frontend.event_ids import EventPosition, parse_event_id, split_events, tag_events
from dynrt.frontend.attempt_reader import TokenDelta
from dynrt.frontend.resume import ResumeFeed, StreamEvents, write_resumable
from dynrt.frontend.sse import DONE, ChatChunkEncoder
from dynrt.frontend.text_stream import TextStream
from dynrt.frontend.tokenizer import load_tokenizer
from dynrt.runtime.protocol import TokenizerSpec

RID = "chatcmpl-0123abcd"


def test_event_ids_round_trip() -> None:
    position = EventPosition(12, 3, 1, True)
    assert position.id(RID) == f"{RID}.12.3.1.1"
    assert parse_event_id(f" {RID}.12.3.1.1 ") == (RID, position)
    assert parse_event_id(f"{RID}.0.0.0.0")[1].opening
    for bad in ("", RID, f"{RID}.1", f"{RID}.1.2.0.0", f"{RID}.3.1.0.2", f"{RID}.x.1.0.0", f"a.b.1.1.0.0",
                f"{RID}.1.1.0.0.0", f"{RID}.-1.0.0.0", f"{RID}.1.1.٣.0", "x*.1.1.0.0"):
        with pytest.raises(ValueError):
            parse_event_id(bad)


def test_tag_events_skips_and_numbers() -> None:
    events = split_events(b"data: a\n\ndata: b\n\ndata: c\n\n")
    assert events == [b"data: a\n\n", b"data: b\n\n", b"data: c\n\n"]
    assert tag_events(events, RID, 5, 2, False, skip=1) == \
        f"id: {RID}.5.2.1.0\ndata: b\n\nid: {RID}.5.2.2.0\ndata: c\n\n".encode()


class FakeGeneration:
    """Token batches as a worker would send them (``sizes``: tokens per batch)."""

    def __init__(self, tokens: list[int], sizes: list[int], finish: str = "length") -> None:
        self.request_id = RID
        self.prompt_ids = [1, 2, 3]
        self.cached_tokens = 0
        self.instance = None
        self.tokens, self.sizes, self.finish = tokens, sizes, finish

    async def token_batches(self) -> AsyncIterator[list[TokenDelta]]:
        at = 0
        for size in self.sizes:
            chunk = self.tokens[at:at + size]
            at += size
            yield [TokenDelta(chunk, self.finish if at >= len(self.tokens) else None)]
        assert at >= len(self.tokens)


class FakeWriter:
    def __init__(self) -> None:
        self.recorded: list[int] = []

        class _Log:
            class state:
                created = 1_700_000_000.0

        self.log = _Log()

    def record(self, token_ids: list[int], last_event_seq: int, instance_id: str | None = None) -> None:
        self.recorded += token_ids


class FakeResponse:
    def __init__(self) -> None:
        self.body = b""

    async def write(self, data: bytes) -> None:
        self.body += data

    async def write_eof(self, data: bytes = b"") -> None:
        self.body += data


def _sizes(total: int, rng: random.Random) -> list[int]:
    sizes = []
    while sum(sizes) < total:
        sizes.append(rng.randint(1, 4))
    return sizes


async def _stream(source: Any, generation: Any, stops: list[str], resume_at: EventPosition | None = None,
                  checkpointed: int = 0) -> tuple[bytes, FakeWriter]:
    tokenizer = load_tokenizer(TokenizerSpec(kind="mock"))
    text = TextStream(source, tokenizer.new_detokenizer(generation.prompt_ids), stops)
    choice = Choice(0, generation, text, None, 0)  # type: ignore[arg-type]
    encoder = ChatChunkEncoder(RID, "m", 1_700_000_000)
    writer = FakeWriter()
    events = StreamEvents(RID, writer, generation, resume_at, checkpointed)  # type: ignore[arg-type]
    response = FakeResponse()
    await write_resumable(response, choice, encoder, encoder.role(), events, "chat",  # type: ignore[arg-type]
                          lambda: DONE, lambda n: None)
    return response.body, writer


def _read(body: bytes) -> tuple[list[str], str, list[str], int]:
    """(ids, content, finish reasons, [DONE] count) of an SSE body."""
    ids, content, finishes, done = [], "", [], 0
    for event in split_events(body):
        lines = event.decode().strip("\n").split("\n")
        assert lines[0].startswith("id: ") and lines[1].startswith("data: "), event
        ids.append(lines[0][4:])
        data = lines[1][6:]
        if data == "[DONE]":
            done += 1
            continue
        choice = json.loads(data)["choices"][0]
        content += choice["delta"].get("content") or ""
        if choice.get("finish_reason"):
            finishes.append(choice["finish_reason"])
    return ids, content, finishes, done


@pytest.mark.parametrize("seed", range(6))
async def test_resume_after_every_event_gives_the_answer_once(seed: int) -> None:
    rng = random.Random(seed)
    tokenizer = load_tokenizer(TokenizerSpec(kind="mock"))
    tokens = tokenizer.encode("the quick brown fox jumps over the lazy dog and then it sleeps " * 2,
                              add_special_tokens=False)
    stops = [] if seed % 2 else ["lazy dog and then it sl"]  # hold-back, and a stop string that ends it
    original = FakeGeneration(tokens, _sizes(len(tokens), rng))
    body, writer = await _stream(original, original, stops)
    ids, content, finishes, done = _read(body)
    assert done == 1 and len(finishes) == 1 and content
    assert len(set(ids)) == len(ids)
    events = split_events(body)
    for k, last_id in enumerate(ids):
        _, position = parse_event_id(last_id)
        # The checkpoint may be behind or ahead of the client; the rest of the output
        # arrives in other batches.
        known = rng.randint(0, len(writer.recorded))
        rest = writer.recorded[known:] if stops else tokens[known:]
        resumed = FakeGeneration(rest, _sizes(len(rest), rng) or [0])
        feed = ResumeFeed(resumed, tokens[:known], position)  # type: ignore[arg-type]
        tail, _ = await _stream(feed, resumed, stops, position, known)
        got = _read(b"".join(events[:k + 1]) + tail)
        assert got[1:] == (content, finishes, 1), (seed, k, last_id, known)
