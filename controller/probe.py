"""Is a replica healthy? Two questions at once, each with a timeout: does its event
loop answer a NATS ping on the instance's control subject, and does its system port's
``/health`` answer 200. A replica is healthy only if both do. How often to ask, and what
a failing answer leads to, is ``reconcile.plan_launches`` / ``plan_probe_result``.
"""

from __future__ import annotations

import asyncio
import socket

import aiohttp

from dynrt.controller.spec import HealthCheckSpec
from dynrt.runtime.protocol import InstanceRecord
from dynrt.runtime.transport import NatsTransport


def health_url(record: InstanceRecord) -> str:
    """The instance's ``/health`` (on this host: by loopback)."""
    host = "127.0.0.1" if record.host == socket.gethostname() else record.host
    return f"http://{host}:{record.system_port}/health"


def probe_timeout(health_check: HealthCheckSpec) -> float:
    """Each question's timeout: well within the check period and the failure timeout."""
    return max(0.2, min(2.0, health_check.period, health_check.timeout / 2))


async def probe_instance(transport: NatsTransport, http: aiohttp.ClientSession, record: InstanceRecord,
                         timeout: float) -> tuple[bool, str]:
    """(healthy, why not: the failed questions, "; "-separated)."""
    if record.draining:
        return False, "instance is draining"

    async def ping() -> str:
        try:
            await transport.ping(record.subject, timeout)
            return ""
        except Exception as exc:
            return f"ping: {type(exc).__name__}"

    async def health() -> str:
        try:
            async with http.get(health_url(record), timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                return "" if resp.status == 200 else f"/health {resp.status}"
        except Exception as exc:
            return f"/health: {type(exc).__name__}"

    errors = [e for e in await asyncio.gather(ping(), health()) if e]
    return (not errors), "; ".join(errors)
