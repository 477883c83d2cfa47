"""The OpenAI HTTP API as msgspec Structs: request bodies, their validation, the
non-streaming responses, streaming chunks and the models list (the mapping to the
engine's ``SamplingParams`` is ``frontend/sampling.py``).

Decoding (:func:`decode_chat_request`, :func:`decode_completion_request`) either returns
a valid request or raises an :class:`~dynrt.frontend.errors.OpenAIError` that names the
offending parameter. Every field of a request is either honoured or refused: an unknown
field is a 400 naming it (``forbid_unknown_fields``), and a known field this server
cannot honour (``suffix``, ``best_of`` > 1, ``echo`` with logprobs, ...) is a 400
saying why. The only fields accepted without effect are :data:`PASS_THROUGH_FIELDS`:
they never change the output (account metadata, OpenAI storage and tier hints).

Ranges follow vLLM's own protocol and ``SamplingParams`` checks, so a request vLLM's
server accepts is accepted here and one it refuses is refused with the same reason.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from dynrt.frontend import errors
from dynrt.frontend.chat_template import template_message
from dynrt.frontend.logprobs import ChatLogprobs, CompletionLogprobs
from dynrt.frontend.structured_output import (
    ResponseFormat,
    StructuredOutputsParams,
    refuse_guided_fields,
)
from dynrt.frontend.tools import ChatTool, MessageToolCall, ToolCall, ToolChoice

MAX_STOP_STRINGS = 16
# vLLM's default ``--max-logprobs``: the most top logprobs a request may ask for.
MAX_LOGPROBS = 20
# vLLM's VLLM_MAX_COMPLETION_PROMPTS default: prompts in one /v1/completions request.
MAX_COMPLETION_PROMPTS = 1024
# vLLM samples greedily below this temperature (vllm.sampling_params._SAMPLING_EPS).
GREEDY_BELOW = 1e-5
# The most choices (n x prompts) one request may ask for: each is its own generation.
MAX_CHOICES = 128

# Fields accepted and ignored because they never change the output: OpenAI account and
# storage metadata that real clients (the openai SDK, LangChain, agent frameworks) send.
PASS_THROUGH_FIELDS = ("user", "metadata", "store", "service_tier", "prompt_cache_key",
                       "safety_identifier")

# ---------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]
TokenId = Annotated[int, msgspec.Meta(ge=0)]
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class StreamOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM extension: refused when true
    include_obfuscation: bool = False  # OpenAI: padding field against side channels; no effect here


class _SamplingFields(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Fields common to chat and completions requests."""

    model: str
    stream: bool | None = False  # null accepted, as vLLM does
    stream_options: StreamOptions | None = None
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, msgspec.Meta(ge=-1, le=2**31 - 1)] | None = None  # vLLM extension; -1 or 0: off; int32 (msgpack)
    min_p: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None  # vLLM extension
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0.0)] | None = None  # vLLM extension
    logit_bias: dict[str, float] | None = None
    seed: Int64 | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None  # vLLM extension
    include_stop_str_in_output: bool = False  # vLLM extension
    skip_special_tokens: bool = True  # vLLM extension
    spaces_between_special_tokens: bool = True  # vLLM extension: only the default
    min_tokens: Annotated[int, msgspec.Meta(ge=0)] = 0  # vLLM extension
    ignore_eos: bool = False  # vLLM extension
    allowed_token_ids: list[TokenId] | None = None  # vLLM extension
    bad_words: list[str] | None = None  # vLLM extension
    n: PositiveInt | None = None
    # dynrt extensions (docs/resumable-streams.md), also settable as the headers
    # ``Dynrt-Resumable: 1`` and ``Last-Event-ID`` (clients that cannot set headers)
    resumable: bool = False
    last_event_id: str | None = None
    # PASS_THROUGH_FIELDS: accepted, no effect on the output.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # vLLM's removed guided-decoding fields: refused, naming their replacement (structured_output.py)
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    guided_whitespace_pattern: Any = None
    guided_decoding_backend: Any = None

    def requested_max_tokens(self) -> tuple[int | None, str]:
        """The client's completion budget and the name of the field that set it."""
        return self.max_tokens, "max_tokens"

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def num_choices(self) -> int:
        return self.n or 1

    def top_logprobs_count(self) -> int | None:
        """``SamplingParams.logprobs``: None = no logprobs, k = sampled + k most likely."""
        raise NotImplementedError


