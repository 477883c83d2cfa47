"""``POST /tokenize``, ``POST /detokenize`` and ``GET /version``, as vLLM's OpenAI server
has them (``vllm/entrypoints/serve/tokenize``, 0.32), answered by the frontend with the
model's own tokenizer (no worker involved).

``/tokenize`` takes either ``prompt`` (text, tokenized as ``/v1/completions`` does: with
the tokenizer's special tokens unless ``add_special_tokens`` is false) or ``messages``
(rendered and tokenized exactly as ``/v1/chat/completions`` builds its prompt, so
``count`` is the chat request's ``usage.prompt_tokens``). ``model`` may be left out when
the frontend serves one model. Answer: ``{"count", "max_model_len", "tokens",
"token_strs"}`` (``token_strs``: the vocabulary entries when ``return_token_strs``, else
null). ``/detokenize``: ``{"tokens": [ids]}`` → ``{"prompt": text}``, special tokens
kept (vLLM's ``tokenizer.decode`` default); an id outside the vocabulary is a 400.

With ``messages``, ``tools``, ``chat_template_kwargs``, ``add_generation_prompt`` and
``continue_final_message`` render as on the chat endpoint (the server's
``--chat-template``; a per-request ``chat_template`` is refused as vLLM refuses it
without ``--trust-request-chat-template``). Fields vLLM accepts that dynrt cannot honour
are a 400 naming the field (never ignored): ``add_special_tokens: true`` with
``messages`` (dynrt's templates yield ids, not text to re-tokenize) and the multimodal
kwargs. Unknown fields are a 400 too. Unknown model: 404, as the chat route.
"""

from __future__ import annotations

import importlib.metadata
import re
from typing import Annotated, Any

import msgspec
from aiohttp import web

from dynrt.frontend import errors
from dynrt.frontend.chat_request import ChatSettings
from dynrt.frontend.chat_template import template_options
from dynrt.frontend.openai_protocol import decode_chat_request
from dynrt.frontend.tokenizer import Tokenizer, load_tokenizer_async
from dynrt.router.service import RoutingService
from dynrt.runtime.protocol import InstanceRecord

TokenId = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class _Request(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str | None = None


class TokenizeCompletionRequest(_Request, kw_only=True, forbid_unknown_fields=True):
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(_Request, kw_only=True, forbid_unknown_fields=True):
    messages: list[Any]  # validated by the chat endpoint's own decoder
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool | None = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Any] | None = None
    # Accepted by vLLM; refused here unless left at their defaults (module docstring).
    media_io_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None

    def refused_field(self) -> tuple[str, str] | None:
        """The first field set to a value this server cannot honour, and why."""
        checks = [
            ("add_special_tokens", self.add_special_tokens, "= true is not supported with 'messages'"),
            ("media_io_kwargs", bool(self.media_io_kwargs), "(multimodal input) is not supported"),
            ("mm_processor_kwargs", bool(self.mm_processor_kwargs), "(multimodal input) is not supported"),
        ]
        return next(((name, why) for name, refused, why in checks if refused), None)


class DetokenizeRequest(_Request, kw_only=True, forbid_unknown_fields=True):
    tokens: list[TokenId]


class TokenizeResponse(msgspec.Struct, kw_only=True):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(msgspec.Struct, kw_only=True):
    prompt: str


class VersionResponse(msgspec.Struct, kw_only=True):
    version: str


_encode = msgspec.json.Encoder().encode


def _json(obj: msgspec.Struct) -> web.Response:
    return web.Response(body=_encode(obj), content_type="application/json")


_FIELD_NAMED = re.compile(r"(?:unknown|missing required) field `([^`]+)`")


def _invalid(error: msgspec.ValidationError) -> errors.OpenAIError:
    """msgspec's ``"... - at `$.a[0]`"`` as a 400 naming ``a[0]`` (or the unknown or
    missing field)."""
    message, sep, where = str(error).rpartition(" - at `")
    if not sep:
        message = str(error)
    param = where.rstrip("`").removeprefix("$").lstrip(".") if sep else ""
    named = _FIELD_NAMED.search(message)
    if named:
        param = f"{param}.{named.group(1)}" if param else named.group(1)
    return errors.bad_request(f"Invalid value for '{param or 'the request body'}': {message}", param or None)


