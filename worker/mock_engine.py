"""The mock engine: a CPU simulation of a vLLM-like engine, deterministic and fast.

It runs the same machinery as vLLM's v1 scheduler, minus the model:

- a paged KV cache of ``num_blocks`` blocks of ``block_size`` tokens; a sequence holds
  blocks for the tokens it has computed and grows by one block every ``block_size``
  tokens; when the pool runs out, the most recently admitted running sequence is
  preempted by recompute (its blocks are freed and it goes back to the front of the
  waiting queue);
- prefix caching with the chained block hashes of ``dynrt.runtime.block_hash``: a block
  full of computed tokens is registered under its hash (``KvBlockStored``); a new or
  resumed sequence reuses the blocks of its longest cached prefix; blocks referenced by
  no sequence stay cached in LRU order and are evicted (``KvBlockRemoved``) only when a
  new block is needed and no never-cached free block is left;
- a scheduler loop (one asyncio task) with waiting and running queues, ``max_num_seqs``,
  a per-step token budget ``max_num_batched_tokens`` and chunked prefill; a step emits one
  token for every running sequence whose prefill is complete;
- a step takes as long as Dynamo's mocker's published fit says (see ``step_model_ms``),
  divided by ``speedup``.

Output is a pure function of (every token id so far, seed): a rolling BLAKE2b state over
the token ids, updated once per token, picks the next token, so a request continued on
another engine from prompt + k output tokens produces exactly the tokens the first
engine would have. Temperature, top_p, top_k and logprobs do not change the rule.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import struct
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator

import msgspec

from dynrt.runtime.block_hash import extend_block_hashes
from dynrt.runtime.config import WorkerConfig
from dynrt.runtime.mock_tokenizer import EOS_ID, mock_tokenizer
from dynrt.runtime.lifecycle import cancel_and_wait
from dynrt.runtime.protocol import (
    CancelMode,
    FinishReason,
    GenerateRequest,
    KvAllCleared,
    KvBlockRemoved,
    KvBlockStored,
    KvEvent,
    LoadReport,
)
from dynrt.worker.engine import Engine, EngineError, EngineInfo, RequestRejected, TokenBatch
from dynrt.worker.kv_events import KvEventLog

_PACK_TOKEN = struct.Struct("<q").pack
_NO_HASH = -1
# How far the step clock may fall behind real time before it is reset (see _run_step).
_MAX_CLOCK_LAG_S = 0.005


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


class StepTiming(msgspec.Struct, frozen=True, kw_only=True):
    """One engine step: what it did, what the timing model asked for, what it took."""

    prefill_tokens: int
    decode_seqs: int
    kv_usage: float
    model_ms: float
    measured_ms: float


def prefill_ms(new_tokens: int) -> float:
    """Dynamo mocker's fit of a prefill step over ``new_tokens`` uncached tokens."""
    return 4.209989e-7 * new_tokens * new_tokens + 1.518344e-2 * new_tokens + 16.50142


def decode_ms(kv_usage: float) -> float:
    """Dynamo mocker's fit of a decode step at KV usage fraction ``kv_usage``."""
    return max(1.0, -25.74 * kv_usage * kv_usage + 54.01 * kv_usage + 5.74)


def step_model_ms(prefill_tokens: int, decode_seqs: int, kv_usage: float) -> float:
    """Modelled duration of one step at speedup 1. A step that both prefills and
    decodes costs the sum of both fits (the GPU runs both parts of the batch)."""
    ms = 0.0
    if prefill_tokens:
        ms += prefill_ms(prefill_tokens)
    if decode_seqs:
        ms += decode_ms(kv_usage)
    return ms


