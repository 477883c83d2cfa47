"""SSE event ids of resumable streams (issue 18): what an id says, and how a resuming
frontend finds where its client stopped. Pure: no I/O.

Why positions and not a running count of events. A resuming frontend gets the output
token ids from the worker (or the JetStream checkpoint) in batches of its own, not the
ones the first frontend turned into events, so it cannot recount events. What it can
reproduce is the text pipeline's output at a token position: the detokenizer, the
stop-string hold-back, the chat output rules and the logprob rendering emit, after the
first ``n`` tokens, the same text whatever batches those ``n`` arrived in. So an id
names the *delta* an event came from by its token positions, and the event's place
among that delta's events:

    id: <request_id>.<end>.<count>.<index>.<final>

``end``: output tokens consumed once the delta was read; ``count``: the delta's tokens
(it covered ``[end - count, end)``); ``index``: the event's place among the delta's
events (from 0); ``final``: 1 on the last delta (its events end with the finish, usage
and ``[DONE]`` events), else 0. The opening events (chat role, completions echo) are the
delta ``(0, 0, *, 0)``.

A resuming frontend feeds ``[0, end - count)`` through the pipeline sending nothing,
feeds ``[end - count, end)`` as one delta (final if it was) and sends its events after
``index``, then everything after: the client sees each event once, and the concatenated
answer equals the uninterrupted one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dynrt.runtime.checkpoint_log import is_request_id

__all__ = ["EventPosition", "OPENING", "parse_event_id", "tag_events"]

_NUMBER = re.compile(r"[0-9]{1,9}")
_EVENT_END = b"\n\n"


@dataclass(frozen=True, slots=True)
class EventPosition:
    """Where an event stands in its stream (see the module docstring)."""

    end: int
    count: int
    index: int
    final: bool

    @property
    def start(self) -> int:
        return self.end - self.count

    @property
    def opening(self) -> bool:
        return self.end == 0 and self.count == 0 and not self.final

    def id(self, request_id: str) -> str:
        return f"{request_id}.{self.end}.{self.count}.{self.index}.{int(self.final)}"


OPENING = EventPosition(0, 0, 0, False)


def parse_event_id(value: str) -> tuple[str, EventPosition]:
    """``(request_id, position)`` of a ``Last-Event-ID``; ValueError if it is not an id
    this server gave."""
    parts = value.strip().split(".")
    if len(parts) != 5 or not is_request_id(parts[0]) or not all(_NUMBER.fullmatch(p) for p in parts[1:]):
        raise ValueError(f"not an event id of a dynrt stream: {value[:100]!r}")
    end, count, index, final = (int(p) for p in parts[1:])
    if count > end or final > 1:
        raise ValueError(f"not an event id of a dynrt stream: {value[:100]!r}")
    return parts[0], EventPosition(end, count, index, bool(final))


def split_events(data: bytes) -> list[bytes]:
    """The SSE events in ``data`` (each ends with a blank line; the JSON in a ``data:``
    line never holds a raw newline), each with its terminator."""
    events = data.split(_EVENT_END)
    return [event + _EVENT_END for event in events[:-1]]


def tag_events(events: list[bytes], request_id: str, end: int, count: int, final: bool, skip: int = 0) -> bytes:
    """The events of one delta with their ``id:`` lines, leaving out the first ``skip``
    (the ones a resuming client has already)."""
    prefix = f"id: {request_id}.{end}.{count}.".encode()
    suffix = b".1\n" if final else b".0\n"
    return b"".join([prefix + str(i).encode() + suffix + event for i, event in enumerate(events) if i >= skip])
