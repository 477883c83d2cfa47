"""Request/response streams over NATS (nats-py).

Server side: ``serve(subject, handler)`` — for each request message the handler (an
async generator) yields ``Frame``s that are published, in order, to the request's reply
subject, followed by an ``EndFrame``. An idle stream gets a ``HeartbeatFrame`` every
``heartbeat_interval`` so callers can tell a slow stream from a dead one. A
``Cancel`` on ``{subject}.control`` reaches the handler (``RequestContext.on_cancel``);
``kill`` also cancels its task. ``Ping`` on the control subject is answered with
``Pong`` by the transport itself, so a live event loop is all a ping proves — exactly
what stall detection needs.

Client side: ``call(subject, payload)`` returns a ``ResponseStream`` (async iterator of
frames). All calls share one wildcard reply subscription (like nats-py's own request
mux) and are dispatched by the last subject token. Typed errors:

- ``NoRespondersError``: nobody subscribes to the subject (the instance is gone); the
  NATS server says so at once (status 503 on the reply inbox).
- ``StreamBrokenError``: the stream cannot be trusted any more — the NATS connection
  dropped (frames may have been lost), or ``StreamStalledError`` when nothing, not even a
  heartbeat, arrived for ``stall_timeout``.

One-reply requests (``request``, ``request_control``, ``ping``) and ``publish`` raise the
same typed errors (``RequestTimeoutError``, ``PingTimeoutError`` for a ping), never
nats-py's.

Closing a stream before its end (``aclose()``, or leaving ``async for`` early) sends a
``Cancel(kill)`` to the server so the request stops and frees its KV cache.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.nuid import NUID

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
    control_reply_decoder,
    control_subject,
    encode,
    frame_decoder,
)

log = get_logger("transport")

REQUEST_ID_HEADER = "Dynrt-Request-Id"
_NO_RESPONDERS = "503"
_END_FRAME = encode(EndFrame())
_HEARTBEAT_FRAME = encode(HeartbeatFrame())


class TransportError(Exception):
    """Base of the transport's typed errors."""


class NoRespondersError(TransportError):
    """No subscriber on the subject: the instance is gone."""


class StreamBrokenError(TransportError):
    """The response stream can no longer be trusted; ``cause`` says why."""

    def __init__(self, cause: str, message: str = "") -> None:
        super().__init__(message or cause)
        self.cause = cause


class StreamStalledError(StreamBrokenError):
    """Nothing (not even a heartbeat) arrived for ``stall_timeout`` seconds."""

    def __init__(self, seconds: float) -> None:
        super().__init__("stalled", f"no frame or heartbeat for {seconds:.2f}s")


class RequestTimeoutError(TransportError):
    """No reply to a request within its timeout."""


class PingTimeoutError(RequestTimeoutError):
    """The instance did not answer a ping in time."""


class NatsUnavailable(TransportError):
    """No NATS server accepted the connection in time."""


class StreamSilent(Exception):
    """``ResponseStream.next(timeout)`` saw nothing within ``timeout`` (not an error
    by itself: the caller decides, e.g. by pinging the instance)."""


# ---------------------------------------------------------------------------
# Server side
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Client side
# ---------------------------------------------------------------------------

