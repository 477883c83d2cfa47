"""A worker: one engine behind a NATS endpoint, registered in etcd under a lease.

Lifecycle
- start: system server (``/live`` answers from here on; ``/health`` is 503 with status
  "loading") → lease and a *loading* instance record (no request subject: shown by
  ``dynrt status``, never routed to) → engine start (a vLLM model load: seconds to
  minutes) → NATS endpoint (subscribed) → frontend watcher → load reports, KV events and
  health checks → ``ready`` → the ready record replaces the loading one. The worker is
  ready just before its ready record appears, since a frontend may send a request the
  moment it sees it.
- serve: each generate request streams ``TokenFrame``s; a ``Cancel`` stops or kills it;
  KV events and load reports go out for routers; ``DumpCachedBlocks`` answers router resyncs.
- dead frontends: frontends hold leases too; when one's key disappears, every request
  it sent is aborted and its KV freed (the caller can no longer read the answer) —
  except resumable ones, which are detached (``worker/resumable.py``).
- resumable requests (``resume_grace > 0``): their output is kept; a ``Cancel(detach)``
  leaves them running for their grace period; a frontend reattaches with a
  ``Dynrt-Reattach-From`` request (runtime/endpoint.py), also while the worker drains.
- SIGTERM/SIGINT: the record is re-put marked ``draining`` (routers send no new
  requests) and the endpoint stops accepting; in-flight requests finish for up to
  ``drain_timeout``, the rest get a ``MigrateFrame`` so frontends continue them
  elsewhere; then the lease is revoked (the record goes), the engine shut down, exit 0.
- unhealthy (``check_health`` or a canary request failed or timed out): the same stop
  without waiting for in-flight requests (they migrate at once), exit 1 so a supervisor
  restarts the worker.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

import msgspec

from dynrt.runtime import metrics
from dynrt.runtime.config import WorkerConfig
from dynrt.runtime.discovery import EtcdClient, LeasedRegistration, PrefixWatcher
from dynrt.runtime.health import HealthServer
from dynrt.runtime.lifecycle import GracefulShutdown
from dynrt.runtime.log import get_logger
from dynrt.runtime.protocol import (
    CachedBlocks,
    CancelMode,
    Control,
    ControlReply,
    DumpCachedBlocks,
    ErrorFrame,
    Frame,
    GenerateRequest,
    InstanceRecord,
    MigrateFrame,
    SamplingParams,
    TokenFrame,
    Usage,
    encode_json,
    frontends_prefix,
    generate_request_decoder,
    instance_key,
    request_subject,
)
from dynrt.runtime.transport import Endpoint, NatsTransport, RequestContext
from dynrt.worker.engine import Engine, RequestRejected, TokenBatch
from dynrt.worker.frontend_requests import FrontendRequests
from dynrt.worker.resumable import ResumableRequests
from dynrt.worker.router_feed import RouterFeed

log = get_logger("worker")

REQUESTS = metrics.counter("dynrt_worker_requests_total", "generate requests by outcome", ("outcome",))
IN_FLIGHT = metrics.gauge("dynrt_worker_in_flight_requests", "requests being served")
OUTPUT_TOKENS = metrics.counter("dynrt_worker_output_tokens_total", "tokens generated")

State = Literal["starting", "loading", "ready", "draining", "unhealthy", "stopped"]


def _check_logprobs(request: GenerateRequest, batch: TokenBatch) -> None:
    """The frame contract: when logprobs were asked for, one entry per token id, always
    (an empty final batch carries an empty list). An engine breaking it is a bug."""
    if request.sampling.logprobs is None:
        batch.logprobs = None
        return
    if batch.logprobs is None and not batch.token_ids:
        batch.logprobs = []
    if batch.logprobs is None or len(batch.logprobs) != len(batch.token_ids):
        raise RuntimeError(f"engine returned {0 if batch.logprobs is None else len(batch.logprobs)} logprobs "
                           f"for {len(batch.token_ids)} tokens")


class WorkerService:
    def __init__(self, config: WorkerConfig, engine: Engine, *, etcd: EtcdClient | None = None,
                 transport: NatsTransport | None = None, handle_signals: bool = True) -> None:
        """``etcd`` / ``transport``: a client and connection shared with other instances
        in this process (``dynrt.worker.instances``), left open at stop; by default the
        worker makes and closes its own. ``handle_signals=False``: the process's owner
        turns signals into ``shutdown.request``."""
        self.config = config
        self.engine = engine
        self.model_name = config.served_model_name or engine.info.model
        self.instance_id = uuid.uuid4().hex[:12]
        self.subject = request_subject(config.namespace, config.component, config.endpoint, self.instance_id)
        self.key = instance_key(config.namespace, config.component, config.endpoint, self.instance_id)
        self.state: State = "starting"
        self.exit_code = 0
        self.shutdown = GracefulShutdown()
        self.transport: NatsTransport | None = transport
        self._owns_connections = etcd is None
        self.handle_signals = handle_signals
        self.endpoint: Endpoint | None = None
        self.etcd = etcd or EtcdClient.from_config(config)
        self.registration = LeasedRegistration(self.etcd, ttl=config.lease_ttl)
        self.frontend_watcher: PrefixWatcher | None = None
        self.health_server = HealthServer(self._health, host=config.host, port=config.system_port)
        self.frontend_requests = FrontendRequests()
        self.resumable = ResumableRequests(kill=self._kill)
        self.router_feed = RouterFeed(config, engine, self.instance_id, self.model_name)
        self.last_request_at = time.monotonic()
        self._tasks: list[asyncio.Task[None]] = []
        self._aborts: set[asyncio.Task[None]] = set()
        self.completed = 0
        self.record: InstanceRecord | None = None
        self.loading_since = 0.0

    # -- start ------------------------------------------------------------------
    async def start(self) -> None:
        log.info("worker_starting", instance_id=self.instance_id, model=self.model_name, engine=self.engine.info.engine)
        system_port = await self.health_server.start()
        self.state = "loading"
        self.loading_since = time.time()
        await self.registration.start(wait=30)
        await self.registration.put(self.key, encode_json(self._record(system_port, loading=True)))
        log.info("worker_loading", instance_id=self.instance_id, model=self.model_name, system_port=system_port)
        await self.engine.start()
        if self.transport is None:
            self.transport = await NatsTransport.connect(
                self.config.nats_url, name=f"worker-{self.instance_id}",
                heartbeat_interval=self.config.heartbeat_interval, creds_file=self.config.nats_creds)
        self.endpoint = await self.transport.serve(self.subject, self._handle_generate, self._handle_control,
                                                   reattach=self._reattach)
        info = self.engine.info
        record = self._record(system_port, loading=False)
        self.record = record
        self.frontend_watcher = PrefixWatcher(self.etcd, frontends_prefix(self.config.namespace),
                                              lambda k, v: None, self._on_frontend_gone)
        await self.frontend_watcher.start()
        self._tasks = [
            asyncio.create_task(self.router_feed.publish_load(self.transport), name="load-reports"),
            asyncio.create_task(self.router_feed.publish_kv_events(self.transport), name="kv-events"),
            asyncio.create_task(self._health_loop(), name="health-checks"),
        ]
        self.shutdown.add("deregister", self._deregister, timeout=5)
        self.shutdown.add("drain", self._drain, timeout=self.config.drain_timeout + 5)
        self.shutdown.add("release", self._release, timeout=10)
        # Ready before the record is published: a frontend may send a request the moment
        # it sees the record.
        self.state = "ready"
        await self.registration.put(self.key, encode_json(record))
        log.info("worker_ready", instance_id=self.instance_id, subject=self.subject, system_port=system_port,
                 model=self.model_name, kv_blocks=info.kv_blocks_total,
                 load_seconds=round(time.time() - self.loading_since, 1))

    def _record(self, system_port: int, *, loading: bool) -> InstanceRecord:
        """This worker's instance record: a loading one (no subject: not routable, its
        ``started_at`` when loading began) or the ready one."""
        info = self.engine.info
        return InstanceRecord(
            instance_id=self.instance_id, namespace=self.config.namespace, component=self.config.component,
            endpoint=self.config.endpoint, model=self.model_name, subject="" if loading else self.subject,
            engine=info.engine, block_size=info.block_size, kv_blocks_total=info.kv_blocks_total,
            context_length=info.context_length, max_num_seqs=info.max_num_seqs, tokenizer=info.tokenizer,
            host=socket.gethostname(), pid=os.getpid(), system_port=system_port,
            started_at=self.loading_since if loading else time.time(), replica_id=self.config.replica_id,
            loading=loading)

    async def run(self) -> int:
        """Serve until a signal or an unhealthy verdict; returns the exit code."""
        outcome = await self.shutdown.serve(self.start(), self._release, "worker", signals=self.handle_signals,
                                            instance_id=self.instance_id)
        if outcome == "start_failed":
            return 1
        if outcome == "stopped_while_starting":
            log.info("worker_stopped_while_starting", instance_id=self.instance_id)
            return 0
        self.state = "stopped"
        log.info("worker_stopped", instance_id=self.instance_id, exit_code=self.exit_code, completed=self.completed)
        return self.exit_code

    # -- requests ---------------------------------------------------------------
    async def _handle_generate(self, payload: bytes, ctx: RequestContext) -> AsyncIterator[Frame]:
        try:
            request = generate_request_decoder.decode(payload)
        except Exception as exc:
            REQUESTS.labels("bad_request").inc()
            yield ErrorFrame(code="bad_request", message=f"malformed generate request: {exc}")
            return
        # Counted before any await: by the time a load report shows the count, the engine
        # holds the request (the mock queues it synchronously on the first iteration
        # below) or it was refused here — either way routers may stop counting it.
        self.router_feed.count_received(request)
        if self.state != "ready":
            REQUESTS.labels("busy").inc()
            yield ErrorFrame(code="busy", message=f"worker is {self.state}")
            return
        load = self.engine.load()
        if load.waiting >= self.config.max_queued:
            REQUESTS.labels("busy").inc()
            yield ErrorFrame(code="busy", message=f"worker queue full ({load.waiting} waiting)")
            return
        self.last_request_at = time.monotonic()
        request_id = request.request_id
        ctx.on_cancel = lambda mode: self._cancel(request_id, mode)
        retained = self.resumable.open(request)
        ctx.resumable = retained is not None
        self.frontend_requests.track(request_id, request.frontend_id)
        IN_FLIGHT.inc()
        outcome = "ok"
        generated = 0
        cached_tokens = 0  # engines report prefix hits on the first batch only
        try:
            async for batch in self.engine.generate(request):
                generated += len(batch.token_ids)
                cached_tokens = max(cached_tokens, batch.cached_tokens)
                _check_logprobs(request, batch)
                if batch.finish_reason is None:
                    frame = TokenFrame(token_ids=batch.token_ids, logprobs=batch.logprobs)
                    if retained is not None:  # no await from here to the publish (endpoint._on_reattach)
                        retained.append(frame)
                    yield frame
                    continue
                usage = Usage(prompt_tokens=len(request.token_ids), completion_tokens=generated,
                              cached_tokens=cached_tokens)
                outcome = batch.finish_reason
                frame = TokenFrame(token_ids=batch.token_ids, finish_reason=batch.finish_reason, usage=usage,
                                   logprobs=batch.logprobs)
                if retained is not None:
                    retained.append(frame)
                yield frame
        except RequestRejected as exc:
            outcome = "bad_request"
            yield ErrorFrame(code="bad_request", message=str(exc))
        except asyncio.CancelledError:
            outcome = "killed"
            raise
        except Exception as exc:
            outcome = "engine_error"
            log.exception("generate_failed", request_id=request_id)
            yield ErrorFrame(code="engine_error", message=f"engine error: {type(exc).__name__}")
        finally:
            IN_FLIGHT.dec()
            REQUESTS.labels(outcome).inc()
            OUTPUT_TOKENS.inc(generated)
            self.frontend_requests.untrack(request_id)
            if retained is not None:
                self.resumable.done(retained)
            self.completed += 1
            self.last_request_at = time.monotonic()
            log.debug("request_done", request_id=request_id, outcome=outcome, generated=generated)

    def _reattach(self, request_id: str, start: int, ctx: RequestContext | None,
                  frontend_id: str) -> tuple[Frame, bool]:
        frame, live = self.resumable.reattach(request_id, start, ctx, frontend_id)
        if live:  # no longer its old frontend's; detached again if the new one's goes away
            self.frontend_requests.untrack(request_id)
            if frontend_id:
                self.frontend_requests.track(request_id, frontend_id)
        return frame, live

    def _kill(self, request_id: str) -> None:
        if self.endpoint is not None:
            self.endpoint.cancel(request_id, "kill")

    def _cancel(self, request_id: str, mode: CancelMode) -> None:
        if mode == "detach":  # the endpoint sends detach only for resumable requests
            self.resumable.detach(request_id)
            return
        log.info("request_cancelled", request_id=request_id, mode=mode)
        # Kept until it ends: the event loop holds only a weak reference to a task.
        task = asyncio.get_running_loop().create_task(self.engine.abort(request_id, mode))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)

    async def _handle_control(self, message: Control) -> ControlReply | None:
        if isinstance(message, DumpCachedBlocks):
            hashes, last_event_id = self.engine.dump_cached_blocks()
            return CachedBlocks(instance_id=self.instance_id, block_hashes=hashes, last_event_id=last_event_id)
        return None

    def _on_frontend_gone(self, key: str) -> None:
        frontend_id = key.rsplit("/", 1)[-1]
        self.router_feed.forget_sender(frontend_id)  # its router is gone with it
        self.resumable.frontend_gone(frontend_id)
        orphans = self.frontend_requests.pop_frontend(frontend_id)
        if not orphans or self.endpoint is None:
            return
        detached = [r for r in orphans if self.resumable.is_resumable(r)]
        if len(detached) < len(orphans):
            log.warning("frontend_gone_aborting", frontend_id=frontend_id, requests=len(orphans) - len(detached))
        if detached:
            log.warning("frontend_gone_detaching", frontend_id=frontend_id, requests=len(detached))
        for request_id in orphans:
            # "detach" keeps a resumable request for a reattach; it kills any other.
            self.endpoint.cancel(request_id, "detach")

    # -- health -------------------------------------------------------------------
    def _health(self) -> tuple[bool, dict[str, Any]]:
        load = self.engine.load()
        details = {
            "status": self.state,
            "instance_id": self.instance_id,
            "model": self.model_name,
            "in_flight": len(self.endpoint.in_flight) if self.endpoint else 0,
            "registered": self.registration.healthy.is_set(),
            "kv_blocks_used": load.kv_blocks_used,
            "kv_blocks_total": load.kv_blocks_total,
            "running": load.running,
            "waiting": load.waiting,
            "detached_requests": self.resumable.outputs.detached_running(),
            "retained_outputs": self.resumable.outputs.finished(),
        }
        if self.state == "loading":
            details["loading_seconds"] = round(time.time() - self.loading_since, 1)
        return self.state == "ready", details

    async def _health_loop(self) -> None:
        last_check = time.monotonic()
        while self.state == "ready":
            await asyncio.sleep(0.5)
            now = time.monotonic()
            try:
                if self.config.health_period > 0 and now - last_check >= self.config.health_period:
                    last_check = now
                    await asyncio.wait_for(self.engine.check_health(), self.config.canary_timeout)
                idle = now - self.last_request_at
                in_flight = len(self.endpoint.in_flight) if self.endpoint else 0
                if self.config.canary_after > 0 and idle >= self.config.canary_after and in_flight == 0:
                    await self._canary()
                    self.last_request_at = time.monotonic()
            except Exception as exc:
                if self.state != "ready":
                    return
                log.error("worker_unhealthy", instance_id=self.instance_id, error=f"{type(exc).__name__}: {exc}")
                self.state = "unhealthy"
                self.exit_code = 1
                self.shutdown.request("unhealthy")
                return

    async def _canary(self) -> None:
        request = GenerateRequest(request_id=f"canary-{uuid.uuid4().hex[:8]}", model=self.model_name,
                                  token_ids=[1, 2, 3], sampling=SamplingParams(max_tokens=1, ignore_eos=True))

        async def one_token() -> None:
            async for batch in self.engine.generate(request):
                if batch.finish_reason is not None:
                    return

        await asyncio.wait_for(one_token(), self.config.canary_timeout)
        log.debug("canary_ok", instance_id=self.instance_id)

    # -- stop -------------------------------------------------------------------------
    async def _deregister(self) -> None:
        if self.state == "ready":
            self.state = "draining"
        log.info("worker_deregistering", instance_id=self.instance_id)
        # Marked draining, not deleted: routers stop sending new requests while the
        # open streams finish here. The key goes when the lease is revoked at exit.
        if self.record is not None:
            draining = msgspec.structs.replace(self.record, draining=True)
            await self.registration.put(self.key, encode_json(draining))
        if self.endpoint is not None:
            await self.endpoint.stop_accepting()

    async def _drain(self) -> None:
        if self.endpoint is None:
            return
        deadline = time.monotonic() + (self.config.drain_timeout if self.exit_code == 0 else 0)
        while self.endpoint.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        remaining = list(self.endpoint.in_flight)
        if remaining:
            log.warning("drain_timeout_migrating", instance_id=self.instance_id, requests=len(remaining))
            await self.endpoint.send_to_all(MigrateFrame(reason="drain"))
        log.info("worker_drained", instance_id=self.instance_id, migrated=len(remaining))

    async def _release(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.frontend_watcher is not None:
            await self.frontend_watcher.close()
        await self.registration.close(revoke=True)
        if self.transport is not None and self._owns_connections:
            await self.transport.close()
        elif self.transport is not None and self.endpoint is not None:
            await self.endpoint.close()  # the shared connection stays open
        await self.health_server.close()
        await self.engine.shutdown()
        self.resumable.close()
        if self._owns_connections:
            await self.etcd.close()
