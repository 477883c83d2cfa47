"""The control plane at scale, on one machine: N simulated workers, F frontends, real etcd
and NATS, a steady modest request load; what discovery, etcd, NATS and the frontends cost.

Workers are ``dynrt worker --engine mock --instances K`` processes (ceil(N/K) of them):
each instance is a whole worker with its own instance id, lease, record, subjects, load
reports (with their heartbeat) and KV events; the K instances of a process share one etcd
client and one NATS connection (so etcd sees ceil(N/K) gRPC connections and NATS
ceil(N/K) worker connections instead of N — the lease, keep-alive, watch and message load
are the N instances' own). Frontends are ``dynrt frontend`` processes routing locally
(``--router-mode kv``), or (cells ``NxF:remote``) in ``--router-mode remote`` beside one
standalone ``dynrt router``.

Per cell (N, F, mode), measured:

- discovery convergence, ``--reps`` times: a single-instance worker process is started
  (its ``worker_ready`` log line, right after its record is put, is time 0) → the last
  frontend's ``event=instance_added`` for it; then SIGKILLed (time 0) → the last
  frontend's ``instance_suspect`` or ``instance_removed`` (out of routing); and its lease
  expiring (the benchmark's own etcd watch sees the delete: time 0) → the last frontend's
  ``instance_removed`` (propagation). Probe workers use ``--lease-ttl 3`` (the kill →
  removed time is that TTL plus propagation);
- etcd gRPC messages received per second by method (its ``/metrics``:
  ``grpc_server_msg_received_total``; a lease keep-alive is one message on a
  ``LeaseKeepAlive`` stream), over the ``--window``;
- NATS messages and bytes per second in and out (nats-server ``/varz``), and messages
  delivered per second by kind (``/connz?subs=detail``: each subscription's delivered
  count, summed by subject: load reports, KV events, requests and control, responses);
  the mean size of a load report and of a KV event batch from a 2 s sample by a wildcard
  subscriber in this process (nats-server does not count bytes per subject);
- CPU (% of one core, ``/proc/<pid>/stat``) of each frontend, the router, the worker
  processes, etcd and nats-server; frontend and router RSS;
- a frontend joining the running cell: process start → ``/health`` ready listing all N;
- router decision latency at N instances with a ~1M-block KV index:
  ``benchmarks/routing_decision.py --instances N`` (run after the cells of that N).

Cells a 2-core machine cannot run are skipped with the measured reason (frontends not
ready within ``--start-timeout``; or a smaller F at the same N already used the whole
machine, ``--saturated`` % CPU).

Results go under ``--label`` (e.g. before / after) into ``benchmarks/results/scale.json``,
keeping the other labels there, and ``scale.png`` plots every label.

    flock /tmp/dynrt-bench.lock .venv/bin/python -m benchmarks.scale --label before
    python -m benchmarks.scale --grid 100x1,100x4 --reps 2 --window 3   # a quick try
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import nats

from benchmarks.common import add_results_dir_argument, machine_facts, options_of, print_table, pyplot
from benchmarks.scale_probes import LogTail, Snapshot, rss_mib, snapshot
from dynrt.runtime.discovery import EtcdClient, PrefixWatcher
from dynrt.runtime.embedded import EtcdServer, NatsServer, free_port
from dynrt.runtime.procs import stop_processes
from dynrt.runtime.protocol import instance_record_decoder, instances_prefix, kv_events_subject_wildcard, load_subject_wildcard
from harness.frontend import FrontendProcess
from harness.processes import SystemPortProcess, spawn_dynrt
from harness.stats import percentile

DEFAULT_GRID = "100x1,100x4,100x16,300x1,300x4,300x16,1000x1,1000x4,1000x16,1000x16:remote"
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing".split()


@dataclass(frozen=True)
class Cell:
    n: int
    f: int
    mode: str  # local | remote

    @classmethod
    def parse(cls, text: str) -> "Cell":
        size, _, mode = text.partition(":")
        n, _, f = size.partition("x")
        return cls(int(n), int(f), mode or "local")

    @property
    def name(self) -> str:
        return f"{self.n}x{self.f}:{self.mode}"


def p(values: list[float], q: float) -> float | None:
    return round(percentile(values, q), 4) if values else None


@dataclass
class Pool:
    """etcd, nats-server and N simulated workers, with this process's own view of the
    instance records (put and delete times)."""

    args: argparse.Namespace
    n: int
    dir: Path
    namespace: str = field(default_factory=lambda: "scale" + uuid.uuid4().hex[:8])
    etcd: EtcdServer | None = None
    nats: NatsServer | None = None
    nats_monitor: str = ""
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    put_at: dict[str, float] = field(default_factory=dict)
    deleted_at: dict[str, float] = field(default_factory=dict)
    _key_iid: dict[str, str] = field(default_factory=dict)
    _etcd_client: EtcdClient | None = None
    _watcher: PrefixWatcher | None = None

    def conn_args(self) -> list[str]:
        assert self.etcd is not None and self.nats is not None
        return ["--namespace", self.namespace, "--etcd-endpoints", self.etcd.endpoint, "--nats-url", self.nats.url]

    def routable(self) -> int:
        return len(set(self.put_at) - set(self.deleted_at))

    def _on_put(self, key: str, value: bytes) -> None:
        record = instance_record_decoder.decode(value)
        if record.routable and record.instance_id not in self.put_at:
            self.put_at[record.instance_id] = time.time()
            self._key_iid[key] = record.instance_id

    def _on_delete(self, key: str) -> None:
        iid = self._key_iid.get(key)
        if iid is not None:
            self.deleted_at.setdefault(iid, time.time())

    async def start(self) -> float:
        """Start everything; the seconds until all N instances were registered."""
        self.etcd = EtcdServer(self.dir / "etcd")
        await asyncio.to_thread(self.etcd.start)
        monitor_port = free_port()
        self.nats = NatsServer(self.dir / "nats", extra_args=["-m", str(monitor_port)])
        await asyncio.to_thread(self.nats.start)
        self.nats_monitor = f"http://127.0.0.1:{monitor_port}"
        self._etcd_client = EtcdClient(self.etcd.endpoint, timeout=10.0)
        self._watcher = PrefixWatcher(self._etcd_client, instances_prefix(self.namespace), self._on_put,
                                      self._on_delete)
        await self._watcher.start(wait=30)
        t0 = time.monotonic()
        k = self.args.instances_per_process
        for i in range(math.ceil(self.n / k)):
            count = min(k, self.n - i * k)
            self.workers.append(spawn_dynrt(
                ["worker", "--engine", "mock", "--instances", str(count), *self.conn_args()],
                self.dir / f"workers{i}.log"))
        while self.routable() < self.n:
            if time.monotonic() - t0 > self.args.start_timeout * 2:
                raise RuntimeError(f"only {self.routable()} of {self.n} instances registered")
            if any(w.poll() is not None for w in self.workers):
                raise RuntimeError("a worker process exited while starting; see " + str(self.dir))
            await asyncio.sleep(0.1)
        return time.monotonic() - t0

    async def stop(self) -> None:
        if self._watcher is not None:
            await self._watcher.close()
        if self._etcd_client is not None:
            await self._etcd_client.close()
        await asyncio.to_thread(stop_processes, self.workers, 30.0)
        for server in (self.nats, self.etcd):
            if server is not None:
                await asyncio.to_thread(server.stop)


class LoadGenerator:
    """A steady, bounded open-loop request rate spread over the frontends (short
    completions, random prompts of a few KV blocks, so workers emit KV events)."""

    def __init__(self, urls: list[str], rate: float, max_in_flight: int = 64) -> None:
        self.urls = urls
        self.rate = rate
        self.gate = asyncio.Semaphore(max_in_flight)
        self.ok = 0
        self.failed = 0
        self.dropped = 0
        self.failures: dict[str, int] = {}  # by HTTP status or exception type
        self.latencies: list[float] = []
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()

    async def _one(self, session: aiohttp.ClientSession, url: str) -> None:
        prompt = " ".join(random.choice(WORDS) for _ in range(40))
        body = {"model": "mock-model", "prompt": prompt, "max_tokens": 16}
        t0 = time.monotonic()
        try:
            async with session.post(f"{url}/v1/completions", json=body) as response:
                await response.read()
                if response.status == 200:
                    self.ok += 1
                    self.latencies.append(time.monotonic() - t0)
                else:
                    self._fail(str(response.status))
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self._fail(type(exc).__name__)
        finally:
            self.gate.release()

    def _fail(self, kind: str) -> None:
        self.failed += 1
        self.failures[kind] = self.failures.get(kind, 0) + 1

    async def _run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            next_at = time.monotonic()
            i = 0
            while True:
                next_at += 1 / self.rate
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                if self.gate.locked():
                    self.dropped += 1
                    continue
                await self.gate.acquire()
                task = asyncio.create_task(self._one(session, self.urls[i % len(self.urls)]))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)
                i += 1

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> dict[str, Any]:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=10)
        return {"rate": self.rate, "ok": self.ok, "failed": self.failed, "dropped": self.dropped,
                "failures": self.failures,
                "latency_p50_s": p(self.latencies, 50), "latency_p99_s": p(self.latencies, 99)}


async def message_sizes(nats_url: str, namespace: str, seconds: float) -> dict[str, Any]:
    """Load reports and KV event batches heard in ``seconds`` by one subscriber: count
    and bytes per second, mean size."""
    counts = {"load_reports": [0, 0], "kv_events": [0, 0]}
    nc = await nats.connect(nats_url)

    def counter(kind: str) -> Any:
        async def cb(msg: Any) -> None:
            counts[kind][0] += 1
            counts[kind][1] += len(msg.data)
        return cb

    await nc.subscribe(load_subject_wildcard(namespace), cb=counter("load_reports"))
    await nc.subscribe(kv_events_subject_wildcard(namespace), cb=counter("kv_events"))
    await asyncio.sleep(seconds)
    await nc.close()
    return {kind: {"published_per_s": c / seconds, "bytes_per_s": b / seconds, "mean_bytes": b / c if c else None}
            for kind, (c, b) in counts.items()}


async def convergence(pool: Pool, tails: list[LogTail], args: argparse.Namespace) -> dict[str, Any]:
    """``--reps`` probe workers added and SIGKILLed; see the module docstring."""
    add_s: list[float] = []
    out_s: list[float] = []
    killed: dict[str, float] = {}
    for rep in range(args.reps):
        log_path = pool.dir / f"probe-{uuid.uuid4().hex[:6]}.log"
        proc = spawn_dynrt(["worker", "--engine", "mock", *pool.conn_args(), "--lease-ttl", "3"], log_path)
        tail = LogTail(log_path)
        ready: tuple[float, str] | None = None
        deadline = time.monotonic() + 60
        while ready is None and time.monotonic() < deadline:
            ready = next(((ts, iid) for ts, e, iid in tail.events() if e == "worker_ready"), None) or ready
            await asyncio.sleep(0.02)
        if ready is None:
            proc.kill()
            raise RuntimeError(f"probe worker not ready: {log_path}")
        ready_at, iid = ready
        seen = await _all_have(tails, "instance_added", iid, timeout=20)
        if seen is not None:
            add_s.append(max(seen) - ready_at)
        await asyncio.sleep(0.3)
        killed[iid] = time.time()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        gone = await _all_have(tails, ("instance_suspect", "instance_removed"), iid, timeout=15)
        if gone is not None:
            out_s.append(max(gone) - killed[iid])
    propagation: list[float] = []
    kill_removed: list[float] = []
    for iid, kill_at in killed.items():
        removed = await _all_have(tails, "instance_removed", iid, timeout=15)
        if removed is not None:
            kill_removed.append(max(removed) - kill_at)
            if iid in pool.deleted_at:
                propagation.append(max(removed) - pool.deleted_at[iid])
    return {"reps": args.reps,
            "add_p50_s": p(add_s, 50), "add_p99_s": p(add_s, 99), "add_s": add_s,
            "kill_out_of_routing_p50_s": p(out_s, 50), "kill_out_of_routing_p99_s": p(out_s, 99),
            "kill_out_of_routing_s": out_s,
            "delete_propagation_p50_s": p(propagation, 50), "delete_propagation_p99_s": p(propagation, 99),
            "kill_to_removed_p50_s": p(kill_removed, 50)}


async def _all_have(tails: list[LogTail], event: str | tuple[str, ...], iid: str, timeout: float) -> list[float] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        times = [t.first(event, iid) for t in tails]
        if all(t is not None for t in times):
            return [t for t in times if t is not None]
        await asyncio.sleep(0.05)
    return None


async def _listed(fe: FrontendProcess) -> int:
    """How many instances a frontend's ``/health`` lists (-1: no answer)."""
    try:
        return len((await fe.health())[1].get("instances", []))
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return -1


