"""``dynrt worker`` (mock engine) as a real subprocess against real etcd and NATS,
driven the way a frontend drives it: ``NatsTransport.call`` on the instance subject,
``Cancel`` on its control subject, frontends registered under leases.

Timing: at ``--speedup 1`` a decode step takes >= 5.74 ms, so a request with
``ignore_eos`` and ``max_tokens`` 4000 runs for >= 23 s — it is "long" in every test
here and is always cancelled, killed, aborted or migrated long before it would end.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from dynrt.runtime import protocol
from dynrt.runtime.discovery import EtcdClient, LeasedRegistration
from dynrt.runtime.embedded import EtcdServer, NatsServer
from dynrt.runtime.mock_tokenizer import EOS_ID, mock_tokenizer
from dynrt.runtime.procs import stop_process
from dynrt.runtime.protocol import (
    ErrorFrame,
    GenerateRequest,
    InstanceRecord,
    MigrateFrame,
    SamplingParams,
    TokenFrame,
    frontend_key,
    instance_key,
    request_subject,
)
from dynrt.runtime.transport import NatsTransport, NoRespondersError, ResponseStream, StreamStalledError
from dynrt.worker.mock_engine import MockEngine, MockEngineConfig
from harness.processes import spawn_dynrt, spawn_python
from harness.waiting import wait_line
from harness.worker import WorkerProcess

LEASE_OWNER = str(Path(__file__).parents[1] / "helpers" / "lease_owner.py")
PROMPT = mock_tokenizer().encode("Once upon a time the river ran through the old town")
LONG = SamplingParams(max_tokens=4000, ignore_eos=True)
BLOCK_SIZE = 16
# The test's own etcd calls: generous, so a starved machine slows them instead of failing them.
ETCD_TIMEOUT = 5.0
# How soon after a kill the worker's /health shows the KV freed. The worker frees it in
# well under 10 ms; the rest is NATS + an HTTP poll of a process that may be starved
# for CPU (103 ms measured once with five CPU burners on two cores).
KILL_FREES_KV_WITHIN = 0.25


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def make_request(sampling: SamplingParams, *, token_ids: list[int] | None = None, frontend_id: str = "fe-test",
                 num_prior_output_tokens: int = 0, model: str = "mock-model") -> GenerateRequest:
    return GenerateRequest(request_id=f"req-{uuid.uuid4().hex[:12]}", model=model,
                           token_ids=list(PROMPT if token_ids is None else token_ids), sampling=sampling,
                           frontend_id=frontend_id, num_prior_output_tokens=num_prior_output_tokens)


async def call(transport: NatsTransport, worker: WorkerProcess, request: GenerateRequest,
               stall_timeout: float = 5.0) -> ResponseStream:
    return await transport.call(worker.record.subject, protocol.encode(request), request_id=request.request_id,
                                stall_timeout=stall_timeout)


class Result:
    def __init__(self) -> None:
        self.frames: list[Any] = []
        self.tokens: list[int] = []
        self.final: TokenFrame | None = None
        self.frame_times: list[float] = []


async def collect(stream: ResponseStream, timeout: float = 30.0) -> Result:
    """Every frame until the end of the stream."""
    result = Result()

    async def run() -> None:
        async for frame in stream:
            result.frames.append(frame)
            result.frame_times.append(time.monotonic())
            if isinstance(frame, TokenFrame):
                assert result.final is None, "a token frame after the final one"
                result.tokens += frame.token_ids
                if frame.finish_reason is not None:
                    result.final = frame

    await asyncio.wait_for(run(), timeout)
    return result


async def read_tokens(stream: ResponseStream, count: int, timeout: float = 10.0) -> list[int]:
    """Read token frames until at least ``count`` tokens arrived (none of them final)."""
    tokens: list[int] = []
    deadline = time.monotonic() + timeout
    while len(tokens) < count:
        frame = await stream.next(max(0.01, deadline - time.monotonic()))
        assert isinstance(frame, TokenFrame), frame
        assert frame.finish_reason is None, frame
        tokens += frame.token_ids
    return tokens


async def reference(request: GenerateRequest) -> tuple[list[int], str | None]:
    """What an uninterrupted mock engine produces for ``request`` (in process, no sleeping)."""
    engine = MockEngine(MockEngineConfig(speedup=math.inf))
    await engine.start()
    tokens: list[int] = []
    finish: str | None = None
    try:
        async for batch in engine.generate(request):
            tokens += batch.token_ids
            finish = batch.finish_reason
    finally:
        await engine.shutdown()
    return tokens, finish


async def health(http: aiohttp.ClientSession, worker: WorkerProcess) -> tuple[int, dict[str, Any]]:
    async with http.get(worker.health_url) as response:
        return response.status, await response.json()


async def wait_health(http: aiohttp.ClientSession, worker: WorkerProcess, what: str, timeout: float,
                      **expected: Any) -> float:
    """Poll ``/health`` until every field in ``expected`` has that value; the seconds it took."""
    start = time.monotonic()
    body: dict[str, Any] = {}
    while True:
        _, body = await health(http, worker)
        if all(body.get(k) == v for k, v in expected.items()):
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: {expected} not reached within {timeout}s; last /health: {body}")
        await asyncio.sleep(0.005)


async def wait_kv_free(http: aiohttp.ClientSession, worker: WorkerProcess, timeout: float) -> float:
    return await wait_health(http, worker, "KV freed", timeout, kv_blocks_used=0, running=0, waiting=0, in_flight=0)


async def instance_keys(etcd_endpoint: str, namespace: str) -> list[str]:
    etcd = EtcdClient(etcd_endpoint, timeout=ETCD_TIMEOUT)
    try:
        _, values = await etcd.get_prefix(protocol.instances_prefix(namespace))
        return sorted(values)
    finally:
        await etcd.close()


async def instance_record(etcd_endpoint: str, key: str) -> InstanceRecord:
    etcd = EtcdClient(etcd_endpoint, timeout=ETCD_TIMEOUT)
    try:
        value = await etcd.get(key)
    finally:
        await etcd.close()
    assert value is not None, f"{key} not in etcd"
    return protocol.instance_record_decoder.decode(value)


# ---------------------------------------------------------------------------
# fixtures: one worker shared by the tests that only send requests to it
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def shared_worker(etcd_server: EtcdServer, nats_server: NatsServer,
                        tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WorkerProcess]:
    namespace = "t" + uuid.uuid4().hex[:10]
    async with WorkerProcess(tmp_path_factory.mktemp("shared-worker"), namespace=namespace,
                             etcd_endpoints=etcd_server.endpoint, nats_url=nats_server.url, speedup=1,
                             args=["--num-blocks", "1024", "--context-length", "8192"]) as worker:
        yield worker


@pytest.fixture(scope="module")
async def transport(nats_server: NatsServer) -> AsyncIterator[NatsTransport]:
    t = await NatsTransport.connect(nats_server.url, name="test-frontend")
    yield t
    await t.close()


@pytest.fixture(scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


def start_worker(tmp_path: Path, etcd_server: EtcdServer, nats_server: NatsServer, namespace: str,
                 *args: str, speedup: float = 1, **kwargs: Any) -> WorkerProcess:
    return WorkerProcess(tmp_path, namespace=namespace, etcd_endpoints=etcd_server.endpoint,
                         nats_url=nats_server.url, speedup=speedup, args=list(args), **kwargs)


# ---------------------------------------------------------------------------
# registration, streaming, determinism
# ---------------------------------------------------------------------------


async def test_registers_instance_record_under_lease_and_answers_ping(
        shared_worker: WorkerProcess, etcd_server: EtcdServer, transport: NatsTransport,
        http: aiohttp.ClientSession) -> None:
    record = shared_worker.record
    ns = shared_worker.namespace
    assert record.namespace == ns
    assert (record.component, record.endpoint) == ("backend", "generate")
    assert record.subject == request_subject(ns, "backend", "generate", record.instance_id)
    assert (record.model, record.engine) == ("mock-model", "mock")
    assert (record.block_size, record.kv_blocks_total) == (16, 1024)
    assert (record.context_length, record.max_num_seqs) == (8192, 256)
    assert record.tokenizer == protocol.TokenizerSpec(kind="mock")
    assert record.pid == shared_worker.pid
    assert record.system_port > 0
    assert await instance_keys(etcd_server.endpoint, ns) == [instance_key(ns, "backend", "generate", record.instance_id)]

    # The key is attached to a live lease (it vanishes when the process dies).
    etcd = EtcdClient(etcd_server.endpoint, timeout=ETCD_TIMEOUT)
    try:
        kv = await etcd.call(lambda c: c.get(shared_worker.key.encode()))
        assert kv is not None and kv.lease != 0
        ttl = await etcd.call(lambda c: c.get_lease_info(kv.lease))
        assert 0 < ttl.TTL <= 10
    finally:
        await etcd.close()

    pong = await transport.ping(record.subject, timeout=2.0)
    assert pong.in_flight == 0
    status, body = await health(http, shared_worker)
    assert status == 200
    assert body["status"] == "ready" and body["registered"] is True
    assert body["instance_id"] == record.instance_id
    assert (body["kv_blocks_used"], body["kv_blocks_total"]) == (0, 1024)


async def test_streams_tokens_incrementally_and_matches_reference(
        shared_worker: WorkerProcess, transport: NatsTransport, http: aiohttp.ClientSession) -> None:
    request = make_request(SamplingParams(max_tokens=100, ignore_eos=True, seed=7))
    expected, _ = await reference(request)
    started = time.monotonic()
    result = await collect(await call(transport, shared_worker, request))
    assert [type(f) for f in result.frames] == [TokenFrame] * len(result.frames)
    assert result.tokens == expected
    assert len(result.tokens) == 100
    assert result.final is not None and result.final.finish_reason == "length"
    assert result.final.usage == protocol.Usage(prompt_tokens=len(PROMPT), completion_tokens=100, cached_tokens=0)
    # Streamed, not delivered at the end: 99 decode steps take >= 99 x 5.74 ms at speedup 1.
    assert len(result.frames) >= 10
    assert result.frame_times[-1] - result.frame_times[0] >= 0.4
    assert result.frame_times[0] - started < result.frame_times[-1] - started
    assert await wait_kv_free(http, shared_worker, 1.0) <= 1.0


async def test_natural_eos_finishes_with_stop(shared_worker: WorkerProcess, transport: NatsTransport) -> None:
    # Seed 2 on PROMPT makes the engine's own EOS rule fire at token 64.
    request = make_request(SamplingParams(max_tokens=1000, seed=2))
    expected, finish = await reference(request)
    assert (len(expected), finish) == (64, "stop")
    result = await collect(await call(transport, shared_worker, request))
    assert result.tokens == expected
    assert result.tokens[-1] == EOS_ID
    assert result.final is not None and result.final.finish_reason == "stop"
    assert result.final.usage is not None and result.final.usage.completion_tokens == 64


async def test_output_is_deterministic_and_continues_from_a_prefix(
        shared_worker: WorkerProcess, transport: NatsTransport) -> None:
    n, k = 60, 23
    sampling = SamplingParams(max_tokens=n, ignore_eos=True, seed=11)
    first = await collect(await call(transport, shared_worker, make_request(sampling)))
    second = await collect(await call(transport, shared_worker, make_request(sampling)))
    assert len(first.tokens) == n
    assert second.tokens == first.tokens

    head = await collect(await call(transport, shared_worker,
                                    make_request(SamplingParams(max_tokens=k, ignore_eos=True, seed=11))))
    assert head.tokens == first.tokens[:k]
    tail_request = make_request(SamplingParams(max_tokens=n - k, ignore_eos=True, seed=11),
                                token_ids=PROMPT + head.tokens, num_prior_output_tokens=k)
    tail = await collect(await call(transport, shared_worker, tail_request))
    assert head.tokens + tail.tokens == first.tokens
    assert tail.final is not None and tail.final.finish_reason == "length"
    assert tail.final.usage is not None
    assert (tail.final.usage.prompt_tokens, tail.final.usage.completion_tokens) == (len(PROMPT) + k, n - k)


async def test_logprobs_one_entry_per_token_in_every_frame(
        shared_worker: WorkerProcess, transport: NatsTransport) -> None:
    sampling = SamplingParams(max_tokens=40, ignore_eos=True, seed=5, logprobs=2)
    result = await collect(await call(transport, shared_worker, make_request(sampling)))
    frames = [f for f in result.frames if isinstance(f, TokenFrame)]
    assert len(frames) > 1 and len(result.tokens) == 40
    for frame in frames:
        assert frame.logprobs is not None and len(frame.logprobs) == len(frame.token_ids)
    entries = [e for f in frames for e in f.logprobs or []]
    assert [e.top_ids[0] for e in entries] == result.tokens
    assert all(len(e.top_ids) == 2 for e in entries)
    expected, _ = await reference(make_request(sampling))
    assert result.tokens == expected
    plain = await collect(await call(transport, shared_worker, make_request(SamplingParams(max_tokens=5))))
    assert all(f.logprobs is None for f in plain.frames if isinstance(f, TokenFrame))


async def test_structured_output_is_a_bad_request_on_the_mock(
        shared_worker: WorkerProcess, transport: NatsTransport) -> None:
    sampling = SamplingParams(structured=protocol.StructuredOutput(json_object=True))
    result = await collect(await call(transport, shared_worker, make_request(sampling)))
    assert len(result.frames) == 1
    frame = result.frames[0]
    assert isinstance(frame, ErrorFrame) and frame.code == "bad_request"
    assert "no structured output backend" in frame.message


async def test_usage_reports_prefix_cache_hits(shared_worker: WorkerProcess, transport: NatsTransport) -> None:
    prompt = mock_tokenizer().encode("Prefix caching: the second request reuses the first one's blocks, " * 3)
    # Many tokens, so the answer spans several frames however loaded the machine is.
    sampling = SamplingParams(max_tokens=100, ignore_eos=True)
    first = await collect(await call(transport, shared_worker, make_request(sampling, token_ids=prompt)))
    second = await collect(await call(transport, shared_worker, make_request(sampling, token_ids=prompt)))
    assert second.tokens == first.tokens
    assert first.final is not None and first.final.usage is not None
    assert second.final is not None and second.final.usage is not None
    # Every full block of the prompt except the one holding its last token is a hit.
    hits = (len(prompt) - 1) // BLOCK_SIZE * BLOCK_SIZE
    assert hits >= 3 * BLOCK_SIZE
    assert (first.final.usage.cached_tokens, second.final.usage.cached_tokens) == (0, hits)


@asynccontextmanager
async def load_reports_of(worker: WorkerProcess, transport: NatsTransport) -> AsyncIterator[list[protocol.LoadReport]]:
    """The worker's load reports, collected (in arrival order) while the block runs."""
    reports: list[protocol.LoadReport] = []

    async def on_report(msg: Any) -> None:
        report = protocol.load_report_decoder.decode(msg.data)
        if report.instance_id == worker.record.instance_id:
            reports.append(report)

    sub = await transport.nc.subscribe(protocol.load_subject(worker.namespace, "mock-model"), cb=on_report)
    try:
        yield reports
    finally:
        await sub.unsubscribe()


