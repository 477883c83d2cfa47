"""What tests and benchmarks look at on a running deployment: requests in flight,
frontend and worker metrics, migrations, registered instances and the workers' KV state.
``Deployment`` (harness.deployment) is a ``DeploymentView`` that also starts, stops and
breaks the processes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp

from dynrt.runtime.discovery import EtcdClient
from dynrt.runtime.protocol import InstanceRecord, instance_record_decoder, instances_prefix
from harness.frontend import FrontendProcess
from harness.http import get_json
from harness.logs import MigrationEvent, migration_events
from harness.metrics import Samples, parse_metrics
from harness.processes import LOOPBACK
from harness.worker import WorkerProcess

KvState = dict[str, int]  # kv_blocks_used, in_flight, running, waiting


class DeploymentView:
    """Reads of a deployment's ``frontends`` and ``workers`` (every one ever started,
    dead ones included) in ``namespace`` of the etcd at ``etcd_endpoints``."""

    namespace: str
    frontends: list[FrontendProcess]
    workers: list[WorkerProcess]
    http: aiohttp.ClientSession | None

    @property
    def etcd_endpoints(self) -> str:
        raise NotImplementedError

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self.http is not None
        return self.http

    @property
    def urls(self) -> list[str]:
        return [f.url for f in self.frontends if f.alive()]

    def live_workers(self) -> list[WorkerProcess]:
        """Workers running now that registered when they started."""
        return [w for w in self.workers if w.alive() and w.registered]

    def _live_frontends(self, frontends: Sequence[FrontendProcess] | None) -> Sequence[FrontendProcess]:
        return frontends if frontends is not None else [f for f in self.frontends if f.alive()]

    # -- requests in flight --------------------------------------------------------------
    async def worker_health(self, worker: WorkerProcess) -> dict[str, Any] | None:
        answer = await get_json(self.session, worker.health_url, timeout=1.0)
        return None if answer is None else answer[1]

    async def in_flight(self) -> dict[str, int]:
        """Requests in flight on every live worker, by worker name."""
        out = {}
        for w in self.live_workers():
            health = await self.worker_health(w)
            if health is not None:
                out[w.name] = health["in_flight"]
        return out

    async def busiest_worker(self) -> tuple[WorkerProcess, int]:
        """The live worker with the most requests in flight, and that number."""
        counts = await self.in_flight()
        assert counts and max(counts.values()) > 0, f"no worker is serving: {counts}"
        name = max(counts, key=lambda n: counts[n])
        return next(w for w in self.workers if w.name == name), counts[name]

    async def worker_for(self, start: Callable[[], Awaitable[Any]], timeout: float = 10.0) -> WorkerProcess:
        """The worker that takes the request(s) ``start()`` (a coroutine function) sends:
        in-flight counts before and after. Only meaningful while nothing else arrives."""
        before = await self.in_flight()
        await start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            after = await self.in_flight()
            grew = [n for n, c in after.items() if c > before.get(n, 0)]
            if len(grew) == 1:
                return next(w for w in self.workers if w.name == grew[0])
            await asyncio.sleep(0.02)
        raise AssertionError("could not tell which worker took the request")

    # -- metrics and logs ----------------------------------------------------------------
    async def frontend_metrics(self, frontend: FrontendProcess) -> Samples:
        return parse_metrics(await frontend.metrics_text())

    async def metric_sum(self, name: str, frontends: Sequence[FrontendProcess] | None = None,
                         **labels: str) -> float:
        """A frontend counter summed over (live) frontends and over unnamed labels."""
        total = 0.0
        for fe in self._live_frontends(frontends):
            for (sample, sample_labels), value in (await self.frontend_metrics(fe)).items():
                if sample == name and all(dict(sample_labels).get(k) == v for k, v in labels.items()):
                    total += value
        return total

    async def metric_by(self, name: str, label: str,
                        frontends: Sequence[FrontendProcess] | None = None) -> dict[str, int]:
        """A frontend counter by the values of one label, summed over (live) frontends."""
        out: dict[str, int] = {}
        for fe in self._live_frontends(frontends):
            for (sample, labels), value in (await self.frontend_metrics(fe)).items():
                if sample == name and value:
                    key = dict(labels).get(label, "")
                    out[key] = out.get(key, 0) + int(value)
        return out

    async def migrations(self, frontends: Sequence[FrontendProcess] | None = None) -> dict[str, int]:
        """``dynrt_frontend_migrations_total`` by cause, summed over frontends."""
        return await self.metric_by("dynrt_frontend_migrations_total", "cause", frontends)

    def migration_events(self, frontends: Sequence[FrontendProcess] | None = None) -> list[MigrationEvent]:
        """Every migration in the (by default: every) frontends' logs."""
        return [e for fe in (frontends if frontends is not None else self.frontends)
                for e in migration_events(fe.log_text())]

    def migrated_requests(self, frontends: Sequence[FrontendProcess] | None = None) -> dict[str, list[tuple[str, str]]]:
        """From the frontends' logs: request id → [(cause, from_instance)] per migration."""
        out: dict[str, list[tuple[str, str]]] = {}
        for e in self.migration_events(frontends):
            out.setdefault(e.request_id, []).append((e.cause, e.from_instance))
        return out

    async def worker_outcomes(self, worker: WorkerProcess) -> dict[str, int]:
        """``dynrt_worker_requests_total`` by outcome."""
        answer = await self.session.get(worker.metrics_url, timeout=aiohttp.ClientTimeout(total=2))
        async with answer:
            samples = parse_metrics(await answer.text())
        return {dict(labels)["outcome"]: int(v) for (name, labels), v in samples.items()
                if name == "dynrt_worker_requests_total" and v}

    # -- instances ----------------------------------------------------------------------
    async def frontend_instances(self, frontend: FrontendProcess) -> int | None:
        answer = await get_json(self.session, f"{frontend.url}/health", timeout=1.0)
        return None if answer is None else len(answer[1].get("instances", []))

    async def wait_instances(self, count: int, timeout: float = 20.0,
                             frontends: Sequence[FrontendProcess] | None = None) -> float:
        """Until every (live) frontend's ``/health`` lists ``count`` instances; seconds taken."""
        start = time.monotonic()
        for fe in self._live_frontends(frontends):
            await fe.wait_instances(count, timeout=max(0.1, timeout - (time.monotonic() - start)))
        return time.monotonic() - start

    async def registered_instances(self) -> list[InstanceRecord]:
        """Every instance record in etcd now (workers started here or by a controller)."""
        etcd = EtcdClient(self.etcd_endpoints)
        try:
            _, values = await etcd.get_prefix(instances_prefix(self.namespace))
        finally:
            await etcd.close()
        return [instance_record_decoder.decode(v) for v in values.values()]

    # -- KV state --------------------------------------------------------------------------
    async def kv_state(self, workers: Sequence[WorkerProcess] | None = None) -> dict[str, KvState | None]:
        """KV blocks and requests of ``workers``, by default of every live worker: the
        ones started here, and any other registered instance (a controller's replicas)."""
        targets = {w.name: w.health_url for w in (workers if workers is not None else self.live_workers())}
        if workers is None:
            known = {w.pid for w in self.workers if w.proc is not None}
            for record in await self.registered_instances():
                if record.pid not in known:
                    targets[f"pid{record.pid}"] = f"http://{LOOPBACK}:{record.system_port}/health"
        out: dict[str, KvState | None] = {}
        for name, url in targets.items():
            answer = await get_json(self.session, url, timeout=1.0)
            out[name] = None if answer is None else {k: answer[1][k] for k in ("kv_blocks_used", "in_flight",
                                                                               "running", "waiting")}
        return out

    async def assert_kv_idle(self, timeout: float = 5.0, workers: Sequence[WorkerProcess] | None = None) -> float:
        """Every live worker (or ``workers``) back to 0 KV blocks and 0 requests within
        ``timeout``; returns the seconds it took."""
        start = time.monotonic()
        while True:
            state = await self.kv_state(workers)
            if state and all(s is not None and not any(s.values()) for s in state.values()):
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise AssertionError(f"KV not freed after {timeout}s: {state}")
            await asyncio.sleep(0.05)

    async def leaked_blocks(self, settle: float = 5.0) -> int:
        """KV blocks still used on live workers after up to ``settle`` seconds."""
        deadline = time.monotonic() + settle
        while True:
            state = await self.kv_state()
            used = sum(s["kv_blocks_used"] for s in state.values() if s is not None)
            if used == 0 or time.monotonic() > deadline:
                return used
            await asyncio.sleep(0.1)
