"""The NATS transport's typed errors (raised by ``runtime/transport.py`` and
``runtime/endpoint.py``; never nats-py's own)."""

from __future__ import annotations


class TransportError(Exception):
    """Base of the transport's typed errors."""


class NoRespondersError(TransportError):
    """No subscriber on the subject: the instance is gone."""


class StreamBrokenError(TransportError):
    """The response stream can no longer be trusted; ``cause`` says why."""

    def __init__(self, cause: str, message: str = "") -> None:
        super().__init__(message or cause)
        self.cause = cause


class StreamStalledError(StreamBrokenError):
    """Nothing (not even a heartbeat) arrived for ``stall_timeout`` seconds."""

    def __init__(self, seconds: float) -> None:
        super().__init__("stalled", f"no frame or heartbeat for {seconds:.2f}s")


class RequestTimeoutError(TransportError):
    """No reply to a request within its timeout."""


class PingTimeoutError(RequestTimeoutError):
    """The instance did not answer a ping in time."""


class NatsUnavailable(TransportError):
    """No NATS server accepted the connection in time."""


class StreamSilent(Exception):
    """``ResponseStream.next(timeout)`` saw nothing within ``timeout`` (not an error
    by itself: the caller decides, e.g. by pinging the instance)."""
