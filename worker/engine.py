"""The engine interface a worker serves: token ids in, token batches out.

Input is always token ids (the frontend tokenizes), so a migrated request is just
"prompt ids + generated ids so far". Implementations: ``MockEngine`` (deterministic CPU
simulation, ``dynrt.worker.mock_engine``) and ``VllmEngine`` (``dynrt.worker.vllm_engine``).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator

import msgspec

from dynrt.runtime.protocol import (
    CancelMode,
    FinishReason,
    GenerateRequest,
    KvEvent,
    LoadReport,
    TokenizerSpec,
    TokenLogprobs,
)


class TokenBatch(msgspec.Struct, kw_only=True):
    """Tokens produced for one request in one engine step (usually one token).
    The last batch of a request has ``finish_reason`` set."""

    token_ids: list[int]
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list[TokenLogprobs] | None = None  # one per token id, when requested


class EngineInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What the worker publishes about its engine in its instance record."""

    model: str
    engine: str
    block_size: int
    kv_blocks_total: int
    context_length: int
    max_num_seqs: int
    tokenizer: TokenizerSpec


class EngineError(Exception):
    """The engine failed in a way that makes it unhealthy."""


class RequestRejected(Exception):
    """The request itself is invalid for this engine (too long, bad params): the
    worker answers an error frame with ``code="bad_request"``; never migrated."""


class Engine(abc.ABC):
    @property
    @abc.abstractmethod
    def info(self) -> EngineInfo: ...

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model and start the engine's loop."""

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Abort everything, free resources."""

    @abc.abstractmethod
    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenBatch]:
        """Token batches for one request. If the consumer stops iterating (the
        iterator is closed or its task cancelled), the request is aborted and its KV
        blocks freed. Raises ``RequestRejected`` for an invalid request."""

    @abc.abstractmethod
    async def abort(self, request_id: str, mode: CancelMode = "kill") -> None:
        """``kill``: abort now (the generate iterator ends with finish_reason "abort").
        ``stop``: finish after the current step with finish_reason "cancelled".
        Either frees the request's KV blocks. Unknown ids are ignored."""

    @abc.abstractmethod
    def load(self) -> LoadReport:
        """KV blocks used/total, running, waiting, active prefill tokens."""

    @abc.abstractmethod
    def kv_events(self) -> AsyncIterator[list[KvEvent]]:
        """Batches of KV cache events (Stored/Removed/Cleared) with per-engine
        event ids increasing by exactly 1. Only one consumer."""

    @abc.abstractmethod
    def dump_cached_blocks(self) -> tuple[list[int], int]:
        """(every block hash in the prefix cache, id of the last event emitted) —
        a router that lost events resyncs from this."""

    @abc.abstractmethod
    async def check_health(self) -> None:
        """Raise ``EngineError`` if the engine is unhealthy."""
