"""SSE chunks: every event is valid JSON equal to a plain encoding of the chunk."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from dynrt.frontend import errors
from dynrt.frontend.openai_protocol import UsageInfo
from dynrt.frontend.sse import DONE, ChatChunkEncoder, CompletionChunkEncoder, error_event

TEXTS = [
    "hello",
    " world",
    "",
    'quote " backslash \\ slash /',
    "newline\n tab\t cr\r",
    "control \x00 \x01 \x1f \x7f",
    "unicode é 日本 🙂 \u2028 \u2029",
    "@@dynrt-text@@",  # the splice marker itself, as text
    "data: [DONE]\n\n",
]


def payload(event: bytes) -> Any:
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    body = event[len(b"data: ") : -2]
    assert b"\n" not in body  # one line per event
    return json.loads(body)


def chat_chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-abc",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "org/model:v1 \"q\"",
        "choices": choices,
        **extra,
    }


def completion_chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "id": "cmpl-abc",
        "object": "text_completion",
        "created": 1700000000,
        "model": "org/model:v1 \"q\"",
        "choices": choices,
        **extra,
    }


def reference(obj: Any) -> bytes:
    """The straightforward encoding of a chunk, for byte-for-byte comparison."""
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


@pytest.fixture
def chat_encoder() -> ChatChunkEncoder:
    return ChatChunkEncoder("chatcmpl-abc", 'org/model:v1 "q"', 1700000000)


@pytest.fixture
def completion_encoder() -> CompletionChunkEncoder:
    return CompletionChunkEncoder("cmpl-abc", 'org/model:v1 "q"', 1700000000)


@pytest.mark.parametrize("text", TEXTS)
def test_chat_content_chunk(chat_encoder: ChatChunkEncoder, text: str) -> None:
    event = chat_encoder.content(text)
    expected = chat_chunk([{"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}])
    assert payload(event) == expected
    assert event == reference(expected)


@pytest.mark.parametrize("text", TEXTS)
def test_completion_content_chunk(completion_encoder: CompletionChunkEncoder, text: str) -> None:
    event = completion_encoder.content(text)
    expected = completion_chunk([{"index": 0, "text": text, "logprobs": None, "finish_reason": None}])
    assert payload(event) == expected
    assert event == reference(expected)


def test_chat_role_finish_usage(chat_encoder: ChatChunkEncoder) -> None:
    role = chat_chunk(
        [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
    )
    assert chat_encoder.role() == reference(role)
    finish = chat_chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}])
    assert chat_encoder.finish("length") == reference(finish)
    usage = chat_chunk(
        [],
        usage={
            "prompt_tokens": 4,
            "completion_tokens": 6,
            "total_tokens": 10,
            "prompt_tokens_details": {"cached_tokens": 2},
        },
    )
    assert chat_encoder.usage(UsageInfo.of(4, 6, cached_tokens=2)) == reference(usage)


def test_completion_finish_usage(completion_encoder: CompletionChunkEncoder) -> None:
    finish = completion_chunk([{"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}])
    assert completion_encoder.finish("stop") == reference(finish)
    usage = completion_chunk(
        [],
        usage={
            "prompt_tokens": 1,
            "completion_tokens": 2,
            "total_tokens": 3,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    )
    assert completion_encoder.usage(UsageInfo.of(1, 2)) == reference(usage)


def test_done_and_error_event() -> None:
    assert DONE == b"data: [DONE]\n\n"
    event = error_event(errors.internal())
    first, second = event.split(b"\n\n", 1)
    assert payload(first + b"\n\n") == {
        "error": {
            "message": errors.internal().message,
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    }
    assert second == DONE


def test_openai_client_parses_chunks(
    chat_encoder: ChatChunkEncoder, completion_encoder: CompletionChunkEncoder
) -> None:
    from openai.types import Completion
    from openai.types.chat import ChatCompletionChunk

    usage = UsageInfo.of(1, 1)
    chat_events = [chat_encoder.role(), chat_encoder.content("x"), chat_encoder.finish("stop"), chat_encoder.usage(usage)]
    for event in chat_events:
        ChatCompletionChunk.model_validate_json(event[6:-2])
    # Streamed completions reuse the non-streaming model, whose finish_reason may not be
    # null (the client builds chunks without validation): check the final events only.
    for event in (completion_encoder.finish("stop"), completion_encoder.usage(usage)):
        Completion.model_validate_json(event[6:-2])


def test_content_chunk_is_fast(chat_encoder: ChatChunkEncoder) -> None:
    """Generous bound (≈1 µs/chunk on a laptop); catches an accidental full re-encode."""
    n = 20_000
    start = time.perf_counter()
    for _ in range(n):
        chat_encoder.content(" word")
    per_chunk = (time.perf_counter() - start) / n
    assert per_chunk < 20e-6