async def test_load_reports_count_received_requests_per_sender(
        shared_worker: WorkerProcess, transport: NatsTransport) -> None:
    """Every generate request counts under its frontend id and, if set, its router id;
    load reports carry the cumulative counts (routers acknowledge assignments by them)."""
    async with load_reports_of(shared_worker, transport) as reports:
        frontend, router = f"fe-{uuid.uuid4().hex[:8]}", f"router-{uuid.uuid4().hex[:8]}"
        sampling = SamplingParams(max_tokens=2, ignore_eos=True)
        for k in range(3):
            request = make_request(sampling, frontend_id=frontend)
            if k:
                request.router_id = router
            await collect(await call(transport, shared_worker, request))
        deadline = time.monotonic() + 5
        while not (reports and (reports[-1].received or {}).get(frontend) == 3):
            assert time.monotonic() < deadline, f"no report counting 3 requests: {reports[-1:]}"
            await asyncio.sleep(0.05)
        assert reports[-1].received is not None and reports[-1].received[router] == 2


async def test_idle_worker_reports_at_its_idle_heartbeat_busy_at_the_load_heartbeat(
        shared_worker: WorkerProcess, transport: NatsTransport) -> None:
    """Idle (nothing running or waiting) the worker's unchanged reports come every
    --load-heartbeat-idle (1 s) and say so; serving, every --load-heartbeat (0.1 s)."""
    async with load_reports_of(shared_worker, transport) as reports:
        await asyncio.sleep(0.5)  # any report of an earlier test's last request
        reports.clear()
        await asyncio.sleep(2.2)
        idle = list(reports)
        assert 1 <= len(idle) <= 4, [(r.running, r.heartbeat) for r in idle]
        assert all(r.heartbeat == 1.0 and r.running == 0 and r.waiting == 0 for r in idle)
        stream = await call(transport, shared_worker, make_request(LONG))
        await read_tokens(stream, 5)
        reports.clear()
        await asyncio.sleep(1.0)
        busy = list(reports)
        await stream.cancel("kill")
        assert len(busy) >= 6, len(busy)
        assert all(r.heartbeat == 0.1 and r.running == 1 for r in busy)


