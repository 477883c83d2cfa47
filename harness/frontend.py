"""Start ``dynrt frontend`` as a real subprocess on a free port and wait until it serves.

    async with FrontendProcess(tmp_path, namespace=ns, etcd_endpoints=etcd.endpoint,
                               nats_url=nats.url, expect_instances=2,
                               args=["--migration-limit", "0"]) as frontend:
        client = openai.AsyncOpenAI(base_url=frontend.openai_url, api_key="x")

or, when the test controls the end itself (signals, exit codes):

    frontend = await FrontendProcess(...).start()
    try:
        frontend.terminate()
        assert await frontend.wait(10) == 0
    finally:
        await frontend.stop()

``start()`` returns once ``GET /health`` answers 200 and lists exactly
``expect_instances`` instances (with ``expect_instances=0``: once ``/live`` answers and
``/health`` says ``no_instances``). A port lost to another process between
``free_port()`` and the bind is retried with a new port. ``stop()`` is always safe:
SIGCONT + SIGTERM, SIGKILL after a timeout, a no-op on a process that already exited.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from dynrt.runtime.embedded import free_port
from harness.processes import ComponentProcess

_PORT_TAKEN = ("address already in use", "errno 98")


class FrontendProcess(ComponentProcess):
    def __init__(
        self,
        log_dir: Path,
        *,
        namespace: str,
        etcd_endpoints: str,
        nats_url: str,
        expect_instances: int | None = 1,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        api_key: str = "",
        name: str = "",
        start_timeout: float = 30.0,
    ) -> None:
        """``expect_instances``: how many instances ``/health`` must list before
        ``start()`` returns (None: any number, as soon as ``/live`` answers). ``api_key``
        is passed as ``--api-key`` and remembered for :meth:`headers`. ``args`` come last,
        so they win over everything set here."""
        super().__init__(log_dir, "frontend", namespace=namespace, etcd_endpoints=etcd_endpoints, nats_url=nats_url,
                         env=env, name=name, start_timeout=start_timeout)
        self.expect_instances = expect_instances
        self.extra_args = list(args)
        self.api_key = api_key
        self.port = 0

    def argv(self) -> list[str]:
        argv = ["frontend", *self.connection_args(), "--http-host", "127.0.0.1", "--http-port", str(self.port)]
        if self.api_key:
            argv += ["--api-key", self.api_key]
        return [*argv, *self.extra_args]

    # -- start ----------------------------------------------------------------
    async def start(self) -> "FrontendProcess":
        for attempt in range(3):
            self.port = free_port()
            try:
                await self.spawn_until_ready(self.argv(), self._wait_ready)
                return self
            except _PortTaken:
                if attempt == 2:
                    raise AssertionError(f"frontend {self.name}: no free port after 3 tries; log:\n{self.log_tail()}")
        raise AssertionError("unreachable")

    async def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout
        last: Any = None
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while True:
                if self.proc.poll() is not None:
                    if any(text in self.log_text().lower() for text in _PORT_TAKEN):
                        raise _PortTaken()
                    raise AssertionError(f"frontend {self.name} exited ({self.proc.returncode}) before it was "
                                         f"ready; log:\n{self.log_tail()}")
                try:
                    async with session.get(f"{self.url}/health") as response:
                        last = (response.status, await response.json())
                    if self._ready(*last):
                        return
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                    last = exc
                if time.monotonic() > deadline:
                    raise AssertionError(f"frontend {self.name} not ready after {self.start_timeout}s "
                                         f"(last /health: {last!r}); log:\n{self.log_tail()}")
                await asyncio.sleep(0.05)

    def _ready(self, status: int, body: dict[str, Any]) -> bool:
        if self.expect_instances is None:
            return status in (200, 503) and body.get("status") in ("ready", "no_instances")
        if self.expect_instances == 0:
            return status == 503 and body.get("status") == "no_instances"
        return status == 200 and len(body.get("instances", [])) == self.expect_instances

    # -- what tests use --------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_url(self) -> str:
        """``base_url`` for ``openai.AsyncOpenAI``."""
        return f"{self.url}/v1"

    def headers(self, **extra: str) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return {**headers, **extra}

    async def health(self) -> tuple[int, dict[str, Any]]:
        """``GET /health``: (status, JSON body)."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            async with session.get(f"{self.url}/health") as response:
                return response.status, await response.json()

    async def wait_instances(self, count: int, timeout: float = 15.0, model: str | None = None) -> float:
        """Wait until ``/health`` lists exactly ``count`` instances (of ``model`` if
        given); returns the seconds it took."""
        start = time.monotonic()
        last: Any = None
        while True:
            try:
                _, body = await self.health()
                instances = [i for i in body.get("instances", []) if model is None or i.get("model") == model]
                last = instances
                if len(instances) == count:
                    return time.monotonic() - start
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                last = exc
            if time.monotonic() - start > timeout:
                raise AssertionError(f"frontend {self.name}: {count} instance(s) expected after {timeout}s, "
                                     f"last: {last!r}")
            await asyncio.sleep(0.05)

    async def set_busy_thresholds(self, **settings: Any) -> dict[str, Any]:
        """``POST /busy_threshold`` with ``settings``; the thresholds now in force."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session, \
                session.post(f"{self.url}/busy_threshold", json=settings, headers=self.headers()) as response:
            body = await response.json()
            if response.status != 200:
                raise RuntimeError(f"POST /busy_threshold {settings}: {response.status} {body}")
            return body  # type: ignore[no-any-return]

    async def metrics_text(self) -> str:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            async with session.get(f"{self.url}/metrics") as response:
                assert response.status == 200
                return await response.text()


class _PortTaken(Exception):
    """The frontend lost its port to another process before binding it."""

