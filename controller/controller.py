"""``dynrt controller``: keeps a deployment's replicas at their desired state, and
survives its own death.

State in etcd (JSON, not leased: it outlives every process), under
``dynrt/{ns}/controller/``:

- ``leader``                     → ``LeaderRecord``, under the active controller's lease
- ``spec``                       → ``SpecRecord``: the ``DeploymentSpec``, its generation,
  the digest of the file the controller was started with
- ``replicas/{model}/{replica}`` → ``ReplicaState``: pid, host, log, state, restarts,
  start/ready/last-healthy times, the launch digest it runs
- ``autoscaler/{model}``         → ``AutoscalerState``: target count, recent load samples,
  last decisions

Election: a controller grants a lease and creates ``leader`` with it only if the key
does not exist (etcd transaction on version == 0). The others are standbys and retry
every second; the active one keeps its lease alive and every state write is fenced by
a transaction comparing ``leader`` with its own id, so a deposed controller can never
overwrite its successor. Losing the lease (etcd unreachable past the TTL) makes it step
down: it stops managing and campaigns again — the replicas keep serving either way.

Recovery (on becoming active): read the spec, replicas and autoscaler state; every
replica whose pid is still that replica's process is adopted as is (no relaunch, no
duplicate); the ones that died meanwhile (or whose host restarted) count a failure and
are relaunched; autoscaling resumes from the saved samples and last scale time.

Each pass (``tick``, 0.25 s): process deaths → failure + relaunch (exponential backoff
for replicas that keep failing); due health checks (NATS ping of the instance's control
subject + its ``/health``; failing for ``timeout`` → SIGKILL + relaunch; a new replica
has ``startup_timeout`` to become healthy); autoscaling; scaling and rolling updates
(surge one current-digest replica, wait until it is healthy, drain one outdated replica
with SIGTERM, repeat); persist what changed.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import socket
import time
import uuid
from pathlib import Path
from typing import Literal

import aiohttp
import msgspec

from dynrt.runtime.config import ControllerConfig
from dynrt.runtime.discovery import ETCD_ERRORS, EtcdClient, EtcdUnavailable, PrefixWatcher
from dynrt.runtime.lifecycle import GracefulShutdown, cancel_and_wait
from dynrt.runtime.log import get_logger
from dynrt.runtime.protocol import (
    InstanceRecord,
    controller_prefix,
    instance_record_decoder,
    instances_prefix,
    load_report_decoder,
    LoadReport,
)
from dynrt.runtime.transport import NatsTransport
from dynrt.controller.spec import DeploymentSpec, ModelSpec, encode_spec
from dynrt.controller.launcher import Launcher, LocalProcessLauncher

log = get_logger("controller")

ReplicaStatus = Literal["pending", "starting", "ready", "unhealthy", "draining"]
LIVE = ("starting", "ready", "unhealthy", "draining")

BACKOFF_BASE = 1.0  # seconds before the second relaunch in a row; doubles after
BACKOFF_MAX = 60.0
BACKOFF_RESET = 30.0  # healthy this long → a later failure starts the backoff over
DRAIN_GRACE = 20.0  # beyond drain_timeout before a draining replica is SIGKILLed
LOAD_FRESH = 5.0  # a load report older than this is ignored
SAMPLE_EVERY = 1.0
MAX_DECISIONS = 20


class ReplicaState(msgspec.Struct, kw_only=True):
    replica_id: str
    model: str
    digest: str
    state: ReplicaStatus = "pending"
    pid: int = 0
    host: str = ""
    log_path: str = ""
    created_at: float = 0.0
    started_at: float = 0.0
    ready_at: float = 0.0
    last_healthy_at: float = 0.0
    drain_started_at: float = 0.0
    next_launch_at: float = 0.0
    restarts: int = 0
    consecutive_failures: int = 0
    instance_id: str = ""
    last_failure: str = ""


class SpecRecord(msgspec.Struct, kw_only=True):
    spec: DeploymentSpec
    generation: int = 1
    seed_digest: str = ""
    updated_at: float = 0.0
    source: str = ""


class LeaderRecord(msgspec.Struct, kw_only=True):
    controller_id: str
    host: str
    pid: int
    since: float


class Decision(msgspec.Struct, kw_only=True):
    at: float
    from_replicas: int
    to_replicas: int
    load: float
    reason: str


class AutoscalerState(msgspec.Struct, kw_only=True):
    model: str
    target_replicas: int
    samples: list[tuple[float, float]] = []  # (wall time, total load of the model)
    last_scale_at: float = 0.0
    decisions: list[Decision] = []


class LostLeadership(Exception):
    pass


# -- keys ---------------------------------------------------------------------------


def leader_key(ns: str) -> str:
    return controller_prefix(ns) + "leader"


def spec_key(ns: str) -> str:
    return controller_prefix(ns) + "spec"


def replicas_prefix(ns: str) -> str:
    return controller_prefix(ns) + "replicas/"


def replica_key(ns: str, model: str, replica_id: str) -> str:
    return f"{replicas_prefix(ns)}{_token(model)}/{replica_id}"


def autoscaler_key(ns: str, model: str) -> str:
    return f"{controller_prefix(ns)}autoscaler/{_token(model)}"


def _token(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


spec_record_decoder = msgspec.json.Decoder(SpecRecord)
replica_decoder = msgspec.json.Decoder(ReplicaState)
autoscaler_decoder = msgspec.json.Decoder(AutoscalerState)
leader_decoder = msgspec.json.Decoder(LeaderRecord)
_json = msgspec.json.Encoder()


def spec_digest(spec: DeploymentSpec) -> str:
    import hashlib

    return hashlib.sha256(encode_spec(spec)).hexdigest()[:16]


async def read_spec(etcd: EtcdClient, ns: str) -> SpecRecord | None:
    raw = await etcd.get(spec_key(ns))
    return None if raw is None else spec_record_decoder.decode(raw)


async def write_spec(etcd: EtcdClient, ns: str, spec: DeploymentSpec, *, seed_digest: str | None = None,
                     source: str = "") -> SpecRecord:
    """Store a new desired state (``dynrt controller apply``); the active controller
    picks it up within a tick, or at its next start if none is running."""
    current = await read_spec(etcd, ns)
    record = SpecRecord(spec=spec, generation=(current.generation + 1) if current else 1,
                        seed_digest=seed_digest if seed_digest is not None else (current.seed_digest if current else ""),
                        updated_at=time.time(), source=source)
    await etcd.put(spec_key(ns), _json.encode(record))
    return record


async def read_replicas(etcd: EtcdClient, ns: str) -> list[ReplicaState]:
    _, values = await etcd.get_prefix(replicas_prefix(ns))
    out = []
    for value in values.values():
        try:
            out.append(replica_decoder.decode(value))
        except msgspec.DecodeError:
            continue
    return out


def backoff_delay(consecutive_failures: int) -> float:
    """0 for the first failure (replace at once), then 1, 2, 4 ... 60 s."""
    if consecutive_failures <= 1:
        return 0.0
    return min(BACKOFF_BASE * 2 ** (consecutive_failures - 2), BACKOFF_MAX)


class Controller:
    def __init__(self, config: ControllerConfig, launcher: Launcher | None = None,
                 seed: tuple[DeploymentSpec, str] | None = None) -> None:
        self.config = config
        self.ns = config.namespace
        self.controller_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        state_dir = Path(config.state_dir or Path.home() / ".local" / "state" / "dynrt" / config.namespace)
        self.launcher: Launcher = launcher or LocalProcessLauncher(state_dir / "replicas")
        self.seed = seed
        self.etcd = EtcdClient.from_config(config)
        self.transport: NatsTransport | None = None
        self.http: aiohttp.ClientSession | None = None
        self.shutdown = GracefulShutdown()
        self.is_leader = False
        self.lease_id: int | None = None
        self.leader_lost = asyncio.Event()
        self.spec_record: SpecRecord | None = None
        self.replicas: dict[str, ReplicaState] = {}
        self.autoscalers: dict[str, AutoscalerState] = {}
        self.instances: dict[str, InstanceRecord] = {}
        self.loads: dict[str, tuple[LoadReport, float]] = {}
        self._written: dict[str, bytes] = {}
        self._checking: set[str] = set()
        self._kill_reasons: dict[str, str] = {}
        self._lease_ok_at = 0.0
        self._last_tick = 0.0
        self._next_check: dict[str, float] = {}
        self._last_sample: dict[str, float] = {}
        self._instance_watcher: PrefixWatcher | None = None
        self._spec_watcher: PrefixWatcher | None = None
        self._keepalive: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.leader_value = _json.encode(LeaderRecord(controller_id=self.controller_id, host=socket.gethostname(),
                                                      pid=os.getpid(), since=time.time()))

    # -- run ------------------------------------------------------------------------
    async def run(self) -> int:
        self.shutdown.install_signal_handlers()
        self.transport = await NatsTransport.connect(self.config.nats_url, name=f"controller-{self.controller_id}",
                                                     creds_file=self.config.nats_creds)
        await self.transport.subscribe(f"dynrt.{self.ns}.load.*", self._on_load)
        self.http = aiohttp.ClientSession()
        if self.seed is not None:
            await self._seed_spec(*self.seed)
        self._instance_watcher = PrefixWatcher(self.etcd, instances_prefix(self.ns), self._on_instance_put,
                                               self._on_instance_delete)
        await self._instance_watcher.start(wait=30)
        self._spec_watcher = PrefixWatcher(self.etcd, spec_key(self.ns), self._on_spec_put, lambda k: None)
        await self._spec_watcher.start(wait=30)
        log.info("controller_started", controller_id=self.controller_id, namespace=self.ns)
        stop = asyncio.create_task(self.shutdown.wait())
        try:
            while not self.shutdown.requested.is_set():
                campaign = asyncio.create_task(self._campaign())
                await asyncio.wait({campaign, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not campaign.done():
                    campaign.cancel()
                    break
                if not campaign.result():
                    break
                lead = asyncio.create_task(self._lead())
                lost = asyncio.create_task(self.leader_lost.wait())
                await asyncio.wait({lead, lost, stop}, return_when=asyncio.FIRST_COMPLETED)
                for task in (lead, lost):
                    if not task.done():
                        await cancel_and_wait(task)
                if lead.done() and not lead.cancelled() and lead.exception() is not None:
                    log.error("controller_lead_failed", error=repr(lead.exception()))
                if self.shutdown.requested.is_set():
                    break
                log.warning("controller_stepped_down", controller_id=self.controller_id)
                await self._step_down(revoke=False)
                await asyncio.sleep(0.5)
        finally:
            stop.cancel()
            if self.is_leader and self.config.stop_replicas_on_exit:
                await self._stop_all_replicas()
            await self._step_down(revoke=True)
            await self._close()
        log.info("controller_stopped", controller_id=self.controller_id)
        return 0

    async def _close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for watcher in (self._instance_watcher, self._spec_watcher):
            if watcher is not None:
                await watcher.close()
        if self.http is not None:
            await self.http.close()
        if self.transport is not None:
            await self.transport.close()
        await self.etcd.close()

    async def _seed_spec(self, spec: DeploymentSpec, source: str) -> None:
        """``-f FILE`` at start: stored unless the stored spec came from this same file
        (a restart: a later ``apply`` must not be undone)."""
        digest = spec_digest(spec)
        while True:
            try:
                current = await read_spec(self.etcd, self.ns)
                if current is not None and current.seed_digest == digest:
                    log.info("controller_spec_recovered", generation=current.generation)
                    return
                record = await write_spec(self.etcd, self.ns, spec, seed_digest=digest, source=source)
                log.info("controller_spec_stored", generation=record.generation, source=source)
                return
            except (EtcdUnavailable, *ETCD_ERRORS) as exc:
                log.warning("controller_etcd_unavailable", error=str(exc))
                await asyncio.sleep(1.0)

    # -- watches --------------------------------------------------------------------
    def _on_instance_put(self, key: str, value: bytes) -> None:
        try:
            self.instances[key] = instance_record_decoder.decode(value)
        except msgspec.DecodeError:
            pass

    def _on_instance_delete(self, key: str) -> None:
        self.instances.pop(key, None)

    def _on_spec_put(self, key: str, value: bytes) -> None:
        if key != spec_key(self.ns):
            return
        try:
            record = spec_record_decoder.decode(value)
        except msgspec.DecodeError as exc:
            log.error("controller_bad_spec_in_etcd", error=str(exc))
            return
        if self.spec_record is None or record.generation != self.spec_record.generation:
            log.info("controller_spec_changed", generation=record.generation,
                     models=",".join(m.name for m in record.spec.models))
        self.spec_record = record

    async def _on_load(self, msg: object) -> None:
        try:
            report = load_report_decoder.decode(msg.data)  # type: ignore[attr-defined]
        except msgspec.DecodeError:
            return
        self.loads[report.instance_id] = (report, time.monotonic())

    # -- election -------------------------------------------------------------------
    async def _campaign(self) -> bool:
        key = leader_key(self.ns).encode()
        announced = False
        while not self.shutdown.requested.is_set():
            try:
                lease = await self.etcd.call(lambda c: c.lease(self.config.election_ttl))
                ok, _ = await self.etcd.call(lambda c: c.transaction(
                    compare=[c.transactions.version(key) == 0],
                    success=[c.transactions.put(key, self.leader_value, lease=lease.id)], failure=[]))
                if ok:
                    self.lease_id = lease.id
                    self.is_leader = True
                    self.leader_lost.clear()
                    self._lease_ok_at = time.monotonic()
                    self._keepalive = asyncio.create_task(self._keep_leadership(lease.id))
                    log.info("controller_elected", controller_id=self.controller_id, lease=hex(lease.id))
                    return True
                await self.etcd.call(lambda c: c.revoke_lease(lease.id))
                raw = await self.etcd.get(leader_key(self.ns))
                holder = leader_decoder.decode(raw) if raw else None
                if raw is not None and holder is not None and self._holder_dead(holder):
                    # The active controller ran here and its process is gone (SIGKILL,
                    # then restarted): no need to wait for its lease to expire.
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
            await asyncio.sleep(min(1.0, self.config.election_ttl / 4))
        return False

    @staticmethod
    def _holder_dead(holder: LeaderRecord) -> bool:
        if holder.host != socket.gethostname() or holder.pid <= 0 or holder.pid == os.getpid():
            return False
        try:
            os.kill(holder.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        try:  # a zombie, or the pid reused by something that is not a controller
            with open(f"/proc/{holder.pid}/stat", "rb") as f:
                stat = f.read()
            if stat[stat.rfind(b")") + 2:][:1] in (b"Z", b"X"):
                return True
            with open(f"/proc/{holder.pid}/cmdline", "rb") as f:
                return b"controller" not in f.read()
        except OSError:
            return True

    async def _keep_leadership(self, lease_id: int) -> None:
        interval = max(0.2, self.config.election_ttl / 3)
        last_ok = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            try:
                reply = await self.etcd.call(lambda c: c.refresh_lease(lease_id))
                if reply is None or reply.TTL <= 0:
                    log.error("controller_lease_expired", lease=hex(lease_id))
                    self.leader_lost.set()
                    return
                last_ok = self._lease_ok_at = time.monotonic()
            except (EtcdUnavailable, *ETCD_ERRORS) as exc:
                if time.monotonic() - last_ok > self.config.election_ttl:
                    log.error("controller_lease_unrenewable", error=str(exc))
                    self.leader_lost.set()
                    return

    async def _step_down(self, revoke: bool) -> None:
        self.is_leader = False
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        if revoke and self.lease_id is not None:
            lease_id = self.lease_id
            try:
                await self.etcd.call(lambda c: c.revoke_lease(lease_id))
            except (EtcdUnavailable, *ETCD_ERRORS):
                pass
        self.lease_id = None
        self._written.clear()

    async def _fenced(self, ops: list[tuple[str, bytes | None]]) -> None:
        """Apply puts (value) / deletes (None) only while we hold the leader key."""
        lkey = leader_key(self.ns).encode()

        def txn(c):  # type: ignore[no-untyped-def]
            success = [c.transactions.put(k.encode(), v) if v is not None else c.transactions.delete(k.encode())
                       for k, v in ops]
            return c.transaction(compare=[c.transactions.value(lkey) == self.leader_value], success=success, failure=[])

        ok, _ = await self.etcd.call(txn)
        if not ok:
            raise LostLeadership("leader key is not ours")

    # -- leading --------------------------------------------------------------------
    def _safe(self) -> bool:
        """Act (launch, kill, drain) only on a lease renewed recently: a controller that
        was frozen (SIGSTOP, a stalled VM) may have been replaced meanwhile; it finds
        out at its next renewal and steps down without touching any replica."""
        return self.is_leader and time.monotonic() - self._lease_ok_at < max(0.75 * self.config.election_ttl, 1.0)

    async def _lead(self) -> None:
        await self._recover()
        while True:
            try:
                if not self._safe():
                    await asyncio.sleep(self.config.tick)
                    continue
                gap = time.monotonic() - self._last_tick
                self._last_tick = time.monotonic()
                if gap > max(2.0, 8 * self.config.tick):
                    # We were not running (frozen, overloaded): the replicas' silence
                    # during that time is ours, not theirs. Health clocks restart now.
                    for r in self.replicas.values():
                        r.last_healthy_at = max(r.last_healthy_at, time.time())
                await self._reconcile()
                await self._persist()
            except LostLeadership:
                log.error("controller_lost_leadership", controller_id=self.controller_id)
                self.leader_lost.set()
                return
            except (EtcdUnavailable, *ETCD_ERRORS) as exc:
                log.warning("controller_etcd_unavailable", error=str(exc))
            await asyncio.sleep(self.config.tick)

    async def _recover(self) -> None:
        while True:
            try:
                self.spec_record = await read_spec(self.etcd, self.ns) or self.spec_record
                stored = await read_replicas(self.etcd, self.ns)
                _, scalers = await self.etcd.get_prefix(controller_prefix(self.ns) + "autoscaler/")
                break
            except (EtcdUnavailable, *ETCD_ERRORS) as exc:
                log.warning("controller_etcd_unavailable", error=str(exc))
                await asyncio.sleep(1.0)
        self.replicas = {}
        self._written = {}
        self._last_tick = time.monotonic()
        for value in scalers.values():
            try:
                state = autoscaler_decoder.decode(value)
            except msgspec.DecodeError:
                continue
            self.autoscalers[state.model] = state
        now = time.time()
        adopted = relaunch = 0
        for r in stored:
            self._written[replica_key(self.ns, r.model, r.replica_id)] = _json.encode(r)
            self.replicas[r.replica_id] = r
            if r.state == "pending" or (r.state in LIVE and not self.launcher.adopt(r.replica_id, r.pid, r.host)):
                # launched just before the last controller died, before its pid was stored?
                orphan = self.launcher.find(r.replica_id)
                if orphan is not None:
                    log.info("replica_orphan_found", replica_id=r.replica_id, pid=orphan)
                    r.pid, r.host = orphan, self.launcher.host
                    if r.state == "pending":
                        r.state, r.started_at, r.last_healthy_at = "starting", now, now
            if r.state not in LIVE or r.pid == 0:
                continue
            if self.launcher.adopt(r.replica_id, r.pid, r.host):
                adopted += 1
                r.last_healthy_at = now  # its health clock restarts with us
                self._next_check[r.replica_id] = 0.0
                log.info("replica_adopted", replica_id=r.replica_id, model=r.model, pid=r.pid, state=r.state)
                if r.state == "draining" and not r.drain_started_at:
                    r.drain_started_at = now
            elif r.state == "draining":
                self._forget(r)
            else:
                relaunch += 1
                self._failed(r, "gone while the controller was down", now)
        log.info("controller_recovered", replicas=len(stored), adopted=adopted, relaunching=relaunch,
                 generation=self.spec_record.generation if self.spec_record else 0,
                 autoscalers=len(self.autoscalers))

    # -- replica transitions -----------------------------------------------------------
    def _record_for(self, r: ReplicaState) -> tuple[str, InstanceRecord] | None:
        for key, record in self.instances.items():
            if record.replica_id == r.replica_id and record.pid == r.pid:
                return key, record
        return None

    def _forget(self, r: ReplicaState) -> None:
        self.replicas.pop(r.replica_id, None)
        self._drop_instance_key(r)

    def _drop_instance_key(self, r: ReplicaState) -> None:
        """The process is gone: remove its instance record now rather than at lease
        expiry, so routers stop choosing it at once."""
        found = self._record_for(r)
        if found is not None:
            key = found[0]
            self.instances.pop(key, None)
            self._spawn(self._delete_quietly(key))

    async def _delete_quietly(self, key: str) -> None:
        try:
            await self.etcd.delete(key)
        except (EtcdUnavailable, *ETCD_ERRORS):
            pass

    def _spawn(self, coro) -> None:  # type: ignore[no-untyped-def]
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _failed(self, r: ReplicaState, reason: str, now: float) -> None:
        self._drop_instance_key(r)
        if r.ready_at and now - r.ready_at >= BACKOFF_RESET:
            r.consecutive_failures = 0
        r.consecutive_failures += 1
        r.restarts += 1
        delay = backoff_delay(r.consecutive_failures)
        log.warning("replica_failed", replica_id=r.replica_id, model=r.model, pid=r.pid, reason=reason,
                    restarts=r.restarts, relaunch_in=delay)
        r.last_failure = reason
        r.state = "pending"
        r.pid = 0
        r.instance_id = ""
        r.ready_at = 0.0
        r.next_launch_at = now + delay
        self._next_check.pop(r.replica_id, None)

    def _launch(self, r: ReplicaState, m: ModelSpec, now: float) -> None:
        c = self.config
        argv = ["worker", "--namespace", self.ns, "--etcd-endpoints", c.etcd_endpoints, "--nats-url", c.nats_url,
                "--replica-id", r.replica_id, *m.worker_args()]
        env = dict(m.env)
        # credentials by environment, not on the command line (ps shows argv to everyone)
        for name, value in (("DYNRT_ETCD_USER", c.etcd_user), ("DYNRT_ETCD_PASSWORD", c.etcd_password),
                            ("DYNRT_ETCD_CA", c.etcd_ca), ("DYNRT_ETCD_CERT", c.etcd_cert),
                            ("DYNRT_ETCD_KEY", c.etcd_key), ("DYNRT_NATS_CREDS", c.nats_creds)):
            if value:
                env[name] = value
        try:
            pid, log_path = self.launcher.launch(r.replica_id, argv, env)
        except OSError as exc:
            self._failed(r, f"launch failed: {exc}", now)
            return
        r.digest = m.launch_digest()
        r.pid, r.host, r.log_path = pid, self.launcher.host, log_path
        r.state = "starting"
        r.started_at = now
        r.last_healthy_at = now
        r.next_launch_at = 0.0
        self._next_check[r.replica_id] = 0.0

    def _new_replica(self, m: ModelSpec, now: float) -> ReplicaState:
        r = ReplicaState(replica_id=f"{_token(m.name)[:24]}-{uuid.uuid4().hex[:8]}", model=m.name,
                         digest=m.launch_digest(), created_at=now, next_launch_at=now)
        self.replicas[r.replica_id] = r
        log.info("replica_created", replica_id=r.replica_id, model=m.name)
        return r

    def _drain(self, r: ReplicaState, now: float, reason: str) -> None:
        if r.state == "pending" or r.pid == 0:
            log.info("replica_removed", replica_id=r.replica_id, model=r.model, reason=reason)
            self._forget(r)
            return
        log.info("replica_draining", replica_id=r.replica_id, model=r.model, pid=r.pid, reason=reason)
        r.state = "draining"
        r.drain_started_at = now
        self.launcher.signal(r.pid, signal.SIGTERM)

    def _kill(self, r: ReplicaState, reason: str) -> None:
        log.warning("replica_killing", replica_id=r.replica_id, model=r.model, pid=r.pid, reason=reason)
        self._kill_reasons[r.replica_id] = reason
        self.launcher.signal(r.pid, signal.SIGKILL)

    # -- reconcile --------------------------------------------------------------------
    async def _reconcile(self) -> None:
        now = time.time()
        spec = self.spec_record.spec if self.spec_record else DeploymentSpec(models=[])
        models = {m.name: m for m in spec.models}
        # 1. process deaths, overdue drains
        for r in list(self.replicas.values()):
            if r.state not in LIVE or r.pid == 0:
                continue
            if not self.launcher.alive(r.replica_id, r.pid):
                code = self.launcher.exit_code(r.pid)
                if r.state == "draining":
                    log.info("replica_drained", replica_id=r.replica_id, model=r.model, pid=r.pid, exit_code=code)
                    self._forget(r)
                else:
                    why = self._kill_reasons.pop(r.replica_id, "") or \
                        f"process exited ({'code ' + str(code) if code is not None else 'not our child'})"
                    self._failed(r, why, now)
                continue
            if r.state == "draining":
                m = models.get(r.model)
                limit = (m.drain_timeout if m else 30.0) + DRAIN_GRACE
                if now - r.drain_started_at > limit:
                    self._kill(r, "drain overdue")
        # 2. models no longer in the spec
        for r in list(self.replicas.values()):
            if r.model not in models and r.state != "draining":
                self._drain(r, now, "model removed from spec")
        # 3. per model: autoscaler, scaling and rolling update, launches, health checks
        for m in spec.models:
            desired = self._autoscale(m, now)
            self._scale(m, desired, now)
            for r in [r for r in self.replicas.values() if r.model == m.name]:
                if r.state == "pending" and now >= r.next_launch_at \
                        and replica_key(self.ns, r.model, r.replica_id) in self._written:
                    # launched only once its slot is stored: a controller dying right
                    # after the launch finds the process again (``Launcher.find``)
                    self._launch(r, m, now)
                elif r.state in ("starting", "ready", "unhealthy"):
                    self._maybe_check(r, m, now)

    def _scale(self, m: ModelSpec, desired: int, now: float) -> None:
        digest = m.launch_digest()
        members = [r for r in self.replicas.values() if r.model == m.name and r.state != "draining"]
        for r in members:
            if r.state == "pending" and r.digest != digest:
                r.digest = digest  # not running: it simply starts with the new spec
        current = [r for r in members if r.digest == digest]
        outdated = [r for r in members if r.digest != digest]
        missing = desired - len(current)
        if missing > 0:
            if not outdated:
                for _ in range(missing):
                    self._new_replica(m, now)
            elif not any(r.state in ("pending", "starting") for r in current):
                self._new_replica(m, now)  # rolling update: one surge replica at a time
        ready_current = sum(1 for r in current if r.state == "ready")
        while outdated and ready_current + len(outdated) - 1 >= desired:
            victim = min(outdated, key=self._drain_order)
            outdated.remove(victim)
            self._drain(victim, now, "rolling update")
        if not outdated and len(current) > desired:
            for victim in sorted(current, key=self._drain_order)[:len(current) - desired]:
                self._drain(victim, now, "scale down")

    def _drain_order(self, r: ReplicaState) -> tuple[int, float]:
        """Not-yet-serving replicas first, then the least loaded."""
        rank = {"pending": 0, "starting": 1, "unhealthy": 2, "ready": 3}.get(r.state, 4)
        load = 0.0
        if r.instance_id in self.loads:
            report = self.loads[r.instance_id][0]
            load = report.running + report.waiting
        return rank, load

    # -- health checks ---------------------------------------------------------------
    def _maybe_check(self, r: ReplicaState, m: ModelSpec, now: float) -> None:
        if r.replica_id in self._checking:
            return
        if now < self._next_check.get(r.replica_id, 0.0):
            return
        period = m.health_check.period if r.state == "ready" else min(0.5, m.health_check.period)
        self._next_check[r.replica_id] = now + period
        self._checking.add(r.replica_id)
        self._spawn(self._check(r, m))

    async def _check(self, r: ReplicaState, m: ModelSpec) -> None:
        pid = r.pid
        started = time.monotonic()
        try:
            healthy, why = await self._probe(r, m)
        finally:
            self._checking.discard(r.replica_id)
        if r.pid != pid or r.state not in ("starting", "ready", "unhealthy") or not self.is_leader:
            return  # it changed while we were asking
        if not healthy and time.monotonic() - started > m.health_check.period + 3.0:
            return  # the probe outlived its own timeouts: we were stalled, not the replica
        now = time.time()
        if healthy:
            if r.state != "ready":
                log.info("replica_ready", replica_id=r.replica_id, model=r.model, pid=r.pid,
                         instance_id=r.instance_id, after=round(now - r.started_at, 2))
                if r.state == "starting":
                    r.ready_at = now
            r.state = "ready"
            r.last_healthy_at = now
            if not r.ready_at:
                r.ready_at = now
            if r.ready_at and now - r.ready_at >= BACKOFF_RESET:
                r.consecutive_failures = 0
            return
        if r.state == "starting":
            if now - r.started_at > m.startup_timeout:
                self._kill(r, f"startup timeout ({m.startup_timeout}s): {why}")
            return
        if r.state == "ready":
            log.warning("replica_unhealthy", replica_id=r.replica_id, model=r.model, pid=r.pid, reason=why)
            r.state = "unhealthy"
        if now - r.last_healthy_at > m.health_check.timeout:
            self._kill(r, f"health check failing for {m.health_check.timeout}s: {why}")

    async def _probe(self, r: ReplicaState, m: ModelSpec) -> tuple[bool, str]:
        found = self._record_for(r)
        if found is None:
            return False, "not registered"
        record = found[1]
        r.instance_id = record.instance_id
        if record.draining:
            return False, "instance is draining"
        assert self.transport is not None and self.http is not None
        timeout = max(0.2, min(2.0, m.health_check.period, m.health_check.timeout / 2))

        async def ping() -> str:
            try:
                await self.transport.ping(record.subject, timeout)  # type: ignore[union-attr]
                return ""
            except Exception as exc:
                return f"ping: {type(exc).__name__}"

        async def http() -> str:
            host = "127.0.0.1" if record.host == socket.gethostname() else record.host
            url = f"http://{host}:{record.system_port}/health"
            try:
                async with self.http.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:  # type: ignore[union-attr]
                    return "" if resp.status == 200 else f"/health {resp.status}"
            except Exception as exc:
                return f"/health: {type(exc).__name__}"

        errors = [e for e in await asyncio.gather(ping(), http()) if e]
        return (not errors), "; ".join(errors)

    # -- autoscaling ------------------------------------------------------------------
    def _model_load(self, m: ModelSpec) -> tuple[float, int] | None:
        """(total load, ready replicas with a fresh report) by the model's metric."""
        assert m.autoscaling is not None
        now = time.monotonic()
        total, n = 0.0, 0
        for r in self.replicas.values():
            if r.model != m.name or r.state != "ready" or r.instance_id not in self.loads:
                continue
            report, at = self.loads[r.instance_id]
            if now - at > LOAD_FRESH:
                continue
            n += 1
            if m.autoscaling.metric == "in_flight":
                total += report.running + report.waiting
            elif m.autoscaling.metric == "waiting":
                total += report.waiting
            else:
                total += report.kv_usage
        return (total, n) if n else None

    def _autoscale(self, m: ModelSpec, now: float) -> int:
        a = m.autoscaling
        if a is None:
            self.autoscalers.pop(m.name, None)
            return m.initial_replicas
        top = m.ceiling
        state = self.autoscalers.get(m.name)
        if state is None:
            state = AutoscalerState(model=m.name, target_replicas=m.initial_replicas)
            self.autoscalers[m.name] = state
        state.target_replicas = max(m.min_replicas, min(top, state.target_replicas))
        if now - self._last_sample.get(m.name, 0.0) >= SAMPLE_EVERY:
            self._last_sample[m.name] = now
            measured = self._model_load(m)
            if measured is not None:
                state.samples.append((now, measured[0]))
            state.samples = [s for s in state.samples if now - s[0] <= a.window]
            self._decide(m, state, now)
        return state.target_replicas

    def _decide(self, m: ModelSpec, state: AutoscalerState, now: float) -> None:
        a = m.autoscaling
        assert a is not None
        if not state.samples:
            return
        current = state.target_replicas
        recent = [v for t, v in state.samples if now - t <= max(SAMPLE_EVERY * 1.5, a.window / 3)]
        up_load = sum(recent) / len(recent) if recent else 0.0
        want_up = max(m.min_replicas, min(m.ceiling, math.ceil(up_load / a.target - 1e-9)))
        since = now - state.last_scale_at
        if want_up > current and since >= a.upscale_cooldown:
            self._record_decision(state, current, want_up, up_load, "load above target", now)
            return
        # samples are ~1 s apart and pruned past the window: "full" = spanning it
        window_full = now - state.samples[0][0] >= max(0.0, a.window - 1.5 * SAMPLE_EVERY)
        down_load = max(v for _, v in state.samples)
        want_down = max(m.min_replicas, min(m.ceiling, math.ceil(down_load / a.target - 1e-9)))
        if want_down < current and window_full and since >= a.downscale_cooldown:
            self._record_decision(state, current, want_down, down_load, "load below target for the window", now)

    def _record_decision(self, state: AutoscalerState, old: int, new: int, load: float, reason: str,
                         now: float) -> None:
        log.info("autoscaler_decision", model=state.model, from_replicas=old, to_replicas=new,
                 load=round(load, 2), reason=reason)
        state.target_replicas = new
        state.last_scale_at = now
        state.decisions = [*state.decisions, Decision(at=now, from_replicas=old, to_replicas=new,
                                                      load=round(load, 3), reason=reason)][-MAX_DECISIONS:]

    # -- persistence ------------------------------------------------------------------
    async def _persist(self) -> None:
        wanted: dict[str, bytes] = {}
        for r in self.replicas.values():
            wanted[replica_key(self.ns, r.model, r.replica_id)] = _json.encode(r)
        for model, state in self.autoscalers.items():
            wanted[autoscaler_key(self.ns, model)] = _json.encode(state)
        ops: list[tuple[str, bytes | None]] = [(k, v) for k, v in wanted.items() if self._written.get(k) != v]
        ops += [(k, None) for k in self._written if k not in wanted]
        if not ops:
            return
        for i in range(0, len(ops), 64):  # etcd's default max ops per transaction is 128
            chunk = ops[i:i + 64]
            await self._fenced(chunk)
            for k, v in chunk:
                if v is None:
                    self._written.pop(k, None)
                else:
                    self._written[k] = v

    # -- stop -------------------------------------------------------------------------
    async def _stop_all_replicas(self) -> None:
        """``--stop-replicas-on-exit``: drain every replica and forget them."""
        now = time.time()
        live = [r for r in self.replicas.values() if r.state in LIVE and r.pid]
        for r in live:
            if r.state != "draining":
                self._drain(r, now, "controller stopping")
        deadline = time.monotonic() + max([30.0] + [m.drain_timeout + 5 for m in
                                                      (self.spec_record.spec.models if self.spec_record else [])])
        while time.monotonic() < deadline and any(self.launcher.alive(r.replica_id, r.pid) for r in live):
            await asyncio.sleep(0.1)
        for r in live:
            if self.launcher.alive(r.replica_id, r.pid):
                self.launcher.signal(r.pid, signal.SIGKILL)
        self.replicas.clear()
        self.autoscalers.clear()
        try:
            await self._persist()
        except (LostLeadership, EtcdUnavailable, *ETCD_ERRORS) as exc:
            log.warning("controller_final_persist_failed", error=str(exc))
        log.info("controller_replicas_stopped", replicas=len(live))


async def wait_rollout(etcd: EtcdClient, ns: str, generation: int, timeout: float) -> bool:
    """True once every replica runs the spec of ``generation`` (or later), is ready,
    and each model has as many as it should (no draining ones left)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            record = await read_spec(etcd, ns)
            replicas = await read_replicas(etcd, ns)
            _, scalers = await etcd.get_prefix(controller_prefix(ns) + "autoscaler/")
        except (EtcdUnavailable, *ETCD_ERRORS):
            await asyncio.sleep(0.5)
            continue
        if record is not None and record.generation >= generation:
            targets = {}
            for value in scalers.values():
                s = autoscaler_decoder.decode(value)
                targets[s.model] = s.target_replicas
            done = True
            for m in record.spec.models:
                mine = [r for r in replicas if r.model == m.name]
                want = targets.get(m.name, m.initial_replicas) if m.autoscaling else m.initial_replicas
                digest = m.launch_digest()
                if len(mine) != want or any(r.state != "ready" or r.digest != digest for r in mine):
                    done = False
            if done and not [r for r in replicas if r.model not in {m.name for m in record.spec.models}]:
                return True
        await asyncio.sleep(0.25)
    return False
