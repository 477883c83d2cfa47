"""``HttpGuard`` on a small in-process aiohttp app: which routes take which key, that a
route registered without a level is treated as admin (fail closed), and the body checks."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from dynrt.runtime.http_guard import HttpGuard, json_errors_middleware
from dynrt.runtime import metrics
from dynrt.runtime.auth import Authenticator

FAILURES = metrics.counter("dynrt_test_guard_auth_failures_total", "test", ("endpoint", "reason"))


async def ok(_: web.Request) -> web.Response:
    return web.json_response({"ok": True})


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    guard = HttpGuard(Authenticator(["api"], ["admin"]), FAILURES)
    app = web.Application(middlewares=[json_errors_middleware(guard)], client_max_size=1000)
    guard.add(app, "GET", "/open", ok, "open")
    guard.add(app, "POST", "/v1/thing", ok, "api")
    guard.add(app, "POST", "/admin", ok, "admin")
    app.router.add_post("/forgotten", ok)  # no access level given
    test_server = TestServer(app)
    await test_server.start_server(auto_decompress=False)  # as the frontend runs (http_guard.AUTO_DECOMPRESS)
    try:
        async with aiohttp.ClientSession() as session:
            yield str(test_server.make_url("")).rstrip("/"), session
    finally:
        await test_server.close()


async def status_of(session: aiohttp.ClientSession, method: str, url: str, key: str | None = None,
                    **kw: object) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers.update(kw.pop("headers", {}))  # type: ignore[arg-type]
    kw.setdefault("json", {})
    async with session.request(method, url, headers=headers, **kw) as response:  # type: ignore[arg-type]
        assert response.content_type == "application/json"
        return response.status


async def test_access_levels(server: tuple[str, aiohttp.ClientSession]) -> None:
    url, session = server
    assert await status_of(session, "GET", f"{url}/open") == 200
    assert await status_of(session, "HEAD", f"{url}/open", json=None) == 200  # HEAD with GET, as add_get
    assert await status_of(session, "POST", f"{url}/v1/thing") == 401
    assert await status_of(session, "POST", f"{url}/v1/thing", "api") == 200
    assert await status_of(session, "POST", f"{url}/v1/thing", "admin") == 401
    assert await status_of(session, "POST", f"{url}/admin", "api") == 401
    assert await status_of(session, "POST", f"{url}/admin", "admin") == 200
    # fail closed: a route registered without a level takes the admin key
    assert await status_of(session, "POST", f"{url}/forgotten", "api") == 401
    assert await status_of(session, "POST", f"{url}/forgotten", "admin") == 200
    # unknown paths: 401 under /v1/ (nothing learnt without a key), 404 elsewhere
    assert await status_of(session, "GET", f"{url}/v1/nothing-{uuid.uuid4().hex}") == 401
    assert await status_of(session, "GET", f"{url}/v1/nothing", "api") == 404
    assert await status_of(session, "GET", f"{url}/nothing") == 404
    assert await status_of(session, "GET", f"{url}/admin", "admin") == 405


async def test_body_checks(server: tuple[str, aiohttp.ClientSession]) -> None:
    url, session = server
    post = f"{url}/v1/thing"
    assert await status_of(session, "POST", post, "api", json=None, data=b"{}",
                           headers={"Content-Type": "application/json; charset=utf-8"}) == 200
    assert await status_of(session, "POST", post, "api", json=None, data=b"{}",
                           headers={"Content-Type": "text/plain"}) == 415
    assert await status_of(session, "POST", post, "api", json=None, data=b"{}") == 415  # octet-stream
    assert await status_of(session, "POST", post, "api", headers={"Content-Encoding": "gzip"}) == 415
    assert await status_of(session, "POST", post, "api", headers={"Content-Encoding": "identity"}) == 200
    # the key is checked first: no key, wrong type -> 401
    assert await status_of(session, "POST", post, json=None, data=b"{}", headers={"Content-Type": "text/plain"}) == 401
