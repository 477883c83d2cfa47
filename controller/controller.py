"""``dynrt controller``: keeps a deployment's replicas at their desired state, and
survives its own death.

The ``Controller`` wires the parts together and does the I/O; the decisions are
elsewhere:

- ``election``: campaign for the ``leader`` key (standby until then), keep the lease,
  fence every write with it; losing it → step down and campaign again.
- recovery, on becoming active: read the spec, replicas and autoscaler state
  (``records``); every replica whose pid is still that replica's process is adopted as
  is (no relaunch, no duplicate); the ones that died meanwhile (or whose host
  restarted) count a failure and are relaunched; autoscaling resumes from the saved
  samples and last scale time (``state.DeploymentState.recover``).
- each pass (``tick``, 0.25 s): ``DeploymentState.reconcile`` — process deaths →
  failure + relaunch with backoff, due health checks (``probe``: NATS ping + ``/health``;
  failing for ``timeout`` → SIGKILL + relaunch; a new replica has ``startup_timeout``),
  autoscaling (``autoscaler``), scaling and rolling updates (surge one current-digest
  replica, wait until it is healthy, drain one outdated replica with SIGTERM, repeat)
  — then write what changed (``election.FencedStore``).

It watches the instance records (to probe and remove them), the spec key (``dynrt
controller apply``) and the workers' load reports (autoscaling, drain order).
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import time
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from nats.aio.msg import Msg

from dynrt.controller.autoscaler import LOAD_FRESH
from dynrt.controller.election import FencedStore, LeaderElection, LostLeadership
from dynrt.controller.launcher import Launcher, LocalProcessLauncher, replica_command
from dynrt.controller.probe import probe_instance, probe_timeout
from dynrt.controller.records import (
    ReplicaState,
    SpecRecord,
    autoscaler_key,
    encode,
    read_autoscalers,
    read_replicas,
    read_spec,
    replica_key,
    spec_key,
    spec_record_decoder,
    write_spec,
)
from dynrt.controller.spec import DeploymentSpec, ModelSpec, spec_digest
from dynrt.controller.state import DeploymentState
from dynrt.runtime.config import ControllerConfig
from dynrt.runtime.discovery import ETCD_ERRORS, EtcdClient, EtcdUnavailable, PrefixWatcher
from dynrt.runtime.lifecycle import GracefulShutdown, cancel_and_wait
from dynrt.runtime.log import get_logger
from dynrt.runtime.protocol import (
    InstanceRecord,
    LoadReport,
    instance_record_decoder,
    instances_prefix,
    load_report_decoder,
    load_subject_wildcard,
)
from dynrt.runtime.transport import NatsTransport

log = get_logger("controller")


class Controller:
    def __init__(self, config: ControllerConfig, launcher: Launcher | None = None,
                 seed: tuple[DeploymentSpec, str] | None = None) -> None:
        self.config = config
        self.ns = config.namespace
        self.controller_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        state_dir = Path(config.state_dir or Path.home() / ".local" / "state" / "dynrt" / config.namespace)
        self.seed = seed
        self.etcd = EtcdClient.from_config(config)
        self.election = LeaderElection(self.etcd, self.ns, config.election_ttl, self.controller_id)
        self.store = FencedStore(self.election)
        self.state = DeploymentState(launcher or LocalProcessLauncher(state_dir / "replicas"),
                                     functools.partial(replica_command, config), self)
        self.transport: NatsTransport | None = None
        self.http: aiohttp.ClientSession | None = None
        self.shutdown = GracefulShutdown()
        self.spec_record: SpecRecord | None = None
        self.instances: dict[str, InstanceRecord] = {}  # etcd key → record
        self.loads: dict[str, tuple[LoadReport, float]] = {}  # instance id → (report, monotonic time)
        self._last_tick = 0.0
        self._instance_watcher: PrefixWatcher | None = None
        self._spec_watcher: PrefixWatcher | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- run ------------------------------------------------------------------------
    async def run(self) -> int:
        self.shutdown.install_signal_handlers()
        await self._start()
        log.info("controller_started", controller_id=self.controller_id, namespace=self.ns)
        stop = asyncio.create_task(self.shutdown.wait())
        try:
            while not self.shutdown.requested.is_set() and await self._term(stop):
                pass
        finally:
            await cancel_and_wait(stop)
            if self.election.is_leader and self.config.stop_replicas_on_exit:
                await self._stop_all_replicas()
            await self._step_down(revoke=True)
            await self._close()
        log.info("controller_stopped", controller_id=self.controller_id)
        return 0

    async def _term(self, stop: asyncio.Task[None]) -> bool:
        """Campaign, then lead until leadership is lost (True: campaign again) or the
        controller is stopping (False)."""
        campaign = asyncio.create_task(self.election.campaign(self.shutdown.requested))
        await asyncio.wait({campaign, stop}, return_when=asyncio.FIRST_COMPLETED)
        if not campaign.done():
            await cancel_and_wait(campaign)
            return False
        if not campaign.result():
            return False
        lead = asyncio.create_task(self._lead())
        lost = asyncio.create_task(self.election.lost.wait())
        await asyncio.wait({lead, lost, stop}, return_when=asyncio.FIRST_COMPLETED)
        for task in (lead, lost):
            if not task.done():
                await cancel_and_wait(task)
        if lead.done() and not lead.cancelled() and lead.exception() is not None:
            log.error("controller_lead_failed", error=repr(lead.exception()))
        if self.shutdown.requested.is_set():
            return False
        log.warning("controller_stepped_down", controller_id=self.controller_id)
        await self._step_down(revoke=False)
        await asyncio.sleep(0.5)
        return True

    async def _start(self) -> None:
        self.transport = await NatsTransport.connect(self.config.nats_url, name=f"controller-{self.controller_id}",
                                                     creds_file=self.config.nats_creds)
        await self.transport.subscribe(load_subject_wildcard(self.ns), self._on_load)
        self.http = aiohttp.ClientSession()
        if self.seed is not None:
            await self._seed_spec(*self.seed)
        self._instance_watcher = PrefixWatcher(self.etcd, instances_prefix(self.ns), self._on_instance_put,
                                               self._on_instance_delete)
        await self._instance_watcher.start(wait=30)
        self._spec_watcher = PrefixWatcher(self.etcd, spec_key(self.ns), self._on_spec_put, lambda k: None)
        await self._spec_watcher.start(wait=30)

    async def _close(self) -> None:
        await asyncio.gather(*(cancel_and_wait(task) for task in list(self._tasks)))
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

    async def _on_load(self, msg: Msg) -> None:
        try:
            report = load_report_decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        self.loads[report.instance_id] = (report, time.monotonic())

    # -- leading --------------------------------------------------------------------
    async def _lead(self) -> None:
        await self._recover()
        while True:
            try:
                if not self.election.lease_fresh():
                    await asyncio.sleep(self.config.tick)
                    continue
                gap = time.monotonic() - self._last_tick
                self._last_tick = time.monotonic()
                if gap > max(2.0, 8 * self.config.tick):
                    # We were not running (frozen, overloaded): health clocks restart now.
                    self.state.restart_health_clocks(time.time())
                self._reconcile()
                await self._persist()
            except LostLeadership:
                log.error("controller_lost_leadership", controller_id=self.controller_id)
                self.election.lost.set()
                return
            except (EtcdUnavailable, *ETCD_ERRORS) as exc:
                log.warning("controller_etcd_unavailable", error=str(exc))
            except Exception as exc:  # a bug in one pass must not end leadership
                log.error("controller_tick_failed", error=repr(exc))
            await asyncio.sleep(self.config.tick)

    async def _recover(self) -> None:
        while True:
            try:
                self.spec_record = await read_spec(self.etcd, self.ns) or self.spec_record
                stored = await read_replicas(self.etcd, self.ns)
                scalers = await read_autoscalers(self.etcd, self.ns)
                break
            except (EtcdUnavailable, *ETCD_ERRORS) as exc:
                log.warning("controller_etcd_unavailable", error=str(exc))
                await asyncio.sleep(1.0)
        self.store.forget_all()
        for r in stored:
            self.store.remember(replica_key(self.ns, r.model, r.replica_id), encode(r))
        self._last_tick = time.monotonic()
        adopted, relaunching = self.state.recover(stored, scalers, time.time())
        log.info("controller_recovered", replicas=len(stored), adopted=adopted, relaunching=relaunching,
                 generation=self.spec_record.generation if self.spec_record else 0,
                 autoscalers=len(self.state.autoscalers))

    def _reconcile(self) -> None:
        spec = self.spec_record.spec if self.spec_record else DeploymentSpec(models=[])
        now = time.monotonic()
        loads = {iid: report for iid, (report, _) in self.loads.items()}
        fresh = {iid: report for iid, (report, at) in self.loads.items() if now - at <= LOAD_FRESH}
        self.state.reconcile(spec, time.time(), loads=loads, fresh_loads=fresh)

    async def _persist(self) -> None:
        wanted = {replica_key(self.ns, r.model, r.replica_id): encode(r) for r in self.state.replicas.values()}
        wanted.update({autoscaler_key(self.ns, model): encode(a) for model, a in self.state.autoscalers.items()})
        await self.store.sync(wanted)

    async def _step_down(self, revoke: bool) -> None:
        await self.election.step_down(revoke)
        self.store.forget_all()

    async def _stop_all_replicas(self) -> None:
        """``--stop-replicas-on-exit``: drain every replica and forget them."""
        models = self.spec_record.spec.models if self.spec_record else []
        stopped = await self.state.stop_all(time.time(), max([30.0] + [m.drain_timeout + 5 for m in models]))
        try:
            await self._persist()
        except (LostLeadership, EtcdUnavailable, *ETCD_ERRORS) as exc:
            log.warning("controller_final_persist_failed", error=str(exc))
        log.info("controller_replicas_stopped", replicas=stopped)

    # -- hooks of DeploymentState ---------------------------------------------------
    def is_stored(self, r: ReplicaState) -> bool:
        return self.store.has(replica_key(self.ns, r.model, r.replica_id))

    def replica_gone(self, r: ReplicaState) -> None:
        found = self._record_for(r)
        if found is not None:
            key = found[0]
            self.instances.pop(key, None)
            self._spawn(self._delete_quietly(key))

    def start_probe(self, r: ReplicaState, m: ModelSpec) -> None:
        self._spawn(self._check(r, m))

    async def _check(self, r: ReplicaState, m: ModelSpec) -> None:
        pid = r.pid
        started = time.monotonic()
        try:
            healthy, why = await self._probe(r, m)
        finally:
            self.state.probe_finished(r.replica_id)
        if self.election.is_leader:
            self.state.probe_result(r, m, pid, healthy, why, took=time.monotonic() - started, now=time.time())

    async def _probe(self, r: ReplicaState, m: ModelSpec) -> tuple[bool, str]:
        found = self._record_for(r)
        if found is None:
            return False, "not registered"
        record = found[1]
        r.instance_id = record.instance_id
        assert self.transport is not None and self.http is not None
        return await probe_instance(self.transport, self.http, record, probe_timeout(m.health_check))

    def _record_for(self, r: ReplicaState) -> tuple[str, InstanceRecord] | None:
        for key, record in self.instances.items():
            if record.replica_id == r.replica_id and record.pid == r.pid and record.routable:
                return key, record
        return None

    async def _delete_quietly(self, key: str) -> None:
        try:
            await self.etcd.delete(key)
        except (EtcdUnavailable, *ETCD_ERRORS):
            pass

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("controller_task_failed", error=repr(task.exception()))