def decode_body(body: bytes) -> dict[str, Any]:
    """The JSON object in ``body``, or a 400. msgspec raises ``UnicodeDecodeError`` for
    invalid UTF-8 inside a string and ``RecursionError`` for very deep nesting: both are
    the client's malformed input, not server errors."""
    try:
        obj = msgspec.json.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise errors.bad_request(f"The request body is not valid JSON: {exc}") from None
    except msgspec.ValidationError as exc:  # a number out of range
        raise errors.bad_request(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise errors.bad_request(f"The request body must be a JSON object, not {type(obj).__name__}")
    return obj


def _convert(obj: dict[str, Any], type_: type[Any]) -> Any:
    try:
        return msgspec.convert(obj, type_)
    except msgspec.ValidationError as exc:
        raise _invalid(exc) from None


class TokenizationRoutes:
    """Handlers for ``/tokenize``, ``/detokenize`` and ``/version``."""

    def __init__(self, routing: RoutingService, known_models: set[str], chat: ChatSettings) -> None:
        """``known_models``: models an instance ever served here (a 503, not a 404, when
        such a model has no live instance right now); ``chat``: the chat endpoint's
        settings (``--chat-template``)."""
        self.routing = routing
        self.known_models = known_models
        self.chat = chat
        self.version = importlib.metadata.version("dynrt")

    async def tokenize(self, request: web.Request) -> web.Response:
        obj = decode_body(await request.read())
        if "messages" in obj and "prompt" in obj:
            raise errors.bad_request("Give either 'prompt' or 'messages', not both", "prompt")
        if "messages" in obj:
            chat: TokenizeChatRequest = _convert(obj, TokenizeChatRequest)
            refused = chat.refused_field()
            if refused is not None:
                raise errors.unsupported_param(*refused)
            model, records, tokenizer = await self._model(chat.model)
            ids = chat_prompt_ids(tokenizer, model, chat, self.chat)
            strs = chat.return_token_strs
        elif "prompt" in obj:
            completion: TokenizeCompletionRequest = _convert(obj, TokenizeCompletionRequest)
            model, records, tokenizer = await self._model(completion.model)
            ids = tokenizer.encode(completion.prompt, add_special_tokens=completion.add_special_tokens)
            strs = completion.return_token_strs
        else:
            raise errors.bad_request("The request needs 'prompt' (text) or 'messages' (a conversation)", "prompt")
        return _json(TokenizeResponse(count=len(ids), max_model_len=min(r.context_length for r in records),
                                      tokens=ids, token_strs=tokenizer.convert_ids_to_tokens(ids) if strs else None))

    async def detokenize(self, request: web.Request) -> web.Response:
        req: DetokenizeRequest = _convert(decode_body(await request.read()), DetokenizeRequest)
        _, _, tokenizer = await self._model(req.model)
        for i, token in enumerate(req.tokens):
            if token >= tokenizer.vocab_size:
                raise errors.bad_request(f"Token id {token} is out of vocabulary (size {tokenizer.vocab_size})",
                                         f"tokens[{i}]")
        return _json(DetokenizeResponse(prompt=tokenizer.decode(req.tokens, skip_special_tokens=False)))

    async def show_version(self, _: web.Request) -> web.Response:
        return _json(VersionResponse(version=self.version))

    async def _model(self, model: str | None) -> tuple[str, list[InstanceRecord], Tokenizer]:
        """The model named (or the only one served), its instances and its tokenizer."""
        models = self.routing.models()
        if model is None:
            if len(models) != 1:
                raise errors.bad_request(f"'model' is required: this server serves {len(models)} models", "model")
            model = next(iter(models))
        records = models.get(model)
        if not records:
            if model in self.known_models:
                raise errors.to_openai(errors.NoLiveInstance(model))
            raise errors.model_not_found(model)
        return model, records, await load_tokenizer_async(records[0].tokenizer)


def chat_prompt_ids(tokenizer: Tokenizer, model: str, req: TokenizeChatRequest, settings: ChatSettings) -> list[int]:
    """The prompt ids ``/v1/chat/completions`` builds for these messages and template
    fields: validated by the chat endpoint's own decoder and rendered as it renders them
    (tools are rendered into the prompt; no tool-call parser is needed to count them)."""
    body: dict[str, Any] = {"model": model, "messages": req.messages, "add_generation_prompt": req.add_generation_prompt,
                            "continue_final_message": req.continue_final_message}
    for name in ("tools", "chat_template", "chat_template_kwargs"):
        if getattr(req, name) is not None:
            body[name] = getattr(req, name)
    chat = decode_chat_request(_encode(body))
    if chat.chat_template is not None:  # as the chat endpoint (and vLLM without --trust-request-chat-template)
        raise errors.bad_request("Chat template is passed with request, but --trust-request-chat-template is not "
                                 "set. Refused request with untrusted chat template.", "chat_template")
    options = template_options(tools=chat.tools, add_generation_prompt=chat.add_generation_prompt,
                               continue_final_message=chat.continue_final_message,
                               chat_template_kwargs=chat.chat_template_kwargs, chat_template=settings.chat_template)
    return tokenizer.apply_chat_template(chat.template_messages(), options)
