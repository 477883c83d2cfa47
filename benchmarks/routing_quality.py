"""Routing quality on a published workload shape (issue 19 item 5): llm-d's precise-prefix
benchmark (8 pods, 150 tenants with a 6k-token shared prefix each, load raised to
saturation) scaled to this machine, end to end on mock workers at speedup 1.

**Workload.** ``--tenants`` tenants, each with its own shared prefix of ``--prefix-tokens``
token ids, followed in every request by a unique question (``--question-tokens``); each
request asks for ``--output-tokens`` tokens (``ignore_eos``). Poisson arrivals (the
expected count at uniform times, ``routing_slo.poisson_offsets``) for ``--phase-seconds``
at each offered rate of ``--rates``; each request picks a tenant uniformly at random.
Every body and arrival time is made before a phase's clock starts, from ``--seed``: every
policy gets the same schedule.

**Pools.** Per policy a fresh pool (``harness.deployment``: own etcd and NATS,
``--workers`` mock workers at speedup 1, one frontend ``--router-mode POLICY``), so
caches start cold; a warm-up phase at the lowest rate (a schedule of its own, not
reported as a rate), then the rates in increasing order in that pool, each after the
previous one's last answer. Fault detection is held back (``--suspect-after 2``). Shedding is off (``--busy-kv-threshold -1``, queue and
prefill rules off): every request is served, and an overloaded policy shows it as TTFT
and a drain after the arrivals. Each worker's cache (``--num-blocks``) holds
``--cache-over-share`` × its share of all prefixes (all prefixes / workers): one worker
holds only a fraction of them, the 8 together hold them all.

**Measured** per policy and rate: TTFT p50/p90/p99 (first SSE event), output tokens/s
and completed requests/s over the phase's wall time (first arrival to last answer),
completed / errored, cache hit rate (``usage.prompt_tokens_details.cached_tokens`` /
prompt tokens), and the CPU used by the deployment's processes, by this client and by
the whole machine (cores = CPU seconds / wall seconds; ``/proc``) and the load average.

A policy **sustains** a rate when every request completed, its completed requests/s
is ≥ 90 % of the offered rate, and TTFT p50 of the last third of the arrivals is at
most twice that of the first third (its queue does not grow through the phase).

**Target** (issue 19): at the highest rate round-robin sustains, ``kv``'s TTFT p90 ≥ 3×
better than round-robin's, and its throughput ≥ 1.3×. At a rate both sustain, both
complete what is offered, so equal throughput there is by definition; the throughput
comparison that can differ is at the rates round-robin does not sustain (llm-d's was at
saturation): reported at the top rate of the sweep and as the ratio of the highest
sustained rates.

**Herding** (``--herding``): ``kv`` at ``--herding-rates`` with ``--frontends``
frontends, (a) each routing on its own view (local mode), (b) all in remote mode behind
one standalone ``dynrt router``; the client spreads requests over the frontends in
turn. Requests the frontends routed locally because the router did not answer in time
(``dynrt_frontend_router_bypass_total``) are counted.

Results (2-core shared VM, AMD EPYC, Firecracker, CPython 3.11; 2026-11-29 22:28–22:43Z,
re-run on the submitted code; defaults: 8 workers, 32 tenants × 6,144-token prefix +
128-token question, 32 output tokens, 3,072 blocks per worker = 8 of the 32 prefixes,
``--rates 8,16,20,24,28,32,38,44 --phase-seconds 15``; ``results/routing_quality.json``,
``.png``):

=============  =====  =====  =====  =====  =====  =====  =====  =====
TTFT p90 (ms)     8     16     20     24     28     32     38     44
=============  =====  =====  =====  =====  =====  =====  =====  =====
kv                52     70     65     70     84     82     93    100
least-loaded     138    174    171    187    195    361  2,690  4,168
round-robin      138    173    171    185    205    534  2,282  4,315
random           176    318    310    556  1,066  2,087  3,565  5,998
=============  =====  =====  =====  =====  =====  =====  =====  =====

* kv serves 93–96 % of prompt tokens from cache; the other three 20–30 % (a worker
  holds a quarter of the prefixes). A miss is a ~123 ms prefill step (the mock's fit for
  6k tokens), which is round-robin's TTFT floor (p50 135 ms at 8/s).
* round-robin sustains up to 32/s (38/s: p50 growth 9.96); least-loaded the same (32/s),
  random 24/s; kv all 8 rates (its limit is above the sweep).
* Target: at 32/s, kv's TTFT p90 82 ms vs round-robin's 534 ms, **6.5×** (met, ≥ 3×);
  throughput there 1.03× (both complete what is offered). At 44/s round-robin completes
  965 tokens/s (its ceiling) and kv 1,342 (**1.39×**, met at saturation, ≥ 1.3×);
  highest sustained rate ≥ 1.38×. The TTFT ratio depends on where round-robin's knee
  falls in the grid: one rate lower (28/s) it is 2.4×, and 2.5–2.7× at 8–24/s (a miss
  against a hit). The first run (21:07–21:33Z, on the code before the idle-heartbeat
  change) gave 6.7× and 1.40×.
* CPU (first run): the deployment used 0.32–0.85 cores and the client 0.05–0.18; the
  whole machine 0.4–1.5 busy cores — the client's clock was not starved. An earlier run,
  while a CI suite with vLLM shared the cores (load average 15–20), gave the same kv
  curve but a noisy round-robin (p90 growth from CPU bursts), hence the median in the
  *sustained* rule and ``--suspect-after 2``.
* Herding (``kv``, 4 frontends, warmed at half the rate; one run each):

  ======  ===========  ===========  ===========  =========  =====
  rate    routing      TTFT p50 ms  TTFT p90 ms  tokens/s   hit
  ======  ===========  ===========  ===========  =========  =====
  32/s    local views       59           85         979     0.937
  32/s    one router        65          124         970     0.902
  44/s    local views       71          151       1,335     0.900
  44/s    one router        75          113       1,330     0.932
  ======  ===========  ===========  ===========  =========  =====

  The TTFT p90 and hit-rate differences change sign between the two rates, so one run
  each does not separate them from noise. Herding stays small because every frontend
  hears the same KV events and load reports and counts its own pending assignments
  until a report acknowledges them.

Writes ``benchmarks/results/<--output>.json`` and ``.png``; ``--merge`` keeps the policies,
rates and herding runs of an existing JSON that this run does not repeat (so the sweep
and the herding part can be separate invocations, each under the benchmark lock).

    python -m benchmarks.routing_quality --policies kv,least-loaded
    python -m benchmarks.routing_quality --policies round-robin,random --merge
    python -m benchmarks.routing_quality --policies '' --herding --merge
    python -m benchmarks.routing_quality --quick        # smoke: 2 workers, seconds
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import add_results_dir_argument, machine_facts, options_of, print_table, pyplot, write_results
from benchmarks.routing import Result, _tokens, completion_body, summarize
from benchmarks.routing_slo import loadavg, poisson_offsets, run_bodies
from dynrt.runtime.procs import read_stat
from harness.deployment import Deployment
from harness.metrics import parse_metrics
from harness.stats import percentile

POLICIES = ("kv", "least-loaded", "round-robin", "random")
SUSTAIN_THROUGHPUT = 0.9  # completed req/s over offered
SUSTAIN_GROWTH = 2.0  # TTFT p50, last third of arrivals over first third
NO_SHEDDING = ["--busy-kv-threshold", "-1", "--busy-queue-threshold", "-1", "--busy-prefill-threshold", "-1"]
# Fault detection held back: on these shared 2 cores a worker starved of CPU for 0.3 s
# (another job's burst) was taken for hung, its streams moved and routing changed —
# a measurement of the neighbours, not of routing.
STEADY = ["--suspect-after", "2"]


# ---------------------------------------------------------------------------
# workload
# ---------------------------------------------------------------------------


class Workload:
    """The tenants' prefixes and, per rate, the arrival times and request bodies."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        rng = random.Random(args.seed)
        self.prefixes = [_tokens(rng, args.prefix_tokens) for _ in range(args.tenants)]

    def schedule(self, rate: float, seed: int) -> tuple[list[float], list[bytes]]:
        offsets = poisson_offsets(rate, self.args.phase_seconds, seed)
        rng = random.Random(seed + 7919)
        bodies = [completion_body(self.prefixes[rng.randrange(len(self.prefixes))]
                                  + _tokens(rng, self.args.question_tokens), self.args.output_tokens)
                  for _ in offsets]
        return offsets, bodies


