"""A validated OpenAI request → the engine's :class:`~dynrt.runtime.protocol.SamplingParams`:
the completion budget against the context, token ids against the vocabulary, and every
sampling field under vLLM's name (penalties, min_p, logit_bias, ... applied by the engine).
"""

from __future__ import annotations

from dynrt.frontend import errors
from dynrt.frontend.openai_protocol import ChatCompletionRequest, CompletionRequest
from dynrt.runtime.protocol import SamplingParams

# vLLM clamps each logit_bias value into this range.
LOGIT_BIAS_LIMIT = 100.0


def _token_ids_in_vocab(ids: list[int], vocab_size: int, param: str) -> None:
    invalid = [t for t in ids if t < 0 or t >= vocab_size]
    if invalid:
        raise errors.bad_request(f"token_id(s) {invalid} in {param} contain out-of-vocab token ids. "
                                 f"Vocabulary size: {vocab_size}", param)


def to_sampling_params(
    req: ChatCompletionRequest | CompletionRequest,
    *,
    prompt_len: int,
    context_length: int,
    default_max_tokens: int,
    stop_token_ids: list[int],
    vocab_size: int,
) -> SamplingParams:
    """The engine's sampling parameters for ``req`` with a prompt of ``prompt_len`` tokens.

    ``max_completion_tokens`` wins over ``max_tokens``; with neither, the completion may
    fill the context, capped at ``default_max_tokens``. A prompt that leaves no room, or
    a requested length past the context, is a 400 ``context_length_exceeded``.
    ``stop_token_ids``: the model's own (EOS, end of turn); the request's are added.
    Token ids (logit_bias keys, allowed_token_ids, stop_token_ids) must be below
    ``vocab_size``.
    """
    prompt_param = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
    if prompt_len < 1:
        raise errors.bad_request("The prompt is empty", prompt_param)
    room = context_length - prompt_len
    requested, max_param = req.requested_max_tokens()
    if room < 1:
        raise errors.context_length_exceeded(context_length, prompt_len, requested, prompt_param)
    if requested is None:
        max_tokens = min(room, default_max_tokens)
    elif requested > room:
        raise errors.context_length_exceeded(context_length, prompt_len, requested, max_param)
    else:
        max_tokens = requested
    if req.min_tokens > max_tokens:
        raise errors.bad_request(
            f"'min_tokens' ({req.min_tokens}) must not exceed the completion length ({max_tokens})", "min_tokens"
        )
    logit_bias = None
    if req.logit_bias:
        # vLLM clamps each value into [-100, 100].
        logit_bias = {int(k): min(LOGIT_BIAS_LIMIT, max(-LOGIT_BIAS_LIMIT, v)) for k, v in req.logit_bias.items()}
        _token_ids_in_vocab(list(logit_bias), vocab_size, "logit_bias")
    _token_ids_in_vocab(req.allowed_token_ids or [], vocab_size, "allowed_token_ids")
    _token_ids_in_vocab(req.stop_token_ids or [], vocab_size, "stop_token_ids")
    # The request's stop ids first, then the model's (vLLM merges them in this order).
    stops = list(dict.fromkeys([*(req.stop_token_ids or []), *stop_token_ids]))
    return SamplingParams(
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=-1 if not req.top_k else req.top_k,
        min_p=req.min_p or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        logit_bias=logit_bias,
        allowed_token_ids=req.allowed_token_ids,
        bad_words=req.bad_words or None,
        seed=req.seed,
        stop_token_ids=stops,
        ignore_eos=req.ignore_eos,
        logprobs=req.top_logprobs_count(),
    )
