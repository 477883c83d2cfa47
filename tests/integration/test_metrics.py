"""What ``/metrics`` shows an operator, with real processes (mock engine, etcd, NATS):
the worker's running/waiting gauges under load, the frontend's per-request histograms
(end-to-end duration, queue time, prompt and output length) with counts and sums that
match the requests sent, and ``dynrt_build_info`` on the frontend, worker and router.

The worker runs the mock engine with ``--max-num-seqs 2`` at ``--speedup 0.5`` (a decode
step >= 11.5 ms): five 200-token requests keep two running and three waiting for
seconds, long enough to read the gauges (load reports every 0.1 s).
"""

from __future__ import annotations

import asyncio
import json
import platform
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from dynrt import __version__
from dynrt.runtime import metrics as dynrt_metrics
from dynrt.runtime.embedded import EtcdServer, NatsServer
from dynrt.runtime.mock_tokenizer import mock_tokenizer
from harness.frontend import FrontendProcess
from harness.metrics import Samples, metric, parse_metrics
from harness.processes import SystemPortProcess
from harness.worker import WorkerProcess

pytestmark = pytest.mark.timeout(90)

MODEL = "mock-model"
MAX_NUM_SEQS = 2
LONG_TOKENS = 200  # >= 2.3 s at speedup 0.5
TOK = mock_tokenizer()


@dataclass
class Deployment:
    tmp: Path
    worker: WorkerProcess
    fe: FrontendProcess
    router: SystemPortProcess


@pytest.fixture(scope="module")
async def dep(etcd_server: EtcdServer, nats_server: NatsServer,
              tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Deployment]:
    tmp = tmp_path_factory.mktemp("metrics")
    namespace = "t" + uuid.uuid4().hex[:10]
    connection = dict(namespace=namespace, etcd_endpoints=etcd_server.endpoint, nats_url=nats_server.url)
    worker = WorkerProcess(tmp, **connection, speedup=0.5, name="worker",
                           args=["--engine", "mock", "--max-num-seqs", str(MAX_NUM_SEQS), "--context-length", "1024"])
    fe = FrontendProcess(tmp, **connection, expect_instances=1, name="frontend")
    router = SystemPortProcess(tmp, "router", ["router", "--namespace", namespace, "--etcd-endpoints",
                                               etcd_server.endpoint, "--nats-url", nats_server.url])
    try:
        await worker.start()
        await asyncio.gather(fe.start(), router.start())
        yield Deployment(tmp, worker, fe, router)
    finally:
        await asyncio.gather(*(p.stop() for p in [worker, fe, router] if p.proc is not None))


async def scrape(url: str) -> Samples:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        async with session.get(url) as response:
            assert response.status == 200
            return parse_metrics(await response.text())


async def wait_metrics(url: str, check: Callable[[Samples], bool], timeout: float, what: str) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        samples = await scrape(url)
        if check(samples):
            return samples
        if time.monotonic() > deadline:
            shown = {k[0]: v for k, v in samples.items() if "running" in k[0] or "waiting" in k[0]}
            raise AssertionError(f"{what} not seen within {timeout}s: {shown}")
        await asyncio.sleep(0.05)


def gauges(samples: Samples) -> tuple[float, float]:
    return metric(samples, "dynrt_worker_running_requests"), metric(samples, "dynrt_worker_waiting_requests")


async def test_worker_running_and_waiting_gauges_under_load(dep: Deployment) -> None:
    url = dep.worker.metrics_url
    await wait_metrics(url, lambda s: gauges(s) == (0, 0), 5, "an idle worker")

    async def long_stream(session: aiohttp.ClientSession, i: int) -> None:
        body = {"model": MODEL, "prompt": f"load {i}", "max_tokens": LONG_TOKENS, "ignore_eos": True, "stream": True}
        async with session.post(f"{dep.fe.url}/v1/completions", json=body) as response:
            assert response.status == 200
            async for _ in response.content:
                pass

    async with aiohttp.ClientSession() as session:
        streams = [asyncio.create_task(long_stream(session, i)) for i in range(MAX_NUM_SEQS + 3)]
        try:
            samples = await wait_metrics(url, lambda s: gauges(s) == (MAX_NUM_SEQS, 3), 5,
                                         f"{MAX_NUM_SEQS} running and 3 waiting")
            # the same numbers the worker's /health computes from the engine
            async with session.get(dep.worker.health_url) as response:
                health = await response.json()
            assert (health["running"], health["waiting"]) == (MAX_NUM_SEQS, 3)
            assert metric(samples, "dynrt_worker_in_flight_requests") == MAX_NUM_SEQS + 3
        finally:
            for task in streams:
                task.cancel()  # the client hangs up: the worker aborts the requests
            await asyncio.gather(*streams, return_exceptions=True)
    await wait_metrics(url, lambda s: gauges(s) == (0, 0), 5, "the gauges back at 0 after the requests ended")


