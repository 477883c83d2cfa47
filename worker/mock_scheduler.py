"""The mock engine's scheduler: vLLM v1's waiting and running queues over the mock KV
cache, minus the model.

Each step takes running sequences first (in admission order), then waiting ones, within
``max_num_seqs`` and a per-step token budget ``max_num_batched_tokens`` (chunked
prefill). A sequence grows by one block every ``block_size`` tokens; when the pool runs
out, the most recently admitted running sequence is preempted by recompute (its blocks
are freed and it goes back to the front of the waiting queue). At the end of a step
every running sequence whose prefill is complete gets one token from the sampler.
"""

from __future__ import annotations

from collections import deque

from dynrt.runtime.protocol import FinishReason
from dynrt.worker.engine import EngineError
from dynrt.worker.mock_kv_cache import MockKvCache
from dynrt.worker.mock_sampler import MockSampler
from dynrt.worker.mock_sequence import MockSequence

# One step's work: (sequence, tokens it computes), new prefill tokens, decoding sequences.
Schedule = tuple[list[tuple[MockSequence, int]], int, int]


class MockScheduler:
    """The requests in the engine (``seqs``) and their queues: ``waiting`` (front
    first) and ``running`` (in admission order)."""

    def __init__(self, cache: MockKvCache, sampler: MockSampler, *, max_num_seqs: int,
                 max_num_batched_tokens: int) -> None:
        self.cache = cache
        self.sampler = sampler
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.seqs: dict[str, MockSequence] = {}
        self.waiting: deque[MockSequence] = deque()
        self.running: list[MockSequence] = []
        self._stop_requested: set[str] = set()
        self.num_generated_tokens = 0
        self.num_preemptions = 0

    # -- requests ------------------------------------------------------------
    def add(self, seq: MockSequence) -> None:
        self.seqs[seq.request_id] = seq
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def request_stop(self, request_id: str) -> None:
        """Finish the request with "cancelled" at the end of the current step."""
        if request_id in self.seqs:
            self._stop_requested.add(request_id)

    def finish(self, seq: MockSequence, reason: FinishReason) -> None:
        """End a request now: leave the queues, free its blocks, wake its consumer.
        A killed request's undelivered tokens are dropped."""
        if seq.finish is not None:
            return
        seq.finish = reason
        if reason == "abort":
            seq.out = []
            seq.out_logprobs = []
        del self.seqs[seq.request_id]
        self._stop_requested.discard(seq.request_id)
        if seq.block_ids:
            self.cache.release(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        try:
            self.running.remove(seq)
        except ValueError:
            pass
        seq.wake()

    def abort_all(self, error: EngineError | None = None) -> None:
        """Kill every request; with ``error``, their streams raise it."""
        for seq in list(self.seqs.values()):
            if error is not None:
                seq.error = error
            self.finish(seq, "abort")

    def prefill_backlog(self) -> int:
        """Prompt tokens not computed yet, running and waiting."""
        prefill = 0
        for seq in self.running:
            if not seq.decoding:
                prefill += len(seq.tokens) - seq.num_computed
        for seq in self.waiting:
            prefill += len(seq.tokens) - seq.num_computed
        return prefill

    # -- steps ---------------------------------------------------------------
    def schedule(self) -> Schedule:
        """Pick this step's work like vLLM v1: running sequences first (in admission
        order, preempting from the back when blocks run out), then, unless this step
        preempted, waiting ones while the token budget, ``max_num_seqs`` and free
        blocks allow."""
        cache = self.cache
        bs = cache.block_size
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[MockSequence, int]] = []
        prefill_tokens = 0
        decode_seqs = 0
        running = self.running
        preempted = False
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            n = 1 if seq.decoding else min(len(seq.tokens) - seq.num_computed, budget)
            need = (seq.num_computed + n + bs - 1) // bs - len(seq.block_ids)
            while need > cache.available():
                victim = running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                if need > 0:
                    cache.allocate(seq, need)
                scheduled.append((seq, n))
                budget -= n
                if seq.decoding:
                    decode_seqs += 1
                else:
                    prefill_tokens += n
                i += 1
                continue
            break

        waiting = self.waiting
        while waiting and not preempted and budget > 0 and len(running) < self.max_num_seqs:
            seq = waiting[0]
            hits = cache.cached_prefix(seq)
            computed = len(hits) * bs
            n = min(len(seq.tokens) - computed, budget)
            need = (computed + n + bs - 1) // bs - len(hits)
            if need > cache.available_besides(hits):
                break
            waiting.popleft()
            cache.take(seq, hits)
            seq.num_computed = computed
            if seq.num_generated == 0:
                seq.cached_tokens = computed
            if need > 0:
                cache.allocate(seq, need)
            running.append(seq)
            scheduled.append((seq, n))
            budget -= n
            prefill_tokens += n
        return scheduled, prefill_tokens, decode_seqs

    def _preempt(self, seq: MockSequence) -> None:
        """Preemption by recompute: free the blocks, requeue at the front."""
        self.cache.release(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def apply(self, scheduled: list[tuple[MockSequence, int]]) -> None:
        """The end of a step: advance computed tokens, cache full blocks, sample one
        token for every sequence whose prefill is complete, finish those that are done,
        then those asked to stop. Sequences killed while the step ran are skipped."""
        cache = self.cache
        caching = cache.prefix_caching
        bs = cache.block_size
        sample = self.sampler.sample
        generated = 0
        for seq, n in scheduled:
            if seq.finish is not None:
                continue
            seq.num_computed += n
            if caching and seq.num_computed // bs > seq.num_registered:
                cache.register_full_blocks(seq)
            if seq.num_computed < len(seq.tokens):
                continue
            seq.decoding = True
            reason = sample(seq)
            generated += 1
            if reason is not None:
                self.finish(seq, reason)
            else:
                seq.wake()
        self.num_generated_tokens += generated
        if self._stop_requested:
            for request_id in list(self._stop_requested):
                self.finish(self.seqs[request_id], "cancelled")
