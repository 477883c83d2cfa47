"""NATS request/response streams against a real nats-server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from dynrt.runtime.embedded import NatsServer
from dynrt.runtime.protocol import CancelMode, Frame, TokenFrame
from dynrt.runtime.transport import (
    NatsTransport,
    NoRespondersError,
    RequestContext,
    StreamBrokenError,
    StreamStalledError,
)


async def counting_handler(payload: bytes, ctx: RequestContext) -> AsyncIterator[Frame]:
    for i in range(int(payload)):
        yield TokenFrame(token_ids=[i])


async def test_ten_thousand_frames_arrive_complete_and_in_order(nats_server: NatsServer, namespace: str) -> None:
    server = await NatsTransport.connect(nats_server.url)
    client = await NatsTransport.connect(nats_server.url)
    subject = f"dynrt.{namespace}.backend.generate.w1"
    await server.serve(subject, counting_handler)
    received: list[int] = []
    async for frame in await client.call(subject, b"10000", request_id="r1"):
        assert isinstance(frame, TokenFrame)
        received.extend(frame.token_ids)
    assert received == list(range(10_000))
    assert client._streams == {}  # the stream unregistered itself at its end
    await client.close()
    await server.close()


async def test_cancel_reaches_handler_within_100ms(nats_server: NatsServer, namespace: str) -> None:
    server = await NatsTransport.connect(nats_server.url)
    client = await NatsTransport.connect(nats_server.url)
    subject = f"dynrt.{namespace}.backend.generate.w1"
    cancelled: dict[str, float] = {}
    seen_mode: list[CancelMode] = []

    async def slow_handler(payload: bytes, ctx: RequestContext) -> AsyncIterator[Frame]:
        ctx.on_cancel = seen_mode.append
        try:
            for i in range(1000):
                yield TokenFrame(token_ids=[i])
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            cancelled[ctx.request_id] = time.monotonic()
            raise

    await server.serve(subject, slow_handler)
    stream = await client.call(subject, b"", request_id="r-cancel")
    for _ in range(5):
        await stream.__anext__()
    sent_at = time.monotonic()
    await stream.aclose()
    deadline = time.monotonic() + 1
    while "r-cancel" not in cancelled and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    assert "r-cancel" in cancelled
    assert cancelled["r-cancel"] - sent_at < 0.1
    assert seen_mode == ["kill"]
    assert server.endpoints[0].in_flight == {}
    await client.close()
    await server.close()


async def test_no_subscriber_raises_no_responders_at_once(nats_server: NatsServer, namespace: str) -> None:
    client = await NatsTransport.connect(nats_server.url)
    start = time.monotonic()
    stream = await client.call(f"dynrt.{namespace}.backend.generate.nobody", b"", request_id="r1")
    with pytest.raises(NoRespondersError):
        await stream.__anext__()
    assert time.monotonic() - start < 0.1
    with pytest.raises(NoRespondersError):
        await client.ping(f"dynrt.{namespace}.backend.generate.nobody", timeout=1.0)
    assert time.monotonic() - start < 0.2
    await client.close()


async def test_silent_stream_counts_as_stalled(nats_server: NatsServer, namespace: str) -> None:
    """A handler that hangs but whose process is alive still sends heartbeats; only
    a stream with no heartbeats either (hung process) is stalled."""
    server = await NatsTransport.connect(nats_server.url, heartbeat_interval=0.1)
    client = await NatsTransport.connect(nats_server.url)
    subject = f"dynrt.{namespace}.backend.generate.w1"

    async def hanging_handler(payload: bytes, ctx: RequestContext) -> AsyncIterator[Frame]:
        yield TokenFrame(token_ids=[1])
        await asyncio.sleep(0.6)
        yield TokenFrame(token_ids=[2], finish_reason="stop")

    endpoint = await server.serve(subject, hanging_handler)
    frames = [f async for f in await client.call(subject, b"", request_id="hb", stall_timeout=0.3)]
    assert [f.token_ids for f in frames if isinstance(f, TokenFrame)] == [[1], [2]]
    # Now silence the heartbeats (as SIGSTOP would): the caller must see a stall.
    assert endpoint._heartbeat_task is not None
    endpoint._heartbeat_task.cancel()
    stream = await client.call(subject, b"", request_id="stall", stall_timeout=0.3)
    await stream.__anext__()
    start = time.monotonic()
    with pytest.raises(StreamStalledError):
        await stream.__anext__()
    assert 0.25 < time.monotonic() - start < 0.6
    await client.close()
    await server.close()


async def test_nats_restart_breaks_stream_and_new_calls_work(private_nats: NatsServer, namespace: str) -> None:
    server = await NatsTransport.connect(private_nats.url)
    client = await NatsTransport.connect(private_nats.url)
    subject = f"dynrt.{namespace}.backend.generate.w1"

    async def endless(payload: bytes, ctx: RequestContext) -> AsyncIterator[Frame]:
        for i in range(int(payload)):
            yield TokenFrame(token_ids=[i])
            await asyncio.sleep(0.01)

    await server.serve(subject, endless)
    stream = await client.call(subject, b"100000", request_id="r1")
    for _ in range(3):
        await stream.__anext__()
    await asyncio.to_thread(private_nats.restart)
    start = time.monotonic()
    with pytest.raises(StreamBrokenError) as info:
        async for _ in stream:
            pass
    assert info.value.cause == "nats_disconnected"
    assert time.monotonic() - start < 3
    await asyncio.wait_for(client.connected.wait(), 5)
    await asyncio.wait_for(server.connected.wait(), 5)
    await asyncio.sleep(0.2)  # let the server's subscriptions be replayed
    frames = [f async for f in await client.call(subject, b"5", request_id="r2")]
    assert [f.token_ids[0] for f in frames if isinstance(f, TokenFrame)] == [0, 1, 2, 3, 4]
    await client.close()
    await server.close()


async def test_requests_in_flight_when_accepting_stops_are_answered_not_dropped(
        nats_server: NatsServer, namespace: str) -> None:
    """A worker stops accepting (SIGTERM) while requests are already on their way to it:
    each must be answered by the handler (a draining worker answers "busy") or refused
    with no-responders — never dropped in silence, which callers would only notice
    after a stall and count as a dead worker. The client runs in a thread of its own so
    that requests pile up in the server's socket while the server is busy, as they do
    in a worker handling SIGTERM."""
    server = await NatsTransport.connect(nats_server.url)
    subject = f"dynrt.{namespace}.backend.generate.w1"
    handled = 0
    endpoint = None
    stopping: list[asyncio.Task[None]] = []

    async def handler(payload: bytes, ctx: RequestContext) -> AsyncIterator[Frame]:
        nonlocal handled
        handled += 1
        if handled == 20:
            time.sleep(0.1)  # the server is busy; requests keep arriving
            assert endpoint is not None
            stopping.append(asyncio.create_task(endpoint.stop_accepting()))
        yield TokenFrame(token_ids=[1], finish_reason="stop")

    endpoint = await server.serve(subject, handler)

    async def outcome(stream: object) -> str:
        try:
            frames = [f async for f in stream]  # type: ignore[attr-defined]
            return "answered" if frames else "empty"
        except NoRespondersError:
            return "no_responders"
        except StreamStalledError:
            return "stalled"

    async def client_side() -> list[str]:
        client = await NatsTransport.connect(nats_server.url)
        streams = []
        for i in range(300):  # a steady stream of requests, some in transit at any moment
            streams.append(await client.call(subject, b"", request_id=f"r{i}", stall_timeout=1.0))
            await asyncio.sleep(0.001)
        outcomes = await asyncio.gather(*(outcome(s) for s in streams))
        await client.close()
        return list(outcomes)

    outcomes = await asyncio.to_thread(asyncio.run, client_side())
    await asyncio.gather(*stopping)
    assert stopping, "the endpoint never stopped accepting"
    counts = {o: outcomes.count(o) for o in set(outcomes)}
    assert set(outcomes) <= {"answered", "no_responders"}, counts
    assert counts.get("answered") == handled > 20, (counts, handled)
    await server.close()
