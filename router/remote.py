"""Routing through the standalone router (``dynrt router``), with local bypass.

``RemoteRoutingService`` is a ``RoutingService`` — it keeps the full local view (etcd
instances, load reports, KV events, dumps) — whose ``route_async`` asks the standalone
router first, over NATS request/reply with a short timeout (``--remote-router-timeout``,
50 ms by default). When the router does not answer (no responders: it is not running;
timeout: it is overloaded, hung or partitioned; NATS error), the frontend routes with
its own local view instead — *bypass mode* (as in Llumnix) — logs the switch, and counts
every request routed that way in ``dynrt_frontend_router_bypass_total{cause}``.

While in bypass, requests do not pay the timeout again: a background probe (an empty
``RouteRequest``, answered with ``reason="pong"``) asks the router every
``probe_interval`` seconds, and the first answer switches back to remote routing.

Requests the router routed are reported back on ``router_complete_subject`` when they
end (fire-and-forget), so its pending-assignment view covers every frontend's traffic.
Every remote decision is also recorded in the local state, so when the router goes away
the local fallback already knows this frontend's in-flight load. Instances this
frontend marked down (no-responders, stalls) or holds as suspect (its load reports stopped
reaching this frontend) are added to the request's ``exclude`` list, so the router never
sends this frontend back to a worker it saw fail or cannot hear from.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Collection, Sequence

import msgspec

from dynrt.router.policies import Busy, Choice, NoInstance, Outcome
from dynrt.router.service import RoutingService
from dynrt.runtime import metrics
from dynrt.runtime.config import RoutingConfig
from dynrt.runtime.discovery import EtcdClient
from dynrt.runtime.log import get_logger
from dynrt.runtime.protocol import (
    RouteComplete,
    RouteDecision,
    RouteRequest,
    encode,
    route_decision_decoder,
    router_complete_subject,
    router_subject,
)
from dynrt.runtime.transport import (
    NatsTransport,
    NoRespondersError,
    RequestTimeoutError,
    TransportError,
)

log = get_logger("router")

BYPASS = metrics.counter("dynrt_frontend_router_bypass_total",
                         "requests routed locally because the standalone router did not answer, by cause",
                         ("cause",))
REMOTE_UP = metrics.gauge("dynrt_frontend_router_remote_up", "1 while the standalone router answers (remote mode)")
REMOTE_SECONDS = metrics.histogram(
    "dynrt_frontend_router_remote_seconds", "round trip of a decision from the standalone router",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25))

_PROBE = encode(RouteRequest(model="", token_ids=[]))


class RemoteRoutingService(RoutingService):
    def __init__(self, etcd: EtcdClient, transport: NatsTransport, namespace: str, *,
                 timeout: float = 0.05, probe_interval: float = 0.5, probe_timeout: float = 0.25,
                 config: RoutingConfig | None = None, sender_id: str | None = None) -> None:
        """The local fallback uses the ``kv`` policy with ``config`` (the router's own
        settings decide remote answers). ``sender_id``: the frontend's id (workers count
        every request it sends under it, remote-routed or not, and the local state records
        both)."""
        super().__init__(etcd, transport, namespace, policy="kv", config=config, sender_id=sender_id)
        self.timeout = timeout
        self.probe_interval = probe_interval
        self.probe_timeout = max(probe_timeout, timeout)
        self.remote_subject = router_subject(namespace)
        self.complete_subject = router_complete_subject(namespace)
        self.remote_up = True
        self.bypassed = 0  # requests routed locally, total
        self.remote_routed = 0
        self._down_since = 0.0
        self._bypassed_at_down = 0
        self._wake_probe = asyncio.Event()
        self._probe_task: asyncio.Task[None] | None = None
        self._remote_requests: dict[str, str] = {}  # request id -> instance the router chose
        self._tasks: set[asyncio.Task[None]] = set()
        REMOTE_UP.set(1)

    async def start(self, wait: float | None = 30.0) -> None:
        await super().start(wait=wait)
        self._probe_task = asyncio.create_task(self._probe_loop(), name="router-probe")

    async def close(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
        for task in list(self._tasks):
            task.cancel()
        await super().close()

    # -- decisions --------------------------------------------------------------
    async def route_async(self, model: str, token_ids: Sequence[int], request_id: str,
                          exclude: Collection[str] = (), continuing: bool = False) -> Outcome:
        cause = "down"
        if self.remote_up:
            decision, cause = await self._ask(model, token_ids, request_id, exclude, continuing)
            if decision is None:
                if self.remote_up:  # (a concurrent request may have noticed first)
                    self._went_down(cause)
            else:
                outcome = self._adopt(decision, token_ids, request_id)
                if outcome is not None:
                    self.remote_routed += 1
                    return outcome
                cause = "remote_no_instance"
        self.bypassed += 1
        BYPASS.labels(cause).inc()
        return self.router.route(model, token_ids, request_id, exclude, continuing)

    def admission(self, model: str) -> Busy | None:
        """While the standalone router answers, it decides (it sees every frontend's
        assignments); while it is bypassed, the local view does."""
        return None if self.remote_up else super().admission(model)

    async def _ask(self, model: str, token_ids: Sequence[int], request_id: str,
                   exclude: Collection[str], continuing: bool = False) -> tuple[RouteDecision | None, str]:
        excluded = set(exclude)
        excluded.update(self.state.down_instances())
        excluded.update(self.state.suspects())
        payload = encode(RouteRequest(model=model, token_ids=list(token_ids), exclude=sorted(excluded),
                                      request_id=request_id, continuing=continuing))
        started = time.perf_counter()
        try:
            reply = await self.transport.request(self.remote_subject, payload, timeout=self.timeout)
        except NoRespondersError:
            return None, "no_responders"
        except RequestTimeoutError:
            return None, "timeout"
        except TransportError:
            return None, "nats_error"
        REMOTE_SECONDS.observe(time.perf_counter() - started)
        try:
            return route_decision_decoder.decode(reply), ""
        except msgspec.DecodeError:
            log.warning("bad_route_decision")
            return None, "bad_reply"

    def _adopt(self, decision: RouteDecision, token_ids: Sequence[int], request_id: str) -> Outcome | None:
        """The router's answer as an ``Outcome``; None to decide locally instead."""
        if decision.instance_id:
            record = self.records.get(decision.instance_id)
            if record is None:
                # Not in this frontend's view (yet, or any more): the router counts the
                # request as its load until told it ended; the caller tries again.
                self._report_complete(decision.instance_id, request_id)
                return NoInstance(reason="unknown_instance")
            prompt_blocks = len(token_ids) // record.block_size
            # Local state learns of the assignment too: the fallback stays load-aware.
            self.state.on_assigned(decision.instance_id, request_id, prompt_blocks, decision.overlap_blocks)
            self._remote_requests[request_id] = decision.instance_id
            return Choice(record=record, overlap_blocks=decision.overlap_blocks, prompt_blocks=prompt_blocks,
                          router_id=decision.router_id)
        if decision.busy:
            return Busy(retry_after=max(1, math.ceil(decision.retry_after)), reason=decision.reason or "mixed")
        # The router knows no instance: if this frontend's view differs (a worker
        # registering right now), let the local view decide.
        if decision.reason == "no_instance":
            return None
        return NoInstance(reason=decision.reason or "no_instance")

    def complete(self, instance_id: str, request_id: str) -> None:
        super().complete(instance_id, request_id)
        if self._remote_requests.get(request_id) == instance_id:
            del self._remote_requests[request_id]
            self._report_complete(instance_id, request_id)

    def _report_complete(self, instance_id: str, request_id: str) -> None:
        """Tell the standalone router a request it routed has ended (in the background)."""
        task = asyncio.get_running_loop().create_task(self._send_complete(instance_id, request_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_complete(self, instance_id: str, request_id: str) -> None:
        try:
            await self.transport.publish(self.complete_subject,
                                         encode(RouteComplete(instance_id=instance_id, request_id=request_id)))
        except TransportError as exc:  # the router's load reports absorb it anyway
            log.debug("route_complete_failed", error=str(exc))

    # -- bypass -------------------------------------------------------------------
    def _went_down(self, cause: str) -> None:
        self.remote_up = False
        self._down_since = time.monotonic()
        self._bypassed_at_down = self.bypassed
        REMOTE_UP.set(0)
        log.warning("router_bypass_on", cause=cause, subject=self.remote_subject)
        self._wake_probe.set()

    def _came_back(self) -> None:
        self.remote_up = True
        REMOTE_UP.set(1)
        log.info("router_bypass_off", down_seconds=round(time.monotonic() - self._down_since, 3),
                 bypassed=self.bypassed - self._bypassed_at_down)

    async def _probe_loop(self) -> None:
        while True:
            await self._wake_probe.wait()
            self._wake_probe.clear()
            while not self.remote_up:
                await asyncio.sleep(self.probe_interval)
                if await self.probe():
                    self._came_back()

    async def probe(self) -> bool:
        """True if the standalone router answers a probe right now."""
        try:
            reply = await self.transport.request(self.remote_subject, _PROBE, timeout=self.probe_timeout)
            return route_decision_decoder.decode(reply).reason == "pong"
        except (TransportError, msgspec.DecodeError):  # no responders, timeout, NATS reconnecting, bad reply
            return False
