"""Which controller is active: lease-based leader election in etcd, and writes fenced
by it.

A controller grants a lease and creates the ``leader`` key with it only if the key does
not exist (an etcd transaction on version == 0). The others are standbys and retry
every second; the active one keeps its lease alive, and every state write is fenced by a
transaction comparing ``leader`` with its own record, so a deposed controller can never
overwrite its successor. Losing the lease (etcd unreachable past the TTL) sets ``lost``:
the controller steps down and campaigns again — the replicas keep serving either way.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

from dynrt.controller.records import LeaderRecord, encode, leader_decoder, leader_key
from dynrt.runtime.discovery import ETCD_ERRORS, EtcdClient, EtcdUnavailable
from dynrt.runtime.lifecycle import cancel_and_wait
from dynrt.runtime.log import get_logger
from dynrt.runtime.procs import is_running, read_cmdline

log = get_logger("controller")


class LostLeadership(Exception):
    """A fenced write found the leader key held by another controller."""


def holder_dead(holder: LeaderRecord) -> bool:
    """True if the recorded leader ran on this host and its process is gone (SIGKILL,
    then restarted): no need to wait for its lease to expire."""
    if holder.host != socket.gethostname() or holder.pid <= 0 or holder.pid == os.getpid():
        return False
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    # a zombie, or the pid reused by something that is not a controller
    if not is_running(holder.pid):
        return True
    return not any("controller" in arg for arg in read_cmdline(holder.pid) or [])


class LeaderElection:
    def __init__(self, etcd: EtcdClient, namespace: str, ttl: int, controller_id: str) -> None:
        self.etcd = etcd
        self.ns = namespace
        self.ttl = ttl
        self.controller_id = controller_id
        self.value = encode(LeaderRecord(controller_id=controller_id, host=socket.gethostname(),
                                         pid=os.getpid(), since=time.time()))
        self.is_leader = False
        self.lease_id: int | None = None
        self.lost = asyncio.Event()
        self._lease_ok_at = 0.0
        self._keepalive: asyncio.Task[None] | None = None

    async def campaign(self, stopping: asyncio.Event) -> bool:
        """Until elected (True) or ``stopping`` is set (False)."""
        key = leader_key(self.ns).encode()
        announced = False
        while not stopping.is_set():
            try:
                lease = await self.etcd.call(lambda c: c.lease(self.ttl))
                ok, _ = await self.etcd.call(lambda c: c.transaction(
                    compare=[c.transactions.version(key) == 0],
                    success=[c.transactions.put(key, self.value, lease=lease.id)], failure=[]))
                if ok:
                    self.lease_id = lease.id
                    self.is_leader = True
                    self.lost.clear()
                    self._lease_ok_at = time.monotonic()
                    self._keepalive = asyncio.create_task(self._keep(lease.id))
                    log.info("controller_elected", controller_id=self.controller_id, lease=hex(lease.id))
                    return True
                await self.etcd.call(lambda c: c.revoke_lease(lease.id))
                raw = await self.etcd.get(leader_key(self.ns))
                holder = leader_decoder.decode(raw) if raw else None
                if raw is not None and holder is not None and holder_dead(holder):
                    ok, _ = await self.etcd.call(lambda c: c.transaction(
                        compare=[c.transactions.value(key) == raw], success=[c.transactions.delete(key)], failure=[]))
                    if ok:
                        log.info("controller_dead_leader_removed", dead=holder.controller_id)
                        continue
                if not announced:
                    log.info("controller_standby", controller_id=self.controller_id,
                             active=holder.controller_id if holder else "?")
                    announced = True
            except (EtcdUnavailable, *ETCD_ERRORS) as exc:
                log.warning("controller_campaign_failed", error=str(exc))
            await asyncio.sleep(min(1.0, self.ttl / 4))
        return False

    async def _keep(self, lease_id: int) -> None:
        interval = max(0.2, self.ttl / 3)
        last_ok = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            try:
                reply = await self.etcd.call(lambda c: c.refresh_lease(lease_id))
                if reply is None or reply.TTL <= 0:
                    log.error("controller_lease_expired", lease=hex(lease_id))
                    self.lost.set()
                    return
                last_ok = self._lease_ok_at = time.monotonic()
            except (EtcdUnavailable, *ETCD_ERRORS) as exc:
                if time.monotonic() - last_ok > self.ttl:
                    log.error("controller_lease_unrenewable", error=str(exc))
                    self.lost.set()
                    return

    def lease_fresh(self) -> bool:
        """Act (launch, kill, drain) only on a lease renewed recently: a controller that
        was frozen (SIGSTOP, a stalled VM) may have been replaced meanwhile; it finds
        out at its next renewal and steps down without touching any replica."""
        return self.is_leader and time.monotonic() - self._lease_ok_at < max(0.75 * self.ttl, 1.0)

    async def step_down(self, revoke: bool) -> None:
        self.is_leader = False
        await cancel_and_wait(self._keepalive)
        self._keepalive = None
        if revoke and self.lease_id is not None:
            lease_id = self.lease_id
            try:
                await self.etcd.call(lambda c: c.revoke_lease(lease_id))
            except (EtcdUnavailable, *ETCD_ERRORS):
                pass
        self.lease_id = None

    async def fenced(self, ops: list[tuple[str, bytes | None]]) -> None:
        """Apply puts (value) / deletes (None) only while we hold the leader key."""
        lkey = leader_key(self.ns).encode()

        def txn(c):  # type: ignore[no-untyped-def]
            success = [c.transactions.put(k.encode(), v) if v is not None else c.transactions.delete(k.encode())
                       for k, v in ops]
            return c.transaction(compare=[c.transactions.value(lkey) == self.value], success=success, failure=[])

        ok, _ = await self.etcd.call(txn)
        if not ok:
            raise LostLeadership("leader key is not ours")


class FencedStore:
    """The controller's records as it last wrote them: ``sync`` writes only what changed
    (and deletes what is gone), in fenced transactions."""

    CHUNK = 64  # etcd's default max ops per transaction is 128

    def __init__(self, election: LeaderElection) -> None:
        self.election = election
        self._written: dict[str, bytes] = {}

    def has(self, key: str) -> bool:
        return key in self._written

    def remember(self, key: str, value: bytes) -> None:
        """``key`` is known to hold ``value`` in etcd (read at recovery)."""
        self._written[key] = value

    def forget_all(self) -> None:
        self._written.clear()

    async def sync(self, wanted: dict[str, bytes]) -> None:
        ops: list[tuple[str, bytes | None]] = [(k, v) for k, v in wanted.items() if self._written.get(k) != v]
        ops += [(k, None) for k in self._written if k not in wanted]
        for i in range(0, len(ops), self.CHUNK):
            chunk = ops[i:i + self.CHUNK]
            await self.election.fenced(chunk)
            for k, v in chunk:
                if v is None:
                    self._written.pop(k, None)
                else:
                    self._written[k] = v
