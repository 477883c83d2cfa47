"""Migration under fire: long streams over 4 mock workers while a serving worker is
killed every few seconds (SIGKILL, then a run with SIGSTOP) and restarted.

Runs (``--runs``, all by default):
- ``kill``: a worker SIGKILLed every ``--kill-every`` seconds.
- ``stop``: a worker SIGSTOPped every ``--kill-every`` seconds (after 3 s, SIGCONT and
  SIGKILL). Found from its missed load reports (``--suspect-after``), not the stall
  timeout.
- ``mixed``: every cycle, SIGKILL one worker, 1.5 s later SIGSTOP another, 1.5 s later
  SIGKILL a third: streams moved off the killed ones must not land on the stopped one and
  wait out ``--stream-stall-timeout`` (2 s) a second time. Counted per stream: gaps as
  long as the stall timeout (``stall_waits``).
- ``heavy``: no faults; ``--heavy-concurrency`` streams with ``--heavy-prompt-words``-word
  prompts on ``--heavy-workers`` workers: a busy worker must never be taken for a hung one
  (0 migrations, 0 ``instance_suspect`` events).

Reports, per run: requests completed/failed, outputs identical to the uninterrupted
answer (computed by the mock engine in process), and the client-visible token gap of
every migrated stream (time between the last chunk before the failure and the first
after it), p50/p99/max, and per fault. JSON in ``benchmarks/results/migration.json``
(with the machine: ``--machine``, CPU, platform), a plot of the gap per fault in
``migration.png`` (``--results-dir`` for elsewhere).

    python -m benchmarks.migration [--requests 200] [--concurrency 32] [--kill-every 3] [--runs kill,stop]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import socket
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import add_results_dir_argument, options_of, print_table, pyplot, write_results
from harness.deployment import Deployment
from harness.load import Load, Stream
from harness.reference import matches, references
from harness.stats import percentile

STALL_SECONDS = 3.0  # how long a SIGSTOPped worker hangs before it is killed
MIXED_STEP_SECONDS = 1.5  # mixed run: SIGKILL, +1.5 s SIGSTOP, +1.5 s SIGKILL
STALL_TIMEOUT = 2.0  # the frontend's --stream-stall-timeout (its default)

# A fault: (seconds after the previous one, signal).
Plan = Sequence[tuple[float, int]]


class Chaos:
    """Faults by ``plan``, repeated until stopped: pick a running worker not already
    hit, signal it, and replace it (SIGKILL: start a new one; SIGSTOP: after the stall,
    SIGCONT and SIGKILL it, then start a new one). The replacement registers in the
    background while the next interval runs. A plan of one fault waits for its victim's
    end before the next interval (the original single-signal runs); a longer plan
    overlaps its faults."""

    def __init__(self, deployment: Deployment, plan: Plan) -> None:
        self.deployment = deployment
        self.plan = list(plan)
        self.kills: list[float] = []
        self.signals: list[str] = []
        self.replacements: list[asyncio.Task[Any]] = []
        self._hit: set[int] = set()  # id() of workers already signalled
        self._faults: list[asyncio.Task[None]] = []

    async def run(self, stop: asyncio.Event) -> None:
        rng = random.Random(1)
        overlap = len(self.plan) > 1
        while not stop.is_set():
            for delay, sig in self.plan:
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                    break
                except asyncio.TimeoutError:
                    pass
                running = [w for w in self.deployment.workers if w.alive() and id(w) not in self._hit]
                if not running:
                    continue
                victim = rng.choice(running)
                self._hit.add(id(victim))
                self.kills.append(time.monotonic())
                self.signals.append(signal.Signals(sig).name)
                victim.send_signal(sig)
                fault = self._finish(victim, sig)
                if overlap:
                    self._faults.append(asyncio.create_task(fault))
                else:
                    await fault
            else:
                continue
            break
        await asyncio.gather(*self._faults)
        await asyncio.gather(*self.replacements)

    async def _finish(self, victim: Any, sig: int) -> None:
        if sig == signal.SIGSTOP:
            await asyncio.sleep(STALL_SECONDS)
            victim.send_signal(signal.SIGCONT)
            victim.send_signal(signal.SIGKILL)
        await victim.wait(60)
        self.replacements.append(asyncio.create_task(self.deployment.new_worker().start()))


def stall_waits(stream: Stream) -> int:
    """Client-visible gaps of the stream at least as long as the stall timeout (90% of
    it: the timeout is measured from the last frame, the gap from the last chunk)."""
    times = [stream.sent_at, *stream.chunk_times]
    return sum(1 for a, b in zip(times, times[1:]) if b - a >= 0.9 * STALL_TIMEOUT)


def gaps_per_kill(streams: list[Stream], migrated: set[str], kills: list[float],
                  after_fault: list[float] | None = None) -> tuple[list[float], dict[int, list[float]]]:
    """The longest client-visible gap (ms) of every migrated stream, and the same gaps by
    the fault that preceded the gap's end (-1: before the first). ``after_fault`` gets,
    per gap that spans a fault, the part after the signal (ms): detection, re-routing and
    the new worker's prefill, without the time the last token happened to precede it."""
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
        if after_fault is not None and kill >= 0 and kills[kill] >= start:
            after_fault.append((end - kills[kill]) * 1000)
    return gaps, per_kill