_BROKEN = object()
_NO_RESPONDERS_MARK = object()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class ResponseStream:
    """Frames of one call, in order. Heartbeats are consumed here (they only reset
    the stall clock); ``EndFrame`` ends iteration."""

    def __init__(self, transport: "NatsTransport", subject: str, request_id: str, token: str,
                 stall_timeout: float) -> None:
        self._transport = transport
        self.subject = subject
        self.request_id = request_id
        self._token = token
        # Received items, and the reader's wake-up future while it waits for one: a
        # plain future + call_later timer per wait is much cheaper than asyncio.Queue +
        # wait_for (which wraps every get in a new task).
        self._items: collections.deque[Any] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self.stall_timeout = stall_timeout
        self.last_activity = time.monotonic()
        self.done = False
        self.broken_cause: str | None = None

    # called by the transport's reply mux
    def _deliver(self, item: Any) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> "ResponseStream":
        return self

    async def __anext__(self) -> Frame:
        try:
            return await self.next(self.stall_timeout)
        except StreamSilent:
            self._finish()
            raise StreamStalledError(self.stall_timeout) from None
        except EOFError:
            raise StopAsyncIteration from None

    async def next(self, timeout: float | None) -> Frame:
        """The next non-heartbeat frame. Raises ``StreamSilent`` if nothing at all
        (heartbeats included) arrives within ``timeout`` (the stream stays usable),
        ``EOFError`` at the end, ``NoRespondersError`` / ``StreamBrokenError``."""
        if self.done:
            raise EOFError
        items = self._items
        while True:
            if not items:
                await self._wait(timeout)
            item = items.popleft()
            self.last_activity = time.monotonic()
            if item is _BROKEN:
                self._finish()
                raise StreamBrokenError(self.broken_cause or "nats_disconnected")
            if item is _NO_RESPONDERS_MARK:
                self._finish()
                raise NoRespondersError(self.subject)
            frame = frame_decoder.decode(item)
            if isinstance(frame, HeartbeatFrame):
                continue
            if isinstance(frame, EndFrame):
                self._finish()
                raise EOFError
            return frame

    def interrupt(self, cause: str) -> None:
        """Break the stream from outside (e.g. its instance left discovery): the
        reader gets ``StreamBrokenError(cause)`` after the frames already received."""
        if not self.done:
            self.broken_cause = cause
            self._deliver(_BROKEN)

    async def _wait(self, timeout: float | None) -> None:
        """Until an item is received; ``StreamSilent`` if none within ``timeout``."""
        if timeout is not None and timeout <= 0:
            raise StreamSilent
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, _wake, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
        if not self._items:
            raise StreamSilent

    def pending(self) -> int:
        """Frames already received and not yet read."""
        return len(self._items)

    def _finish(self) -> None:
        if not self.done:
            self.done = True
            self._transport._streams.pop(self._token, None)

    def release(self) -> None:
        """Stop listening without telling the server (its answer is complete: the
        final frame arrived and only the end marker is still on its way)."""
        self._finish()

    async def cancel(self, mode: CancelMode = "kill") -> None:
        """Tell the server to stop (``stop``: finish after the current step; ``kill``:
        abort now). With ``kill`` the stream ends here."""
        if self.done:
            return
        if mode == "kill":
            self._finish()
        await self._transport.send_control(control_subject(self.subject), Cancel(request_id=self.request_id, mode=mode))

    async def aclose(self) -> None:
        if not self.done:
            try:
                await self.cancel("kill")
            except (TransportError, nats.errors.Error):
                pass


