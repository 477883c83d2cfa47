"""Frames/s and per-frame latency through dynrt's ``call``/``serve`` on loopback,
against raw nats-py publish/subscribe in the same run (same server, same sizes).

    python -m benchmarks.transport [--frames 50000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats
from nats.aio.msg import Msg

from benchmarks.common import add_results_dir_argument, print_table, write_results
from dynrt.runtime.embedded import EmbeddedServers
from dynrt.runtime.protocol import Frame, TokenFrame, encode, frame_decoder
from dynrt.runtime.transport import NatsTransport, RequestContext
from harness.stats import percentile


async def dynrt_stream(url: str, frames: int, pace: float = 0.0) -> tuple[float, list[float]]:
    server = await NatsTransport.connect(url)
    client = await NatsTransport.connect(url)

    async def handler(payload: bytes, ctx: RequestContext) -> AsyncIterator[Frame]:
        for _ in range(frames):
            yield TokenFrame(token_ids=[time.perf_counter_ns()])
            if pace:
                await asyncio.sleep(pace)

    await server.serve("bench.dynrt", handler)
    latencies: list[float] = []
    start = time.perf_counter()
    async for frame in await client.call("bench.dynrt", b"", request_id="bench"):
        assert isinstance(frame, TokenFrame)
        latencies.append((time.perf_counter_ns() - frame.token_ids[0]) / 1e6)
    elapsed = time.perf_counter() - start
    await client.close()
    await server.close()
    assert len(latencies) == frames
    return frames / elapsed, latencies


async def raw_nats(url: str, frames: int, pace: float = 0.0) -> tuple[float, list[float]]:
    """The same shape of work done with nats-py alone: a request message, then the
    responder publishes ``frames`` msgpack frames to the reply subject."""
    server = await nats.connect(url)
    client = await nats.connect(url)

    async def on_request(msg: Msg) -> None:
        for _ in range(frames):
            await server.publish(msg.reply, encode(TokenFrame(token_ids=[time.perf_counter_ns()])))
            if pace:
                await asyncio.sleep(pace)

    await server.subscribe("bench.raw", cb=on_request)
    await server.flush()
    done = asyncio.Event()
    latencies: list[float] = []

    async def on_reply(msg: Msg) -> None:
        frame = frame_decoder.decode(msg.data)
        assert isinstance(frame, TokenFrame)
        latencies.append((time.perf_counter_ns() - frame.token_ids[0]) / 1e6)
        if len(latencies) == frames:
            done.set()

    inbox = client.new_inbox()
    await client.subscribe(inbox, cb=on_reply)
    start = time.perf_counter()
    await client.publish("bench.raw", b"", reply=inbox)
    # A subscriber that falls behind on a loaded machine is cut off by nats-server as a
    # slow consumer and frames are lost: bounded wait, not a hang.
    await asyncio.wait_for(done.wait(), 120)
    elapsed = time.perf_counter() - start
    await client.close()
    await server.close()
    return frames / elapsed, latencies


async def main(frames: int, repeats: int, results_dir: Path) -> None:
    servers = EmbeddedServers.in_temp_dir()
    servers.nats.start()
    try:
        results: dict[str, dict[str, float]] = {}
        for name, run in (("raw nats-py", raw_nats), ("dynrt call/serve", dynrt_stream)):
            best_rate = 0.0
            best_latencies: list[float] = []
            for _ in range(repeats):
                rate, latencies = await run(servers.nats.url, frames)
                if rate > best_rate:
                    best_rate, best_latencies = rate, latencies
            # Per-frame latency unloaded: one frame per millisecond, so no queueing.
            _, paced = await run(servers.nats.url, 2000, 0.001)
            results[name] = {
                "frames_per_s": best_rate,
                "burst_latency_ms_p50": percentile(best_latencies, 50),
                "paced_latency_ms_p50": percentile(paced, 50),
                "paced_latency_ms_p99": percentile(paced, 99),
            }
    finally:
        servers.stop()
    ratio = results["dynrt call/serve"]["frames_per_s"] / results["raw nats-py"]["frames_per_s"]
    print_table(["path", "frames/s (burst)", "paced latency p50 ms", "paced p99 ms"],
                [[k, round(v["frames_per_s"]), v["paced_latency_ms_p50"], v["paced_latency_ms_p99"]]
                 for k, v in results.items()])
    print(f"dynrt / raw = {ratio:.2f}")
    path = write_results("transport", {"frames": frames, "repeats": repeats, "results": results,
                                       "ratio_dynrt_to_raw": ratio}, results_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    add_results_dir_argument(parser)
    options = parser.parse_args()
    try:
        import uvloop

        uvloop.run(main(options.frames, options.repeats, options.results_dir))
    except ImportError:
        asyncio.run(main(options.frames, options.repeats, options.results_dir))
