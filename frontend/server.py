"""``dynrt frontend``: a stateless OpenAI-compatible HTTP server (aiohttp on uvloop).

A request is validated, templated and tokenized here (routing and migration work on token
ids), routed (``dynrt.router``), and generated through the migration layer
(``dynrt.frontend.migration``), which survives worker failures. The frontend registers
under an etcd lease so workers abort its requests if it dies.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from dynrt.frontend import errors
from dynrt.frontend.migration import Generation
from dynrt.frontend.openai_protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    UsageInfo,
    decode_chat_request,
    decode_completion_request,
    to_sampling_params,
)
from dynrt.frontend.sse import DONE, ChatChunkEncoder, CompletionChunkEncoder, error_event
from dynrt.frontend.detokenizer import StopStringMatcher
from dynrt.frontend.tokenizer import Tokenizer, load_tokenizer_async
from dynrt.router.cost import BusyThresholdSettings
from dynrt.router.service import RoutingService
from dynrt.runtime import metrics
from dynrt.runtime.config import FrontendConfig
from dynrt.runtime.discovery import EtcdClient, LeasedRegistration
from dynrt.runtime.health import live_handler, metrics_handler
from dynrt.runtime.lifecycle import GracefulShutdown
from dynrt.runtime.log import get_logger
from dynrt.runtime.protocol import FrontendRecord, InstanceRecord, encode_json, frontend_key
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

_JSON = "application/json"
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "Connection": "keep-alive",
                "X-Accel-Buffering": "no"}
_json_encoder = msgspec.json.Encoder()
class _ModelOnly(msgspec.Struct):
    model: str


_model_only_decoder = msgspec.json.Decoder(_ModelOnly)
_Req = TypeVar("_Req", ChatCompletionRequest, CompletionRequest)
# How long streams of a worker that deregistered after draining may take to deliver
# their last frames before they count as broken.
_DRAINED_GRACE_SECONDS = 0.5
_ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
_MODEL_LABEL = "dynrt_model_label"  # request keys used for metrics
_COUNTED = "dynrt_counted"


def _json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=_json_encoder.encode(obj), status=status, content_type=_JSON)


def _error_response(error: errors.OpenAIError) -> web.Response:
    return web.Response(body=error.to_body(), status=error.status, content_type=_JSON, headers=error.headers)


class FrontendService:
    def __init__(self, config: FrontendConfig) -> None:
        self.config = config
        self.frontend_id = uuid.uuid4().hex[:12]
        self.api_key = config.api_key or (Path(config.api_key_file).read_text().strip() if config.api_key_file else "")
        self.etcd = EtcdClient.from_config(config)
        self.registration = LeasedRegistration(self.etcd, ttl=config.lease_ttl)
        self.transport: NatsTransport | None = None
        self.routing: RoutingService | None = None
        self.draining = False
        self.shutdown = GracefulShutdown()
        self.known_models: set[str] = set()
        self.generations_by_instance: dict[str, set[Generation]] = {}
        self.in_flight = 0
        self.runner: web.AppRunner | None = None
        self.port = config.http_port
        self.app = self._build_app()

    # -- app ----------------------------------------------------------------------
    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes, middlewares=[self._error_middleware])
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/live", live_handler)
        app.router.add_get("/metrics", metrics_handler)
        app.router.add_get("/busy_threshold", self.get_busy_threshold)
        app.router.add_post("/busy_threshold", self.set_busy_threshold)
        return app

    @web.middleware
    async def _error_middleware(self, request: web.Request,
                                handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """Every error is an OpenAI-shaped JSON body with the right status: never a
        stack trace, never an HTML page."""
        try:
            if request.path.startswith("/v1/") and self.api_key:
                if request.headers.get("Authorization", "") != f"Bearer {self.api_key}":
                    raise errors.unauthorized()
            return await handler(request)
        except errors.OpenAIError as exc:
            self._count_rejected(request, exc.status)
            return _error_response(exc)
        except web.HTTPRequestEntityTooLarge:
            self._count_rejected(request, 413)
            return _error_response(errors.body_too_large(self.config.max_body_bytes))
        except web.HTTPNotFound:
            return _error_response(errors.OpenAIError(404, f"Unknown path {request.path}", "invalid_request_error",
                                                      code="not_found"))
        except web.HTTPMethodNotAllowed:
            return _error_response(errors.OpenAIError(405, f"Method {request.method} not allowed on {request.path}",
                                                      "invalid_request_error", code="method_not_allowed"))
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except web.HTTPException:
            raise
        except Exception:
            log.exception("unhandled_error", path=request.path)
            return _error_response(errors.internal())

    def _count_rejected(self, request: web.Request, status: int) -> None:
        """Requests refused before generation started (bad input, unknown model, no
        instance, auth, size) count in ``dynrt_frontend_requests_total`` too. A model the
        frontend does not serve is labelled ``_unknown``: client input must not create
        label values without bound."""
        endpoint = _ENDPOINTS.get(request.path)
        if endpoint is not None and not request.get(_COUNTED):
            REQUESTS.labels(request.get(_MODEL_LABEL, "_unknown"), endpoint, str(status)).inc()

    def _label_model(self, request: web.Request, model: str) -> None:
        assert self.routing is not None
        if model in self.known_models or model in self.routing.models():
            request[_MODEL_LABEL] = model

    def _decode(self, request: web.Request, body: bytes, decode: Callable[[bytes], _Req]) -> _Req:
        """Decode and validate a body; label the request's model for metrics even when
        the body is invalid (as long as it names one)."""
        try:
            req = decode(body)
        except errors.OpenAIError:
            try:
                self._label_model(request, _model_only_decoder.decode(body).model)
            except (msgspec.DecodeError, msgspec.ValidationError):
                pass
            raise
        self._label_model(request, req.model)
        return req

    # -- OpenAI endpoints ---------------------------------------------------------
    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        req = self._decode(request, body, decode_chat_request)
        records, tokenizer = await self._admit(req.model)
        prompt_ids = tokenizer.apply_chat_template(req.template_messages())
        return await self._generate(request, req, "chat", records, tokenizer, prompt_ids)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        req = self._decode(request, body, decode_completion_request)
        records, tokenizer = await self._admit(req.model)
        prompt = req.prompt_input()
        prompt_ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return await self._generate(request, req, "completions", records, tokenizer, prompt_ids)

    async def list_models(self, _: web.Request) -> web.Response:
        assert self.routing is not None
        cards = [ModelCard(id=model, created=int(min(r.started_at for r in records)))
                 for model, records in sorted(self.routing.models().items())]
        return _json_response(ModelList(data=cards))

    async def _admit(self, model: str) -> tuple[list[InstanceRecord], Tokenizer]:
        """The model's instances and tokenizer, or the error that turns the request away
        before it is templated and tokenized: this frontend draining, an unknown model,
        no instance, every instance busy (shedding load must be cheap)."""
        if self.draining:
            raise errors.OpenAIError(503, "This frontend is shutting down; retry on another.",
                                     "service_unavailable", code="draining", headers={"Retry-After": "1"})
        assert self.routing is not None
        records = self.routing.models().get(model)
        if not records:
            if model in self.known_models:
                raise errors.no_instances(model, 2)
            raise errors.model_not_found(model)
        busy = self.routing.admission(model)
        if busy is not None:
            raise errors.overloaded(busy.retry_after)
        tokenizer = await load_tokenizer_async(records[0].tokenizer)
        return records, tokenizer

    async def _generate(self, request: web.Request, req: ChatCompletionRequest | CompletionRequest, endpoint: str,
                        records: list[InstanceRecord], tokenizer: Tokenizer, prompt_ids: list[int]) -> web.StreamResponse:
        assert self.transport is not None and self.routing is not None
        context_length = min(r.context_length for r in records)
        sampling = to_sampling_params(req, prompt_len=len(prompt_ids), context_length=context_length,
                                      default_max_tokens=self.config.default_max_tokens,
                                      # ignore_eos: the end-of-turn ids are the chat model's
                                      # EOS; vLLM would still stop on them if sent as stops.
                                      stop_token_ids=[] if req.ignore_eos else tokenizer.stop_token_ids)
        prefix = "chatcmpl-" if endpoint == "chat" else "cmpl-"
        request_id = prefix + uuid.uuid4().hex[:24]
        generation = Generation(request_id=request_id, model=req.model, prompt_ids=prompt_ids, sampling=sampling,
                                frontend_id=self.frontend_id, config=self.config.migration, transport=self.transport,
                                routing=self.routing, on_instance_stream=self._track_instance)
        started = time.monotonic()
        status = "200"
        self.in_flight += 1
        IN_FLIGHT.inc()
        INPUT_TOKENS.labels(req.model).inc(len(prompt_ids))
        try:
            await generation.start()
            if req.stream:
                return await self._stream(request, req, endpoint, generation, tokenizer, started)
            return await self._complete(req, endpoint, generation, tokenizer, started)
        except errors.OpenAIError as exc:
            status = str(exc.status)
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            status = "499"  # client closed the request
            CANCELLATIONS.labels(req.model).inc()
            log.info("client_disconnected", request_id=request_id, generated=len(generation.generated))
            raise
        finally:
            await generation.close()
            self.in_flight -= 1
            IN_FLIGHT.dec()
            OUTPUT_TOKENS.labels(req.model).inc(len(generation.generated))
            REQUESTS.labels(req.model, endpoint, status).inc()
            request[_COUNTED] = True
            log.info("request_done", request_id=request_id, model=req.model, status=status,
                     prompt_tokens=len(prompt_ids), completion_tokens=len(generation.generated),
                     migrations=generation.migrations, seconds=round(time.monotonic() - started, 3))

    async def _complete(self, req: ChatCompletionRequest | CompletionRequest, endpoint: str, generation: Generation,
                        tokenizer: Tokenizer, started: float) -> web.Response:
        detokenizer = tokenizer.new_detokenizer(generation.prompt_ids)
        stopper = StopStringMatcher(req.stop_strings())
        parts: list[str] = []
        finish: str = "length"
        first = True
        async for delta in generation.tokens():
            if first:
                TTFT.labels(req.model).observe(time.monotonic() - started)
                first = False
            text, matched = stopper.feed(detokenizer.add(delta.token_ids))
            parts.append(text)
            if matched:
                finish = "stop"
                break
            if delta.finish_reason is not None:
                finish = delta.finish_reason
                parts.append(stopper.feed(detokenizer.flush())[0])
                parts.append(stopper.flush())
        text = "".join(parts)
        usage = UsageInfo.of(len(generation.prompt_ids), len(generation.generated), generation.cached_tokens)
        created = int(time.time())
        if endpoint == "chat":
            body: msgspec.Struct = ChatCompletionResponse(
                id=generation.request_id, created=created, model=req.model, usage=usage,
                choices=[ChatChoice(message=AssistantMessage(content=text), finish_reason=finish)])  # type: ignore[arg-type]
        else:
            body = CompletionResponse(id=generation.request_id, created=created, model=req.model, usage=usage,
                                      choices=[CompletionChoice(text=text, finish_reason=finish)])  # type: ignore[arg-type]
        return _json_response(body)

    async def _stream(self, request: web.Request, req: ChatCompletionRequest | CompletionRequest, endpoint: str,
                      generation: Generation, tokenizer: Tokenizer, started: float) -> web.StreamResponse:
        response = web.StreamResponse(headers=_SSE_HEADERS)
        await response.prepare(request)
        created = int(time.time())
        encoder: ChatChunkEncoder | CompletionChunkEncoder
        if endpoint == "chat":
            encoder = ChatChunkEncoder(generation.request_id, req.model, created)
            await response.write(encoder.role())
        else:
            encoder = CompletionChunkEncoder(generation.request_id, req.model, created)
        detokenizer = tokenizer.new_detokenizer(generation.prompt_ids)
        stopper = StopStringMatcher(req.stop_strings())
        itl = ITL.labels(req.model)
        last = started
        first = True
        finish: str = "length"
        # The closing events (last content, finish, usage, [DONE]) go out together with
        # the end of the chunked body: one write instead of up to five.
        tail = b""
        try:
            async for delta in generation.tokens():
                now = time.monotonic()
                if first:
                    TTFT.labels(req.model).observe(now - started)
                    first = False
                elif delta.token_ids:
                    itl.observe((now - last) / len(delta.token_ids))
                last = now
                text, matched = stopper.feed(detokenizer.add(delta.token_ids))
                if matched:
                    finish = "stop"
                elif delta.finish_reason is not None:
                    finish = delta.finish_reason
                    text += stopper.feed(detokenizer.flush())[0] + stopper.flush()
                if text:
                    if matched or delta.finish_reason is not None:
                        tail = encoder.content(text)
                    else:
                        await response.write(encoder.content(text))
                if matched:
                    break
            tail += encoder.finish(finish)  # type: ignore[arg-type]
            if req.include_usage():
                usage = UsageInfo.of(len(generation.prompt_ids), len(generation.generated), generation.cached_tokens)
                tail += encoder.usage(usage)
            tail += DONE
        except errors.OpenAIError as exc:
            # The response has started: the error goes in the stream, then [DONE].
            log.warning("stream_error", request_id=generation.request_id, status=exc.status, error=exc.message)
            tail += error_event(exc)
        await response.write_eof(tail)
        return response

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

    # -- operations -----------------------------------------------------------------
    async def health(self, _: web.Request) -> web.Response:
        assert self.routing is not None
        instances = [{"instance_id": r.instance_id, "model": r.model, "subject": r.subject, "host": r.host,
                      "pid": r.pid} for r in self.routing.records.values()]
        healthy = not self.draining and bool(instances)
        body = {"status": "draining" if self.draining else ("ready" if instances else "no_instances"),
                "frontend_id": self.frontend_id, "in_flight": self.in_flight, "instances": instances}
        return _json_response(body, status=200 if healthy else 503)

    async def get_busy_threshold(self, _: web.Request) -> web.Response:
        assert self.routing is not None
        return _json_response(self.routing.state.thresholds.settings())

    async def set_busy_threshold(self, request: web.Request) -> web.Response:
        try:
            settings = msgspec.json.decode(await request.read(), type=BusyThresholdSettings)
            assert self.routing is not None
            return _json_response(self.routing.state.thresholds.update(settings))
        except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
            raise errors.bad_request(str(exc)) from None

    # -- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        config = self.config
        self.transport = await NatsTransport.connect(config.nats_url, name=f"frontend-{self.frontend_id}",
                                                     heartbeat_interval=config.heartbeat_interval,
                                                     creds_file=config.nats_creds)
        if config.router_mode == "remote":
            from dynrt.router.remote import RemoteRoutingService

            self.routing = RemoteRoutingService(self.etcd, self.transport, config.namespace,
                                                timeout=config.remote_router_timeout, config=config.routing,
                                                sender_id=self.frontend_id)
        else:
            self.routing = RoutingService(self.etcd, self.transport, config.namespace, policy=config.router_mode,
                                          config=config.routing, sender_id=self.frontend_id)
        self.routing.on_removed.append(self._on_instance_removed)
        self.routing.on_added.append(self._on_instance_added)
        await self.registration.start(wait=30)
        await self.routing.start(wait=30)
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, config.http_host, config.http_port, reuse_address=True)
        await site.start()
        self.port = self.runner.addresses[0][1]  # the port bound (config.http_port may be 0)
        record = FrontendRecord(frontend_id=self.frontend_id, host=socket.gethostname(), http_port=self.port,
                                pid=os.getpid(), started_at=time.time())
        await self.registration.put(frontend_key(config.namespace, self.frontend_id), encode_json(record))
        self.shutdown.add("stop_accepting", self._stop_accepting, timeout=5)
        self.shutdown.add("drain", self._drain, timeout=config.drain_timeout + 5)
        self.shutdown.add("release", self._release, timeout=10)
        log.info("frontend_ready", frontend_id=self.frontend_id, url=f"http://{config.http_host}:{self.port}",
                 router_mode=config.router_mode, instances=len(self.routing.records))

    async def run(self) -> int:
        self.shutdown.install_signal_handlers()
        try:
            started = await self.shutdown.start_unless_stopped(self.start())
        except Exception:
            log.exception("frontend_start_failed")
            await self._release()
            return 1
        if not started:
            await self._release()
            return 0
        await self.shutdown.wait()
        await self.shutdown.run()
        log.info("frontend_stopped", frontend_id=self.frontend_id)
        return 0

    async def _stop_accepting(self) -> None:
        self.draining = True
        if self.runner is not None:
            for site in list(self.runner.sites):
                await site.stop()  # close the listening socket; open connections go on

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.config.drain_timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.in_flight:
            log.warning("drain_timeout", in_flight=self.in_flight)

    async def _release(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        await self.registration.close(revoke=True)
        if self.routing is not None:
            await self.routing.close()
        if self.transport is not None:
            await self.transport.close()
        await self.etcd.close()
