"""nats-py's client with a fast way in for reply frames (the transport's reply mux).

A frontend receives one NATS message per token frame, and for each nats-py does a lot of
general work: its parser matches the control line with regular expressions on a
bytearray it deletes from the front, copies the payload twice, and awaits a coroutine
per message; for a subscription with a callback it then builds a ``Msg``, parses the
headers and hands it through an ``asyncio.Queue`` to the subscription's own task. Reply
frames need none of that — only the subject's last token (which stream) and the payload.

:class:`ReplyMuxClient` takes them straight from the read loop: its parser reads the
plain ``MSG`` lines of a buffer with ``find``/``split`` and hands each reply frame to
``deliver_reply`` synchronously; anything else — other subjects, ``HMSG`` (headers:
a no-responders status), ``PING``/``INFO``/``-ERR``, a message cut at the end of the
buffer — goes to nats-py's own parser and dispatch, unchanged. Hand-written because
nats-py offers no hook below its parser; it is the wire format of ``MSG`` only
(https://docs.nats.io/reference/reference-protocols/nats-protocol#msg), and the
generic parser stays the fallback for all the rest.
"""

from __future__ import annotations

from collections.abc import Callable

from nats.aio.client import Client as NatsClient
from nats.protocol.parser import AWAITING_CONTROL_LINE, Parser

_MSG = b"MSG "
_CRLF = b"\r\n"


class ReplyMuxClient(NatsClient):
    """nats-py's client; messages on subjects starting with ``reply_prefix`` go to
    ``deliver_reply(subject, payload, headers)`` from the read loop, once it is set."""

    reply_prefix: bytes = b"\0"  # matches no subject until the mux is started
    deliver_reply: Callable[[bytes, bytes, bytes | None], None] | None = None

    def __init__(self) -> None:
        super().__init__()
        self._ps = _ReplyParser(self)

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                           headers: bytes | None) -> None:
        """nats-py's dispatch (its parser's way: HMSG, split buffers)."""
        deliver = self.deliver_reply
        if deliver is not None and subject.startswith(self.reply_prefix) and sid in self._subs:
            stats = self.stats
            stats["in_msgs"] += 1
            stats["in_bytes"] += len(data)
            deliver(subject, data, headers)
            return
        await super()._process_msg(sid, subject, reply, data, headers)  # type: ignore[arg-type]


class _ReplyParser(Parser):
    """nats-py's parser with a fast path for whole ``MSG``s at the start of a read."""

    nc: ReplyMuxClient

    async def parse(self, data: bytes = b"") -> None:
        if self.buf or self.state != AWAITING_CONTROL_LINE:  # in the middle of something: nats-py's way
            await super().parse(data)
            return
        nc = self.nc
        deliver, prefix, subs, stats = nc.deliver_reply, nc.reply_prefix, nc._subs, nc.stats
        pos, end = 0, len(data)
        while pos < end and data.startswith(_MSG, pos):
            eol = data.find(_CRLF, pos)
            if eol < 0:
                break
            args = data[pos + 4:eol].split()  # subject sid [reply-to] size
            if len(args) == 3:
                subject, sid_text, size_text = args
                reply = b""
            elif len(args) == 4:
                subject, sid_text, reply, size_text = args
            else:
                break  # malformed: nats-py's parser reports it
            start = eol + 2
            stop = start + int(size_text)
            if stop + 2 > end:
                break  # the payload is not all here yet
            payload = data[start:stop]
            pos = stop + 2
            sid = int(sid_text)
            if deliver is not None and subject.startswith(prefix) and sid in subs:
                stats["in_msgs"] += 1
                stats["in_bytes"] += stop - start
                deliver(subject, payload, None)
            else:
                await nc._process_msg(sid, subject, reply, payload, None)  # type: ignore[arg-type]
        if pos < end:
            await super().parse(data[pos:] if pos else data)
