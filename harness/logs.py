"""What the components' log lines say: ``key=value`` fields (or a JSON line's), and the
frontends' ``migrating`` events."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime


def log_fields(line: str) -> dict[str, str]:
    """key=value pairs of a log line (or the fields of a JSON log line)."""
    line = line.strip()
    if line.startswith("{"):
        try:
            return {k: str(v) for k, v in json.loads(line).items()}
        except ValueError:
            return {}
    return dict(part.split("=", 1) for part in line.split() if "=" in part)


@dataclass(frozen=True)
class MigrationEvent:
    """One ``migrating`` line of a frontend's log: a request moved off an instance."""

    ts: float  # epoch seconds (NaN if the line has no readable ts)
    request_id: str
    cause: str
    from_instance: str


def migration_events(log_text: str) -> list[MigrationEvent]:
    """Every ``migrating`` event in a frontend's log (text or JSON lines), in order."""
    events = []
    for line in log_text.splitlines():
        if "event=migrating" not in line and '"event": "migrating"' not in line:
            continue
        fields = log_fields(line)
        try:
            ts = datetime.fromisoformat(fields["ts"].replace("Z", "+00:00")).timestamp()
        except (KeyError, ValueError):
            ts = math.nan
        events.append(MigrationEvent(ts=ts, request_id=fields.get("request_id", "?"), cause=fields.get("cause", "?"),
                                     from_instance=fields.get("from_instance", "?")))
    return events