async def test_out_of_vocabulary_prompt_is_a_bad_request(
        shared_worker: WorkerProcess, transport: NatsTransport, http: aiohttp.ClientSession) -> None:
    vocab = mock_tokenizer().vocab_size
    result = await collect(await call(transport, shared_worker, make_request(SamplingParams(), token_ids=[5, vocab])))
    assert len(result.frames) == 1
    frame = result.frames[0]
    assert isinstance(frame, ErrorFrame) and frame.code == "bad_request"
    assert "out of vocabulary" in frame.message
    status, body = await health(http, shared_worker)
    assert status == 200 and body["kv_blocks_used"] == 0


# ---------------------------------------------------------------------------
# cancellation
# ---------------------------------------------------------------------------


async def test_stop_finishes_with_cancelled_and_frees_kv(
        shared_worker: WorkerProcess, transport: NatsTransport, http: aiohttp.ClientSession) -> None:
    request = make_request(LONG)
    stream = await call(transport, shared_worker, request)
    got = await read_tokens(stream, 20)
    status, body = await health(http, shared_worker)
    assert body["running"] == 1 and body["kv_blocks_used"] >= math.ceil((len(PROMPT) + 20) / BLOCK_SIZE)
    await stream.cancel("stop")
    rest = await collect(stream, timeout=5)
    tokens = got + rest.tokens
    # "stop" ends the stream cleanly after the current step: a final frame, then the end.
    assert rest.final is not None and rest.final.finish_reason == "cancelled"
    assert rest.frames[-1] is rest.final
    assert all(isinstance(f, TokenFrame) for f in rest.frames)
    assert 20 <= len(tokens) < 4000
    assert rest.final.usage is not None and rest.final.usage.completion_tokens == len(tokens)
    expected, _ = await reference(make_request(SamplingParams(max_tokens=len(tokens), ignore_eos=True)))
    assert tokens == expected
    assert await wait_kv_free(http, shared_worker, 1.0) <= 1.0


