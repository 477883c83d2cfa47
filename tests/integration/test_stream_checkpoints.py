"""Resumable-stream checkpoints against a real nats-server with JetStream
(runtime/stream_checkpoints.py): round trip, batching, delete, expiry, unknown ids,
the key check, a take-over, and a NATS restart."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dynrt.runtime.checkpoint_log import CheckpointPolicy, api_key_hash, bucket_ttl
from dynrt.runtime.embedded import NatsServer
from dynrt.runtime.protocol import SamplingParams, StreamCheckpoint, StructuredOutput
from dynrt.runtime.stream_checkpoints import (CheckpointExpired, CheckpointForbidden, CheckpointNotFound,
                                              CheckpointStore, CheckpointUnavailable)
from dynrt.runtime.transport import NatsTransport

FAST = CheckpointPolicy(grace=30.0, interval=0.05, max_pending_tokens=64, max_deltas=8)


def new_checkpoint(request_id: str, api_key: str = "sk-test", prompt: int = 50) -> StreamCheckpoint:
    sampling = SamplingParams(max_tokens=500, temperature=0.7, top_p=0.9, seed=42, stop_token_ids=[2],
                              logprobs=2, logit_bias={5: -1.5}, structured=StructuredOutput(regex="[a-z]+"))
    return StreamCheckpoint(request_id=request_id, key_hash=api_key_hash(request_id, api_key), model="mock-model",
                            prompt_token_ids=list(range(100, 100 + prompt)), sampling=sampling,
                            instance_id="w1", frontend_id="f1")


@pytest.fixture
async def transport(nats_server: NatsServer) -> AsyncIterator[NatsTransport]:
    transport = await NatsTransport.connect(nats_server.url, name="checkpoint-test", connect_timeout=5)
    yield transport
    await transport.close()


async def key_messages(store: CheckpointStore, request_id: str) -> int:
    info = await store.js.stream_info(store.stream, subjects_filter=f"$KV.{store.bucket}.{request_id}")
    return sum((info.state.subjects or {}).values())


async def test_round_trip_and_delete_on_finish(transport: NatsTransport, namespace: str) -> None:
    store = await CheckpointStore.open(transport.nc, namespace, FAST)
    again = await CheckpointStore.open(transport.nc, namespace, FAST)  # idempotent: a second frontend
    sent = new_checkpoint("cmpl-roundtrip")
    writer = store.writer(sent)
    await writer.start()
    for i in range(40):
        writer.record([i, i + 1000], last_event_seq=i + 1, instance_id="w2" if i == 20 else None)
        await asyncio.sleep(0.005)
    await asyncio.sleep(FAST.interval * 3)
    loaded = await again.load("cmpl-roundtrip", "sk-test")
    got = loaded.checkpoint
    assert got.prompt_token_ids == sent.prompt_token_ids and got.sampling == sent.sampling
    assert got.output_token_ids == [t for i in range(40) for t in (i, i + 1000)]
    assert got.delta_sizes == [2] * 40
    assert got.last_event_seq == 40 and got.instance_id == "w2" and got.frontend_id == "f1"
    assert got.key_hash == sent.key_hash and got.created <= got.updated <= time.time()
    assert loaded.revision > 0
    await writer.finish()
    with pytest.raises(CheckpointNotFound):
        await store.load("cmpl-roundtrip", "sk-test")
    assert await key_messages(store, "cmpl-roundtrip") == 0  # no marker left behind


async def test_a_bucket_made_with_another_grace_keeps_the_longer_max_age(transport: NatsTransport, namespace: str,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    short = CheckpointPolicy(grace=5.0)
    first = await CheckpointStore.open(transport.nc, namespace, short)
    assert (await first.kv.status()).ttl == pytest.approx(bucket_ttl(short))
    longer = await CheckpointStore.open(transport.nc, namespace, FAST)  # raises it
    assert caplog_has(caplog, "checkpoint_bucket_settings_differ")
    assert (await longer.kv.status()).ttl == pytest.approx(bucket_ttl(FAST))
    again = await CheckpointStore.open(transport.nc, namespace, short)  # never lowers it
    assert (await again.kv.status()).ttl == pytest.approx(bucket_ttl(FAST))
    writer = again.writer(new_checkpoint("cmpl-shared"))
    await writer.start()
    assert (await first.load("cmpl-shared", "sk-test")).checkpoint.prompt_token_ids == list(range(100, 150))
    await writer.finish()


async def test_writes_are_batched(transport: NatsTransport, namespace: str) -> None:
    """300 tokens over ~1.5 s (one event each) with a 0.1 s interval: about 16 writes,
    not 300; the key keeps at most a snapshot and its deltas."""
    policy = CheckpointPolicy(grace=30.0, interval=0.1, max_pending_tokens=1000, max_deltas=8)
    store = await CheckpointStore.open(transport.nc, namespace, policy)
    writer = store.writer(new_checkpoint("cmpl-batched"))
    await writer.start()
    started = time.monotonic()
    for i in range(300):
        writer.record([i], last_event_seq=i + 1)
        await asyncio.sleep(0.005)
    elapsed = time.monotonic() - started
    await asyncio.sleep(0.3)
    assert store.messages_written <= elapsed / policy.interval + 4, (store.messages_written, elapsed)
    assert store.messages_written >= 5  # it did write as it went
    assert (await store.load("cmpl-batched", "sk-test")).checkpoint.output_token_ids == list(range(300))
    assert await key_messages(store, "cmpl-batched") <= policy.max_deltas + 1
    await writer.finish()


async def test_unknown_malformed_and_other_keys_ids(transport: NatsTransport, namespace: str) -> None:
    store = await CheckpointStore.open(transport.nc, namespace, FAST)
    writer = store.writer(new_checkpoint("cmpl-owned", api_key="sk-alice"))
    await writer.start()
    with pytest.raises(CheckpointForbidden):
        await store.load("cmpl-owned", "sk-bob")
    with pytest.raises(CheckpointForbidden):
        await store.load("cmpl-owned", "")
    assert (await store.load("cmpl-owned", "sk-alice")).checkpoint.request_id == "cmpl-owned"
    for request_id in ("cmpl-never-existed", "cmpl-owned.1", "cmpl-*", ">", "", "x" * 300):
        with pytest.raises(CheckpointNotFound):
            await store.load(request_id, "sk-alice")
    await writer.finish()


async def test_expired_after_the_grace_period_then_gone(transport: NatsTransport, namespace: str) -> None:
    """A writer that stops (its frontend died): within the grace period the checkpoint
    loads; after it, 410 (expired) while the bucket still holds it, then 404 once the
    bucket's max age has removed it: nothing is left."""
    policy = CheckpointPolicy(grace=1.0, interval=0.05, max_deltas=4)
    store = await CheckpointStore.open(transport.nc, namespace, policy)
    writer = store.writer(new_checkpoint("cmpl-expiring"))
    await writer.start()
    writer.record([1, 2, 3], last_event_seq=3)
    await asyncio.sleep(0.2)
    await writer.close()  # stops writing, keeps the state: like a frontend gone
    stopped = time.monotonic()
    assert (await store.load("cmpl-expiring", "sk-test")).checkpoint.output_token_ids == [1, 2, 3]
    await asyncio.sleep(policy.grace + 0.1 - (time.monotonic() - stopped))
    with pytest.raises(CheckpointExpired):
        await store.load("cmpl-expiring", "sk-test")
    deadline = time.monotonic() + bucket_ttl(policy) + 3.0
    while await key_messages(store, "cmpl-expiring"):
        assert time.monotonic() < deadline, "the bucket's max age did not remove the checkpoint"
        await asyncio.sleep(0.1)
    with pytest.raises(CheckpointNotFound):
        await store.load("cmpl-expiring", "sk-test")
    # nor do the reads leave consumers behind (each read's goes 1 s after it)
    deadline = time.monotonic() + 5
    while (await store.js.stream_info(store.stream)).state.consumer_count:
        assert time.monotonic() < deadline, "a read's consumer stayed on the server"
        await asyncio.sleep(0.2)


