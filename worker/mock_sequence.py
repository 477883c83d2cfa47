"""The mock engine's state of one request: its tokens, KV blocks, progress and output."""

from __future__ import annotations

import asyncio

from dynrt.runtime.protocol import FinishReason, GenerateRequest, TokenLogprobs
from dynrt.worker.engine import EngineError
from dynrt.worker.mock_sampler import seeded_rng


class MockSequence:
    """Engine-side state of one request, shared by the scheduler (progress), the KV
    cache (blocks), the sampler (tokens, rng) and the request's stream (output)."""

    __slots__ = (
        "request_id", "tokens", "num_prompt_tokens", "num_output", "num_generated",
        "max_tokens", "min_tokens", "stop_ids", "ignore_eos", "rng", "block_ids",
        "hashes", "num_registered", "num_computed", "decoding", "cached_tokens",
        "out", "logprobs_k", "out_logprobs", "finish", "waiter", "error",
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
        self.rng = seeded_rng(sampling.seed, self.tokens)
        self.block_ids: list[int] = []
        self.hashes: list[int] = []  # chained hashes of the full blocks of tokens
        self.num_registered = 0  # leading blocks of block_ids that are in the cache
        self.num_computed = 0  # tokens whose KV is in block_ids
        self.decoding = False  # prefill done since the last (re)admission
        self.cached_tokens = 0
        self.out: list[int] = []  # generated tokens not yet taken by the consumer
        self.logprobs_k: int | None = sampling.logprobs
        self.out_logprobs: list[TokenLogprobs] = []  # one per token in ``out`` when logprobs_k is set
        self.finish: FinishReason | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.error: EngineError | None = None

    def wake(self) -> None:
        """Wake the request's stream (new tokens, or finished)."""
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
