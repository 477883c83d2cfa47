"""A dynrt request's sampling parameters in vLLM's terms, and vLLM's outputs (finish
reasons, logprobs) in dynrt's. The mappings are pure (no vLLM import), so they are
unit-tested anywhere.

Every ``SamplingParams`` field maps 1:1 onto ``vllm.SamplingParams`` (vLLM's names and
defaults); ``structured`` becomes the keyword arguments of
``vllm.sampling_params.StructuredOutputsParams``. Outputs are not detokenized (the
frontend detokenizes) and logprobs come flat (``flat_logprobs``: a few lists per
request instead of a dict and ``Logprob`` object per token and rank).

A migrated request (``num_prior_output_tokens = k > 0``) reaches vLLM as a prompt whose
last ``k`` ids are earlier output. Where vLLM treats output differently from prompt, the
request carries ``extra_args[PRIOR_OUTPUT_KEY] = k`` so dynrt's additions inside the
engine can tell: the logits processor ``dynrt.worker.vllm_prior_output`` (presence and
frequency penalties, bad words straddling the migration point) and the structured-output
resume (``dynrt.worker.vllm_structured_resume``: the grammar is advanced over the prior
output). Requests that need neither do not carry the key and cost nothing extra.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from dynrt.runtime.log import get_logger
from dynrt.runtime.protocol import FinishReason, SamplingParams, StructuredOutput, TokenLogprobs

log = get_logger("vllm_engine")

# ``vllm.SamplingParams.extra_args`` key: how many trailing prompt ids are earlier output.
PRIOR_OUTPUT_KEY = "dynrt_prior_output_tokens"


def needs_prior_output(sampling: SamplingParams) -> bool:
    """Whether vLLM would treat ``sampling``'s request differently if its prior output
    were output rather than prompt (penalties on output, bad words, a grammar).
    ``repetition_penalty`` is not here: vLLM applies it to prompt and output alike."""
    return bool(sampling.presence_penalty or sampling.frequency_penalty or sampling.bad_words
                or sampling.structured is not None)


def structured_kwargs(structured: StructuredOutput) -> dict[str, Any]:
    """Keyword arguments of ``vllm.sampling_params.StructuredOutputsParams``: the one
    constraint set (vLLM counts every non-None one, so ``json_object=False`` is None),
    then the options."""
    kwargs: dict[str, Any] = {}
    for name in ("json", "regex", "choice", "grammar", "structural_tag"):
        value = getattr(structured, name)
        if value is not None:
            kwargs[name] = value
    if structured.json_object:
        kwargs["json_object"] = True
    kwargs.update(disable_any_whitespace=structured.disable_any_whitespace,
                  disable_additional_properties=structured.disable_additional_properties,
                  whitespace_pattern=structured.whitespace_pattern)
    return kwargs


def sampling_kwargs(sampling: SamplingParams, eos_ids: frozenset[int], prior_output_tokens: int = 0) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` (all but ``output_kind``; with
    ``structured_outputs`` as the keyword arguments of ``StructuredOutputsParams``) for
    ``sampling``; ``eos_ids`` are the model's EOS ids (see :func:`model_eos_ids`);
    ``prior_output_tokens``: the request's ``num_prior_output_tokens``."""
    stop_ids = list(sampling.stop_token_ids)
    if sampling.ignore_eos:
        # The frontend lists the model's EOS / end-of-turn ids as stop ids on every
        # request; vLLM's ignore_eos only skips its own EOS check, so drop them here
        # (as vLLM's server does for generation-config EOS ids under ignore_eos).
        stop_ids = [t for t in stop_ids if t not in eos_ids]
    kwargs: dict[str, Any] = dict(
        temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k if sampling.top_k > 0 else 0,
        min_p=sampling.min_p, presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty, repetition_penalty=sampling.repetition_penalty,
        logit_bias=dict(sampling.logit_bias) if sampling.logit_bias else None,
        allowed_token_ids=list(sampling.allowed_token_ids) if sampling.allowed_token_ids is not None else None,
        bad_words=list(sampling.bad_words) if sampling.bad_words else None,
        seed=sampling.seed, stop_token_ids=stop_ids or None, max_tokens=sampling.max_tokens,
        min_tokens=sampling.min_tokens, ignore_eos=sampling.ignore_eos, logprobs=sampling.logprobs,
        flat_logprobs=sampling.logprobs is not None, detokenize=False,
        structured_outputs=structured_kwargs(sampling.structured) if sampling.structured is not None else None)
    if prior_output_tokens > 0 and needs_prior_output(sampling):
        kwargs["extra_args"] = {PRIOR_OUTPUT_KEY: prior_output_tokens}
    return kwargs


def prior_output_count(extra_args: dict[str, Any] | None) -> int:
    """``PRIOR_OUTPUT_KEY`` of a vLLM request's ``extra_args`` (0 when absent)."""
    if not extra_args:
        return 0
    value = extra_args.get(PRIOR_OUTPUT_KEY, 0)
    return value if isinstance(value, int) and value > 0 else 0


class FlatLogprobsLike(Protocol):
    """What :func:`token_logprobs` reads of ``vllm.logprobs.FlatLogprobs``."""

    start_indices: Sequence[int]
    end_indices: Sequence[int]
    token_ids: Sequence[int]
    logprobs: Sequence[float]


def token_logprobs(flat: FlatLogprobsLike, k: int) -> list[TokenLogprobs]:
    """One ``TokenLogprobs`` per position of vLLM's flat logprobs. vLLM's sampler puts
    the sampled token first at each position, then the ``k`` most likely by rank (the
    sampled one again if it is among them), so the top list is exactly those ``k``.
    (vLLM's OpenAI server lists the sampled token first, then the top ones without
    it; the frontend renders that order from these.)"""
    entries: list[TokenLogprobs] = []
    ids, logprobs = flat.token_ids, flat.logprobs
    for start, end in zip(flat.start_indices, flat.end_indices, strict=True):
        top_end = min(end, start + 1 + k)
        entries.append(TokenLogprobs(float(logprobs[start]), list(ids[start + 1:top_end]),
                                     [float(x) for x in logprobs[start + 1:top_end]]))
    return entries


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
