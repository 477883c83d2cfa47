"""``dynrt status``: what a deployment looks like right now, from etcd — instances with
their load (each worker's ``/health``), frontends, and the controller's view (active
controller, spec generation, each replica's state and restarts, autoscaler decisions).

    dynrt status --namespace prod --etcd-endpoints 10.0.0.5:2379
    dynrt status --json

Every record is read as its type (``runtime.protocol``, ``controller.records``);
``--json`` prints them as stored, each instance with its ``/health`` added.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec

from dynrt.controller.probe import health_url
from dynrt.controller.records import ControllerRecords, decode_valid, read_controller_records
from dynrt.runtime import config as config_flags
from dynrt.runtime.config import CommonConfig, from_args
from dynrt.runtime.discovery import EtcdClient, EtcdUnavailable
from dynrt.runtime.lifecycle import run_main
from dynrt.runtime.log import setup_logging
from dynrt.runtime.protocol import (
    FrontendRecord,
    InstanceRecord,
    frontend_record_decoder,
    frontends_prefix,
    instance_record_decoder,
    instances_prefix,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    config_flags.add_arguments(parser, CommonConfig)


async def read_instances(etcd: EtcdClient, ns: str) -> list[InstanceRecord]:
    """Every registered instance, by model then id (malformed records left out)."""
    _, values = await etcd.get_prefix(instances_prefix(ns))
    return sorted(decode_valid(instance_record_decoder, values), key=lambda i: (i.model, i.instance_id))


async def read_frontends(etcd: EtcdClient, ns: str) -> list[FrontendRecord]:
    _, values = await etcd.get_prefix(frontends_prefix(ns))
    return decode_valid(frontend_record_decoder, values)


async def fetch_healths(instances: list[InstanceRecord], timeout: float = 1.5) -> list[dict[str, Any]]:
    """Each instance's ``/health`` body (503 answers have one too); an unreachable one
    is ``{"status": "unreachable (...)"}``."""

    async def fetch(session: aiohttp.ClientSession, instance: InstanceRecord) -> dict[str, Any]:
        try:
            async with session.get(health_url(instance)) as response:
                return dict(await response.json())
        except Exception as exc:  # unreachable worker: shown as such
            return {"status": f"unreachable ({type(exc).__name__})"}

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        return list(await asyncio.gather(*(fetch(session, i) for i in instances)))


@dataclass
class DeploymentStatus:
    namespace: str
    instances: list[tuple[InstanceRecord, dict[str, Any]]]  # (record, its /health)
    frontends: list[FrontendRecord]
    controller: ControllerRecords

    def to_json(self) -> dict[str, Any]:
        return {"namespace": self.namespace,
                "instances": [{**msgspec.to_builtins(i), "health": h} for i, h in self.instances],
                "frontends": msgspec.to_builtins(self.frontends),
                "controller": msgspec.to_builtins(self.controller)}


async def collect(config: CommonConfig) -> DeploymentStatus:
    etcd = EtcdClient.from_config(config)
    try:
        instances = await read_instances(etcd, config.namespace)
        frontends = await read_frontends(etcd, config.namespace)
        controller = await read_controller_records(etcd, config.namespace)
    finally:
        await etcd.close()
    healths = await fetch_healths(instances)
    return DeploymentStatus(config.namespace, list(zip(instances, healths)), frontends, controller)


def _ago(ts: float) -> str:
    if not ts:
        return "-"
    seconds = max(0.0, time.time() - ts)
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}m"


def instance_state(record: InstanceRecord, health: dict[str, Any]) -> str:
    """What an instance is doing, for a table: ``loading 12s`` while its engine loads
    (its record says so, whatever /health answers), ``draining``, else /health's status."""
    if record.loading:
        return f"loading {_ago(record.started_at)}"
    return "draining" if record.draining else str(health.get("status", "?"))


def render(status: DeploymentStatus) -> str:
    lines = [f"namespace {status.namespace}", "", f"instances ({len(status.instances)})"]
    lines.append(f"  {'instance':<14} {'model':<18} {'pid':>7} {'replica':<22} {'health':<12} {'kv used':>11} "
                 f"{'running':>7} {'waiting':>7} {'in flight':>9}")
    for i, h in status.instances:
        kv = f"{h.get('kv_blocks_used', '?')}/{h.get('kv_blocks_total', '?')}"
        state = instance_state(i, h)
        lines.append(f"  {i.instance_id:<14} {i.model:<18} {i.pid:>7} {i.replica_id or '-':<22} {state:<12} {kv:>11} "
                     f"{h.get('running', '?'):>7} {h.get('waiting', '?'):>7} {h.get('in_flight', '?'):>9}")
    lines += ["", f"frontends ({len(status.frontends)})"]
    for f in status.frontends:
        lines.append(f"  {f.frontend_id:<14} {f.host}:{f.http_port} pid {f.pid} up {_ago(f.started_at)}")
    lines.append("")
    lines += _render_controller(status.controller)
    return "\n".join(lines)


def _render_controller(c: ControllerRecords) -> list[str]:
    if c.leader:
        lines = [f"controller: active {c.leader.controller_id} (pid {c.leader.pid}, for {_ago(c.leader.since)}), "
                 f"spec generation {c.spec.generation if c.spec else '-'}"]
    elif c.spec or c.replicas:
        lines = ["controller: NONE ACTIVE (replicas keep serving; start `dynrt controller` to manage them)"]
    else:
        lines = ["controller: none"]
    if c.replicas:
        lines.append(f"  {'replica':<22} {'model':<18} {'state':<10} {'pid':>7} {'restarts':>8} {'up':>6} "
                     f"{'healthy':>8}  last failure")
        for r in sorted(c.replicas, key=lambda r: (r.model, r.replica_id)):
            lines.append(f"  {r.replica_id:<22} {r.model:<18} {r.state:<10} {r.pid:>7} {r.restarts:>8} "
                         f"{_ago(r.started_at):>6} {_ago(r.last_healthy_at):>8}  {r.last_failure or '-'}")
    for a in c.autoscalers:
        last = a.decisions[-1] if a.decisions else None
        decided = (f"; last: {last.from_replicas}→{last.to_replicas} {_ago(last.at)} ago ({last.reason})"
                   if last else "")
        lines.append(f"  autoscaler {a.model}: target {a.target_replicas} replicas, {len(a.samples)} samples{decided}")
    return lines


async def _main(config: CommonConfig, as_json: bool) -> int:
    try:
        status = await collect(config)
    except EtcdUnavailable as exc:
        print(f"dynrt status: etcd unavailable at {config.etcd_endpoints}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(status.to_json(), indent=2) if as_json else render(status))
    return 0


def main(args: argparse.Namespace) -> int:
    config = from_args(CommonConfig, args)
    setup_logging("status", "warning")
    return run_main(_main(config, args.json))
