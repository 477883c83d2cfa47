"""``dynrt worker --engine mock --instances K``: K instances in one process, each its own
registration, routed to by a real frontend, and all gone at SIGTERM. Real etcd, NATS,
worker and frontend processes.

Which instance serves a request is read from the instances' own ``/health`` (each has its
health server, and ``running`` is its engine's): with round-robin routing and three long
requests at once, each instance must be running one.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import pytest

from dynrt.runtime.discovery import EtcdClient
from dynrt.runtime.embedded import EtcdServer, NatsServer
from dynrt.runtime.protocol import InstanceRecord, instance_record_decoder, instances_prefix
from harness.frontend import FrontendProcess
from harness.processes import spawn_dynrt
from harness.worker import WorkerProcess

INSTANCES = 3


async def records_of(etcd: EtcdClient, namespace: str, pid: int) -> list[InstanceRecord]:
    _, values = await etcd.get_prefix(instances_prefix(namespace))
    records = [instance_record_decoder.decode(v) for v in values.values()]
    return [r for r in records if r.pid == pid and r.routable]


async def running(session: aiohttp.ClientSession, record: InstanceRecord) -> int:
    async with session.get(f"http://127.0.0.1:{record.system_port}/health") as response:
        return int((await response.json())["running"])


@pytest.mark.timeout(90)
async def test_instances_register_route_and_leave_together(tmp_path: Path, etcd_server: EtcdServer,
                                                           nats_server: NatsServer, namespace: str) -> None:
    etcd = EtcdClient(etcd_server.endpoint, timeout=5.0)
    worker = await WorkerProcess(tmp_path, namespace=namespace, etcd_endpoints=etcd_server.endpoint,
                                 nats_url=nats_server.url, args=["--instances", str(INSTANCES)]).start()
    try:
        records: list[InstanceRecord] = []
        for _ in range(200):  # start() returned on the first instance's record
            records = await records_of(etcd, namespace, worker.pid)
            if len(records) == INSTANCES:
                break
            await asyncio.sleep(0.05)
        assert len({r.instance_id for r in records}) == INSTANCES
        assert len({r.subject for r in records}) == INSTANCES
        assert len({r.system_port for r in records}) == INSTANCES
        async with FrontendProcess(tmp_path, namespace=namespace, etcd_endpoints=etcd_server.endpoint,
                                   nats_url=nats_server.url, expect_instances=INSTANCES,
                                   args=["--router-mode", "round-robin"]) as fe, \
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            body = {"model": "mock-model", "prompt": "hello there", "max_tokens": 3000, "ignore_eos": True,
                    "stream": True}
            responses = [await session.post(f"{fe.url}/v1/completions", json=body) for _ in range(INSTANCES)]
            try:
                assert all(r.status == 200 for r in responses)
                counts: list[int] = []
                for _ in range(100):
                    counts = [await running(session, r) for r in records]
                    if counts == [1] * INSTANCES:
                        break
                    await asyncio.sleep(0.05)
                assert counts == [1] * INSTANCES, f"requests per instance: {counts}"
            finally:
                for r in responses:
                    r.close()
            worker.send_signal(signal.SIGTERM)
            assert await worker.wait(30) == 0
            assert await records_of(etcd, namespace, worker.pid) == []
            assert await fe.wait_instances(0, timeout=10) >= 0
    finally:
        await worker.stop()
        await etcd.close()


def test_instances_refused_with_vllm(tmp_path: Path) -> None:
    """Refused before vLLM is imported (installed or not), so nothing is registered."""
    proc = spawn_dynrt(["worker", "--engine", "vllm", "--instances", "2", "--model", "x"], tmp_path / "w.log")
    assert proc.wait(60) == 2
    text = (tmp_path / "w.log").read_text()
    assert "--instances" in text and "--engine mock" in text, text
