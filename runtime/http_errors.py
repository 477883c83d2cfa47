"""HTTP errors as OpenAI shapes them: ``{"error": {"message", "type", "param", "code"}}``,
for every dynrt HTTP server (the frontend, the standalone router's system port).

:class:`OpenAIError` is an error response (status, body, headers); the constructors
below are the generic ones (bad request, auth, media type, size, routing of paths).
``dynrt.frontend.errors`` adds the serving ones (unknown model, overload, migration) and
re-exports these. Messages are written for the client: never a traceback.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec
from aiohttp import web


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


def not_found(path: str) -> OpenAIError:
    return OpenAIError(404, f"Unknown path {path}", "invalid_request_error", code="not_found")

def method_not_allowed(method: str, path: str) -> OpenAIError:
    return OpenAIError(405, f"Method {method} not allowed on {path}", "invalid_request_error",
                       code="method_not_allowed")

def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", param, code)

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

def body_too_large(limit_bytes: int) -> OpenAIError:
    return OpenAIError(
        413,
        f"Request body is larger than the limit of {limit_bytes} bytes.",
        "invalid_request_error",
        None,
        "request_too_large",
    )

def not_ready(component: str) -> OpenAIError:
    return OpenAIError(503, f"The {component} is starting; retry shortly.", "service_unavailable",
                       code="not_ready", headers={"Retry-After": "1"})

def internal() -> OpenAIError:
    return OpenAIError(
        500, "The server had an internal error while processing the request.", "server_error", None, "internal_error"
    )


def error_response(error: OpenAIError) -> web.Response:
    return web.Response(body=error.to_body(), status=error.status, content_type="application/json",
                        headers=error.headers)