class NatsTransport:
    def __init__(self, nc: NatsClient, heartbeat_interval: float = 1.0) -> None:
        self.nc = nc
        self.heartbeat_interval = heartbeat_interval
        self._streams: dict[str, ResponseStream] = {}
        self._reply_tokens = NUID()
        self._reply_prefix = ""
        self._reply_sub: Subscription | None = None
        self.endpoints: list[Endpoint] = []
        self.connected = asyncio.Event()
        self.disconnect_count = 0
        self.reconnected_at: float | None = None  # time.monotonic() of the last reconnect
        self.closing = False

    @classmethod
    async def connect(
        cls,
        servers: str | list[str],
        *,
        name: str = "dynrt",
        heartbeat_interval: float = 1.0,
        creds_file: str = "",
        connect_timeout: float = 30.0,
    ) -> "NatsTransport":
        """Connect (retrying until ``connect_timeout`` if the server is not up yet)
        with reconnects forever, fast: a NATS restart should cost a fraction of a second."""
        if isinstance(servers, str):
            servers = [s.strip() for s in servers.split(",") if s.strip()]
        transport: NatsTransport | None = None

        async def disconnected() -> None:
            if transport is not None:
                transport._on_disconnected()

        async def reconnected() -> None:
            if transport is not None:
                transport.reconnected_at = time.monotonic()
                transport.connected.set()
                log.info("nats_reconnected", server=str(nc.connected_url.netloc if nc.connected_url else ""))

        async def error(exc: Exception) -> None:
            log.debug("nats_error", error=str(exc))

        nc = NatsClient()
        # With max_reconnect_attempts=-1 nats-py itself keeps retrying the first connect
        # (server not up yet, or refusing our credentials) forever: bound it here.
        try:
            await asyncio.wait_for(nc.connect(
                servers=servers,
                name=name,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.1,  # type: ignore[arg-type]
                connect_timeout=2,
                ping_interval=5,
                max_outstanding_pings=2,
                disconnected_cb=disconnected,
                reconnected_cb=reconnected,
                error_cb=error,
                user_credentials=creds_file or None,
            ), connect_timeout)
        except (asyncio.TimeoutError, nats.errors.NoServersError, OSError) as exc:
            try:
                await nc.close()
            except Exception:  # half-open client: nothing more to release
                pass
            raise NatsUnavailable(f"could not connect to NATS at {','.join(servers)} within "
                                  f"{connect_timeout:.0f}s ({type(exc).__name__})") from None
        transport = cls(nc, heartbeat_interval)
        await transport._start_reply_mux()
        transport.connected.set()
        return transport

    async def _start_reply_mux(self) -> None:
        self._reply_prefix = self.nc.new_inbox() + "."
        self._reply_sub = await self.nc.subscribe(self._reply_prefix + "*", cb=self._on_reply)

    async def _on_reply(self, msg: Msg) -> None:
        stream = self._streams.get(msg.subject[len(self._reply_prefix):])
        if stream is None:
            return
        headers = msg.headers
        if headers and headers.get("Status") == _NO_RESPONDERS and not msg.data:
            stream._deliver(_NO_RESPONDERS_MARK)
            return
        stream._deliver(msg.data)

    def reconnected_within(self, seconds: float) -> bool:
        """True if the connection came back less than ``seconds`` ago: peers may not have
        re-subscribed yet, so no-responders then does not mean a dead instance."""
        return self.reconnected_at is not None and time.monotonic() - self.reconnected_at < seconds

    def _on_disconnected(self) -> None:
        self.connected.clear()
        if self.closing:
            return
        self.disconnect_count += 1
        log.warning("nats_disconnected", open_streams=len(self._streams))
        for stream in list(self._streams.values()):
            stream.broken_cause = "nats_disconnected"
            stream._deliver(_BROKEN)
        # Callers treat every stream cut by the disconnect as broken and move on, so
        # the requests we serve are orphans now: stop them and free their KV.
        for endpoint in self.endpoints:
            for ctx in list(endpoint.in_flight.values()):
                endpoint.cancel(ctx.request_id, "kill")

    # -- server ---------------------------------------------------------------
    async def serve(self, subject: str, handler: Handler,
                    extra_control: ExtraControlHandler | None = None) -> Endpoint:
        endpoint = Endpoint(self, subject, handler, extra_control)
        await endpoint.start()
        self.endpoints.append(endpoint)
        return endpoint

    # -- client ---------------------------------------------------------------
    async def call(self, subject: str, payload: bytes, *, request_id: str,
                   stall_timeout: float = 2.0) -> ResponseStream:
        """Send a request; frames arrive on the returned stream. A dead subject shows
        up as ``NoRespondersError`` on the first read."""
        if not self.connected.is_set():
            raise StreamBrokenError("nats_disconnected", "not connected to NATS")
        token = self._reply_tokens.next().decode()
        stream = ResponseStream(self, subject, request_id, token, stall_timeout)
        self._streams[token] = stream
        try:
            await self.nc.publish(subject, payload, reply=self._reply_prefix + token,
                                  headers={REQUEST_ID_HEADER: request_id})
        except nats.errors.Error as exc:
            stream._finish()
            raise StreamBrokenError("nats_disconnected", str(exc)) from exc
        return stream

    async def request(self, subject: str, payload: bytes, timeout: float) -> bytes:
        """One request, one reply (its payload). Raises ``NoRespondersError`` (nobody
        subscribes), ``RequestTimeoutError``, or ``StreamBrokenError`` (NATS error)."""
        try:
            reply = await self.nc.request(subject, payload, timeout=timeout)
        except nats.errors.NoRespondersError:
            raise NoRespondersError(subject) from None
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            raise RequestTimeoutError(subject) from None
        except nats.errors.Error as exc:
            raise StreamBrokenError("nats_disconnected", str(exc)) from exc
        return reply.data

    async def request_control(self, subject: str, message: Control, timeout: float) -> ControlReply:
        """A control message and its reply; the errors of ``request``."""
        return control_reply_decoder.decode(await self.request(subject, encode(message), timeout))

    async def ping(self, instance_subject: str, timeout: float = 0.1) -> Pong:
        """Ask the instance's event loop to answer. ``NoRespondersError`` means the
        process is gone; ``PingTimeoutError`` that it is hung or far away."""
        subject = control_subject(instance_subject)
        try:
            reply = await self.request_control(subject, Ping(), timeout)
        except RequestTimeoutError:
            raise PingTimeoutError(subject) from None
        assert isinstance(reply, Pong)
        return reply

    async def send_control(self, subject: str, message: Control) -> None:
        await self.publish(subject, encode(message))

    async def publish(self, subject: str, payload: bytes) -> None:
        """Publish; ``StreamBrokenError`` if NATS refuses (e.g. reconnecting, closed)."""
        try:
            await self.nc.publish(subject, payload)
        except nats.errors.Error as exc:
            raise StreamBrokenError("nats_disconnected", str(exc)) from exc

    async def subscribe(self, subject: str, cb: Callable[[Msg], Awaitable[None]], queue: str = "") -> Subscription:
        """``queue``: a queue group (each message goes to one of its members)."""
        return await self.nc.subscribe(subject, queue=queue, cb=cb)

    async def flush(self, timeout: float = 2.0) -> None:
        try:
            await self.nc.flush(timeout=timeout)  # type: ignore[arg-type]
        except (nats.errors.Error, asyncio.TimeoutError):
            pass

    async def close(self) -> None:
        self.closing = True
        for endpoint in self.endpoints:
            await endpoint.close()
        for stream in list(self._streams.values()):
            stream.broken_cause = "closed"
            stream._deliver(_BROKEN)
        try:
            await self.nc.drain()
        except (nats.errors.Error, asyncio.TimeoutError):
            pass
        if not self.nc.is_closed:
            await self.nc.close()
