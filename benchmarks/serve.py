"""End-to-end serving benchmark: a bounded OpenAI streaming load generator.

``--requests`` chat completions, at most ``--concurrency`` at a time, each with a prompt of
about ``--prompt-tokens`` mock-vocabulary tokens (every prompt starts differently, so prefix
caching does not make it trivial) and exactly ``--output-tokens`` output tokens
(``max_tokens`` + ``ignore_eos``). Reports output tok/s, TTFT and ITL p50/p99, request
latency and errors; writes ``benchmarks/results/serve.json`` (``--results-dir``) and a PNG plot.

By default it starts its own deployment (``harness.deployment``: etcd + NATS, one frontend,
``--workers`` mock workers as subprocesses, all stopped at the end) once per ``--speedup`` value
(default ``inf,1``: pure runtime overhead, then the mock's modelled GPU timing) and
``--chunking`` mode. With ``--url`` it targets a running frontend instead.

Frontend CPU per output token is the frontend process's user + system CPU time
(``/proc``) over the measured run, divided by the tokens received; every process of the
deployment is reported the same way. ``--chunking`` says how the frontend sends tokens:
``coalesced`` (its normal behaviour: frames already received when one is read go out as
one SSE chunk) and/or ``one`` (every token its own chunk: the frontend runs with
``DYNRT_FRONTEND_ONE_TOKEN_PER_CHUNK=1``, see ``dynrt.frontend.attempt_reader``), the
per-token cost of a frontend that cannot coalesce (its tokens are still written a batch at
a time: the one-token events of the frames already received, in one write).
``--baseline-tree DIR`` measures the code of another source tree (e.g. ``git worktree add
/tmp/base <commit>``) in the same run, each configuration baseline first, and ``--tree
NAME=DIR`` more trees after it: their processes are started from a package layout of
that tree, so they import its ``dynrt``.

    python -m benchmarks.serve                          # the standard workload, both speedups, both chunkings
    python -m benchmarks.serve --repeats 2 --profile    # + py-spy profiles of frontend and workers
    python -m benchmarks.serve --url http://127.0.0.1:8000 --model mock-model
    python -m benchmarks.serve --speedup inf --requests 300 --repeats 3 \
        --baseline-tree /tmp/base --name serve-cpu     # frontend CPU per token, before/after

The client is aiohttp with msgspec parsing (not the openai package) so that it costs
little CPU next to the server on a small machine. ITL is the gap between consecutive
content chunks (as vLLM's benchmark_serving measures it); a chunk may carry several
tokens when the frontend coalesces, so TPOT ((latency - TTFT) / (tokens - 1)) is
reported too.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from benchmarks.common import RESULTS_DIR, add_results_dir_argument, print_table, pyplot, write_results
from benchmarks.frontend_setup import frontend_setup, package_layout
from dynrt.runtime.mock_tokenizer import mock_tokenizer
from dynrt.runtime.procs import read_stat, spawn, wait_process
from harness.deployment import Deployment
from harness.stats import percentile

# ---------------------------------------------------------------------------
# Workload
# ---------------------------------------------------------------------------

# The mock chat template adds <bos>, <|user|>, <|end|> and <|assistant|> around the content.
_TEMPLATE_TOKENS = 4


def build_prompts(count: int, prompt_tokens: int, seed: int = 0) -> list[str]:
    """``count`` prompts of about ``prompt_tokens`` tokens each once templated: words of
    the mock vocabulary (one token each, with their leading space), drawn at random per
    request so no two prompts share a first KV block."""
    tokenizer = mock_tokenizer()
    words = [tokenizer.decode([i]) for i in tokenizer.sampleable_ids if tokenizer.decode([i]).strip().isalpha()]
    n_words = max(1, prompt_tokens - _TEMPLATE_TOKENS)
    prompts = []
    for i in range(count):
        rng = random.Random(seed * 1_000_003 + i)
        prompts.append("".join(rng.choice(words) for _ in range(n_words)).lstrip())
    return prompts


# ---------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    text: str | None = None
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    completion_tokens: int = 0
    prompt_tokens: int = 0


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: dict[str, Any] | None = None


_chunk_decoder = msgspec.json.Decoder(_Chunk)


@dataclass
class RequestResult:
    index: int
    start: float  # seconds since the run's start
    ok: bool = False
    error: str = ""
    ttft: float = math.nan
    latency: float = math.nan
    output_tokens: int = 0
    prompt_tokens: int = 0
    chunk_times: list[float] = field(default_factory=list)  # content chunks, since request start
    content_reads: int = 0  # socket reads that brought content (several chunks may come in one)
    finish_reason: str | None = None


async def one_request(session: aiohttp.ClientSession, url: str, body: bytes, index: int, t0: float,
                      headers: dict[str, str]) -> RequestResult:
    started = time.perf_counter()
    result = RequestResult(index=index, start=started - t0)
    chunk_times = result.chunk_times
    try:
        async with session.post(url, data=body, headers=headers) as response:
            if response.status != 200:
                text = (await response.read())[:200].decode(errors="replace")
                result.error = f"HTTP {response.status}: {text}"
                return result
            buffer = b""
            done = False
            async for data in response.content.iter_any():
                now = time.perf_counter() - started
                buffer += data
                *events, buffer = buffer.split(b"\n\n")
                chunks_before = len(chunk_times)
                for event in events:
                    if not event.startswith(b"data: "):
                        continue
                    payload = event[6:]
                    if payload == b"[DONE]":
                        done = True
                        continue
                    chunk = _chunk_decoder.decode(payload)
                    if chunk.error is not None:
                        result.error = f"stream error: {chunk.error.get('message', '')[:200]}"
                        continue
                    if chunk.usage is not None:
                        result.output_tokens = chunk.usage.completion_tokens
                        result.prompt_tokens = chunk.usage.prompt_tokens
                    for choice in chunk.choices:
                        content = choice.delta.content if choice.delta is not None else choice.text
                        if content:
                            chunk_times.append(now)
                        if choice.finish_reason is not None:
                            result.finish_reason = choice.finish_reason
                if len(chunk_times) > chunks_before:
                    result.content_reads += 1
            result.latency = time.perf_counter() - started
            if chunk_times:
                result.ttft = chunk_times[0]
            if not done and not result.error:
                result.error = "stream ended without [DONE]"
            result.ok = not result.error
    except (aiohttp.ClientError, asyncio.TimeoutError, msgspec.DecodeError, OSError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    return result


async def run_load(url: str, model: str, prompts: list[str], output_tokens: int, concurrency: int,
                   api_key: str = "", timeout: float = 300.0) -> tuple[float, list[RequestResult]]:
    """Send every prompt (at most ``concurrency`` in flight); returns (wall seconds, results)."""
    endpoint = url.rstrip("/") + "/v1/chat/completions"
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    bodies = [msgspec.json.encode({
        "model": model, "messages": [{"role": "user", "content": p}], "stream": True,
        "stream_options": {"include_usage": True}, "max_tokens": output_tokens, "ignore_eos": True,
        "temperature": 0.0}) for p in prompts]
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    results: list[RequestResult] = []
    next_index = 0
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        t0 = time.perf_counter()

        async def user() -> None:
            nonlocal next_index
            while next_index < len(bodies):
                index = next_index
                next_index += 1
                results.append(await one_request(session, endpoint, bodies[index], index, t0, headers))

        await asyncio.gather(*(user() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    results.sort(key=lambda r: r.index)
    return wall, results


def summarize(wall: float, results: list[RequestResult], output_tokens: int) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    ttfts = [r.ttft * 1e3 for r in ok if not math.isnan(r.ttft)]
    itls = [(b - a) * 1e3 for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    tpots = [(r.latency - r.ttft) * 1e3 / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    latencies = [r.latency * 1e3 for r in ok]
    chunks = sum(len(r.chunk_times) for r in ok)
    errors = collections.Counter(r.error.split(":")[0] for r in results if not r.ok)
    return {
        "wall_s": wall,
        "requests": len(results),
        "completed": len(ok),
        "errors": len(results) - len(ok),
        "error_kinds": dict(errors),
        "first_errors": [r.error for r in results if not r.ok][:3],
        "short_outputs": sum(1 for r in ok if r.output_tokens != output_tokens),
        "output_tokens": tokens,
        "output_tok_s": tokens / wall if wall else 0.0,
        "requests_per_s": len(ok) / wall if wall else 0.0,
        "tokens_per_chunk": tokens / chunks if chunks else 0.0,
        "tokens_per_read": tokens / reads if (reads := sum(r.content_reads for r in ok)) else 0.0,
        "ttft_ms_p50": percentile(ttfts, 50), "ttft_ms_p99": percentile(ttfts, 99),
        "itl_ms_p50": percentile(itls, 50), "itl_ms_p99": percentile(itls, 99),
        "tpot_ms_p50": percentile(tpots, 50), "tpot_ms_p99": percentile(tpots, 99),
        "latency_ms_p50": percentile(latencies, 50), "latency_ms_p99": percentile(latencies, 99),
    }


# ---------------------------------------------------------------------------
# CPU accounting
# ---------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (threads included) so far (NaN if gone)."""
    stat = read_stat(pid)
    return math.nan if stat is None else stat.cpu_seconds


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


