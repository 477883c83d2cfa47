"""The mock engine: a CPU simulation of a vLLM-like engine, deterministic and fast.

It runs the same machinery as vLLM's v1 scheduler, minus the model, in one asyncio task
that runs steps while there is work:

- a paged KV cache with prefix caching and LRU eviction (``dynrt.worker.mock_kv_cache``),
  reporting ``KvBlockStored`` / ``KvBlockRemoved`` / ``KvAllCleared`` events;
- a scheduler with waiting and running queues, ``max_num_seqs``, a per-step token
  budget, chunked prefill and preemption by recompute (``dynrt.worker.mock_scheduler``);
  a step emits one token for every running sequence whose prefill is complete;
- a step takes as long as Dynamo's mocker's published fit says, divided by ``speedup``
  (``dynrt.worker.mock_timing``);
- output is a pure function of (every token id so far, seed), so a request continued on
  another engine from prompt + k output tokens produces exactly the tokens the first
  engine would have (``dynrt.worker.mock_sampler``).

Sampling fields (``SamplingParams``), what the mock models and what it ignores:
- modelled: ``max_tokens``, ``min_tokens`` (counting prior output after a migration),
  ``ignore_eos``, ``stop_token_ids`` (masked before ``min_tokens``), ``seed`` (part of the
  rolling state), ``logprobs`` (deterministic logprobs, the sampled token ranked first:
  ``dynrt.worker.mock_sampler.mock_logprobs``);
- ignored (there is no model, so no distribution to reshape): ``temperature``,
  ``top_p``, ``top_k``, ``min_p``, ``presence_penalty``, ``frequency_penalty``,
  ``repetition_penalty``, ``logit_bias``, ``allowed_token_ids``, ``bad_words``;
- rejected: ``structured`` (``RequestRejected``: the mock has no structured output
  backend, and unconstrained text would break the promise of the constraint).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator

import msgspec

from dynrt.runtime.config import WorkerConfig
from dynrt.runtime.lifecycle import cancel_and_wait
from dynrt.runtime.mock_tokenizer import mock_tokenizer
from dynrt.runtime.protocol import CancelMode, GenerateRequest, KvEvent, LoadReport
from dynrt.worker.engine import Engine, EngineError, EngineInfo, RequestRejected, TokenBatch
from dynrt.worker.kv_events import KvEventLog
from dynrt.worker.mock_kv_cache import MockKvCache
from dynrt.worker.mock_sampler import MockSampler
from dynrt.worker.mock_scheduler import MockScheduler
from dynrt.worker.mock_sequence import MockSequence
from dynrt.worker.mock_timing import StepPacer, StepTiming, prefill_ms, step_model_ms
from dynrt.worker.prefill_rate import PrefillRateMeter


class MockEngineConfig(msgspec.Struct, kw_only=True):
    """Settings of the mock engine (the ``dynrt worker --engine mock`` flags)."""

    model: str = "mock-model"
    num_blocks: int = 16384
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    context_length: int = 8192
    # Steps take formula time / speedup; ``inf`` means no sleeping at all.
    speedup: float = 1.0
    enable_prefix_caching: bool = True
    # The engine's own EOS rule: each output token is EOS with probability about
    # 1/eos_every (unless ignore_eos or before min_tokens); 0 disables the rule.
    eos_every: int = 200
    # Tests: check_health() raises EngineError.
    fail_health_check: bool = False
    # How many recent steps ``MockEngine.step_log`` keeps.
    step_log_size: int = 10000


def mock_engine_config(config: WorkerConfig) -> MockEngineConfig:
    """The worker's flags as mock engine settings; a sizing flag not given (None) keeps
    the mock's default here."""
    given = {name: value for name in ("max_num_seqs", "max_num_batched_tokens")
             if (value := getattr(config, name)) is not None}
    return MockEngineConfig(
        model=config.served_model_name or config.model, num_blocks=config.num_blocks, block_size=config.block_size,
        context_length=config.context_length, speedup=config.speedup, fail_health_check=config.fail_health_check,
        **given)


