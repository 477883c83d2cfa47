"""What a worker keeps of a resumable request's output (issue 18), and the rules for
how long: pure bookkeeping, no I/O, no clock (``worker/resumable.py`` drives it).

A resumable request (``GenerateRequest.resume_grace > 0``) records every ``TokenFrame``
its handler yields, immediately before the yield, so at any other coroutine's turn the
record holds exactly the tokens handed to the connection. A frontend that reattaches
from token ``M`` (it has the first ``M`` of the request's whole output) gets
``replay(M)``: the ids from ``M`` on, with their logprobs, and the finish reason and
usage if the request has finished. Positions count the whole output: a request that
migrated here arrived with output already (``prior_ids``: the ids this worker was sent
after the prompt), and a frontend resuming from its checkpoint may have fewer of them
than the frontend that migrated it — those it gets from ``prior_ids`` (without
logprobs: a request asking for them cannot be replayed from before this worker's part).

States of one request: *running* (attached to a caller, or *detached*: its caller left
and a grace timer runs) → *finished* (output kept for a while so a late reattach still
gets the end) → dropped (reattached after finishing, expired, killed, or handed off).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dynrt.runtime.protocol import FinishReason, TokenFrame, TokenLogprobs, Usage

# How long a request that finished while a caller was attached keeps its output: its
# frontend may have died right after the last frame, before the client got it, and the
# worker would learn of that only when the frontend's lease expires.
ATTACHED_FINISH_RETENTION = 10.0


def retention_after_finish(resume_grace: float, detached: bool) -> float:
    """Seconds a finished request's output is kept for a reattach: the full grace if
    nobody was reading when it finished, else at most ``ATTACHED_FINISH_RETENTION``."""
    return resume_grace if detached else min(resume_grace, ATTACHED_FINISH_RETENTION)


@dataclass(slots=True)
class RetainedOutput:
    """One resumable request's output so far and its state."""

    request_id: str
    resume_grace: float
    frontend_id: str = ""  # the frontend reading it (last)
    prior_ids: list[int] = field(default_factory=list)  # output it arrived with (a migrated request)
    token_ids: list[int] = field(default_factory=list)  # output generated here
    logprobs: list[TokenLogprobs] | None = None  # kept when the request asked for them
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    detached: bool = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, frame: TokenFrame) -> None:
        """Record a frame about to be yielded (the final one sets finish and usage)."""
        if self.finished:
            raise ValueError(f"request {self.request_id!r}: a token frame after the final one")
        self.token_ids += frame.token_ids
        if frame.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs += frame.logprobs
        if frame.finish_reason is not None:
            self.finish_reason = frame.finish_reason
            self.usage = frame.usage

    def can_replay_from(self, start: int) -> bool:
        prior = len(self.prior_ids)
        lowest = prior if self.logprobs is not None else 0  # no logprobs for the prior ids
        return lowest <= start <= prior + len(self.token_ids)

    def replay(self, start: int) -> TokenFrame:
        """Everything from token ``start`` on, as one frame (empty if the caller has it
        all and the request still runs). ``start`` must pass ``can_replay_from``."""
        if not self.can_replay_from(start):
            raise ValueError(f"request {self.request_id!r}: cannot replay from {start}, "
                             f"{len(self.prior_ids)} + {len(self.token_ids)} tokens retained")
        prior = len(self.prior_ids)
        local = start - prior
        ids = self.token_ids[local:] if local >= 0 else self.prior_ids[start:] + self.token_ids
        return TokenFrame(token_ids=ids, finish_reason=self.finish_reason, usage=self.usage,
                          logprobs=None if self.logprobs is None else self.logprobs[local:])


class RetainedOutputs:
    """Every resumable request of a worker, running or finished, by request id."""

    def __init__(self) -> None:
        self._entries: dict[str, RetainedOutput] = {}

    def open(self, request_id: str, resume_grace: float, frontend_id: str = "",
             prior_ids: list[int] | None = None) -> RetainedOutput:
        if request_id in self._entries:
            raise ValueError(f"request {request_id!r} already has retained output")
        entry = self._entries[request_id] = RetainedOutput(request_id, resume_grace, frontend_id,
                                                           list(prior_ids or ()))
        return entry

    def get(self, request_id: str) -> RetainedOutput | None:
        return self._entries.get(request_id)

    def drop(self, request_id: str) -> RetainedOutput | None:
        return self._entries.pop(request_id, None)

    def clear(self) -> list[str]:
        """Drop everything; the ids dropped."""
        ids = list(self._entries)
        self._entries.clear()
        return ids

    def __len__(self) -> int:
        return len(self._entries)

    def finished_read_by(self, frontend_id: str) -> list[RetainedOutput]:
        """Finished outputs whose last reader was ``frontend_id`` (still attached when they finished)."""
        return [e for e in self._entries.values() if e.finished and not e.detached and e.frontend_id == frontend_id]

    def detached_running(self) -> int:
        return sum(1 for e in self._entries.values() if e.detached and not e.finished)

    def finished(self) -> int:
        return sum(1 for e in self._entries.values() if e.finished)
