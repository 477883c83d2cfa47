"""``dynrt status``: what a deployment looks like right now, from etcd — instances with
their load (each worker's ``/health``), frontends, and the controller's view (active
controller, spec generation, each replica's state and restarts, autoscaler decisions).

    dynrt status --namespace prod --etcd-endpoints 10.0.0.5:2379
    dynrt status --json

The controller's records are read as plain JSON: ``frontend`` does not import ``worker``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import aiohttp
import msgspec

from dynrt.runtime import config as config_flags
from dynrt.runtime.config import CommonConfig, from_args
from dynrt.runtime.discovery import EtcdClient, EtcdUnavailable
from dynrt.runtime.lifecycle import run_main
from dynrt.runtime.log import setup_logging
from dynrt.runtime.protocol import controller_prefix, frontends_prefix, instances_prefix


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    config_flags.add_arguments(parser, CommonConfig)


async def _health(session: aiohttp.ClientSession, instance: dict[str, Any]) -> dict[str, Any]:
    host = instance.get("host", "127.0.0.1")
    import socket

    if host == socket.gethostname():
        host = "127.0.0.1"
    try:
        async with session.get(f"http://{host}:{instance.get('system_port')}/health") as response:
            return dict(await response.json())
    except Exception as exc:  # unreachable worker: shown as such
        return {"status": f"unreachable ({type(exc).__name__})"}


async def collect(config: CommonConfig) -> dict[str, Any]:
    etcd = EtcdClient.from_config(config)
    try:
        _, instances_raw = await etcd.get_prefix(instances_prefix(config.namespace))
        _, frontends_raw = await etcd.get_prefix(frontends_prefix(config.namespace))
        _, controller_raw = await etcd.get_prefix(controller_prefix(config.namespace))
    finally:
        await etcd.close()

    def decode(value: bytes) -> Any:
        try:
            return msgspec.json.decode(value)
        except msgspec.DecodeError:
            return None

    instances = [d for d in map(decode, instances_raw.values()) if isinstance(d, dict)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.5)) as session:
        healths = await asyncio.gather(*(_health(session, i) for i in instances))
    for instance, health in zip(instances, healths):
        instance["health"] = health
    prefix = controller_prefix(config.namespace)
    controller: dict[str, Any] = {"leader": None, "spec": None, "replicas": [], "autoscalers": []}
    for key, value in controller_raw.items():
        rest = key[len(prefix):]
        doc = decode(value)
        if rest == "leader":
            controller["leader"] = doc
        elif rest == "spec":
            controller["spec"] = doc
        elif rest.startswith("replicas/"):
            controller["replicas"].append(doc)
        elif rest.startswith("autoscaler/"):
            controller["autoscalers"].append(doc)
    return {"namespace": config.namespace, "instances": sorted(instances, key=lambda i: (i.get("model", ""), i.get("instance_id", ""))),
            "frontends": [d for d in map(decode, frontends_raw.values()) if d],
            "controller": controller}


def _ago(ts: float) -> str:
    if not ts:
        return "-"
    seconds = max(0.0, time.time() - ts)
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}m"


def render(status: dict[str, Any]) -> str:
    lines = [f"namespace {status['namespace']}", "", f"instances ({len(status['instances'])})"]
    lines.append(f"  {'instance':<14} {'model':<18} {'pid':>7} {'replica':<22} {'health':<10} {'kv used':>11} "
                 f"{'running':>7} {'waiting':>7} {'in flight':>9}")
    for i in status["instances"]:
        h = i.get("health", {})
        kv = f"{h.get('kv_blocks_used', '?')}/{h.get('kv_blocks_total', '?')}"
        state = "draining" if i.get("draining") else h.get("status", "?")
        lines.append(f"  {i.get('instance_id', ''):<14} {i.get('model', ''):<18} {i.get('pid', 0):>7} "
                     f"{i.get('replica_id', '') or '-':<22} {state:<10} {kv:>11} {h.get('running', '?'):>7} "
                     f"{h.get('waiting', '?'):>7} {h.get('in_flight', '?'):>9}")
    lines += ["", f"frontends ({len(status['frontends'])})"]
    for f in status["frontends"]:
        lines.append(f"  {f.get('frontend_id', ''):<14} {f.get('host', '')}:{f.get('http_port', '')} pid {f.get('pid', 0)}"
                     f" up {_ago(f.get('started_at', 0))}")
    c = status["controller"]
    lines.append("")
    if c["leader"]:
        spec = c["spec"] or {}
        lines.append(f"controller: active {c['leader'].get('controller_id')} (pid {c['leader'].get('pid')}, "
                     f"for {_ago(c['leader'].get('since', 0))}), spec generation {spec.get('generation', '-')}")
    elif c["spec"] or c["replicas"]:
        lines.append("controller: NONE ACTIVE (replicas keep serving; start `dynrt controller` to manage them)")
    else:
        lines.append("controller: none")
    if c["replicas"]:
        lines.append(f"  {'replica':<22} {'model':<18} {'state':<10} {'pid':>7} {'restarts':>8} {'up':>6} "
                     f"{'healthy':>8}  last failure")
        for r in sorted(c["replicas"], key=lambda r: (r.get("model", ""), r.get("replica_id", ""))):
            lines.append(f"  {r.get('replica_id', ''):<22} {r.get('model', ''):<18} {r.get('state', ''):<10} "
                         f"{r.get('pid', 0):>7} {r.get('restarts', 0):>8} {_ago(r.get('started_at', 0)):>6} "
                         f"{_ago(r.get('last_healthy_at', 0)):>8}  {r.get('last_failure', '') or '-'}")
    for a in c["autoscalers"]:
        last = (a.get("decisions") or [None])[-1]
        decided = (f"; last: {last['from_replicas']}→{last['to_replicas']} {_ago(last['at'])} ago ({last['reason']})"
                   if last else "")
        lines.append(f"  autoscaler {a.get('model')}: target {a.get('target_replicas')} replicas, "
                     f"{len(a.get('samples', []))} samples{decided}")
    return "\n".join(lines)


async def _main(config: CommonConfig, as_json: bool) -> int:
    try:
        status = await collect(config)
    except EtcdUnavailable as exc:
        print(f"dynrt status: etcd unavailable at {config.etcd_endpoints}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=2) if as_json else render(status))
    return 0


def main(args: argparse.Namespace) -> int:
    config = from_args(CommonConfig, args)
    setup_logging("status", "warning")
    return run_main(_main(config, args.json))
