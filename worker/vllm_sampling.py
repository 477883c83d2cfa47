"""A dynrt request's sampling parameters in vLLM's terms, and vLLM's finish reasons in
dynrt's. The mappings are pure (no vLLM import), so they are unit-tested anywhere.

Parameters map 1:1 (temperature, top_p, top_k, seed, stop_token_ids, max_tokens,
min_tokens, ignore_eos, logprobs); outputs are not detokenized (the frontend
detokenizes).
"""

from __future__ import annotations

from typing import Any

from dynrt.runtime.log import get_logger
from dynrt.runtime.protocol import FinishReason, SamplingParams

log = get_logger("vllm_engine")


def sampling_kwargs(sampling: SamplingParams, eos_ids: frozenset[int]) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` (all but ``output_kind``) for
    ``sampling``; ``eos_ids`` are the model's EOS ids (see :func:`model_eos_ids`)."""
    stop_ids = list(sampling.stop_token_ids)
    if sampling.ignore_eos:
        # The frontend lists the model's EOS / end-of-turn ids as stop ids on every
        # request; vLLM's ignore_eos only skips its own EOS check, so drop them here
        # (as vLLM's server does for generation-config EOS ids under ignore_eos).
        stop_ids = [t for t in stop_ids if t not in eos_ids]
    return dict(
        temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k if sampling.top_k > 0 else 0,
        seed=sampling.seed, stop_token_ids=stop_ids or None, max_tokens=sampling.max_tokens,
        min_tokens=sampling.min_tokens, ignore_eos=sampling.ignore_eos, logprobs=sampling.logprobs, detokenize=False)


def finish_reason(reason: Any, stop_requested: bool) -> FinishReason:
    """vLLM's finish reason of a finished output: "stop" and "length" as they are,
    anything else (an abort) "cancelled" if dynrt asked the request to stop, else "abort"."""
    text = str(reason) if reason is not None else "abort"
    if text == "stop":
        return "stop"
    if text == "length":
        return "length"
    return "cancelled" if stop_requested else "abort"


def model_eos_ids(llm: Any) -> frozenset[int]:
    """The model's EOS ids (tokenizer and generation config of vLLM's ``AsyncLLM``):
    what ``ignore_eos`` ignores."""
    ids: set[int] = set()
    try:
        tokenizer = llm.tokenizer
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        eos = llm.vllm_config.model_config.try_get_generation_config().get("eos_token_id")
        if eos is not None:
            ids.update([int(eos)] if isinstance(eos, int) else (int(e) for e in eos))
    except Exception as exc:
        log.warning("vllm_eos_ids_unknown", error=f"{type(exc).__name__}: {exc}")
    return frozenset(ids)
