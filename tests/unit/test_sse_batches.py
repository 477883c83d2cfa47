"""A batch of deltas (what a generation had ready at once) is written as one byte string:
byte-equal to the events of its deltas one by one, for every kind of text."""

from __future__ import annotations

import json
import random

import pytest

from dynrt.frontend.choices import Choice, batch_bytes, event_bytes
from dynrt.frontend.sse import ChatChunkEncoder, CompletionChunkEncoder
from dynrt.frontend.text_stream import TextDelta

TEXTS = ["hello", " world", 'quote " backslash \\ slash /', "newline\n tab\t cr\r", "control \x00 \x01 \x1f \x7f",
         "unicode é 日本 🙂 \u2028 \u2029", "@@dynrt-text@@", "data: [DONE]\n\n", "\ud800".encode(
             "utf-8", "surrogatepass").decode("utf-8", "replace"), "x" * 300]


def random_texts(rng: random.Random, count: int) -> list[str]:
    alphabet = [chr(c) for c in range(0, 0x80)] + ["é", "日", "🙂", "\u2028", "\ufffd", '"', "\\"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(count)]


ENCODERS = [ChatChunkEncoder("chatcmpl-abc", 'org/model:v1 "q"', 1700000000),
            CompletionChunkEncoder("cmpl-abc", 'org/model:v1 "q"', 1700000000, index=2)]


@pytest.mark.parametrize("encoder", ENCODERS)
def test_contents_is_the_content_events_joined(encoder: ChatChunkEncoder | CompletionChunkEncoder) -> None:
    rng = random.Random(7)
    for texts in [TEXTS, TEXTS[:1], *(random_texts(rng, rng.randint(1, 20)) for _ in range(200))]:
        data = encoder.contents(texts)
        assert data == b"".join(encoder.content(t) for t in texts)
        events = data.split(b"\n\n")[:-1]
        assert len(events) == len(texts)  # JSON escapes every newline: one event per text
        for event, text in zip(events, texts):
            body = json.loads(event.removeprefix(b"data: "))
            assert (body["choices"][0]["delta"]["content"] if "delta" in body["choices"][0]
                    else body["choices"][0]["text"]) == text


def _choice() -> Choice:
    return Choice(0, None, None, None, 0)  # type: ignore[arg-type]


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("finish", [None, "length", "stop"])
def test_batch_bytes_equal_the_events_one_by_one(endpoint: str, finish: str | None) -> None:
    encoder = ENCODERS[0] if endpoint == "chat" else ENCODERS[1]
    rng = random.Random(11)
    for _ in range(100):
        texts = random_texts(rng, rng.randint(1, 10))
        texts[rng.randrange(len(texts))] = ""  # a delta without text (held back, or a stop token)
        batch = [TextDelta(t, [i]) for i, t in enumerate(texts)]
        batch[-1].finish_reason = finish  # type: ignore[assignment]
        expected = b"".join(event_bytes(_choice(), encoder, d, endpoint) for d in batch)
        assert batch_bytes(_choice(), encoder, batch, endpoint) == expected