def frontend_args(args: argparse.Namespace) -> list[str]:
    out = ["--log-level", "warning", "--stream-stall-timeout", str(STALL_TIMEOUT)]
    if args.suspect_after is not None:
        out += ["--suspect-after", str(args.suspect_after)]
    return out


async def run_once(name: str, args: argparse.Namespace) -> dict[str, Any]:
    if name == "heavy":
        return await run_heavy(args)
    plan: Plan = {"kill": [(args.kill_every, signal.SIGKILL)],
                  "stop": [(args.kill_every, signal.SIGSTOP)],
                  "mixed": [(args.kill_every, signal.SIGKILL), (MIXED_STEP_SECONDS, signal.SIGSTOP),
                            (MIXED_STEP_SECONDS, signal.SIGKILL)]}[name]
    log_dir = Path(tempfile.mkdtemp(prefix="dynrt-migration-bench-"))
    quiet = ["--log-level", "warning"]
    async with Deployment(log_dir, workers=args.workers, speedup=1, worker_self_checks=True,
                          frontend_args=frontend_args(args),
                          worker_args=[*quiet, "--engine", "mock", "--drain-timeout", "1"]) as deployment:
        load = Load(deployment.urls, requests=args.requests, concurrency=args.concurrency,
                    max_tokens=args.max_tokens, tag="story", request_timeout=300)
        chaos = Chaos(deployment, plan)
        stop = asyncio.Event()
        chaos_task = asyncio.create_task(chaos.run(stop))
        streams = await load.run()
        stop.set()
        await chaos_task
        # Which streams migrated, from the frontend's log (one line per migration).
        migrated = deployment.migrated_requests()
        suspect_events = deployment.frontends[0].log_text().count("instance_suspect")
    refs = await references(streams)
    after_fault: list[float] = []
    gaps, per_kill = gaps_per_kill(streams, set(migrated), chaos.kills, after_fault)
    causes = [cause for moves in migrated.values() for cause, _ in moves]
    waits = [stall_waits(s) for s in streams]
    return {
        "run": name,
        "signal": "+".join(signal.Signals(sig).name for _, sig in plan),
        "faults_sent": chaos.signals,
        "requests": args.requests,
        "completed": sum(1 for s in streams if s.ok),
        "failed": sum(1 for s in streams if s.failed),
        "errors": sorted({s.error.split(":")[0] for s in streams if s.error}),
        "identical": sum(1 for s in streams if s.ok and matches(s, refs[s.index])),
        "faults": len(chaos.kills),
        "migrated_streams": len(gaps),
        "migration_causes": {c: causes.count(c) for c in sorted(set(causes))},
        "suspect_events": suspect_events,
        "streams_waiting_stall_timeout_once": sum(1 for w in waits if w == 1),
        "streams_waiting_stall_timeout_twice_or_more": sum(1 for w in waits if w >= 2),
        "gap_ms_p50": percentile(gaps, 50),
        "gap_ms_p99": percentile(gaps, 99),
        "gap_ms_max": max(gaps, default=float("nan")),
        "after_fault_ms_p50": percentile(after_fault, 50),
        "after_fault_ms_p99": percentile(after_fault, 99),
        "gap_ms_per_kill": {str(k): {"streams": len(v), "p50": percentile(v, 50), "max": max(v)}
                            for k, v in sorted(per_kill.items())},
        "wall_seconds": load.ended_at - load.started_at,
        "logs": str(log_dir),
    }