async def run_cell(pool: Pool, cell: Cell, args: argparse.Namespace) -> dict[str, Any]:
    router: SystemPortProcess | None = None
    frontend_args = ["--router-mode", "kv"]
    if cell.mode == "remote":
        router = SystemPortProcess(pool.dir, f"router-{cell.f}", ["router", *pool.conn_args()])
        await router.start(timeout=args.start_timeout)
        frontend_args = ["--router-mode", "remote"]
    frontends = [FrontendProcess(pool.dir, namespace=pool.namespace, etcd_endpoints=pool.etcd.endpoint,  # type: ignore[union-attr]
                                 nats_url=pool.nats.url, expect_instances=None, args=frontend_args,  # type: ignore[union-attr]
                                 name=f"fe-{cell.n}-{cell.f}-{cell.mode}-{i}", start_timeout=args.start_timeout)
                 for i in range(cell.f)]
    result: dict[str, Any] = {"n": cell.n, "f": cell.f, "mode": cell.mode}
    load: LoadGenerator | None = None
    try:
        t0 = time.monotonic()
        await asyncio.gather(*(fe.start() for fe in frontends))
        try:
            await asyncio.gather(*(fe.wait_instances(cell.n, timeout=args.start_timeout) for fe in frontends))
        except AssertionError:
            counts = await asyncio.gather(*(_listed(fe) for fe in frontends))
            result["skipped"] = (f"frontends' views did not reach {cell.n} instances within {args.start_timeout:.0f}s "
                                 f"of start (they listed {min(counts)}-{max(counts)}): the machine is saturated")
            return result
        result["frontends_ready_s"] = round(time.monotonic() - t0, 2)
        tails = [LogTail(fe.log_path) for fe in frontends]
        for t in tails:
            t.events()
        load = LoadGenerator([fe.url for fe in frontends], args.rate)
        load.start()
        await asyncio.sleep(args.settle)
        pids = {"frontend": [fe.pid for fe in frontends], "router": [router.pid] if router else [],
                "workers": [w.pid for w in pool.workers],
                "etcd": [pool.etcd.process.pid], "nats": [pool.nats.process.pid]}  # type: ignore[union-attr]
        all_pids = [pid for group in pids.values() for pid in group]
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            before = await snapshot(session, pool.etcd.endpoint, pool.nats_monitor, pool.namespace, all_pids)  # type: ignore[union-attr]
            sizes = await message_sizes(pool.nats.url, pool.namespace, min(2.0, args.window))  # type: ignore[union-attr]
            await asyncio.sleep(max(0.0, args.window - 2.0))
            after = await snapshot(session, pool.etcd.endpoint, pool.nats_monitor, pool.namespace, all_pids)  # type: ignore[union-attr]
        result |= summarize(before, after, pids, sizes)
        result["rss_mib"] = {"frontend_mean": round(sum(rss_mib(x) for x in pids["frontend"]) / cell.f, 1),
                             "router": round(rss_mib(router.pid), 1) if router else None}
        result["convergence"] = await convergence(pool, tails, args)
        result["load"] = await load.stop()
        load = None
        joiner = FrontendProcess(pool.dir, namespace=pool.namespace, etcd_endpoints=pool.etcd.endpoint,  # type: ignore[union-attr]
                                 nats_url=pool.nats.url, expect_instances=cell.n, args=frontend_args,  # type: ignore[union-attr]
                                 name=f"join-{cell.n}-{cell.f}-{cell.mode}", start_timeout=args.start_timeout)
        t0 = time.monotonic()
        try:
            await joiner.start()
            result["frontend_join_s"] = round(time.monotonic() - t0, 2)
        except AssertionError:
            result["frontend_join_s"] = None
        finally:
            await joiner.stop()
        return result
    finally:
        if load is not None:
            await load.stop()
        await asyncio.gather(*(fe.stop() for fe in frontends), return_exceptions=True)
        if router is not None:
            await router.stop()


