"""An etcd cluster of one or more members on loopback ports, for deployments whose
etcd is killed, restarted or partitioned by a test."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

from dynrt.runtime.embedded import EtcdServer
from dynrt.runtime.procs import send_signal, wait_process


class EtcdCluster:
    """``members`` etcd processes on loopback ports forming one cluster. A stopped member
    restarts from its data dir on the same ports (it rejoins as the member it was)."""

    def __init__(self, base_dir: Path, members: int = 1) -> None:
        self.members = [EtcdServer(base_dir / "etcd", name=f"etcd{i}") for i in range(members)]
        cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            m.initial_cluster = cluster

    @property
    def endpoints(self) -> str:
        """What components get as ``--etcd-endpoints``."""
        return ",".join(m.endpoint for m in self.members)

    def alive(self, member: EtcdServer) -> bool:
        return member.process is not None and member.process.alive()

    def spawn(self, member: EtcdServer) -> None:
        """Start ``member`` (from its data dir if it has one) without waiting."""
        member.start(wait=False)

    async def wait_ready(self, members: list[EtcdServer], timeout: float = 30.0) -> None:
        await asyncio.gather(*(asyncio.to_thread(m.wait_ready, timeout) for m in members))

    async def start(self, timeout: float = 30.0) -> None:
        for m in self.members:
            self.spawn(m)
        await self.wait_ready(self.members, timeout)

    def kill(self, member: EtcdServer, sig: int = signal.SIGKILL) -> None:
        """``sig`` to ``member``, then wait (up to 10 s) for it to exit."""
        assert member.process is not None and member.process.proc is not None
        send_signal(member.process.proc, sig)
        wait_process(member.process.proc, 10)

    async def restart(self, member: EtcdServer, timeout: float = 30.0) -> None:
        if self.alive(member):
            await asyncio.to_thread(member.stop)
        self.spawn(member)
        await self.wait_ready([member], timeout)

    def status(self, member: EtcdServer) -> dict[str, Any] | None:
        """``/v3/maintenance/status`` through etcd's HTTP gateway (None if it does not answer)."""
        request = urllib.request.Request(f"http://{member.endpoint}/v3/maintenance/status", data=b"{}",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=1.0) as response:
                return json.loads(response.read())  # type: ignore[no-any-return]
        except (OSError, ValueError):
            return None

    async def leader(self, timeout: float = 10.0) -> EtcdServer:
        """The member that is the raft leader now."""
        deadline = time.monotonic() + timeout
        while True:
            for m in self.members:
                if not self.alive(m):
                    continue
                status = await asyncio.to_thread(self.status, m)
                if status and status.get("leader") and status["leader"] == status.get("header", {}).get("member_id"):
                    return m
            if time.monotonic() > deadline:
                raise AssertionError("no etcd leader found")
            await asyncio.sleep(0.1)

    async def followers(self) -> list[EtcdServer]:
        leader = await self.leader()
        return [m for m in self.members if m is not leader and self.alive(m)]

    def stop(self) -> None:
        for m in self.members:
            m.stop()
