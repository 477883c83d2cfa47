"""Admission by TTFT objective vs static shedding thresholds (issue 17 part 2), end to end;
``python -m benchmarks.routing --slo`` runs it (part 4 of ``benchmarks.routing``).

One pool (``harness.deployment``): 2 mock workers at speedup 1 with ``--num-blocks 1024
--max-num-seqs 8``, one frontend (``--router-mode kv``, KV rule 0.95 throughout). Every
request is a streamed ``/v1/completions`` of ``--slo-prompt-tokens`` random token ids
(800 ≈ a 600-word prompt; distinct prompts, so no cache hits) asking for
``--slo-output-tokens`` (120) tokens, ``ignore_eos``.

1. **unloaded**: one request at a time (4 output tokens) → unloaded TTFT p50; the objective is
   ``--slo-factor`` (3) × that, rounded to 10 ms, unless ``--ttft-slo`` gives one.
2. **capacity**: a closed loop keeping every slot busy with a queue behind (no shedding
   beyond KV): completed requests/s.
3. For every setting — the objective (``ttft_slo``, queue and prefill rules off) and the
   static sweep (queue rule 0 / 2 / off × prefill rule 0 / 2000 / off tokens), switched
   through ``POST /busy_threshold`` — three phases, each with the same requests for
   every setting:

   * **burst**: ``--slo-burst`` (96) requests at once on an idle pool (16 free slots);
   * **poisson 1.5×** and **3×**: Poisson arrivals at that multiple of capacity for
     ``--slo-phase-seconds``.

   Per phase and setting: admitted, rejected (503 + Retry-After), accepted TTFT p50/p99,
   and *goodput*: requests whose TTFT met the objective, per second of the arrival
   window (the burst: their count). The static setting with both rules off admits
   everything; offered 1.5–3× capacity its queue only grows, so it runs the burst only.

Targets (issue 17): goodput ≥ the best static setting's in every phase; accepted TTFT
p99 ≤ the objective; the burst admits what the objective allows, not 2.

Results (2-core VM, AMD EPYC, quiet: load average 0.4 before and after; 262 s;
``python -m benchmarks.routing --slo --ttft-slo 0.3``, ``results/routing-slo.json``):
unloaded TTFT p50 33.4 ms, capacity 4.91 req/s, objective 300 ms.

* burst of 96: ``ttft_slo`` admits 16 (every free slot), all within the objective
  (p99 246 ms) — goodput 16, equal to the best static setting (``queue 0 / prefill
  off``); the README's earlier recommendation ``queue 0 / prefill 0`` admits 2.
* Poisson 1.5× (7.38/s offered): goodput 5.50/s, p99 106 ms; best static 5.50/s
  (``queue 0 / prefill off``). Poisson 3× (14.75/s): 6.00/s, p99 93 ms; best static
  6.00/s (``queue 0 / prefill 2000``; ``queue 0 / prefill off`` too). Settings with a
  queue (``queue 2``, ``queue off``) reach p99 0.6–1.9 s and 2.4–5.3/s.
* Every target met. The best static setting differs by phase, and none beats the
  objective: at 300 ms with 8 slots the rule behaves like ``queue 0`` (a wait for a slot,
  ~0.5 s, never fits) with a prefill bound that binds only in a burst.
* Why 300 ms and not 3× the unloaded TTFT (100 ms, ``results/routing-slo-100ms.json``,
  same code but the earlier free-running arrival draw, 2.3× capacity offered in its
  "3×" phase): no setting could meet 100 ms in the burst — the burst itself costs the
  frontend and the load generator ~50–90 ms of this machine's 2 cores (``queue 0 /
  prefill 0``'s two admitted: TTFT 103–112 ms for ~29 ms of engine time), which the
  projection does not see; ``ttft_slo`` admitted 11 with p99 236 ms (goodput 0, best
  static 2). In the Poisson phases it met everything at 100 ms too: goodput 5.13 and
  5.63/s = the best static, p99 82 and 91 ms. 300 ms is 3× the issue's unloaded TTFT
  (98 ms, with 600-word text prompts).
* The workers' fitted step model before the phases (idle: prefill alone): 16.6–17.4 ms
  fixed + 59–68k tokens/s, the mock's fit being 16.5 ms + 65.8k tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.common import options_of, print_table, pyplot, write_results
from benchmarks.routing import TIMEOUT, Result, _tokens, completion_body, stream_request
from dynrt.runtime.protocol import LoadReport, load_report_decoder, load_subject_wildcard
from dynrt.runtime.transport import NatsTransport
from harness.deployment import Deployment
from harness.stats import percentile

WORKER_ARGS = ["--num-blocks", "1024", "--max-num-seqs", "8", "--block-size", "16"]
MAX_NUM_SEQS = 8
STATIC_QUEUE = (0, 2, None)
STATIC_PREFILL = (0, 2000, None)
PHASES = ("burst", "poisson 1.5x", "poisson 3x")


def static_settings() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for q in STATIC_QUEUE:
        for p in STATIC_PREFILL:
            name = f"queue {'off' if q is None else q} / prefill {'off' if p is None else p}"
            out.append((name, {"queue_depth": q, "prefill_tokens": p, "ttft_slo": None}))
    return out


class ReportWatch:
    """The workers' latest load reports, as routers see them (NATS)."""

    def __init__(self) -> None:
        self.latest: dict[str, LoadReport] = {}

    async def on_load(self, msg: Any) -> None:
        report = load_report_decoder.decode(msg.data)
        self.latest[report.instance_id] = report

    def prefill_figures(self) -> dict[str, dict[str, float]]:
        """Each worker's reported step model now (``dynrt.worker.prefill_rate``)."""
        return {iid[:8]: {"prefill_tokens_per_s": round(r.prefill_tokens_per_s),
                          "prefill_base_ms": round(r.prefill_base_seconds * 1000, 1),
                          "step_ms": round(r.step_seconds * 1000, 1)} for iid, r in sorted(self.latest.items())}


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def _ms(values: list[float], p: float) -> float | None:
    return round(percentile(values, p) * 1000, 1) if values else None