def cache_sizing(args: argparse.Namespace) -> dict[str, Any]:
    prefix_blocks = args.prefix_tokens // args.block_size
    total = args.tenants * prefix_blocks
    return {"prefix_blocks_per_tenant": prefix_blocks, "all_prefixes_blocks": total,
            "per_worker_share_blocks": round(total / args.workers), "num_blocks_per_worker": args.num_blocks,
            "tenants_one_worker_holds": round(args.num_blocks / prefix_blocks, 1)}


# ---------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (``/proc/stat``; read by hand: psutil
    is not among the project's dependencies, and this is one line of the file)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds of a deployment's processes, of this client and of the whole machine
    between ``start()`` and ``stop(wall)``, as cores (CPU seconds per wall second)."""

    def __init__(self, dep: Deployment) -> None:
        self.pids = list(dep.pids().values())

    def _deployment_seconds(self) -> float:
        return sum(s.cpu_seconds for s in map(read_stat, self.pids) if s is not None)

    def start(self) -> None:
        self.dep0, self.client0, self.load0 = self._deployment_seconds(), time.process_time(), loadavg()
        self.machine0 = machine_busy_seconds()

    def stop(self, wall: float) -> dict[str, Any]:
        return {"deployment_cores": round((self._deployment_seconds() - self.dep0) / wall, 2),
                "client_cores": round((time.process_time() - self.client0) / wall, 2),
                "machine_busy_cores": round((machine_busy_seconds() - self.machine0) / wall, 2),
                "loadavg_before_after": [self.load0, loadavg()]}


def ttft_growth(results: list[Result]) -> float | None:
    """TTFT p50 of the last third of the arrivals over that of the first third (None:
    too few requests to tell). A growing queue raises every later request's wait, so
    the median shows it; a p90 also moves with a few requests delayed by a neighbour's
    burst of CPU on this shared machine."""
    ok = sorted((r for r in results if r.status == 200), key=lambda r: r.started)
    third = len(ok) // 3
    if third < 3:
        return None
    first = percentile([r.ttft for r in ok[:third]], 50)
    last = percentile([r.ttft for r in ok[-third:]], 50)
    return round(last / first, 2)


def phase_summary(results: list[Result], wall: float, rate: float, cpu: dict[str, Any]) -> dict[str, Any]:
    s = summarize(results, wall)
    s["offered_req_s"] = rate
    s["errored"] = s["requests"] - s["ok"]
    s["completed_over_offered"] = round(s["throughput_req_s"] / rate, 3)
    s["ttft_p50_growth"] = ttft_growth(results)
    s["sustained"] = (s["errored"] == 0 and s["completed_over_offered"] >= SUSTAIN_THROUGHPUT
                      and (s["ttft_p50_growth"] is None or s["ttft_p50_growth"] <= SUSTAIN_GROWTH))
    s["cpu"] = cpu
    return s


async def run_phase(dep: Deployment, urls: list[str], workload: Workload, rate: float, seed: int) -> dict[str, Any]:
    offsets, bodies = workload.schedule(rate, seed)
    meter = CpuMeter(dep)
    meter.start()
    results, wall = await run_bodies(urls, bodies, offsets)
    summary = phase_summary(results, wall, rate, meter.stop(wall))
    print(f"  {rate:g} req/s: ok {summary['ok']}/{summary['requests']} ttft p50/p90 {summary['ttft_p50_ms']}/"
          f"{summary['ttft_p90_ms']} ms, {summary['throughput_output_tok_s']} tok/s, hit "
          f"{summary['cache_hit_rate']}, sustained {summary['sustained']}, cpu {summary['cpu']}", file=sys.stderr)
    return summary


def worker_args(args: argparse.Namespace) -> list[str]:
    return ["--num-blocks", str(args.num_blocks), "--block-size", str(args.block_size)]


async def sweep_policy(args: argparse.Namespace, log_dir: Path, workload: Workload,
                       policy: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """One policy on a fresh pool: a warm-up at the lowest rate (its own schedule, so
    the first measured rate is not the only one paying for cold caches), then every
    rate. Returns the warm-up's summary and the rates'."""
    frontend = ["--router-mode", policy, "--prefill-weight", str(args.prefill_weight), *NO_SHEDDING, *STEADY]
    print(f"{policy}:", file=sys.stderr)
    rates: dict[str, Any] = {}
    async with Deployment(log_dir / policy, workers=args.workers, speedup=1.0, frontend_args=frontend,
                          worker_args=worker_args(args)) as dep:
        await asyncio.sleep(1.0)  # initial load reports
        print("  warm-up:", file=sys.stderr)
        warmup = await run_phase(dep, dep.urls, workload, args.rates[0], args.seed * 1000 + 500)
        await asyncio.sleep(args.pause)
        for n, rate in enumerate(args.rates):
            rates[f"{rate:g}"] = await run_phase(dep, dep.urls, workload, rate, args.seed * 1000 + n)
            await asyncio.sleep(args.pause)
    return warmup, rates


async def herding_run(args: argparse.Namespace, log_dir: Path, workload: Workload, standalone: bool,
                      rate: float, seed: int) -> dict[str, Any]:
    """``kv`` at ``rate`` through ``--frontends`` frontends: local views, or one router."""
    name = f"{'router' if standalone else 'local'}-{rate:g}"
    router_args = ["--prefill-weight", str(args.prefill_weight), *NO_SHEDDING, *STEADY]
    frontend = ([] if standalone else ["--router-mode", "kv"]) + router_args
    async with Deployment(log_dir / name, workers=args.workers, frontends=args.frontends, speedup=1.0,
                          router=standalone, router_args=router_args, frontend_args=frontend,
                          worker_args=worker_args(args)) as dep:
        await asyncio.sleep(1.0)
        # Caches warmed first (at half the rate, another schedule), as the sweep's
        # lower rates warm them: cold caches would be a different experiment.
        print(f"  {name}: warming at {rate / 2:g}", file=sys.stderr)
        await run_phase(dep, dep.urls, workload, rate / 2, args.seed * 1000 + 500)
        await asyncio.sleep(args.pause)
        summary = await run_phase(dep, dep.urls, workload, rate, seed)
        if standalone:
            samples = [parse_metrics(await f.metrics_text()) for f in dep.frontends]
            summary["bypassed_requests"] = sum(value for s in samples for (name, _), value in s.items()
                                               if name == "dynrt_frontend_router_bypass_total")
    return summary


async def herding(args: argparse.Namespace, log_dir: Path, workload: Workload) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for rate in args.herding_rates:
        seed = args.seed * 1000 + args.rates.index(rate) if rate in args.rates else args.seed * 1000 + 999
        print(f"herding at {rate:g} req/s, {args.frontends} frontends:", file=sys.stderr)
        out[f"{rate:g}"] = {
            "local": await herding_run(args, log_dir, workload, False, rate, seed),
            "router": await herding_run(args, log_dir, workload, True, rate, seed),
        }
    return out


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def highest_sustained(rates: dict[str, Any]) -> str | None:
    sustained = [r for r, s in rates.items() if s["sustained"]]
    return max(sustained, key=float) if sustained else None


def compare(sweep: dict[str, Any]) -> dict[str, Any]:
    """The issue's target, kv against round-robin."""
    kv, rr = sweep.get("kv"), sweep.get("round-robin")
    if not kv or not rr:
        return {}
    at = highest_sustained(rr)
    out: dict[str, Any] = {"round_robin_highest_sustained_req_s": at,
                           "kv_highest_sustained_req_s": highest_sustained(kv)}
    if at is not None and at in kv:
        out["at_rr_highest_sustained"] = {
            "kv_ttft_p90_ms": kv[at]["ttft_p90_ms"], "rr_ttft_p90_ms": rr[at]["ttft_p90_ms"],
            "ttft_p90_ratio": round(rr[at]["ttft_p90_ms"] / kv[at]["ttft_p90_ms"], 2),
            "throughput_ratio": round(kv[at]["throughput_output_tok_s"] / rr[at]["throughput_output_tok_s"], 3)}
    top = max(set(kv) & set(rr), key=float)
    out["at_top_rate"] = {
        "rate": top, "ttft_p90_ratio": round(rr[top]["ttft_p90_ms"] / kv[top]["ttft_p90_ms"], 2),
        "throughput_ratio": round(kv[top]["throughput_output_tok_s"] / rr[top]["throughput_output_tok_s"], 3)}
    ks = out["kv_highest_sustained_req_s"]
    if at is not None and ks is not None:
        out["highest_sustained_ratio"] = round(float(ks) / float(at), 2)
    at_rr = out.get("at_rr_highest_sustained", {})
    out["ttft_target_met"] = at_rr.get("ttft_p90_ratio", 0) >= 3.0
    out["throughput_target_met_at_top_rate"] = out["at_top_rate"]["throughput_ratio"] >= 1.3
    return out


