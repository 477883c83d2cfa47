"""Router decision latency at scale: 64 simulated instances, ~1M indexed KV blocks.

The index is built the way a router builds it — ``RouterState.on_kv_events`` with
``KvBlockStored`` batches of real chained block hashes — from a prefix-heavy cache
layout: every instance holds conversations of ``--conv-blocks`` blocks, each starting
with one of ``--system-prompts`` shared system prompts; ``--replicated`` of the
conversations are also cached on a second instance (re-routed or migrated turns).

Requests are ``--prompt-tokens`` long and mix realistic overlaps:

* ``continue`` (50 %): the next turn of a cached conversation — most of the prompt is
  cached on one or two instances;
* ``system`` (30 %): a new conversation behind a shared system prompt — its first blocks
  are cached on many instances;
* ``cold`` (20 %): nothing cached.

Every instance has a load report and some pending assignments, so the full cost and
load-shedding path runs. One decision = ``Router.choose`` on the token ids, *including*
hashing the prompt into blocks. Hashing and the index lookup are also timed alone.

Prints a table and writes ``benchmarks/results/routing_decision.json``.

    python -m benchmarks.routing_decision [--blocks 1000000] [--requests 5000]
"""

from __future__ import annotations

import argparse
import gc
import platform
import random
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable

import msgspec

from benchmarks.common import add_results_dir_argument, options_of, print_table, write_results
from dynrt.router.policies import Choice, Router, RouterState
from dynrt.runtime.block_hash import block_hashes
from dynrt.runtime.protocol import (
    CachedBlocks,
    InstanceRecord,
    KvBlockStored,
    KvEvent,
    KvEventBatch,
    LoadReport,
    TokenizerSpec,
)
from harness.stats import percentile

MODEL = "bench-model"
VOCAB = 32_000


