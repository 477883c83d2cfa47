"""``dynrt frontend``: a stateless OpenAI-compatible HTTP server (aiohttp on uvloop).

This module is the HTTP layer: routes, the error middleware, the operations endpoints
and the process lifecycle. Each route has an access level (``dynrt.runtime.auth``:
open, API key, admin key) that ``http_guard`` checks, with the body's media type,
before the handler runs. A request body is decoded and validated here
(``openai_protocol``) and answered by ``dynrt.frontend.serving`` (admission, tokenizing,
routing, generation through the migration layer, which survives worker failures);
``/tokenize``, ``/detokenize`` and ``/version`` by ``tokenization``. The frontend
registers under an etcd lease so workers abort its requests if it dies.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec
from aiohttp import web

from dynrt.frontend import errors
from dynrt.frontend.chat_request import ChatSettings
from dynrt.frontend.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    decode_chat_request,
    decode_completion_request,
)
from dynrt.frontend.resume import Resumes
from dynrt.frontend.serving import OpenAIServing, json_response
from dynrt.frontend.tokenization import TokenizationRoutes
from dynrt.router.cost import BusyThresholds
from dynrt.router.http import add_busy_threshold_routes
from dynrt.router.service import RoutingService
from dynrt.runtime import metrics
from dynrt.runtime.auth import Authenticator
from dynrt.runtime.config import FrontendConfig
from dynrt.runtime.discovery import EtcdClient, LeasedRegistration
from dynrt.runtime.health import live_handler, metrics_handler
from dynrt.runtime.http_errors import error_response
from dynrt.runtime.http_guard import AUTO_DECOMPRESS, HttpGuard
from dynrt.runtime.lifecycle import GracefulShutdown
from dynrt.runtime.log import get_logger
from dynrt.runtime.checkpoint_log import CheckpointPolicy
from dynrt.runtime.protocol import FrontendRecord, encode_json, frontend_key
from dynrt.runtime.stream_checkpoints import CheckpointStore, CheckpointUnavailable
from dynrt.runtime.transport import NatsTransport

log = get_logger("frontend")

AUTH_FAILURES = metrics.counter("dynrt_frontend_auth_failures_total",
                                "HTTP requests refused for a missing or wrong key, by endpoint (route path) and reason "
                                "(missing: no bearer key; invalid: a key this endpoint does not take)",
                                ("endpoint", "reason"))


class _ModelOnly(msgspec.Struct):
    model: str


_model_only_decoder = msgspec.json.Decoder(_ModelOnly)
_Req = TypeVar("_Req", ChatCompletionRequest, CompletionRequest)


class FrontendService:
    def __init__(self, config: FrontendConfig) -> None:
        self.config = config
        self.frontend_id = uuid.uuid4().hex[:12]
        self.authenticator = Authenticator.from_config(config.auth)
        self.guard = HttpGuard(self.authenticator, AUTH_FAILURES)
        self.etcd = EtcdClient.from_config(config)
        self.registration = LeasedRegistration(self.etcd, ttl=config.lease_ttl)
        self.transport: NatsTransport | None = None
        self.routing: RoutingService | None = None
        self.serving: OpenAIServing | None = None
        self.tokenization: TokenizationRoutes | None = None
        self.checkpoints: CheckpointStore | None = None
        self.shutdown = GracefulShutdown()
        self.runner: web.AppRunner | None = None
        self.port = config.http_port
        self.app = self._build_app()

    # -- app ----------------------------------------------------------------------
    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes, middlewares=[self._error_middleware])
        route = self.guard.add
        route(app, "POST", "/v1/chat/completions", self.chat_completions, "api")
        route(app, "POST", "/v1/completions", self.completions, "api")
        route(app, "GET", "/v1/models", self.list_models, "api")
        route(app, "POST", "/tokenize", self.tokenize, "api")
        route(app, "POST", "/detokenize", self.detokenize, "api")
        route(app, "GET", "/version", self.show_version, "open")
        route(app, "GET", "/health", self.health, "open")
        route(app, "GET", "/live", live_handler, "open")
        route(app, "GET", "/metrics", metrics_handler, "open")
        add_busy_threshold_routes(app, self.guard, self._thresholds)  # POST: admin
        return app

    @web.middleware
    async def _error_middleware(self, request: web.Request,
                                handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """Every error is an OpenAI-shaped JSON body with the right status: never a
        stack trace, never an HTML page."""
        try:
            self.guard.check(request)  # 401 / 415 before the body is read
            return await handler(request)
        except (errors.OpenAIError, errors.GenerationError) as exc:
            error = exc if isinstance(exc, errors.OpenAIError) else errors.to_openai(exc)
            self._count_rejected(request, error.status)
            return error_response(error)
        except web.HTTPRequestEntityTooLarge:
            self._count_rejected(request, 413)
            return error_response(errors.body_too_large(self.config.max_body_bytes))
        except web.HTTPNotFound:
            return error_response(errors.not_found(request.path))
        except web.HTTPMethodNotAllowed:
            return error_response(errors.method_not_allowed(request.method, request.path))
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except web.HTTPException:
            raise
        except Exception:
            log.exception("unhandled_error", path=request.path)
            return error_response(errors.internal())

    def _count_rejected(self, request: web.Request, status: int) -> None:
        if self.serving is not None:
            self.serving.count_rejected(request, status)

    def _decode(self, request: web.Request, body: bytes, decode: Callable[[bytes], _Req]) -> _Req:
        """Decode and validate a body; label the request's model for metrics even when
        the body is invalid (as long as it names one)."""
        assert self.serving is not None
        try:
            req = decode(body)
        except errors.OpenAIError:
            try:
                self.serving.label_model(request, _model_only_decoder.decode(body).model)
            except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError):
                pass  # UnicodeDecodeError: invalid UTF-8 in a string; RecursionError: deep nesting
            raise
        self.serving.label_model(request, req.model)
        return req

    # -- OpenAI endpoints ---------------------------------------------------------
    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        assert self.serving is not None
        req = self._decode(request, await request.read(), decode_chat_request)
        return await self.serving.chat_completion(request, req)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        assert self.serving is not None
        req = self._decode(request, await request.read(), decode_completion_request)
        return await self.serving.completion(request, req)

    async def list_models(self, _: web.Request) -> web.Response:
        assert self.routing is not None
        # max_model_len: the smallest context of the model's instances (what a request
        # may use whichever instance serves it; serving.py checks prompts against it too)
        cards = [ModelCard(id=model, created=int(min(r.started_at for r in records)),
                           max_model_len=min(r.context_length for r in records) or None)
                 for model, records in sorted(self.routing.models().items())]
        return json_response(ModelList(data=cards))

    # -- operations -----------------------------------------------------------------
    async def health(self, _: web.Request) -> web.Response:
        assert self.routing is not None and self.serving is not None
        draining = self.serving.draining
        instances = [{"instance_id": r.instance_id, "model": r.model, "subject": r.subject, "host": r.host,
                      "pid": r.pid} for r in self.routing.records.values()]
        healthy = not draining and bool(instances)
        body = {"status": "draining" if draining else ("ready" if instances else "no_instances"),
                "frontend_id": self.frontend_id, "in_flight": self.serving.in_flight, "instances": instances}
        return json_response(body, status=200 if healthy else 503)

    def _thresholds(self) -> BusyThresholds:
        assert self.routing is not None
        return self.routing.state.thresholds

    # -- tokenizer endpoints (vLLM's) ---------------------------------------------------
    async def tokenize(self, request: web.Request) -> web.Response:
        assert self.tokenization is not None
        return await self.tokenization.tokenize(request)

    async def detokenize(self, request: web.Request) -> web.Response:
        assert self.tokenization is not None
        return await self.tokenization.detokenize(request)

    async def show_version(self, request: web.Request) -> web.Response:
        assert self.tokenization is not None
        return await self.tokenization.show_version(request)

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
        self.checkpoints = await self._open_checkpoints()
        self.serving = OpenAIServing(frontend_id=self.frontend_id, routing=self.routing, transport=self.transport,
                                     default_max_tokens=config.default_max_tokens, migration=config.migration,
                                     chat=ChatSettings.from_config(config),
                                     resumes=Resumes(self.checkpoints))
        self.tokenization = TokenizationRoutes(self.routing, self.serving.known_models, self.serving.chat)
        await self.registration.start(wait=30)
        await self.routing.start(wait=30)
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False, handler_cancellation=True,
                                    auto_decompress=AUTO_DECOMPRESS)
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
                 router_mode=config.router_mode, instances=len(self.routing.records), **self.authenticator.describe())

    async def _open_checkpoints(self) -> CheckpointStore | None:
        """The resumable streams' checkpoint bucket; None (resumable requests get 503,
        the rest is served) when NATS has no JetStream."""
        assert self.transport is not None
        resume = self.config.resume
        try:
            return await CheckpointStore.open(self.transport.nc, self.config.namespace,
                                              CheckpointPolicy.from_config(resume), replicas=resume.checkpoint_replicas)
        except CheckpointUnavailable as exc:
            log.warning("resumable_streams_unavailable", error=str(exc))
            return None

    async def run(self) -> int:
        outcome = await self.shutdown.serve(self.start(), self._release, "frontend")
        if outcome != "stopped":
            return 1 if outcome == "start_failed" else 0
        log.info("frontend_stopped", frontend_id=self.frontend_id)
        return 0

    async def _stop_accepting(self) -> None:
        assert self.serving is not None
        self.serving.draining = True
        if self.runner is not None:
            for site in list(self.runner.sites):
                await site.stop()  # close the listening socket; open connections go on

    async def _drain(self) -> None:
        assert self.serving is not None
        deadline = time.monotonic() + self.config.drain_timeout
        while self.serving.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.serving.in_flight:
            log.warning("drain_timeout", in_flight=self.serving.in_flight)

    async def _release(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        await self.registration.close(revoke=True)
        if self.routing is not None:
            await self.routing.close()
        if self.checkpoints is not None:
            await self.checkpoints.close()
        if self.transport is not None:
            await self.transport.close()
        await self.etcd.close()
