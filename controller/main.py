"""``dynrt controller``: run the controller, or change what it manages.

    dynrt controller -f deployment.yaml          # run (active, or standby if one is active)
    dynrt controller                             # run with the spec already stored in etcd
    dynrt controller apply -f new.yaml [--wait]  # store a new spec: rolling update
    dynrt controller check -f deployment.yaml    # validate a file, print what it means

All take the usual ``--namespace --etcd-endpoints --nats-url`` flags (or ``DYNRT_*``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import TYPE_CHECKING

from dynrt.controller.spec import DeploymentSpec, SpecError, load_spec
from dynrt.runtime import config as config_flags
from dynrt.runtime.config import ControllerConfig, from_args
from dynrt.runtime.lifecycle import run_main
from dynrt.runtime.log import setup_logging

if TYPE_CHECKING:
    from dynrt.runtime.discovery import EtcdClient


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", choices=["run", "apply", "check"], default="run",
                        help="run (default): manage the deployment; apply: store a new spec for the running "
                             "controller (rolling update); check: validate a file")
    parser.add_argument("-f", "--file", default="", help="deployment.yaml")
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="apply: wait up to SECONDS until every replica runs the new spec and is ready")
    config_flags.add_arguments(parser, ControllerConfig)


async def wait_rollout(etcd: EtcdClient, ns: str, generation: int, timeout: float) -> bool:
    """True once every replica runs the spec of ``generation`` (or later), is ready,
    and each model has as many as it should (no draining ones left)."""
    from dynrt.controller.reconcile import rollout_finished
    from dynrt.controller.records import read_autoscalers, read_replicas, read_spec
    from dynrt.runtime.discovery import ETCD_ERRORS, EtcdUnavailable

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            record = await read_spec(etcd, ns)
            replicas = await read_replicas(etcd, ns)
            autoscalers = await read_autoscalers(etcd, ns)
        except (EtcdUnavailable, *ETCD_ERRORS):
            await asyncio.sleep(0.5)
            continue
        if record is not None and rollout_finished(record, generation, replicas, autoscalers):
            return True
        await asyncio.sleep(0.25)
    return False


async def _apply(config: ControllerConfig, path: str, wait: float) -> int:
    from dynrt.controller.records import write_spec
    from dynrt.runtime.discovery import EtcdClient

    spec = load_spec(path)
    etcd = EtcdClient.from_config(config)
    try:
        record = await write_spec(etcd, config.namespace, spec, source=path)
        print(f"dynrt controller: applied {path} as generation {record.generation} "
              f"({', '.join(m.name for m in spec.models)})", flush=True)
        if wait > 0:
            if not await wait_rollout(etcd, config.namespace, record.generation, wait):
                print(f"dynrt controller: rollout not finished after {wait}s", file=sys.stderr)
                return 1
            print("dynrt controller: rollout finished", flush=True)
        return 0
    finally:
        await etcd.close()


async def _run(config: ControllerConfig, path: str) -> int:
    from dynrt.controller.controller import Controller

    seed = (load_spec(path), path) if path else None
    return await Controller(config, seed=seed).run()


def _describe(spec: DeploymentSpec) -> str:
    lines = []
    for m in spec.models:
        scaling = (f"autoscaling {m.autoscaling.metric} target {m.autoscaling.target}, "
                   f"{m.min_replicas}..{m.ceiling}" if m.autoscaling else "fixed")
        lines.append(f"{m.name}: {m.engine}, {m.initial_replicas} replica(s), {scaling}; "
                     f"health every {m.health_check.period}s, timeout {m.health_check.timeout}s; "
                     f"worker args: {' '.join(m.worker_args())}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    config = from_args(ControllerConfig, args)
    try:
        if args.action == "check":
            if not args.file:
                raise SpecError("check needs -f FILE")
            print(_describe(load_spec(args.file)))
            return 0
        if args.action == "apply":
            if not args.file:
                raise SpecError("apply needs -f FILE")
            setup_logging("controller", "warning")
            return run_main(_apply(config, args.file, args.wait))
        if args.file:
            load_spec(args.file)  # a bad file fails here, before anything starts
    except SpecError as exc:
        print(f"dynrt controller: {exc}", file=sys.stderr)
        return 2
    setup_logging("controller", config.log_level)
    return run_main(_run(config, args.file))
