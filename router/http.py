"""``GET``/``POST /busy_threshold``: read and change a router's load-shedding thresholds
at runtime (``dynrt.router.cost.BusyThresholds``), on a frontend (its own router) and on
the standalone router's system port.

``GET`` is open (it only reads); ``POST`` changes admission for every client and so is
an ``admin`` route (``dynrt.runtime.auth``): the admin key, or the API keys when no admin
key is configured.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec
from aiohttp import web

from dynrt.router.cost import BusyThresholds, BusyThresholdSettings
from dynrt.runtime import http_errors as errors
from dynrt.runtime.http_guard import HttpGuard
from dynrt.runtime.log import get_logger

log = get_logger("router")

_settings_decoder = msgspec.json.Decoder(BusyThresholdSettings)
_encode = msgspec.json.Encoder().encode


def _json(obj: object) -> web.Response:
    return web.Response(body=_encode(obj), content_type="application/json")


def add_busy_threshold_routes(app: web.Application, guard: HttpGuard,
                              thresholds: Callable[[], BusyThresholds]) -> None:
    """``thresholds``: the thresholds in force (looked up per request: a component's
    router may be created after its HTTP app)."""

    async def get(_: web.Request) -> web.Response:
        return _json(thresholds().settings())

    async def post(request: web.Request) -> web.Response:
        try:
            settings = _settings_decoder.decode(await request.read())
            now = thresholds().update(settings)
        # ValueError covers UnicodeDecodeError (msgspec raises it for invalid UTF-8)
        except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
            raise errors.bad_request(f"Invalid busy thresholds: {exc}") from None
        log.info("busy_threshold_set", kv_usage=now.kv_usage, queue_depth=now.queue_depth,
                 prefill_tokens=now.prefill_tokens, ttft_slo=now.ttft_slo, peer=request.remote)
        return _json(now)

    guard.add(app, "GET", "/busy_threshold", get, "open")
    guard.add(app, "POST", "/busy_threshold", post, "admin")