class _Seq:
    """Engine-side state of one request."""

    __slots__ = (
        "request_id", "tokens", "num_prompt_tokens", "num_output", "num_generated",
        "max_tokens", "min_tokens", "stop_ids", "ignore_eos", "rng", "block_ids",
        "hashes", "num_registered", "num_computed", "decoding", "cached_tokens",
        "out", "finish", "waiter", "error",
    )

    def __init__(self, request: GenerateRequest) -> None:
        sampling = request.sampling
        self.request_id = request.request_id
        self.tokens: list[int] = list(request.token_ids)
        self.num_prompt_tokens = len(self.tokens)
        # Output tokens so far including those generated before a migration: they
        # count for min_tokens; max_tokens is already the remaining budget.
        self.num_output = request.num_prior_output_tokens
        self.num_generated = 0
        self.max_tokens = sampling.max_tokens
        self.min_tokens = sampling.min_tokens
        self.stop_ids = frozenset(sampling.stop_token_ids)
        self.ignore_eos = sampling.ignore_eos
        seed = sampling.seed if sampling.seed is not None else 0
        self.rng = hashlib.blake2b(seed.to_bytes(8, "little", signed=True), digest_size=8)
        self.rng.update(struct.pack(f"<{len(self.tokens)}q", *self.tokens))
        self.block_ids: list[int] = []
        self.hashes: list[int] = []  # chained hashes of the full blocks of tokens
        self.num_registered = 0  # leading blocks of block_ids that are in the cache
        self.num_computed = 0  # tokens whose KV is in block_ids
        self.decoding = False  # prefill done since the last (re)admission
        self.cached_tokens = 0
        self.out: list[int] = []  # generated tokens not yet taken by the consumer
        self.finish: FinishReason | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.error: EngineError | None = None

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


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
        self._vocab: list[int] = mock_tokenizer().sampleable_ids
        self._vocab_size = mock_tokenizer().vocab_size
        self._bs = config.block_size
        self._sleep_s_per_ms = 0.0 if math.isinf(config.speedup) else 1e-3 / config.speedup

        # KV cache. A block is in exactly one of: in use (ref > 0), free and never
        # cached (_free), free and cached (_lru, oldest first).
        self._ref: list[int] = [0] * config.num_blocks
        self._block_hash: list[int] = [_NO_HASH] * config.num_blocks
        self._free: list[int] = list(range(config.num_blocks - 1, -1, -1))
        self._lru: OrderedDict[int, int] = OrderedDict()  # hash -> block, ref == 0
        self._cached: dict[int, int] = {}  # hash -> block, every cached block

        self._seqs: dict[str, _Seq] = {}
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._stop_requested: set[str] = set()

        self._events = KvEventLog()

        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._clock = 0.0  # when the previous step should have ended (perf_counter)
        self.step_log: deque[StepTiming] = deque(maxlen=config.step_log_size)
        self.num_steps = 0
        self.num_generated_tokens = 0
        self.num_preemptions = 0

    # -- Engine interface --------------------------------------------------
    @property
    def info(self) -> EngineInfo:
        return self._info

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="mock-engine")

    async def shutdown(self) -> None:
        """Abort every request, stop the loop, clear the prefix cache."""
        for seq in list(self._seqs.values()):
            self._finish(seq, "abort")
        await cancel_and_wait(self._task)
        self._task = None
        self.reset_prefix_cache()
        self._closed = True
        self._events.close()

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenBatch]:
        self._validate(request)
        return self._stream(request)

    async def abort(self, request_id: str, mode: CancelMode = "kill") -> None:
        seq = self._seqs.get(request_id)
        if seq is None:
            return
        if mode == "kill":
            self._finish(seq, "abort")
        else:
            self._stop_requested.add(request_id)

    def load(self) -> LoadReport:
        prefill = 0
        for seq in self._running:
            if not seq.decoding:
                prefill += len(seq.tokens) - seq.num_computed
        for seq in self._waiting:
            prefill += len(seq.tokens) - seq.num_computed
        return LoadReport(
            model=self.config.model,
            kv_blocks_used=self.kv_blocks_used,
            kv_blocks_total=self.config.num_blocks,
            running=len(self._running),
            waiting=len(self._waiting),
            active_prefill_tokens=prefill,
            timestamp=time.time(),
        )

    def kv_events(self) -> AsyncIterator[list[KvEvent]]:
        return self._events.batches()

    def dump_cached_blocks(self) -> tuple[list[int], int]:
        return list(self._cached), self._events.last_event_id

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
        """Blocks held by sequences; cached blocks no sequence holds count as free,
        as in vLLM's KV usage."""
        return self.config.num_blocks - len(self._free) - len(self._lru)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def reset_prefix_cache(self) -> bool:
        """Drop every cached block (``KvAllCleared``). Like vLLM, refuses (returns
        False) while any sequence holds blocks."""
        if self.kv_blocks_used:
            return False
        for block in self._lru.values():
            self._block_hash[block] = _NO_HASH
            self._free.append(block)
        self._lru.clear()
        self._cached.clear()
        self._events.append(KvAllCleared())
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
        if not 0 <= request.num_prior_output_tokens <= len(ids):
            raise RequestRejected("num_prior_output_tokens out of range")
        total = len(ids) + sampling.max_tokens
        if total > cfg.context_length:
            raise RequestRejected(
                f"prompt ({len(ids)}) + max_tokens ({sampling.max_tokens}) exceeds the "
                f"context length {cfg.context_length}"
            )
        if -(-total // self._bs) > cfg.num_blocks:
            raise RequestRejected(f"request needs more than the whole KV cache ({cfg.num_blocks} blocks)")
        if request.request_id in self._seqs:
            raise RequestRejected(f"duplicate request id {request.request_id!r}")

    async def _stream(self, request: GenerateRequest) -> AsyncIterator[TokenBatch]:
        # The request enters the engine on the first iteration, so an iterator that is
        # never iterated leaves nothing behind.
        if self._closed or self._task is None or self._task.done():
            raise EngineError("mock engine is not running")
        if request.request_id in self._seqs:
            raise RequestRejected(f"duplicate request id {request.request_id!r}")
        seq = _Seq(request)
        self._seqs[seq.request_id] = seq
        self._waiting.append(seq)
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
                if first:
                    first = False
                    batch.prompt_tokens = seq.num_prompt_tokens
                    batch.cached_tokens = seq.cached_tokens
                yield batch
                if batch.finish_reason is not None:
                    return
        finally:
            if seq.finish is None:
                self._finish(seq, "abort")

    def _finish(self, seq: _Seq, reason: FinishReason) -> None:
        """End a request now: leave the queues, free its blocks, wake its consumer.
        A killed request's undelivered tokens are dropped."""
        if seq.finish is not None:
            return
        seq.finish = reason
        if reason == "abort":
            seq.out = []
        del self._seqs[seq.request_id]
        self._stop_requested.discard(seq.request_id)
        if seq.block_ids:
            self._free_blocks(seq)
        else:
            try:
                self._waiting.remove(seq)
            except ValueError:
                pass
        try:
            self._running.remove(seq)
        except ValueError:
            pass
        seq.wake()

    # -- KV cache ----------------------------------------------------------
    def _free_blocks(self, seq: _Seq) -> None:
        """Release a sequence's blocks; the last blocks of a sequence go first into
        the LRU so shared prefixes outlive their tails (as vLLM does)."""
        ref, lru, block_hash, free = self._ref, self._lru, self._block_hash, self._free
        for block in reversed(seq.block_ids):
            ref[block] -= 1
            if ref[block] == 0:
                h = block_hash[block]
                if h == _NO_HASH:
                    free.append(block)
                else:
                    lru[h] = block
        seq.block_ids = []
        seq.num_registered = 0
        seq.num_computed = 0
        seq.decoding = False

    def _allocate(self, seq: _Seq, count: int) -> None:
        """Give ``count`` new blocks to ``seq`` (the caller checked availability),
        evicting least recently used cached blocks when no never-cached block is left."""
        removed: list[int] = []
        for _ in range(count):
            if self._free:
                block = self._free.pop()
            else:
                h, block = self._lru.popitem(last=False)
                del self._cached[h]
                self._block_hash[block] = _NO_HASH
                removed.append(h)
            self._ref[block] = 1
            seq.block_ids.append(block)
        if removed:
            self._events.append(KvBlockRemoved(block_hashes=removed))

    def _admit_prefix(self, seq: _Seq) -> list[int]:
        """Blocks of the longest cached prefix of ``seq`` (at most all but its last
        token, which must be computed to sample the next one)."""
        if not self.config.enable_prefix_caching:
            return []
        extend_block_hashes(seq.hashes, seq.tokens, self._bs)
        limit = (len(seq.tokens) - 1) // self._bs
        hits: list[int] = []
        cached = self._cached
        for h in seq.hashes[:limit]:
            block = cached.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def _register_blocks(self, seq: _Seq) -> None:
        """Put the sequence's blocks that are now full of computed tokens into the
        prefix cache. A block whose hash is already cached (the same prefix computed
        concurrently) stays private and is freed uncached."""
        full = seq.num_computed // self._bs
        if len(seq.hashes) < full:
            extend_block_hashes(seq.hashes, seq.tokens, self._bs)
        cached, block_hash, hashes, block_ids = self._cached, self._block_hash, seq.hashes, seq.block_ids
        run: list[int] = []
        run_parent: int | None = None
        for i in range(seq.num_registered, full):
            h = hashes[i]
            if h in cached:
                if run:
                    self._events.append(KvBlockStored(block_hashes=run, parent_hash=run_parent))
                    run = []
                continue
            block = block_ids[i]
            cached[h] = block
            block_hash[block] = h
            if not run:
                run_parent = hashes[i - 1] if i else None
            run.append(h)
        if run:
            self._events.append(KvBlockStored(block_hashes=run, parent_hash=run_parent))
        seq.num_registered = full

    # -- scheduler ---------------------------------------------------------
    async def _loop(self) -> None:
        try:
            while True:
                if not self._running and not self._waiting:
                    self._wake.clear()
                    await self._wake.wait()
                await self._run_step()
        except Exception as exc:
            error = EngineError(f"mock engine loop failed: {exc!r}")
            for seq in list(self._seqs.values()):
                seq.error = error
                self._finish(seq, "abort")
            raise

    def _schedule(self) -> tuple[list[tuple[_Seq, int]], int, int]:
        """Pick this step's work like vLLM v1: running sequences first (in admission
        order, preempting from the back when blocks run out), then, unless this step
        preempted, waiting ones while the token budget, ``max_num_seqs`` and free
        blocks allow. Returns
        (sequence, tokens) pairs, new prefill tokens and decoding sequences."""
        bs = self._bs
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[_Seq, int]] = []
        prefill_tokens = 0
        decode_seqs = 0
        running = self._running
        preempted = False
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            n = 1 if seq.decoding else min(len(seq.tokens) - seq.num_computed, budget)
            need = (seq.num_computed + n + bs - 1) // bs - len(seq.block_ids)
            while need > len(self._free) + len(self._lru):
                victim = running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                if need > 0:
                    self._allocate(seq, need)
                scheduled.append((seq, n))
                budget -= n
                if seq.decoding:
                    decode_seqs += 1
                else:
                    prefill_tokens += n
                i += 1
                continue
            break

        waiting = self._waiting
        while waiting and not preempted and budget > 0 and len(running) < self.config.max_num_seqs:
            seq = waiting[0]
            hits = self._admit_prefix(seq)
            computed = len(hits) * bs
            n = min(len(seq.tokens) - computed, budget)
            need = (computed + n + bs - 1) // bs - len(hits)
            ref = self._ref
            revived = sum(1 for block in hits if ref[block] == 0)
            if need > len(self._free) + len(self._lru) - revived:
                break
            waiting.popleft()
            for block in hits:
                if ref[block] == 0:
                    del self._lru[self._block_hash[block]]
                ref[block] += 1
            seq.block_ids = hits
            seq.num_registered = len(hits)
            seq.num_computed = computed
            if seq.num_generated == 0:
                seq.cached_tokens = computed
            if need > 0:
                self._allocate(seq, need)
            running.append(seq)
            scheduled.append((seq, n))
            budget -= n
            prefill_tokens += n
        return scheduled, prefill_tokens, decode_seqs

    def _preempt(self, seq: _Seq) -> None:
        """Preemption by recompute: free the blocks, requeue at the front."""
        self._free_blocks(seq)
        self._waiting.appendleft(seq)
        self.num_preemptions += 1

    async def _run_step(self) -> None:
        start = time.perf_counter()
        scheduled, prefill_tokens, decode_seqs = self._schedule()
        usage = self.kv_blocks_used / self.config.num_blocks
        model_ms = step_model_ms(prefill_tokens, decode_seqs, usage)
        if self._sleep_s_per_ms:
            # Sleep until an absolute deadline chained from the previous step's, so
            # timer overshoot (event loops wake on millisecond ticks) is paid back
            # by the next step instead of adding up; a lag beyond a few ms (after
            # idling, or when this process cannot keep up) resets the chain.
            if start - self._clock > _MAX_CLOCK_LAG_S:
                self._clock = start
            self._clock += model_ms * self._sleep_s_per_ms
            await asyncio.sleep(self._clock - time.perf_counter())
        else:
            await asyncio.sleep(0)
        self._apply(scheduled)
        if self._stop_requested:
            for request_id in list(self._stop_requested):
                self._finish(self._seqs[request_id], "cancelled")
        self._events.notify()
        end = time.perf_counter()
        self.num_steps += 1
        self.step_log.append(
            StepTiming(
                prefill_tokens=prefill_tokens,
                decode_seqs=decode_seqs,
                kv_usage=usage,
                model_ms=model_ms,
                measured_ms=(end - start) * 1e3,
            )
        )

    def _apply(self, scheduled: list[tuple[_Seq, int]]) -> None:
        """The end of a step: advance computed tokens, cache full blocks, sample one
        token for every sequence whose prefill is complete, finish those that are done.
        Sequences killed while the step ran are skipped."""
        caching = self.config.enable_prefix_caching
        bs = self._bs
        generated = 0
        for seq, n in scheduled:
            if seq.finish is not None:
                continue
            seq.num_computed += n
            if caching and seq.num_computed // bs > seq.num_registered:
                self._register_blocks(seq)
            if seq.num_computed < len(seq.tokens):
                continue
            seq.decoding = True
            reason = self._sample(seq)
            generated += 1
            if reason is not None:
                self._finish(seq, reason)
            else:
                seq.wake()
        self.num_generated_tokens += generated

    def _sample(self, seq: _Seq) -> FinishReason | None:
        """Append the next token (a function of the rolling hash of every token so
        far) and say whether the request is finished."""
        x = int.from_bytes(seq.rng.digest(), "little")
        may_stop = seq.num_output >= seq.min_tokens
        eos_every = self.config.eos_every
        reason: FinishReason | None = None
        if may_stop and not seq.ignore_eos and eos_every and (x >> 32) % eos_every == 0:
            token = EOS_ID
            reason = "stop"
        else:
            vocab = self._vocab
            index = x % len(vocab)
            token = vocab[index]
            if token in seq.stop_ids:
                if may_stop:
                    reason = "stop"
                else:
                    # Like a logits processor masking stop tokens before min_tokens.
                    while token in seq.stop_ids:
                        index = (index + 1) % len(vocab)
                        token = vocab[index]
        seq.tokens.append(token)
        seq.rng.update(_PACK_TOKEN(token))
        seq.out.append(token)
        seq.num_output += 1
        seq.num_generated += 1
        if reason is None and seq.num_generated >= seq.max_tokens:
            reason = "length"
        return reason