async def test_kill_ends_at_once_and_frees_kv_at_once(
        shared_worker: WorkerProcess, transport: NatsTransport, http: aiohttp.ClientSession) -> None:
    stream = await call(transport, shared_worker, make_request(LONG))
    await read_tokens(stream, 20)
    _, body = await health(http, shared_worker)
    assert body["running"] == 1 and body["kv_blocks_used"] > 0
    killed_at = time.monotonic()
    await stream.cancel("kill")
    assert stream.done  # the caller's side ends at once
    with pytest.raises(StopAsyncIteration):
        await stream.__anext__()
    await wait_kv_free(http, shared_worker, 2.0)
    assert time.monotonic() - killed_at <= KILL_FREES_KV_WITHIN
    pong = await transport.ping(shared_worker.record.subject, timeout=2.0)
    assert pong.in_flight == 0


async def test_closing_a_stream_early_kills_the_request(
        shared_worker: WorkerProcess, transport: NatsTransport, http: aiohttp.ClientSession) -> None:
    stream = await call(transport, shared_worker, make_request(LONG))
    await read_tokens(stream, 5)
    closed_at = time.monotonic()
    await stream.aclose()
    await wait_kv_free(http, shared_worker, 2.0)
    assert time.monotonic() - closed_at <= KILL_FREES_KV_WITHIN


