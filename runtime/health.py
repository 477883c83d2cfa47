"""A small aiohttp server any component runs beside its work: ``/live`` (200 while
the event loop runs — it never looks at load), ``/health`` (the component's own
verdict, 200 or 503 with a JSON body) and ``/metrics``."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
from aiohttp import web

from dynrt.runtime import metrics

HealthCheck = Callable[[], tuple[bool, dict[str, Any]]]


def fetch_health_json(url: str, timeout: float = 1.0) -> dict[str, Any] | None:
    """GET a component's JSON status (``/health`` answers 503 with a body too): the body,
    or None if nothing answers. Blocking (urllib): for supervisors and scripts, run it in
    a thread from async code."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            return json.loads(exc.read())
        except ValueError:
            return None
    except (OSError, ValueError):
        return None


async def live_handler(_: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"live"}', content_type="application/json")


async def metrics_handler(_: web.Request) -> web.Response:
    body, content_type = metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type})


def health_handler(check: HealthCheck) -> Callable[[web.Request], Any]:
    async def handler(_: web.Request) -> web.Response:
        healthy, details = check()
        return web.Response(status=200 if healthy else 503, body=msgspec.json.encode(details),
                            content_type="application/json")

    return handler


def add_health_routes(app: web.Application, check: HealthCheck) -> None:
    app.router.add_get("/live", live_handler)
    app.router.add_get("/health", health_handler(check))
    app.router.add_get("/metrics", metrics_handler)


class HealthServer:
    """``/live``, ``/health``, ``/metrics`` on ``host:port`` (port 0 = pick one)."""

    def __init__(self, check: HealthCheck, host: str = "127.0.0.1", port: int = 0,
                 middlewares: Sequence[Any] = ()) -> None:
        """``middlewares``: for a component that adds routes of its own to ``app``."""
        self.app = web.Application(middlewares=middlewares)
        add_health_routes(self.app, check)
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    async def start(self) -> int:
        # auto_decompress off: no route here takes a compressed body (never inflate one)
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False, auto_decompress=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])  # the port bound (self.port may be 0)
        return self.port

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
