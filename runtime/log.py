"""Structured logs: one line per event, ``key=value`` pairs (logfmt), with the
component on every line and the request id on every line about a request.

    log = get_logger("worker")
    log.info("request_started", request_id=rid, prompt_tokens=12)
    -> ts=2026-11-22T00:00:00.123Z level=info component=worker event=request_started request_id=r1 prompt_tokens=12

The request id comes from the event's ``request_id`` field; it is written right after
the event name. The component is the one given to ``setup_logging``.

Built on the standard ``logging`` module so libraries' records (nats, aiohttp) go to
the same stream, as ``logger=NAME msg=TEXT``; only the formatting is ours.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

_component = "dynrt"


def _quote(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' ="\n\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        fields: dict[str, Any] = getattr(record, "dynrt_fields", {})
        parts = [f"ts={ts}", f"level={record.levelname.lower()}", f"component={_component}"]
        if fields.get("_event"):
            parts.append(f"event={_quote(fields['_event'])}")
        else:
            parts.append(f"logger={record.name}")
            parts.append(f"msg={_quote(record.getMessage())}")
        request_id = fields.get("request_id")
        if request_id:
            parts.append(f"request_id={_quote(request_id)}")
        for key, value in fields.items():
            if key not in ("_event", "request_id") and value is not None:
                parts.append(f"{key}={_quote(value)}")
        if record.exc_info:
            exc = record.exc_info[1]
            parts.append(f"error={_quote(f'{type(exc).__name__}: {exc}')}")
        return " ".join(parts)


class StructLogger:
    """``log.info("event_name", key=value, ...)``."""

    def __init__(self, name: str) -> None:
        self._logger = logging.getLogger(f"dynrt.{name}")

    def _log(self, level: int, event: str, exc_info: bool, fields: dict[str, Any]) -> None:
        if self._logger.isEnabledFor(level):
            fields["_event"] = event
            self._logger.log(level, event, exc_info=exc_info, extra={"dynrt_fields": fields})

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, False, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, False, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, False, fields)

    def error(self, event: str, exc_info: bool = False, **fields: Any) -> None:
        self._log(logging.ERROR, event, exc_info, fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, True, fields)


def get_logger(name: str) -> StructLogger:
    return StructLogger(name)


def setup_logging(component: str, level: str = "info", stream: Any = None) -> None:
    """Route every log record of the process to one logfmt stream (stderr)."""
    global _component
    _component = component
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Library chatter at info level is noise for operators.
    for noisy in ("aiohttp.access", "nats", "grpc", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