async def test_concurrent_streams_are_independent(
        shared_worker: WorkerProcess, transport: NatsTransport, http: aiohttp.ClientSession) -> None:
    requests = [make_request(SamplingParams(max_tokens=30 + 10 * i, ignore_eos=True, seed=i)) for i in range(8)]
    streams = [await call(transport, shared_worker, r) for r in requests]
    results = await asyncio.gather(*(collect(s) for s in streams))
    for request, result in zip(requests, results):
        expected, _ = await reference(request)
        assert result.tokens == expected
        assert result.final is not None and result.final.finish_reason == "length"
    assert await wait_kv_free(http, shared_worker, 1.0) <= 1.0


async def test_duplicate_request_id_leaves_the_original_cancellable(
        etcd_server: EtcdServer, nats_server: NatsServer, namespace: str, tmp_path: Path,
        transport: NatsTransport, http: aiohttp.ClientSession) -> None:
    # Its own worker: while the bug is there the original request cannot be stopped.
    async with start_worker(tmp_path, etcd_server, nats_server, namespace) as worker:
        original = make_request(LONG)
        stream = await call(transport, worker, original)
        await read_tokens(stream, 3)
        duplicate = await collect(await call(transport, worker, original))
        assert [type(f) for f in duplicate.frames] == [ErrorFrame]
        assert duplicate.frames[0].code == "in_flight"  # the caller may reattach instead
        _, body = await health(http, worker)
        assert (body["running"], body["in_flight"]) == (1, 1)
        await stream.cancel("kill")
        await wait_kv_free(http, worker, 1.0)