def system_cpu_seconds(pid: int) -> float:
    """System (kernel) CPU seconds of a process so far (NaN if gone): sends and receives."""
    stat = read_stat(pid)
    return math.nan if stat is None else stat.system_ticks / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------
# Profiling (py-spy)
# ---------------------------------------------------------------------------


def start_profilers(pids: dict[str, int], out_dir: Path, duration: int, native: bool = False) -> list[subprocess.Popen[bytes]]:
    """py-spy ``record`` (raw collapsed stacks, for top-N tables, and an SVG flame graph
    from the same samples is left to ``py-spy``'s own tooling) on each process."""
    py_spy = Path(sys.executable).parent / "py-spy"
    procs = []
    for name, pid in pids.items():
        argv = [str(py_spy), "record", "--pid", str(pid), "--duration", str(duration), "--rate", "400",
                "--format", "raw", "-o", str(out_dir / f"{name}.txt"), "--nonblocking"]
        if native:
            argv.append("--native")
        procs.append(spawn(argv))
    return procs


def top_functions(collapsed: Path, n: int = 15) -> dict[str, list[tuple[str, float]]]:
    """(self %, inclusive %) top entries from a py-spy raw (collapsed stacks) file."""
    self_counts: collections.Counter[str] = collections.Counter()
    incl_counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        try:
            count = int(count_text)
        except ValueError:
            continue
        frames = [_short(f) for f in stack.split(";") if f]
        # Skip the thread name frame py-spy puts first.
        if frames and frames[0].startswith("process ") or frames and frames[0].startswith("thread "):
            frames = frames[1:]
        if not frames:
            continue
        total += count
        self_counts[frames[-1]] += count
        for f in set(frames):
            incl_counts[f] += count
    if not total:
        return {"self": [], "inclusive": [], "samples": 0}  # type: ignore[dict-item]
    return {
        "samples": total,  # type: ignore[dict-item]
        "self": [(f, round(100 * c / total, 1)) for f, c in self_counts.most_common(n)],
        "inclusive": [(f, round(100 * c / total, 1)) for f, c in incl_counts.most_common(n + 10)],
    }


