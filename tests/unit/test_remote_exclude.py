"""What a frontend in remote-router mode tells the standalone router to avoid: the
instances it marked down and the ones whose load reports stopped reaching it (suspect),
besides the request's own exclusions. The transport is a stand-in that records the
request: this checks the payload the frontend builds, not NATS."""

from __future__ import annotations

import msgspec

from dynrt.router.remote import RemoteRoutingService
from dynrt.runtime.protocol import LoadReport, RouteDecision, RouteRequest, encode
from tests.unit.test_router_policy import MODEL, Clock, record
from tests.unit.test_router_suspects import run


class RecordingTransport:
    def __init__(self) -> None:
        self.sent: list[RouteRequest] = []

    async def request(self, subject: str, payload: bytes, timeout: float) -> bytes:
        self.sent.append(msgspec.msgpack.decode(payload, type=RouteRequest))
        return encode(RouteDecision(instance_id="a"))


async def test_down_and_suspect_instances_are_excluded_in_the_remote_request() -> None:
    transport = RecordingTransport()
    service = RemoteRoutingService(None, transport, "ns")  # type: ignore[arg-type]
    clock = Clock()
    service.state.clock = clock
    for iid in "abcd":
        service.state.add_instance(record(iid))
        service.state.on_load(LoadReport(instance_id=iid, model=MODEL, kv_blocks_total=1000, heartbeat=0.1))
    run(service.state, clock, 1.0, "abd")  # c's reports stop: suspect
    service.state.mark_down("d", 10.0)
    decision, cause = await service._ask(MODEL, [1, 2, 3], "req-1", exclude=["b"])
    assert cause == "" and decision == RouteDecision(instance_id="a")
    assert transport.sent[0].exclude == ["b", "c", "d"]
    assert transport.sent[0].continuing is False
    await service._ask(MODEL, [1, 2, 3], "req-1", exclude=[], continuing=True)  # a migrating request
    assert transport.sent[1].continuing is True