async def test_frontend_request_histograms(dep: Deployment) -> None:
    url = f"{dep.fe.url}/metrics"
    before = await scrape(url)
    chat_messages = [{"role": "user", "content": "count the tokens of this request"}]
    prompt = "the prompt of a streamed completion"
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{dep.fe.url}/v1/chat/completions", json={
                "model": MODEL, "messages": chat_messages, "max_tokens": 5, "ignore_eos": True}) as response:
            assert response.status == 200
            chat_usage = (await response.json())["usage"]
        async with session.post(f"{dep.fe.url}/v1/completions", json={
                "model": MODEL, "prompt": prompt, "max_tokens": 12, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}) as response:
            assert response.status == 200
            events = [line[6:] for line in (await response.text()).splitlines() if line.startswith("data: {")]
            stream_usage = json.loads(events[-1])["usage"]
        # refused before generation (max_tokens beyond the context): in no histogram
        async with session.post(f"{dep.fe.url}/v1/completions", json={
                "model": MODEL, "prompt": prompt, "max_tokens": 5000}) as response:
            assert response.status == 400
    elapsed = time.monotonic() - started
    after = await scrape(url)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, model=MODEL, **labels) - metric(before, name, model=MODEL, **labels)

    assert chat_usage["completion_tokens"] == 5 and stream_usage["completion_tokens"] == 12
    prompt_tokens = chat_usage["prompt_tokens"] + stream_usage["prompt_tokens"]
    assert stream_usage["prompt_tokens"] == len(TOK.encode(prompt))

    assert delta("dynrt_frontend_request_output_tokens_count") == 2
    assert delta("dynrt_frontend_request_output_tokens_sum") == 5 + 12
    assert delta("dynrt_frontend_request_output_tokens_sum") == delta("dynrt_frontend_output_tokens_total")
    assert delta("dynrt_frontend_request_output_tokens_bucket", le="5.0") == 1
    assert delta("dynrt_frontend_request_output_tokens_bucket", le="10.0") == 1
    assert delta("dynrt_frontend_request_output_tokens_bucket", le="20.0") == 2

    assert delta("dynrt_frontend_request_prompt_tokens_count") == 2
    assert delta("dynrt_frontend_request_prompt_tokens_sum") == prompt_tokens
    assert delta("dynrt_frontend_request_prompt_tokens_sum") == delta("dynrt_frontend_input_tokens_total")

    assert delta("dynrt_frontend_request_duration_seconds_count") == 2
    duration = delta("dynrt_frontend_request_duration_seconds_sum")
    assert 0 < duration <= elapsed
    assert delta("dynrt_frontend_request_queue_time_seconds_count") == 2
    queue = delta("dynrt_frontend_request_queue_time_seconds_sum")
    assert 0 < queue < duration
    # each request's duration includes its time to first token, which starts later than its arrival
    assert duration >= delta("dynrt_frontend_time_to_first_token_seconds_sum")

    # the buckets reach vLLM's ranges: 128k-token prompts, multi-minute requests
    def bounds(name: str) -> set[float]:
        return {float(dict(labels)["le"]) for sample, labels in after if sample == name}

    assert max(bounds("dynrt_frontend_request_prompt_tokens_bucket") - {float("inf")}) == 1e6
    assert max(bounds("dynrt_frontend_request_output_tokens_bucket") - {float("inf")}) == 1e6
    assert {0.001, 480.0, 7680.0} <= bounds("dynrt_frontend_request_duration_seconds_bucket")
    assert max(bounds("dynrt_frontend_request_queue_time_seconds_bucket") - {float("inf")}) == 7680.0


async def test_build_info_on_every_component(dep: Deployment) -> None:
    expected = dynrt_metrics.build_labels()
    assert expected["version"] == __version__ and expected["python"] == platform.python_version()
    for url in (f"{dep.fe.url}/metrics", dep.worker.metrics_url, dep.router.metrics_url):
        samples = await scrape(url)
        info = {labels: value for (name, labels), value in samples.items() if name == "dynrt_build_info"}
        assert info == {frozenset(expected.items()): 1.0}, url
