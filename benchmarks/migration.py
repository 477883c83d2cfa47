"""Migration under fire: long streams over 4 mock workers while a serving worker is
killed every few seconds (SIGKILL, then a run with SIGSTOP) and restarted.

Reports, per run: requests completed/failed, outputs identical to the uninterrupted
answer (computed by the mock engine in process), and the client-visible token gap of
every migrated stream (time between the last chunk before the failure and the first
after it), p50/p99/max, and per kill. JSON in ``benchmarks/results/migration.json``, a
plot of the gap per kill in ``migration.png`` (``--results-dir`` for elsewhere).

    python -m benchmarks.migration [--requests 200] [--concurrency 32] [--kill-every 3]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import add_results_dir_argument, options_of, print_table, pyplot, write_results
from harness.deployment import Deployment
from harness.load import Load, Stream
from harness.reference import matches, references
from harness.stats import percentile

STALL_SECONDS = 3.0  # how long a SIGSTOPped worker hangs before it is killed


class Chaos:
    """Every ``every`` seconds: pick a running worker, signal it, and replace it (SIGKILL:
    start a new one; SIGSTOP: after the stall, SIGCONT and SIGKILL it, then start a new
    one). The replacement registers in the background while the next interval runs."""

    def __init__(self, deployment: Deployment, sig: int, every: float) -> None:
        self.deployment = deployment
        self.sig = sig
        self.every = every
        self.kills: list[float] = []
        self.replacements: list[asyncio.Task[Any]] = []

    async def run(self, stop: asyncio.Event) -> None:
        rng = random.Random(1)
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.every)
                break
            except asyncio.TimeoutError:
                pass
            victim = rng.choice([w for w in self.deployment.workers if w.alive()])
            self.kills.append(time.monotonic())
            victim.send_signal(self.sig)
            if self.sig == signal.SIGSTOP:
                await asyncio.sleep(STALL_SECONDS)
                victim.send_signal(signal.SIGCONT)
                victim.send_signal(signal.SIGKILL)
            await victim.wait(60)
            self.replacements.append(asyncio.create_task(self.deployment.new_worker().start()))
        await asyncio.gather(*self.replacements)


def gaps_per_kill(streams: list[Stream], migrated: set[str], kills: list[float]) -> tuple[list[float], dict[int, list[float]]]:
    """The longest client-visible gap (ms) of every migrated stream, and the same gaps by
    the fault that preceded the gap's end (-1: before the first)."""
    gaps: list[float] = []
    per_kill: dict[int, list[float]] = {}
    for stream in streams:
        if stream.request_id not in migrated or not stream.chunk_times:
            continue
        start, end = stream.longest_gap()
        gap = (end - start) * 1000
        gaps.append(gap)
        kill = max((k for k, t in enumerate(kills) if t <= end), default=-1)
        per_kill.setdefault(kill, []).append(gap)
    return gaps, per_kill


async def run_once(sig: int, args: argparse.Namespace) -> dict[str, Any]:
    log_dir = Path(tempfile.mkdtemp(prefix="dynrt-migration-bench-"))
    quiet = ["--log-level", "warning"]
    async with Deployment(log_dir, workers=args.workers, speedup=1, worker_self_checks=True,
                          frontend_args=quiet,
                          worker_args=[*quiet, "--engine", "mock", "--drain-timeout", "1"]) as deployment:
        load = Load(deployment.urls, requests=args.requests, concurrency=args.concurrency,
                    max_tokens=args.max_tokens, tag="story", request_timeout=300)
        chaos = Chaos(deployment, sig, args.kill_every)
        stop = asyncio.Event()
        chaos_task = asyncio.create_task(chaos.run(stop))
        streams = await load.run()
        stop.set()
        await chaos_task
        # Which streams migrated, from the frontend's log (one line per migration).
        migrated = deployment.migrated_requests()
    refs = await references(streams)
    gaps, per_kill = gaps_per_kill(streams, set(migrated), chaos.kills)
    causes = [cause for moves in migrated.values() for cause, _ in moves]
    return {
        "signal": signal.Signals(sig).name,
        "requests": args.requests,
        "completed": sum(1 for s in streams if s.ok),
        "failed": sum(1 for s in streams if s.failed),
        "errors": sorted({s.error.split(":")[0] for s in streams if s.error}),
        "identical": sum(1 for s in streams if s.ok and matches(s, refs[s.index])),
        "faults": len(chaos.kills),
        "migrated_streams": len(gaps),
        "migration_causes": {c: causes.count(c) for c in sorted(set(causes))},
        "gap_ms_p50": percentile(gaps, 50),
        "gap_ms_p99": percentile(gaps, 99),
        "gap_ms_max": max(gaps, default=float("nan")),
        "gap_ms_per_kill": {str(k): {"streams": len(v), "p50": percentile(v, 50), "max": max(v)}
                            for k, v in sorted(per_kill.items())},
        "wall_seconds": load.ended_at - load.started_at,
        "logs": str(log_dir),
    }


def plot(runs: list[dict[str, Any]], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs):
        kills = sorted(run["gap_ms_per_kill"].items(), key=lambda kv: int(kv[0]))
        xs = [int(k) + 1 for k, _ in kills]
        ax.bar(xs, [v["max"] for _, v in kills], color="tab:red", alpha=0.5, label="max gap")
        ax.plot(xs, [v["p50"] for _, v in kills], "o-", label="median gap")
        ax.set_xlabel("fault #")
        ax.set_ylabel("client-visible token gap (ms)")
        ax.set_yscale("log")
        ax.set_title(f"{run['signal']}: {run['completed']}/{run['requests']} completed, "
                     f"{run['identical']} identical")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


async def main(args: argparse.Namespace) -> None:
    runs = [await run_once(sig, args) for sig in (signal.SIGKILL, signal.SIGSTOP)]
    print_table(["signal", "faults", "completed", "failed", "identical", "migrated", "gap p50 ms", "gap p99 ms", "gap max ms"],
                [[r["signal"], r["faults"], r["completed"], r["failed"], r["identical"], r["migrated_streams"],
                  r["gap_ms_p50"], r["gap_ms_p99"], r["gap_ms_max"]] for r in runs])
    path = write_results("migration", {"config": options_of(args), "runs": runs}, args.results_dir)
    print(f"wrote {path}")
    png = args.results_dir / "migration.png"
    if plot(runs, png):
        print(f"wrote {png}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=300)
    parser.add_argument("--kill-every", type=float, default=3.0)
    add_results_dir_argument(parser)
    asyncio.run(main(parser.parse_args()))