def _short(frame: str) -> str:
    """``func (path/to/file.py:123)`` → ``func (file.py)``: lines differ, functions matter."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if len(parts) >= 2 else path
    return f"{name} ({short})"


# ---------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------


def plot(runs: dict[str, list[RequestResult]], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return False
    fig, axes = plt.subplots(len(runs), 3, figsize=(16, 4.2 * len(runs)), squeeze=False)
    for row, (label, results) in enumerate(runs.items()):
        ok = [r for r in results if r.ok]
        ttfts = [r.ttft * 1e3 for r in ok]
        itls = [(b - a) * 1e3 for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
        ax = axes[row][0]
        ax.hist(ttfts, bins=50, color="tab:blue")
        ax.set_title(f"{label}: TTFT (ms)")
        ax.set_xlabel("ms")
        ax.set_ylabel("requests")
        ax = axes[row][1]
        positive = [x for x in itls if x > 0]
        if positive:
            lo, hi = max(min(positive), 1e-3), max(positive)
            bins = [lo * (hi / lo) ** (i / 60) for i in range(61)] if hi > lo else 60
            ax.hist(positive, bins=bins, color="tab:orange")
            ax.set_xscale("log")
        ax.set_title(f"{label}: inter-chunk latency (ms, log)")
        ax.set_xlabel("ms")
        ax.set_ylabel("gaps")
        ax = axes[row][2]
        for r in ok:
            ax.plot([r.start, r.start + r.latency], [r.index, r.index], color="tab:gray", linewidth=0.8)
            ax.plot([r.start], [r.index], marker="|", color="tab:blue", markersize=3)
            ax.plot([r.start + r.ttft], [r.index], marker="|", color="tab:red", markersize=3)
        ax.set_title(f"{label}: per-request timeline (blue start, red first token)")
        ax.set_xlabel("s since start")
        ax.set_ylabel("request")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


async def bench_target(url: str, args: argparse.Namespace, label: str, pids: dict[str, int] | None,
                       profile_dir: Path | None, other_pids: dict[str, int] | None = None) -> tuple[list[dict[str, Any]], list[RequestResult], dict[str, Any]]:
    # Warm-up: tokenizer load, connections, first routing decisions; not measured.
    warm = build_prompts(args.concurrency, args.prompt_tokens, seed=10_000 + args.seed)
    _, warm_results = await run_load(url, args.model, warm, args.output_tokens, args.concurrency, args.api_key)
    if not any(r.ok for r in warm_results):
        raise RuntimeError(f"warm-up failed: {warm_results[0].error}")
    summaries: list[dict[str, Any]] = []
    best_results: list[RequestResult] = []
    profiles: dict[str, Any] = {}
    for repeat in range(args.repeats):
        prompts = build_prompts(args.requests, args.prompt_tokens, seed=args.seed + 1 + repeat)
        profilers: list[subprocess.Popen[bytes]] = []
        if profile_dir is not None and pids and repeat == 0:
            # Long enough to cover the run; stopped with SIGINT when it ends.
            profilers = start_profilers(pids, profile_dir, duration=600, native=args.profile_native)
            await asyncio.sleep(0.5)
        cpu_pids = {**(pids or {}), **(other_pids or {}), "client": os.getpid()}
        cpu_before = cpu_snapshot(cpu_pids)
        system_before = {name: system_cpu_seconds(pid) for name, pid in cpu_pids.items()}
        wall, results = await run_load(url, args.model, prompts, args.output_tokens, args.concurrency, args.api_key)
        cpu_after = cpu_snapshot(cpu_pids)
        system_after = {name: system_cpu_seconds(pid) for name, pid in cpu_pids.items()}
        for p in profilers:  # SIGINT: py-spy writes what it sampled and exits
            p.send_signal(signal.SIGINT)
        for p in profilers:
            if wait_process(p, 30) is None:
                p.kill()
        if profilers and profile_dir is not None and pids:
            for name in pids:
                f = profile_dir / f"{name}.txt"
                if f.exists():
                    profiles[name] = top_functions(f)
        summary = summarize(wall, results, args.output_tokens)
        summary["repeat"] = repeat
        tokens = summary["output_tokens"] or 1
        # CPU microseconds per output token, by process: robust to a shared machine.
        summary["cpu_us_per_token"] = {name: round((cpu_after[name] - cpu_before[name]) * 1e6 / tokens, 2)
                                       for name in cpu_pids}
        summary["system_cpu_us_per_token"] = {name: round((system_after[name] - system_before[name]) * 1e6 / tokens, 2)
                                              for name in cpu_pids}
        per = summary["cpu_us_per_token"]
        summary["cpu_us_per_token_total"] = round(sum(v for v in per.values() if not math.isnan(v)), 2)
        summary["cpu_cores_busy"] = {name: round((cpu_after[name] - cpu_before[name]) / wall, 2) for name in cpu_pids}
        summaries.append(summary)
        print(f"  {label} run {repeat + 1}/{args.repeats}: {summary['output_tok_s']:.0f} tok/s, "
              f"TTFT p50 {summary['ttft_ms_p50']:.1f} ms, ITL p50 {summary['itl_ms_p50']:.2f} ms, "
              f"errors {summary['errors']}; CPU us/token {summary['cpu_us_per_token']}", flush=True)
        if not best_results or summary["output_tok_s"] >= max(s["output_tok_s"] for s in summaries):
            best_results = results
    return summaries, best_results, profiles


def _cpu(summary: dict[str, Any], prefix: str) -> str:
    values = [v for k, v in summary.get("cpu_us_per_token", {}).items() if k.startswith(prefix)]
    return f"{sum(values):.1f}" if values else "-"


def _best_and_spread(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    best = max(summaries, key=lambda s: s["output_tok_s"])
    rates = [s["output_tok_s"] for s in summaries]
    # CPU per token: the median over runs (the best run by tok/s need not be the leanest).
    frontend_cpu = sorted(s["cpu_us_per_token"].get("frontend", math.nan) for s in summaries)
    return {**best, "output_tok_s_min": min(rates), "output_tok_s_max": max(rates), "runs": len(rates),
            "frontend_cpu_us_per_token_median": frontend_cpu[len(frontend_cpu) // 2],
            "frontend_cpu_us_per_token_runs": frontend_cpu}


async def main(args: argparse.Namespace) -> int:
    runs: dict[str, dict[str, Any]] = {}
    plotted: dict[str, list[RequestResult]] = {}
    profile_root = Path(args.profile_dir) if args.profile else None
    if args.url:
        summaries, results, _ = await bench_target(args.url, args, args.url, None, None)
        runs[args.url] = {"target": args.url, "best": _best_and_spread(summaries), "runs": summaries}
        plotted[args.url] = results
    else:
        state = Path(tempfile.mkdtemp(prefix="dynrt-bench-"))
        trees: list[tuple[str, Path | None]] = [("current", None)]
        for name, tree in reversed(_other_trees(args)):
            trees.insert(0, (name, package_layout(Path(tree))))
        configs = [(speedup, chunking, code, layout) for speedup in args.speedup.split(",")
                   for chunking in args.chunking.split(",") for code, layout in trees]
        for speedup, chunking, code, layout in configs:
            label = f"speedup {speedup}, {chunking}" + (f", {code}" if len(trees) > 1 else "")
            slug = f"speedup-{speedup}-{chunking}-{code}"
            log_dir = state / slug
            log_dir.mkdir(exist_ok=True)
            print(f"{label}: starting etcd + NATS, 1 frontend + {args.workers} mock workers (logs in {log_dir})",
                  flush=True)
            quiet = ["--log-level", "warning"]
            with frontend_setup(chunking, layout):
                async with Deployment(log_dir, workers=args.workers, speedup=speedup,
                                      worker_self_checks=True, frontend_args=quiet,
                                      worker_args=[*quiet, "--engine", "mock", *args.worker_args]) as deployment:
                    profile_dir = None
                    if profile_root is not None:
                        profile_dir = profile_root / slug
                        profile_dir.mkdir(parents=True, exist_ok=True)
                    pids = {"frontend": deployment.frontends[0].pid,
                            **{f"worker-{i}": w.pid for i, w in enumerate(deployment.workers)}}
                    nats = deployment.nats.process
                    summaries, results, profiles = await bench_target(
                        deployment.urls[0], args, label, pids, profile_dir, {"nats": nats.pid} if nats else {})
            runs[label] = {"speedup": speedup, "chunking": chunking, "code": code,
                           "best": _best_and_spread(summaries), "runs": summaries}
            if profiles:
                runs[label]["profile_top"] = profiles
                for name, top in profiles.items():
                    print(f"  profile {name} ({top['samples']} samples), self time:")
                    for func, pct in top["self"][:12]:
                        print(f"    {pct:5.1f}%  {func}")
            plotted[label] = results
        for _, layout in trees:
            if layout is not None:
                shutil.rmtree(layout, ignore_errors=True)

    print()
    print(f"{args.requests} requests, concurrency {args.concurrency}, ~{args.prompt_tokens}-token prompts, "
          f"{args.output_tokens} output tokens, {args.workers} mock workers; best of {args.repeats} "
          f"(tok/s range over runs)")
    rows = []
    for label, run in runs.items():
        b = run["best"]
        rows.append([label, round(b["output_tok_s"]), f"{b['output_tok_s_min']:.0f}-{b['output_tok_s_max']:.0f}",
                     b["ttft_ms_p50"], b["ttft_ms_p99"], b["itl_ms_p50"], b["itl_ms_p99"], b["tpot_ms_p50"],
                     b["latency_ms_p50"], b["latency_ms_p99"], round(b["tokens_per_chunk"], 2),
                     round(b["tokens_per_read"], 2),
                     _cpu(b, "frontend"), _cpu(b, "worker-"), _cpu(b, "nats"), _cpu(b, "client"), b["errors"]])
    print_table(["config", "out tok/s", "range", "TTFT p50 ms", "TTFT p99", "ITL p50 ms", "ITL p99", "TPOT p50",
                 "latency p50 ms", "latency p99", "tok/chunk", "tok/read", "CPU us/tok: frontend", "workers", "nats",
                 "client", "errors"], rows)
    frontend_cpu = frontend_cpu_table(runs)
    if frontend_cpu:
        print()
        print(f"frontend CPU us per output token (median of {args.repeats} run(s)), mock tokenizer path")
        codes = [name for name, _ in _other_trees(args)] + ["current"]
        columns = [c for c in codes if any(c in row["us_per_token"] for row in frontend_cpu)]
        others = [c for c in columns if c != "current"] if "current" in columns else []
        print_table(["speedup", "chunking", "tok/chunk", *columns, *(f"current / {c}" for c in others)],
                    [[row["speedup"], row["chunking"], row["tokens_per_chunk"],
                      *(row["us_per_token"].get(c, "-") for c in columns),
                      *(row["current_over"].get(c, "-") for c in others)] for row in frontend_cpu])
    name = args.name
    workload = {"requests": args.requests, "concurrency": args.concurrency, "prompt_tokens": args.prompt_tokens,
                "output_tokens": args.output_tokens, "workers": args.workers, "repeats": args.repeats,
                "worker_args": args.worker_args, "chunking": args.chunking, "baseline_tree": args.baseline_tree,
                "trees": dict(_other_trees(args)), "client": "aiohttp + msgspec, same machine"}
    path = write_results(name, {"machine_note": args.machine, "workload": workload, "frontend_cpu_us_per_token": frontend_cpu, "results": runs},
                         args.results_dir)
    print(f"wrote {path}")
    png = args.results_dir / f"{name}.png"
    if plot(plotted, png):
        print(f"wrote {png}")
    failed = any(run["best"]["errors"] for run in runs.values())
    return 1 if failed else 0


def _other_trees(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(name, source tree) of the code measured besides the current one, in run order."""
    trees = [("baseline", args.baseline_tree)] if args.baseline_tree else []
    for entry in args.tree:
        name, sep, tree = entry.partition("=")
        if not sep or not name or not tree or name in ("current", "baseline"):
            raise SystemExit(f"--tree {entry!r}: expected NAME=DIR with NAME neither 'current' nor 'baseline'")
        trees.append((name, tree))
    return trees


