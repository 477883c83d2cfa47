"""Resumable streams (issue 18): what a client whose frontend dies sees, and what the
checkpoints cost.

Real processes: etcd, nats-server with JetStream, two frontends, ``--workers`` mock
workers at speedup 1. ``--streams`` resumable streamed chat completions (seeded,
``--max-tokens`` each), half on each frontend; the clients (``harness.load`` in
resumable mode) resume a broken stream on the other frontend with ``Last-Event-ID``.

Runs:
- ``steady``: no fault. Checkpoint write load: JetStream messages and bytes per 1k output
  tokens (the frontends' ``dynrt_checkpoint_writes_total`` / ``..._write_bytes_total``).
- ``frontend``: once every stream is mid-answer, SIGKILL frontend 1. Its streams resume
  on frontend 2, reattached to their live workers.
- ``frontend+worker``: SIGKILL frontend 1 and, at once, the worker serving most of its
  streams: those continue from their JetStream checkpoints on other workers.

Per run: requests completed and identical to the uninterrupted answer (the mock
engine's output in process), streams resumed, and the resume gap of each resumed stream —
from the last event the client read before the kill to the first event after it —
p50/p99/max. JSON in ``benchmarks/results/resume.json``, a plot in ``resume.png``.

    python -m benchmarks.resume [--streams 32] [--max-tokens 400] [--workers 4]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.common import add_results_dir_argument, options_of, print_table, pyplot, write_results
from harness.deployment import Deployment
from harness.load import Load, Stream
from harness.metrics import parse_metrics
from harness.reference import matches, references
from harness.stats import percentile

RUNS = ("steady", "frontend", "frontend+worker")


async def checkpoint_totals(http: aiohttp.ClientSession, urls: list[str]) -> dict[str, float]:
    """Checkpoint messages and bytes written, summed over the frontends at ``urls``."""
    totals = {"messages": 0.0, "bytes": 0.0}
    for url in urls:
        async with http.get(f"{url}/metrics") as response:
            samples = parse_metrics(await response.text())
        for (name, _), value in samples.items():
            if name == "dynrt_checkpoint_writes_total":
                totals["messages"] += value
            elif name == "dynrt_checkpoint_write_bytes_total":
                totals["bytes"] += value
    return totals


def resume_gap(stream: Stream, killed_at: float) -> tuple[float, float, float] | None:
    """Seconds from the stream's last content chunk before its connection broke to its
    first after the resume, and two parts of it: from the kill to the client's resume request, and from that
    request to the first chunk it got (the rest is the time between the last chunk
    and the kill)."""
    if not stream.resumes or not stream.resumed_at:
        return None
    # Split at the resume request, not at the kill: chunks the dying frontend had already
    # sent still arrive after the kill signal, before the client sees its connection break.
    resumed = stream.resumed_at[0]
    before = [t for t in stream.chunk_times if t <= resumed]
    after = [t for t in stream.chunk_times if t > resumed]
    if not before or not after:
        return None
    return after[0] - before[-1], stream.resumed_at[0] - killed_at, after[0] - stream.resumed_at[0]


async def serving_most(d: Deployment, http: aiohttp.ClientSession) -> Any:
    """The live worker with the most requests in flight."""
    best, most = None, -1
    for worker in d.live_workers():
        async with http.get(worker.health_url) as response:
            in_flight = (await response.json()).get("in_flight", 0)
        if in_flight > most:
            best, most = worker, in_flight
    return best


async def run_once(name: str, args: argparse.Namespace) -> dict[str, Any]:
    log_dir = Path(tempfile.mkdtemp(prefix="dynrt-resume-bench-"))
    async with Deployment(log_dir, workers=args.workers, frontends=2, speedup=1,
                          frontend_args=["--log-level", args.frontend_log_level],
                          worker_args=["--log-level", "warning"]) as d:
        assert d.http is not None
        urls = d.urls
        before = await checkpoint_totals(d.http, urls)
        load = Load(urls, requests=args.streams, concurrency=args.streams, max_tokens=args.max_tokens,
                    tag="resume", request_timeout=300, resumable=True)
        task = load.start()
        killed_at = float("nan")
        killed: list[str] = []
        if name != "steady":
            await load.wait_streaming(args.streams, min_chunks=args.kill_after_chunks, timeout=120)
            frontend = d.frontends[0]
            worker = await serving_most(d, d.http) if name == "frontend+worker" else None
            killed_at = time.monotonic()
            frontend.kill()
            killed.append("frontend1")
            if worker is not None:
                worker.kill()
                killed.append("worker")
        streams = await asyncio.wait_for(task, 300)
        survivors = [f.url for f in d.frontends if f.alive()]
        after = await checkpoint_totals(d.http, survivors)
    refs = await references(streams)
    measured = [g for s in streams if (g := resume_gap(s, killed_at)) is not None]
    gaps = [g[0] * 1000 for g in measured]
    to_resume = [g[1] * 1000 for g in measured]
    served = [g[2] * 1000 for g in measured]
    chunks = sum(len(s.chunk_times) for s in streams)
    output_tokens = sum((s.usage or {}).get("completion_tokens", 0) for s in streams)
    result: dict[str, Any] = {
        "run": name,
        "killed": killed,
        "streams": args.streams,
        "completed": sum(1 for s in streams if s.ok),
        "failed": sum(1 for s in streams if s.failed),
        "errors": sorted({s.error.split(":")[0] for s in streams if s.error}),
        "identical": sum(1 for s in streams if s.ok and matches(s, refs[s.index])),
        "resumed": sum(1 for s in streams if s.resumes),
        "resume_gap_ms_p50": percentile(gaps, 50),
        "resume_gap_ms_p99": percentile(gaps, 99),
        "resume_gap_ms_max": max(gaps, default=float("nan")),
        "resume_gaps_ms": sorted(round(g, 1) for g in gaps),
        # the parts: kill -> the client's resume request; that request -> its first chunk
        "kill_to_resume_request_ms_p50": percentile(to_resume, 50),
        "resume_request_to_first_chunk_ms_p50": percentile(served, 50),
        "resume_request_to_first_chunk_ms_p99": percentile(served, 99),
        "output_tokens": output_tokens,
        "content_chunks": chunks,
        "logs": str(log_dir),
    }
    if name == "steady":  # both frontends ran throughout: their counters are the whole load
        messages, data = after["messages"] - before["messages"], after["bytes"] - before["bytes"]
        result["checkpoint_messages_per_1k_tokens"] = messages / output_tokens * 1000
        result["checkpoint_kib_per_1k_tokens"] = data / 1024 / output_tokens * 1000
    return result


def plot(runs: list[dict[str, Any]], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    faulted = [r for r in runs if r["resume_gaps_ms"]]
    if not faulted:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in faulted:
        gaps = r["resume_gaps_ms"]
        ax.plot(gaps, [(i + 1) / len(gaps) for i in range(len(gaps))], marker=".", label=r["run"])
    ax.set_xlabel("resume gap (ms): last event before the kill → first after")
    ax.set_ylabel("fraction of resumed streams")
    ax.set_title("Resumable streams: client-visible gap when its frontend is SIGKILLed")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return True


async def main(args: argparse.Namespace) -> None:
    runs = [await run_once(name, args) for name in args.runs.split(",")]
    print_table(["run", "completed", "identical", "resumed", "gap p50 ms", "gap p99 ms", "gap max ms",
                 "kill→resume p50", "resume→chunk p50/p99", "ckpt msgs/1k tok", "ckpt KiB/1k tok"],
                [[r["run"], f"{r['completed']}/{r['streams']}", r["identical"], r["resumed"],
                  round(r["resume_gap_ms_p50"], 1), round(r["resume_gap_ms_p99"], 1), round(r["resume_gap_ms_max"], 1),
                  round(r["kill_to_resume_request_ms_p50"], 1),
                  f"{r['resume_request_to_first_chunk_ms_p50']:.1f}/{r['resume_request_to_first_chunk_ms_p99']:.1f}",
                  round(r.get("checkpoint_messages_per_1k_tokens", float("nan")), 1),
                  round(r.get("checkpoint_kib_per_1k_tokens", float("nan")), 1)] for r in runs])
    path = write_results("resume", {"options": options_of(args), "runs": runs}, args.results_dir)
    print(f"results: {path}")
    if plot(runs, args.results_dir / "resume.png"):
        print(f"plot: {args.results_dir / 'resume.png'}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=400)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--kill-after-chunks", type=int, default=40, help="kill once every stream has this many chunks")
    parser.add_argument("--frontend-log-level", default="warning", help="info: resume and reattach events in the logs")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    add_results_dir_argument(parser)
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
