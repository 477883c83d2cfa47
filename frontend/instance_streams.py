"""Which generations stream from which instance, and what happens to them when the
instance leaves discovery (their streams break at once and migrate), is found dead by
one of them (all of them move), or turns suspect (one ping; unanswered, they move)."""

from __future__ import annotations

import asyncio

from dynrt.frontend.migration import Generation
from dynrt.router.service import RoutingService
from dynrt.runtime.log import get_logger
from dynrt.runtime.protocol import InstanceRecord
from dynrt.runtime.transport import NatsTransport, NoRespondersError, PingTimeoutError, TransportError

log = get_logger("frontend")

# How long streams of a worker that deregistered after draining may take to deliver
# their last frames before they count as broken.
_DRAINED_GRACE_SECONDS = 0.5


class InstanceStreams:
    """The generations of this frontend by the instance they stream from."""

    def __init__(self, routing: RoutingService, transport: NatsTransport, ping_timeout: float) -> None:
        self.routing = routing
        self.transport = transport
        self.ping_timeout = ping_timeout
        self.by_instance: dict[str, set[Generation]] = {}
        self._pings: set[asyncio.Task[None]] = set()  # held: the loop keeps only weak references
        routing.on_removed.append(self._on_instance_removed)
        routing.on_suspect.append(self._on_instance_suspect)

    def track(self, generation: Generation, instance_id: str | None) -> None:
        """Know which generations stream from which instance, so an instance leaving
        discovery interrupts exactly those."""
        for streams in self.by_instance.values():
            streams.discard(generation)
        if instance_id is not None:
            self.by_instance.setdefault(instance_id, set()).add(generation)

    def _on_instance_removed(self, record: InstanceRecord) -> None:
        if record.draining:
            # A drained worker sent its open streams a MigrateFrame (or their end) before
            # releasing its lease, but NATS and the etcd watch are different paths: give
            # those frames a moment to arrive, and break only streams still open then.
            asyncio.get_running_loop().call_later(_DRAINED_GRACE_SECONDS, self._interrupt_streams, record.instance_id)
            return
        self._interrupt_streams(record.instance_id)

    def _interrupt_streams(self, instance_id: str, cause: str = "lease_expired") -> None:
        for generation in list(self.by_instance.pop(instance_id, ())):
            generation.interrupt(cause)

    def on_instance_dead(self, instance_id: str) -> None:
        """One of our streams found the instance gone (a ping got no responders): its
        other streams move now, not each after its own silence window."""
        if self.by_instance.get(instance_id):
            log.warning("dead_instance_streams_moving", instance_id=instance_id,
                        streams=len(self.by_instance[instance_id]))
            self._interrupt_streams(instance_id, "killed")

    def _on_instance_suspect(self, record: InstanceRecord) -> None:
        """Its load reports stopped (no new requests go there already): if it holds
        streams of ours, ping it now."""
        if not self.by_instance.get(record.instance_id):
            return
        task = asyncio.get_running_loop().create_task(self._ping_suspect(record))
        self._pings.add(task)
        task.add_done_callback(self._pings.discard)

    async def _ping_suspect(self, record: InstanceRecord) -> None:
        """One ping to a suspect instance; unanswered, its streams move (``suspect``),
        no responders, they move as from a dead one (``killed``). Answered — its loop
        runs, only the reports are late — they stay; the stall timeout is the last resort."""
        try:
            await self.transport.ping(record.subject, timeout=self.ping_timeout)
        except PingTimeoutError:
            cause = "suspect"
        except NoRespondersError:
            cause = "killed"
        except TransportError:
            return  # NATS itself is in trouble: the streams' own checks decide
        else:
            log.info("suspect_answered_ping", instance_id=record.instance_id)
            return
        streams = len(self.by_instance.get(record.instance_id, ()))
        log.warning("suspect_streams_moving", instance_id=record.instance_id, cause=cause, streams=streams)
        self._interrupt_streams(record.instance_id, cause)