def frontend_cpu_table(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (speedup, chunking): the frontend's CPU us per output token of each code tree
    (median over runs), the tokens per chunk of the current code, and current / each other tree."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for run in runs.values():
        if "chunking" not in run:
            continue
        row = rows.setdefault((run["speedup"], run["chunking"]), {
            "speedup": run["speedup"], "chunking": run["chunking"], "us_per_token": {}, "tokens_per_chunk": None})
        best = run["best"]
        row["us_per_token"][run["code"]] = best["frontend_cpu_us_per_token_median"]
        if run["code"] == "current":
            row["tokens_per_chunk"] = round(best["tokens_per_chunk"], 2)
    for row in rows.values():
        us = row["us_per_token"]
        row["current_over"] = {code: round(us["current"] / value, 2) for code, value in us.items()
                               if code != "current" and "current" in us and value}
        row["current_over_baseline"] = row["current_over"].get("baseline")
    return list(rows.values())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="", help="target a running frontend instead of starting a deployment")
    parser.add_argument("--model", default="mock-model")
    parser.add_argument("--api-key", default="")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=140, help="approximate prompt length in tokens")
    parser.add_argument("--output-tokens", type=int, default=64, help="max_tokens, with ignore_eos")
    parser.add_argument("--workers", type=int, default=2, help="mock workers in the deployment")
    parser.add_argument("--speedup", default="inf,1", help="comma-separated mock speedups, one deployment each")
    parser.add_argument("--repeats", type=int, default=1, help="measured runs per configuration (best is reported)")
    parser.add_argument("--chunking", default="coalesced,one",
                        help="comma-separated: coalesced (the frontend's normal SSE chunks) and/or one (one token "
                             "per chunk, DYNRT_FRONTEND_ONE_TOKEN_PER_CHUNK=1); one deployment each")
    parser.add_argument("--baseline-tree", default="",
                        help="also run every configuration with the code of this source tree (a checkout of "
                             "another commit), first, in the same run")
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=DIR",
                        help="also run every configuration with the code of this source tree, labelled NAME, after "
                             "the baseline (repeatable; e.g. the previous round's code)")
    parser.add_argument("--machine", default="", help="the machine, as the results should name it (e.g. '2-core VM "
                                                      "(AMD EPYC), quiet')")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="py-spy the frontend and workers in the first run")
    parser.add_argument("--profile-native", action="store_true", help="py-spy --native (C frames too)")
    parser.add_argument("--profile-dir", default=str(RESULTS_DIR / "serve-profiles"))
    parser.add_argument("--name", default="serve", help="results file name (RESULTS_DIR/NAME.json/.png)")
    add_results_dir_argument(parser)
    parser.add_argument("worker_args", nargs="*", help="after --: flags passed to every worker")
    return parser.parse_args(argv)


if __name__ == "__main__":
    options = parse_args()
    try:
        import uvloop

        sys.exit(uvloop.run(main(options)))
    except ImportError:
        sys.exit(asyncio.run(main(options)))
