"""Resumable-stream checkpoints, the pure part (runtime/checkpoint_log.py): batching,
snapshots and deltas, folding, the API-key check."""

from __future__ import annotations

import math

import pytest

from dynrt.runtime.checkpoint_log import (CheckpointLog, CheckpointPolicy, IncompleteCheckpoint, api_key_hash,
                                          bucket_ttl, fold, is_request_id, key_matches, new_request_id)
from dynrt.runtime.protocol import (CheckpointDelta, CheckpointEntry, SamplingParams, StreamCheckpoint,
                                    checkpoint_entry_decoder, encode)


def checkpoint(request_id: str = "cmpl-1", api_key: str = "key", prompt: int = 10) -> StreamCheckpoint:
    return StreamCheckpoint(request_id=request_id, key_hash=api_key_hash(request_id, api_key), model="m",
                            prompt_token_ids=list(range(prompt)), sampling=SamplingParams(max_tokens=1000, seed=7))


def drive(log: CheckpointLog, arrivals: list[tuple[float, list[int], int]], until: float) -> list[tuple[float, CheckpointEntry]]:
    """Replay token arrivals (time, ids, last_event_seq) and do every write when due, as
    CheckpointWriter does; the writes in order, each through the wire encoding."""
    writes: list[tuple[float, CheckpointEntry]] = []
    pending = list(arrivals)
    now = 0.0
    while now <= until:
        due = log.due_at()
        next_arrival = pending[0][0] if pending else math.inf
        if due <= now or (due <= next_arrival and due <= until):
            now = max(now, due)
            entry = checkpoint_entry_decoder.decode(encode(log.next_entry(now)))
            log.written(entry, now)
            writes.append((now, entry))
        elif pending:
            now, ids, events = pending.pop(0)
            log.record(ids, events)
        else:
            break
    return writes


def test_key_hash_is_salted_by_request_and_checked() -> None:
    assert api_key_hash("a", "key") != api_key_hash("b", "key")
    assert b"key" not in api_key_hash("a", "key")
    cp = checkpoint(api_key="secret")
    assert key_matches(cp, "secret")
    assert not key_matches(cp, "secret2")
    assert not key_matches(cp, "")
    assert key_matches(checkpoint(api_key=""), "")  # open endpoints: no key on either side


def test_first_write_is_due_at_once_and_is_a_snapshot_with_the_prompt() -> None:
    log = CheckpointLog(checkpoint(), CheckpointPolicy(), now=100.0)
    assert log.due_at() == -math.inf
    entry = log.next_entry(100.0)
    assert isinstance(entry, StreamCheckpoint) and entry.prompt_token_ids == list(range(10))
    assert entry.created == 100.0 and entry.updated == 100.0


def test_500_tokens_at_50_per_second_take_one_write_per_interval_and_fold_back() -> None:
    policy = CheckpointPolicy(grace=30, interval=0.2, max_deltas=32)
    log = CheckpointLog(checkpoint(), policy, now=0.0)
    arrivals = [(0.5 + i * 0.02, [1000 + i], i + 1) for i in range(500)]  # 10 s of tokens
    writes = drive(log, arrivals, until=11.0)
    assert len(writes) <= 10 / 0.2 + 3  # one per interval, plus the first and the tail
    assert all(b - a >= 0.2 - 1e-9 for (a, _), (b, _) in zip(writes[1:], writes[2:]))
    state = fold([entry for _, entry in writes])
    assert state is not None
    assert state.output_token_ids == [1000 + i for i in range(500)] and state.last_event_seq == 500
    assert state.delta_sizes == [1] * 500
    snapshots = [entry for _, entry in writes if isinstance(entry, StreamCheckpoint)]
    assert 2 <= len(snapshots) <= 3  # the first, then one per 32 deltas (~6.4 s)


def test_many_pending_tokens_write_before_the_interval() -> None:
    log = CheckpointLog(checkpoint(), CheckpointPolicy(interval=10.0, max_pending_tokens=8), now=0.0)
    log.written(log.next_entry(0.0), 0.0)
    log.record(list(range(7)), 7)
    assert log.due_at() == 10.0
    log.record([7], 8)
    assert log.due_at() <= 0.0  # due now


def test_full_state_policy_writes_only_snapshots() -> None:
    log = CheckpointLog(checkpoint(), CheckpointPolicy(max_deltas=0, interval=0.1), now=0.0)
    writes = drive(log, [(0.05 * i, [i], i) for i in range(1, 41)], until=3.0)
    assert writes and all(isinstance(entry, StreamCheckpoint) for _, entry in writes)
    assert fold([e for _, e in writes]).output_token_ids == list(range(1, 41))  # type: ignore[union-attr]


def test_snapshot_at_least_every_half_grace_so_deltas_never_outlive_it() -> None:
    policy = CheckpointPolicy(grace=4.0, interval=0.1, max_deltas=62)
    log = CheckpointLog(checkpoint(), policy, now=0.0)
    writes = drive(log, [(0.1 * i, [i], i) for i in range(1, 100)], until=10.0)
    snapshot_at = -math.inf
    for at, entry in writes:
        if isinstance(entry, StreamCheckpoint):
            snapshot_at = at
        # the bucket drops a message bucket_ttl after it was written
        assert snapshot_at + bucket_ttl(policy) >= at + policy.grace


