"""The ``dynrt`` command: one subcommand per component. Each subcommand's module is
imported only when it runs, so ``dynrt --help`` is instant and a missing optional
dependency (vLLM) only matters to the subcommand that needs it."""

from __future__ import annotations

import argparse
import importlib
import sys

from dynrt import __version__

# subcommand -> (module with add_arguments(parser) and main(args) -> int, help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "up": ("dynrt.up", "run a whole local deployment: etcd, NATS, a frontend, workers"),
    "frontend": ("dynrt.frontend.main", "OpenAI-compatible HTTP frontend"),
    "worker": ("dynrt.worker.main", "serve a model's engine (vllm or mock) over NATS"),
    "router": ("dynrt.router.main", "standalone KV-aware router shared by frontends"),
    "controller": ("dynrt.controller.main", "keep a deployment's workers running: health checks, autoscaling, rolling updates"),
    "status": ("dynrt.status", "show instances, load and frontends of a deployment"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynrt", description="A fault-tolerant runtime for serving LLMs.")
    parser.add_argument("--version", action="version", version=f"dynrt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module_name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # Parse the subcommand first, then let its module add its own flags.
    known, _ = parser.parse_known_args(argv[:1] if argv and not argv[0].startswith("-") else argv)
    if getattr(known, "command", None) is None:
        parser.print_help()
        return 2
    module = importlib.import_module(SUBCOMMANDS[known.command][0])
    prog, description = f"dynrt {known.command}", SUBCOMMANDS[known.command][1]
    if hasattr(module, "parse_args"):  # a command whose flags depend on its line (dynrt worker --engine)
        args = module.parse_args(argv[1:], prog, description)
    else:
        sub_parser = argparse.ArgumentParser(prog=prog, description=description)
        module.add_arguments(sub_parser)
        args = sub_parser.parse_args(argv[1:])
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
