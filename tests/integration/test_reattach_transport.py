"""Reattaching a stream at the transport level, against a real nats-server: a fast
handler that records each frame right before yielding it (as the worker does) is taken
over again and again while it streams; every takeover's replay is exactly what the
previous caller received after the resume point, so nothing is lost or sent twice."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from dynrt.runtime.embedded import NatsServer
from dynrt.runtime.protocol import EndFrame, ErrorFrame, Frame, MigrateFrame, TokenFrame, frame_decoder
from dynrt.runtime.transport import (
    FRONTEND_ID_HEADER,
    REATTACH_FROM_HEADER,
    REQUEST_ID_HEADER,
    NatsTransport,
    RequestContext,
    ResponseStream,
)

FRAMES = 6000


class RecordingService:
    """A handler yielding ``TokenFrame([i])`` for i < FRAMES, recording each before the
    yield, and the reattach hook replaying from that record."""

    def __init__(self) -> None:
        self.sent: dict[str, list[int]] = {}

    async def handler(self, payload: bytes, ctx: RequestContext) -> AsyncIterator[Frame]:
        ctx.resumable = True
        ctx.on_cancel = lambda mode: None
        sent = self.sent.setdefault(ctx.request_id, [])
        for i in range(FRAMES):
            sent.append(i)
            yield TokenFrame(token_ids=[i])
            await asyncio.sleep(0)  # let reattaches in between any two frames
        yield TokenFrame(token_ids=[], finish_reason="length")

    def reattach(self, request_id: str, start: int, ctx: RequestContext | None,
                 frontend_id: str) -> tuple[Frame, bool]:
        sent = self.sent.get(request_id)
        if sent is None or ctx is None or start > len(sent):
            return ErrorFrame(code="not_found", message="gone"), False
        return TokenFrame(token_ids=sent[start:]), True


async def read_until(stream: ResponseStream, tokens: list[int], count: int) -> None:
    while len(tokens) < count:
        frame = await stream.next(5.0)
        assert isinstance(frame, TokenFrame), frame
        tokens += frame.token_ids


async def rest_of_taken_over(stream: ResponseStream) -> list[int]:
    """What the old caller still receives: token frames, then the cancelled error, then the end."""
    extra: list[int] = []
    while True:
        frame = await stream.next(5.0)
        if isinstance(frame, ErrorFrame):
            assert (frame.code, frame.message) == ("cancelled", "stream resumed elsewhere")
            break
        assert isinstance(frame, TokenFrame) and frame.finish_reason is None, frame
        extra += frame.token_ids
    try:
        await stream.next(5.0)
    except EOFError:
        return extra
    raise AssertionError("a frame after the cancelled error")


async def test_repeated_takeovers_lose_and_duplicate_nothing(nats_server: NatsServer, namespace: str) -> None:
    service = RecordingService()
    server = await NatsTransport.connect(nats_server.url)
    client = await NatsTransport.connect(nats_server.url)
    subject = f"dynrt.{namespace}.backend.generate.w1"
    await server.serve(subject, service.handler, reattach=service.reattach)
    try:
        stream = await client.call(subject, b"", request_id="r1")
        tokens: list[int] = []
        takeovers = 0
        while len(tokens) < FRAMES - 1000:
            await read_until(stream, tokens, len(tokens) + 97)
            start = len(tokens) - 13  # the client lost the last few
            del tokens[start:]
            new = await client.call(subject, b"", request_id="r1", reattach_from=start)
            extra = await rest_of_taken_over(stream)
            replay = await new.next(5.0)
            assert isinstance(replay, TokenFrame)
            # The old caller had 13 more than ``start``, then whatever came before the switch.
            assert replay.token_ids == list(range(start, start + 13)) + extra
            tokens += replay.token_ids
            stream = new
            takeovers += 1
        async for frame in stream:
            assert isinstance(frame, TokenFrame)
            tokens += frame.token_ids
        assert takeovers >= 20  # each moves on ~100 tokens, more when the old caller got more first
        assert tokens == list(range(FRAMES))
        assert client._streams == {}
    finally:
        await client.close()
        await server.close()


async def test_reattach_to_unknown_request_is_not_found_and_bad_start_is_a_bad_request(
        nats_server: NatsServer, namespace: str) -> None:
    service = RecordingService()
    server = await NatsTransport.connect(nats_server.url)
    client = await NatsTransport.connect(nats_server.url)
    subject = f"dynrt.{namespace}.backend.generate.w2"
    await server.serve(subject, service.handler, reattach=service.reattach)
    try:
        frames = [f async for f in await client.call(subject, b"", request_id="nope", reattach_from=0)]
        assert len(frames) == 1 and isinstance(frames[0], ErrorFrame) and frames[0].code == "not_found"
        frames = [f async for f in await client.call(subject, b"", request_id="nope", reattach_from=-1)]
        assert len(frames) == 1 and isinstance(frames[0], ErrorFrame) and frames[0].code == "bad_request"
        # A reattach sent to the request subject itself is served the same way.
        reply = client.nc.new_inbox()
        sub = await client.nc.subscribe(reply)
        await client.nc.publish(subject, b"", reply=reply,
                                headers={REQUEST_ID_HEADER: "nope", REATTACH_FROM_HEADER: "0",
                                         FRONTEND_ID_HEADER: "fe-x"})
        first = await sub.next_msg(5.0)
        second = await sub.next_msg(5.0)
        assert isinstance(frame_decoder.decode(first.data), ErrorFrame)
        assert isinstance(frame_decoder.decode(second.data), EndFrame)
        await sub.unsubscribe()
        # Nothing was started by those messages.
        assert service.sent == {}
    finally:
        await client.close()
        await server.close()


async def test_after_a_drain_hand_off_the_stream_is_gone(nats_server: NatsServer, namespace: str) -> None:
    """``send_to_all(MigrateFrame)`` (a draining worker's hand-off) ends every stream: a
    reattach right after finds nothing, even before the handler's task has unwound."""
    service = RecordingService()
    server = await NatsTransport.connect(nats_server.url)
    client = await NatsTransport.connect(nats_server.url)
    subject = f"dynrt.{namespace}.backend.generate.w3"
    endpoint = await server.serve(subject, service.handler, reattach=service.reattach)
    try:
        stream = await client.call(subject, b"", request_id="r3")
        tokens: list[int] = []
        await read_until(stream, tokens, 10)
        await endpoint.stop_accepting()
        await endpoint.send_to_all(MigrateFrame(reason="drain"))
        frames = [f async for f in stream]
        assert isinstance(frames[-1], MigrateFrame)
        frames = [f async for f in await client.call(subject, b"", request_id="r3", reattach_from=len(tokens))]
        assert len(frames) == 1 and isinstance(frames[0], ErrorFrame) and frames[0].code == "not_found"
    finally:
        await client.close()
        await server.close()
