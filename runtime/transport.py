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
mux) and are dispatched by the last subject token, straight from the client's read loop
(``reply_mux.ReplyMuxClient``). Typed errors:

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

Resumable streams: ``cancel("detach")`` ends the caller's side but leaves a resumable
request running on the server for its ``resume_grace``; ``call(..., reattach_from=M)``
resumes it (runtime/endpoint.py: the first frame is a ``TokenFrame`` with every token
from ``M`` on, then the live rest; or ``ErrorFrame(code="not_found")``).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.nuid import NUID

from dynrt.runtime.endpoint import (
    CALLER_HEADER,
    FRONTEND_ID_HEADER,
    REATTACH_FROM_HEADER,
    REQUEST_ID_HEADER,
    Endpoint,
    ExtraControlHandler,
    Handler,
    ReattachHook,
    RequestContext,
    reattach_subject,
)
from dynrt.runtime.log import get_logger
from dynrt.runtime.protocol import (
    Cancel,
    CancelMode,
    Control,
    ControlReply,
    EndFrame,
    Frame,
    HeartbeatFrame,
    Ping,
    Pong,
    control_reply_decoder,
    control_subject,
    encode,
    frame_decoder,
)

from dynrt.runtime.reply_mux import ReplyMuxClient
from dynrt.runtime.transport_errors import (
    NatsUnavailable,
    NoRespondersError,
    PingTimeoutError,
    RequestTimeoutError,
    StreamBrokenError,
    StreamSilent,
    StreamStalledError,
    TransportError,
)

log = get_logger("transport")

# Re-exported: callers import the errors and the handler types from here.
__all__ = ["NatsTransport", "ResponseStream", "Endpoint", "RequestContext", "Handler", "ExtraControlHandler",
           "REQUEST_ID_HEADER", "REATTACH_FROM_HEADER", "FRONTEND_ID_HEADER", "CALLER_HEADER", "ReattachHook", "reattach_subject",
           "TransportError", "NoRespondersError", "StreamBrokenError", "StreamStalledError",
           "RequestTimeoutError", "PingTimeoutError", "NatsUnavailable", "StreamSilent"]

_NO_RESPONDERS = "503"


# ---------------------------------------------------------------------------
# Client side
# ---------------------------------------------------------------------------

_BROKEN = object()
_NO_RESPONDERS_MARK = object()
# A no-responders reply: a status-only header block and no payload.
_NO_RESPONDERS_STATUS = b"NATS/1.0 " + _NO_RESPONDERS.encode()


# A silence timer may fire this early (the loop's timers have millisecond resolution).
_TIMER_SLACK = 0.001


