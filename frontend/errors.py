"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}``.

Every failure the frontend reports to a client is an :class:`OpenAIError` built by one
of the constructors below (the generic HTTP ones live in ``dynrt.runtime.http_errors``,
shared with the standalone router, and are re-exported here), so statuses, types and
codes stay consistent. Messages are written for the client; they never carry a
traceback or internal detail.

Admission and the migration layer do not speak HTTP: they raise a
:class:`GenerationError` (``Overloaded``, ``NoLiveInstance``, ``InvalidRequest``,
``MigrationExhausted``), and :func:`to_openai` is the one place that says which OpenAI
error each one is.
"""

from __future__ import annotations

import math

from dynrt.runtime.http_errors import (  # the generic HTTP errors, re-exported
    ErrorDetail,
    ErrorResponse,
    OpenAIError,
    bad_request,
    body_too_large,
    internal,
    method_not_allowed,
    not_found,
    not_ready,
    unauthorized,
    unsupported_media_type,
)

__all__ = ["ErrorDetail", "ErrorResponse", "OpenAIError", "bad_request", "body_too_large", "internal",
           "method_not_allowed", "not_found", "not_ready", "unauthorized", "unsupported_media_type"]


def _retry_after(seconds: float) -> dict[str, str]:
    """``Retry-After`` takes whole seconds; round up and never say 0."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def unsupported_param(param: str, why: str = "is not supported by this server") -> OpenAIError:
    """A field that would change the result and that we cannot honour: never ignored."""
    return bad_request(f"'{param}' {why}", param, "unsupported_parameter")


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(
        404,
        f"The model '{model}' does not exist or has no live instance.",
        "invalid_request_error",
        "model",
        "model_not_found",
    )


def overloaded(retry_after: float) -> OpenAIError:
    return OpenAIError(
        503,
        "Every instance of the model is at capacity; retry later.",
        "server_error",
        None,
        "overloaded",
        _retry_after(retry_after),
    )


def no_instances(model: str, retry_after: float) -> OpenAIError:
    return OpenAIError(
        503,
        f"The model '{model}' has no live instance right now; retry later.",
        "server_error",
        None,
        "no_instances",
        _retry_after(retry_after),
    )


def draining() -> OpenAIError:
    return OpenAIError(503, "This frontend is shutting down; retry on another.", "service_unavailable",
                       code="draining", headers={"Retry-After": "1"})


def worker_failed(reason: str) -> OpenAIError:
    return OpenAIError(503, f"The request could not be completed: {reason}", "service_unavailable",
                       code="worker_failed", headers={"Retry-After": "1"})


def context_length_exceeded(
    context_length: int, prompt_tokens: int, max_tokens: int | None, param: str
) -> OpenAIError:
    if max_tokens is None:
        detail = f"your prompt has {prompt_tokens} tokens, leaving no room for a completion"
    else:
        detail = (
            f"you requested {prompt_tokens + max_tokens} tokens "
            f"({prompt_tokens} in the prompt, {max_tokens} for the completion)"
        )
    return bad_request(
        f"This model's maximum context length is {context_length} tokens, but {detail}. "
        "Please shorten the prompt or lower the completion length.",
        param,
        "context_length_exceeded",
    )


# ---------------------------------------------------------------------------
# Why a generation failed, in the serving layer's terms (no HTTP)
# ---------------------------------------------------------------------------


class GenerationError(Exception):
    """A request that cannot be served; :func:`to_openai` turns it into its response."""


class Overloaded(GenerationError):
    """Every instance of the model is busy; the client may retry in ``retry_after`` s."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"overloaded; retry after {retry_after}s")
        self.retry_after = retry_after


class NoLiveInstance(GenerationError):
    """The model is known but has no live instance right now."""

    # What ``Retry-After`` says: about how long a replacement takes to register.
    RETRY_AFTER = 2

    def __init__(self, model: str) -> None:
        super().__init__(f"no live instance of {model!r}")
        self.model = model


class InvalidRequest(GenerationError):
    """The worker refused the request as invalid (its ``bad_request`` error frame)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class MigrationExhausted(GenerationError):
    """The request's worker failed and it could not continue on another; ``reason``
    says why (the migration limit, the sequence length, no live instance left)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StreamTakenOver(GenerationError):
    """A resumable request was reattached by another frontend (its client resumed
    there): this one's client is gone and its stream ends here."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# -- resumable streams (frontend/resume.py; docs/resumable-streams.md) -----------------
def resume_not_found(request_id: str) -> OpenAIError:
    return OpenAIError(404, f"No resumable stream {request_id!r}: it finished, was never resumable, or its "
                       "checkpoint is long gone", "NotFoundError", "Last-Event-ID", "resume_not_found")


def resume_expired(request_id: str) -> OpenAIError:
    return OpenAIError(410, f"The stream {request_id!r} can no longer be resumed: its grace period ended",
                       "GoneError", "Last-Event-ID", "resume_expired")


def resume_forbidden() -> OpenAIError:
    # Says no more than that: whether the stream exists is not told to another key.
    return OpenAIError(403, "This API key did not start that stream", "PermissionDeniedError", "Last-Event-ID",
                       "resume_forbidden")


def resume_conflict(request_id: str) -> OpenAIError:
    return OpenAIError(409, f"The stream {request_id!r} is being resumed by another connection", "ConflictError",
                       "Last-Event-ID", "resume_conflict")


def resume_unavailable(retry_after: float) -> OpenAIError:
    return OpenAIError(503, "The resumable-stream store (NATS JetStream) is unavailable; retry",
                       "ServiceUnavailableError", None, "resume_unavailable", _retry_after(retry_after))


def to_openai(error: GenerationError) -> OpenAIError:
    """The client's answer to a failed generation."""
    if isinstance(error, Overloaded):
        return overloaded(error.retry_after)
    if isinstance(error, NoLiveInstance):
        return no_instances(error.model, NoLiveInstance.RETRY_AFTER)
    if isinstance(error, InvalidRequest):
        return bad_request(error.message)
    if isinstance(error, MigrationExhausted):
        return worker_failed(error.reason)
    if isinstance(error, StreamTakenOver):
        return OpenAIError(409, error.message, "ConflictError", None, "resumed_elsewhere")
    raise TypeError(f"no OpenAI error for {type(error).__name__}")