async def test_a_take_over_stops_the_old_writer(transport: NatsTransport, namespace: str) -> None:
    """The client resumed on another frontend while the first one still writes (it was
    cut off, not dead): the first one's next write fails and it stops; its finish
    does not delete the new owner's checkpoint."""
    store = await CheckpointStore.open(transport.nc, namespace, FAST)
    old = store.writer(new_checkpoint("cmpl-taken"))
    await old.start()
    old.record([1], last_event_seq=1)
    await asyncio.sleep(0.1)
    loaded = await store.load("cmpl-taken", "sk-test")
    new = store.writer(loaded.checkpoint, revision=loaded.revision)
    await new.start()
    old.record([666], last_event_seq=2)
    await asyncio.sleep(0.2)
    assert old.superseded
    await old.finish()
    new.record([2], last_event_seq=2)
    await asyncio.sleep(0.1)
    assert (await store.load("cmpl-taken", "sk-test")).checkpoint.output_token_ids == [1, 2]
    await new.finish()


def caplog_has(caplog: pytest.LogCaptureFixture, event: str) -> bool:
    return any(getattr(r, "dynrt_fields", {}).get("_event") == event for r in caplog.records)


async def test_checkpoints_survive_a_nats_restart(private_nats: NatsServer, namespace: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    transport = await NatsTransport.connect(private_nats.url, name="checkpoint-restart", connect_timeout=5)
    try:
        store = await CheckpointStore.open(transport.nc, namespace, FAST)
        writer = store.writer(new_checkpoint("cmpl-durable"))
        await writer.start()
        writer.record(list(range(30)), last_event_seq=30)
        await asyncio.sleep(0.2)
        await asyncio.to_thread(private_nats.restart)
        deadline = time.monotonic() + 10
        while not transport.nc.is_connected:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert (await store.load("cmpl-durable", "sk-test")).checkpoint.output_token_ids == list(range(30))
        writer.record([30], last_event_seq=31)  # writing goes on after the restart
        await asyncio.sleep(0.3)
        assert (await store.load("cmpl-durable", "sk-test")).checkpoint.output_token_ids == list(range(31))
        # Tokens recorded while NATS is down for longer than a write may take: that
        # write times out, and is redone as a snapshot once NATS is back.
        restart = asyncio.create_task(asyncio.to_thread(private_nats.restart, 2.5))
        for i in range(31, 60):
            writer.record([i], last_event_seq=i + 1)
            await asyncio.sleep(0.05)
        await restart
        assert caplog_has(caplog, "checkpoint_write_failed")
        deadline = time.monotonic() + 15
        while True:
            try:
                if (await store.load("cmpl-durable", "sk-test")).checkpoint.output_token_ids == list(range(60)):
                    break
            except CheckpointUnavailable:
                pass
            assert time.monotonic() < deadline, "the checkpoint did not catch up after the outage"
            await asyncio.sleep(0.2)
        await writer.finish()
        assert await key_messages(store, "cmpl-durable") == 0
    finally:
        await transport.close()


async def test_a_server_without_jetstream_is_a_clear_error(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats", jetstream=False)
    server.start()
    try:
        transport = await NatsTransport.connect(server.url, name="no-js", connect_timeout=5)
        try:
            with pytest.raises(CheckpointUnavailable, match="JetStream"):
                await CheckpointStore.open(transport.nc, "nojs", FAST)
        finally:
            await transport.close()
    finally:
        server.stop()


async def test_many_waiting_tokens_write_at_once_and_close_stops_writing(transport: NatsTransport,
                                                                        namespace: str) -> None:
    store = await CheckpointStore.open(transport.nc, namespace, CheckpointPolicy(interval=10.0, max_pending_tokens=5))
    writer = store.writer(new_checkpoint("cmpl-urgent"))
    await writer.start()
    writer.record([1, 2, 3, 4], last_event_seq=4)
    await asyncio.sleep(0.2)
    assert store.messages_written == 1  # the interval (10 s) has not passed
    writer.record([5], last_event_seq=5)
    await asyncio.sleep(0.2)
    assert store.messages_written == 2  # 5 tokens waited: written at once
    assert (await store.load("cmpl-urgent", "sk-test")).checkpoint.output_token_ids == [1, 2, 3, 4, 5]
    await store.close()
    writer.record([6, 7, 8, 9, 10], last_event_seq=10)
    await asyncio.sleep(0.2)
    assert (await store.load("cmpl-urgent", "sk-test")).checkpoint.output_token_ids == [1, 2, 3, 4, 5]
    assert store.messages_written == 2
    await writer.finish()
