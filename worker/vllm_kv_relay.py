"""vLLM's KV events, received from its ZMQ publisher and relayed into the engine's
:class:`~dynrt.worker.kv_events.KvEventLog` in dynrt's format.

vLLM publishes on an endpoint per worker (a fresh ``ipc://`` path unless one is given);
the relay subscribes before vLLM binds, so no early event is missed. Each message is
``[topic,] sequence number, msgpack batch``: a jump in sequence numbers counts as lost
batches, and :class:`~dynrt.worker.vllm_kv_events.KvEventTranslator` turns the batch's
events into dynrt's (dynrt hashes, contiguous ids).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from typing import Any

import msgspec

from dynrt.runtime import metrics
from dynrt.runtime.log import get_logger
from dynrt.worker.kv_events import KvEventLog
from dynrt.worker.vllm_kv_events import KvEventTranslator

log = get_logger("vllm_engine")

KV_EVENTS_LOST = metrics.counter("dynrt_vllm_kv_events_lost_total",
                                 "vLLM KV event batches missed (sequence gaps) or untranslatable")


class VllmKvEventRelay:
    """Subscribes to vLLM's KV event publisher and feeds the translated events to
    ``log``, waking its consumer once per message."""

    def __init__(self, events: KvEventLog, endpoint: str = "") -> None:
        self.endpoint = endpoint
        self.translator = KvEventTranslator(events)
        self._events = events
        self._decoder = msgspec.msgpack.Decoder()
        self._last_seq: int | None = None
        self._dir: str | None = None
        self._ctx: Any = None
        self._socket: Any = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        """Pick the endpoint (a fresh ``ipc://`` path if none was given), connect and
        start relaying. Call before vLLM starts publishing."""
        import zmq
        import zmq.asyncio

        if not self.endpoint:
            self._dir = tempfile.mkdtemp(prefix="dynrt-vllm-")
            self.endpoint = f"ipc://{self._dir}/kv-events.sock"
        self._ctx = zmq.asyncio.Context()
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)  # before vLLM binds: no early event is missed
        self._socket = sock
        self._task = asyncio.get_running_loop().create_task(self._relay(), name="vllm-kv-events")

    @property
    def stopped(self) -> bool:
        """The relay task has ended (it should run until ``close``)."""
        return self._task is not None and self._task.done()

    def on_message(self, parts: list[bytes]) -> None:
        """One ZMQ message from vLLM's publisher: check its sequence number, translate
        its events, wake the consumer. A message that cannot be read counts as lost."""
        try:
            if len(parts) >= 3:
                seq = int.from_bytes(parts[-2], "big")
                if self._last_seq is not None and seq != self._last_seq + 1:
                    missed = seq - self._last_seq - 1
                    KV_EVENTS_LOST.inc(max(missed, 1))
                    log.warning("vllm_kv_events_gap", expected=self._last_seq + 1, got=seq)
                self._last_seq = seq
            batch = self._decoder.decode(parts[-1])
            events = batch[1] if isinstance(batch, (list, tuple)) else batch.get("events", [])
            translator = self.translator
            before = translator.untranslatable
            for event in events:
                translator.apply(event)
            if translator.untranslatable != before:
                KV_EVENTS_LOST.inc(translator.untranslatable - before)
                log.warning("vllm_kv_events_untranslatable", count=translator.untranslatable - before)
        except Exception as exc:
            KV_EVENTS_LOST.inc()
            log.warning("vllm_kv_events_decode_failed", error=f"{type(exc).__name__}: {exc}")
        self._events.notify()

    async def _relay(self) -> None:
        sock = self._socket
        while True:
            try:
                parts = await sock.recv_multipart()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closed:
                    return
                log.warning("vllm_kv_events_recv_failed", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.1)
                continue
            self.on_message(parts)

    async def close(self) -> None:
        """Stop relaying, close the socket, remove the ``ipc://`` folder it made."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
