"""Logprob rendering: the shapes, ordering, clamping and token texts of vLLM's server.

Token texts and the U+FFFD correction are checked against vLLM's own functions (vLLM is
installed in the dev environment; the frontend itself does not import it)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest

from dynrt.frontend.logprobs import LOGPROB_FLOOR, LogprobRenderer, merge_completion
from dynrt.frontend.tokenizer import Tokenizer, load_tokenizer
from dynrt.runtime.mock_tokenizer import BYTE_BASE
from dynrt.runtime.protocol import TokenizerSpec, TokenLogprobs

SMOLLM2 = Path(os.environ.get("DYNRT_SMOLLM2_DIR") or Path.home() / ".cache" / "dynrt" / "smollm2-135m-instruct")


@pytest.fixture(scope="module")
def mock() -> Tokenizer:
    return load_tokenizer(TokenizerSpec(kind="mock"))


def word(tok: Tokenizer, text: str) -> int:
    (token_id,) = tok.encode(text)
    return token_id


def test_chat_entries_sampled_first_then_top(mock: Tokenizer) -> None:
    the, river, cat = word(mock, " the"), word(mock, " river"), word(mock, " water")
    entry = TokenLogprobs(logprob=-2.5, top_ids=[river, the, cat], top_logprobs=[-0.1, -2.5, -3.0])
    renderer = LogprobRenderer(mock)
    (out,) = renderer.chat([the], [entry], top_logprobs=2)
    assert (out.token, out.logprob, out.bytes) == (" the", -2.5, list(b" the"))
    # vLLM's ranked map is {sampled, top...}: the first two entries are the sampled
    # token and the most likely one (the sampled token appears once).
    assert [(t.token, t.logprob) for t in out.top_logprobs] == [(" the", -2.5), (" river", -0.1)]
    assert renderer.chat([the], [entry], top_logprobs=0)[0].top_logprobs == []
    assert [t.token for t in renderer.chat([the], [entry], top_logprobs=5)[0].top_logprobs] == \
        [" the", " river", " water"]


def test_minus_infinity_is_clamped(mock: Tokenizer) -> None:
    the = word(mock, " the")
    entry = TokenLogprobs(logprob=float("-inf"), top_ids=[the], top_logprobs=[float("-inf")])
    (out,) = LogprobRenderer(mock).chat([the], [entry], top_logprobs=1)
    assert out.logprob == LOGPROB_FLOOR and out.top_logprobs[0].logprob == LOGPROB_FLOOR
    assert b"Infinity" not in msgspec.json.encode(out)


def test_completion_shape_and_text_offsets_across_deltas(mock: Tokenizer) -> None:
    ids = [word(mock, w) for w in (" the", " river", " is")]
    entries = [TokenLogprobs(logprob=-float(i), top_ids=[ids[i], 1], top_logprobs=[-float(i), -7.0])
               for i in range(3)]
    renderer = LogprobRenderer(mock)
    first = renderer.completion(ids[:2], entries[:2], top_logprobs=1)
    second = renderer.completion(ids[2:], entries[2:], top_logprobs=1)
    merged = merge_completion([first, second])
    assert merged.tokens == [" the", " river", " is"]
    assert merged.token_logprobs == [0.0, -1.0, -2.0]
    assert merged.text_offset == [0, 4, 10]  # by the lengths of the token texts, across deltas
    # logprobs=1: the sampled token and one more, keyed by text (special tokens by name)
    assert merged.top_logprobs[0] == {" the": 0.0, "<bos>": -7.0}
    assert renderer.completion(ids[:1], entries[:1], top_logprobs=0).top_logprobs == [{" the": 0.0}]


def test_byte_fallback_texts_are_corrected_as_vllm_does(mock: Tokenizer) -> None:
    from vllm.v1.engine.logprobs import LogprobsProcessor

    ids = [BYTE_BASE + b for b in "a日🙂".encode()]
    entries = [TokenLogprobs(logprob=-1.0) for _ in ids]
    texts = [e.token for e in LogprobRenderer(mock).chat(ids, entries, top_logprobs=0)]
    # vLLM's correction, run on the same decode, with the same (up to 4) preceding tokens
    fake = SimpleNamespace(tokenizer=SimpleNamespace(decode=lambda ids: mock.decode(ids, skip_special_tokens=False)))
    expected = []
    for i, token_id in enumerate(ids):
        text = mock.token_text(token_id)
        if text.endswith("\ufffd"):
            text = LogprobsProcessor._correct_decoded_token(fake, token_id, ids[max(0, i - 4):i])  # type: ignore[arg-type]
        expected.append(text)
    assert texts == expected
    assert "".join(texts) == "a日🙂"


@pytest.mark.skipif(not SMOLLM2.exists(), reason="the tiny real model is not in ~/.cache/dynrt")
def test_hf_token_texts_equal_vllms() -> None:
    from transformers import AutoTokenizer
    from vllm.tokenizers.detokenizer_utils import convert_ids_list_to_tokens

    tok = load_tokenizer(TokenizerSpec(kind="hf", path=str(SMOLLM2)))
    reference = AutoTokenizer.from_pretrained(str(SMOLLM2))
    ids = list(range(0, tok.vocab_size, 37)) + [0, 1, 2, tok.vocab_size - 1]
    assert [tok.token_text(t) for t in ids] == convert_ids_list_to_tokens(reference, ids)