class ContentPart(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    type: str
    text: str | None = None
    # Known so that they reach the check on ``type``, which refuses non-text parts.
    image_url: Any = None
    input_audio: Any = None
    file: Any = None


Role = Literal["system", "developer", "user", "assistant", "tool"]


class ChatMessage(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    role: Role
    # required, may be null; may be absent in an assistant turn that only calls tools
    content: str | list[ContentPart] | None | msgspec.UnsetType = msgspec.UNSET
    name: str | None = None
    # tools (frontend/tools.py): an assistant turn's calls, and the call a tool message answers
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The message's text; text parts are joined with newlines (as vLLM does)."""
        if self.content is None or self.content is msgspec.UNSET:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text or "" for part in self.content)


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    functions: Any = None
    function_call: Any = None
    # -- tools, structured output, templating: read by frontend/chat_request.py -------
    tools: list[ChatTool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsParams | None = None  # vLLM extension
    chat_template: str | None = None  # vLLM extension; refused (no --trust-request-chat-template)
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM extension
    add_generation_prompt: bool = True  # vLLM extension
    continue_final_message: bool = False  # vLLM extension
    include_reasoning: bool = True  # vLLM extension

    def requested_max_tokens(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def template_messages(self) -> list[dict[str, Any]]:
        """The conversation as the chat template wants it (chat_template.template_message)."""
        return [template_message(m.role, m.text(), name=m.name, tool_calls=m.tool_calls, tool_call_id=m.tool_call_id)
                for m in self.messages]

    def top_logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_SamplingFields, kw_only=True):
    # A string, a list of strings, token ids, or a list of token-id lists.
    # (msgspec takes one list type in a union: the element kinds are checked after decoding.)
    prompt: str | list[str | TokenId | list[TokenId]]
    max_tokens: PositiveInt | None = 16  # the default of OpenAI's and vLLM's completions API
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None
    # -- structured output: read by frontend/structured_output.py ----------------------
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsParams | None = None  # vLLM extension

    def prompt_inputs(self) -> list[str | list[int]]:
        """Each prompt, as text to tokenize or as token ids (one choice set per prompt)."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [prompt]  # type: ignore[list-item]  # one prompt of token ids
        return list(prompt)  # type: ignore[arg-type]

    def top_logprobs_count(self) -> int | None:
        return self.logprobs

# ---------------------------------------------------------------------------
# Decoding and validation
# ---------------------------------------------------------------------------

_chat_decoder = msgspec.json.Decoder(ChatCompletionRequest)
_completion_decoder = msgspec.json.Decoder(CompletionRequest)

_FIELD_IN_MESSAGE = re.compile(r"(?:missing required|unknown) field `([^`]+)`")

R = TypeVar("R", ChatCompletionRequest, CompletionRequest)


def _param_of(error: msgspec.ValidationError) -> tuple[str, str | None]:
    """Split msgspec's ``"... - at `$.a[0].b`"`` into (message, "a[0].b"); a missing or
    unknown field is named in the path."""
    text = str(error)
    message, sep, where = text.rpartition(" - at `")
    path = where.rstrip("`")[2:] if sep else ""  # drop "$." / "$"
    if not sep:
        message = text
    named = _FIELD_IN_MESSAGE.search(message)
    if named:
        path = f"{path}.{named.group(1)}" if path else named.group(1)
    return message, path or None


def _decode(decoder: msgspec.json.Decoder[R], body: bytes) -> R:
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as e:
        message, param = _param_of(e)
        if message.startswith("Object contains unknown field"):
            raise errors.bad_request(f"Unknown parameter '{param}': this server does not support it", param,
                                     "unknown_parameter") from None
        target = f"'{param}'" if param else "the request body"
        raise errors.bad_request(f"Invalid value for {target}: {message}", param) from None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:
        # msgspec raises UnicodeDecodeError for invalid UTF-8 inside a string and
        # RecursionError for very deep nesting (in Any-typed fields): malformed input.
        raise errors.bad_request(f"The request body is not valid JSON: {e}") from None


def _validate_logprobs_count(count: int | None, param: str) -> None:
    if count is None:
        return
    if count < 0 and count != -1:
        raise errors.bad_request(f"'{param}' must be a positive value or -1", param)
    if count == -1 or count > MAX_LOGPROBS:  # -1: the whole vocabulary
        requested = "the whole vocabulary" if count == -1 else str(count)
        raise errors.bad_request(
            f"Requested sample logprobs of {requested}, which is greater than max allowed: {MAX_LOGPROBS}", param)


def _validate_common(req: _SamplingFields) -> None:
    if req.stream_options is not None and not req.stream:
        raise errors.bad_request("'stream_options' is only allowed when 'stream' is true", "stream_options")
    if req.stream_options is not None and req.stream_options.continuous_usage_stats:
        raise errors.unsupported_param("stream_options.continuous_usage_stats",
                                       "is not supported: usage is sent once, after the last choice")
    stops = req.stop_strings()
    if len(stops) > MAX_STOP_STRINGS:
        raise errors.bad_request(f"At most {MAX_STOP_STRINGS} stop strings are allowed", "stop")
    if any(not s for s in stops):
        raise errors.bad_request("Stop strings must not be empty", "stop")
    if req.bad_words is not None and any(not w for w in req.bad_words):
        raise errors.bad_request("'bad_words' must not contain an empty string", "bad_words")
    if req.allowed_token_ids is not None and not req.allowed_token_ids:
        raise errors.bad_request("'allowed_token_ids' must not be empty", "allowed_token_ids")
    if req.repetition_penalty is not None and not math.isfinite(req.repetition_penalty):
        raise errors.bad_request("'repetition_penalty' must be a finite number", "repetition_penalty")
    if not req.spaces_between_special_tokens:
        raise errors.unsupported_param("spaces_between_special_tokens", "= false is not supported: the frontend's "
                                       "detokenizer (fast tokenizers, as vLLM's) does not put spaces between them")
    for key in req.logit_bias or {}:
        if not key.lstrip("-").isdigit():
            raise errors.bad_request(f"logit_bias contains key(s) that cannot be converted to token ids: '{key}'",
                                     "logit_bias")
    if req.num_choices() > MAX_CHOICES:
        raise errors.bad_request(f"'n' must be at most {MAX_CHOICES}", "n")
    if req.num_choices() > 1 and req.temperature is not None and req.temperature < GREEDY_BELOW:
        # vLLM's rule: greedy choices would all be the same answer.
        raise errors.bad_request(f"n must be 1 when using greedy sampling, got {req.num_choices()}.", "n")


def _validate_chat(req: ChatCompletionRequest) -> None:
    _validate_common(req)
    if not req.messages:
        raise errors.bad_request("'messages' must contain at least one message", "messages")
    refuse_guided_fields(req)
    for i, message in enumerate(req.messages):
        if message.content is msgspec.UNSET and not (message.role == "assistant" and message.tool_calls):
            raise errors.bad_request("Invalid value for 'messages[{i}].content': Object missing required field "
                                     "`content`".replace("{i}", str(i)), f"messages[{i}].content")
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if part.type != "text":
                    raise errors.unsupported_param(
                        f"messages[{i}].content[{j}].type", f"= '{part.type}' is not supported; only 'text' parts are"
                    )
                if part.text is None:
                    raise errors.bad_request("A text part needs 'text'", f"messages[{i}].content[{j}].text")
    if req.functions:
        raise errors.unsupported_param("functions", "(deprecated function calling) is not supported; use 'tools'")
    if req.function_call not in (None, "none"):
        raise errors.unsupported_param("function_call", "(deprecated function calling) is not supported; use "
                                       "'tool_choice'")
    top = req.top_logprobs
    if top is not None and (top == -1 or top > 0) and not req.logprobs:
        raise errors.bad_request("when using 'top_logprobs', 'logprobs' must be set to true", "top_logprobs")
    _validate_logprobs_count(top, "top_logprobs")


def _validate_completion(req: CompletionRequest) -> None:
    _validate_common(req)
    refuse_guided_fields(req)
    prompt = req.prompt
    if prompt == "" or prompt == []:
        raise errors.bad_request("'prompt' must be provided and non-empty", "prompt")
    if isinstance(prompt, list) and len({type(p) for p in prompt}) > 1:
        raise errors.bad_request("'prompt' must be a string, a list of strings, a list of token ids, or a list of "
                                 "lists of token ids", "prompt")
    inputs = req.prompt_inputs()
    if len(inputs) > MAX_COMPLETION_PROMPTS:
        raise errors.bad_request(f"prompt list length {len(inputs)} exceeds the maximum allowed count of "
                                 f"{MAX_COMPLETION_PROMPTS}", "prompt")
    if any(len(p) == 0 for p in inputs):
        raise errors.bad_request("Each prompt must be non-empty", "prompt")
    if len(inputs) * req.num_choices() > MAX_CHOICES:
        raise errors.bad_request(f"At most {MAX_CHOICES} choices (prompts x n) per request", "n")
    if req.echo and req.logprobs is not None:
        raise errors.unsupported_param("echo", "= true with 'logprobs' is not supported: it needs the prompt's "
                                       "logprobs, which workers do not compute")
    if req.suffix:
        raise errors.unsupported_param("suffix", "is not supported: vLLM supports it only for models with a "
                                       "fill-in-the-middle renderer, and dynrt has none")
    if req.best_of is not None and req.best_of > 1:
        raise errors.unsupported_param("best_of", "greater than 1 is not supported (vLLM 0.32 removed best_of)")
    _validate_logprobs_count(req.logprobs, "logprobs")


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


# ---------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------

FinishReason = Literal["stop", "length", "tool_calls"]


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
    content: str | None
    # Only with tools / a reasoning parser (frontend/chat_output.py); vLLM's names.
    reasoning: str | None | msgspec.UnsetType = msgspec.UNSET
    tool_calls: list[ToolCall] | msgspec.UnsetType = msgspec.UNSET


class ChatChoice(msgspec.Struct, kw_only=True):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
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
    logprobs: CompletionLogprobs | None = None
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
    logprobs: ChatLogprobs | None = None
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
    logprobs: CompletionLogprobs | None = None
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

