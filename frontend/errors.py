"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}``.

Every failure the frontend reports to a client is an :class:`OpenAIError` built by one
of the constructors below, so statuses, types and codes stay consistent. Messages are
written for the client; they never carry a traceback or internal detail.

Admission and the migration layer do not speak HTTP: they raise a
:class:`GenerationError` (``Overloaded``, ``NoLiveInstance``, ``InvalidRequest``,
``MigrationExhausted``), and :func:`to_openai` is the one place that says which OpenAI
error each one is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import msgspec


class ErrorDetail(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(msgspec.Struct, kw_only=True):
    error: ErrorDetail


_encode = msgspec.json.Encoder().encode


class OpenAIError(Exception):
    """An error response: HTTP ``status``, the OpenAI error object, and extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers: dict[str, str] = dict(headers or {})

    def detail(self) -> ErrorDetail:
        return ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)

    def to_body(self) -> bytes:
        return _encode(ErrorResponse(error=self.detail()))

    def __repr__(self) -> str:
        return (
            f"OpenAIError({self.status}, {self.message!r}, type={self.type!r}, "
            f"param={self.param!r}, code={self.code!r})"
        )


def _retry_after(seconds: float) -> dict[str, str]:
    """``Retry-After`` takes whole seconds; round up and never say 0."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def not_found(path: str) -> OpenAIError:
    return OpenAIError(404, f"Unknown path {path}", "invalid_request_error", code="not_found")


def method_not_allowed(method: str, path: str) -> OpenAIError:
    return OpenAIError(405, f"Method {method} not allowed on {path}", "invalid_request_error",
                       code="method_not_allowed")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", param, code)


def unsupported_param(param: str, why: str = "is not supported by this server") -> OpenAIError:
    """A field that would change the result and that we cannot honour: never ignored."""
    return bad_request(f"'{param}' {why}", param, "unsupported_parameter")


def unauthorized(admin: bool = False) -> OpenAIError:
    """401: no key, or one this endpoint does not take (``admin``: an endpoint that
    changes state, which takes the admin key when one is configured)."""
    which = "admin API key" if admin else "API key"
    return OpenAIError(
        401,
        f"Incorrect or missing {which}. Send it as 'Authorization: Bearer <key>'.",
        "invalid_request_error",
        None,
        "invalid_api_key",
        {"WWW-Authenticate": "Bearer"},
    )


def unsupported_media_type(message: str) -> OpenAIError:
    """415: a body that is not plain JSON (another Content-Type, or compressed)."""
    return OpenAIError(415, message, "invalid_request_error", code="unsupported_media_type")


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(
        404,
        f"The model '{model}' does not exist or has no live instance.",
        "invalid_request_error",
        "model",
        "model_not_found",
    )


def body_too_large(limit_bytes: int) -> OpenAIError:
    return OpenAIError(
        413,
        f"Request body is larger than the limit of {limit_bytes} bytes.",
        "invalid_request_error",
        None,
        "request_too_large",
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


def not_ready(component: str) -> OpenAIError:
    return OpenAIError(503, f"The {component} is starting; retry shortly.", "service_unavailable",
                       code="not_ready", headers={"Retry-After": "1"})


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


def internal() -> OpenAIError:
    return OpenAIError(
        500, "The server had an internal error while processing the request.", "server_error", None, "internal_error"
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
    raise TypeError(f"no OpenAI error for {type(error).__name__}")
