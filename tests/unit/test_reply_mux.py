"""The reply mux's parser reads what nats-py's parser reads: the same messages, in the
same order, reply frames delivered directly, whatever the reads' boundaries."""

from __future__ import annotations

import random
from typing import Any

from nats.protocol.parser import Parser

from dynrt.runtime.reply_mux import ReplyMuxClient, _ReplyParser

PREFIX = b"_INBOX.abc123."


class FakeClient:
    """What the parsers call on a client; reply frames as ``ReplyMuxClient`` routes them."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.reply_prefix = PREFIX
        self._subs = {1: object(), 2: object()}
        self.stats = {"in_msgs": 0, "in_bytes": 0}

    def deliver_reply(self, subject: bytes, data: bytes, headers: bytes | None) -> None:
        self.events.append(("reply", subject, data, headers))

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        if subject.startswith(self.reply_prefix) and sid in self._subs:
            self.events.append(("reply", subject, data, headers))
        else:
            self.events.append(("msg", sid, subject, reply, data, headers))

    async def _process_ping(self) -> None:
        self.events.append(("ping",))

    async def _process_pong(self) -> None:
        self.events.append(("pong",))

    async def _process_info(self, info: dict[str, Any]) -> None:
        self.events.append(("info", info))

    async def _process_err(self, message: str) -> None:
        self.events.append(("err", message))


def wire(rng: random.Random, count: int) -> bytes:
    out = []
    for i in range(count):
        payload = bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))  # may hold \r\n and "MSG "
        kind = rng.randrange(8)
        if kind <= 3:
            out.append(b"MSG %s%d 1 %d\r\n%s\r\n" % (PREFIX, i, len(payload), payload))
        elif kind == 4:
            out.append(b"MSG load.reports 7 reply.to.%d %d\r\n%s\r\n" % (i, len(payload), payload))
        elif kind == 5:
            out.append(b"MSG %s%d 9 %d\r\n%s\r\n" % (PREFIX, i, len(payload), payload))  # unknown sid
        elif kind == 6:
            headers = b"NATS/1.0 503\r\n\r\n"
            out.append(b"HMSG %s%d 1 %d %d\r\n%s\r\n" % (PREFIX, i, len(headers), len(headers), headers))
        else:
            out.append(rng.choice([b"PING\r\n", b"PONG\r\n", b"+OK\r\n", b'INFO {"max_payload":1048576}\r\n']))
    return b"".join(out)


async def read(parser_type: type[Parser], data: bytes, cuts: list[int]) -> FakeClient:
    client = FakeClient()
    parser = parser_type(client)
    last = 0
    for cut in [*cuts, len(data)]:
        await parser.parse(data[last:cut])
        last = cut
    return client


async def test_same_messages_as_nats_py_whatever_the_reads() -> None:
    rng = random.Random(3)
    for _ in range(200):
        data = wire(rng, rng.randint(1, 30))
        expected = (await read(Parser, data, [])).events
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 8))))
        fast = await read(_ReplyParser, data, cuts)
        assert fast.events == expected


async def test_every_cut_position() -> None:
    data = wire(random.Random(5), 12)
    expected = (await read(Parser, data, [])).events
    for cut in range(1, len(data)):
        assert (await read(_ReplyParser, data, [cut])).events == expected


async def test_whole_reply_frames_are_counted_and_delivered_directly() -> None:
    data = b"".join(b"MSG %s%d 1 3\r\nabc\r\n" % (PREFIX, i) for i in range(5))
    client = await read(_ReplyParser, data, [])
    assert [e[:2] for e in client.events] == [("reply", PREFIX + str(i).encode()) for i in range(5)]
    assert client.stats == {"in_msgs": 5, "in_bytes": 15}


def test_the_client_uses_the_fast_parser() -> None:
    assert isinstance(ReplyMuxClient()._ps, _ReplyParser)