class MockEngine(Engine):
    """Deterministic CPU engine with vLLM's scheduling, paging and prefix caching."""

    def __init__(self, config: MockEngineConfig | None = None) -> None:
        self.config = config = config or MockEngineConfig()
        for name in ("num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens", "context_length"):
            if getattr(config, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not config.speedup > 0:
            raise ValueError("speedup must be > 0")
        self._info = EngineInfo(
            model=config.model,
            engine="mock",
            block_size=config.block_size,
            kv_blocks_total=config.num_blocks,
            context_length=config.context_length,
            max_num_seqs=config.max_num_seqs,
            tokenizer=mock_tokenizer().spec(),
        )
        self._vocab_size = mock_tokenizer().vocab_size
        self._events = KvEventLog()
        self.kv_cache = MockKvCache(config.num_blocks, config.block_size, config.enable_prefix_caching, self._events)
        self.scheduler = MockScheduler(self.kv_cache, MockSampler(config.eos_every), max_num_seqs=config.max_num_seqs,
                                       max_num_batched_tokens=config.max_num_batched_tokens)
        self._pacer = StepPacer(config.speedup)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.step_log: deque[StepTiming] = deque(maxlen=config.step_log_size)
        self.num_steps = 0
        # Measured, not modelled: speedup, timer overshoot and a loaded CPU all count.
        self.prefill_rate = PrefillRateMeter()

    # -- Engine interface --------------------------------------------------
    @property
    def info(self) -> EngineInfo:
        return self._info

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="mock-engine")

    async def shutdown(self) -> None:
        """Abort every request, stop the loop, clear the prefix cache."""
        self.scheduler.abort_all()
        await cancel_and_wait(self._task)
        self._task = None
        self.reset_prefix_cache()
        self._closed = True
        self._events.close()

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenBatch]:
        self._validate(request)
        return self._stream(request)

    async def abort(self, request_id: str, mode: CancelMode = "kill") -> None:
        seq = self.scheduler.seqs.get(request_id)
        if seq is None:
            return
        if mode == "kill":
            self.scheduler.finish(seq, "abort")
        else:
            self.scheduler.request_stop(request_id)

    def load(self) -> LoadReport:
        scheduler = self.scheduler
        prefill = self.prefill_rate.fit(any(seq.decoding for seq in scheduler.running))
        return LoadReport(
            model=self.config.model,
            kv_blocks_used=self.kv_cache.used,
            kv_blocks_total=self.config.num_blocks,
            running=len(scheduler.running),
            waiting=len(scheduler.waiting),
            active_prefill_tokens=scheduler.prefill_backlog(),
            timestamp=time.time(),
            prefill_tokens_per_s=prefill.tokens_per_s,
            prefill_base_seconds=prefill.base_seconds,
            step_seconds=self.prefill_rate.step_seconds,
        )

    def kv_events(self) -> AsyncIterator[list[KvEvent]]:
        return self._events.batches()

    def dump_cached_blocks(self) -> tuple[list[int], int]:
        return list(self.kv_cache.cached), self._events.last_event_id

    async def check_health(self) -> None:
        if self.config.fail_health_check:
            raise EngineError("mock engine configured to fail its health check")
        if self._task is None:
            raise EngineError("mock engine not started")
        if self._task.done():
            raise EngineError("mock engine loop has stopped")

    # -- extras ------------------------------------------------------------
    @property
    def kv_blocks_used(self) -> int:
        """Blocks held by sequences (cached blocks no sequence holds count as free)."""
        return self.kv_cache.used

    @property
    def num_cached_blocks(self) -> int:
        return len(self.kv_cache.cached)

    @property
    def num_generated_tokens(self) -> int:
        return self.scheduler.num_generated_tokens

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    def reset_prefix_cache(self) -> bool:
        """Drop every cached block (``KvAllCleared``). Like vLLM, refuses (returns
        False) while any sequence holds blocks."""
        if not self.kv_cache.clear():
            return False
        self._events.notify()
        return True

    # -- requests ----------------------------------------------------------
    def _validate(self, request: GenerateRequest) -> None:
        cfg = self.config
        ids = request.token_ids
        sampling = request.sampling
        if not ids:
            raise RequestRejected("empty prompt")
        if min(ids) < 0 or max(ids) >= self._vocab_size:
            raise RequestRejected(f"token id out of vocabulary [0, {self._vocab_size})")
        if sampling.max_tokens < 1:
            raise RequestRejected("max_tokens must be >= 1")
        if sampling.structured is not None:
            raise RequestRejected("the mock engine has no structured output backend")
        if sampling.logprobs is not None and sampling.logprobs < 0:
            raise RequestRejected("logprobs must be >= 0")
        if not 0 <= request.num_prior_output_tokens <= len(ids):
            raise RequestRejected("num_prior_output_tokens out of range")
        total = len(ids) + sampling.max_tokens
        if total > cfg.context_length:
            raise RequestRejected(
                f"prompt ({len(ids)}) + max_tokens ({sampling.max_tokens}) exceeds the "
                f"context length {cfg.context_length}"
            )
        if -(-total // cfg.block_size) > cfg.num_blocks:
            raise RequestRejected(f"request needs more than the whole KV cache ({cfg.num_blocks} blocks)")
        if request.request_id in self.scheduler.seqs:
            raise RequestRejected(f"duplicate request id {request.request_id!r}")

    async def _stream(self, request: GenerateRequest) -> AsyncIterator[TokenBatch]:
        # The request enters the engine on the first iteration, so an iterator that is
        # never iterated leaves nothing behind.
        if self._closed or self._task is None or self._task.done():
            raise EngineError("mock engine is not running")
        if request.request_id in self.scheduler.seqs:
            raise RequestRejected(f"duplicate request id {request.request_id!r}")
        seq = MockSequence(request)
        self.scheduler.add(seq)
        self._wake.set()
        loop = asyncio.get_running_loop()
        first = True
        try:
            while True:
                if not seq.out and seq.finish is None:
                    seq.waiter = loop.create_future()
                    await seq.waiter
                    seq.waiter = None
                if seq.error is not None:
                    raise seq.error
                tokens, seq.out = seq.out, []
                batch = TokenBatch(token_ids=tokens, finish_reason=seq.finish)
                if seq.logprobs_k is not None:
                    batch.logprobs, seq.out_logprobs = seq.out_logprobs, []
                if first:
                    first = False
                    batch.prompt_tokens = seq.num_prompt_tokens
                    batch.cached_tokens = seq.cached_tokens
                yield batch
                if batch.finish_reason is not None:
                    return
        finally:
            if seq.finish is None:
                self.scheduler.finish(seq, "abort")

    # -- the loop ------------------------------------------------------------
    async def _loop(self) -> None:
        try:
            while True:
                if not self.scheduler.has_work():
                    self._wake.clear()
                    await self._wake.wait()
                await self._run_step()
        except Exception as exc:
            self.scheduler.abort_all(EngineError(f"mock engine loop failed: {exc!r}"))
            raise

    async def _run_step(self) -> None:
        start = time.perf_counter()
        scheduled, prefill_tokens, decode_seqs = self.scheduler.schedule()
        usage = self.kv_cache.used / self.config.num_blocks
        model_ms = step_model_ms(prefill_tokens, decode_seqs, usage)
        await self._pacer.wait(start, model_ms)
        self.scheduler.apply(scheduled)
        self._events.notify()
        end = time.perf_counter()
        self.num_steps += 1
        timing = StepTiming(prefill_tokens=prefill_tokens, decode_seqs=decode_seqs, kv_usage=usage,
                            model_ms=model_ms, measured_ms=(end - start) * 1e3)
        self.step_log.append(timing)
        self.prefill_rate.record(prefill_tokens, timing.measured_ms / 1e3, decode_seqs)


__all__ = ["MockEngine", "MockEngineConfig", "StepTiming", "mock_engine_config", "prefill_ms", "step_model_ms"]