async def run_heavy(args: argparse.Namespace) -> dict[str, Any]:
    """No faults, heavy load: nothing may migrate, no worker may become suspect."""
    log_dir = Path(tempfile.mkdtemp(prefix="dynrt-migration-heavy-"))
    quiet = ["--log-level", "warning"]
    async with Deployment(log_dir, workers=args.heavy_workers, speedup=1, worker_self_checks=True,
                          frontend_args=frontend_args(args),
                          worker_args=[*quiet, "--engine", "mock"]) as deployment:
        load = Load(deployment.urls, requests=args.heavy_requests, concurrency=args.heavy_concurrency,
                    max_tokens=args.heavy_max_tokens, tag="heavy", prompt_words=args.heavy_prompt_words,
                    request_timeout=300)
        streams = await load.run()
        migrated = deployment.migrated_requests()
        suspect_events = deployment.frontends[0].log_text().count("instance_suspect")
    refs = await references(streams)
    causes = [cause for moves in migrated.values() for cause, _ in moves]
    max_gaps = [s.max_gap * 1000 for s in streams if s.ok]
    return {
        "run": "heavy",
        "signal": "none",
        "workers": args.heavy_workers,
        "concurrency": args.heavy_concurrency,
        "prompt_words": args.heavy_prompt_words,
        "requests": args.heavy_requests,
        "completed": sum(1 for s in streams if s.ok),
        "failed": sum(1 for s in streams if s.failed),
        "errors": sorted({s.error.split(":")[0] for s in streams if s.error}),
        "identical": sum(1 for s in streams if s.ok and matches(s, refs[s.index])),
        "faults": 0,
        "migrated_streams": len(migrated),
        "migration_causes": {c: causes.count(c) for c in sorted(set(causes))},
        "suspect_events": suspect_events,
        "stream_max_gap_ms_p50": percentile(max_gaps, 50),
        "stream_max_gap_ms_p99": percentile(max_gaps, 99),
        "gap_ms_p50": float("nan"),
        "gap_ms_p99": float("nan"),
        "gap_ms_max": float("nan"),
        "gap_ms_per_kill": {},
        "wall_seconds": load.ended_at - load.started_at,
        "logs": str(log_dir),
    }


def plot(runs: list[dict[str, Any]], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    runs = [r for r in runs if r["gap_ms_per_kill"]]
    if not runs:
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


RUNS = ("kill", "stop", "mixed", "heavy")


async def main(args: argparse.Namespace) -> None:
    runs = [await run_once(name, args) for name in args.runs.split(",")]
    print_table(["run", "faults", "completed", "failed", "identical", "migrated", "causes", "suspect events",
                 "stall waits x1/x2+", "gap p50 ms", "gap p99 ms", "gap max ms", "after fault p50/p99 ms"],
                [[r["run"], r["faults"], r["completed"], r["failed"], r["identical"], r["migrated_streams"],
                  ",".join(f"{k}={v}" for k, v in r["migration_causes"].items()) or "-", r["suspect_events"],
                  f"{r.get('streams_waiting_stall_timeout_once', 0)}/"
                  f"{r.get('streams_waiting_stall_timeout_twice_or_more', 0)}",
                  r["gap_ms_p50"], r["gap_ms_p99"], r["gap_ms_max"],
                  f"{r.get('after_fault_ms_p50', float('nan')):.0f}/{r.get('after_fault_ms_p99', float('nan')):.0f}"]
                 for r in runs])
    path = write_results(args.results_name, {"config": options_of(args), "runs": runs}, args.results_dir)
    print(f"wrote {path}")
    png = args.results_dir / f"{args.results_name}.png"
    if plot(runs, png):
        print(f"wrote {png}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=300)
    parser.add_argument("--kill-every", type=float, default=3.0)
    parser.add_argument("--runs", default="kill,stop,mixed,heavy",
                        help=f"comma-separated runs, in order, from {', '.join(RUNS)}")
    parser.add_argument("--suspect-after", type=float, default=None,
                        help="the frontend's --suspect-after (default: the frontend's own)")
    parser.add_argument("--heavy-workers", type=int, default=2)
    parser.add_argument("--heavy-concurrency", type=int, default=64)
    parser.add_argument("--heavy-requests", type=int, default=192)
    parser.add_argument("--heavy-max-tokens", type=int, default=100)
    parser.add_argument("--heavy-prompt-words", type=int, default=600)
    parser.add_argument("--machine", default=socket.gethostname(), help="name of this machine in the results")
    parser.add_argument("--results-name", default="migration", help="results file name (NAME.json, NAME.png)")
    add_results_dir_argument(parser)
    parsed = parser.parse_args()
    unknown = set(parsed.runs.split(",")) - set(RUNS)
    if unknown:
        parser.error(f"unknown runs {sorted(unknown)}; choose from {', '.join(RUNS)}")
    asyncio.run(main(parsed))
