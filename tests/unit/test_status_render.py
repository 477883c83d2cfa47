"""``dynrt status``'s table: a worker still loading its engine shows as loading, with the
time since it began, whatever its /health says; draining and ready ones as before."""

from __future__ import annotations

import time

import msgspec

from dynrt.controller.records import ControllerRecords
from dynrt.runtime.protocol import InstanceRecord, TokenizerSpec
from dynrt.status import DeploymentStatus, instance_state, render


def record(**changes: object) -> InstanceRecord:
    base = InstanceRecord(instance_id="abc", namespace="n", component="c", endpoint="e", model="m", subject="s.abc",
                          engine="vllm", block_size=16, kv_blocks_total=10, context_length=2048, max_num_seqs=2,
                          tokenizer=TokenizerSpec(kind="hf", path="/m"), pid=42)
    return msgspec.structs.replace(base, **changes)


def test_loading_worker_shows_loading_with_elapsed_time() -> None:
    loading = record(subject="", loading=True, started_at=time.time() - 17)
    assert instance_state(loading, {"status": "loading"}) == "loading 17s"
    assert instance_state(loading, {"status": "unreachable (ClientConnectorError)"}) == "loading 17s"
    assert instance_state(record(), {"status": "ready"}) == "ready"
    assert instance_state(record(draining=True), {"status": "ready"}) == "draining"
    text = render(DeploymentStatus("n", [(loading, {"status": "loading"})], [], ControllerRecords()))
    assert "loading 17s" in text and "abc" in text