def summarize(results: list[Result], objective: float, window: float | None, wall: float) -> dict[str, Any]:
    ok = [r for r in results if r.status == 200]
    ttfts = [r.ttft for r in ok]
    good = sum(1 for t in ttfts if t <= objective)
    return {
        "requests": len(results),
        "admitted": len(ok),
        "rejected_503": sum(1 for r in results if r.status == 503),
        "failed_other": sum(1 for r in results if r.status not in (200, 503)),
        "ttft_p50_ms": _ms(ttfts, 50),
        "ttft_p99_ms": _ms(ttfts, 99),
        "ttft_max_ms": _ms(ttfts, 100),
        "good": good,
        # Poisson: per second of the arrival window; the burst: the count itself.
        "goodput": round(good / window, 3) if window else good,
        "wall_s": round(wall, 2),
    }


async def closed_loop_bodies(url: str, bodies: list[bytes], concurrency: int,
                             seconds: float) -> tuple[list[Result], float]:
    """``concurrency`` clients sending ``bodies`` in turn, one after another, for ``seconds``."""
    results: list[Result] = []
    stop_at = time.monotonic() + seconds
    queue = iter(bodies)

    async def loop(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < stop_at:
            r = await stream_request(session, url, next(queue))
            results.append(r)
            if r.status != 200:
                await asyncio.sleep(0.05)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=TIMEOUT) as session:
        started = time.monotonic()
        await asyncio.gather(*(loop(session) for _ in range(concurrency)))
        return results, time.monotonic() - started


async def run_bodies(url: str | Sequence[str], bodies: list[bytes],
                     offsets: list[float]) -> tuple[list[Result], float]:
    """Send ``bodies`` at ``offsets`` seconds from now (several frontends' URLs: each in
    turn); wait for every answer. Results in the order of ``bodies``."""
    urls = [url] if isinstance(url, str) else list(url)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=TIMEOUT) as session:
        started = time.monotonic()
        tasks = []
        for n, (offset, body) in enumerate(zip(offsets, bodies)):
            delay = started + offset - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(stream_request(session, urls[n % len(urls)], body)))
        results = list(await asyncio.gather(*tasks))
        return results, time.monotonic() - started