# ---------------------------------------------------------------------------
# SIGTERM: deregister, drain, migrate
# ---------------------------------------------------------------------------


async def test_sigterm_deregisters_and_drains_in_flight_request(
        etcd_server: EtcdServer, nats_server: NatsServer, namespace: str, tmp_path: Path,
        transport: NatsTransport, http: aiohttp.ClientSession) -> None:
    async with start_worker(tmp_path, etcd_server, nats_server, namespace, "--drain-timeout", "20") as worker:
        request = make_request(SamplingParams(max_tokens=300, ignore_eos=True, seed=3))
        expected, _ = await reference(request)
        stream = await call(transport, worker, request)
        got = await read_tokens(stream, 10)
        worker.terminate()
        term_at = time.monotonic()

        # Deregistered first: the record is marked draining (routers send nothing new;
        # the key itself stays until exit so frontends do not migrate the open stream),
        # new calls find nobody, /health says draining while /live still answers.
        while not (record := await instance_record(etcd_server.endpoint, worker.key)).draining:
            assert time.monotonic() - term_at < 1.0, f"record not marked draining 1 s after SIGTERM: {record}"
            await asyncio.sleep(0.02)
        assert msgspec.structs.replace(record, draining=False) == worker.record
        status, body = await health(http, worker)
        assert (status, body["status"]) == (503, "draining")
        assert body["in_flight"] == 1
        async with http.get(worker.live_url) as live:
            assert live.status == 200
        late = make_request(SamplingParams(max_tokens=5))
        late_stream = await call(transport, worker, late)
        with pytest.raises(NoRespondersError):
            await late_stream.next(5.0)

        # The in-flight request completes in full, then the process exits 0.
        rest = await collect(stream)
        assert got + rest.tokens == expected
        assert len(expected) == 300
        assert rest.final is not None and rest.final.finish_reason == "length"
        assert not any(isinstance(f, (MigrateFrame, ErrorFrame)) for f in rest.frames)
        assert await worker.wait(10) == 0
        assert await instance_keys(etcd_server.endpoint, namespace) == []
        assert "drain_timeout_migrating" not in worker.log_text()


async def test_sigterm_past_drain_timeout_sends_migrate_frame(
        etcd_server: EtcdServer, nats_server: NatsServer, namespace: str, tmp_path: Path,
        transport: NatsTransport) -> None:
    drain_timeout = 1.0
    async with start_worker(tmp_path, etcd_server, nats_server, namespace,
                            "--drain-timeout", str(drain_timeout)) as worker:
        short = make_request(SamplingParams(max_tokens=40, ignore_eos=True, seed=4))
        long = make_request(LONG)
        long_stream = await call(transport, worker, long)
        short_stream = await call(transport, worker, short)
        await read_tokens(long_stream, 5)
        worker.terminate()
        term_at = time.monotonic()
        short_result, long_result = await asyncio.gather(collect(short_stream), collect(long_stream))
        # The short one finished within the drain timeout; the long one was told to migrate.
        assert short_result.final is not None and short_result.final.finish_reason == "length"
        assert short_result.tokens == (await reference(short))[0]
        assert isinstance(long_result.frames[-1], MigrateFrame)
        assert long_result.frames[-1].reason == "drain"
        assert long_result.final is None
        assert all(isinstance(f, TokenFrame) for f in long_result.frames[:-1])
        migrate_after = long_result.frame_times[-1] - term_at
        assert drain_timeout <= migrate_after <= drain_timeout + 2.0
        assert await worker.wait(10) == 0
        assert await instance_keys(etcd_server.endpoint, namespace) == []
        assert "drain_timeout_migrating" in worker.log_text()


# ---------------------------------------------------------------------------
# dead frontends
# ---------------------------------------------------------------------------