class Layout:
    """Deterministic token content: system prompts and conversations by number."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.block_size: int = args.block_size
        self.system_tokens = args.system_blocks * args.block_size
        self.conv_tokens = (args.conv_blocks - args.system_blocks) * args.block_size
        self.systems = [self._tokens(("sys", s), self.system_tokens) for s in range(args.system_prompts)]

    @staticmethod
    def _tokens(seed: object, n: int) -> list[int]:
        rng = random.Random(str(seed))
        return [rng.randrange(VOCAB) for _ in range(n)]

    def conversation(self, conv: int, system: int) -> list[int]:
        return self.systems[system] + self._tokens(("conv", conv), self.conv_tokens)

    def fresh(self, key: object, n: int) -> list[int]:
        return self._tokens(("fresh", key), n)


def record(i: int, block_size: int) -> InstanceRecord:
    return InstanceRecord(
        instance_id=f"worker-{i:02d}",
        namespace="bench",
        component="backend",
        endpoint="generate",
        model=MODEL,
        subject=f"dynrt.bench.backend.generate.worker-{i:02d}",
        engine="mock",
        block_size=block_size,
        kv_blocks_total=1 << 20,
        context_length=32_768,
        max_num_seqs=256,
        tokenizer=TokenizerSpec(),
    )


def build_events(args: argparse.Namespace, layout: Layout) -> tuple[list[KvEventBatch], list[tuple[int, int, list[str]]]]:
    """One ``KvBlockStored`` batch per cached conversation; returns the batches and the
    conversations ``(conv, system, holders)`` so requests can continue them."""
    rng = random.Random(args.seed)
    per_instance_new = args.conv_blocks - args.system_blocks
    n_convs = max(1, round(args.blocks / per_instance_new))
    next_event = [1] * args.instances
    batches: list[KvEventBatch] = []
    convs: list[tuple[int, int, list[str]]] = []
    for conv in range(n_convs):
        system = rng.randrange(args.system_prompts)
        hashes = block_hashes(layout.conversation(conv, system), args.block_size)
        first = conv % args.instances
        holders = [first]
        if rng.random() < args.replicated:
            holders.append((first + 1 + rng.randrange(args.instances - 1)) % args.instances)
        for i in holders:
            event = KvEvent(event_id=next_event[i], data=KvBlockStored(block_hashes=hashes))
            next_event[i] += 1
            batches.append(KvEventBatch(instance_id=f"worker-{i:02d}", model=MODEL, events=[event]))
        convs.append((conv, system, [f"worker-{i:02d}" for i in holders]))
    return batches, convs


def new_state(args: argparse.Namespace) -> RouterState:
    state = RouterState()
    for i in range(args.instances):
        state.add_instance(record(i, args.block_size))
        state.on_resync(CachedBlocks(instance_id=f"worker-{i:02d}", block_hashes=[], last_event_id=0))
    return state


def build_index(state: RouterState, batches: list[KvEventBatch]) -> float:
    """Apply every batch; returns seconds."""
    start = time.perf_counter()
    for batch in batches:
        if state.on_kv_events(batch):
            raise RuntimeError(f"unexpected resync request from {batch.instance_id}")
    return time.perf_counter() - start


def index_memory(args: argparse.Namespace, layout: Layout) -> int:
    """Bytes the index keeps alive once the events that built it are gone (tracemalloc
    over a second build: the hash ints, the holder dict and the per-instance sets)."""
    batches, _ = build_events(args, layout)
    gc.collect()
    tracemalloc.start()
    state = new_state(args)
    base = tracemalloc.get_traced_memory()[0]
    build_index(state, batches)
    del batches
    gc.collect()
    # The hash ints were allocated before tracing; add them explicitly (one int object
    # per distinct hash, 32 bytes each for 63-bit values).
    held = tracemalloc.get_traced_memory()[0] - base + len(state.index) * sys.getsizeof(1 << 62)
    tracemalloc.stop()
    return held


def make_requests(args: argparse.Namespace, layout: Layout, convs: list[tuple[int, int, list[str]]]) -> list[tuple[str, list[int]]]:
    rng = random.Random(args.seed + 1)
    n = args.prompt_tokens
    requests: list[tuple[str, list[int]]] = []
    for k in range(args.requests):
        r = rng.random()
        if r < 0.5:
            conv, system, _ = rng.choice(convs)
            history = layout.conversation(conv, system)
            keep = rng.randrange(len(history) * 3 // 4, len(history))  # where the new turn starts
            tokens = history[:keep] + layout.fresh(k, max(0, n - keep))
            requests.append(("continue", tokens[:n]))
        elif r < 0.8:
            system = rng.randrange(args.system_prompts)
            requests.append(("system", layout.systems[system] + layout.fresh(k, n - layout.system_tokens)))
        else:
            requests.append(("cold", layout.fresh(k, n)))
    return requests


def load_pool(state: RouterState, args: argparse.Namespace) -> None:
    """Moderate load everywhere (nobody busy) and a few pending assignments each."""
    rng = random.Random(args.seed + 2)
    total = 1 << 20
    for i in range(args.instances):
        iid = f"worker-{i:02d}"
        state.on_load(
            LoadReport(
                instance_id=iid,
                model=MODEL,
                kv_blocks_used=rng.randrange(total // 10, total // 2),
                kv_blocks_total=total,
                running=rng.randrange(8, 64),
                waiting=rng.randrange(0, 4),
                active_prefill_tokens=rng.randrange(0, 8192),
                timestamp=time.time(),
            )
        )
        for j in range(rng.randrange(0, 4)):
            state.on_assigned(iid, f"{iid}-pending-{j}", 128, 64)


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    """p50/p99/p99.9/max/mean in microseconds."""
    us = [ns / 1000 for ns in samples_ns]
    return {
        "p50_us": percentile(us, 50),
        "p99_us": percentile(us, 99),
        "p999_us": percentile(us, 99.9),
        "max_us": max(us),
        "mean_us": statistics.fmean(us),
    }


def timed(fn: Callable[[], object], repeat: int) -> list[int]:
    samples: list[int] = []
    clock = time.perf_counter_ns
    for _ in range(repeat):
        t0 = clock()
        fn()
        samples.append(clock() - t0)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=1_000_000, help="distinct conversation blocks to index")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--conv-blocks", type=int, default=128, help="blocks per cached conversation")
    parser.add_argument("--system-blocks", type=int, default=32, help="blocks of each shared system prompt")
    parser.add_argument("--system-prompts", type=int, default=16)
    parser.add_argument("--replicated", type=float, default=0.1, help="share of conversations cached twice")
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true", help="skip the (slower) traced memory build")
    add_results_dir_argument(parser)
    args = parser.parse_args()

    layout = Layout(args)
    t0 = time.perf_counter()
    batches, convs = build_events(args, layout)
    gen_s = time.perf_counter() - t0
    stored_hashes = sum(len(b.events[0].data.block_hashes) for b in batches)  # type: ignore[union-attr]

    state = new_state(args)
    build_s = build_index(state, batches)
    del batches
    distinct = len(state.index)
    entries = sum(state.index.blocks_of(f"worker-{i:02d}") for i in range(args.instances))

    load_pool(state, args)
    router = Router(state, rng=random.Random(args.seed))
    requests = make_requests(args, layout, convs)

    # Warm up, then time each decision on its own.
    for _, tokens in requests[:200]:
        router.choose(MODEL, tokens)
    by_kind: dict[str, list[int]] = {}
    all_ns: list[int] = []
    hash_ns: list[int] = []
    lookup_ns: list[int] = []
    overlaps: list[int] = []
    clock = time.perf_counter_ns
    for kind, tokens in requests:
        t0 = clock()
        choice = router.choose(MODEL, tokens)
        dt = clock() - t0
        assert isinstance(choice, Choice)
        overlaps.append(choice.overlap_blocks)
        all_ns.append(dt)
        by_kind.setdefault(kind, []).append(dt)
        hashes = block_hashes(tokens, args.block_size)
        hash_ns += timed(lambda: block_hashes(tokens, args.block_size), 1)
        lookup_ns += timed(lambda: state.index.overlaps(hashes), 1)

    memory = None if args.no_memory else index_memory(args, layout)

    results = {
        "runtime": {"implementation": platform.python_implementation(), "msgspec": msgspec.__version__},
        "params": options_of(args),
        "index": {
            "distinct_blocks": distinct,
            "instance_block_entries": entries,
            "event_batches": len(convs) + sum(len(c[2]) - 1 for c in convs),
            "build_s": build_s,
            "stored_hashes_in_events": stored_hashes,
            "build_hashes_per_s": stored_hashes / build_s,
            "event_generation_s": gen_s,
            "memory_bytes": memory,
            "memory_bytes_per_distinct_block": memory / distinct if memory else None,
        },
        "decision": percentiles(all_ns),
        "decision_by_kind": {k: percentiles(v) | {"n": len(v)} for k, v in sorted(by_kind.items())},
        "prompt_hashing": percentiles(hash_ns),
        "index_lookup": percentiles(lookup_ns),
        "mean_overlap_blocks_chosen": statistics.fmean(overlaps),
        "prompt_blocks": args.prompt_tokens // args.block_size,
        "target_p99_us": 1000.0,
        "meets_target": percentiles(all_ns)["p99_us"] < 1000.0,
    }
    path = write_results("routing_decision", results, args.results_dir)

    print(f"index: {distinct:,} distinct blocks, {entries:,} (instance, block) entries, {args.instances} instances")
    print(f"  build from events: {build_s:.2f} s ({stored_hashes:,} stored hashes, {stored_hashes / build_s:,.0f}/s)")
    if memory:
        print(f"  memory held: {memory / 2**20:,.0f} MiB ({memory / distinct:.0f} B per distinct block)")
    print(f"requests: {args.requests} x {args.prompt_tokens} tokens ({args.prompt_tokens // args.block_size} blocks)")
    rows = [("decision (all)", results["decision"])]
    rows += [(f"  {k} (n={v['n']})", v) for k, v in results["decision_by_kind"].items()]
    rows += [("prompt hashing", results["prompt_hashing"]), ("index lookup", results["index_lookup"])]
    keys = ("p50_us", "p99_us", "p999_us", "max_us", "mean_us")
    print_table(["µs", *keys], [[name, *(f"{p[k]:.1f}" for k in keys)] for name, p in rows])
    print(f"target p99 < 1000 µs: {'met' if results['meets_target'] else 'MISSED'}; results in {path}")


if __name__ == "__main__":
    main()
