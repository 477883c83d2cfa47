"""Chaos: one long run of streamed requests over a whole deployment while a scripted
schedule of faults hits every kind of component.

Deployment (real processes, all on 127.0.0.1): a 3-member etcd cluster, NATS, the
standalone router, 2 frontends (``--router-mode remote``) and 4 mock workers at speedup
1. Load: ``--requests`` (default 1500) streamed chat completions, ``--concurrency`` at a
time, alternately on each frontend, each with its own prompt, seed and ``max_tokens``
(``ignore_eos``), so its exact answer is known (the mock engine in process).

Fault schedule (each fault fires when that fraction of the requests has finished, so
the schedule spreads over the run whatever the machine's speed):

    worker SIGKILL / SIGSTOP / SIGTERM, three of each (the busiest worker each time;
    SIGKILLed and SIGTERMed workers are replaced, a SIGSTOPped one gets SIGCONT after
    3 s and carries on), the router SIGKILLed (a new one 2 s later), the etcd leader
    SIGKILLed (back 3 s later), NATS restarted (0.5 s down).

Reported: requests ok / failed split by which fault touched them (worker: the request
migrated off a faulted worker; router: sent while the router was down; etcd: in flight
while a member was down; NATS: in flight across the restart), outputs identical to the
reference, tokens lost, the client-visible token gap (p50/p99/max over migrated
streams, and p99 over every inter-chunk gap), leaked KV blocks on the workers after the
run. JSON in ``benchmarks/results/chaos.json``, the timeline (throughput, in-flight,
instances, faults) in ``chaos.png`` (``--results-dir`` for elsewhere).

    python -m benchmarks.chaos [--requests 1500] [--concurrency 24] [--max-seconds 600]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import add_results_dir_argument, options_of, print_table, pyplot, write_results
from harness.deployment import FAST_WORKER_ARGS, Deployment
from harness.load import Load, Stream
from harness.logs import MigrationEvent
from harness.metrics import metric
from harness.reference import matches, references, tokens_lost
from harness.stats import percentile
from harness.worker import WorkerProcess

# (fraction of requests finished, fault)
SCHEDULE: list[tuple[float, str]] = [
    (0.05, "worker:SIGKILL"),
    (0.11, "worker:SIGSTOP"),
    (0.17, "worker:SIGTERM"),
    (0.23, "router"),
    (0.30, "worker:SIGKILL"),
    (0.37, "etcd"),
    (0.44, "worker:SIGSTOP"),
    (0.51, "nats"),
    (0.58, "worker:SIGTERM"),
    (0.65, "worker:SIGKILL"),
    (0.72, "worker:SIGSTOP"),
    (0.79, "worker:SIGTERM"),
]
STOP_SECONDS = 3.0  # a SIGSTOPped worker hangs this long
ROUTER_DOWN = 2.0
ETCD_MEMBER_DOWN = 3.0
NATS_DOWN = 0.5
WORKERS = 4


@dataclass
class Fault:
    kind: str  # worker / router / etcd / nats
    action: str  # SIGKILL, SIGSTOP, SIGTERM, restart...
    target: str
    start: float  # monotonic
    end: float = math.nan  # monotonic: recovered (replacement registered, router back...)
    wall: float = field(default_factory=time.time)  # epoch seconds at start (to match log lines)
    instance_id: str = ""
    details: dict[str, Any] = field(default_factory=dict)


class Chaos:
    def __init__(self, d: Deployment, load: Load, schedule: list[tuple[float, str]]) -> None:
        self.d = d
        self.load = load
        self.schedule = schedule
        self.faults: list[Fault] = []
        self.stopped: set[str] = set()
        self.background: list[asyncio.Task[Any]] = []

    async def run(self) -> None:
        """Each fault fires at its point of the run, and not before the previous one is
        over (its worker replaced or resumed, the router back, the member rejoined):
        the promise is about *single* failures."""
        total = len(self.load.streams)
        for fraction, name in self.schedule:
            target = int(fraction * total)
            while len(self.load.finished()) < target or not await self.recovered():
                if self.load.task is not None and self.load.task.done():
                    return
                await asyncio.sleep(0.05)
            kind, _, action = name.partition(":")
            if kind == "worker":
                await self.worker_fault(getattr(signal, action))
            elif kind == "router":
                await self.router_fault()
            elif kind == "etcd":
                await self.etcd_fault()
            elif kind == "nats":
                await self.nats_fault()
        await asyncio.gather(*self.background)

    async def recovered(self) -> bool:
        if any(math.isnan(f.end) or f.end > time.monotonic() for f in self.faults):
            return False
        # Every frontend routes to the full pool again.
        counts = [await self.d.frontend_instances(fe) for fe in self.d.frontends]
        return counts == [WORKERS] * len(counts)

    async def _victim(self) -> WorkerProcess:
        candidates = [w for w in self.d.live_workers() if w.name not in self.stopped]
        counts = await self.d.in_flight()
        return max(candidates, key=lambda w: counts.get(w.name, -1))

    async def worker_fault(self, sig: int) -> None:
        victim = await self._victim()
        fault = Fault("worker", signal.Signals(sig).name, victim.name, time.monotonic(),
                      instance_id=victim.record.instance_id)
        fault.details["in_flight"] = (await self.d.in_flight()).get(victim.name, 0)
        self.faults.append(fault)
        self.d.send(victim, sig)
        print(f"  t={fault.start - self.load.started_at:6.1f}s worker {fault.action} {victim.name} "
              f"({fault.details['in_flight']} in flight)", flush=True)
        if sig == signal.SIGSTOP:
            self.stopped.add(victim.name)
            self.background.append(asyncio.create_task(self._resume(victim, fault)))
        else:
            self.background.append(asyncio.create_task(self._replace(victim, fault)))

    async def _resume(self, victim: WorkerProcess, fault: Fault) -> None:
        await asyncio.sleep(STOP_SECONDS)
        self.d.send(victim, signal.SIGCONT)
        self.stopped.discard(victim.name)
        fault.end = time.monotonic()

    async def _replace(self, victim: WorkerProcess, fault: Fault) -> None:
        code = await victim.wait(30)
        fault.details["exit_code"] = code
        replacement = await self.d.add_worker()
        fault.details["replacement"] = replacement.name
        fault.end = time.monotonic()

    async def router_fault(self) -> None:
        router = self.d.router
        assert router is not None
        fault = Fault("router", "SIGKILL", router.name, time.monotonic())
        self.faults.append(fault)
        self.d.send(router, signal.SIGKILL)
        print(f"  t={fault.start - self.load.started_at:6.1f}s router SIGKILL", flush=True)
        await router.wait(10)
        await asyncio.sleep(ROUTER_DOWN)
        await self.d.start_router()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            ups = [metric(await self.d.frontend_metrics(fe), "dynrt_frontend_router_remote_up")
                   for fe in self.d.frontends]
            if ups == [1.0] * len(ups):
                break
            await asyncio.sleep(0.1)
        fault.end = time.monotonic()
        fault.details["back_to_remote_s"] = round(fault.end - fault.start, 3)

    async def etcd_fault(self) -> None:
        leader = await self.d.etcd.leader()
        fault = Fault("etcd", "SIGKILL leader", leader.name, time.monotonic())
        self.faults.append(fault)
        await self.d.kill_etcd_member(leader)
        print(f"  t={fault.start - self.load.started_at:6.1f}s etcd leader {leader.name} SIGKILL", flush=True)
        await asyncio.sleep(ETCD_MEMBER_DOWN)
        await self.d.restart_etcd_member(leader)
        fault.end = time.monotonic()
        fault.details["new_leader"] = (await self.d.etcd.leader()).name

    async def nats_fault(self) -> None:
        fault = Fault("nats", "restart", "nats", time.monotonic())
        self.faults.append(fault)
        print(f"  t={fault.start - self.load.started_at:6.1f}s NATS restart", flush=True)
        fault.details["down_s"] = round(await self.d.restart_nats(down=NATS_DOWN), 3)
        fault.end = time.monotonic() + 1.0  # reconnects settle


class Monitor:
    """Samples the instances every frontend routes to, every 0.25 s."""

    def __init__(self, d: Deployment) -> None:
        self.d = d
        self.samples: list[tuple[float, list[int | None]]] = []

    async def run(self) -> None:
        while True:
            counts = [await self.d.frontend_instances(fe) for fe in self.d.frontends]
            self.samples.append((time.monotonic(), counts))
            await asyncio.sleep(0.25)


def attribute(streams: list[Stream], faults: list[Fault], events: list[MigrationEvent]) -> dict[int, set[str]]:
    """Which kinds of fault touched each request (index -> {"worker", "router", ...}).

    worker: the request migrated off a faulted worker while that fault lasted (from the
    frontends' ``migrating`` log lines: instance and time); nats: it migrated because the
    NATS connection dropped, or was in flight across the restart; router: it was sent
    while the router was down (bypass); etcd: it was in flight while a member was down;
    other: it migrated for none of these (a live worker starved of CPU past the stall
    timeout, say)."""
    by_request: dict[str, list[MigrationEvent]] = {}
    for e in events:
        by_request.setdefault(e.request_id, []).append(e)
    worker_faults = [f for f in faults if f.kind == "worker"]

    def worker_fault_of(e: MigrationEvent) -> Fault | None:
        for f in worker_faults:
            end = f.end if not math.isnan(f.end) else f.start + 10.0
            if e.from_instance == f.instance_id and f.wall - 1.0 <= e.ts <= f.wall + (end - f.start) + 5.0:
                return f
        return None

    touched: dict[int, set[str]] = {}
    for s in streams:
        kinds: set[str] = set()
        for e in by_request.get(s.request_id, []):
            if e.cause == "nats_restart":
                kinds.add("nats")
            elif worker_fault_of(e) is not None:
                kinds.add("worker")
            else:
                kinds.add("other")
        for f in faults:
            end = f.end if not math.isnan(f.end) else f.start + 5.0
            if f.kind == "router" and f.start <= s.sent_at <= end:
                kinds.add("router")  # routed while the router was down (bypass)
            elif f.kind in ("etcd", "nats") and s.overlaps(f.start, end):
                kinds.add(f.kind)
        # A failure with no migration trace: blame the worker faults it overlapped.
        if s.failed and not kinds and any(s.overlaps(f.start, f.start + 2.0) for f in worker_faults):
            kinds.add("worker")
        touched[s.index] = kinds
    return touched


def plot(result: dict[str, Any], streams: list[Stream], faults: list[Fault], monitor: Monitor, t0: float,
         path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    end = max((s.ended_at for s in streams if not math.isnan(s.ended_at)), default=t0) - t0
    step = 1.0
    bins = max(1, int(math.ceil(end / step)))
    chunks = [0] * bins
    done = [0] * bins
    for s in streams:
        for t in s.chunk_times:
            chunks[min(bins - 1, int((t - t0) / step))] += 1
        if s.ok:
            done[min(bins - 1, int((s.ended_at - t0) / step))] += 1
    xs = [i * step for i in range(bins)]
    in_flight = [sum(1 for s in streams if s.in_flight_at(t0 + x)) for x in xs]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(15, 8), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    ax1.plot(xs, [c / step for c in chunks], color="tab:blue", label="content chunks/s (all streams)")
    ax1b = ax1.twinx()
    ax1b.plot(xs, [c / step for c in done], color="tab:green", alpha=0.7, label="requests completed/s")
    ax1b.set_ylabel("requests/s")
    failed = [s for s in streams if s.failed]
    if failed:
        ax1b.scatter([s.ended_at - t0 for s in failed], [0.5] * len(failed), color="red", marker="x", zorder=5,
                     label=f"failed requests ({len(failed)})")
    colors = {"worker": "tab:red", "router": "tab:purple", "etcd": "tab:orange", "nats": "tab:brown"}
    for f in faults:
        for ax in (ax1, ax2):
            ax.axvline(f.start - t0, color=colors[f.kind], linestyle="--", alpha=0.8)
        end = (f.end if not math.isnan(f.end) else f.start) - t0
        ax2.axvspan(f.start - t0, max(end, f.start - t0 + 0.1), color=colors[f.kind], alpha=0.15)
        ax1.text(f.start - t0, ax1.get_ylim()[1] * 0.98 if ax1.get_ylim()[1] else 1,
                 f"{f.kind}\n{f.action.replace('SIG', '')}", fontsize=7, rotation=90, va="top", ha="right",
                 color=colors[f.kind])
    ax1.set_ylabel("chunks/s")
    ax1.set_title(f"chaos: {result['requests']} requests, {result['ok']} ok, {result['failed']} failed, "
                  f"{result['identical']} identical; {len(faults)} faults")
    lines = ax1.get_legend_handles_labels()
    lines2 = ax1b.get_legend_handles_labels()
    ax1.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="lower left", fontsize=8)
    ax2.plot(xs, in_flight, color="tab:gray", label="requests in flight")
    if monitor.samples:
        for i in range(len(monitor.samples[0][1])):
            ax2.step([t - t0 for t, _ in monitor.samples], [c[i] if c[i] is not None else float("nan")
                                                           for _, c in monitor.samples],
                     where="post", label=f"instances seen by frontend {i + 1}")
    ax2.set_xlabel("seconds since start")
    ax2.set_ylabel("count")
    ax2.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


async def main(args: argparse.Namespace) -> int:
    log_dir = Path(tempfile.mkdtemp(prefix="dynrt-chaos-"))
    print(f"logs in {log_dir}", flush=True)
    rng = random.Random(args.seed)
    max_tokens = [rng.randint(args.min_tokens, args.max_tokens) for _ in range(args.requests)]
    async with Deployment(log_dir, workers=WORKERS, frontends=2, etcd_members=3, router=True,
                          worker_args=[*FAST_WORKER_ARGS, "--lease-ttl", "3", "--drain-timeout", "0.5"]) as d:
        print(f"deployment up: {len(d.workers)} workers, {len(d.frontends)} frontends, router, "
              f"{len(d.etcd.members)} etcd members, NATS", flush=True)
        load = Load(d.urls, requests=args.requests, concurrency=args.concurrency, max_tokens=max_tokens,
                    tag="chaos", request_timeout=120)
        monitor = Monitor(d)
        monitor_task = asyncio.create_task(monitor.run())
        load_task = load.start()
        chaos = Chaos(d, load, SCHEDULE)
        chaos_task = asyncio.create_task(chaos.run())
        deadline = time.monotonic() + args.max_seconds
        while not load_task.done():
            if time.monotonic() > deadline:
                print(f"--max-seconds {args.max_seconds} reached: no more requests", flush=True)
                load.stop_issuing()
                break
            await asyncio.sleep(0.2)
        streams = await load_task
        await chaos_task
        wall = load.ended_at - load.started_at
        for w in d.workers:  # nothing stays stopped
            if w.alive():
                d.send(w, signal.SIGCONT)
        leaked = await d.leaked_blocks(settle=10.0)
        kv_state = await d.kv_state()
        monitor_task.cancel()
        migrations = await d.migrations()
        migrated = d.migrated_requests()
        migration_events = d.migration_events()
        bypassed = await d.metric_sum("dynrt_frontend_router_bypass_total")
        exhausted = await d.metric_sum("dynrt_frontend_migrations_exhausted_total")
        t0 = load.started_at
        faults = chaos.faults

    refs = await references(streams)
    touched = attribute(streams, faults, migration_events)
    identical = {s.index for s in streams if s.ok and matches(s, refs[s.index])}
    lost = tokens_lost([s for s in streams if s.ok], refs)
    undelivered = sum(refs[s.index].completion_tokens for s in streams if s.failed)
    migrated_streams = [s for s in streams if s.request_id in migrated]
    gaps = [s.max_gap * 1000 for s in migrated_streams if s.ok]
    all_gaps = [(b - a) * 1000 for s in streams if s.ok for a, b in zip(s.chunk_times, s.chunk_times[1:])]

    def split(kind: str | None) -> dict[str, int]:
        if kind is None:
            group = [s for s in streams if not touched[s.index]]
        elif kind == "any":
            group = list(streams)
        else:
            group = [s for s in streams if kind in touched[s.index]]
        return {"requests": len(group), "ok": sum(1 for s in group if s.ok),
                "failed": sum(1 for s in group if s.failed),
                "identical": sum(1 for s in group if s.index in identical)}

    by_fault = {k: split(k) for k in ("worker", "router", "etcd", "nats", "other")}
    by_fault["untouched"] = split(None)
    by_fault["total"] = split("any")
    only_wre = [s for s in streams if touched[s.index] and touched[s.index] <= {"worker", "router", "etcd"}]
    result: dict[str, Any] = {
        "requests": len(streams),
        "ok": sum(1 for s in streams if s.ok),
        "failed": sum(1 for s in streams if s.failed),
        "identical": len(identical),
        "failed_touched_only_by_worker_router_etcd": sum(1 for s in only_wre if s.failed),
        "tokens_lost": lost,
        "tokens_undelivered_by_failed_requests": undelivered,
        "leaked_blocks": leaked,
        "kv_after": kv_state,
        "migrated_streams": len(migrated_streams),
        "migrations_by_cause": migrations,
        "migrations_exhausted": exhausted,
        "router_bypassed_requests": bypassed,
        "gap_ms_migrated_p50": percentile(gaps, 50),
        "gap_ms_migrated_p99": percentile(gaps, 99),
        "gap_ms_migrated_max": max(gaps, default=math.nan),
        "itl_ms_all_p99": percentile(all_gaps, 99),
        "wall_seconds": round(wall, 2),
        "output_tokens": sum((s.usage or {}).get("completion_tokens", 0) for s in streams if s.ok),
        "by_fault": by_fault,
        "errors": sorted({s.error[:160] for s in streams if s.failed})[:20],
        "faults": [{**{k: v for k, v in asdict(f).items() if k not in ("start", "end")},
                    "at_s": round(f.start - t0, 3),
                    "recovered_after_s": None if math.isnan(f.end) else round(f.end - f.start, 3),
                    "migrated_off": sum(1 for e in migration_events
                                        if f.instance_id and e.from_instance == f.instance_id
                                        and f.wall - 1 <= e.ts <= f.wall + (f.end - f.start) + 5)}
                   for f in faults],
        "logs": str(log_dir),
    }
    print()
    print(f"{result['requests']} requests in {wall:.1f}s over 2 frontends / 4 workers; "
          f"{len(faults)} faults: " + ", ".join(f"{f.kind} {f.action}" for f in faults))
    print_table(["touched by", "requests", "ok", "failed", "identical"],
                [[k, v["requests"], v["ok"], v["failed"], v["identical"]] for k, v in by_fault.items()])
    print()
    print_table(["tokens lost", "leaked blocks", "migrated", "gap p50 ms", "gap p99 ms", "gap max ms",
                 "ITL p99 ms (all)", "bypassed"],
                [[lost, leaked, len(migrated_streams), result["gap_ms_migrated_p50"],
                  result["gap_ms_migrated_p99"], result["gap_ms_migrated_max"], result["itl_ms_all_p99"],
                  int(bypassed)]])
    print(f"migrations by cause: {migrations}")
    config = options_of(args)
    config["schedule"] = SCHEDULE
    path = write_results(args.name, {"config": config, "result": result}, args.results_dir)
    print(f"wrote {path}")
    png = args.results_dir / f"{args.name}.png"
    if plot(result, streams, faults, monitor, t0, png):
        print(f"wrote {png}")
    ok = (result["failed_touched_only_by_worker_router_etcd"] == 0 and lost == 0
          and result["identical"] == result["ok"] and leaked == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--min-tokens", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=240)
    parser.add_argument("--max-seconds", type=float, default=600, help="stop sending new requests after this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="chaos", help="results file name (RESULTS_DIR/NAME.json/.png)")
    add_results_dir_argument(parser)
    raise SystemExit(asyncio.run(main(parser.parse_args())))
