"""Checkpoint write load of resumable streams (issue 18): JetStream messages and bytes
per 1k generated tokens, for concurrent streams whose tokens arrive at a steady rate,
under several write policies (runtime/checkpoint_log.py), with a real nats-server
(JetStream, file store) and the real ``CheckpointWriter``. Also how long a resume's
read of a checkpoint takes (``CheckpointStore.load``, once per stream mid-way).

    python -m benchmarks.checkpoint [--streams 64] [--tokens 500] [--prompt 1000]
                                    [--rate 50] [--speedup 4]

``--speedup`` compresses time: tokens arrive ``speedup`` times faster and every policy
interval (and the grace period) is divided by it, so each stream makes the same writes
as in real time, in a fraction of the wall time. Token ids are random below 150k (a
real vocabulary's size: 5 msgpack bytes each, as most real ids take).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import add_results_dir_argument, options_of, print_table, pyplot, write_results
from dynrt.runtime.checkpoint_log import CheckpointPolicy, api_key_hash
from dynrt.runtime.embedded import NatsServer
from dynrt.runtime.protocol import SamplingParams, StreamCheckpoint
from dynrt.runtime.stream_checkpoints import CheckpointStore, CheckpointWriter
from dynrt.runtime.transport import NatsTransport
from harness.stats import percentile

VOCAB = 150_000


@dataclass(frozen=True)
class Variant:
    name: str
    interval: float  # seconds, real time
    max_deltas: int  # 0 = the full state on every write; -1 = no checkpoints (the baseline)


VARIANTS = [
    Variant("none", 0.0, -1),
    Variant("deltas@0.2s", 0.2, 32),
    Variant("full@0.2s", 0.2, 0),
    Variant("deltas@0.1s", 0.1, 32),
    Variant("deltas@0.5s", 0.5, 32),
]


@dataclass
class SimulatedStream:
    checkpoint: StreamCheckpoint
    starts_at: float
    sent: int = 0  # tokens (= events) sent so far
    writer: CheckpointWriter | None = None


async def drive_streams(store: CheckpointStore, args: argparse.Namespace, load_times: list[float],
                        write: bool) -> None:
    """Every stream gets a token each 1/rate s (compressed by the speedup), one event per
    token, checkpointed as a frontend would; one ticking loop for all streams, so the
    simulation itself costs little CPU."""
    rng = random.Random(1)
    now = time.monotonic()
    streams = []
    for index in range(args.streams):
        request_id = f"cmpl-{rng.getrandbits(96):024x}"
        checkpoint = StreamCheckpoint(
            request_id=request_id, key_hash=api_key_hash(request_id, "sk-bench"), model="bench-model",
            prompt_token_ids=[rng.randrange(VOCAB) for _ in range(args.prompt)],
            sampling=SamplingParams(max_tokens=args.tokens, temperature=0.7, seed=index), instance_id="w1")
        streams.append(SimulatedStream(checkpoint, now + index * args.stagger / args.streams / args.speedup))
    gap = 1.0 / (args.rate * args.speedup)
    background: list[asyncio.Task[None]] = []

    async def load(stream: SimulatedStream) -> None:
        t0 = time.perf_counter()
        loaded = await store.load(stream.checkpoint.request_id, "sk-bench")
        load_times.append((time.perf_counter() - t0) * 1000)
        assert len(loaded.checkpoint.output_token_ids) <= stream.sent

    while any(stream.sent < args.tokens for stream in streams):
        now = time.monotonic()
        for stream in streams:
            if now < stream.starts_at or stream.sent == args.tokens:
                continue
            if write and stream.writer is None:
                stream.writer = store.writer(stream.checkpoint)
                await stream.writer.start()
            due = min(args.tokens, int((now - stream.starts_at) / gap))
            if due == stream.sent:
                continue
            token_ids = [rng.randrange(VOCAB) for _ in range(due - stream.sent)]
            crossed_half = stream.sent <= args.tokens // 2 < due
            stream.sent = due
            if stream.writer is not None:
                stream.writer.record(token_ids, last_event_seq=due)
                if crossed_half:
                    background.append(asyncio.create_task(load(stream)))
                if due == args.tokens:
                    background.append(asyncio.create_task(stream.writer.finish()))
        await asyncio.sleep(gap)
    await asyncio.gather(*background)



def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_variant(url: str, server_pid: int, variant: Variant, args: argparse.Namespace) -> dict[str, Any]:
    policy = CheckpointPolicy(grace=args.grace / args.speedup, interval=variant.interval / args.speedup,
                              max_pending_tokens=args.max_pending_tokens, max_deltas=max(0, variant.max_deltas))
    transport = await NatsTransport.connect(url, name=f"bench-{variant.name}")
    namespace = "bench" + variant.name.replace("@", "_").replace(".", "_")
    store = await CheckpointStore.open(transport.nc, namespace, policy)
    seq_before = (await store.js.stream_info(store.stream)).state.last_seq
    load_times: list[float] = []
    cpu0, wall0, server_cpu0 = time.process_time(), time.monotonic(), process_cpu_seconds(server_pid)
    await drive_streams(store, args, load_times, write=variant.max_deltas >= 0)
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    server_cpu = process_cpu_seconds(server_pid) - server_cpu0
    info = await store.js.stream_info(store.stream)
    await store.close()
    await transport.close()
    tokens = args.streams * args.tokens
    per_k = 1000 / tokens
    return {
        "variant": variant.name,
        "interval_s": variant.interval,
        "max_deltas": variant.max_deltas,
        "messages": store.messages_written,
        "messages_stored_by_server": info.state.last_seq - seq_before,  # cross-check (purges store nothing)
        "payload_bytes": store.bytes_written,
        "messages_per_1k_tokens": round(store.messages_written * per_k, 1),
        "kib_per_1k_tokens": round(store.bytes_written * per_k / 1024, 1),
        "messages_per_s_real_time": round(store.messages_written / (wall * args.speedup), 1),
        "kib_per_s_real_time": round(store.bytes_written / (wall * args.speedup) / 1024, 1),
        "left_in_bucket": info.state.messages,
        "load_ms_p50": round(percentile(load_times, 50), 2) if load_times else None,
        "load_ms_p99": round(percentile(load_times, 99), 2) if load_times else None,
        # the simulated streams' own work included: compare with the "none" row
        "client_cpu_ms_per_1k_tokens": round(cpu * 1000 * per_k, 2),
        "nats_server_cpu_ms_per_1k_tokens": round(server_cpu * 1000 * per_k, 2),
        "wall_s": round(wall, 2),
    }


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    server = NatsServer(Path(tempfile.mkdtemp(prefix="dynrt-bench-checkpoint-")))
    server.start()
    try:
        variants = [v for v in VARIANTS if not args.variants or v.name in args.variants]
        assert server.process is not None
        return [await run_variant(server.url, server.process.pid, v, args) for v in variants]
    finally:
        server.stop()


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    rows = [row for row in rows if row["messages"]]
    names = [row["variant"] for row in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(names, [row["kib_per_1k_tokens"] for row in rows])
    left.set_title("JetStream payload, KiB per 1k tokens")
    right.bar(names, [row["messages_per_1k_tokens"] for row in rows])
    right.set_title("JetStream messages per 1k tokens")
    for axis in (left, right):
        axis.tick_params(axis="x", rotation=20)
    fig.suptitle("checkpoint write load (benchmarks/checkpoint.py)")
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=64, help="concurrent streams")
    parser.add_argument("--tokens", type=int, default=500, help="tokens generated per stream")
    parser.add_argument("--prompt", type=int, default=1000, help="prompt tokens per stream")
    parser.add_argument("--rate", type=float, default=50.0, help="tokens/s per stream (real time)")
    parser.add_argument("--stagger", type=float, default=2.0, help="seconds (real time) over which streams start")
    parser.add_argument("--speedup", type=float, default=4.0, help="time compression (see above)")
    parser.add_argument("--grace", type=float, default=30.0, help="grace period, seconds (real time)")
    parser.add_argument("--max-pending-tokens", type=int, default=64)
    parser.add_argument("--variants", nargs="*", default=[], help=f"of {[v.name for v in VARIANTS]} (default all)")
    parser.add_argument("--machine", default="", help='what ran it, e.g. "2-core VM (AMD EPYC), not quiet"')
    add_results_dir_argument(parser)
    args = parser.parse_args()
    rows = asyncio.run(main_async(args))
    columns = ["variant", "messages_per_1k_tokens", "kib_per_1k_tokens", "messages_per_s_real_time",
               "kib_per_s_real_time", "load_ms_p50", "load_ms_p99", "client_cpu_ms_per_1k_tokens",
               "nats_server_cpu_ms_per_1k_tokens", "left_in_bucket"]
    print_table(columns, [[row[c] for c in columns] for row in rows])
    path = write_results("checkpoint", {"machine_note": args.machine, "options": options_of(args), "results": rows},
                         args.results_dir)
    plot(rows, path.with_suffix(".png"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