def test_an_idle_request_is_kept_alive_by_a_snapshot_every_half_grace() -> None:
    log = CheckpointLog(checkpoint(), CheckpointPolicy(grace=10.0), now=0.0)
    log.written(log.next_entry(0.0), 0.0)
    assert not log.dirty
    assert log.due_at() == 5.0
    entry = log.next_entry(5.0)
    assert isinstance(entry, StreamCheckpoint) and entry.updated == 5.0
    assert isinstance(log.next_entry(4.9), StreamCheckpoint)  # taken a little early: still a snapshot


def test_after_a_failed_write_the_next_one_is_a_snapshot() -> None:
    log = CheckpointLog(checkpoint(), CheckpointPolicy(interval=0.1), now=0.0)
    log.written(log.next_entry(0.0), 0.0)
    log.record([1, 2], 2)
    assert isinstance(log.next_entry(0.1), CheckpointDelta)
    log.failed(0.1)
    log.record([3], 3)
    assert log.due_at() == pytest.approx(0.2)
    entry = log.next_entry(0.2)
    assert isinstance(entry, StreamCheckpoint) and entry.output_token_ids == [1, 2, 3]


def test_a_migration_writes_the_new_instance() -> None:
    log = CheckpointLog(checkpoint(), CheckpointPolicy(), now=0.0)
    log.written(log.next_entry(0.0), 0.0)
    log.record([], 0, instance_id="w2")
    assert log.dirty
    entry = log.next_entry(1.0)
    assert isinstance(entry, CheckpointDelta) and entry.instance_id == "w2"
    log.written(entry, 1.0)
    assert not log.dirty
    state = fold([checkpoint(), entry])
    assert state is not None and state.instance_id == "w2"


def test_delta_sizes_follow_the_recorded_deltas_across_snapshots_and_deltas() -> None:
    log = CheckpointLog(checkpoint(), CheckpointPolicy(interval=0.1, max_deltas=2), now=0.0)
    sizes = [1, 3, 2, 1, 5, 1, 1, 4]
    arrivals = []
    token = 0
    for k, size in enumerate(sizes):
        arrivals.append((0.05 * (k + 1), list(range(token, token + size)), k + 2))  # event 1: the role event
        token += size
    writes = drive(log, [(0.01, [], 1), *arrivals], until=2.0)
    assert sum(isinstance(e, StreamCheckpoint) for _, e in writes) >= 2  # both kinds were written
    assert sum(isinstance(e, CheckpointDelta) for _, e in writes) >= 2
    state = fold([e for _, e in writes])
    assert state is not None and state.delta_sizes == sizes and state.output_token_ids == list(range(token))
    assert state.last_event_seq == len(sizes) + 1


def test_fold() -> None:
    assert fold([]) is None
    with pytest.raises(IncompleteCheckpoint):
        fold([CheckpointDelta(output_token_ids=[1], last_event_seq=1)])
    first = checkpoint()
    state = fold([first, CheckpointDelta(output_token_ids=[1], last_event_seq=1, updated=2.0),
                  CheckpointDelta(output_token_ids=[2, 3], last_event_seq=3, updated=3.0)])
    assert state is not None and state.output_token_ids == [1, 2, 3] and state.last_event_seq == 3
    assert state.updated == 3.0
    assert first.output_token_ids == []  # folding copies


@pytest.mark.parametrize("kwargs", [{"grace": 0}, {"interval": -1}, {"max_pending_tokens": 0}, {"max_deltas": 63}])
def test_invalid_policy(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        CheckpointPolicy(**kwargs)  # type: ignore[arg-type]


def test_policy_from_the_resume_settings() -> None:
    from dynrt.runtime.config import ResumeConfig, from_args

    assert CheckpointPolicy.from_config(ResumeConfig()) == CheckpointPolicy()  # one set of defaults
    config = from_args(ResumeConfig, resume_grace="5", checkpoint_interval="0.5", checkpoint_tokens="8",
                       checkpoint_deltas="0")
    assert CheckpointPolicy.from_config(config) == CheckpointPolicy(grace=5, interval=0.5, max_pending_tokens=8,
                                                                    max_deltas=0)
    with pytest.raises(SystemExit):
        from_args(ResumeConfig, resume_grace="0")


def test_request_ids_are_unguessable_keys() -> None:
    ids = {new_request_id("chatcmpl-") for _ in range(1000)}
    assert len(ids) == 1000
    rid = next(iter(ids))
    assert rid.startswith("chatcmpl-") and len(rid) == len("chatcmpl-") + 32  # 128 bits in hex
    assert all(is_request_id(i) for i in ids)
    assert not is_request_id("a.b") and not is_request_id("a*") and not is_request_id("") and not is_request_id("é")
