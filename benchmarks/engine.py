"""Mock engine benchmark, in process (no NATS, no HTTP).

1. Throughput at ``--speedup inf``: output tokens/s with 1, 16 and 64 concurrent
   streams (128-token prompts, 128 output tokens), each stream consumed by its own task
   as a worker would.
2. Timing model at speedup 1: every step's measured wall time against the formula,
   separately for prefill-only, decode-only and mixed steps.

Prints a table and writes ``benchmarks/results/engine.json``.

    .venv/bin/python benchmarks/engine.py [--loop uvloop|asyncio] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from dynrt.runtime.mock_tokenizer import mock_tokenizer
from dynrt.runtime.protocol import GenerateRequest, SamplingParams
from dynrt.worker.mock_engine import MockEngine, MockEngineConfig, StepTiming

RESULTS = Path(__file__).resolve().parent / "results" / "engine.json"


class ThroughputResult(msgspec.Struct, kw_only=True):
    """Output tokens/s of the engine at speedup inf for one concurrency level."""

    concurrency: int
    requests: int
    prompt_tokens: int
    output_tokens: int
    batches: int
    seconds: float
    tokens_per_s: float
    steps: int
    mean_step_us: float


class TimingResult(msgspec.Struct, kw_only=True):
    """Measured step times vs the timing model for one kind of step at speedup 1."""

    workload: str
    kind: str
    steps: int
    mean_model_ms: float
    mean_measured_ms: float
    mean_abs_error_pct: float
    mean_error_pct: float
    total_error_pct: float


class Report(msgspec.Struct, kw_only=True):
    machine: dict[str, object]
    loop: str
    throughput: list[ThroughputResult]
    timing: list[TimingResult]


def _prompt(rng: random.Random, n: int) -> list[int]:
    vocab = mock_tokenizer().sampleable_ids
    return [rng.choice(vocab) for _ in range(n)]


async def _run_requests(
    engine: MockEngine, prompts: list[list[int]], max_tokens: int, concurrency: int
) -> tuple[int, int]:
    """Run every prompt through the engine, ``concurrency`` at a time; returns the
    number of output tokens and of token batches the consumers received."""
    queue = list(enumerate(prompts))
    produced = 0
    batches = 0

    async def stream() -> None:
        nonlocal produced, batches
        while queue:
            i, ids = queue.pop()
            request = GenerateRequest(
                request_id=f"r{i}",
                model="mock-model",
                token_ids=ids,
                sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
            )
            async for batch in engine.generate(request):
                produced += len(batch.token_ids)
                batches += 1

    await asyncio.gather(*(stream() for _ in range(concurrency)))
    return produced, batches


async def throughput(concurrency: int, requests: int, prompt_tokens: int = 128, output_tokens: int = 128) -> ThroughputResult:
    rng = random.Random(concurrency)
    prompts = [_prompt(rng, prompt_tokens) for _ in range(requests)]
    engine = MockEngine(MockEngineConfig(speedup=math.inf))
    await engine.start()
    try:
        start = time.perf_counter()
        produced, batches = await _run_requests(engine, prompts, output_tokens, concurrency)
        seconds = time.perf_counter() - start
    finally:
        await engine.shutdown()
    assert produced == requests * output_tokens
    return ThroughputResult(
        concurrency=concurrency,
        requests=requests,
        prompt_tokens=prompt_tokens,
        output_tokens=produced,
        batches=batches,
        seconds=seconds,
        tokens_per_s=produced / seconds,
        steps=engine.num_steps,
        mean_step_us=seconds / engine.num_steps * 1e6,
    )


_KINDS: dict[str, Callable[[StepTiming], bool]] = {
    "prefill": lambda s: s.prefill_tokens > 0 and s.decode_seqs == 0,
    "decode": lambda s: s.prefill_tokens == 0 and s.decode_seqs > 0,
    "mixed": lambda s: s.prefill_tokens > 0 and s.decode_seqs > 0,
}


def _timing_rows(workload: str, log: list[StepTiming]) -> list[TimingResult]:
    rows = []
    for kind, keep in _KINDS.items():
        steps = [s for s in log if keep(s)]
        if not steps:
            continue
        errors = [(s.measured_ms - s.model_ms) / s.model_ms * 100 for s in steps]
        rows.append(
            TimingResult(
                workload=workload,
                kind=kind,
                steps=len(steps),
                mean_model_ms=statistics.fmean(s.model_ms for s in steps),
                mean_measured_ms=statistics.fmean(s.measured_ms for s in steps),
                mean_abs_error_pct=statistics.fmean(abs(e) for e in errors),
                mean_error_pct=statistics.fmean(errors),
                total_error_pct=(sum(s.measured_ms for s in steps) / sum(s.model_ms for s in steps) - 1) * 100,
            )
        )
    return rows


async def timing() -> list[TimingResult]:
    rng = random.Random(0)
    rows: list[TimingResult] = []

    # Prefill-heavy: long prompts, one output token, one at a time; prompt lengths
    # up to twice the token budget so chunked steps of the full budget appear too.
    engine = MockEngine(MockEngineConfig(speedup=1.0, max_num_batched_tokens=4096))
    await engine.start()
    try:
        prompts = [_prompt(rng, rng.randint(256, 8000)) for _ in range(40)]
        await _run_requests(engine, prompts, 1, 1)
        rows += _timing_rows("prefill-heavy", list(engine.step_log))
    finally:
        await engine.shutdown()

    # Decode-heavy: 64 streams of 256 tokens in a 2048-block cache, so KV usage
    # sweeps from ~0 to ~0.5 and the decode fit's quadratic term matters.
    engine = MockEngine(MockEngineConfig(speedup=1.0, num_blocks=2048))
    await engine.start()
    try:
        prompts = [_prompt(rng, 16) for _ in range(64)]
        await _run_requests(engine, prompts, 256, 64)
        rows += _timing_rows("decode-heavy", list(engine.step_log))
    finally:
        await engine.shutdown()
    return rows


def machine_facts() -> dict[str, object]:
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


async def main_async(loop_name: str) -> Report:
    rows = [await throughput(c, requests) for c, requests in ((1, 64), (16, 512), (64, 2048))]
    return Report(machine=machine_facts(), loop=loop_name, throughput=rows, timing=await timing())


def print_report(report: Report) -> None:
    print(f"mock engine, {report.loop} loop, {report.machine['cpu_count']} CPUs, Python {report.machine['python']}")
    print()
    print("throughput at speedup inf (128-token prompts, 128 output tokens)")
    print(
        f"{'concurrency':>11} {'requests':>8} {'tokens':>8} {'tok/batch':>9} {'seconds':>8} "
        f"{'tokens/s':>10} {'us/step':>8}"
    )
    for t in report.throughput:
        print(
            f"{t.concurrency:>11} {t.requests:>8} {t.output_tokens:>8} {t.output_tokens / t.batches:>9.2f} "
            f"{t.seconds:>8.3f} {t.tokens_per_s:>10,.0f} {t.mean_step_us:>8.1f}"
        )
    print()
    print("timing model at speedup 1: measured step time vs formula")
    print(
        f"{'workload':>13} {'kind':>7} {'steps':>6} {'model ms':>9} {'measured':>9} "
        f"{'MAE %':>6} {'bias %':>7} {'total %':>8}"
    )
    for r in report.timing:
        print(
            f"{r.workload:>13} {r.kind:>7} {r.steps:>6} {r.mean_model_ms:>9.2f} {r.mean_measured_ms:>9.2f} "
            f"{r.mean_abs_error_pct:>6.2f} {r.mean_error_pct:>+7.2f} {r.total_error_pct:>+8.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        report = uvloop.run(main_async(args.loop))
    else:
        report = asyncio.run(main_async(args.loop))
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(msgspec.json.format(msgspec.json.encode(report)) + b"\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