class ResponseStream:
    """Frames of one call, in order. Heartbeats are consumed here (they only reset
    the stall clock); ``EndFrame`` ends iteration."""

    def __init__(self, transport: "NatsTransport", subject: str, request_id: str, token: bytes,
                 stall_timeout: float) -> None:
        self._transport = transport
        self.subject = subject
        self.request_id = request_id
        self._token = token
        # Received items, and the reader's wake-up future while it waits for one: a
        # plain future per wait is much cheaper than asyncio.Queue + wait_for (which
        # wraps every get in a new task). The silence deadline of a wait is enforced by
        # one long-lived timer, moved only when it fires early or a wait needs it
        # sooner: a new timer per wait (call_later + cancel) costs 3 us in uvloop,
        # more than the rest of a frame's reading.
        self._items: collections.deque[Any] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._deadline = 0.0  # loop time when the current wait is silent too long
        self._timer: asyncio.TimerHandle | None = None
        self.stall_timeout = stall_timeout
        self.last_activity = time.monotonic()
        self.done = False
        self.broken_cause: str | None = None

    @property
    def reply(self) -> str:
        """The reply subject the server sends this stream to."""
        return self._transport._reply_prefix + self._token.decode()

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
        while True:
            frame = self.ready()
            if frame is not None:
                return frame
            await self.wait(timeout)

    def ready(self) -> Frame | None:
        """The next non-heartbeat frame if one has been received, else None (no
        waiting); the errors of :meth:`next`."""
        if self.done:
            raise EOFError
        items = self._items
        while items:
            item = items.popleft()
            self.last_activity = time.monotonic()
            if item is _BROKEN:
                self._finish()
                raise StreamBrokenError(self.broken_cause or "nats_disconnected")
            if item is _NO_RESPONDERS_MARK:
                self._finish()
                raise NoRespondersError(self.subject)
            frame = frame_decoder.decode(item)
            if type(frame) is HeartbeatFrame:
                continue
            if type(frame) is EndFrame:
                self._finish()
                raise EOFError
            return frame
        return None

    def interrupt(self, cause: str) -> None:
        """Break the stream from outside (e.g. its instance left discovery): the
        reader gets ``StreamBrokenError(cause)`` after the frames already received."""
        if not self.done:
            self.broken_cause = cause
            self._deliver(_BROKEN)

    async def wait(self, timeout: float | None) -> None:
        """Until an item is received; ``StreamSilent`` if none within ``timeout``."""
        if timeout is not None and timeout <= 0:
            raise StreamSilent
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        if timeout is not None:
            self._deadline = deadline = loop.time() + timeout
            timer = self._timer
            if timer is None or timer.when() > deadline:  # none, or too late for this wait
                if timer is not None:
                    timer.cancel()
                self._timer = loop.call_at(deadline, self._on_timer)
        else:
            self._deadline = float("inf")
        try:
            await waiter
        finally:
            self._waiter = None
        if not self._items:
            raise StreamSilent

    def _on_timer(self) -> None:
        """The silence timer: wake a wait past its deadline; one not yet past it gets the
        timer moved to its deadline; with no wait, the next one sets a timer."""
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done() or self._deadline == float("inf"):
            return
        loop = asyncio.get_running_loop()
        if loop.time() + _TIMER_SLACK >= self._deadline:
            waiter.set_result(None)
        else:
            self._timer = loop.call_at(self._deadline, self._on_timer)

    def pending(self) -> int:
        """Frames already received and not yet read."""
        return len(self._items)

    def _finish(self) -> None:
        if not self.done:
            self.done = True
            self._transport._streams.pop(self._token, None)
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def release(self) -> None:
        """Stop listening without telling the server (its answer is complete: the
        final frame arrived and only the end marker is still on its way)."""
        self._finish()

    async def cancel(self, mode: CancelMode = "kill") -> None:
        """Tell the server to stop (``stop``: finish after the current step; ``kill``:
        abort now; ``detach``: stop sending, keep a resumable request running for a
        reattach, kill any other). With ``kill`` or ``detach`` the stream ends here."""
        if self.done:
            return
        if mode != "stop":
            self._finish()
        # Naming this stream's reply subject: if the request was taken over by a
        # reattach meanwhile, the server ignores this cancel.
        await self._transport.publish(control_subject(self.subject),
                                      encode(Cancel(request_id=self.request_id, mode=mode)),
                                      headers={CALLER_HEADER: self.reply})

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
        self._streams: dict[bytes, ResponseStream] = {}  # by reply subject token
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

        nc = ReplyMuxClient()
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
        if isinstance(self.nc, ReplyMuxClient):  # the subscription's callback is then not called
            self.nc.reply_prefix = self._reply_prefix.encode()
            self.nc.deliver_reply = self._deliver_reply

    def _deliver_reply(self, subject: bytes, data: bytes, headers: bytes | None) -> None:
        stream = self._streams.get(subject[len(self._reply_prefix):])
        if stream is None:
            return
        if headers and not data and headers.startswith(_NO_RESPONDERS_STATUS):
            stream._deliver(_NO_RESPONDERS_MARK)
            return
        stream._deliver(data)

    async def _on_reply(self, msg: Msg) -> None:
        """The reply mux's callback when the client is a plain nats-py one."""
        stream = self._streams.get(msg.subject[len(self._reply_prefix):].encode())
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
    async def serve(self, subject: str, handler: Handler, extra_control: ExtraControlHandler | None = None,
                    reattach: ReattachHook | None = None) -> Endpoint:
        """``reattach``: the endpoint resumes streams (``{subject}.reattach`` is served)."""
        endpoint = Endpoint(self, subject, handler, extra_control, reattach)
        await endpoint.start()
        self.endpoints.append(endpoint)
        return endpoint

    # -- client ---------------------------------------------------------------
    async def call(self, subject: str, payload: bytes, *, request_id: str, stall_timeout: float = 2.0,
                   reattach_from: int | None = None, frontend_id: str = "") -> ResponseStream:
        """Send a request; frames arrive on the returned stream. A dead subject shows
        up as ``NoRespondersError`` on the first read.

        ``reattach_from=M``: no new request (``payload`` is ignored) but resume the
        resumable request ``request_id`` on the instance serving ``subject``, whose
        first ``M`` output tokens the caller has; ``frontend_id`` names the caller's
        frontend so the worker detaches the stream again if that frontend goes away.
        The message goes to the instance's reattach subject, still served while it drains."""
        if not self.connected.is_set():
            raise StreamBrokenError("nats_disconnected", "not connected to NATS")
        headers = {REQUEST_ID_HEADER: request_id}
        target = subject
        if reattach_from is not None:
            headers[REATTACH_FROM_HEADER] = str(reattach_from)
            if frontend_id:
                headers[FRONTEND_ID_HEADER] = frontend_id
            target, payload = reattach_subject(subject), b""
        token = bytes(self._reply_tokens.next())
        stream = ResponseStream(self, subject, request_id, token, stall_timeout)
        self._streams[token] = stream
        try:
            await self.nc.publish(target, payload, reply=stream.reply, headers=headers)
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

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> None:
        """Publish; ``StreamBrokenError`` if NATS refuses (e.g. reconnecting, closed)."""
        try:
            await self.nc.publish(subject, payload, headers=headers)
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
        for endpoint in list(self.endpoints):  # each removes itself
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
