"""The OpenAI HTTP API as msgspec Structs: request bodies, their validation, the
non-streaming responses, streaming chunks, the models list, and the mapping from a
request to the engine's :class:`~dynrt.runtime.protocol.SamplingParams`.

Decoding (:func:`decode_chat_request`, :func:`decode_completion_request`) either returns
a valid request or raises an :class:`~dynrt.frontend.errors.OpenAIError` that names the
offending parameter. Unknown fields are ignored; known fields that would change the
result and that this server cannot honour (tools, structured output, logit_bias, n > 1,
logprobs, ...) are rejected with 400, never silently dropped.

``presence_penalty`` and ``frequency_penalty`` are validated (range [-2, 2]) and accepted
but not applied: the engine's SamplingParams has no penalties. Clients commonly send
them as 0, which is what the output corresponds to.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from dynrt.frontend import errors
from dynrt.runtime.protocol import SamplingParams

MAX_STOP_STRINGS = 16

# ---------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]
TokenId = Annotated[int, msgspec.Meta(ge=0)]


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class _SamplingFields(msgspec.Struct, kw_only=True):
    """Fields common to chat and completions requests."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, msgspec.Meta(ge=-1, le=2**31 - 1)] | None = None  # extension; -1 or 0: off; int32 (msgpack)
    min_tokens: Annotated[int, msgspec.Meta(ge=0)] = 0  # vLLM extension
    ignore_eos: bool = False  # vLLM extension
    seed: Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)] | None = None  # int64, as in the OpenAI API
    stop: str | list[str] | None = None
    n: PositiveInt | None = None
    user: str | None = None
    presence_penalty: Penalty | None = None  # accepted, not applied (module docstring)
    frequency_penalty: Penalty | None = None  # accepted, not applied (module docstring)
    # Recognised only to be refused: they change the result and are not supported.
    logit_bias: Any = None

    def requested_max_tokens(self) -> tuple[int | None, str]:
        """The client's completion budget and the name of the field that set it."""
        return self.max_tokens, "max_tokens"

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


Role = Literal["system", "developer", "user", "assistant", "tool"]


class ChatMessage(msgspec.Struct, kw_only=True):
    role: Role
    content: str | list[ContentPart] | None  # required, may be null
    name: str | None = None
    tool_calls: Any = None  # refused when non-empty

    def text(self) -> str:
        """The message's text; text parts are joined with newlines (as vLLM does)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text or "" for part in self.content)


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, msgspec.Meta(ge=0)] | None = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None

    def requested_max_tokens(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def template_messages(self) -> list[dict[str, str]]:
        """The conversation as the chat template wants it: ``[{"role", "content"}]``."""
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_SamplingFields, kw_only=True):
    # A string, a list holding one string, or token ids (flat, or one list of them).
    prompt: str | list[str | TokenId | list[TokenId]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def prompt_input(self) -> str | list[int]:
        """The prompt as text to tokenize, or as token ids (validated by the decoder)."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return prompt
        if len(prompt) == 1 and isinstance(prompt[0], str | list):
            return prompt[0]
        return prompt  # type: ignore[return-value]  # token ids: _validate_completion checked

# ---------------------------------------------------------------------------
# Decoding and validation
# ---------------------------------------------------------------------------

_chat_decoder = msgspec.json.Decoder(ChatCompletionRequest)
_completion_decoder = msgspec.json.Decoder(CompletionRequest)

_MISSING_FIELD = re.compile(r"missing required field `([^`]+)`")

R = TypeVar("R", ChatCompletionRequest, CompletionRequest)


def _param_of(error: msgspec.ValidationError) -> tuple[str, str | None]:
    """Split msgspec's ``"... - at `$.a[0].b`"`` into (message, "a[0].b")."""
    text = str(error)
    message, sep, where = text.rpartition(" - at `")
    path = where.rstrip("`")[2:] if sep else ""  # drop "$." / "$"
    if not sep:
        message = text
    missing = _MISSING_FIELD.search(message)
    if missing:
        path = f"{path}.{missing.group(1)}" if path else missing.group(1)
    return message, path or None


def _decode(decoder: msgspec.json.Decoder[R], body: bytes) -> R:
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as e:
        message, param = _param_of(e)
        target = f"'{param}'" if param else "the request body"
        raise errors.bad_request(f"Invalid value for {target}: {message}", param) from None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:
        # msgspec raises UnicodeDecodeError for invalid UTF-8 inside a string and
        # RecursionError for very deep nesting (in Any-typed fields): malformed input.
        raise errors.bad_request(f"The request body is not valid JSON: {e}") from None


def _validate_common(req: _SamplingFields) -> None:
    if req.n is not None and req.n > 1:
        raise errors.unsupported_param("n", "greater than 1 is not supported")
    if req.logit_bias:
        raise errors.unsupported_param("logit_bias")
    if req.stream_options is not None and not req.stream:
        raise errors.bad_request("'stream_options' is only allowed when 'stream' is true", "stream_options")
    stops = req.stop_strings()
    if len(stops) > MAX_STOP_STRINGS:
        raise errors.bad_request(f"At most {MAX_STOP_STRINGS} stop strings are allowed", "stop")
    if any(not s for s in stops):
        raise errors.bad_request("Stop strings must not be empty", "stop")