def plot(report: dict[str, Any], path: Path) -> bool:
    plt = pyplot()
    if plt is None or not report.get("sweep"):
        return False
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for policy, rates in report["sweep"].items():
        xs = sorted(rates, key=float)
        offered = [float(r) for r in xs]
        axes[0].plot(offered, [rates[r]["ttft_p90_ms"] / 1000 for r in xs], "o-", label=policy)
        axes[1].plot(offered, [rates[r]["throughput_output_tok_s"] for r in xs], "o-", label=policy)
        axes[2].plot(offered, [rates[r]["cache_hit_rate"] * 100 for r in xs], "o-", label=policy)
    any_rates = sorted({float(r) for rates in report["sweep"].values() for r in rates})
    out_tokens = report["config"]["output_tokens"]
    axes[1].plot(any_rates, [r * out_tokens for r in any_rates], "k:", label="offered")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("TTFT p90 (s, log)")
    axes[1].set_ylabel("output tokens/s")
    axes[2].set_ylabel("cache hit rate (%)")
    cfg = report["config"]
    axes[0].set_title(f"{cfg['workers']} mock workers, {cfg['tenants']} tenants × {cfg['prefix_tokens']}-token prefix")
    axes[1].set_title("output throughput")
    axes[2].set_title("prompt tokens served from cache")
    for ax in axes:
        ax.set_xlabel("offered load (requests/s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def print_report(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(f"machine: {m['cpu_count']} cores, {m['cpu_model']}, {m['platform']}, CPython {m['python']}")
    rows = [[p, r, s["ttft_p50_ms"], s["ttft_p90_ms"], s["throughput_output_tok_s"], s["throughput_req_s"],
             s["ok"], s["errored"], s["cache_hit_rate"], s["ttft_p50_growth"], "yes" if s["sustained"] else "no",
             s["cpu"]["deployment_cores"], s["cpu"]["client_cores"]]
            for p, rates in report.get("sweep", {}).items()
            for r, s in sorted(rates.items(), key=lambda item: float(item[0]))]
    print_table(["policy", "offered/s", "ttft p50 ms", "ttft p90 ms", "out tok/s", "done/s", "ok", "err", "hit",
                 "p50 growth", "sustained", "dep cores", "client cores"], rows)
    if report.get("comparison"):
        print(f"kv vs round-robin: {json.dumps(report['comparison'])}")
    rows = [[r, mode, s["ttft_p50_ms"], s["ttft_p90_ms"], s["throughput_output_tok_s"], s["ok"], s["errored"],
             s["cache_hit_rate"], s.get("bypassed_requests", ""), s["cpu"]["deployment_cores"]]
            for r, modes in report.get("herding", {}).items() for mode, s in modes.items()]
    if rows:
        print(f"herding: kv, {report['config']['frontends']} frontends")
        print_table(["offered/s", "routing", "ttft p50 ms", "ttft p90 ms", "out tok/s", "ok", "err", "hit",
                     "bypassed", "dep cores"], rows)


def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` over ``old``: per policy and rate, per herding rate."""
    merged = {**old, **{k: v for k, v in new.items() if k not in ("sweep", "herding", "warmup")}}
    merged["invocations"] = old.get("invocations", []) + new.get("invocations", [])
    for part in ("sweep", "herding", "warmup"):
        combined = dict(old.get(part, {}))
        for key, value in new.get(part, {}).items():
            combined[key] = {**combined.get(key, {}), **value} if part == "sweep" else value
        merged[part] = combined
    return merged


async def run(args: argparse.Namespace) -> dict[str, Any]:
    log_dir = Path(tempfile.mkdtemp(prefix="dynrt-bench-routing-quality-"))
    print(f"logs: {log_dir}", file=sys.stderr)
    workload = Workload(args)
    started = time.monotonic()
    report: dict[str, Any] = {"warmup": {}, "sweep": {}}
    for policy in args.policies:
        report["warmup"][policy], report["sweep"][policy] = await sweep_policy(args, log_dir, workload, policy)
    if args.herding:
        report["herding"] = await herding(args, log_dir, workload)
    report["run_seconds"] = round(time.monotonic() - started, 1)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated frontend --router-mode values")
    parser.add_argument("--rates", default="4,8,12,16,20,24", help="offered loads, requests/s, increasing")
    parser.add_argument("--phase-seconds", type=float, default=20.0, help="arrival window per rate")
    parser.add_argument("--pause", type=float, default=1.0, help="seconds between rates")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--tenants", type=int, default=32)
    parser.add_argument("--prefix-tokens", type=int, default=6144)
    parser.add_argument("--question-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-blocks", type=int, default=0,
                        help="KV blocks per worker (0: --cache-over-share x a worker's share of all prefixes)")
    parser.add_argument("--cache-over-share", type=float, default=2.0)
    parser.add_argument("--prefill-weight", type=float, default=4.0, help="kv: frontend/router --prefill-weight")
    parser.add_argument("--herding", action="store_true", help="also run the herding comparison")
    parser.add_argument("--herding-rates", default="", help="rates for --herding (default: the top rate)")
    parser.add_argument("--frontends", type=int, default=4, help="herding: frontends")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output", default="routing_quality", help="results name (JSON and PNG)")
    parser.add_argument("--merge", action="store_true", help="keep what an existing JSON has and this run does not")
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run (2 workers, 2 rates)")
    add_results_dir_argument(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.workers, args.tenants, args.prefix_tokens, args.output_tokens = 2, 6, 1024, 8
        args.rates, args.phase_seconds, args.frontends = "2,4", 3.0, 2
    args.policies = [p for p in args.policies.split(",") if p]
    args.rates = sorted(float(r) for r in args.rates.split(",") if r)
    args.herding_rates = [float(r) for r in args.herding_rates.split(",") if r] or args.rates[-1:]
    if not args.num_blocks:
        share = args.tenants * (args.prefix_tokens // args.block_size) / args.workers
        args.num_blocks = round(args.cache_over_share * share)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    report = {"config": options_of(args), "cache": cache_sizing(args), **asyncio.run(run(args))}
    report["invocations"] = [{"machine": machine_facts(), "config": report["config"],
                              "run_seconds": report["run_seconds"]}]
    path = args.results_dir / f"{args.output}.json"
    if args.merge and path.exists():
        report = merge({k: v for k, v in json.loads(path.read_text()).items() if k != "machine"}, report)
    report["comparison"] = compare(report.get("sweep", {}))
    path = write_results(args.output, report, args.results_dir)
    png = args.results_dir / f"{args.output}.png"
    plotted = plot(report, png)
    print_report(json.loads(path.read_text()))
    print(f"wrote {path} and {png}" if plotted else f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