def summarize(before: Snapshot, after: Snapshot, pids: dict[str, list[int]], sizes: dict[str, Any]) -> dict[str, Any]:
    rates = before.rates(after)
    cpu = rates["cpu"]

    def pct(group: str) -> list[float]:
        return [round(100 * cpu[pid], 1) for pid in pids[group]]

    etcd = {k: round(v, 1) for k, v in sorted(rates["etcd"].items()) if v > 0}
    nats_rates = rates["nats"]
    by_kind = {k.removeprefix("out_msgs."): round(v, 1) for k, v in sorted(nats_rates.items()) if k.startswith("out_msgs.")}
    fe = pct("frontend")
    total = sum(100 * v for pid, v in cpu.items() if pid != 0)
    machine = 100 * cpu[0]
    return {
        "window_s": round(rates["seconds"], 2),
        "etcd_msgs_per_s": etcd,
        "etcd_total_per_s": round(sum(etcd.values()), 1),
        "etcd_keepalives_per_s": etcd.get("LeaseKeepAlive", 0.0),
        "nats": {k: round(nats_rates[k], 1) for k in ("in_msgs", "out_msgs", "in_bytes", "out_bytes")},
        "nats_out_msgs_per_s_by_kind": by_kind,
        "nats_connections": after.nats.get("connections"),
        "nats_published_by_kind": sizes,
        "cpu_pct": {"frontend_each": fe, "frontend_mean": round(sum(fe) / len(fe), 1) if fe else None,
                    "frontend_max": max(fe) if fe else None, "router": (pct("router") or [None])[0],
                    "workers_total": round(sum(pct("workers")), 1), "etcd": pct("etcd")[0], "nats": pct("nats")[0],
                    "measured_total": round(total, 1), "machine_total": round(machine, 1),
                    "other_processes": round(machine - total, 1)},
    }