def workload(args: argparse.Namespace, seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    return [completion_body(_tokens(rng, args.slo_prompt_tokens), args.slo_output_tokens) for _ in range(count)]


def poisson_offsets(rate: float, seconds: float, seed: int) -> list[float]:
    """Poisson arrivals at ``rate`` over ``seconds``, conditioned on their expected
    count: that many uniform times, sorted. (Drawn freely, 8 s at 14.7/s gave 91
    arrivals with one seed, 2.3x capacity offered instead of 3x.)"""
    rng = random.Random(seed)
    return sorted(rng.uniform(0.0, seconds) for _ in range(round(rate * seconds)))


async def slo_benchmark(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    started = time.monotonic()
    load_before = loadavg()
    frontend = ["--router-mode", "kv", "--prefill-weight", "4", "--busy-kv-threshold", "0.95",
                "--busy-queue-threshold", "-1"]
    async with Deployment(log_dir / "slo", workers=2, speedup=1.0, frontend_args=frontend,
                          worker_args=WORKER_ARGS) as dep:
        await asyncio.sleep(1.0)
        url, fe = dep.urls[0], dep.frontends[0]
        watch = ReportWatch()
        transport = await NatsTransport.connect(dep.nats.url, name="bench-routing-slo")
        await transport.subscribe(load_subject_wildcard(dep.namespace), watch.on_load)
        # 1. unloaded
        # (4 output tokens: a request alone has the same TTFT whatever its length)
        bodies = [completion_body(_tokens(random.Random(101 + i), args.slo_prompt_tokens), 4)
                  for i in range(args.slo_unloaded_requests)]
        unloaded: list[Result] = []
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            for body in bodies:
                unloaded.append(await stream_request(session, url, body))
        unloaded_p50 = percentile([r.ttft for r in unloaded if r.status == 200], 50)
        objective = args.ttft_slo or round(args.slo_factor * unloaded_p50, 2)
        print(f"unloaded TTFT p50 {unloaded_p50 * 1000:.1f} ms -> objective {objective * 1000:.0f} ms",
              file=sys.stderr)
        # 2. capacity
        concurrency = 2 * (MAX_NUM_SEQS + 2)
        cap_results, cap_wall = await closed_loop_bodies(url, workload(args, 102, 4000), concurrency,
                                                         args.slo_capacity_seconds)
        capacity = sum(1 for r in cap_results if r.status == 200) / cap_wall
        print(f"capacity {capacity:.2f} req/s", file=sys.stderr)
        await asyncio.sleep(2.0)
        # 3. settings x phases
        burst_bodies = workload(args, 103, args.slo_burst)
        poisson = {}
        for factor, seed in ((1.5, 104), (3.0, 105)):
            offsets = poisson_offsets(factor * capacity, args.slo_phase_seconds, seed)
            poisson[f"poisson {factor:g}x"] = (offsets, workload(args, seed, len(offsets)))
        settings = [("ttft_slo", {"queue_depth": None, "prefill_tokens": None, "ttft_slo": objective}),
                    *static_settings()]
        results: dict[str, dict[str, Any]] = {}
        for name, setting in settings:
            applied = await fe.set_busy_thresholds(**setting)
            per_phase: dict[str, Any] = {"thresholds": applied}
            await asyncio.sleep(1.0)
            figures = watch.prefill_figures()
            res, wall = await run_bodies(url, burst_bodies, [0.0] * len(burst_bodies))
            per_phase["burst"] = summarize(res, objective, None, wall) | {"reported_before": figures}
            unbounded = setting["queue_depth"] is None and setting["prefill_tokens"] is None and \
                setting["ttft_slo"] is None
            for phase, (offsets, bodies) in poisson.items():
                if unbounded:
                    continue
                await asyncio.sleep(1.0)
                figures = watch.prefill_figures()
                res, wall = await run_bodies(url, bodies, offsets)
                per_phase[phase] = summarize(res, objective, args.slo_phase_seconds, wall) | {
                    "reported_before": figures}
                per_phase[phase]["offered_req_s"] = round(len(offsets) / args.slo_phase_seconds, 2)
            results[name] = per_phase
            print(f"{name}: " + "; ".join(
                f"{ph} adm {s['admitted']}/{s['requests']} p99 {s['ttft_p99_ms']} good {s['goodput']}"
                for ph, s in per_phase.items() if ph != "thresholds"), file=sys.stderr)
        await transport.close()
    return {
        "objective_s": objective,
        "objective_rule": "given (--ttft-slo)" if args.ttft_slo else f"{args.slo_factor} x unloaded TTFT p50",
        "unloaded": summarize(unloaded, objective, None, 0.0) | {"ttft_p50_ms": round(unloaded_p50 * 1000, 1)},
        "capacity_req_s": round(capacity, 2),
        "capacity_run": summarize(cap_results, objective, None, cap_wall) | {"concurrency": concurrency},
        "settings": results,
        "comparison": compare(results, objective),
        "load_average_before_after": [load_before, loadavg()],
        "benchmark_seconds": round(time.monotonic() - started, 1),
    }


def compare(results: dict[str, dict[str, Any]], objective: float) -> dict[str, Any]:
    """Per phase: the best static setting by goodput, and the targets."""
    out: dict[str, Any] = {}
    slo = results["ttft_slo"]
    for phase in PHASES:
        static = {n: r[phase] for n, r in results.items() if n != "ttft_slo" and phase in r}
        best = max(static, key=lambda n: (static[n]["goodput"], -(static[n]["ttft_p99_ms"] or 0)))
        mine = slo[phase]
        out[phase] = {
            "best_static": best,
            "best_static_goodput": static[best]["goodput"],
            "slo_goodput": mine["goodput"],
            "goodput_ge_best_static": mine["goodput"] >= static[best]["goodput"],
            "slo_accepted_ttft_p99_ms": mine["ttft_p99_ms"],
            "p99_within_objective": mine["ttft_p99_ms"] is not None and mine["ttft_p99_ms"] <= objective * 1000,
            "slo_admitted": mine["admitted"],
        }
    return out


def plot(report: dict[str, Any], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    settings = report["settings"]
    names = list(settings)
    fig, axes = plt.subplots(1, len(PHASES), figsize=(18, 5.5))
    objective_ms = report["objective_s"] * 1000
    for ax, phase in zip(axes, PHASES):
        xs = [i for i, n in enumerate(names) if phase in settings[n]]
        good = [settings[names[i]][phase]["goodput"] for i in xs]
        colors = ["tab:green" if names[i] == "ttft_slo" else "tab:gray" for i in xs]
        ax.bar(xs, good, color=colors)
        ax.set_xticks(range(len(names)), [n.replace(" / ", "\n") for n in names], fontsize=7, rotation=45)
        ax.set_ylabel("goodput (requests meeting objective" + (")" if phase == "burst" else "/s)"))
        ax2 = ax.twinx()
        ax2.plot(xs, [settings[names[i]][phase]["ttft_p99_ms"] or 0 for i in xs], "o", color="tab:red")
        ax2.axhline(objective_ms, color="tab:red", linestyle="--", linewidth=1)
        ax2.set_yscale("log")
        ax2.set_ylabel("accepted TTFT p99 (ms, log; dashed: objective)", color="tab:red")
        ax.set_title(f"{phase}: ttft_slo {objective_ms:.0f} ms vs static rules")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def print_report(report: dict[str, Any]) -> None:
    rows = []
    for name, per_phase in report["settings"].items():
        for phase in PHASES:
            s = per_phase.get(phase)
            if s is None:
                continue
            rows.append([name, phase, s.get("offered_req_s", s["requests"]), s["admitted"], s["rejected_503"],
                         s["ttft_p50_ms"], s["ttft_p99_ms"], s["good"], s["goodput"]])
    print(f"objective {report['objective_s'] * 1000:.0f} ms ({report['objective_rule']}); unloaded TTFT p50 "
          f"{report['unloaded']['ttft_p50_ms']} ms; capacity {report['capacity_req_s']} req/s")
    print_table(["setting", "phase", "offered", "admitted", "rejected", "ttft p50 ms", "ttft p99 ms", "good",
                 "goodput"], rows)
    for phase, c in report["comparison"].items():
        print(f"{phase}: best static {c['best_static']} goodput {c['best_static_goodput']}; ttft_slo "
              f"{c['slo_goodput']} (>= best: {c['goodput_ge_best_static']}), p99 {c['slo_accepted_ttft_p99_ms']} ms "
              f"(within objective: {c['p99_within_objective']})")


def run_alone(args: argparse.Namespace) -> None:
    """Part 4 alone (``--slo``): its own results, ``routing-slo`` unless ``--output`` says."""
    name = "routing-slo" if args.output == "routing" else args.output
    config = {k: v for k, v in options_of(args).items() if k.startswith(("slo", "ttft")) or k == "seed"}
    log_dir = Path(tempfile.mkdtemp(prefix="dynrt-bench-routing-slo-"))
    print(f"logs: {log_dir}", file=sys.stderr)
    report = {"config": config, **asyncio.run(slo_benchmark(args, log_dir))}
    path = write_results(name, report, args.results_dir)
    png = args.results_dir / f"{name}.png"
    plotted = plot(report, png)
    print_report(report)
    print(f"wrote {path} and {png}" if plotted else f"wrote {path} (no plot: matplotlib not installed)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--slo", action="store_true", help="run only part 4, TTFT objective vs static thresholds")
    parser.add_argument("--ttft-slo", type=float, default=0.0, help="part 4: the objective (s; 0 = 3x unloaded)")
    parser.add_argument("--slo-factor", type=float, default=3.0, help="part 4: objective = this x unloaded TTFT p50")
    parser.add_argument("--slo-prompt-tokens", type=int, default=800)
    parser.add_argument("--slo-output-tokens", type=int, default=120)
    parser.add_argument("--slo-burst", type=int, default=96)
    parser.add_argument("--slo-phase-seconds", type=float, default=8.0)
    parser.add_argument("--slo-capacity-seconds", type=float, default=10.0)
    parser.add_argument("--slo-unloaded-requests", type=int, default=12)
