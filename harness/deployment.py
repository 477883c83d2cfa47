"""A whole dynrt deployment of real processes on loopback, for tests and benchmarks:
etcd (one member or a cluster), NATS, optionally the standalone router and a controller,
then workers and frontends; plus the fault injectors the fault-tolerance suite and the
chaos benchmark use.

    async with Deployment(tmp_path, workers=3, frontends=2, etcd_members=3, router=True) as d:
        load = Load(d.urls, requests=24, concurrency=8, max_tokens=300, tag="x")
        ...
        d.send(d.workers[0], signal.SIGKILL)            # fault injectors
        await d.kill_etcd_member(await d.etcd.leader())
        await d.restart_nats(down=0.5)
        ...
        await d.assert_kv_idle()                        # checks (harness.inspection)
        assert await d.migrations() == {"killed": 3}

Every component is a subprocess with its own log file in ``log_dir`` and a health URL:
etcd members (``/health``), NATS (monitoring ``/healthz``), the standalone router and the
controller (system port ``/health``), workers (``WorkerProcess``) and frontends
(``FrontendProcess``). Children are spawned from the event loop's thread with
``dynrt.runtime.procs.spawn``, so they die with the test or benchmark process even if it
is SIGKILLed; leaving the ``async with`` stops every one of them (SIGCONT first, so
stopped processes can exit; SIGKILL after a timeout) — also when the body failed, in which
case the tail of every log is printed. ``assert_all_gone`` checks that no child is left.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import TracebackType

import aiohttp

from dynrt.runtime.embedded import EtcdServer, NatsServer, free_port
from dynrt.runtime.procs import all_pids, read_cmdline, send_signal
from harness.etcd import EtcdCluster
from harness.frontend import FrontendProcess
from harness.inspection import DeploymentView
from harness.processes import DynrtProcess, SystemPortProcess
from harness.worker import WorkerProcess

# Drains of a second and load reports every 50 ms: what the fault-tolerance scenarios run
# with, so a SIGTERMed worker leaves quickly and routing sees load changes at once.
FAST_WORKER_ARGS = ("--drain-timeout", "1", "--load-interval", "0.05")


class Deployment(DeploymentView):
    """The processes of one deployment: started in dependency order by ``start()`` (or
    ``async with``), stopped in reverse by ``stop()``; every process ever started stays
    listed (``workers``, ``frontends``, ``routers``, ``controllers``)."""

    def __init__(self, log_dir: Path, *, workers: int = 3, frontends: int = 1, etcd_members: int = 1,
                 router: bool = False, controller_spec: Path | None = None, controller_replicas: int = 0,
                 speedup: float | str = 1.0, frontend_args: Sequence[str] = (), worker_args: Sequence[str] = (),
                 router_args: Sequence[str] = (), namespace: str = "", worker_self_checks: bool = False) -> None:
        """``router``: a standalone ``dynrt router``, and frontends in ``--router-mode
        remote``. ``controller_spec``: also run ``dynrt controller -f SPEC``; it launches
        the spec's ``controller_replicas`` workers itself (``workers`` are extra).
        ``worker_self_checks``: the workers run their canary and periodic health check
        (by default both are off, so they cannot interfere with what is measured).
        ``*_args`` come last on their command lines, so they win. ``namespace``: by
        default a new one; one given must be unique on this host."""
        self.dir = Path(log_dir)
        # Unique on this host: at stop, any process still naming it is killed.
        self.namespace = namespace or "ns" + uuid.uuid4().hex[:10]
        self.num_workers = workers
        self.num_frontends = frontends
        self.speedup = speedup
        self.etcd = EtcdCluster(self.dir, etcd_members)
        self.nats = NatsServer(self.dir / "nats")
        self.with_router = router
        self.controller_spec = controller_spec
        self.controller_replicas = controller_replicas
        self.worker_self_checks = worker_self_checks
        self.worker_args = list(worker_args)
        remote = ["--router-mode", "remote", "--remote-router-timeout", "0.5"] if router else []
        self.frontend_args = [*remote, *frontend_args]
        self.router_args = list(router_args)
        self.workers: list[WorkerProcess] = []  # every worker ever started, dead ones included
        self.frontends: list[FrontendProcess] = []
        self.router: SystemPortProcess | None = None
        self.routers: list[SystemPortProcess] = []  # every router process ever started
        self.controller: SystemPortProcess | None = None
        self.controllers: list[SystemPortProcess] = []  # every controller process ever started
        self.http: aiohttp.ClientSession | None = None
        self._names = 0

    @property
    def etcd_endpoints(self) -> str:
        return self.etcd.endpoints

    # -- start / stop ---------------------------------------------------------------
    async def __aenter__(self) -> "Deployment":
        try:
            await self.start()
        except BaseException:
            self.print_logs()
            await self.stop()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if exc is not None:
            self.print_logs()
        await self.stop()
        self.assert_all_gone()

    async def start(self) -> None:
        self.http = aiohttp.ClientSession()
        await self.etcd.start()
        self.nats.port = free_port()
        await self._start_nats()
        if self.with_router:
            await self.start_router()
        if self.controller_spec is not None:
            await self.start_controller()
        await asyncio.gather(*(self.add_worker() for _ in range(self.num_workers)))
        expected = self.num_workers + self.controller_replicas
        await asyncio.gather(*(self.add_frontend(expect_instances=None) for _ in range(self.num_frontends)))
        await self.wait_instances(expected, timeout=60)

    def common_args(self) -> list[str]:
        return ["--namespace", self.namespace, "--etcd-endpoints", self.etcd.endpoints, "--nats-url", self.nats.url]

    def _name(self, kind: str) -> str:
        self._names += 1
        return f"{kind}{self._names}"

    async def add_worker(self, args: Sequence[str] = (), start_timeout: float = 60.0) -> WorkerProcess:
        """Start one more mock worker; returns once it is registered in etcd."""
        worker = self.new_worker(args, start_timeout)
        await worker.start()
        return worker

    def new_worker(self, args: Sequence[str] = (), start_timeout: float = 60.0) -> WorkerProcess:
        """A worker not yet started (``await worker.start()``, e.g. as a task while etcd is down)."""
        self_checks = None if self.worker_self_checks else 0  # None: the worker's own defaults
        worker = WorkerProcess(self.dir, namespace=self.namespace, etcd_endpoints=self.etcd.endpoints,
                               nats_url=self.nats.url, speedup=self.speedup, name=self._name("worker"),
                               args=[*self.worker_args, *args], start_timeout=start_timeout,
                               canary_after=self_checks, health_period=self_checks)
        self.workers.append(worker)
        return worker

    async def add_frontend(self, expect_instances: int | None = None, args: Sequence[str] = ()) -> FrontendProcess:
        frontend = FrontendProcess(self.dir, namespace=self.namespace, etcd_endpoints=self.etcd.endpoints,
                                   nats_url=self.nats.url, expect_instances=expect_instances,
                                   name=self._name("frontend"), args=[*self.frontend_args, *args],
                                   start_timeout=60.0)
        self.frontends.append(frontend)
        await frontend.start()
        return frontend

    async def start_controller(self) -> SystemPortProcess:
        """``dynrt controller -f SPEC`` (no system port: ready once elected). It stops its
        replicas when stopped (``--stop-replicas-on-exit``), so teardown leaves none."""
        assert self.controller_spec is not None
        controller = SystemPortProcess(self.dir, self._name("controller"), [
            "controller", "-f", str(self.controller_spec), *self.common_args(), "--election-ttl", "2",
            "--stop-replicas-on-exit", "--state-dir", str(self.dir / "controller-state")],
            ready_line="controller_elected")
        self.controllers.append(controller)
        self.controller = await controller.start(timeout=60)
        return controller

    async def start_router(self) -> SystemPortProcess:
        router = SystemPortProcess(self.dir, self._name("router"), ["router", *self.common_args(), *self.router_args])
        self.routers.append(router)
        self.router = await router.start()
        return router

    async def stop(self) -> None:
        """Stop everything: frontends first (no new requests), then the router and
        the controller, the workers, NATS and etcd. Stopped processes get SIGCONT."""
        await asyncio.gather(*(f.stop() for f in self.frontends), return_exceptions=True)
        await asyncio.gather(*(r.stop() for r in self.routers), return_exceptions=True)
        await asyncio.gather(*(c.stop(timeout=20) for c in self.controllers), return_exceptions=True)
        await asyncio.gather(*(w.stop() for w in self.workers), return_exceptions=True)
        # Anything else of this deployment (e.g. replicas a controller launched in their
        # own session) still running at this point is killed.
        for pid in self.namespace_processes():
            for sig in (signal.SIGCONT, signal.SIGKILL):
                send_signal(pid, sig)
        await asyncio.to_thread(self.nats.stop)
        await asyncio.to_thread(self.etcd.stop)
        if self.http is not None:
            await self.http.close()
            self.http = None

    # -- processes ------------------------------------------------------------------
    def dynrt_processes(self) -> list[DynrtProcess]:
        return [*self.frontends, *self.routers, *self.controllers, *self.workers]

    def children(self) -> dict[str, subprocess.Popen[bytes] | None]:
        procs: dict[str, subprocess.Popen[bytes] | None] = {p.name: p.proc for p in self.dynrt_processes()}
        for m in self.etcd.members:
            procs[m.name] = m.process.proc if m.process else None
        procs["nats"] = self.nats.process.proc if self.nats.process else None
        return procs

    def pids(self) -> dict[str, int]:
        """Every live component's pid (to prove nothing was restarted)."""
        return {name: p.pid for name, p in self.children().items() if p is not None and p.poll() is None}

    def namespace_processes(self) -> list[int]:
        """Live processes (not zombies) with this deployment's namespace as a command-line
        argument (``--namespace NS`` or ``--namespace=NS``)."""
        wanted = {self.namespace, f"--namespace={self.namespace}"}
        return [pid for pid in all_pids() if pid != os.getpid() and not wanted.isdisjoint(read_cmdline(pid) or [])]

    def namespace_processes_of(self, subcommand: str) -> list[int]:
        """Live ``dynrt SUBCOMMAND`` processes of this deployment (e.g. a controller's replicas)."""
        return [pid for pid in self.namespace_processes()
                if {subcommand, "dynrt.cli"} <= set(read_cmdline(pid) or [])]

    def assert_all_gone(self) -> None:
        left = self.pids()
        assert not left, f"processes left behind: {left}"
        strays = self.namespace_processes()
        assert not strays, f"processes of namespace {self.namespace} left behind: {strays}"

    def print_logs(self, lines: int = 40) -> None:
        """The tail of every component's log (pytest shows it for a failed test)."""
        logs = sorted(self.dir.glob("*.log")) + sorted(self.dir.glob("*/*.log"))
        for path in logs:
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            print(f"----- {path.name} (last {len(tail)} lines) -----")
            print("\n".join(tail))

    # -- fault injectors -------------------------------------------------------------
    def send(self, component: DynrtProcess, sig: int) -> None:
        """Send ``sig`` to a worker, frontend, router or controller."""
        component.send_signal(sig)

    async def restart_nats(self, down: float = 0.0) -> float:
        """Stop NATS, wait ``down`` seconds, start it on the same port; returns the
        seconds it was unreachable."""
        stopped_at = time.monotonic()
        await asyncio.to_thread(self.nats.stop)
        if down:
            await asyncio.sleep(down)
        await self._start_nats()
        return time.monotonic() - stopped_at

    async def _start_nats(self, timeout: float = 10.0) -> None:
        # A fresh monitoring port each start: while NATS was down, the old one may have
        # become some connection's ephemeral port (seen in CI: "bind: address already in
        # use"). Clients only need the client port to stay the same.
        self.nats.extra_args = ["-m", str(free_port())]
        self.nats.spawn()  # from the event loop's thread (it dies with this one), then wait in another
        await asyncio.to_thread(self.nats.wait_ready, timeout)

    async def kill_etcd_member(self, member: EtcdServer, sig: int = signal.SIGKILL) -> None:
        await asyncio.to_thread(self.etcd.kill, member, sig)

    async def restart_etcd_member(self, member: EtcdServer) -> None:
        await self.etcd.restart(member)

    async def etcd_outage(self, seconds: float, during: Callable[[], Awaitable[object]] | None = None) -> float:
        """Kill every etcd member (SIGKILL), keep them down ``seconds`` (running the
        coroutine ``during()`` meanwhile, if given), start them again from their data;
        returns the seconds etcd was down."""
        down_at = time.monotonic()
        for m in self.etcd.members:
            await asyncio.to_thread(self.etcd.kill, m)
        if during is not None:
            await during()
        await asyncio.sleep(max(0.0, seconds - (time.monotonic() - down_at)))
        for m in self.etcd.members:
            self.etcd.spawn(m)
        await self.etcd.wait_ready(self.etcd.members)
        return time.monotonic() - down_at
