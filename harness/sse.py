"""Reading an OpenAI streaming (server-sent events) response."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp


class SseStream:
    """The JSON payloads of one OpenAI streaming (SSE) response, in order, up to
    ``data: [DONE]``. ``done`` says whether ``[DONE]`` arrived: a stream cut short just
    ends the iteration without it."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.done = False
        self.last_event_id: str | None = None  # of the last event read (resumable streams)

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        event_id = None
        async for raw in self.response.content:
            line = raw.strip()
            if line.startswith(b"id: "):
                event_id = line[4:].decode()
                continue
            if not line.startswith(b"data: "):
                continue
            if event_id is not None:  # the event's id: it is read once its data is
                self.last_event_id, event_id = event_id, None
            data = line[6:]
            if data == b"[DONE]":
                self.done = True
                return
            yield json.loads(data)
