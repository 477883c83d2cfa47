"""The server side of request/response streams over NATS: ``Endpoint`` serves one
subject with a handler (an async generator of ``Frame``s), publishes its frames in order
to each request's reply subject followed by an ``EndFrame``, sends heartbeats on idle
streams, and answers ``Ping`` / ``Cancel`` on ``{subject}.control``
(``runtime/transport.py`` explains the protocol; ``NatsTransport.serve`` makes one).

Resumable streams (issue 18): a ``Cancel(mode="detach")`` on a resumable request (its
handler set ``RequestContext.resumable``) leaves it running with nobody to send to
(``ctx.reply == ""``: its frames are not published; the handler keeps them). A request
message with the ``Dynrt-Reattach-From: M`` header (on ``{subject}.reattach``, which
stays subscribed while a worker drains, or on the request subject itself) names a
request by its ``Dynrt-Request-Id``: the endpoint asks the ``ReattachHook`` what to
send, and for a running request moves the stream to the new reply subject.
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
# A reattach: the caller already has this many of the request's output tokens.
REATTACH_FROM_HEADER = "Dynrt-Reattach-From"
# On a reattach, optional: the frontend now reading the stream (so the stream is
# detached again if that frontend goes away).
FRONTEND_ID_HEADER = "Dynrt-Frontend-Id"
# On a ``Cancel``, optional: the reply subject of the stream it is about. A stream taken
# over by a reattach has a new reply subject, so a late cancel from its previous
# caller (who could not yet know) is ignored instead of stopping the new caller's stream.
CALLER_HEADER = "Dynrt-Caller"
_END_FRAME = encode(EndFrame())
_HEARTBEAT_FRAME = encode(HeartbeatFrame())
_RESUMED_ELSEWHERE = encode(ErrorFrame(code="cancelled", message="stream resumed elsewhere"))


def reattach_subject(request_subject: str) -> str:
    """Where reattach messages go: unlike the request subject, it stays subscribed while
    the endpoint drains, so a stream still running on a draining worker can be resumed."""
    return f"{request_subject}.reattach"


class RequestContext:
    """What a handler knows about the request it serves."""

    __slots__ = ("request_id", "reply", "last_sent", "on_cancel", "cancel_mode", "task", "frames_sent",
                 "resumable")

    def __init__(self, request_id: str, reply: str) -> None:
        self.request_id = request_id
        # Where frames go; "" while detached (nobody reads them: they are not sent).
        self.reply = reply
        self.last_sent = time.monotonic()
        self.on_cancel: Callable[[CancelMode], None] | None = None
        self.cancel_mode: CancelMode | None = None
        self.task: asyncio.Task[None] | None = None
        self.frames_sent = 0
        # Set by the handler: a ``detach`` leaves the request running (else it kills it).
        self.resumable = False

    @property
    def ending(self) -> bool:
        """Its task was cancelled (a kill, a hand-off, close) or is over: it sends no more frames."""
        return self.task is not None and (self.task.done() or self.task.cancelling() > 0)


Handler = Callable[[bytes, RequestContext], AsyncIterator[Frame]]
ExtraControlHandler = Callable[[Control], Awaitable[ControlReply | None]]
# (request id, tokens the caller has, the running request's context or None, the
# caller's frontend id) -> (the first frame for the new caller, whether the stream then
# continues live to it; if not, the endpoint ends the new caller's stream). Called
# synchronously, right before the switch: it must not await.
ReattachHook = Callable[[str, int, RequestContext | None, str], tuple[Frame, bool]]


class Endpoint:
    """A served subject: its in-flight requests, heartbeats and control channel."""

    def __init__(self, transport: "NatsTransport", subject: str, handler: Handler,
                 extra_control: ExtraControlHandler | None, reattach: ReattachHook | None = None) -> None:
        self.transport = transport
        self.subject = subject
        self.handler = handler
        self.extra_control = extra_control
        self.reattach = reattach
        self.in_flight: dict[str, RequestContext] = {}
        self._subs: list[Subscription] = []
        self._heartbeat_task: asyncio.Task[None] | None = None
        self.accepting = True

    async def start(self) -> None:
        nc = self.transport.nc
        self._subs.append(await nc.subscribe(self.subject, cb=self._on_request))
        self._subs.append(await nc.subscribe(control_subject(self.subject), cb=self._on_control))
        if self.reattach is not None:
            self._subs.append(await nc.subscribe(reattach_subject(self.subject), cb=self._on_request))
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
        """Stop everything: cancel in-flight handlers, unsubscribe; the transport forgets
        this endpoint (its connection may serve others: ``dynrt.worker.instances``)."""
        if self in self.transport.endpoints:
            self.transport.endpoints.remove(self)
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
        headers = msg.headers or {}
        request_id = headers.get(REQUEST_ID_HEADER) or msg.reply
        if REATTACH_FROM_HEADER in headers:
            await self._on_reattach(msg.reply, request_id, headers[REATTACH_FROM_HEADER],
                                    headers.get(FRONTEND_ID_HEADER, ""))
            return
        if msg.subject != self.subject:
            return  # only reattaches are served on the reattach subject
        if request_id in self.in_flight:
            # The id must name one stream: a second one would take over the first's
            # context, which could then no longer be cancelled, drained or migrated.
            await self.transport.nc.publish(msg.reply, encode(ErrorFrame(
                code="in_flight", message=f"request id {request_id!r} is already in flight here")))
            await self.transport.nc.publish(msg.reply, _END_FRAME)
            return
        ctx = RequestContext(request_id, msg.reply)
        self.in_flight[request_id] = ctx
        ctx.task = asyncio.create_task(self._run(msg.data, ctx), name=f"request:{request_id}")

    async def _on_reattach(self, reply: str, request_id: str, start_text: str, frontend_id: str) -> None:
        """Resume a stream on a new reply subject (``ReattachHook`` decides what to send).

        Ordering: the handler records each frame right before yielding it and ``_run``
        publishes it with no await in between (nats-py appends a publish to its pending
        buffer synchronously), so here, between two turns of the handler, the recorded
        output is exactly what was sent. The hook computes the replay from it, the reply
        subject is switched and the replay published with no await before the replay is
        in the buffer: every later frame follows it on the new subject, none is lost or
        sent twice."""
        publish = self.transport.nc.publish
        try:
            start = int(start_text)
            if start < 0:
                raise ValueError(start_text)
        except ValueError:
            frame: Frame = ErrorFrame(code="bad_request", message=f"bad {REATTACH_FROM_HEADER}: {start_text!r}")
            live = False
        else:
            ctx = self.in_flight.get(request_id)
            if ctx is not None and ctx.ending:
                ctx = None  # killed or handed off: it sends nothing more
            if self.reattach is None:
                frame, live = ErrorFrame(code="not_found", message="this endpoint keeps no streams"), False
            else:
                frame, live = self.reattach(request_id, start, ctx, frontend_id)
            if live and ctx is not None:
                previous, ctx.reply = ctx.reply, reply
                ctx.last_sent = time.monotonic()
                try:
                    await publish(reply, encode(frame))  # in the buffer before this await yields
                    if previous:  # still attached to another caller: tell it
                        await publish(previous, _RESUMED_ELSEWHERE)
                        await publish(previous, _END_FRAME)
                except nats.errors.Error as exc:
                    log.warning("reattach_publish_failed", request_id=request_id, error=str(exc))
                return
        try:
            await publish(reply, encode(frame))
            await publish(reply, _END_FRAME)
        except nats.errors.Error as exc:
            log.warning("reattach_publish_failed", request_id=request_id, error=str(exc))

    async def _run(self, payload: bytes, ctx: RequestContext) -> None:
        publish = self.transport.nc.publish
        try:
            async for frame in self.handler(payload, ctx):
                if ctx.reply:  # else detached: the handler keeps the output for a reattach
                    await publish(ctx.reply, encode(frame))
                    ctx.last_sent = time.monotonic()
                ctx.frames_sent += 1
            if ctx.reply:
                await publish(ctx.reply, _END_FRAME)
        except asyncio.CancelledError:
            # Killed by a Cancel from the caller (who no longer listens) or by close().
            pass
        except nats.errors.Error as exc:
            log.warning("stream_publish_failed", request_id=ctx.request_id, error=str(exc))
        except Exception as exc:  # a handler bug must not take the worker down
            log.exception("handler_failed", request_id=ctx.request_id)
            if not ctx.reply:
                return
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
            self.cancel(message.request_id, message.mode, caller=(msg.headers or {}).get(CALLER_HEADER, ""))
            if msg.reply:
                await self.transport.nc.publish(msg.reply, encode(Pong(instance_id=self.subject)))
            return
        if self.extra_control is not None:
            reply = await self.extra_control(message)
            if reply is not None and msg.reply:
                await self.transport.nc.publish(msg.reply, encode(reply))

    def cancel(self, request_id: str, mode: CancelMode, caller: str = "") -> bool:
        """``detach`` on a resumable request stops sending (the handler's ``on_cancel``
        keeps it running for a while); on any other it is a ``kill``. ``caller``: the
        reply subject the cancel is about; if the stream now goes elsewhere, ignored."""
        ctx = self.in_flight.get(request_id)
        if ctx is None:
            return False
        if caller and caller != ctx.reply:
            log.info("cancel_from_previous_caller_ignored", request_id=request_id, mode=mode)
            return False
        if mode == "detach" and not ctx.resumable:
            mode = "kill"
        ctx.cancel_mode = mode
        if mode == "detach":
            ctx.reply = ""
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
            if not ctx.reply:
                continue  # detached: nobody to tell
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
                if ctx.reply and now - ctx.last_sent >= interval:
                    ctx.last_sent = now
                    try:
                        await nc.publish(ctx.reply, _HEARTBEAT_FRAME)
                    except nats.errors.Error:
                        pass
