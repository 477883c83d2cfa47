"""Resumable streams, the worker's side (issue 18): ``dynrt worker`` (mock engine) as a
real subprocess against real etcd and NATS, driven the way a frontend drives it —
``Cancel(detach)``, reattach with ``NatsTransport.call(..., reattach_from=M)``, a
frontend's lease going away.

At ``--speedup 1`` a decode step takes >= 5.74 ms: 300 tokens take >= 1.7 s.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from dynrt.runtime import protocol
from dynrt.runtime.discovery import EtcdClient, LeasedRegistration
from dynrt.runtime.embedded import EtcdServer, NatsServer
from dynrt.runtime.procs import stop_process
from dynrt.runtime.protocol import (
    ErrorFrame,
    GenerateRequest,
    SamplingParams,
    TokenFrame,
    control_subject,
    frontend_key,
)
from dynrt.runtime.transport import CALLER_HEADER, NatsTransport, ResponseStream
from harness.processes import spawn_python
from harness.waiting import wait_line
from harness.worker import WorkerProcess
from tests.integration.test_worker import (
    LEASE_OWNER,
    LONG,
    Result,
    collect,
    make_request,
    read_tokens,
    reference,
    start_worker,
    wait_health,
    wait_kv_free,
)

GRACE = 10.0


def resumable(sampling: SamplingParams, grace: float = GRACE, **kwargs: str) -> GenerateRequest:
    request = make_request(sampling, **kwargs)  # type: ignore[arg-type]
    request.resume_grace = grace
    return request


async def call(transport: NatsTransport, worker: WorkerProcess, request: GenerateRequest) -> ResponseStream:
    return await transport.call(worker.record.subject, protocol.encode(request), request_id=request.request_id,
                                stall_timeout=5.0)


async def reattach(transport: NatsTransport, worker: WorkerProcess, request_id: str, start: int,
                   frontend_id: str = "") -> ResponseStream:
    return await transport.call(worker.record.subject, b"", request_id=request_id, stall_timeout=5.0,
                                reattach_from=start, frontend_id=frontend_id)


async def gauge(http: aiohttp.ClientSession, worker: WorkerProcess, name: str) -> float:
    async with http.get(worker.metrics_url) as response:
        for line in (await response.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not exported by the worker")


def assert_not_found(result: Result) -> None:
    assert len(result.frames) == 1, result.frames
    frame = result.frames[0]
    assert isinstance(frame, ErrorFrame) and frame.code == "not_found", frame


@pytest.fixture(scope="module")
async def worker(etcd_server: EtcdServer, nats_server: NatsServer,
                 tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WorkerProcess]:
    async with WorkerProcess(tmp_path_factory.mktemp("resumable-worker"), namespace="tres",
                             etcd_endpoints=etcd_server.endpoint, nats_url=nats_server.url, speedup=1,
                             args=["--num-blocks", "1024", "--context-length", "8192"]) as w:
        yield w


@pytest.fixture(scope="module")
async def transport(nats_server: NatsServer) -> AsyncIterator[NatsTransport]:
    t = await NatsTransport.connect(nats_server.url, name="test-frontend")
    yield t
    await t.close()


@pytest.fixture(scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


async def test_detached_request_keeps_generating_and_reattach_gets_exactly_the_rest(
        worker: WorkerProcess, transport: NatsTransport, http: aiohttp.ClientSession) -> None:
    request = resumable(SamplingParams(max_tokens=300, ignore_eos=True, seed=3, logprobs=1))
    expected, _ = await reference(request)
    stream = await call(transport, worker, request)
    got = await read_tokens(stream, 20)
    await stream.cancel("detach")
    assert stream.done  # the caller's side ends at once
    await wait_health(http, worker, "detached", 2.0, detached_requests=1, running=1)
    await asyncio.sleep(0.3)  # it keeps generating meanwhile

    # A caller claiming more tokens than were generated: not_found, the request goes on.
    assert_not_found(await collect(await reattach(transport, worker, request.request_id, 10**6)))

    start = len(got) - 5  # the client lost the last frames its frontend received
    result = await collect(await reattach(transport, worker, request.request_id, start))
    replay = result.frames[0]
    assert isinstance(replay, TokenFrame) and replay.finish_reason is None
    assert len(replay.token_ids) >= 5 + 20, "generated nothing while detached"
    assert got[:start] + result.tokens == expected
    assert result.final is not None and result.final.finish_reason == "length"
    assert result.final.usage is not None and result.final.usage.completion_tokens == 300
    logprobs = [e for f in result.frames if isinstance(f, TokenFrame) for e in f.logprobs or []]
    assert [e.top_ids[0] for e in logprobs] == expected[start:]
    # Finished while attached: kept a short while for a reattach, then dropped.
    await wait_health(http, worker, "finished", 2.0, detached_requests=0, retained_outputs=1)
    assert await wait_kv_free(http, worker, 1.0) <= 1.0
    assert "request_detached" in worker.log_text() and "request_reattached" in worker.log_text()
    # The finished output can be picked up once: a reattach takes it.
    tail = await collect(await reattach(transport, worker, request.request_id, 300))
    assert tail.tokens == [] and tail.final is not None and tail.final.finish_reason == "length"
    await wait_health(http, worker, "taken", 1.0, retained_outputs=0)


async def test_reattach_after_finishing_detached_gets_the_rest_with_finish_reason(
        worker: WorkerProcess, transport: NatsTransport, http: aiohttp.ClientSession) -> None:
    request = resumable(SamplingParams(max_tokens=60, ignore_eos=True, seed=9))
    expected, _ = await reference(request)
    stream = await call(transport, worker, request)
    got = await read_tokens(stream, 10)
    await stream.cancel("detach")
    await wait_health(http, worker, "finished while detached", 5.0, running=0, in_flight=0, detached_requests=0,
                      retained_outputs=1)
    result = await collect(await reattach(transport, worker, request.request_id, len(got)))
    assert [type(f) for f in result.frames] == [TokenFrame]
    assert got + result.tokens == expected
    assert result.final is not None and result.final.finish_reason == "length"
    usage = result.final.usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (len(request.token_ids), 60)
    await wait_health(http, worker, "dropped on reattach", 1.0, retained_outputs=0)
    assert_not_found(await collect(await reattach(transport, worker, request.request_id, len(got))))


async def test_grace_expiry_kills_the_request_frees_kv_and_forgets_it(
        worker: WorkerProcess, transport: NatsTransport, http: aiohttp.ClientSession) -> None:
    grace = 1.0
    request = resumable(LONG, grace=grace)
    stream = await call(transport, worker, request)
    await read_tokens(stream, 5)
    await stream.cancel("detach")
    detached_at = time.monotonic()
    await wait_health(http, worker, "detached", 1.0, detached_requests=1, running=1)
    assert await gauge(http, worker, "dynrt_worker_detached_requests") == 1
    await wait_kv_free(http, worker, grace + 2.0)
    assert time.monotonic() - detached_at >= grace - 0.05
    await wait_health(http, worker, "forgotten", 1.0, detached_requests=0, retained_outputs=0)
    assert_not_found(await collect(await reattach(transport, worker, request.request_id, 5)))
    assert "detached_expired" in worker.log_text()
    assert await gauge(http, worker, "dynrt_worker_detached_requests") == 0
    assert await gauge(http, worker, "dynrt_worker_retained_outputs") == 0


async def test_detaching_a_non_resumable_request_kills_it(
        worker: WorkerProcess, transport: NatsTransport, http: aiohttp.ClientSession) -> None:
    request = make_request(LONG)
    stream = await call(transport, worker, request)
    await read_tokens(stream, 5)
    await stream.cancel("detach")
    assert await wait_kv_free(http, worker, 1.0) <= 1.0
    await wait_health(http, worker, "nothing kept", 1.0, detached_requests=0, retained_outputs=0)
    assert_not_found(await collect(await reattach(transport, worker, request.request_id, 5)))


async def test_taking_over_an_attached_stream_tells_the_old_caller_and_loses_nothing(
        worker: WorkerProcess, transport: NatsTransport, http: aiohttp.ClientSession) -> None:
    request = resumable(SamplingParams(max_tokens=300, ignore_eos=True, seed=5))
    expected, _ = await reference(request)
    old = await call(transport, worker, request)
    start = len(await read_tokens(old, 10))
    old_rest = asyncio.create_task(collect(old))  # the old caller keeps reading
    await asyncio.sleep(0.2)
    new_stream = await reattach(transport, worker, request.request_id, start)
    replay = await new_stream.next(5.0)
    old_result = await old_rest
    # A cancel the old caller sent before it learnt of the takeover does not stop the new stream.
    await transport.publish(control_subject(worker.record.subject),
                            protocol.encode(protocol.Cancel(request_id=request.request_id, mode="kill")),
                            headers={CALLER_HEADER: old.reply})
    new = await collect(new_stream)
    new.tokens[:0] = replay.token_ids
    old_tokens = expected[:start] + old_result.tokens
    last = old_result.frames[-1]
    assert isinstance(last, ErrorFrame) and (last.code, last.message) == ("cancelled", "stream resumed elsewhere")
    assert all(isinstance(f, TokenFrame) for f in old_result.frames[:-1])
    # The replay is exactly what the old caller got after ``start``: nothing lost, nothing twice.
    assert isinstance(replay, TokenFrame)
    assert replay.token_ids == old_tokens[start:]
    assert expected[:start] + new.tokens == expected
    assert new.final is not None and new.final.finish_reason == "length"
    assert await wait_kv_free(http, worker, 1.0) <= 1.0


async def test_frontend_gone_detaches_its_resumable_requests_and_kills_the_others(
        etcd_server: EtcdServer, nats_server: NatsServer, namespace: str, tmp_path: Path,
        transport: NatsTransport, http: aiohttp.ClientSession) -> None:
    ttl = 2
    live_frontend = LeasedRegistration(EtcdClient(etcd_server.endpoint), ttl=ttl)
    await live_frontend.start(wait=5)
    await live_frontend.put(frontend_key(namespace, "fe-live"), b"alive")
    owner = spawn_python([LEASE_OWNER, etcd_server.endpoint, frontend_key(namespace, "fe-dead"), str(ttl)],
                         tmp_path / "frontend.log")
    try:
        await asyncio.to_thread(wait_line, tmp_path / "frontend.log", "registered", 15, owner)
        async with start_worker(tmp_path, etcd_server, nats_server, namespace, "--lease-ttl", str(ttl)) as w:
            # Finished while fe-dead read it: kept 4 s, then its full grace again once fe-dead is known gone.
            short = resumable(SamplingParams(max_tokens=20, ignore_eos=True, seed=2), grace=4.0, frontend_id="fe-dead")
            short_result = await collect(await call(transport, w, short))
            finished_at = time.monotonic()
            assert short_result.final is not None
            kept = resumable(SamplingParams(max_tokens=4000, ignore_eos=True, seed=1), frontend_id="fe-dead")
            kept_stream = await call(transport, w, kept)
            doomed_stream = await call(transport, w, make_request(LONG, frontend_id="fe-dead"))
            got = await read_tokens(kept_stream, 5)
            await read_tokens(doomed_stream, 5)
            owner.send_signal(signal.SIGKILL)
            await asyncio.to_thread(owner.wait)
            await wait_health(http, w, "frontend gone", ttl + 3, running=1, in_flight=1, detached_requests=1)
            log_text = w.log_text()
            assert "frontend_gone_detaching" in log_text and "frontend_gone_aborting" in log_text
            assert "finished_output_kept" in log_text
            await asyncio.sleep(max(0.0, finished_at + 4.5 - time.monotonic()))  # past its first 4 s
            tail = await collect(await reattach(transport, w, short.request_id, 20))
            assert tail.tokens == [] and tail.final is not None and tail.final.finish_reason == "length"

            # fe-live resumes it: everything from token 0, then the live rest.
            resumed = await reattach(transport, w, kept.request_id, 0, frontend_id="fe-live")
            first = await resumed.next(5.0)
            assert isinstance(first, TokenFrame) and first.token_ids[:len(got)] == got
            more = await read_tokens(resumed, 20)
            expected, _ = await reference(resumed_request(kept, len(first.token_ids) + len(more)))
            assert first.token_ids + more == expected
            await wait_health(http, w, "reattached", 1.0, detached_requests=0, running=1)
            await resumed.cancel("kill")
            assert await wait_kv_free(http, w, 1.0) <= 1.0
    finally:
        stop_process(owner)
        await live_frontend.close()


def resumed_request(request: GenerateRequest, tokens: int) -> GenerateRequest:
    """The same request cut at ``tokens`` (for its reference output)."""
    sampling = SamplingParams(max_tokens=tokens, ignore_eos=True, seed=request.sampling.seed)
    return make_request(sampling)


async def test_reattach_works_on_a_draining_worker(
        etcd_server: EtcdServer, nats_server: NatsServer, namespace: str, tmp_path: Path,
        transport: NatsTransport) -> None:
    async with start_worker(tmp_path, etcd_server, nats_server, namespace, "--drain-timeout", "20") as w:
        request = resumable(SamplingParams(max_tokens=300, ignore_eos=True, seed=4))
        expected, _ = await reference(request)
        stream = await call(transport, w, request)
        got = await read_tokens(stream, 10)
        await stream.cancel("detach")
        w.terminate()
        await asyncio.sleep(0.3)  # deregistered, no longer accepting new requests
        result = await collect(await reattach(transport, w, request.request_id, len(got)))
        assert got + result.tokens == expected
        assert result.final is not None and result.final.finish_reason == "length"
        assert await w.wait(10) == 0
