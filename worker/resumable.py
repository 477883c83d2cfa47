"""A worker's resumable requests (issue 18): detach, grace timers, reattach, retention.

- ``open``: a request with ``resume_grace > 0`` gets a ``RetainedOutput`` its handler
  fills right before each yield.
- ``detach`` (a ``Cancel(detach)``, or its frontend's etcd key vanished): it keeps
  generating; a timer of ``resume_grace`` s starts; on expiry the request is killed
  (its KV freed) and its output dropped.
- ``done`` (the handler ended): a finished request's output is kept for a late reattach
  (``retention_after_finish``); any other end drops it.
- ``reattach``: what to send a frontend resuming from token ``M`` (the endpoint does
  the switch): a running request's replay, then its live rest; a finished one's rest
  with its finish reason (and the output is dropped); or ``not_found``.
- ``frontend_gone``: outputs that finished while that frontend read them are kept for
  their full grace (its client may not have got the end).
- ``close``: drop everything (shutdown).

The bookkeeping is ``worker/retained_output.py``; this module adds timers, logs, gauges.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from dynrt.runtime import metrics
from dynrt.runtime.log import get_logger
from dynrt.runtime.protocol import ErrorFrame, Frame, GenerateRequest
from dynrt.runtime.transport import RequestContext
from dynrt.worker.retained_output import RetainedOutput, RetainedOutputs, retention_after_finish

log = get_logger("worker")

DETACHED = metrics.gauge("dynrt_worker_detached_requests",
                         "resumable requests still generating whose caller left (waiting for a reattach)")
RETAINED = metrics.gauge("dynrt_worker_retained_outputs",
                         "finished resumable requests whose output is kept for a reattach")


class ResumableRequests:
    def __init__(self, kill: Callable[[str], None]) -> None:
        """``kill(request_id)``: abort a running request now (the endpoint's kill)."""
        self._kill = kill
        self.outputs = RetainedOutputs()
        self._timers: dict[str, asyncio.TimerHandle] = {}

    # -- the handler's side ---------------------------------------------------------
    def open(self, request: GenerateRequest) -> RetainedOutput | None:
        """The record a resumable request's handler fills; None if it is not resumable."""
        if request.resume_grace <= 0:
            return None
        # A finished output under the same id: its frontend started the request over.
        # (A running one cannot be here: the endpoint refuses an id already in flight.)
        self._drop(request.request_id)
        prior = request.num_prior_output_tokens
        return self.outputs.open(request.request_id, request.resume_grace, request.frontend_id,
                                 request.token_ids[len(request.token_ids) - prior:] if prior else [])

    def done(self, entry: RetainedOutput) -> None:
        """The handler ended: keep a finished output for a while, drop any other."""
        if self.outputs.get(entry.request_id) is not entry:
            return  # already reattached after finishing, expired, or dropped
        if not entry.finished:
            self._drop(entry.request_id)
            return
        self._start_timer(entry.request_id, retention_after_finish(entry.resume_grace, entry.detached))
        self._update_gauges()

    # -- detach ---------------------------------------------------------------------
    def detach(self, request_id: str) -> None:
        entry = self.outputs.get(request_id)
        if entry is None or entry.finished or entry.detached:
            return
        entry.detached = True
        self._start_timer(request_id, entry.resume_grace)
        self._update_gauges()
        log.info("request_detached", request_id=request_id, grace=entry.resume_grace,
                 tokens=len(entry.token_ids))

    def frontend_gone(self, frontend_id: str) -> None:
        """Outputs that finished while that frontend read them: it may have died before
        its client got the end, so they are kept for their full grace from now on."""
        for entry in self.outputs.finished_read_by(frontend_id):
            entry.detached = True
            self._start_timer(entry.request_id, entry.resume_grace)
            log.info("finished_output_kept", request_id=entry.request_id, frontend_id=frontend_id,
                     grace=entry.resume_grace)

    def is_resumable(self, request_id: str) -> bool:
        return self.outputs.get(request_id) is not None

    # -- reattach -------------------------------------------------------------------
    def reattach(self, request_id: str, start: int, ctx: RequestContext | None,
                 frontend_id: str = "") -> tuple[Frame, bool]:
        """The first frame for a frontend resuming from token ``start``, and whether the
        stream then continues live to it. Synchronous: the endpoint switches the stream
        right after, before the handler runs again."""
        entry = self.outputs.get(request_id)
        if entry is None or (ctx is None and not entry.finished):
            return _not_found(f"no resumable request {request_id!r} here (unknown, not resumable, expired, "
                              f"or handed off)"), False
        if not entry.can_replay_from(start):
            return _not_found(f"request {request_id!r} has {len(entry.token_ids)} output tokens here, "
                              f"fewer than the {start} the caller has"), False
        replay = entry.replay(start)
        self._cancel_timer(request_id)
        if entry.finished:
            self.outputs.drop(request_id)
        was_detached, entry.detached = entry.detached, False
        entry.frontend_id = frontend_id
        self._update_gauges()
        log.info("request_reattached", request_id=request_id, start=start, replayed=len(replay.token_ids),
                 finished=entry.finished, was_detached=was_detached)
        return replay, not entry.finished

    # -- timers -----------------------------------------------------------------------
    def _start_timer(self, request_id: str, seconds: float) -> None:
        self._cancel_timer(request_id)
        self._timers[request_id] = asyncio.get_running_loop().call_later(seconds, self._expire, request_id)

    def _cancel_timer(self, request_id: str) -> None:
        timer = self._timers.pop(request_id, None)
        if timer is not None:
            timer.cancel()

    def _expire(self, request_id: str) -> None:
        self._timers.pop(request_id, None)
        entry = self.outputs.drop(request_id)
        if entry is None:
            return
        self._update_gauges()
        log.info("detached_expired", request_id=request_id, finished=entry.finished, tokens=len(entry.token_ids))
        if not entry.finished:
            # Dropped first: a reattach arriving before the kill lands gets not_found.
            self._kill(request_id)

    def _drop(self, request_id: str) -> None:
        self._cancel_timer(request_id)
        if self.outputs.drop(request_id) is not None:
            self._update_gauges()

    def _update_gauges(self) -> None:
        DETACHED.set(self.outputs.detached_running())
        RETAINED.set(self.outputs.finished())

    def close(self) -> None:
        """Drop everything (shutdown: running requests are killed by the endpoint)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        dropped = self.outputs.clear()
        self._update_gauges()
        if dropped:
            log.info("retained_outputs_dropped", count=len(dropped))


def _not_found(message: str) -> ErrorFrame:
    return ErrorFrame(code="not_found", message=message)