async def test_dead_frontends_requests_are_aborted_within_lease_ttl(
        etcd_server: EtcdServer, nats_server: NatsServer, namespace: str, tmp_path: Path,
        transport: NatsTransport, http: aiohttp.ClientSession) -> None:
    ttl = 2
    # A frontend that stays alive (in this process) and one that dies (a subprocess).
    live_frontend = LeasedRegistration(EtcdClient(etcd_server.endpoint), ttl=ttl)
    await live_frontend.start(wait=5)
    await live_frontend.put(frontend_key(namespace, "fe-live"), b"alive")
    owner = spawn_python([LEASE_OWNER, etcd_server.endpoint, frontend_key(namespace, "fe-dead"), str(ttl)],
                         tmp_path / "frontend.log")
    try:
        await asyncio.to_thread(wait_line, tmp_path / "frontend.log", "registered", 15, owner)
        async with start_worker(tmp_path, etcd_server, nats_server, namespace, "--lease-ttl", str(ttl)) as worker:
            doomed = [await call(transport, worker, make_request(LONG, frontend_id="fe-dead"), stall_timeout=1.0)
                      for _ in range(2)]
            kept = await call(transport, worker, make_request(LONG, frontend_id="fe-live"), stall_timeout=1.0)
            for stream in (*doomed, kept):
                await read_tokens(stream, 5)
            _, body = await health(http, worker)
            assert (body["running"], body["in_flight"]) == (3, 3)

            owner.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            await asyncio.to_thread(owner.wait)
            await wait_health(http, worker, "dead frontend's requests aborted", ttl + 2, running=1, in_flight=1)
            aborted_after = time.monotonic() - killed_at
            assert aborted_after <= ttl + 1

            # The dead frontend's streams just stop (nobody reads them any more): no final frame.
            for stream in doomed:
                with pytest.raises(StreamStalledError):
                    while True:
                        frame = await stream.__anext__()
                        assert isinstance(frame, TokenFrame) and frame.finish_reason is None
            # The live frontend's request goes on.
            await read_tokens(kept, 20, timeout=5)
            _, body = await health(http, worker)
            assert (body["running"], body["in_flight"]) == (1, 1)
            await kept.cancel("kill")
            assert await wait_kv_free(http, worker, 1.0) <= 1.0
            assert "frontend_gone_aborting" in worker.log_text()
    finally:
        stop_process(owner)
        await live_frontend.close()


# ---------------------------------------------------------------------------
# health: /live vs /health, canary, check_health
# ---------------------------------------------------------------------------


async def test_live_is_independent_of_load_while_health_reports_counts(
        shared_worker: WorkerProcess, transport: NatsTransport, http: aiohttp.ClientSession) -> None:
    streams = [await call(transport, shared_worker, make_request(LONG)) for _ in range(4)]
    for stream in streams:
        await read_tokens(stream, 3)
    async with http.get(shared_worker.live_url) as live:
        assert live.status == 200
        assert await live.json() == {"status": "live"}
    status, body = await health(http, shared_worker)
    assert status == 200
    assert (body["status"], body["running"], body["waiting"], body["in_flight"]) == ("ready", 4, 0, 4)
    # The four share PROMPT's first (cached) block; each holds its own blocks after it.
    assert body["kv_blocks_used"] >= 1 + 4 * (math.ceil((len(PROMPT) + 3) / BLOCK_SIZE) - 1)
    for stream in streams:
        await stream.cancel("kill")
    assert await wait_kv_free(http, shared_worker, 1.0) <= 1.0


async def test_canary_runs_when_idle_and_keeps_a_healthy_worker_up(
        etcd_server: EtcdServer, nats_server: NatsServer, namespace: str, tmp_path: Path,
        transport: NatsTransport, http: aiohttp.ClientSession) -> None:
    async with start_worker(tmp_path, etcd_server, nats_server, namespace, "--log-level", "debug",
                            canary_after=0.5) as worker:
        deadline = time.monotonic() + 5
        while worker.log_text().count("event=canary_ok") < 2:
            assert time.monotonic() < deadline, f"no two canaries in 5 s:\n{worker.log_tail()}"
            assert worker.alive()
            await asyncio.sleep(0.05)
        # No canary while a request is in flight (0.3 s of decoding > canary_after).
        before = worker.log_text().count("event=canary_ok")
        result = await collect(await call(transport, worker, make_request(SamplingParams(max_tokens=150,
                                                                                          ignore_eos=True))))
        assert len(result.tokens) == 150
        assert worker.log_text().count("event=canary_ok") == before
        status, body = await health(http, worker)
        assert (status, body["status"]) == (200, "ready")
        assert worker.alive()
        assert await instance_keys(etcd_server.endpoint, namespace) == [worker.key]


async def test_canary_failure_deregisters_and_exits_1(
        etcd_server: EtcdServer, nats_server: NatsServer, namespace: str, tmp_path: Path) -> None:
    # At speedup 0.02 the canary's 3-token prefill takes 16.5 ms / 0.02 = 0.83 s > its 0.2 s timeout.
    async with start_worker(tmp_path, etcd_server, nats_server, namespace, "--canary-timeout", "0.2",
                            speedup=0.02, canary_after=1) as worker:
        assert await instance_keys(etcd_server.endpoint, namespace) == [worker.key]
        assert await worker.wait(10) == 1
        assert await instance_keys(etcd_server.endpoint, namespace) == []
        log = worker.log_text()
        assert "event=worker_unhealthy" in log and "TimeoutError" in log
        assert "exit_code=1" in log


