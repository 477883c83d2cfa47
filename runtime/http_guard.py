"""The checks every HTTP request passes before its handler runs, on the frontend and on
the standalone router's system port: who may call the route (``dynrt.runtime.auth``),
then, for a request with a body, that the body is plain JSON.

* Access: each route is registered with its level (:meth:`HttpGuard.add`); a route
  registered without one counts as ``admin``, so a new endpoint is never open by
  mistake. A path no route matches is ``api`` under ``/v1/`` (a client without a key
  learns nothing about which paths exist, as with vLLM) and ``open`` elsewhere (404).
  A refused key is a 401, logged and counted in ``{component}_auth_failures_total``.
* Body: ``Content-Type`` must be ``application/json`` (as vLLM's server requires),
  else 415; a ``Content-Encoding`` other than ``identity`` is a 415 as well. The
  servers run with aiohttp's automatic decompression off (``AUTO_DECOMPRESS``), so a
  compressed body is never inflated: no decompression bomb, and the size limit
  (``client_max_size``, 413) counts the bytes received.

Checked before the body is read, so a client without a key cannot make the server read
(or buffer) a body at all.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute
from prometheus_client import Counter

from dynrt.runtime import http_errors as errors
from dynrt.runtime.auth import Access, Authenticator
from dynrt.runtime.log import get_logger

log = get_logger("auth")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# AppRunner keyword: keep request bodies as sent (a compressed one is refused with 415).
AUTO_DECOMPRESS = False
_UNMATCHED = "_unmatched"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class HttpGuard:
    def __init__(self, authenticator: Authenticator, failures: Counter) -> None:
        """``failures``: a counter labelled ``(endpoint, reason)``."""
        self.authenticator = authenticator
        self.failures = failures
        self._access: dict[AbstractRoute, Access] = {}

    def add(self, app: web.Application, method: str, path: str, handler: Handler, access: Access) -> None:
        """Register a route with the access level it needs."""
        if method == "GET":  # and HEAD, as aiohttp's add_get does
            route = app.router.add_get(path, handler)
            for head in route.resource or ():
                if head.method == "HEAD":
                    self._access[head] = access
        else:
            route = app.router.add_route(method, path, handler)
        self._access[route] = access

    def mark(self, routes: Iterable[AbstractRoute], access: Access) -> None:
        """Give routes registered elsewhere (``runtime.health``'s) their access level."""
        for route in routes:
            self._access[route] = access

    def access_of(self, request: web.Request) -> Access:
        route = request.match_info.route
        if request.match_info.http_exception is not None:  # 404 / 405
            return "api" if request.path.startswith("/v1/") else "open"
        return self._access.get(route, "admin")

    def check(self, request: web.Request) -> None:
        """Raise the 401 or 415 :class:`~dynrt.frontend.errors.OpenAIError` this
        request gets, if any."""
        access = self.access_of(request)
        rejection = self.authenticator.check(access, request.headers.get("Authorization"))
        if rejection is not None:
            endpoint = _endpoint(request)
            self.failures.labels(endpoint, rejection).inc()
            log.info("auth_rejected", endpoint=endpoint, method=request.method, reason=rejection, access=access,
                     peer=request.remote)
            raise errors.unauthorized(admin=access == "admin" and bool(self.authenticator.admin_keys))
        if request.method in _BODY_METHODS and request.match_info.http_exception is None:
            check_json_body(request)


def check_json_body(request: web.Request) -> None:
    """415 unless the body is uncompressed ``application/json``."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise errors.unsupported_media_type(
            f"Content-Encoding '{encoding[:40]}' is not supported; send the body uncompressed")
    if request.content_type != "application/json":
        raise errors.unsupported_media_type(
            f"Unsupported Media Type: only 'application/json' is allowed, got '{request.content_type[:80]}'")


def _endpoint(request: web.Request) -> str:
    """A bounded label: the route's path template, or one value for every unknown path."""
    if request.match_info.http_exception is not None:
        return _UNMATCHED
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else _UNMATCHED


def json_errors_middleware(guard: HttpGuard) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """For a small HTTP server (the router's system port): the guard's checks, and every
    error as an OpenAI-shaped JSON body."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            guard.check(request)
            return await handler(request)
        except errors.OpenAIError as exc:
            return errors.error_response(exc)
        except web.HTTPRequestEntityTooLarge:
            return errors.error_response(errors.body_too_large(request.client_max_size))
        except web.HTTPNotFound:
            return errors.error_response(errors.not_found(request.path))
        except web.HTTPMethodNotAllowed:
            return errors.error_response(errors.method_not_allowed(request.method, request.path))

    return middleware
