"""``dynrt frontend``: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import argparse
import gc

from dynrt.frontend.chat_request import ChatSettings
from dynrt.runtime import config as config_flags
from dynrt.runtime.config import FrontendConfig, from_args
from dynrt.runtime.lifecycle import run_main
from dynrt.runtime.log import setup_logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config_flags.add_arguments(parser, FrontendConfig)


async def _main(config: FrontendConfig) -> int:
    from dynrt.frontend.server import FrontendService

    service = FrontendService(config)
    # What is loaded by now (modules, ~50k objects) lives as long as the process: keep it
    # out of the collector's full passes, each of which would walk all of it (~20 ms on a
    # small VM, paid every few hundred requests; Python's gc.freeze documentation).
    gc.freeze()
    return await service.run()


def main(args: argparse.Namespace) -> int:
    config = from_args(FrontendConfig, args)
    try:  # chat flags (template file, parsers) fail here, before connecting anywhere
        ChatSettings.from_config(config)
    except ValueError as e:
        raise SystemExit(f"dynrt frontend: {e}") from None
    setup_logging("frontend", config.log_level)
    return run_main(_main(config))
