"""Serving OpenAI requests: admission → prompt ids → generation → response.

``OpenAIServing`` takes a decoded, validated request (``openai_protocol``) and answers
it: admission (draining, unknown model, no instance, every instance busy — all before
templating and tokenizing, so shedding load stays cheap), prompt ids, sampling
parameters, a :class:`~dynrt.frontend.migration.Generation` that survives worker
failures, and the response — one JSON body, or server-sent events — both read from one
:class:`~dynrt.frontend.text_stream.TextStream`. It keeps the request metrics and the
``request_done`` log line, and knows which generation streams from which instance, so an
instance leaving discovery interrupts exactly those.

Failures the migration layer and admission raise (``errors.GenerationError``) become
OpenAI errors through ``errors.to_openai``: as the response when it has not started, as
an error event in the stream when it has.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import msgspec
from aiohttp import web

from dynrt.frontend import errors
from dynrt.frontend.chat_output import ChatDeltaAssembler, ChatOutputRules, finish_reason_of, parse_message
from dynrt.frontend.chat_request import ChatSettings, plan_chat
from dynrt.frontend.chat_sse import delta_event, message_fields
from dynrt.frontend.migration import Generation
from dynrt.frontend.openai_protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    to_sampling_params,
)
from dynrt.frontend.structured_output import structured_output
from dynrt.frontend.sse import DONE, ChatChunkEncoder, CompletionChunkEncoder, error_event
from dynrt.frontend.text_stream import TextStream
from dynrt.frontend.tokenizer import Tokenizer, load_tokenizer_async
from dynrt.router.service import RoutingService
from dynrt.runtime import metrics
from dynrt.runtime.config import MigrationConfig
from dynrt.runtime.log import get_logger
from dynrt.runtime.protocol import InstanceRecord, StructuredOutput
from dynrt.runtime.transport import NatsTransport

log = get_logger("frontend")

REQUESTS = metrics.counter("dynrt_frontend_requests_total", "HTTP requests by model, endpoint and status",
                           ("model", "endpoint", "status"))
IN_FLIGHT = metrics.gauge("dynrt_frontend_in_flight_requests", "requests being answered")
TTFT = metrics.histogram("dynrt_frontend_time_to_first_token_seconds", "time to first token", ("model",))
ITL = metrics.histogram("dynrt_frontend_inter_token_latency_seconds", "time between tokens", ("model",))
INPUT_TOKENS = metrics.counter("dynrt_frontend_input_tokens_total", "prompt tokens", ("model",))
OUTPUT_TOKENS = metrics.counter("dynrt_frontend_output_tokens_total", "generated tokens", ("model",))
CANCELLATIONS = metrics.counter("dynrt_frontend_cancellations_total", "requests the client abandoned", ("model",))
# Per-request histograms, with vLLM's bucket ranges (metrics.REQUEST_LATENCY_BUCKETS up to
# 7680 s, metrics.TOKEN_BUCKETS up to 1M tokens). A request's "arrival" is when the
# frontend starts serving its decoded, validated body: before admission and tokenizing.
REQUEST_DURATION = metrics.histogram(
    "dynrt_frontend_request_duration_seconds",
    "end-to-end time of a request answered with status 200: from its arrival at the frontend (decoded body, "
    "before admission and tokenizing) to the end of its response (streamed: the last event written; otherwise "
    "the JSON body ready to send), across migrations",
    ("model",), buckets=metrics.REQUEST_LATENCY_BUCKETS)
QUEUE_TIME = metrics.histogram(
    "dynrt_frontend_request_queue_time_seconds",
    "time a request spends in the frontend before a worker has it: from its arrival (decoded body) through "
    "admission, templating, tokenizing and routing until its generate request is sent to the chosen worker "
    "(first attempt); the worker's own queue is vllm:request_queue_time_seconds",
    ("model",), buckets=metrics.REQUEST_LATENCY_BUCKETS)
PROMPT_LENGTH = metrics.histogram(
    "dynrt_frontend_request_prompt_tokens",
    "prompt length in tokens of every request admitted and tokenized (its sum is dynrt_frontend_input_tokens_total)",
    ("model",), buckets=metrics.TOKEN_BUCKETS)
OUTPUT_LENGTH = metrics.histogram(
    "dynrt_frontend_request_output_tokens",
    "tokens generated for every request admitted and tokenized, however it ended (its sum is "
    "dynrt_frontend_output_tokens_total; usage.completion_tokens of a completed request)",
    ("model",), buckets=metrics.TOKEN_BUCKETS)

_JSON = "application/json"
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "Connection": "keep-alive",
                "X-Accel-Buffering": "no"}
_json_encoder = msgspec.json.Encoder()
# How long streams of a worker that deregistered after draining may take to deliver
# their last frames before they count as broken.
_DRAINED_GRACE_SECONDS = 0.5
_ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
_MODEL_LABEL = "dynrt_model_label"  # request keys used for metrics
_COUNTED = "dynrt_counted"

OpenAIRequest = ChatCompletionRequest | CompletionRequest


def json_response(obj: object, status: int = 200) -> web.Response:
    return web.Response(body=_json_encoder.encode(obj), status=status, content_type=_JSON)


class _Latency:
    """Time to first token of every request; inter-token latency of streamed ones (the
    gaps a streaming client sees)."""

    __slots__ = ("_ttft", "_itl", "_last", "_first")

    def __init__(self, model: str, started: float, inter_token: bool) -> None:
        self._ttft = TTFT.labels(model)
        self._itl = ITL.labels(model) if inter_token else None
        self._last = started
        self._first = True

    def observe(self, token_count: int) -> None:
        """New tokens have arrived (``token_count`` of them, possibly none)."""
        now = time.monotonic()
        if self._first:
            self._ttft.observe(now - self._last)
            self._first = False
        elif self._itl is not None and token_count:
            self._itl.observe((now - self._last) / token_count)
        self._last = now


class OpenAIServing:
    """Answers chat and completion requests on the instances ``routing`` knows."""

    def __init__(self, *, frontend_id: str, routing: RoutingService, transport: NatsTransport,
                 default_max_tokens: int, migration: MigrationConfig, chat: ChatSettings | None = None) -> None:
        self.frontend_id = frontend_id
        self.routing = routing
        self.transport = transport
        self.default_max_tokens = default_max_tokens
        self.migration = migration
        self.chat = chat or ChatSettings()  # --chat-template, tool-call and reasoning parsers
        self.draining = False  # set on shutdown: new requests are turned away
        self.in_flight = 0
        self.known_models: set[str] = set()  # every model an instance ever served here
        self.generations_by_instance: dict[str, set[Generation]] = {}
        routing.on_added.append(self._on_instance_added)
        routing.on_removed.append(self._on_instance_removed)

    # -- request metrics ----------------------------------------------------------
    def label_model(self, request: web.Request, model: str) -> None:
        """Label the request's metrics with ``model`` if it is one this frontend serves
        (client input must not create label values without bound)."""
        if model in self.known_models or model in self.routing.models():
            request[_MODEL_LABEL] = model

    def count_rejected(self, request: web.Request, status: int) -> None:
        """Requests refused before generation started (bad input, unknown model, no
        instance, auth, size) count in ``dynrt_frontend_requests_total`` too. A model the
        frontend does not serve is labelled ``_unknown``."""
        endpoint = _ENDPOINTS.get(request.path)
        if endpoint is not None and not request.get(_COUNTED):
            REQUESTS.labels(request.get(_MODEL_LABEL, "_unknown"), endpoint, str(status)).inc()

    # -- OpenAI endpoints ---------------------------------------------------------
    async def chat_completion(self, request: web.Request, req: ChatCompletionRequest) -> web.StreamResponse:
        plan = plan_chat(req, self.chat)  # tools, structured output, template options

        def prompt_ids(tokenizer: Tokenizer) -> list[int]:
            return tokenizer.apply_chat_template(req.template_messages(), plan.template)

        return await self._serve(request, req, "chat", prompt_ids, structured=plan.structured,
                                 output=plan.output if plan.output.needed else None)

    async def completion(self, request: web.Request, req: CompletionRequest) -> web.StreamResponse:
        def prompt_ids(tokenizer: Tokenizer) -> list[int]:
            prompt = req.prompt_input()
            return tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

        return await self._serve(request, req, "completions", prompt_ids,
                                 structured=structured_output(req.response_format, req.structured_outputs))

    async def _serve(self, request: web.Request, req: OpenAIRequest, endpoint: str,
                     prompt_ids_of: Callable[[Tokenizer], list[int]], *, structured: StructuredOutput | None = None,
                     output: ChatOutputRules | None = None) -> web.StreamResponse:
        arrived = time.monotonic()
        records, tokenizer = await self._admit(req.model)
        prompt_ids = prompt_ids_of(tokenizer)
        context_length = min(r.context_length for r in records)
        sampling = to_sampling_params(req, prompt_len=len(prompt_ids), context_length=context_length,
                                      default_max_tokens=self.default_max_tokens,
                                      # ignore_eos: the end-of-turn ids are the chat model's
                                      # EOS; vLLM would still stop on them if sent as stops.
                                      stop_token_ids=[] if req.ignore_eos else tokenizer.stop_token_ids)
        if structured is not None:
            sampling = msgspec.structs.replace(sampling, structured=structured)
        prefix = "chatcmpl-" if endpoint == "chat" else "cmpl-"
        generation = Generation(request_id=prefix + uuid.uuid4().hex[:24], model=req.model, prompt_ids=prompt_ids,
                                sampling=sampling, frontend_id=self.frontend_id, config=self.migration,
                                transport=self.transport, routing=self.routing,
                                on_instance_stream=self._track_instance)
        return await self._generate(request, req, endpoint, generation, tokenizer, arrived, output)

    async def _admit(self, model: str) -> tuple[list[InstanceRecord], Tokenizer]:
        """The model's instances and tokenizer, or the error that turns the request away
        before it is templated and tokenized: this frontend draining, an unknown model,
        no instance, every instance busy (shedding load must be cheap)."""
        if self.draining:
            raise errors.draining()
        records = self.routing.models().get(model)
        if not records:
            if model in self.known_models:
                raise errors.NoLiveInstance(model)
            raise errors.model_not_found(model)
        busy = self.routing.admission(model)
        if busy is not None:
            raise errors.Overloaded(busy.retry_after)
        tokenizer = await load_tokenizer_async(records[0].tokenizer)
        return records, tokenizer

    async def _generate(self, request: web.Request, req: OpenAIRequest, endpoint: str, generation: Generation,
                        tokenizer: Tokenizer, arrived: float,
                        output: ChatOutputRules | None = None) -> web.StreamResponse:
        """Run the generation and answer; account for the request however it ends
        (``arrived``: ``time.monotonic()`` when serving it began; ``output``: how to read
        a chat output that is more than content, see chat_output.py)."""
        started = time.monotonic()
        text = TextStream(generation, tokenizer.new_detokenizer(generation.prompt_ids), req.stop_strings())
        latency = _Latency(req.model, started, inter_token=req.stream)
        status = "200"
        self.in_flight += 1
        IN_FLIGHT.inc()
        INPUT_TOKENS.labels(req.model).inc(len(generation.prompt_ids))
        PROMPT_LENGTH.labels(req.model).observe(len(generation.prompt_ids))
        try:
            await generation.start()
            QUEUE_TIME.labels(req.model).observe(time.monotonic() - arrived)
            if req.stream:
                return await self._stream(request, req, endpoint, generation, text, latency, output)
            return await self._complete(req, endpoint, generation, text, latency, output)
        except errors.GenerationError as exc:
            error = errors.to_openai(exc)
            status = str(error.status)
            raise error from None
        except (asyncio.CancelledError, ConnectionResetError):
            status = "499"  # client closed the request
            CANCELLATIONS.labels(req.model).inc()
            log.info("client_disconnected", request_id=generation.request_id, generated=len(generation.generated))
            raise
        finally:
            await generation.close()
            self.in_flight -= 1
            IN_FLIGHT.dec()
            OUTPUT_TOKENS.labels(req.model).inc(len(generation.generated))
            OUTPUT_LENGTH.labels(req.model).observe(len(generation.generated))
            if status == "200":
                REQUEST_DURATION.labels(req.model).observe(time.monotonic() - arrived)
            REQUESTS.labels(req.model, endpoint, status).inc()
            request[_COUNTED] = True
            log.info("request_done", request_id=generation.request_id, model=req.model, status=status,
                     prompt_tokens=len(generation.prompt_ids), completion_tokens=len(generation.generated),
                     migrations=generation.migrations, seconds=round(time.monotonic() - started, 3))

    async def _complete(self, req: OpenAIRequest, endpoint: str, generation: Generation, text: TextStream,
                        latency: _Latency, output: ChatOutputRules | None) -> web.Response:
        parts: list[str] = []
        async for delta in text:
            latency.observe(delta.token_count)
            parts.append(delta.text)
        content = "".join(parts)
        usage = text.usage()
        created = int(time.time())
        if endpoint == "chat" and output is not None:
            parsed = parse_message(content, output)
            finish = finish_reason_of(output, bool(parsed.tool_calls), text.finish_reason, streamed=False)
            body: msgspec.Struct = ChatCompletionResponse(
                id=generation.request_id, created=created, model=req.model, usage=usage,
                choices=[ChatChoice(message=AssistantMessage(**message_fields(parsed)),  # type: ignore[arg-type]
                                    finish_reason=finish)])  # type: ignore[arg-type]
        elif endpoint == "chat":
            body = ChatCompletionResponse(
                id=generation.request_id, created=created, model=req.model, usage=usage,
                choices=[ChatChoice(message=AssistantMessage(content=content), finish_reason=text.finish_reason)])
        else:
            body = CompletionResponse(id=generation.request_id, created=created, model=req.model, usage=usage,
                                      choices=[CompletionChoice(text=content, finish_reason=text.finish_reason)])
        return json_response(body)

    async def _stream(self, request: web.Request, req: OpenAIRequest, endpoint: str, generation: Generation,
                      text: TextStream, latency: _Latency, output: ChatOutputRules | None) -> web.StreamResponse:
        response = web.StreamResponse(headers=_SSE_HEADERS)
        await response.prepare(request)
        created = int(time.time())
        encoder: ChatChunkEncoder | CompletionChunkEncoder
        if endpoint == "chat":
            encoder = ChatChunkEncoder(generation.request_id, req.model, created)
            await response.write(encoder.role())
        else:
            encoder = CompletionChunkEncoder(generation.request_id, req.model, created)
        # The closing events (last content, finish, usage, [DONE]) go out together with
        # the end of the chunked body: one write instead of up to five.
        tail = b""
        finish_reason: str = "length"
        try:
            if output is not None:
                tail, finish_reason = await self._stream_parsed(response, req, generation, text, latency, output,
                                                                created)
            else:
                async for delta in text:
                    latency.observe(delta.token_count)
                    if delta.text:
                        if delta.finish_reason is None:
                            await response.write(encoder.content(delta.text))
                        else:
                            tail = encoder.content(delta.text)
                finish_reason = text.finish_reason
            tail += encoder.finish(finish_reason)  # type: ignore[arg-type]
            if req.include_usage():
                tail += encoder.usage(text.usage())
            tail += DONE
        except errors.GenerationError as exc:
            # The response has started: the error goes in the stream, then [DONE].
            error = errors.to_openai(exc)
            log.warning("stream_error", request_id=generation.request_id, status=error.status, error=error.message)
            tail += error_event(error)
        await response.write_eof(tail)
        return response

    async def _stream_parsed(self, response: web.StreamResponse, req: OpenAIRequest, generation: Generation,
                             text: TextStream, latency: _Latency, output: ChatOutputRules,
                             created: int) -> tuple[bytes, str]:
        """The chat stream when its text is read as reasoning / content / tool calls
        (chat_output.py): the events written, the last one returned unsent (it goes out
        with the end of the stream), and the finish reason."""
        assembler = ChatDeltaAssembler(output)
        pending = b""
        async for delta in text:
            latency.observe(delta.token_count)
            message = assembler.feed(delta.text) if delta.text else None
            if message:
                if pending:
                    await response.write(pending)
                pending = delta_event(generation.request_id, req.model, created, message)
        message = assembler.finish()
        if message:
            pending += delta_event(generation.request_id, req.model, created, message)
        return pending, finish_reason_of(output, assembler.tools_called, text.finish_reason, streamed=True)

    # -- instances ------------------------------------------------------------------
    def _track_instance(self, generation: Generation, instance_id: str | None) -> None:
        """Know which generations stream from which instance, so an instance leaving
        discovery interrupts exactly those."""
        for streams in self.generations_by_instance.values():
            streams.discard(generation)
        if instance_id is not None:
            self.generations_by_instance.setdefault(instance_id, set()).add(generation)

    def _on_instance_removed(self, record: InstanceRecord) -> None:
        if record.draining:
            # A drained worker sent its open streams a MigrateFrame (or their end) before
            # releasing its lease, but NATS and the etcd watch are different paths: give
            # those frames a moment to arrive, and break only streams still open then.
            asyncio.get_running_loop().call_later(_DRAINED_GRACE_SECONDS, self._interrupt_streams, record.instance_id)
            return
        self._interrupt_streams(record.instance_id)

    def _interrupt_streams(self, instance_id: str) -> None:
        for generation in list(self.generations_by_instance.pop(instance_id, ())):
            generation.interrupt("lease_expired")

    def _on_instance_added(self, record: InstanceRecord) -> None:
        self.known_models.add(record.model)
