"""``dynrt router``: the standalone KV-aware router, shared by frontends started with
``--router-mode remote``.

One process holds one global view of the pool — the same ``RoutingService`` a frontend
runs locally (etcd instances, NATS load reports and KV events, dumps) — and answers
``RouteRequest`` → ``RouteDecision`` on ``router_subject(ns)`` (NATS request/reply, queue
group ``dynrt-router``). Because every frontend asks it, its pending assignments cover
the requests of *all* frontends: a burst spread over many frontends still spreads over
the workers. Frontends report the end of each request it routed with ``RouteComplete``
on ``router_complete_subject(ns)``. Each decision carries the router's id (a new one per
process), which the frontend puts in ``GenerateRequest.router_id``; workers count the
requests they receive under it, and their load reports acknowledge the router's pending
assignments by that count (``dynrt.router.cost.PendingAssignments``). Assignments no
report acknowledges expire (``RouterState.ack_timeout``; ``ASSIGNMENT_TTL`` if an
instance's reports stop).

Start-up: the router subscribes its request subject only once it has the instance
records from etcd and a dump of every live worker's KV cache (bounded by
``SYNC_TIMEOUT``), so a restarted router routes as well as before it stopped; until
then frontends get no-responders and route locally (bypass mode).

A ``RouteRequest`` with an empty ``model`` is a probe: answered with
``RouteDecision(reason="pong")`` and nothing else (frontends in bypass mode use it to
find out that the router is back).

SIGTERM/SIGINT: unsubscribe (frontends switch to bypass at once), then close.
Health, readiness and Prometheus metrics on ``--system-port``, and ``GET``/``POST
/busy_threshold`` (``dynrt.router.http``: the thresholds this router sheds load with;
``POST`` takes the admin key, see ``dynrt.runtime.auth``).
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from typing import Any

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from dynrt.router.cost import BusyThresholds
from dynrt.router.http import add_busy_threshold_routes
from dynrt.router.policies import Busy, Choice
from dynrt.router.service import RoutingService
from dynrt.runtime import config as config_flags
from dynrt.runtime import http_errors as errors
from dynrt.runtime import metrics
from dynrt.runtime.auth import Authenticator
from dynrt.runtime.config import RouterConfig, from_args
from dynrt.runtime.discovery import EtcdClient
from dynrt.runtime.health import HealthServer
from dynrt.runtime.http_guard import HttpGuard, json_errors_middleware
from dynrt.runtime.lifecycle import GracefulShutdown, run_main
from dynrt.runtime.log import get_logger, setup_logging
from dynrt.runtime.protocol import (
    RouteDecision,
    encode,
    route_complete_decoder,
    route_request_decoder,
    router_complete_subject,
    router_subject,
)
from dynrt.runtime.transport import NatsTransport, TransportError

log = get_logger("router")

QUEUE_GROUP = "dynrt-router"
# Longest a request may count as pending load without a completion or a load report.
ASSIGNMENT_TTL = 60.0
# How long start-up waits for every live worker's cache dump before serving anyway.
SYNC_TIMEOUT = 10.0
_PONG = encode(RouteDecision(reason="pong"))

DECISIONS = metrics.counter("dynrt_router_decisions_total", "route requests answered, by outcome", ("outcome",))
DECISION_SECONDS = metrics.histogram(
    "dynrt_router_decision_seconds", "time to decide one route request (decode, choose, encode)",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1))
COMPLETIONS = metrics.counter("dynrt_router_completions_total", "request completions reported by frontends")
INSTANCES = metrics.gauge("dynrt_router_instances", "live instances in the router's view")
INDEXED_BLOCKS = metrics.gauge("dynrt_router_indexed_blocks", "distinct KV block hashes in the index")
AUTH_FAILURES = metrics.counter("dynrt_router_auth_failures_total",
                                "HTTP requests refused for a missing or wrong key, by endpoint and reason",
                                ("endpoint", "reason"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config_flags.add_arguments(parser, RouterConfig)


class StandaloneRouter:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.etcd = EtcdClient.from_config(config)
        self.transport: NatsTransport | None = None
        self.routing: RoutingService | None = None
        self.authenticator = Authenticator.from_config(config.auth)
        guard = HttpGuard(self.authenticator, AUTH_FAILURES)
        self.health_server = HealthServer(self._health, host=config.host, port=config.system_port,
                                          middlewares=[json_errors_middleware(guard)])
        guard.mark(self.health_server.app.router.routes(), "open")  # /live, /health, /metrics
        add_busy_threshold_routes(self.health_server.app, guard, self._thresholds)
        self.shutdown = GracefulShutdown()
        self.serving = False
        self.synced = False
        self.decisions = 0
        self.router_id = f"router-{uuid.uuid4().hex[:12]}"
        self._subs: list[Subscription] = []
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ----------------------------------------------------------------
    async def start(self) -> None:
        config = self.config
        system_port = await self.health_server.start()
        self.transport = await NatsTransport.connect(config.nats_url, name="router",
                                                     heartbeat_interval=config.heartbeat_interval,
                                                     creds_file=config.nats_creds)
        self.routing = RoutingService(self.etcd, self.transport, config.namespace, policy="kv",
                                      config=config.routing, sender_id=self.router_id)
        started = time.monotonic()
        await self.routing.start(wait=30)
        # Every instance found in etcd has a dump requested (``RoutingService._on_put``);
        # serve only once they are in, so a restart costs no routing quality.
        self.synced = await self.routing.wait_synced(SYNC_TIMEOUT)
        if not self.synced:
            log.warning("router_sync_incomplete", stale=self.routing.state.index.stale_instances())
        ns = config.namespace
        self._subs.append(await self.transport.subscribe(router_complete_subject(ns), self._on_complete))
        self._subs.append(await self.transport.subscribe(router_subject(ns), self._on_route, queue=QUEUE_GROUP))
        await self.transport.flush()
        self.serving = True
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="router-housekeeping"))
        self.shutdown.add("stop_serving", self._stop_serving, timeout=5)
        self.shutdown.add("release", self._release, timeout=10)
        log.info("router_ready", subject=router_subject(ns), system_port=system_port,
                 instances=len(self.routing.records), indexed_blocks=len(self.routing.state.index),
                 synced=self.synced, startup_seconds=round(time.monotonic() - started, 3),
                 **self.authenticator.describe())

    async def run(self) -> int:
        outcome = await self.shutdown.serve(self.start(), self._release, "router")
        if outcome != "stopped":
            return 1 if outcome == "start_failed" else 0
        log.info("router_stopped", decisions=self.decisions)
        return 0

    async def _stop_serving(self) -> None:
        """Unsubscribe first: from now on frontends get no-responders and bypass."""
        self.serving = False
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:  # connection already gone
                pass
        self._subs.clear()
        if self.transport is not None:
            await self.transport.flush()

    async def _release(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.routing is not None:
            await self.routing.close()
        if self.transport is not None:
            await self.transport.close()
        await self.health_server.close()
        await self.etcd.close()

    # -- serving --------------------------------------------------------------------
    async def _on_route(self, msg: Msg) -> None:
        if not msg.reply or self.routing is None:
            return
        started = time.perf_counter()
        try:
            request = route_request_decoder.decode(msg.data)
        except Exception:
            log.warning("bad_route_request")
            DECISIONS.labels("bad_request").inc()
            return
        if not request.model:  # probe
            await self._respond(msg, _PONG)
            return
        outcome = self.routing.route(request.model, request.token_ids, request.request_id, request.exclude,
                                     request.continuing)
        decision = outcome.to_decision()
        decision.router_id = self.router_id
        payload = encode(decision)
        self.decisions += 1
        DECISION_SECONDS.observe(time.perf_counter() - started)
        if isinstance(outcome, Choice):
            DECISIONS.labels("chosen").inc()
        elif isinstance(outcome, Busy):
            DECISIONS.labels("busy").inc()
        else:
            DECISIONS.labels(outcome.reason).inc()
        await self._respond(msg, payload)

    async def _respond(self, msg: Msg, payload: bytes) -> None:
        assert self.transport is not None
        try:
            await self.transport.publish(msg.reply, payload)
        except TransportError as exc:  # NATS reconnecting: the frontend times out and bypasses
            log.debug("route_reply_failed", error=str(exc))

    async def _on_complete(self, msg: Msg) -> None:
        if self.routing is None:
            return
        try:
            done = route_complete_decoder.decode(msg.data)
        except Exception:
            log.warning("bad_route_complete")
            return
        COMPLETIONS.inc()
        self.routing.complete(done.instance_id, done.request_id)

    async def _housekeeping(self) -> None:
        assert self.routing is not None
        while True:
            await asyncio.sleep(1.0)
            self.routing.state.expire_assignments(ASSIGNMENT_TTL)
            INSTANCES.set(len(self.routing.records))
            INDEXED_BLOCKS.set(len(self.routing.state.index))

    def _thresholds(self) -> BusyThresholds:
        if self.routing is None:
            raise errors.not_ready("router")
        return self.routing.state.thresholds

    # -- health -----------------------------------------------------------------------
    def _health(self) -> tuple[bool, dict[str, Any]]:
        routing = self.routing
        details: dict[str, Any] = {
            "status": "ready" if self.serving else ("stopping" if self.shutdown.requested.is_set() else "starting"),
            "synced": self.synced,
            "decisions": self.decisions,
        }
        if routing is not None:
            details.update(instances=len(routing.records), indexed_blocks=len(routing.state.index),
                           stale_instances=routing.state.index.stale_instances(),
                           rejections=dict(routing.router.rejections))
        return self.serving, details


async def _main(config: RouterConfig) -> int:
    return await StandaloneRouter(config).run()


def main(args: argparse.Namespace) -> int:
    config = from_args(RouterConfig, args)
    setup_logging("router", config.log_level)
    return run_main(_main(config))
