"""The migration layer: one request's generation, kept alive across worker failures.

For every request the frontend keeps the prompt ids and every id generated so far. When
the worker's stream breaks, the request is sent again to another live instance with
prompt + generated ids, ``max_tokens`` (and ``min_tokens``) reduced by what was already
produced, and the same seed and sampling parameters. Engines are deterministic in
(token prefix, seed) — the mock engine always, vLLM for greedy requests — so the client
receives exactly the tokens an uninterrupted run would have produced.

What counts as broken (the ``cause`` label of ``dynrt_frontend_migrations_total``):
- ``no_responders``: nobody subscribes to the instance's subject (the process is gone);
  NATS says so at once when the request is sent.
- ``killed``: the stream went silent longer than expected (a small multiple of its recent
  inter-token time, ``silence_floor`` at least); a ping to the instance got no-responders:
  NATS dropped the dead process's subscriptions.
- ``suspect``: the instance's load reports stopped (``RouterState.is_suspect``: a hung
  process, or a partition) and a ping got no answer within ``ping_timeout``; checked as
  soon as the router notices (``OpenAIServing``), and whenever the stream goes silent.
- ``stalled``: no frame and no heartbeat for ``stream_stall_timeout`` (the last resort:
  a stuck stream on an instance whose reports continue); pings are not answered either.
- ``lease_expired``: the instance's etcd key was deleted (lease expiry or deregistration).
- ``drained``: the worker sent a ``MigrateFrame`` (SIGTERM past its drain timeout).
- ``nats_restart``: the NATS connection dropped under the stream.
- ``engine_error`` / ``busy``: the worker answered with that error frame.
- ``not_found``: a resumed request's worker no longer has it (it finished and was
  dropped, or its grace period ended): it continues from the JetStream checkpoint.

Not migrated: client cancellation (the caller closes the stream), and the request's own
errors (``bad_request``), which surface to the client (``InvalidRequest``). A failed instance is excluded from
this request's later attempts and marked down for routing for ``down_seconds`` (or until
it re-registers), so no other request is sent to it meanwhile — except a suspect one,
which is out of routing exactly while its reports are missing and back when they resume.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import NoReturn

import msgspec
import nats.errors

from dynrt.frontend.attempt_reader import AttemptReader, StreamInterrupted, TokenDelta
from dynrt.frontend.errors import MigrationExhausted, NoLiveInstance, Overloaded
from dynrt.router.policies import Busy, Choice, NoInstance
from dynrt.router.service import RoutingService
from dynrt.runtime import metrics
from dynrt.runtime.config import MigrationConfig
from dynrt.runtime.log import get_logger
from dynrt.runtime.protocol import GenerateRequest, InstanceRecord, SamplingParams, encode
from dynrt.runtime.transport import NatsTransport, ResponseStream, StreamBrokenError, TransportError

log = get_logger("migration")

MIGRATIONS = metrics.counter("dynrt_frontend_migrations_total", "requests moved to another worker, by cause", ("cause",))
MIGRATIONS_EXHAUSTED = metrics.counter("dynrt_frontend_migrations_exhausted_total",
                                       "requests that failed because they ran out of migration attempts")
STREAM_GAP = metrics.histogram("dynrt_frontend_migration_gap_seconds",
                               "time from the last token before a failure to the first token after it")

# How long to keep looking for a live instance when all known ones have failed.
_NO_INSTANCE_PATIENCE = 1.0

class Generation:
    """Generate ``sampling.max_tokens`` tokens for ``prompt_ids`` on whatever live
    workers it takes. Iterate ``tokens()``; call ``close()`` when done (or to cancel:
    the worker is told to abort and frees the request's KV cache)."""

    def __init__(self, *, request_id: str, model: str, prompt_ids: list[int], sampling: SamplingParams,
                 frontend_id: str, config: MigrationConfig, transport: NatsTransport, routing: RoutingService,
                 on_instance_stream: Callable[["Generation", str | None], None] | None = None,
                 on_instance_dead: Callable[[str], None] | None = None, resume_grace: float = 0.0) -> None:
        self.request_id = request_id
        self.model = model
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.frontend_id = frontend_id
        self.config = config
        self.transport = transport
        self.routing = routing
        self.generated: list[int] = []
        self.attempts = 0
        self.migrations = 0
        self.cached_tokens = 0
        self.instance: InstanceRecord | None = None
        self._router_id = ""  # the standalone router that chose ``instance`` ("" = local)
        self._stream: ResponseStream | None = None
        self._exclude: set[str] = set()
        self._last_token_at = 0.0  # time.monotonic() of the latest token (or of the send)
        self._on_instance_stream = on_instance_stream
        # Told when a ping proves the instance gone (no responders), so the caller can
        # move its other streams at once instead of each waiting out its own silence.
        self._on_instance_dead = on_instance_dead
        self.finished = False
        # Resumable (> 0): the worker keeps the request this long after this frontend
        # detaches or dies, for another frontend to reattach (frontend/resume.py).
        self.resume_grace = resume_grace
        self._reattach_to: str | None = None
        self._reattached_in_flight: set[str] = set()

    def resume(self, generated: list[int], instance_id: str) -> None:
        """Continue a request another frontend started: ``generated`` is what it had
        (its checkpoint); the first attempt reattaches to ``instance_id`` if it is live
        (the worker sends what came after), else the request migrates from there."""
        self.generated = list(generated)
        self.attempts = 1  # a continuing request: routed as one (no TTFT objective)
        self._reattach_to = instance_id

    # -- lifecycle ---------------------------------------------------------------
    def interrupt(self, cause: str) -> None:
        """Break the current attempt (e.g. its instance left discovery); the request
        continues elsewhere."""
        if self._stream is not None:
            self._stream.interrupt(cause)

    async def close(self) -> None:
        """Stop the current attempt (the worker aborts it and frees its KV)."""
        stream, self._stream = self._stream, None
        self._release_instance()
        if stream is not None and not stream.done:
            if self.finished:
                stream.release()  # complete: no cancel message to send
                return
            try:
                await stream.aclose()
            except TransportError:
                pass

    async def detach(self) -> None:
        """Stop reading but let the worker go on for ``resume_grace`` (the client left;
        it may resume on another frontend). A request that is not resumable is closed."""
        if self.resume_grace <= 0 or self.finished:
            await self.close()
            return
        stream, self._stream = self._stream, None
        self._release_instance()
        if stream is not None and not stream.done:
            try:
                await stream.cancel("detach")
            except (TransportError, nats.errors.Error):
                pass
            stream.release()

    def _release_instance(self) -> None:
        if self.instance is not None:
            self.routing.complete(self.instance.instance_id, self.request_id)
            if self._on_instance_stream is not None:
                self._on_instance_stream(self, None)
            self.instance = None

    # -- the loop ------------------------------------------------------------------
    async def start(self) -> None:
        """Route and send the first attempt. Raises ``Overloaded`` or ``NoLiveInstance``
        (before any response has started), or ``MigrationExhausted``."""
        await self._send()

    async def tokens(self) -> AsyncIterator[TokenDelta]:
        """The generated ids, across migrations, a delta at a time (see :meth:`token_batches`)."""
        async with aclosing(self.token_batches()) as batches:
            async for batch in batches:
                for delta in batch:
                    yield delta

    async def token_batches(self) -> AsyncIterator[list[TokenDelta]]:
        """The generated ids, across migrations: per batch, the deltas of every frame
        already received (one delta, or one per token with one token per chunk), so a
        consumer can answer with one write per batch. Raises ``InvalidRequest`` (the
        worker refused the request) or ``MigrationExhausted``."""
        failure_at: float | None = None
        while True:
            if self._stream is None:
                await self._send()
            assert self._stream is not None
            reader = self._reader(self._stream)
            try:
                async for batch in reader.batches():
                    if failure_at is not None and any(d.token_ids for d in batch):
                        STREAM_GAP.observe(time.monotonic() - failure_at)
                        log.info("migration_resumed", request_id=self.request_id,
                                 gap_ms=round((time.monotonic() - failure_at) * 1000, 1),
                                 instance_id=self.instance.instance_id if self.instance else None)
                        failure_at = None
                    if reader.cached_tokens > self.cached_tokens:
                        self.cached_tokens = reader.cached_tokens
                    if batch[-1].finish_reason is not None:
                        self.finished = True  # before the yield: the consumer may stop here
                    yield batch
                    if self.finished:
                        await self.close()
                        return
            except StreamInterrupted as broken:
                failure_at = failure_at or reader.last_token_at
                await self._on_broken(broken.cause)

    def _reader(self, stream: ResponseStream) -> AttemptReader:
        instance_id = self.instance.instance_id if self.instance is not None else None
        return AttemptReader(stream, request_id=self.request_id, config=self.config, transport=self.transport,
                             generated=self.generated, with_logprobs=self.sampling.logprobs is not None,
                             is_suspect=lambda: instance_id is not None and self.routing.is_suspect(instance_id),
                             last_token_at=self._last_token_at)

    async def _send(self) -> None:
        """Route and send one attempt (retrying at once on no-responders)."""
        if self._reattach_to is not None and await self._reattach(self._reattach_to):
            return
        while True:
            record = await self._choose_instance()
            self.attempts += 1
            produced = len(self.generated)
            sampling = msgspec.structs.replace(
                self.sampling, max_tokens=self.sampling.max_tokens - produced,
                min_tokens=max(0, self.sampling.min_tokens - produced))
            request = GenerateRequest(request_id=self.request_id, model=self.model,
                                      token_ids=self.prompt_ids + self.generated, sampling=sampling,
                                      frontend_id=self.frontend_id, num_prior_output_tokens=produced,
                                      attempt=self.attempts - 1, router_id=self._router_id,
                                      resume_grace=self.resume_grace)
            self.instance = record
            if self._on_instance_stream is not None:
                self._on_instance_stream(self, record.instance_id)
            if not self.transport.connected.is_set():
                # NATS is reconnecting (server restart): wait for it rather than burn
                # attempts on instances that are fine.
                try:
                    await asyncio.wait_for(self.transport.connected.wait(), self.config.stream_stall_timeout)
                except asyncio.TimeoutError:
                    self._release_instance()
                    self._exhausted("NATS is unreachable")
            try:
                self._stream = await self.transport.call(record.subject, encode(request), request_id=self.request_id,
                                                         stall_timeout=self.config.stream_stall_timeout)
                self._last_token_at = time.monotonic()
                return
            except StreamBrokenError:
                await self._on_broken("nats_restart")

    async def _reattach(self, instance_id: str) -> bool:
        """The first attempt of a resumed request: ask its worker for the tokens after
        the ones we have, and the rest as it generates them. False when that instance is
        not live here (gone from discovery, or down): the request migrates instead."""
        self._reattach_to = None
        record = self.routing.records.get(instance_id)
        if record is None or not record.subject or not self.transport.connected.is_set():
            return False
        self.instance = record
        if self._on_instance_stream is not None:
            self._on_instance_stream(self, record.instance_id)
        try:
            self._stream = await self.transport.call(record.subject, b"", request_id=self.request_id,
                                                     stall_timeout=self.config.stream_stall_timeout,
                                                     reattach_from=len(self.generated), frontend_id=self.frontend_id)
        except StreamBrokenError:
            self._release_instance()
            return False
        self._last_token_at = time.monotonic()
        log.info("reattaching", request_id=self.request_id, instance_id=instance_id, have=len(self.generated))
        return True

    async def _choose_instance(self) -> InstanceRecord:
        deadline = time.monotonic() + _NO_INSTANCE_PATIENCE
        while True:
            outcome = await self.routing.route_async(self.model, self.prompt_ids + self.generated, self.request_id,
                                                     self._exclude, continuing=self.attempts > 0)
            if isinstance(outcome, Choice):
                self._router_id = outcome.router_id
                return outcome.record
            if isinstance(outcome, Busy) and self.attempts == 0:
                raise Overloaded(outcome.retry_after)
            if self.attempts == 0 and isinstance(outcome, NoInstance) and outcome.reason == "no_instance":
                raise NoLiveInstance(self.model)
            # Mid-request (or every instance excluded/down): a replacement may be
            # registering right now; keep looking briefly before giving up.
            if time.monotonic() > deadline:
                self._exhausted("no live instance to continue on")
            await asyncio.sleep(0.05)

    async def _on_broken(self, cause: str) -> None:
        failed = self.instance
        stream, self._stream = self._stream, None
        if stream is not None and not stream.done:
            try:
                await stream.aclose()  # if it is alive after all (SIGCONT), stop it
            except TransportError:
                pass
        self._release_instance()
        if cause in ("no_responders", "killed") and self.transport.reconnected_within(self.config.stream_stall_timeout):
            # NATS has just come back and the instance may not have re-subscribed yet: no
            # proof of death. Send again shortly (to it or another instance) without
            # excluding it, marking it down or spending a migration attempt; the window
            # bounds these retries.
            log.info("resend_after_nats_reconnect", request_id=self.request_id, cause=cause,
                     instance_id=failed.instance_id if failed else None)
            await asyncio.sleep(0.05)
            return
        if cause == "in_flight" and failed is not None and failed.instance_id not in self._reattached_in_flight:
            log.info("reattaching_in_flight", request_id=self.request_id, instance_id=failed.instance_id)
            self._reattached_in_flight.add(failed.instance_id)  # once: a refused reattach then migrates
            self._reattach_to = failed.instance_id  # the next attempt reattaches: no recompute
            return
        # A NATS restart is no fault of the instance; nor is a resumed request it no
        # longer holds (not_found).
        if failed is not None and cause not in ("nats_restart", "not_found"):
            self._exclude.add(failed.instance_id)
            if cause in ("no_responders", "killed", "stalled", "lease_expired", "engine_error", "aborted"):
                self.routing.mark_down(failed.instance_id, self.config.down_seconds)
            if cause in ("no_responders", "killed") and self._on_instance_dead is not None:
                self._on_instance_dead(failed.instance_id)
        total = len(self.prompt_ids) + len(self.generated)
        if self.config.migration_limit <= self.migrations:
            self._exhausted(f"worker failed ({cause}) and the migration limit ({self.config.migration_limit}) is reached")
        if self.config.migration_max_seq_len and total > self.config.migration_max_seq_len:
            self._exhausted(f"worker failed ({cause}); the sequence ({total} tokens) is too long to migrate")
        self.migrations += 1
        MIGRATIONS.labels(cause).inc()
        log.warning("migrating", request_id=self.request_id, cause=cause, generated=len(self.generated),
                    from_instance=failed.instance_id if failed else None, migration=self.migrations)

    def _exhausted(self, reason: str) -> NoReturn:
        MIGRATIONS_EXHAUSTED.inc()
        log.error("migration_exhausted", request_id=self.request_id, reason=reason, generated=len(self.generated))
        raise MigrationExhausted(reason)

