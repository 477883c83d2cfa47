"""Unit tests of the mock engine: paging, prefix caching, KV events, scheduling,
determinism and the sampling rules. Everything runs at speedup inf (no sleeping)."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from dynrt.runtime.block_hash import block_hashes
from dynrt.runtime.mock_tokenizer import EOS_ID, mock_tokenizer
from dynrt.runtime.protocol import (
    GenerateRequest,
    KvAllCleared,
    KvBlockRemoved,
    KvBlockStored,
    KvEvent,
    SamplingParams,
    StructuredOutput,
)
from dynrt.worker.engine import EngineError, RequestRejected, TokenBatch
from dynrt.worker.mock_engine import MockEngine, MockEngineConfig, prefill_ms, step_model_ms

VOCAB = mock_tokenizer().sampleable_ids


def prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice(VOCAB) for _ in range(n)]


def request(
    request_id: str,
    token_ids: list[int],
    max_tokens: int,
    *,
    prior: int = 0,
    **sampling: object,
) -> GenerateRequest:
    return GenerateRequest(
        request_id=request_id,
        model="mock-model",
        token_ids=token_ids,
        sampling=SamplingParams(max_tokens=max_tokens, **sampling),  # type: ignore[arg-type]
        num_prior_output_tokens=prior,
    )


@asynccontextmanager
async def running_engine(**config: object) -> AsyncIterator[MockEngine]:
    engine = MockEngine(MockEngineConfig(speedup=math.inf, **config))  # type: ignore[arg-type]
    await engine.start()
    try:
        yield engine
    finally:
        await engine.shutdown()


async def collect(engine: MockEngine, req: GenerateRequest) -> tuple[list[int], str | None, list[TokenBatch]]:
    batches = [batch async for batch in engine.generate(req)]
    tokens = [t for batch in batches for t in batch.token_ids]
    return tokens, batches[-1].finish_reason, batches


def assert_all_blocks_free(engine: MockEngine) -> None:
    total = engine.config.num_blocks
    cache = engine.kv_cache
    assert engine.kv_blocks_used == 0
    assert len(cache.free) + len(cache.lru) == total
    assert sorted(cache.free + list(cache.lru.values())) == list(range(total))
    assert cache.ref == [0] * total
    assert engine.load().running == 0 and engine.load().waiting == 0


def assert_cache_consistent(engine: MockEngine) -> None:
    """Every block is free, cached-free or held; reference counts equal holders."""
    cache = engine.kv_cache
    holders = [0] * engine.config.num_blocks
    for seq in engine.scheduler.running:
        assert len(seq.block_ids) * engine.config.block_size >= seq.num_computed
        for block in seq.block_ids:
            holders[block] += 1
    for seq in engine.scheduler.waiting:
        assert seq.block_ids == []
    assert holders == cache.ref
    assert all(cache.ref[b] == 0 and cache.block_hash[b] == -1 for b in cache.free)
    assert all(cache.ref[b] == 0 and cache.cached[h] == b for h, b in cache.lru.items())
    assert all(cache.block_hash[b] == h for h, b in cache.cached.items())
    in_use = sum(1 for r in cache.ref if r)
    assert in_use + len(cache.free) + len(cache.lru) == engine.config.num_blocks


# -- basic generation -------------------------------------------------------


async def test_generate_max_tokens_and_first_batch() -> None:
    async with running_engine() as engine:
        tokens, finish, batches = await collect(engine, request("r", prompt(37), 25, ignore_eos=True))
        assert len(tokens) == 25
        assert finish == "length"
        assert all(t in VOCAB for t in tokens)
        assert batches[0].prompt_tokens == 37
        assert batches[0].cached_tokens == 0
        assert all(b.finish_reason is None for b in batches[:-1])
        assert engine.num_generated_tokens == 25
        assert_all_blocks_free(engine)
        assert engine.info.engine == "mock"
        assert engine.info.tokenizer.kind == "mock"
        assert engine.info.kv_blocks_total == 16384


async def test_rejections() -> None:
    async with running_engine(context_length=100, num_blocks=4, block_size=16) as engine:
        with pytest.raises(RequestRejected, match="context length"):
            engine.generate(request("a", prompt(90), 11))
        with pytest.raises(RequestRejected, match="whole KV cache"):
            engine.generate(request("b", prompt(60), 5))  # 65 tokens > 4 blocks of 16
        with pytest.raises(RequestRejected, match="empty"):
            engine.generate(request("c", [], 5))
        with pytest.raises(RequestRejected, match="max_tokens"):
            engine.generate(request("d", prompt(5), 0))
        with pytest.raises(RequestRejected, match="vocabulary"):
            engine.generate(request("e", [1, 2, 10**6], 5))
        tokens, finish, _ = await collect(engine, request("f", prompt(60), 4, ignore_eos=True))
        assert (len(tokens), finish) == (4, "length")  # 64 tokens: exactly the whole cache
        it = engine.generate(request("g", prompt(5), 50, ignore_eos=True))
        await it.__anext__()
        with pytest.raises(RequestRejected, match="duplicate"):
            engine.generate(request("g", prompt(5), 5))
        await it.aclose()  # type: ignore[attr-defined]
        assert_all_blocks_free(engine)


async def test_health() -> None:
    engine = MockEngine(MockEngineConfig(speedup=math.inf))
    with pytest.raises(EngineError):
        await engine.check_health()
    await engine.start()
    await engine.check_health()
    await engine.shutdown()
    failing = MockEngine(MockEngineConfig(fail_health_check=True))
    await failing.start()
    with pytest.raises(EngineError):
        await failing.check_health()
    await failing.shutdown()


# -- determinism --------------------------------------------------------------


async def test_continuation_equals_uninterrupted_across_engines() -> None:
    p = prompt(50, seed=3)
    n = 60
    async with running_engine() as one:
        full, finish, _ = await collect(one, request("x", p, n, ignore_eos=True, seed=7))
    assert finish == "length" and len(full) == n
    for k in (1, 17, 59):
        async with running_engine() as a, running_engine(block_size=8) as b:
            head, _, _ = await collect(a, request("x", p, k, ignore_eos=True, seed=7))
            tail, finish, _ = await collect(b, request("x", p + head, n - k, prior=k, ignore_eos=True, seed=7))
        assert head + tail == full
        assert finish == "length"
    async with running_engine() as engine:
        other_seed, _, _ = await collect(engine, request("y", p, n, ignore_eos=True, seed=8))
        seed_none, _, _ = await collect(engine, request("z", p, n, ignore_eos=True))
        seed_zero, _, _ = await collect(engine, request("w", p, n, ignore_eos=True, seed=0))
    assert other_seed != full
    assert seed_none == seed_zero


async def test_logprobs_one_per_token_and_identical_after_migration() -> None:
    p = prompt(30, seed=5)
    n, k = 40, 17
    async with running_engine(max_num_batched_tokens=16) as engine:
        full, _, batches = await collect(engine, request("l", p, n, ignore_eos=True, seed=3, logprobs=3))
        plain, _, plain_batches = await collect(engine, request("p", p, n, ignore_eos=True, seed=3))
        head, _, _ = await collect(engine, request("h", p, k, ignore_eos=True, seed=3))
        tail, _, tail_batches = await collect(engine, request("t", p + head, n - k, prior=k, ignore_eos=True, seed=3,
                                                              logprobs=3))
        zero, _, zero_batches = await collect(engine, request("z", p, 5, ignore_eos=True, seed=3, logprobs=0))
    assert plain == full  # logprobs do not change the tokens
    assert all(batch.logprobs is None for batch in plain_batches)
    for batch in batches:
        assert batch.logprobs is not None and len(batch.logprobs) == len(batch.token_ids)
    entries = [e for batch in batches for e in batch.logprobs or []]
    for token, entry in zip(full, entries, strict=True):
        assert entry.top_ids[0] == token and entry.top_logprobs[0] == entry.logprob
        assert len(entry.top_ids) == len(set(entry.top_ids)) == len(entry.top_logprobs) == 3
        assert entry.top_logprobs == sorted(entry.top_logprobs, reverse=True)
        assert sum(math.exp(lp) for lp in entry.top_logprobs) <= 1.0
    assert len({e.logprob for e in entries}) > 1  # not one constant
    assert head + tail == full
    assert [e for batch in tail_batches for e in batch.logprobs or []] == entries[k:]
    zero_entries = [e for batch in zero_batches for e in batch.logprobs or []]
    assert [e.logprob for e in zero_entries] == [e.logprob for e in entries[:5]]
    assert all(e.top_ids == [] for e in zero_entries)


async def test_structured_output_is_rejected() -> None:
    async with running_engine() as engine:
        with pytest.raises(RequestRejected, match="no structured output backend"):
            engine.generate(request("s", prompt(5), 5, structured=StructuredOutput(json_object=True)))


async def test_continuation_keeps_eos_and_min_tokens() -> None:
    p = prompt(20, seed=4)
    async with running_engine(eos_every=4) as engine:
        full, finish, _ = await collect(engine, request("x", p, 200, min_tokens=12))
        assert finish == "stop" and full[-1] == EOS_ID
        assert len(full) >= 13 and EOS_ID not in full[:-1]
        k = 5
        head, _, _ = await collect(engine, request("h", p, k, min_tokens=12, ignore_eos=True))
        tail, finish2, _ = await collect(engine, request("t", p + head, 200 - k, prior=k, min_tokens=12))
    assert head + tail == full
    assert finish2 == "stop"


# -- sampling rules -------------------------------------------------------------


async def test_eos_rule_and_ignore_eos() -> None:
    p = prompt(10, seed=5)
    async with running_engine(eos_every=3) as engine:
        with_eos, finish, _ = await collect(engine, request("a", p, 100))
        ignored, finish2, _ = await collect(engine, request("b", p, 100, ignore_eos=True))
    assert finish == "stop" and with_eos[-1] == EOS_ID and EOS_ID not in with_eos[:-1]
    assert finish2 == "length" and len(ignored) == 100 and EOS_ID not in ignored
    assert ignored[: len(with_eos) - 1] == with_eos[:-1]
    assert ignored[len(with_eos) - 1] != EOS_ID


async def test_stop_token_ids_and_min_tokens() -> None:
    p = prompt(10, seed=6)
    async with running_engine() as engine:
        ref, _, _ = await collect(engine, request("r", p, 40, ignore_eos=True))
        j = next(i for i in range(5, 40) if ref[i] not in ref[:i])
        stop_id = ref[j]
        out, finish, _ = await collect(engine, request("s", p, 40, ignore_eos=True, stop_token_ids=[stop_id]))
        assert out == ref[: j + 1]
        assert finish == "stop"
        # Before min_tokens a stop token is never produced; the output diverges there.
        out2, finish2, _ = await collect(
            engine, request("m", p, 40, ignore_eos=True, stop_token_ids=[stop_id], min_tokens=j + 1)
        )
        assert out2[:j] == ref[:j]
        assert out2[j] != stop_id
        if finish2 == "stop":
            assert out2[-1] == stop_id and stop_id not in out2[:-1] and len(out2) > j + 1
        else:
            assert finish2 == "length" and len(out2) == 40 and stop_id not in out2


# -- prefix caching and KV events ---------------------------------------------------


async def test_prefix_hit_reuses_blocks() -> None:
    shared = prompt(64, seed=8)
    async with running_engine(block_size=16) as engine:
        _, _, b1 = await collect(engine, request("a", shared, 1, ignore_eos=True))
        assert b1[0].cached_tokens == 0
        assert engine.num_cached_blocks == 4
        hashes = block_hashes(shared, 16)
        assert sorted(engine.dump_cached_blocks()[0]) == sorted(hashes)
        steps_before = len(engine.step_log)
        extended = shared + prompt(16, seed=9)
        _, _, b2 = await collect(engine, request("b", extended, 1, ignore_eos=True))
        assert b2[0].cached_tokens == 64
        assert b2[0].prompt_tokens == 80
        assert [s.prefill_tokens for s in list(engine.step_log)[steps_before:]] == [16]
        assert engine.num_cached_blocks == 5
        # All 4 cached blocks were reused: only 1 block was taken from the free pool.
        assert len(engine.kv_cache.free) == engine.config.num_blocks - 5
        # An identical prompt cannot reuse its last block (its last token must be computed).
        _, _, b3 = await collect(engine, request("c", extended, 1, ignore_eos=True))
        assert b3[0].cached_tokens == 64
        assert_all_blocks_free(engine)
    async with running_engine(enable_prefix_caching=False) as engine:
        await collect(engine, request("a", shared, 1, ignore_eos=True))
        _, _, b2 = await collect(engine, request("b", shared + prompt(16, seed=9), 1, ignore_eos=True))
        assert b2[0].cached_tokens == 0
        assert engine.num_cached_blocks == 0
        assert engine.dump_cached_blocks() == ([], 0)


def replay(events: list[KvEvent]) -> set[int]:
    cache: set[int] = set()
    for event in events:
        data = event.data
        if isinstance(data, KvBlockStored):
            assert not cache.intersection(data.block_hashes)
            cache.update(data.block_hashes)
        elif isinstance(data, KvBlockRemoved):
            assert cache.issuperset(data.block_hashes)
            cache.difference_update(data.block_hashes)
        else:
            assert isinstance(data, KvAllCleared)
            cache.clear()
    return cache


async def test_events_match_cache_under_eviction_and_preemption() -> None:
    async with running_engine(num_blocks=40, block_size=4, max_num_batched_tokens=32) as engine:
        events: list[KvEvent] = []

        async def consume() -> None:
            async for batch in engine.kv_events():
                events.extend(batch)

        consumer = asyncio.create_task(consume())
        rng = random.Random(11)
        prefixes = [prompt(24, seed=s) for s in range(4)]

        async def one(i: int) -> None:
            p = rng.choice(prefixes)[: rng.randint(4, 24)] + prompt(rng.randint(1, 20), seed=100 + i)
            tokens, finish, _ = await collect(engine, request(f"r{i}", p, 30, ignore_eos=True))
            assert (len(tokens), finish) == (30, "length")

        for wave in range(4):
            await asyncio.gather(*(one(wave * 10 + i) for i in range(10)))
        for _ in range(5):
            await asyncio.sleep(0)
        dumped, last_id = engine.dump_cached_blocks()
        assert [e.event_id for e in events] == list(range(1, last_id + 1))
        assert replay(events) == set(dumped)
        assert any(isinstance(e.data, KvBlockRemoved) for e in events)
        assert engine.num_preemptions > 0
        assert_all_blocks_free(engine)

        assert engine.reset_prefix_cache()
        for _ in range(3):
            await asyncio.sleep(0)
        assert isinstance(events[-1].data, KvAllCleared)
        assert events[-1].event_id == last_id + 1
        assert engine.dump_cached_blocks() == ([], last_id + 1)
        assert replay(events) == set()
        consumer.cancel()


async def test_stored_events_carry_parent_hash() -> None:
    p = prompt(40, seed=12)
    async with running_engine(block_size=8, max_num_batched_tokens=16) as engine:
        await collect(engine, request("a", p, 1, ignore_eos=True))
        events = engine._events.pending
        hashes = block_hashes(p, 8)
        stored = [e.data for e in events if isinstance(e.data, KvBlockStored)]
        # Chunks of 16 tokens: blocks are stored two at a time as prefill advances.
        assert [s.block_hashes for s in stored] == [hashes[0:2], hashes[2:4], hashes[4:5]]
        assert [s.parent_hash for s in stored] == [None, hashes[1], hashes[3]]


# -- scheduling -------------------------------------------------------------------


async def test_chunked_prefill_respects_token_budget() -> None:
    async with running_engine(max_num_batched_tokens=64) as engine:
        tokens, _, _ = await collect(engine, request("a", prompt(200), 3, ignore_eos=True))
        assert len(tokens) == 3
        log = list(engine.step_log)
        assert [(s.prefill_tokens, s.decode_seqs) for s in log] == [(64, 0), (64, 0), (64, 0), (8, 0), (0, 1), (0, 1)]

        before = len(engine.step_log)
        short = asyncio.create_task(collect(engine, request("s", prompt(10, seed=1), 40, ignore_eos=True)))
        await asyncio.sleep(0)
        long = asyncio.create_task(collect(engine, request("l", prompt(300, seed=2), 5, ignore_eos=True)))
        await asyncio.gather(short, long)
        log = list(engine.step_log)[before:]
        assert all(s.prefill_tokens + s.decode_seqs <= 64 for s in log)
        assert sum(s.prefill_tokens for s in log) == 310
        assert any(s.prefill_tokens and s.decode_seqs for s in log)  # mixed steps
        assert_all_blocks_free(engine)


async def test_max_num_seqs_and_load() -> None:
    async with running_engine(max_num_seqs=2) as engine:
        its = [engine.generate(request(f"r{i}", prompt(20, seed=i), 50, ignore_eos=True)) for i in range(4)]
        tasks = [asyncio.create_task(anext(it)) for it in its]  # type: ignore[arg-type]
        first = await tasks[0]
        assert first.prompt_tokens == 20
        load = engine.load()
        assert (load.running, load.waiting) == (2, 2)
        assert load.active_prefill_tokens == 40
        assert load.kv_blocks_used == 4  # two sequences of 20+ tokens in blocks of 16
        assert load.kv_blocks_total == 16384
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for it in its:
            await it.aclose()  # type: ignore[attr-defined]
        assert_all_blocks_free(engine)


async def test_preemption_keeps_output_identical() -> None:
    prompts = [prompt(30, seed=20 + i) for i in range(6)]

    async def run(**config: object) -> tuple[list[list[int]], int]:
        async with running_engine(**config) as engine:
            results = await asyncio.gather(
                *(collect(engine, request(f"r{i}", p, 50, ignore_eos=True)) for i, p in enumerate(prompts))
            )
            assert_all_blocks_free(engine)
            return [r[0] for r in results], engine.num_preemptions

    reference, preempted = await run()
    assert preempted == 0
    squeezed, preempted = await run(num_blocks=12, block_size=8)
    assert preempted > 0
    assert squeezed == reference


async def test_idle_engine_does_not_step() -> None:
    async with running_engine() as engine:
        await collect(engine, request("a", prompt(5), 3, ignore_eos=True))
        steps = engine.num_steps
        await asyncio.sleep(0.05)
        assert engine.num_steps == steps


# -- cancellation and block accounting ------------------------------------------------


async def test_abort_kill_and_stop() -> None:
    async with running_engine() as engine:
        it = engine.generate(request("k", prompt(20), 1000, ignore_eos=True))
        got = [t for t in (await anext(it)).token_ids]  # type: ignore[arg-type]
        await engine.abort("k", "kill")
        assert engine.kv_blocks_used == 0
        rest = [b async for b in it]  # type: ignore[attr-defined]
        assert rest[-1].token_ids == [] and rest[-1].finish_reason == "abort"
        assert len(got) < 1000

        it = engine.generate(request("s", prompt(20), 1000, ignore_eos=True))
        await anext(it)  # type: ignore[arg-type]
        await engine.abort("s", "stop")
        assert engine.load().running == 1  # finishes only at the end of the step
        rest = [b async for b in it]  # type: ignore[attr-defined]
        assert rest[-1].finish_reason == "cancelled"
        assert rest[-1].token_ids  # the current step's token is delivered
        await engine.abort("unknown", "kill")
        assert_all_blocks_free(engine)


async def test_closing_or_cancelling_the_consumer_frees_blocks() -> None:
    async with running_engine() as engine:
        it = engine.generate(request("a", prompt(100), 1000, ignore_eos=True))
        await anext(it)  # type: ignore[arg-type]
        assert engine.kv_blocks_used == 7
        await it.aclose()  # type: ignore[attr-defined]
        assert_all_blocks_free(engine)

        started = asyncio.Event()

        async def consume() -> None:
            async for _ in engine.generate(request("b", prompt(100), 1000, ignore_eos=True)):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        assert engine.kv_blocks_used == 7
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert_all_blocks_free(engine)

        never_iterated = engine.generate(request("c", prompt(10), 5))
        del never_iterated
        assert engine.load().waiting == 0


@pytest.mark.parametrize("seed", range(6))
async def test_block_accounting_random_mix(seed: int) -> None:
    rng = random.Random(seed)
    async with running_engine(num_blocks=48, block_size=4, max_num_batched_tokens=48, max_num_seqs=16) as engine:
        shared = [prompt(32, seed=s) for s in range(3)]

        async def one(i: int) -> None:
            p = rng.choice(shared)[: rng.randint(0, 32)] + prompt(rng.randint(1, 30), seed=1000 * seed + i)
            action = rng.choice(["finish", "kill", "stop", "close", "cancel"])
            it = engine.generate(request(f"r{i}", p, 60, ignore_eos=True))
            if action == "finish":
                tokens = [t async for b in it for t in b.token_ids]  # type: ignore[attr-defined]
                assert len(tokens) == 60
                return
            if action == "cancel":
                task = asyncio.create_task(anext(it))  # type: ignore[arg-type]
                for _ in range(rng.randint(0, 5)):
                    await asyncio.sleep(0)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await it.aclose()  # type: ignore[attr-defined]
                return
            received = 0
            async for batch in it:  # type: ignore[attr-defined]
                received += len(batch.token_ids)
                if received >= 3 and batch.finish_reason is None:
                    break
            if action == "close":
                await it.aclose()  # type: ignore[attr-defined]
                return
            await engine.abort(f"r{i}", action)  # type: ignore[arg-type]
            rest = [b async for b in it]  # type: ignore[attr-defined]
            assert rest[-1].finish_reason == ("abort" if action == "kill" else "cancelled")

        async def check_every_step() -> None:
            while True:
                assert_cache_consistent(engine)
                await asyncio.sleep(0)

        checker = asyncio.create_task(check_every_step())
        await asyncio.gather(*(one(i) for i in range(40)))
        assert not checker.done()
        checker.cancel()
        assert engine.num_preemptions > 0
        assert_all_blocks_free(engine)
        cached, _ = engine.dump_cached_blocks()
        assert set(cached) == set(engine.kv_cache.lru)


# -- timing model -----------------------------------------------------------------------


def test_timing_model() -> None:
    assert prefill_ms(0) == pytest.approx(16.50142)
    assert prefill_ms(1000) == pytest.approx(0.4209989 + 15.18344 + 16.50142)
    assert step_model_ms(0, 4, 0.0) == pytest.approx(5.74)
    assert step_model_ms(0, 4, 0.5) == pytest.approx(-25.74 / 4 + 27.005 + 5.74)
    assert step_model_ms(100, 4, 0.5) == pytest.approx(prefill_ms(100) + step_model_ms(0, 4, 0.5))
    assert step_model_ms(0, 0, 0.5) == 0.0


async def test_speedup_paces_steps() -> None:
    engine = MockEngine(MockEngineConfig(speedup=2.0))
    await engine.start()
    try:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await collect(engine, request("a", prompt(500), 10, ignore_eos=True))
        elapsed_ms = (loop.time() - start) * 1e3
        log = list(engine.step_log)
        assert [(s.prefill_tokens, s.decode_seqs) for s in log] == [(500, 0)] + [(0, 1)] * 9
        assert log[0].model_ms == pytest.approx(prefill_ms(500))
        modelled = sum(s.model_ms for s in log) / 2.0
        assert modelled * 0.95 <= elapsed_ms <= modelled * 1.2 + 3
    finally:
        await engine.shutdown()