def _validate_chat(req: ChatCompletionRequest) -> None:
    _validate_common(req)
    if not req.messages:
        raise errors.bad_request("'messages' must contain at least one message", "messages")
    for i, message in enumerate(req.messages):
        if message.tool_calls:
            raise errors.unsupported_param(f"messages[{i}].tool_calls", "(tool calling) is not supported")
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if part.type != "text":
                    raise errors.unsupported_param(
                        f"messages[{i}].content[{j}].type", f"= '{part.type}' is not supported; only 'text' parts are"
                    )
                if part.text is None:
                    raise errors.bad_request("A text part needs 'text'", f"messages[{i}].content[{j}].text")
    if req.tools:
        raise errors.unsupported_param("tools", "(tool calling) is not supported")
    if req.functions:
        raise errors.unsupported_param("functions", "(function calling) is not supported")
    if req.tool_choice not in (None, "none"):
        raise errors.unsupported_param("tool_choice", "(tool calling) is not supported")
    if req.function_call not in (None, "none"):
        raise errors.unsupported_param("function_call", "(function calling) is not supported")
    if req.response_format is not None:
        kind = req.response_format.get("type") if isinstance(req.response_format, dict) else None
        if kind != "text":
            raise errors.unsupported_param(
                "response_format", "other than {'type': 'text'} (structured output) is not supported"
            )
    if req.logprobs:
        raise errors.unsupported_param("logprobs")
    if req.top_logprobs:
        raise errors.unsupported_param("top_logprobs")


def _validate_completion(req: CompletionRequest) -> None:
    _validate_common(req)
    prompt = req.prompt
    if isinstance(prompt, list) and len(prompt) > 1 and not all(isinstance(p, int) for p in prompt):
        if all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt):
            raise errors.unsupported_param("prompt", "with more than one prompt (batching) is not supported")
        raise errors.bad_request(
            "'prompt' must be a string, a list of one string, or a list of token ids", "prompt"
        )
    if req.echo:
        raise errors.unsupported_param("echo", "= true is not supported")
    if req.suffix:
        raise errors.unsupported_param("suffix")
    if req.best_of is not None and req.best_of > 1:
        raise errors.unsupported_param("best_of", "greater than 1 is not supported")
    if req.logprobs is not None:
        raise errors.unsupported_param("logprobs")


def decode_chat_request(body: bytes) -> ChatCompletionRequest:
    """Parse and validate a ``/v1/chat/completions`` body; raises :class:`OpenAIError`."""
    req = _decode(_chat_decoder, body)
    _validate_chat(req)
    return req


def decode_completion_request(body: bytes) -> CompletionRequest:
    """Parse and validate a ``/v1/completions`` body; raises :class:`OpenAIError`."""
    req = _decode(_completion_decoder, body)
    _validate_completion(req)
    return req


def to_sampling_params(
    req: ChatCompletionRequest | CompletionRequest,
    *,
    prompt_len: int,
    context_length: int,
    default_max_tokens: int,
    stop_token_ids: list[int],
) -> SamplingParams:
    """The engine's sampling parameters for ``req`` with a prompt of ``prompt_len`` tokens.

    ``max_completion_tokens`` wins over ``max_tokens``; with neither, the completion may
    fill the context, capped at ``default_max_tokens``. A prompt that leaves no room, or
    a requested length past the context, is a 400 ``context_length_exceeded``.
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
    return SamplingParams(
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=-1 if not req.top_k else req.top_k,
        seed=req.seed,
        stop_token_ids=list(stop_token_ids),
        ignore_eos=req.ignore_eos,
    )


# ---------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------

FinishReason = Literal["stop", "length"]


class PromptTokensDetails(msgspec.Struct, kw_only=True):
    cached_tokens: int = 0


class UsageInfo(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> UsageInfo:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
        )


class AssistantMessage(msgspec.Struct, kw_only=True):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(msgspec.Struct, kw_only=True):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason | None


class ChatCompletionResponse(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class CompletionChoice(msgspec.Struct, kw_only=True):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None


class CompletionResponse(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


# Streaming chunks. ``sse.py`` encodes the per-token ones by splicing; these Structs
# define the shape (and are the reference its tests compare against).


class ChatDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(msgspec.Struct, kw_only=True):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | msgspec.UnsetType = msgspec.UNSET  # only on the usage chunk


class CompletionChunkChoice(msgspec.Struct, kw_only=True):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None = None


class CompletionChunk(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: UsageInfo | msgspec.UnsetType = msgspec.UNSET  # only on the usage chunk


# ---------------------------------------------------------------------------
# Models list
# ---------------------------------------------------------------------------


class ModelCard(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dynrt"
    # vLLM's key: the context length (prompt + output tokens) every instance accepts
    max_model_len: int | None = None


class ModelList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[ModelCard]