def decision_latency(n: int, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """``benchmarks/routing_decision.py --instances n`` in a child process."""
    cmd = [sys.executable, "-m", "benchmarks.routing_decision", "--instances", str(n), "--requests",
           str(args.decision_requests), "--no-memory", "--results-dir", str(out_dir)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=600)
    data = json.loads((out_dir / "routing_decision.json").read_text())
    return {"p50_us": round(data["decision"]["p50_us"], 1), "p99_us": round(data["decision"]["p99_us"], 1),
            "distinct_blocks": data["index"]["distinct_blocks"], "requests": args.decision_requests}


def save(args: argparse.Namespace, run_results: dict[str, Any]) -> dict[str, Any]:
    """This run's results into ``scale.json`` under ``--label`` (the other labels kept);
    called after every cell, so a run cut short keeps what it measured."""
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / "scale.json"
    existing = json.loads(path.read_text()) if path.exists() else {}
    runs = existing.get("runs", {})
    runs[args.label] = run_results | {"options": options_of(args), "machine": machine_facts()}
    doc = {"machine": "2-core shared VM (AMD EPYC, Firecracker), CPython 3.11", "runs": runs}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return runs


async def run(args: argparse.Namespace) -> dict[str, Any]:
    cells = [Cell.parse(c) for c in args.grid.split(",") if c]
    base = Path(tempfile.mkdtemp(prefix="dynrt-scale-"))
    results: dict[str, Any] = {"cells": [], "pools": {}, "decision": {}, "complete": False}
    try:
        for n in sorted({c.n for c in cells}):
            pool = Pool(args, n, base / f"n{n}")
            saturated: str | None = None
            try:
                start_s = await pool.start()
                results["pools"][str(n)] = {"workers_registered_s": round(start_s, 1),
                                            "worker_processes": len(pool.workers)}
                print(f"N={n}: {n} instances in {len(pool.workers)} processes registered in {start_s:.1f}s",
                      flush=True)
                for cell in sorted((c for c in cells if c.n == n), key=lambda c: (c.mode, c.f)):
                    if saturated and cell.mode == "local":
                        results["cells"].append({"n": n, "f": cell.f, "mode": cell.mode, "skipped": saturated})
                        continue
                    t0 = time.monotonic()
                    row = await run_cell(pool, cell, args)
                    row["cell_s"] = round(time.monotonic() - t0, 1)
                    results["cells"].append(row)
                    save(args, results)
                    print(f"  {cell.name}: {json.dumps(row)[:400]}", flush=True)
                    total = (row.get("cpu_pct") or {}).get("measured_total") or 0
                    if cell.mode == "local" and (row.get("skipped") or total >= args.saturated):
                        saturated = row.get("skipped") or (
                            f"at {cell.name} the benchmark's processes used {total:.0f}% CPU of the machine's "
                            f"{100 * (shutil.os.cpu_count() or 1)}%: a larger F cannot be measured here")
            finally:
                await pool.stop()
            if not args.no_decision:
                results["decision"][str(n)] = await asyncio.to_thread(decision_latency, n, args, base / f"rd{n}")
                save(args, results)
                print(f"N={n}: decision {results['decision'][str(n)]}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"logs kept in {base}")
    return results


def table(label: str, run: dict[str, Any]) -> None:
    headers = ["cell", "fe ready s", "join s", "add p50/p99 s", "kill→out p99 s", "del→rm p99 s", "etcd/s",
               "keepalive/s", "nats out/s", "load out/s", "kv out/s", "fe cpu %", "router %", "workers %",
               "bench %", "machine %", "decision p99 µs"]
    rows: list[list[Any]] = []
    for c in run["cells"]:
        name = f"{c['n']}x{c['f']}:{c['mode']}"
        if c.get("skipped"):
            rows.append([name, "skipped: " + c["skipped"][:90]] + [""] * (len(headers) - 2))
            continue
        conv, cpu, kinds = c["convergence"], c["cpu_pct"], c["nats_out_msgs_per_s_by_kind"]
        rows.append([name, c["frontends_ready_s"], c.get("frontend_join_s"),
                     f"{conv['add_p50_s']}/{conv['add_p99_s']}", conv["kill_out_of_routing_p99_s"],
                     conv["delete_propagation_p99_s"], c["etcd_total_per_s"], c["etcd_keepalives_per_s"],
                     c["nats"]["out_msgs"], kinds.get("load_reports", 0), kinds.get("kv_events", 0),
                     f"{cpu['frontend_mean']}/{cpu['frontend_max']}", cpu["router"], cpu["workers_total"],
                     cpu["measured_total"], cpu.get("machine_total"), (run["decision"].get(str(c["n"])) or {}).get("p99_us")])
    print(f"\n== {label} ==")
    print_table(headers, rows)


def plot(all_runs: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    panels = [("frontend CPU, % of a core (mean)", lambda c: c["cpu_pct"]["frontend_mean"]),
              ("NATS messages delivered /s", lambda c: c["nats"]["out_msgs"]),
              ("add → every frontend, p99 s", lambda c: c["convergence"]["add_p99_s"]),
              ("etcd gRPC messages /s", lambda c: c["etcd_total_per_s"])]
    styles = ["--", "-", ":", "-."]
    for ax, (title, value) in zip(axes.flat, panels):
        for li, (label, run) in enumerate(sorted(all_runs.items())):
            series: dict[tuple[int, str], list[tuple[int, float]]] = {}
            for c in run["cells"]:
                if not c.get("skipped"):
                    series.setdefault((c["f"], c["mode"]), []).append((c["n"], value(c)))
            for (f, mode), pts in sorted(series.items()):
                pts.sort()
                ax.plot([x for x, _ in pts], [y for _, y in pts], styles[li % 4], marker="o",
                        label=f"{label} F={f} {mode}")
        ax.set_title(title)
        ax.set_xlabel("simulated workers N")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    facts = machine_facts()
    fig.suptitle(f"dynrt control plane at scale — {facts['cpu_count']} cores, {facts['cpu_model']}, "
                 f"Python {facts['python']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", default=DEFAULT_GRID, help="cells NxF[:remote], comma-separated")
    parser.add_argument("--label", default="run", help="name of this run in scale.json (before, after, ...)")
    parser.add_argument("--instances-per-process", type=int, default=100, help="K of dynrt worker --instances K")
    parser.add_argument("--rate", type=float, default=10.0, help="requests per second, over all frontends")
    parser.add_argument("--window", type=float, default=6.0, help="seconds over which rates are measured")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds of load before the window")
    parser.add_argument("--reps", type=int, default=3, help="probe workers added and killed per cell")
    parser.add_argument("--start-timeout", type=float, default=45.0,
                        help="seconds F frontends have to list all N instances (else the cell is skipped)")
    parser.add_argument("--saturated", type=float, default=185.0,
                        help="measured CPU %% at which larger F at the same N is skipped")
    parser.add_argument("--decision-requests", type=int, default=2000)
    parser.add_argument("--no-decision", action="store_true", help="skip the router decision benchmark")
    parser.add_argument("--keep", action="store_true", help="keep the processes' logs")
    add_results_dir_argument(parser)
    args = parser.parse_args()
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so every process started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    t0 = time.monotonic()
    run_results = asyncio.run(run(args))
    run_results |= {"seconds": round(time.monotonic() - t0), "complete": True}
    runs = save(args, run_results)
    path = args.results_dir / "scale.json"
    for label, r in sorted(runs.items()):
        table(label, r)
    plot(runs, args.results_dir / "scale.png")
    print(f"\nresults: {path} and scale.png ({run_results['seconds']} s)")


if __name__ == "__main__":
    main()