async def test_health_check_failure_migrates_in_flight_deregisters_and_exits_1(
        etcd_server: EtcdServer, nats_server: NatsServer, namespace: str, tmp_path: Path,
        transport: NatsTransport) -> None:
    async with start_worker(tmp_path, etcd_server, nats_server, namespace, "--fail-health-check",
                            health_period=1) as worker:
        assert await instance_keys(etcd_server.endpoint, namespace) == [worker.key]
        # A request in flight when the check fails is handed off at once (no drain wait).
        stream = await call(transport, worker, make_request(LONG))
        await read_tokens(stream, 1)
        result = await collect(stream, timeout=10)
        assert isinstance(result.frames[-1], MigrateFrame) and result.final is None
        assert await worker.wait(10) == 1
        assert await instance_keys(etcd_server.endpoint, namespace) == []
        log = worker.log_text()
        assert "event=worker_unhealthy" in log and "configured to fail its health check" in log


# ---------------------------------------------------------------------------
# worker-side limits and engine selection
# ---------------------------------------------------------------------------


async def test_max_queued_answers_busy_at_once(
        etcd_server: EtcdServer, nats_server: NatsServer, namespace: str, tmp_path: Path,
        transport: NatsTransport, http: aiohttp.ClientSession) -> None:
    async with start_worker(tmp_path, etcd_server, nats_server, namespace, "--max-num-seqs", "1",
                            "--max-queued", "1") as worker:
        running = await call(transport, worker, make_request(LONG))
        await read_tokens(running, 1)
        queued = await call(transport, worker, make_request(LONG))
        await wait_health(http, worker, "second request queued", 2.0, running=1, waiting=1)

        sent_at = time.monotonic()
        busy = await collect(await call(transport, worker, make_request(LONG)), timeout=5)
        assert time.monotonic() - sent_at < 0.5
        assert len(busy.frames) == 1
        frame = busy.frames[0]
        assert isinstance(frame, ErrorFrame) and frame.code == "busy"
        assert "queue full" in frame.message

        # A free queue slot takes requests again.
        await queued.cancel("kill")
        await wait_health(http, worker, "queue slot freed", 2.0, running=1, waiting=0)
        accepted = await call(transport, worker, make_request(SamplingParams(max_tokens=5, ignore_eos=True)))
        await wait_health(http, worker, "third request queued", 2.0, running=1, waiting=1)
        await running.cancel("kill")
        result = await collect(accepted)
        assert len(result.tokens) == 5 and result.final is not None and result.final.finish_reason == "length"
        assert await wait_kv_free(http, worker, 1.0) <= 1.0


def test_vllm_engine_without_vllm_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    # Whether or not this venv has vLLM: a shadow package first on PYTHONPATH makes
    # ``import vllm`` fail in the worker exactly as it does where vLLM is not installed.
    shadow = tmp_path / "no-vllm" / "vllm"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ModuleNotFoundError("No module named \'vllm\'", name="vllm")\n')
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(shadow.parent), os.environ.get("PYTHONPATH")]))}
    # No --engine: vLLM is the default. Unreachable etcd and NATS: the engine check must
    # come before any connection.
    log_path = tmp_path / "vllm-worker.log"
    proc = spawn_dynrt(["worker", "--model", "facebook/opt-125m", "--etcd-endpoints", "127.0.0.1:9",
                        "--nats-url", "nats://127.0.0.1:9"], log_path, env=env)
    try:
        assert proc.wait(30) == 2
    finally:
        stop_process(proc)
    output = log_path.read_text()
    assert "--engine vllm (the default) needs vLLM" in output
    assert "pip install 'dynrt[vllm]'" in output and "deploy/vllm-cpu/install.sh" in output
    assert "No module named 'vllm'" in output
    assert "Traceback" not in output
    # --help still works there: dynrt's flags, and a note where vLLM's would be.
    help_log = tmp_path / "help.log"
    proc = spawn_dynrt(["worker", "--help"], help_log, env=env)
    try:
        assert proc.wait(30) == 0
    finally:
        stop_process(proc)
    text = " ".join(help_log.read_text().split())
    assert "--namespace" in text and "--drain-timeout" in text
    assert "vLLM is not installed here" in text and "Traceback" not in text
