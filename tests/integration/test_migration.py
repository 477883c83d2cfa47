"""Migration: a worker dies (or hangs, drains, loses its key, loses NATS) mid-answer and
the client still gets the exact answer an uninterrupted run gives.

Real processes: etcd, NATS, one frontend, three mock workers at speedup 1 (a 400-token
answer takes a few seconds). The reference answer comes from the mock engine in this
process: its output is a pure function of (token ids so far, seed).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from dynrt.runtime.discovery import EtcdClient
from dynrt.runtime.embedded import EtcdServer, NatsServer
from dynrt.runtime.mock_tokenizer import mock_tokenizer
from dynrt.runtime.protocol import GenerateRequest, SamplingParams
from dynrt.worker.mock_engine import MockEngine, MockEngineConfig
from harness.frontend import FrontendProcess
from harness.metrics import metric, parse_metrics
from harness.sse import SseStream
from harness.worker import WorkerProcess

MAX_TOKENS = 400
MESSAGES = [{"role": "user", "content": "tell me a long story about the river and the city"}]
SEED = 7


async def reference_text(max_tokens: int = MAX_TOKENS) -> str:
    """What an uninterrupted run answers (the engine, in process, no sleeping)."""
    tokenizer = mock_tokenizer()
    prompt = tokenizer.apply_chat_template(MESSAGES)
    engine = MockEngine(MockEngineConfig(speedup=float("inf")))
    await engine.start()
    ids: list[int] = []
    request = GenerateRequest(request_id="ref", model="mock-model", token_ids=prompt,
                              sampling=SamplingParams(max_tokens=max_tokens, seed=SEED, ignore_eos=True,
                                                      stop_token_ids=[2, 7]))
    async for batch in engine.generate(request):
        ids.extend(batch.token_ids)
    await engine.shutdown()
    return tokenizer.decode(ids)


@dataclass
class StreamResult:
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    done: bool = False
    chunk_times: list[float] = field(default_factory=list)

    @property
    def max_gap(self) -> float:
        gaps = [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]
        return max(gaps, default=0.0)


def chat_body(stream: bool, max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "mock-model", "messages": MESSAGES, "max_tokens": max_tokens, "seed": SEED,
                            "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def stream_chat(url: str, started: asyncio.Event | None = None, max_tokens: int = MAX_TOKENS) -> StreamResult:
    result = StreamResult()
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v1/chat/completions", json=chat_body(True, max_tokens)) as response:
            assert response.status == 200, await response.text()
            events = SseStream(response)
            async for chunk in events:
                if "error" in chunk:
                    result.error = chunk["error"]
                    continue
                if chunk.get("usage"):
                    result.usage = chunk["usage"]
                for choice in chunk["choices"]:
                    content = choice["delta"].get("content")
                    if content:
                        result.text += content
                        result.chunk_times.append(time.monotonic())
                        if started is not None and len(result.chunk_times) >= 40:
                            started.set()
                    if choice.get("finish_reason"):
                        result.finish_reason = choice["finish_reason"]
            result.done = events.done
    return result


@dataclass
class Cluster:
    frontend: FrontendProcess
    workers: list[WorkerProcess]

    async def serving_worker(self, timeout: float = 5.0) -> WorkerProcess:
        """The worker with a request in flight."""
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                for worker in self.workers:
                    if not worker.alive():
                        continue
                    try:
                        async with session.get(worker.health_url) as response:
                            if (await response.json())["in_flight"] > 0:
                                return worker
                    except aiohttp.ClientError:
                        pass
                await asyncio.sleep(0.02)
        raise AssertionError("no worker is serving the request")

    async def migrations(self) -> dict[str, float]:
        """Migrations so far, by cause."""
        samples = parse_metrics(await self.frontend.metrics_text())
        return {dict(labels)["cause"]: value for (name, labels), value in samples.items()
                if name == "dynrt_frontend_migrations_total" and value}

    async def assert_no_kv_leak(self, workers: list[WorkerProcess], timeout: float = 2.0) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            for worker in workers:
                while True:
                    async with session.get(worker.health_url) as response:
                        health = await response.json()
                    if health["kv_blocks_used"] == 0 and health["in_flight"] == 0:
                        break
                    assert time.monotonic() < deadline, f"{worker.name} still holds KV: {health}"
                    await asyncio.sleep(0.05)


@asynccontextmanager
async def cluster(tmp_path: Path, namespace: str, etcd: str, nats: str, *, workers: int = 3,
                  frontend_args: list[str] | None = None, worker_args: list[str] | None = None) -> AsyncIterator[Cluster]:
    async with AsyncExitStack() as stack:
        started = await asyncio.gather(*[
            stack.enter_async_context(WorkerProcess(tmp_path, namespace=namespace, etcd_endpoints=etcd, nats_url=nats,
                                                    speedup=1, args=worker_args or []))
            for _ in range(workers)])
        frontend = await stack.enter_async_context(FrontendProcess(
            tmp_path, namespace=namespace, etcd_endpoints=etcd, nats_url=nats, expect_instances=workers,
            args=frontend_args or []))
        yield Cluster(frontend, list(started))


async def _fault_mid_stream(c: Cluster, fault: Any) -> tuple[StreamResult, WorkerProcess]:
    started = asyncio.Event()
    request = asyncio.create_task(stream_chat(c.frontend.url, started))
    await asyncio.wait_for(started.wait(), 20)
    victim = await c.serving_worker()
    await fault(victim)
    return await asyncio.wait_for(request, 60), victim


def _assert_complete(result: StreamResult, reference: str) -> None:
    assert result.error is None, result.error
    assert result.done
    assert result.text == reference
    assert result.finish_reason == "length"
    assert result.usage is not None
    assert result.usage["completion_tokens"] == MAX_TOKENS
    assert result.usage["prompt_tokens"] == len(mock_tokenizer().apply_chat_template(MESSAGES))


async def test_sigkill_mid_stream_migrates_with_identical_output(tmp_path: Path, namespace: str,
                                                                 etcd_server: EtcdServer, nats_server: NatsServer) -> None:
    reference = await reference_text()
    async with cluster(tmp_path, namespace, etcd_server.endpoint, nats_server.url) as c:
        async def kill(worker: WorkerProcess) -> None:
            worker.send_signal(signal.SIGKILL)

        result, victim = await _fault_mid_stream(c, kill)
        _assert_complete(result, reference)
        assert await c.migrations() == {"killed": 1}
        assert result.max_gap < 0.5  # detection by ping: well under the 2 s stall timeout
        await c.assert_no_kv_leak([w for w in c.workers if w is not victim])


async def test_sigstop_mid_stream_migrates_when_its_load_reports_stop(tmp_path: Path, namespace: str,
                                                                       etcd_server: EtcdServer,
                                                                       nats_server: NatsServer) -> None:
    """A hung worker (SIGSTOP) keeps its subscriptions and its key, but its load reports
    stop: suspect after --suspect-after (0.3 s), pinged, moved — well before the 2 s
    stall timeout."""
    reference = await reference_text()
    async with cluster(tmp_path, namespace, etcd_server.endpoint, nats_server.url) as c:
        async def stop(worker: WorkerProcess) -> None:
            worker.send_signal(signal.SIGSTOP)

        result, victim = await _fault_mid_stream(c, stop)
        _assert_complete(result, reference)
        assert await c.migrations() == {"suspect": 1}
        assert result.max_gap < 1.0  # detection by missed load reports, not the 2 s stall timeout
        # Resumed, the hung worker gets the frontend's cancel and frees the request.
        victim.send_signal(signal.SIGCONT)
        await c.assert_no_kv_leak(c.workers, timeout=3.0)


async def test_request_sent_to_a_hung_idle_worker_moves_when_no_report_acknowledges_it(
        tmp_path: Path, namespace: str, etcd_server: EtcdServer, nats_server: NatsServer) -> None:
    """An idle worker reports only every --load-heartbeat-idle (1 s), so a SIGSTOPped idle
    one stays in routing for up to 3 s of silence. But a live worker reports within its
    load interval of receiving a request: one sent there and not acknowledged for
    --suspect-after makes it suspect, and the request moves (cause suspect) — well before
    the 2 s stall timeout."""
    tokens = 50
    reference = await reference_text(tokens)
    async with cluster(tmp_path, namespace, etcd_server.endpoint, nats_server.url, workers=2,
                       frontend_args=["--router-mode", "round-robin"]) as c:
        await asyncio.sleep(1.5)  # both idle, on their idle heartbeat
        c.workers[0].send_signal(signal.SIGSTOP)
        started = time.monotonic()
        results = await asyncio.gather(*(stream_chat(c.frontend.url, max_tokens=tokens) for _ in range(2)))
        elapsed = time.monotonic() - started
        for result in results:
            assert result.error is None and result.done
            assert result.text == reference
        assert await c.migrations() == {"suspect": 1}
        assert elapsed < 1.6, elapsed  # suspect within ~0.3 s + the answer, not the 2 s stall timeout
        c.workers[0].send_signal(signal.SIGCONT)


async def test_stall_timeout_still_moves_a_stuck_stream_whose_worker_keeps_reporting(
        tmp_path: Path, namespace: str, etcd_server: EtcdServer, nats_server: NatsServer) -> None:
    """With suspicion off (--suspect-after 0) a hung worker is found by the last resort,
    the stall timeout, as before."""
    reference = await reference_text()
    async with cluster(tmp_path, namespace, etcd_server.endpoint, nats_server.url,
                       frontend_args=["--stream-stall-timeout", "1.0", "--suspect-after", "0"]) as c:
        async def stop(worker: WorkerProcess) -> None:
            worker.send_signal(signal.SIGSTOP)

        result, victim = await _fault_mid_stream(c, stop)
        _assert_complete(result, reference)
        assert await c.migrations() == {"stalled": 1}
        assert 0.9 < result.max_gap < 3.0
        victim.send_signal(signal.SIGCONT)
        await c.assert_no_kv_leak(c.workers, timeout=3.0)


async def test_sigterm_past_drain_timeout_migrates(tmp_path: Path, namespace: str,
                                                   etcd_server: EtcdServer, nats_server: NatsServer) -> None:
    reference = await reference_text()
    async with cluster(tmp_path, namespace, etcd_server.endpoint, nats_server.url,
                       worker_args=["--drain-timeout", "0.3"]) as c:
        async def terminate(worker: WorkerProcess) -> None:
            worker.send_signal(signal.SIGTERM)

        result, victim = await _fault_mid_stream(c, terminate)
        _assert_complete(result, reference)
        assert await c.migrations() == {"drained": 1}
        assert await victim.wait(10) == 0
        await c.assert_no_kv_leak([w for w in c.workers if w is not victim])


async def test_deleted_instance_key_migrates(tmp_path: Path, namespace: str,
                                             etcd_server: EtcdServer, nats_server: NatsServer) -> None:
    reference = await reference_text()
    async with cluster(tmp_path, namespace, etcd_server.endpoint, nats_server.url) as c:
        etcd = EtcdClient(etcd_server.endpoint)

        async def delete_key(worker: WorkerProcess) -> None:
            await etcd.delete(worker.key)

        result, _ = await _fault_mid_stream(c, delete_key)
        _assert_complete(result, reference)
        assert await c.migrations() == {"lease_expired": 1}
        await etcd.close()
        await c.assert_no_kv_leak(c.workers)


async def test_nats_restart_mid_stream_migrates(tmp_path: Path, namespace: str, etcd_server: EtcdServer,
                                                private_nats: NatsServer) -> None:
    reference = await reference_text()
    async with cluster(tmp_path, namespace, etcd_server.endpoint, private_nats.url) as c:
        async def restart_nats(_: WorkerProcess) -> None:
            await asyncio.to_thread(private_nats.restart)

        result, _ = await _fault_mid_stream(c, restart_nats)
        _assert_complete(result, reference)
        assert await c.migrations() == {"nats_restart": 1}
        # Requests after the restart succeed.
        after = await stream_chat(c.frontend.url, max_tokens=20)
        assert after.text == await reference_text(20)
        await c.assert_no_kv_leak(c.workers, timeout=3.0)


async def test_non_streaming_request_survives_sigkill(tmp_path: Path, namespace: str,
                                                      etcd_server: EtcdServer, nats_server: NatsServer) -> None:
    reference = await reference_text()
    async with cluster(tmp_path, namespace, etcd_server.endpoint, nats_server.url) as c:
        async with aiohttp.ClientSession() as session:
            request = asyncio.create_task(session.post(f"{c.frontend.url}/v1/chat/completions", json=chat_body(False)))
            await asyncio.sleep(1.0)
            victim = await c.serving_worker()
            victim.send_signal(signal.SIGKILL)
            response = await asyncio.wait_for(request, 60)
            assert response.status == 200
            body = await response.json()
        assert body["choices"][0]["message"]["content"] == reference
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == MAX_TOKENS
        assert await c.migrations() == {"killed": 1}
        await c.assert_no_kv_leak([w for w in c.workers if w is not victim])


async def test_migration_limit_zero_ends_stream_with_error_event(tmp_path: Path, namespace: str,
                                                                 etcd_server: EtcdServer, nats_server: NatsServer) -> None:
    async with cluster(tmp_path, namespace, etcd_server.endpoint, nats_server.url, workers=2,
                       frontend_args=["--migration-limit", "0"]) as c:
        async def kill(worker: WorkerProcess) -> None:
            worker.send_signal(signal.SIGKILL)

        result, _ = await _fault_mid_stream(c, kill)
        assert result.error is not None and result.error["code"] == "worker_failed"
        assert result.done  # data: [DONE] follows the error event
        assert result.finish_reason is None
        assert 0 < len(result.text) < len(await reference_text())
        samples = parse_metrics(await c.frontend.metrics_text())
        assert metric(samples, "dynrt_frontend_migrations_exhausted_total") == 1


async def test_every_worker_killed_errors_within_stall_timeout(tmp_path: Path, namespace: str,
                                                               etcd_server: EtcdServer, nats_server: NatsServer) -> None:
    async with cluster(tmp_path, namespace, etcd_server.endpoint, nats_server.url) as c:
        started = asyncio.Event()
        request = asyncio.create_task(stream_chat(c.frontend.url, started))
        await asyncio.wait_for(started.wait(), 20)
        killed_at = time.monotonic()
        for worker in c.workers:
            worker.send_signal(signal.SIGKILL)
        result = await asyncio.wait_for(request, 10)
        took = time.monotonic() - killed_at
        assert result.error is not None and result.error["code"] == "worker_failed"
        assert result.done
        assert took < 2.0 + 1.0  # the stall timeout (default 2 s) plus 1 s


async def test_dead_instance_still_registered_is_skipped_after_one_no_responders(
        tmp_path: Path, namespace: str, etcd_server: EtcdServer, nats_server: NatsServer) -> None:
    """A SIGKILLed worker stays in discovery until its lease expires (10 s). The first
    request sent to it meets NATS no-responders and goes elsewhere at once; the instance
    is then marked down, so no other request is sent to it."""
    async with cluster(tmp_path, namespace, etcd_server.endpoint, nats_server.url, workers=2,
                       frontend_args=["--router-mode", "round-robin"]) as c:
        victim = c.workers[0]
        victim.send_signal(signal.SIGKILL)
        await victim.wait(5)
        expected = await reference_text(20)
        for _ in range(6):
            result = await stream_chat(c.frontend.url, max_tokens=20)
            assert result.error is None and result.text == expected
        assert await c.migrations() == {"no_responders": 1}
