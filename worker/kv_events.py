"""The KV events an engine has emitted and its one consumer has not taken yet.

Both engines keep their events here: the mock emits them from its KV cache, the vLLM
engine from its translation of vLLM's events. Each event gets the next per-engine id
(1, 2, 3, ...), so a consumer that sees a gap knows it lost events and resyncs with
``Engine.dump_cached_blocks()``.

Emitting and waking the consumer are separate steps: an engine appends the events of a
whole step, then calls :meth:`KvEventLog.notify` once, so the consumer takes them as one
batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from dynrt.runtime.protocol import KvEvent, KvEventData

# Events no consumer has taken yet are capped so an engine whose events nobody reads
# does not grow without bound; the oldest half is dropped and the gap in event ids tells
# a late consumer to resync.
MAX_PENDING_EVENTS = 1 << 16


class KvEventLog:
    """Pending KV events with contiguous ids, and the async iterator that drains them."""

    def __init__(self, max_pending: int = MAX_PENDING_EVENTS) -> None:
        if max_pending < 2:
            raise ValueError("max_pending must be >= 2")
        self.max_pending = max_pending
        self.last_event_id = 0
        self.pending: list[KvEvent] = []
        self.closed = False
        self._waiter: asyncio.Future[None] | None = None

    def append(self, data: KvEventData) -> None:
        """Give ``data`` the next event id and keep it for the consumer (who is not
        woken: see :meth:`notify`)."""
        self.last_event_id += 1
        self.pending.append(KvEvent(event_id=self.last_event_id, data=data))
        if len(self.pending) > self.max_pending:
            del self.pending[: self.max_pending // 2]

    def notify(self) -> None:
        """Wake the consumer if there is something to take or the log is closed."""
        waiter = self._waiter
        if waiter is not None and not waiter.done() and (self.pending or self.closed):
            waiter.set_result(None)

    def close(self) -> None:
        """No more events: the iterator ends once the pending ones are taken."""
        self.closed = True
        self.notify()

    async def batches(self) -> AsyncIterator[list[KvEvent]]:
        """Everything pending, as one list per wake-up, until the log is closed and
        drained. Only one consumer."""
        loop = asyncio.get_running_loop()
        while True:
            while not self.pending:
                if self.closed:
                    return
                self._waiter = loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
            batch, self.pending = self.pending, []
            yield batch
