"""etcd leases and watches against a real etcd."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from dynrt.runtime.discovery import EtcdClient, LeasedRegistration, PrefixWatcher
from dynrt.runtime.embedded import EtcdServer
from dynrt.runtime.procs import stop_process
from harness.processes import spawn_python
from harness.waiting import wait_for, wait_line

LEASE_OWNER = str(Path(__file__).parents[1] / "helpers" / "lease_owner.py")


class Recorder:
    """What a watcher reported, with monotonic timestamps."""

    def __init__(self) -> None:
        self.puts: list[tuple[str, bytes, float]] = []
        self.deletes: list[tuple[str, float]] = []

    def on_put(self, key: str, value: bytes) -> None:
        self.puts.append((key, value, time.monotonic()))

    def on_delete(self, key: str) -> None:
        self.deletes.append((key, time.monotonic()))


async def test_watcher_sees_registration_then_delete_after_sigkill(etcd_server: EtcdServer, namespace: str, tmp_path: Path) -> None:
    prefix = f"dynrt/{namespace}/instances/"
    key = prefix + "backend/generate/w1"
    ttl = 2
    seen = Recorder()
    watcher = PrefixWatcher(EtcdClient(etcd_server.endpoint), prefix, seen.on_put, seen.on_delete)
    await watcher.start(wait=5)
    owner = spawn_python([LEASE_OWNER, etcd_server.endpoint, key, str(ttl)], tmp_path / "owner.log")
    try:
        await asyncio.to_thread(wait_line, tmp_path / "owner.log", "registered", 15, owner)
        await wait_for(lambda: any(k == key for k, _, _ in seen.puts), 2, what="put seen by watcher")
        assert [(k, v) for k, v, _ in seen.puts] == [(key, b"alive")]
        owner.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        owner.wait()
        await wait_for(lambda: bool(seen.deletes), ttl + 1, what="delete after lease expiry")
        assert [k for k, _ in seen.deletes] == [key]
        assert seen.deletes[0][1] - killed_at <= ttl + 1
        assert key not in watcher.view
    finally:
        stop_process(owner)
        await watcher.close()


async def test_watch_has_no_missed_or_duplicate_events(etcd_server: EtcdServer, namespace: str) -> None:
    prefix = f"dynrt/{namespace}/keys/"
    etcd = EtcdClient(etcd_server.endpoint)
    for i in range(20):
        await etcd.put(f"{prefix}{i:03d}", b"v0")
    seen = Recorder()
    watcher = PrefixWatcher(EtcdClient(etcd_server.endpoint), prefix, seen.on_put, seen.on_delete)
    writer = asyncio.create_task(_write_many(etcd, prefix))
    await watcher.start(wait=5)
    await writer
    await wait_for(lambda: len(watcher.view) == 40 and all(v == b"v1" for v in watcher.view.values()), 3,
                   what="watcher view to converge")
    # Each key: at most one put per value it held (v0 may be skipped if the initial get
    # already saw v1), never the same value twice in a row.
    by_key: dict[str, list[bytes]] = {}
    for k, v, _ in seen.puts:
        by_key.setdefault(k, []).append(v)
    for values in by_key.values():
        assert values in ([b"v0", b"v1"], [b"v1"])
    assert seen.deletes == []
    await watcher.close()
    await etcd.close()


async def _write_many(etcd: EtcdClient, prefix: str) -> None:
    for i in range(20):
        await etcd.put(f"{prefix}{i:03d}", b"v1")
        await etcd.put(f"{prefix}{i + 20:03d}", b"v1")


async def test_process_survives_etcd_outage_and_reregisters(private_etcd: EtcdServer, namespace: str, tmp_path: Path) -> None:
    key = f"dynrt/{namespace}/instances/backend/generate/w1"
    owner = spawn_python([LEASE_OWNER, private_etcd.endpoint, key, "3"], tmp_path / "owner.log")
    etcd = EtcdClient(private_etcd.endpoint)
    try:
        await asyncio.to_thread(wait_line, tmp_path / "owner.log", "registered", 15, owner)
        assert await etcd.get(key) == b"alive"
        await asyncio.to_thread(private_etcd.stop)
        await asyncio.sleep(5)
        assert owner.poll() is None, "the lease owner died while etcd was down"
        await asyncio.to_thread(private_etcd.start)
        back_at = time.monotonic()
        value: bytes | None = None
        while value is None and time.monotonic() - back_at < 2:
            try:
                value = await etcd.get(key)
            except Exception:
                await asyncio.sleep(0.05)
        assert value == b"alive", "key not back within 2 s of etcd's return"
        assert owner.poll() is None
    finally:
        stop_process(owner)
        await etcd.close()


async def test_lost_lease_is_replaced_and_keys_put_again(etcd_server: EtcdServer, namespace: str) -> None:
    """A lease that expired (here: revoked behind the owner's back, which is what
    expiry looks like to it) is replaced by a new one carrying every key again."""
    key = f"dynrt/{namespace}/instances/backend/generate/w1"
    etcd = EtcdClient(etcd_server.endpoint)
    registration = LeasedRegistration(EtcdClient(etcd_server.endpoint), ttl=3)
    await registration.start(wait=5)
    await registration.put(key, b"alive")
    old_lease = registration.lease_id
    assert old_lease is not None
    await etcd.call(lambda c: c.revoke_lease(old_lease))
    assert await etcd.get(key) is None
    took = 0.0
    start = time.monotonic()
    while await etcd.get(key) is None:
        took = time.monotonic() - start
        assert took < 2.0, "key not re-registered within 2 s"
        await asyncio.sleep(0.05)
    assert registration.lease_id != old_lease
    assert registration.lease_grants == 2
    await registration.close()
    assert await etcd.get(key) is None  # revoked on close
    await etcd.close()


async def test_call_survives_its_client_being_closed_by_another_task(private_etcd: EtcdServer, namespace: str) -> None:
    """Tasks share one EtcdClient; when one rotates to a fresh client it closes the old
    channel, and gRPC raises CancelledError in every call still in flight on it. That is
    a broken connection for those calls (retried), never a silent end of the task."""
    key = f"dynrt/{namespace}/k"
    etcd = EtcdClient(private_etcd.endpoint, timeout=5.0)
    await etcd.put(key, b"v")
    assert private_etcd.process is not None
    private_etcd.process.signal(signal.SIGSTOP)  # the next call hangs in flight
    try:
        in_flight = asyncio.create_task(etcd.get(key))
        await asyncio.sleep(0.3)
        await etcd.rotate(await etcd.client())  # what a broken watch does
    finally:
        private_etcd.process.signal(signal.SIGCONT)
    assert await asyncio.wait_for(in_flight, 10) == b"v"
    await etcd.close()


async def test_lease_and_watch_started_during_outage_come_up_when_etcd_returns(private_etcd: EtcdServer, namespace: str) -> None:
    """A worker started while etcd is down: its watch and its lease loop share a client
    and both fail; the moment etcd is back the lease is granted and the key put."""
    etcd = EtcdClient(private_etcd.endpoint)
    private_etcd.stop()
    registration = LeasedRegistration(etcd, ttl=3)
    watcher = PrefixWatcher(etcd, f"dynrt/{namespace}/frontends/", lambda k, v: None, lambda k: None)
    try:
        await watcher.start()
        start = asyncio.create_task(registration.start(wait=20))
        await asyncio.sleep(3)
        assert not start.done()
        private_etcd.start()
        back_at = time.monotonic()
        await asyncio.wait_for(start, 10)
        assert time.monotonic() - back_at < 3
        await wait_for(lambda: watcher.synced.is_set(), 3, what="watch synced")
    finally:
        await watcher.close()
        await registration.close()
        await etcd.close()
