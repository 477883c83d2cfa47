"""``dynrt up``: a whole local deployment in one command — embedded etcd and NATS, one
frontend, and a controller (``dynrt controller``) that keeps N workers running. Prints
the URL, progress lines while workers start and load their model (each with its log
file), a ready line and a status table (refreshed when it changes); restarts a crashed
child; Ctrl-C / SIGTERM stops everything in order (frontend drains, the controller drains
its workers, then NATS and etcd) and leaves no process behind.

    dynrt up --workers 2 --port 8000 -- --num-blocks 4096
    dynrt up --engine vllm --model ~/models/Qwen2.5-0.5B-Instruct -- --max-num-seqs 64

The workers' engine is the mock unless ``--engine vllm``: the first command runs anywhere.
Flags after ``--`` go to every ``dynrt worker`` unchanged (vLLM's own engine flags with
``--engine vllm``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynrt.controller.records import read_controller_records
from dynrt.runtime.discovery import ETCD_ERRORS, EtcdClient, EtcdUnavailable
from dynrt.runtime.embedded import EmbeddedServers
from dynrt.runtime.health import fetch_health_json
from dynrt.runtime.lifecycle import run_main
from dynrt.runtime.log import get_logger, setup_logging
from dynrt.runtime.procs import spawn, stop_process
from dynrt.runtime.protocol import InstanceRecord
from dynrt.status import fetch_healths, instance_state, read_instances

log = get_logger("up")

PROGRESS_EVERY_S = 10.0  # a loading worker's progress line is repeated this often


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=2, help="number of workers (default 2)")
    parser.add_argument("--engine", choices=["mock", "vllm"], default="mock", help="worker engine (default mock)")
    parser.add_argument("--model", default="mock-model", help="model name (mock) or model folder (vllm)")
    parser.add_argument("--port", type=int, default=8000, help="frontend HTTP port (default 8000)")
    parser.add_argument("--speedup", default="1", help="mock engine speed-up (default 1; 'inf' = no sleeping); "
                        "mock only")
    parser.add_argument("--namespace", default="dynrt")
    parser.add_argument("--state-dir", default="", help="where logs and etcd data go (default: a temp dir)")
    parser.add_argument("--quiet", action="store_true", help="no status table")
    parser.add_argument("worker_args", nargs="*", help="after --: flags passed to every worker "
                        "(with --engine vllm: vLLM's engine flags, e.g. -- --max-num-seqs 64)")


@dataclass
class Child:
    """A supervised child process."""

    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_restart: float = 0.0
    backoff: float = 1.0
    env: dict[str, str] = field(default_factory=dict)

    def spawn(self) -> None:
        # Its own session: a terminal's Ctrl-C reaches only `dynrt up`, which stops its
        # children in order; it dies with `dynrt up` all the same (PDEATHSIG).
        self.proc = spawn(self.argv, self.log_path, env=self.env, new_session=True)

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self, timeout: float) -> None:
        """SIGTERM (after SIGCONT), SIGKILL if it still runs after ``timeout``."""
        if self.proc is not None:
            stop_process(self.proc, timeout)


class LocalDeployment:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.state_dir = Path(args.state_dir or tempfile.mkdtemp(prefix="dynrt-up-"))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.servers = EmbeddedServers(self.state_dir)
        self.frontend: Child | None = None
        self.controller: Child | None = None  # it launches and supervises the workers
        self.etcd: EtcdClient | None = None
        self.stopping = asyncio.Event()
        self._last_table = ""
        self._progress_printed: dict[str, tuple[str, float]] = {}  # worker → (state, when printed)

    def _common(self) -> list[str]:
        return ["--namespace", self.args.namespace, "--etcd-endpoints", self.servers.etcd.endpoint,
                "--nats-url", self.servers.nats.url]

    def _build_children(self) -> None:
        python = sys.executable
        self.frontend = Child("frontend", [python, "-m", "dynrt.cli", "frontend", *self._common(),
                                           "--http-port", str(self.args.port)], self.state_dir / "frontend.log")
        # The workers are the controller's: it launches, health-checks and replaces them
        # (logs in state_dir/replicas/), and drains them when it is stopped.
        engine_args = ["--speedup", str(self.args.speedup)] if self.args.engine == "mock" else []
        spec = {"models": [{"name": self.args.model, "engine": self.args.engine, "replicas": self.args.workers,
                            "args": [*engine_args, *self.args.worker_args]}]}
        spec_path = self.state_dir / "deployment.yaml"
        spec_path.write_text(json.dumps(spec, indent=2))  # JSON is YAML
        argv = [python, "-m", "dynrt.cli", "controller", "-f", str(spec_path), *self._common(),
                "--state-dir", str(self.state_dir), "--stop-replicas-on-exit"]
        self.controller = Child("controller", argv, self.state_dir / "controller.log")

    @property
    def children(self) -> list[Child]:
        """What ``dynrt up`` supervises, in start order."""
        assert self.controller is not None and self.frontend is not None
        return [self.controller, self.frontend]

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopping.set)
        print(f"dynrt up: starting etcd and NATS (logs in {self.state_dir})", flush=True)
        await asyncio.to_thread(self.servers.start)
        self._build_children()
        self.etcd = etcd = EtcdClient(self.servers.etcd.endpoint)
        for child in self.children:
            child.spawn()
        url = f"http://127.0.0.1:{self.args.port}"
        print(f"dynrt up: frontend at {url}/v1  (etcd {self.servers.etcd.endpoint}, NATS {self.servers.nats.url})",
              flush=True)
        try:
            await self._wait_ready(url)
            await self._supervise(url)
        finally:
            await etcd.close()
            await asyncio.to_thread(self._stop_all)
        return 0

    async def _wait_ready(self, url: str) -> None:
        started = time.monotonic()
        while not self.stopping.is_set():
            health = await asyncio.to_thread(fetch_health_json, f"{url}/health")
            ready = len((health or {}).get("instances", []))
            if health and health.get("status") == "ready" and ready >= self.args.workers:
                print(f"dynrt up: ready in {time.monotonic() - started:.1f}s: {ready} worker(s) serving "
                      f"'{self.args.model}' — try:\n  curl {url}/v1/chat/completions -H 'Content-Type: application/json' "
                      f"-d '{{\"model\": \"{self.args.model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"hello\"}}]}}'\n"
                      f"  dynrt status --namespace {self.args.namespace} --etcd-endpoints {self.servers.etcd.endpoint}",
                      flush=True)
                return
            self._restart_crashed()
            await self._print_progress()
            try:
                await asyncio.wait_for(self.stopping.wait(), 0.5)
            except asyncio.TimeoutError:
                pass

    async def _print_progress(self) -> None:
        """A line per worker when it starts, begins loading, and every
        ``PROGRESS_EVERY_S`` while it loads — with where its log is."""
        assert self.etcd is not None
        try:
            instances = await read_instances(self.etcd, self.args.namespace)
            replicas = (await read_controller_records(self.etcd, self.args.namespace)).replicas
        except (EtcdUnavailable, *ETCD_ERRORS):
            return
        now = time.monotonic()
        def log_of(replica_id: str) -> str:  # where the controller's launcher writes it
            return str(self.state_dir / "replicas" / f"{replica_id}.log") if replica_id else "-"

        lines: dict[str, tuple[str, str]] = {}  # worker → (state, line)
        for r in replicas:
            if r.state in ("pending", "starting") and r.pid > 0:
                lines[r.replica_id] = ("starting", f"dynrt up: worker {r.replica_id} (pid {r.pid}) starting "
                                                   f"(log: {r.log_path or log_of(r.replica_id)})")
        for i in instances:
            name = i.replica_id or i.instance_id
            if i.loading:
                lines[name] = ("loading", f"dynrt up: worker {name} (pid {i.pid}) loading '{i.model}' "
                                          f"({i.engine}), {time.time() - i.started_at:.0f}s so far "
                                          f"(log: {log_of(i.replica_id)})")
            elif name in lines:
                lines[name] = ("ready", f"dynrt up: worker {name} (pid {i.pid}) ready: '{i.model}', "
                                        f"context {i.context_length}, {i.kv_blocks_total} KV blocks")
        for name, (state, line) in sorted(lines.items()):
            printed = self._progress_printed.get(name)
            if printed is None or printed[0] != state or (state == "loading" and now - printed[1] >= PROGRESS_EVERY_S):
                self._progress_printed[name] = (state, now)
                print(line, flush=True)

    async def _supervise(self, url: str) -> None:
        while not self.stopping.is_set():
            self._restart_crashed()
            if not self.args.quiet:
                await self._print_status(url)
            try:
                await asyncio.wait_for(self.stopping.wait(), 2.0)
            except asyncio.TimeoutError:
                pass

    def _restart_crashed(self) -> None:
        now = time.monotonic()
        for child in self.children:
            code = child.exited()
            if code is None or self.stopping.is_set():
                continue
            if child.next_restart == 0.0:
                child.next_restart = now + child.backoff
                print(f"dynrt up: {child.name} exited with {code}; restarting in {child.backoff:.0f}s "
                      f"(log: {child.log_path})", flush=True)
            elif now >= child.next_restart:
                child.restarts += 1
                child.backoff = min(child.backoff * 2, 30.0)
                child.next_restart = 0.0
                child.spawn()

    async def _print_status(self, url: str) -> None:
        health = await asyncio.to_thread(fetch_health_json, f"{url}/health") or {}
        lines = [f"{'instance':<14} {'pid':>7} {'model':<20} {'state':<13} {'kv used':>12} {'running':>8} "
                 f"{'waiting':>8}"]
        for record, w in await self._worker_health():
            kv = f"{w.get('kv_blocks_used', '?')}/{w.get('kv_blocks_total', '?')}"
            lines.append(f"{record.instance_id:<14} {record.pid:>7} {record.model:<20} {instance_state(record, w):<13} "
                         f"{kv:>12} {w.get('running', '?'):>8} {w.get('waiting', '?'):>8}")
        lines.append(f"frontend: {health.get('status', 'down')}, in flight {health.get('in_flight', 0)}")
        table = "\n".join(lines)
        if table != self._last_table:
            self._last_table = table
            print(table, flush=True)

    async def _worker_health(self) -> list[tuple[InstanceRecord, dict[str, Any]]]:
        """Each worker's instance record in etcd (loading ones too) with its /health."""
        assert self.etcd is not None
        try:
            instances = await read_instances(self.etcd, self.args.namespace)
        except (EtcdUnavailable, *ETCD_ERRORS):
            return []
        healths = await fetch_healths(instances, timeout=1.0)
        return list(zip(instances, healths))

    def _stop_all(self) -> None:
        print("dynrt up: stopping (frontend, controller and its workers, NATS, etcd)", flush=True)
        for child in (self.frontend, self.controller):
            if child is not None:
                child.stop(35)
        self.servers.stop()
        print("dynrt up: stopped", flush=True)


async def _main(args: argparse.Namespace) -> int:
    # Found, not imported (importing vLLM takes seconds): without it every worker would
    # exit 2, again and again.
    if args.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        from dynrt.worker.main import VLLM_MISSING

        print(VLLM_MISSING.format(error="no module named 'vllm'").replace("dynrt worker:", "dynrt up:", 1),
              file=sys.stderr)
        return 2
    return await LocalDeployment(args).run()


def main(args: argparse.Namespace) -> int:
    setup_logging("up", "warning")
    return run_main(_main(args))
