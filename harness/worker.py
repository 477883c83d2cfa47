"""Start ``dynrt worker`` as a real subprocess and wait until it is registered.

    async with WorkerProcess(tmp_path, namespace=ns, etcd_endpoints=etcd.endpoint,
                             nats_url=nats.url, speedup=2, args=["--num-blocks", "256"]) as worker:
        stream = await transport.call(worker.record.subject, ...)

or, when the test controls the end itself (signals, exit codes):

    worker = await WorkerProcess(...).start()
    try:
        ...
        assert await worker.wait(10) == 0
    finally:
        await worker.stop()

``start()`` returns once the worker's instance record is in etcd (found by the worker's
pid under ``dynrt/{ns}/instances/``, so several workers may share a namespace) and its
``/health`` answers 200. ``stop()`` is always safe: SIGCONT + SIGTERM, SIGKILL after a
timeout, and a no-op on a process that already exited.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from dynrt.runtime.discovery import EtcdClient
from dynrt.runtime.protocol import InstanceRecord, instance_key, instance_record_decoder, instances_prefix
from harness.processes import ComponentProcess


class WorkerProcess(ComponentProcess):
    def __init__(
        self,
        log_dir: Path,
        *,
        namespace: str,
        etcd_endpoints: str,
        nats_url: str,
        speedup: float | str = 1.0,
        engine: str | None = "mock",
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        canary_after: float | None = 0,
        health_period: float | None = 0,
        name: str = "",
        start_timeout: float = 30.0,
        wait_healthy: bool = True,
    ) -> None:
        """``canary_after`` / ``health_period``: 0 (the default here) disables the
        canary / periodic health check so they cannot interfere with a test; None
        leaves the worker's own default. ``args`` are appended last, so they win.
        ``wait_healthy``: ``start()`` also waits for ``/health`` to answer 200."""
        super().__init__(log_dir, "worker", namespace=namespace, etcd_endpoints=etcd_endpoints, nats_url=nats_url,
                         env=env, name=name, start_timeout=start_timeout)
        self.wait_healthy = wait_healthy
        # ``engine``: the mock unless asked (a worker's own default is vLLM); None = no
        # --engine flag (the worker's default). --speedup is the mock's only.
        argv = ["worker", *(["--engine", engine] if engine else []), *self.connection_args()]
        if engine == "mock":
            argv += ["--speedup", str(speedup)]
        if canary_after is not None:
            argv += ["--canary-after", str(canary_after)]
        if health_period is not None:
            argv += ["--health-period", str(health_period)]
        self.argv = [*argv, *args]
        self._record: InstanceRecord | None = None

    # -- start ----------------------------------------------------------------
    async def start(self) -> "WorkerProcess":
        self._record = await self.spawn_until_ready(self.argv, self._wait_registered)
        return self

    async def _wait_registered(self) -> InstanceRecord:
        assert self.proc is not None
        etcd = EtcdClient(self.etcd_endpoints)
        deadline = time.monotonic() + self.start_timeout
        try:
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(f"worker {self.name} exited ({self.proc.returncode}) before registering; "
                                         f"log:\n{self.log_tail()}")
                record = await self._find_record(etcd)
                # The record goes into etcd a moment before the worker is ready (it
                # answers "busy: worker is starting" until then): wait for /health 200.
                if record is not None and (not self.wait_healthy or await _healthy(record)):
                    return record
                if time.monotonic() > deadline:
                    raise AssertionError(f"worker {self.name} not registered after {self.start_timeout}s; "
                                         f"log:\n{self.log_tail()}")
                await asyncio.sleep(0.05)
        finally:
            await etcd.close()

    async def _find_record(self, etcd: EtcdClient) -> InstanceRecord | None:
        assert self.proc is not None
        try:
            _, values = await etcd.get_prefix(instances_prefix(self.namespace))
        except Exception:  # etcd not answering yet: keep polling until the deadline
            return None
        for value in values.values():
            try:
                record = instance_record_decoder.decode(value)
            except Exception:
                continue
            if record.pid == self.proc.pid and record.routable:  # the ready record, not the loading one
                return record
        return None

    # -- what tests use --------------------------------------------------------
    @property
    def registered(self) -> bool:
        """Its instance record was seen in etcd when it started."""
        return self._record is not None

    @property
    def record(self) -> InstanceRecord:
        if self._record is None:
            raise RuntimeError(f"worker {self.name} not started")
        return self._record

    @property
    def key(self) -> str:
        """The worker's etcd key."""
        r = self.record
        return instance_key(r.namespace, r.component, r.endpoint, r.instance_id)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.record.system_port}"

    @property
    def health_url(self) -> str:
        return f"{self.base_url}/health"

    @property
    def live_url(self) -> str:
        return f"{self.base_url}/live"

    @property
    def metrics_url(self) -> str:
        return f"{self.base_url}/metrics"


async def _healthy(record: InstanceRecord) -> bool:
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            async with session.get(f"http://127.0.0.1:{record.system_port}/health") as response:
                return response.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return False
