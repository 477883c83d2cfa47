"""Migration under fire: long streams over 4 mock workers while a serving worker is
killed every few seconds (SIGKILL, then a run with SIGSTOP) and restarted.

Reports, per run: requests completed/failed, outputs identical to the uninterrupted
answer (computed by the mock engine in process), and the client-visible token gap of
every migrated stream (time between the last chunk before the failure and the first
after it), p50/p99/max, and per kill. JSON in ``benchmarks/results/migration.json``,
a plot of the gap per kill in ``migration.png``.

    python -m benchmarks.migration [--requests 200] [--concurrency 32] [--kill-every 3]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.common import RESULTS_DIR, SseStream, percentile, print_table, write_results
from benchmarks.serve import Deployment
from dynrt.runtime.embedded import EmbeddedServers, die_with_parent_argv
from dynrt.runtime.mock_tokenizer import mock_tokenizer
from dynrt.runtime.protocol import GenerateRequest, SamplingParams
from dynrt.worker.mock_engine import MockEngine, MockEngineConfig


@dataclass
class Stream:
    index: int
    seed: int
    text: str = ""
    ok: bool = False
    error: str = ""
    request_id: str = ""
    chunk_times: list[float] = field(default_factory=list)


def messages(index: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"story number {index}: tell me about the river city and the worker"}]


async def references(count: int, max_tokens: int) -> list[str]:
    tokenizer = mock_tokenizer()
    engine = MockEngine(MockEngineConfig(speedup=float("inf")))
    await engine.start()
    texts = []
    for i in range(count):
        ids: list[int] = []
        request = GenerateRequest(request_id=f"ref{i}", model="mock-model",
                                  token_ids=tokenizer.apply_chat_template(messages(i)),
                                  sampling=SamplingParams(max_tokens=max_tokens, seed=i, ignore_eos=True,
                                                          stop_token_ids=[2, 7]))
        async for batch in engine.generate(request):
            ids.extend(batch.token_ids)
        texts.append(tokenizer.decode(ids))
    await engine.shutdown()
    return texts


async def one_stream(session: aiohttp.ClientSession, url: str, stream: Stream, max_tokens: int) -> None:
    body = {"model": "mock-model", "messages": messages(stream.index), "max_tokens": max_tokens, "seed": stream.seed,
            "ignore_eos": True, "stream": True}
    # The send time counts as the first "chunk": a stream that fails before its first
    # token shows its whole wait as the gap.
    stream.chunk_times.append(time.monotonic())
    try:
        async with session.post(f"{url}/v1/chat/completions", json=body) as response:
            if response.status != 200:
                stream.error = f"HTTP {response.status}"
                return
            async for chunk in SseStream(response):
                if "error" in chunk:
                    stream.error = chunk["error"].get("code") or "error"
                    return
                stream.request_id = chunk.get("id", stream.request_id)
                for choice in chunk["choices"]:
                    if choice["delta"].get("content"):
                        stream.text += choice["delta"]["content"]
                        stream.chunk_times.append(time.monotonic())
        stream.ok = True
    except aiohttp.ClientError as exc:
        stream.error = type(exc).__name__


class Chaos:
    """Every ``every`` seconds: pick a worker with requests in flight, signal it, and
    replace it (SIGKILL: start a new one; SIGSTOP: SIGCONT after the stall, then
    SIGTERM it and start a new one)."""

    def __init__(self, deployment: Deployment, sig: int, every: float) -> None:
        self.deployment = deployment
        self.sig = sig
        self.every = every
        self.kills: list[float] = []

    async def run(self, stop: asyncio.Event) -> None:
        rng = random.Random(1)
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.every)
                return
            except asyncio.TimeoutError:
                pass
            names = [n for n in self.deployment.procs if n.startswith("worker")]
            victim = rng.choice(names)
            proc = self.deployment.procs[victim]
            self.kills.append(time.monotonic())
            proc.send_signal(self.sig)
            if self.sig == signal.SIGSTOP:
                await asyncio.sleep(3.0)
                proc.send_signal(signal.SIGCONT)
                proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(proc.wait)
            with open(self.deployment.log_dir / f"{victim}.log", "ab") as log_file:
                self.deployment.procs[victim] = subprocess.Popen(
                    die_with_parent_argv(self.deployment.argvs[victim]), stdout=log_file, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True)


async def run_once(sig: int, args: argparse.Namespace, refs: list[str]) -> dict[str, Any]:
    log_dir = Path(tempfile.mkdtemp(prefix="dynrt-migration-bench-"))
    servers = EmbeddedServers(log_dir)
    servers.start()
    deployment = Deployment(servers, args.workers, "1", "bench", log_dir, ["--drain-timeout", "1"])
    deployment.start()
    streams = [Stream(i, i) for i in range(args.requests)]
    chaos = Chaos(deployment, sig, args.kill_every)
    stop = asyncio.Event()
    try:
        chaos_task = asyncio.create_task(chaos.run(stop))
        semaphore = asyncio.Semaphore(args.concurrency)
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async def bounded(stream: Stream) -> None:
                async with semaphore:
                    await one_stream(session, deployment.url, stream, args.max_tokens)

            started = time.monotonic()
            await asyncio.gather(*(bounded(s) for s in streams))
            wall = time.monotonic() - started
        stop.set()
        await chaos_task
    finally:
        deployment.stop()
        servers.stop()
    # Which streams migrated, from the frontend's log (one line per migration).
    migrated: dict[str, list[str]] = {}
    for line in (log_dir / "frontend.log").read_text(errors="replace").splitlines():
        if "event=migrating" in line:
            fields = dict(p.split("=", 1) for p in line.split() if "=" in p)
            migrated.setdefault(fields["request_id"], []).append(fields["cause"])
    gaps: list[float] = []
    per_kill: dict[int, list[float]] = {}
    for stream in streams:
        if stream.request_id not in migrated or len(stream.chunk_times) < 2:
            continue
        intervals = list(zip(stream.chunk_times, stream.chunk_times[1:]))
        start, end = max(intervals, key=lambda ab: ab[1] - ab[0])
        gap = end - start
        gaps.append(gap * 1000)
        kill = max((k for k, t in enumerate(chaos.kills) if t <= end), default=-1)
        per_kill.setdefault(kill, []).append(gap * 1000)
    identical = sum(1 for s in streams if s.ok and s.text == refs[s.index])
    return {
        "signal": signal.Signals(sig).name,
        "requests": args.requests,
        "completed": sum(1 for s in streams if s.ok),
        "failed": sum(1 for s in streams if not s.ok),
        "errors": sorted({s.error for s in streams if s.error}),
        "identical": identical,
        "faults": len(chaos.kills),
        "migrated_streams": len(gaps),
        "migration_causes": {c: sum(v.count(c) for v in migrated.values()) for c in
                             sorted({c for v in migrated.values() for c in v})},
        "gap_ms_p50": percentile(gaps, 50),
        "gap_ms_p99": percentile(gaps, 99),
        "gap_ms_max": max(gaps, default=float("nan")),
        "gap_ms_per_kill": {str(k): {"streams": len(v), "p50": percentile(v, 50), "max": max(v)}
                            for k, v in sorted(per_kill.items())},
        "wall_seconds": wall,
        "logs": str(log_dir),
    }


def plot(runs: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
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
    refs = await references(args.requests, args.max_tokens)
    runs = [await run_once(sig, args, refs) for sig in (signal.SIGKILL, signal.SIGSTOP)]
    print_table(["signal", "faults", "completed", "failed", "identical", "migrated", "gap p50 ms", "gap p99 ms", "gap max ms"],
                [[r["signal"], r["faults"], r["completed"], r["failed"], r["identical"], r["migrated_streams"],
                  r["gap_ms_p50"], r["gap_ms_p99"], r["gap_ms_max"]] for r in runs])
    path = write_results("migration", {"config": vars(args), "runs": runs})
    print(f"wrote {path}")
    if plot(runs, RESULTS_DIR / "migration.png"):
        print(f"wrote {RESULTS_DIR / 'migration.png'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=300)
    parser.add_argument("--kill-every", type=float, default=3.0)
    asyncio.run(main(parser.parse_args()))
