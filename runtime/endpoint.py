"""The server side of request/response streams over NATS: ``Endpoint`` serves one
subject with a handler (an async generator of ``Frame``s), publishes its frames in order
to each request's reply subject followed by an ``EndFrame``, sends heartbeats on idle
streams, and answers ``Ping`` / ``Cancel`` on ``{subject}.control``
(``runtime/transport.py`` explains the protocol; ``NatsTransport.serve`` makes one).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from dynrt.runtime.log import get_logger
from dynrt.runtime.protocol import (
    Cancel,
    CancelMode,
    Control,
    ControlReply,
    EndFrame,
    ErrorFrame,
    Frame,
    HeartbeatFrame,
    Ping,
    Pong,
    control_decoder,
    control_subject,
    encode,
)

if TYPE_CHECKING:
    from dynrt.runtime.transport import NatsTransport

log = get_logger("transport")

REQUEST_ID_HEADER = "Dynrt-Request-Id"
_END_FRAME = encode(EndFrame())
_HEARTBEAT_FRAME = encode(HeartbeatFrame())


class RequestContext:
    """What a handler knows about the request it serves."""

    __slots__ = ("request_id", "reply", "last_sent", "on_cancel", "cancel_mode", "task", "frames_sent")

    def __init__(self, request_id: str, reply: str) -> None:
        self.request_id = request_id
        self.reply = reply
        self.last_sent = time.monotonic()
        self.on_cancel: Callable[[CancelMode], None] | None = None
        self.cancel_mode: CancelMode | None = None
        self.task: asyncio.Task[None] | None = None
        self.frames_sent = 0


Handler = Callable[[bytes, RequestContext], AsyncIterator[Frame]]
ExtraControlHandler = Callable[[Control], Awaitable[ControlReply | None]]


class Endpoint:
    """A served subject: its in-flight requests, heartbeats and control channel."""

    def __init__(self, transport: "NatsTransport", subject: str, handler: Handler,
                 extra_control: ExtraControlHandler | None) -> None:
        self.transport = transport
        self.subject = subject
        self.handler = handler
        self.extra_control = extra_control
        self.in_flight: dict[str, RequestContext] = {}
        self._subs: list[Subscription] = []
        self._heartbeat_task: asyncio.Task[None] | None = None
        self.accepting = True

    async def start(self) -> None:
        nc = self.transport.nc
        self._subs.append(await nc.subscribe(self.subject, cb=self._on_request))
        self._subs.append(await nc.subscribe(control_subject(self.subject), cb=self._on_control))
        await nc.flush()
        self._heartbeat_task = asyncio.create_task(self._heartbeat_loop(), name=f"heartbeat:{self.subject}")

    async def stop_accepting(self) -> None:
        """Stop taking requests: callers get no-responders from now on; the control
        subject stays so in-flight requests can still be cancelled.

        The request subscription is *drained*, not unsubscribed: requests the server
        delivered before it saw the UNSUB (still in our socket or queue) reach the
        handler, which answers them (a draining worker says "busy", so callers re-route
        at once). ``unsubscribe`` would drop them in silence, and their callers would
        wait for a stall and take this process for dead."""
        self.accepting = False
        if self._subs:
            request_sub = self._subs.pop(0)
            try:
                await asyncio.wait_for(request_sub.drain(), 2.0)
            except (nats.errors.Error, asyncio.TimeoutError):
                pass

    async def close(self) -> None:
        """Stop everything: cancel in-flight handlers, unsubscribe."""
        await self.stop_accepting()
        for ctx in list(self.in_flight.values()):
            if ctx.task is not None:
                ctx.task.cancel()
        tasks = [c.task for c in self.in_flight.values() if c.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except nats.errors.Error:
                pass
        self._subs.clear()

    async def _on_request(self, msg: Msg) -> None:
        if not msg.reply:
            return
        request_id = (msg.headers or {}).get(REQUEST_ID_HEADER) or msg.reply
        if request_id in self.in_flight:
            # The id must name one stream: a second one would take over the first's
            # context, which could then no longer be cancelled, drained or migrated.
            await self.transport.nc.publish(msg.reply, encode(ErrorFrame(
                code="bad_request", message=f"request id {request_id!r} is already in flight here")))
            await self.transport.nc.publish(msg.reply, _END_FRAME)
            return
        ctx = RequestContext(request_id, msg.reply)
        self.in_flight[request_id] = ctx
        ctx.task = asyncio.create_task(self._run(msg.data, ctx), name=f"request:{request_id}")

    async def _run(self, payload: bytes, ctx: RequestContext) -> None:
        publish = self.transport.nc.publish
        try:
            async for frame in self.handler(payload, ctx):
                await publish(ctx.reply, encode(frame))
                ctx.last_sent = time.monotonic()
                ctx.frames_sent += 1
            await publish(ctx.reply, _END_FRAME)
        except asyncio.CancelledError:
            # Killed by a Cancel from the caller (who no longer listens) or by close().
            pass
        except nats.errors.Error as exc:
            log.warning("stream_publish_failed", request_id=ctx.request_id, error=str(exc))
        except Exception as exc:  # a handler bug must not take the worker down
            log.exception("handler_failed", request_id=ctx.request_id)
            try:
                await publish(ctx.reply, encode(ErrorFrame(code="internal", message=f"internal error: {type(exc).__name__}")))
                await publish(ctx.reply, _END_FRAME)
            except nats.errors.Error:
                pass
        finally:
            self.in_flight.pop(ctx.request_id, None)

    async def _on_control(self, msg: Msg) -> None:
        try:
            message = control_decoder.decode(msg.data)
        except Exception:
            log.warning("bad_control_message", subject=msg.subject)
            return
        if isinstance(message, Ping):
            if msg.reply:
                pong = Pong(nonce=message.nonce, instance_id=self.subject, in_flight=len(self.in_flight))
                await self.transport.nc.publish(msg.reply, encode(pong))
            return
        if isinstance(message, Cancel):
            self.cancel(message.request_id, message.mode)
            if msg.reply:
                await self.transport.nc.publish(msg.reply, encode(Pong(instance_id=self.subject)))
            return
        if self.extra_control is not None:
            reply = await self.extra_control(message)
            if reply is not None and msg.reply:
                await self.transport.nc.publish(msg.reply, encode(reply))

    def cancel(self, request_id: str, mode: CancelMode) -> bool:
        ctx = self.in_flight.get(request_id)
        if ctx is None:
            return False
        ctx.cancel_mode = mode
        if ctx.on_cancel is not None:
            ctx.on_cancel(mode)
        if (mode == "kill" or ctx.on_cancel is None) and ctx.task is not None:
            ctx.task.cancel()
        return True

    async def send_to_all(self, frame: Frame) -> int:
        """Publish one frame (e.g. ``MigrateFrame``) to every in-flight stream and end
        them; returns how many streams it reached."""
        data = encode(frame)
        contexts = list(self.in_flight.values())
        for ctx in contexts:
            if ctx.task is not None:
                ctx.task.cancel()
        for ctx in contexts:
            try:
                await self.transport.nc.publish(ctx.reply, data)
                await self.transport.nc.publish(ctx.reply, _END_FRAME)
            except nats.errors.Error:
                pass
        await self.transport.flush()
        return len(contexts)

    async def _heartbeat_loop(self) -> None:
        interval = self.transport.heartbeat_interval
        nc = self.transport.nc
        while True:
            await asyncio.sleep(interval / 2)
            now = time.monotonic()
            for ctx in list(self.in_flight.values()):
                if now - ctx.last_sent >= interval:
                    ctx.last_sent = now
                    try:
                        await nc.publish(ctx.reply, _HEARTBEAT_FRAME)
                    except nats.errors.Error:
                        pass
