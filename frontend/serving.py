"""Serving OpenAI requests: admission → prompt ids → generation → response.

``OpenAIServing`` takes a decoded, validated request (``openai_protocol``) and answers
it (a resumable stream's ids, checkpoint and resumption: ``resume.py``): admission (draining, unknown model, no instance, every instance busy — all before
templating and tokenizing, so shedding load stays cheap), prompt ids, sampling
parameters, a :class:`~dynrt.frontend.migration.Generation` that survives worker
failures, and the response — one JSON body, or server-sent events — both read from one
:class:`~dynrt.frontend.text_stream.TextStream`. It keeps the request metrics and the
``request_done`` log line; ``InstanceStreams`` (instance_streams.py) knows which
generation streams from which instance, so an instance leaving discovery interrupts
exactly those, and an instance whose load reports stopped (suspect: SIGSTOP, a
partition) gets one ping, and, unanswered within ``--ping-timeout``, its streams move
elsewhere at once (cause ``suspect``) instead of waiting out ``--stream-stall-timeout``.

Failures the migration layer and admission raise (``errors.GenerationError``) become
OpenAI errors through ``errors.to_openai``: as the response when it has not started, as
an error event in the stream when it has.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import aclosing

import msgspec
from aiohttp import web

from dynrt.frontend import errors
from dynrt.frontend.chat_output import ChatDeltaAssembler, ChatOutputRules
from dynrt.frontend.chat_request import ChatSettings, plan_chat
from dynrt.frontend.choices import Choice, all_or_none, batch_bytes, choice_sampling, event_bytes, merged
from dynrt.frontend.logprobs import ChatLogprobs, LogprobRenderer, merge_completion
from dynrt.frontend.instance_streams import InstanceStreams
from dynrt.frontend.migration import Generation
from dynrt.frontend.openai_protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
)
from dynrt.frontend.sampling import to_sampling_params
from dynrt.frontend.sse import DONE, ChatChunkEncoder, CompletionChunkEncoder, error_event
from dynrt.frontend.structured_output import structured_output
from dynrt.frontend.resume import ResumeOptions, Resumes, StreamEvents, api_key_of, write_resumable
from dynrt.frontend.text_stream import TextStream, TokenSource
from dynrt.frontend.tokenizer import Tokenizer, load_tokenizer_async
from dynrt.router.service import RoutingService
from dynrt.runtime import metrics
from dynrt.runtime.checkpoint_log import new_request_id
from dynrt.runtime.config import MigrationConfig
from dynrt.runtime.log import get_logger
from dynrt.runtime.protocol import InstanceRecord, StructuredOutput
from dynrt.runtime.stream_checkpoints import LoadedCheckpoint
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
_ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
_MODEL_LABEL = "dynrt_model_label"  # request keys used for metrics
_COUNTED = "dynrt_counted"

OpenAIRequest = ChatCompletionRequest | CompletionRequest


def json_response(obj: object, status: int = 200) -> web.Response:
    return web.Response(body=_json_encoder.encode(obj), status=status, content_type=_JSON)


class _EventStreamResponse(web.StreamResponse):
    """A streamed response whose headers wait for its first write and go out in the same
    send (aiohttp's own ``web.Response`` buffers them the same way): one send per
    response less, and sends are most of a frontend's CPU per token on a small VM."""

    _send_headers_immediately = False


class _ModelMetrics:
    """The request metrics' children for one model, looked up once: ``labels()`` takes a
    lock and builds a key, and a request would call it ten times."""

    __slots__ = ("ttft", "itl", "input_tokens", "prompt_length", "queue_time", "output_tokens", "output_length",
                 "duration", "cancellations")

    def __init__(self, model: str) -> None:
        self.ttft = TTFT.labels(model)
        self.itl = ITL.labels(model)
        self.input_tokens = INPUT_TOKENS.labels(model)
        self.prompt_length = PROMPT_LENGTH.labels(model)
        self.queue_time = QUEUE_TIME.labels(model)
        self.output_tokens = OUTPUT_TOKENS.labels(model)
        self.output_length = OUTPUT_LENGTH.labels(model)
        self.duration = REQUEST_DURATION.labels(model)
        self.cancellations = CANCELLATIONS.labels(model)


class _Latency:
    """Time to first token of every request; inter-token latency of streamed ones (the
    gaps a streaming client sees): one observation per write to the client — the time
    since the previous write over the tokens this one carries (a write of one-token
    events sent together counts once, as a coalesced chunk of as many tokens would)."""

    __slots__ = ("_ttft", "_itl", "_last", "_first")

    def __init__(self, model: _ModelMetrics, started: float, inter_token: bool) -> None:
        self._ttft = model.ttft
        self._itl = model.itl if inter_token else None
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
                 default_max_tokens: int, migration: MigrationConfig, chat: ChatSettings | None = None,
                 resumes: Resumes | None = None) -> None:
        self.frontend_id = frontend_id
        self.routing = routing
        self.transport = transport
        self.default_max_tokens = default_max_tokens
        self.migration = migration
        self.chat = chat or ChatSettings()  # --chat-template, tool-call and reasoning parsers
        self.resumes = resumes or Resumes(None)  # resumable streams' checkpoints
        self.draining = False  # set on shutdown: new requests are turned away
        self.in_flight = 0
        self.known_models: set[str] = set()  # every model an instance ever served here
        self.streams = InstanceStreams(routing, transport, migration.ping_timeout)
        self._model_metrics: dict[str, _ModelMetrics] = {}  # models admitted here (bounded)
        routing.on_added.append(lambda record: self.known_models.add(record.model))

    # -- request metrics ----------------------------------------------------------
    def label_model(self, request: web.Request, model: str) -> None:
        """Label the request's metrics with ``model`` if it is one this frontend serves
        (client input must not create label values without bound)."""
        if model in self.known_models or model in self.routing.models():
            request[_MODEL_LABEL] = model

    def _metrics_of(self, model: str) -> _ModelMetrics:
        """The metrics' children for an admitted (hence served) model."""
        children = self._model_metrics.get(model)
        if children is None:
            children = self._model_metrics[model] = _ModelMetrics(model)
        return children

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

        def prompts(tokenizer: Tokenizer) -> list[tuple[list[int], str]]:
            return [(tokenizer.apply_chat_template(req.template_messages(), plan.template), "")]

        return await self._serve(request, req, "chat", prompts, structured=plan.structured,
                                 output=plan.output if plan.output.needed else None)

    async def completion(self, request: web.Request, req: CompletionRequest) -> web.StreamResponse:
        def prompts(tokenizer: Tokenizer) -> list[tuple[list[int], str]]:
            """Each prompt's ids, and its text for ``echo`` (token ids are decoded)."""
            out = []
            for prompt in req.prompt_inputs():
                ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
                echo = "" if not req.echo else prompt if isinstance(prompt, str) else tokenizer.decode(ids)
                out.append((ids, echo))
            return out

        return await self._serve(request, req, "completions", prompts,
                                 structured=structured_output(req.response_format, req.structured_outputs))

    async def _serve(self, request: web.Request, req: OpenAIRequest, endpoint: str,
                     prompts_of: Callable[[Tokenizer], list[tuple[list[int], str]]], *,
                     structured: StructuredOutput | None = None,
                     output: ChatOutputRules | None = None) -> web.StreamResponse:
        """``prompts_of``: each prompt's ids and the text to echo before its output;
        ``output``: how to read a chat output that is more than content (chat_output.py)."""
        arrived = time.monotonic()
        options = ResumeOptions.of(request, req)
        api_key = api_key_of(request)
        loaded: LoadedCheckpoint | None = None
        if options.resume_from is not None:  # before admission: a resumed stream is not shed
            loaded = await self.resumes.load(options.resume_from[0], api_key)
        elif options.resumable:
            self.resumes.require_store()
        records, tokenizer = await self._admit(req.model, continuing=loaded is not None)
        prompts = prompts_of(tokenizer)
        if options.resumable and len(prompts) > 1:
            raise errors.unsupported_param("prompt", "as a list of prompts is not supported with resumable streams")
        context_length = min(r.context_length for r in records)
        # 128 bits from the OS's CSPRNG: a request id must not be guessable (it names a
        # stream to its worker and, for resumable streams, to the checkpoint store).
        request_id = loaded.checkpoint.request_id if loaded is not None else \
            new_request_id("chatcmpl-" if endpoint == "chat" else "cmpl-")
        n = req.num_choices()
        choices: list[Choice] = []
        stream_events: StreamEvents | None = None
        for p, (prompt_ids, echo) in enumerate(prompts):
            sampling = to_sampling_params(req, prompt_len=len(prompt_ids), context_length=context_length,
                                          default_max_tokens=self.default_max_tokens, vocab_size=tokenizer.vocab_size,
                                          # ignore_eos: the end-of-turn ids are the chat model's
                                          # EOS; vLLM would still stop on them if sent as stops.
                                          stop_token_ids=[] if req.ignore_eos else tokenizer.stop_token_ids)
            if structured is not None:
                sampling = msgspec.structs.replace(sampling, structured=structured)
            for i in range(n):
                index = p * n + i
                generation = Generation(
                    request_id=request_id if len(prompts) * n == 1 else f"{request_id}-{index}", model=req.model,
                    prompt_ids=prompt_ids, sampling=choice_sampling(sampling, i), frontend_id=self.frontend_id,
                    config=self.migration, transport=self.transport, routing=self.routing,
                    on_instance_stream=self.streams.track, on_instance_dead=self.streams.on_instance_dead,
                    resume_grace=self.resumes.grace if options.resumable else 0.0)
                source: TokenSource = generation
                if options.resumable:
                    stream_events, source = await self.resumes.start(generation, loaded, options, api_key,
                                                                     self.frontend_id, arrived)
                text = TextStream(source, tokenizer.new_detokenizer(prompt_ids, req.skip_special_tokens),
                                  req.stop_strings(), include_stop_str_in_output=req.include_stop_str_in_output,
                                  min_tokens=req.min_tokens)
                renderer = LogprobRenderer(tokenizer) if sampling.logprobs is not None else None
                choices.append(Choice(index, generation, text, renderer, sampling.logprobs or 0, echo, output,
                                       None if output is None else ChatDeltaAssembler(output)))
        return await self._generate(request, req, endpoint, request_id, choices, arrived, stream_events)

    async def _admit(self, model: str, continuing: bool = False) -> tuple[list[InstanceRecord], Tokenizer]:
        """The model's instances and tokenizer, or the error that turns the request away
        before it is templated and tokenized: this frontend draining, an unknown model,
        no instance, every instance busy (shedding load must be cheap; a resumed stream,
        ``continuing``, is not shed)."""
        if self.draining:
            raise errors.draining()
        records = self.routing.models().get(model)
        if not records:
            if model in self.known_models:
                raise errors.NoLiveInstance(model)
            raise errors.model_not_found(model)
        busy = None if continuing else self.routing.admission(model)
        if busy is not None:
            raise errors.Overloaded(busy.retry_after)
        tokenizer = await load_tokenizer_async(records[0].tokenizer)
        return records, tokenizer

    async def _generate(self, request: web.Request, req: OpenAIRequest, endpoint: str, request_id: str,
                        choices: list[Choice], arrived: float,
                        stream_events: StreamEvents | None = None) -> web.StreamResponse:
        """Run the choices' generations and answer; account for the request however it
        ends (``arrived``: ``time.monotonic()`` when serving it began). A resumable
        stream (``stream_events``) keeps its checkpoint and its worker keeps generating
        when the client leaves; it is deleted when the stream ends."""
        started = time.monotonic()
        model = self._metrics_of(req.model)
        latency = _Latency(model, started, inter_token=bool(req.stream))
        status = "200"
        prompt_tokens = sum(len(c.generation.prompt_ids) for c in choices if c.first_of_prompt(req.num_choices()))
        self.in_flight += 1
        IN_FLIGHT.inc()
        model.input_tokens.inc(prompt_tokens)
        model.prompt_length.observe(prompt_tokens)
        try:
            for choice in choices:
                await choice.generation.start()
            model.queue_time.observe(time.monotonic() - arrived)
            if req.stream:
                response = await self._stream(request, req, endpoint, request_id, choices, latency, stream_events)
            else:
                return await self._complete(req, endpoint, request_id, choices, latency)
            if stream_events is not None:
                await stream_events.writer.finish()
            return response
        except errors.GenerationError as exc:
            error = errors.to_openai(exc)
            status = str(error.status)
            if stream_events is not None:
                await stream_events.writer.finish()
            raise error from None
        except (asyncio.CancelledError, ConnectionResetError):
            status = "499"  # client closed the request
            model.cancellations.inc()
            log.info("client_disconnected", request_id=request_id,
                     generated=sum(len(c.generation.generated) for c in choices), resumable=stream_events is not None)
            if stream_events is not None:  # it may resume on any frontend
                await choices[0].generation.detach()
                await stream_events.writer.close()
            raise
        finally:
            if stream_events is not None and not stream_events.writer.closed:
                # Ended some other way (a bug): the stream cannot be resumed; its
                # checkpoint must not stay behind with the flusher writing keep-alives.
                await stream_events.writer.finish()
            for choice in choices:
                await choice.generation.close()
            generated = sum(len(c.generation.generated) for c in choices)
            self.in_flight -= 1
            IN_FLIGHT.dec()
            model.output_tokens.inc(generated)
            model.output_length.observe(generated)
            if status == "200":
                model.duration.observe(time.monotonic() - arrived)
            REQUESTS.labels(req.model, endpoint, status).inc()
            request[_COUNTED] = True
            log.info("request_done", request_id=request_id, model=req.model, status=status, choices=len(choices),
                     prompt_tokens=prompt_tokens, completion_tokens=generated,
                     migrations=sum(c.generation.migrations for c in choices),
                     seconds=round(time.monotonic() - started, 3))

    def _usage(self, req: OpenAIRequest, choices: list[Choice]) -> UsageInfo:
        """The prompt counted once per prompt (not per choice); completions summed."""
        n = req.num_choices()
        firsts = [c for c in choices if c.first_of_prompt(n)]
        return UsageInfo.of(sum(len(c.generation.prompt_ids) for c in firsts),
                            sum(c.text.completion_tokens for c in choices),
                            sum(c.generation.cached_tokens for c in firsts))

    async def _complete(self, req: OpenAIRequest, endpoint: str, request_id: str, choices: list[Choice],
                        latency: _Latency) -> web.Response:
        if len(choices) == 1:
            await choices[0].collect(latency.observe, endpoint)
        else:
            await all_or_none([c.collect(latency.observe, endpoint) for c in choices])
        created = int(time.time())
        if endpoint == "chat":
            body: msgspec.Struct = ChatCompletionResponse(
                id=request_id, created=created, model=req.model, usage=self._usage(req, choices),
                choices=[ChatChoice(index=c.index, message=c.message(),
                                    logprobs=None if c.renderer is None else ChatLogprobs(content=c.chat_logprobs),
                                    finish_reason=c.finish_reason(streamed=False)) for c in choices])  # type: ignore[arg-type]
        else:
            body = CompletionResponse(
                id=request_id, created=created, model=req.model, usage=self._usage(req, choices),
                choices=[CompletionChoice(index=c.index, text=c.echo + "".join(c.parts),
                                          logprobs=None if c.renderer is None else merge_completion(c.completion_logprobs),
                                          finish_reason=c.text.finish_reason) for c in choices])
        return json_response(body)

    async def _stream(self, request: web.Request, req: OpenAIRequest, endpoint: str, request_id: str,
                      choices: list[Choice], latency: _Latency,
                      stream_events: StreamEvents | None = None) -> web.StreamResponse:
        response = _EventStreamResponse(headers=_SSE_HEADERS)
        await response.prepare(request)
        # A resumable stream's chunks say when it started, resumed or not.
        created = int(stream_events.created) if stream_events is not None else int(time.time())
        encoders: list[ChatChunkEncoder] | list[CompletionChunkEncoder]
        # The opening events (a role event per chat choice, completions' echoes) go out
        # with the first output, in its send, as vLLM sends the role with the first output
        # too; the headers, buffered by prepare(), go in the same send.
        if endpoint == "chat":
            encoders = [ChatChunkEncoder(request_id, req.model, created, c.index) for c in choices]
            head = b"".join(e.role() for e in encoders)
            for c in choices:
                c.event_header = (request_id, req.model, created)
        else:
            encoders = [CompletionChunkEncoder(request_id, req.model, created, c.index) for c in choices]
            head = b"".join(e.content(c.echo) for e, c in zip(encoders, choices) if c.echo)
        # The closing events (last content, finish, usage, [DONE]) of a one-choice
        # request go out with the end of the chunked body: one write instead of up to five.
        tail = b""
        try:
            if stream_events is not None:
                def trailer() -> bytes:
                    usage = encoders[0].usage(self._usage(req, choices)) if req.include_usage() else b""
                    return usage + DONE

                opening, head = head, b""  # sent, with its ids, by write_resumable
                await write_resumable(response, choices[0], encoders[0], opening, stream_events, endpoint, trailer,
                                      latency.observe)
                return response
            if len(choices) == 1:  # the hot path: no merging of streams
                # A batch is every delta the generation had ready at once: its events go
                # out in one write (one send), before the next frame is awaited — no token
                # waits for another.
                choice, encoder, text = choices[0], encoders[0], choices[0].text
                counted = 0
                async for batch in text.batches():
                    latency.observe(text.completion_tokens - counted)
                    counted = text.completion_tokens
                    data = batch_bytes(choice, encoder, batch, endpoint)
                    if batch[-1].finish_reason is not None:
                        tail = data
                    elif data:
                        await response.write(head + data if head else data)
                        head = b""
            else:
                # Closed on the way out, whatever the way: its readers must not outlive the request.
                async with aclosing(merged([c.text for c in choices])) as events:
                    async for k, delta in events:
                        latency.observe(delta.token_count)
                        data = event_bytes(choices[k], encoders[k], delta, endpoint)
                        if data:
                            await response.write(head + data if head else data)
                            head = b""
            if req.include_usage():
                tail += encoders[0].usage(self._usage(req, choices))
            tail += DONE
        except errors.GenerationError as exc:
            # The response has started: the error goes in the stream, then [DONE].
            error = errors.to_openai(exc)
            log.warning("stream_error", request_id=request_id, status=error.status, error=error.message)
            tail += error_event(error)
        await response.write_eof(head + tail)
        return response
