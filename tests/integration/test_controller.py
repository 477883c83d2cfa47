"""``dynrt controller`` with live processes: real etcd and NATS (session fixtures), a
real controller, real ``dynrt worker`` replicas it launches, a real frontend taking
load. Periods are short (1 s) so failures are seen fast.

The replicas outlive their controller by design, so every test ends by killing what
its namespace started (controllers first, then every process whose command line names
the test's unique namespace).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import yaml

from dynrt.runtime.discovery import EtcdClient
from dynrt.runtime.embedded import EtcdServer, NatsServer
from dynrt.runtime.procs import all_pids, is_running, read_cmdline, send_signal
from dynrt.runtime.protocol import InstanceRecord, instance_record_decoder, instances_prefix
from dynrt.controller.records import (
    AutoscalerState,
    ReplicaState,
    autoscaler_decoder,
    autoscaler_key,
    leader_decoder,
    leader_key,
    read_replicas,
)
from harness.frontend import FrontendProcess
from harness.processes import spawn_dynrt

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

MODEL = "mock-model"
PERIOD = 1.0


def model_spec(name: str = MODEL, replicas: int = 2, *, timeout: float = 4.0, **extra: Any) -> dict[str, Any]:
    args = {"speedup": 1, "num-blocks": 1024, "canary-after": 0, "health-period": 0, "load-interval": 0.1}
    args.update(extra.pop("args", {}))
    return {"name": name, "engine": "mock", "replicas": replicas, "args": args, "drain_timeout": 20,
            "health_check": {"period": PERIOD, "timeout": timeout}, **extra}


@dataclass
class Env:
    tmp: Path
    namespace: str
    etcd_server: EtcdServer
    nats_server: NatsServer
    etcd: EtcdClient
    controllers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    frontends: list[FrontendProcess] = field(default_factory=list)

    def flags(self) -> list[str]:
        return ["--namespace", self.namespace, "--etcd-endpoints", self.etcd_server.endpoint,
                "--nats-url", self.nats_server.url]

    def write_spec(self, name: str, models: list[dict[str, Any]]) -> Path:
        path = self.tmp / name
        path.write_text(yaml.safe_dump({"models": models}))
        return path

    async def start_controller(self, spec: Path | None, name: str, *, wait_elected: bool = True) -> "Ctl":
        log_path = self.tmp / f"{name}.log"
        argv = ["controller", *self.flags(), "--state-dir", str(self.tmp / "state"), "--election-ttl", "2",
                "--tick", "0.1"]
        if spec is not None:
            argv += ["-f", str(spec)]
        proc = spawn_dynrt(argv, log_path)
        self.controllers.append(proc)
        ctl = Ctl(proc, log_path)
        if wait_elected:
            await ctl.wait_event("controller_recovered", 30)
        return ctl

    async def replicas(self, model: str | None = None) -> list[ReplicaState]:
        return sorted([r for r in await read_replicas(self.etcd, self.namespace) if model is None or r.model == model],
                      key=lambda r: r.created_at)

    async def instances(self) -> list[InstanceRecord]:
        _, values = await self.etcd.get_prefix(instances_prefix(self.namespace))
        return [instance_record_decoder.decode(v) for v in values.values()]

    async def wait_ready(self, count: int, model: str = MODEL, timeout: float = 30.0) -> list[ReplicaState]:
        """Exactly ``count`` replicas of ``model``, all ready and registered, none draining."""
        result: list[ReplicaState] = []

        async def check() -> bool:
            nonlocal result
            replicas = await self.replicas(model)
            records = {(i.replica_id, i.pid) for i in await self.instances() if not i.draining}
            result = replicas
            return len(replicas) == count and all(r.state == "ready" and (r.replica_id, r.pid) in records
                                                  for r in replicas)

        await async_wait(check, timeout, f"{count} ready replicas of {model}", lambda: result)
        return result

    async def autoscaler(self, model: str = MODEL) -> AutoscalerState | None:
        raw = await self.etcd.get(autoscaler_key(self.namespace, model))
        return None if raw is None else autoscaler_decoder.decode(raw)


@dataclass
class Ctl:
    proc: subprocess.Popen[bytes]
    log_path: Path

    def events(self, name: str) -> list[dict[str, str]]:
        out = []
        for line in self.log_text().splitlines():
            if f"event={name} " in line or line.endswith(f"event={name}"):
                out.append(dict(m.group(1, 2) for m in re.finditer(r'(\w+)=("[^"]*"|\S+)', line)))
        return out

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def wait_event(self, name: str, timeout: float, count: int = 1) -> list[dict[str, str]]:
        deadline = time.monotonic() + timeout
        while len(self.events(name)) < count:
            if self.proc.poll() is not None:
                raise AssertionError(f"controller exited ({self.proc.returncode}) before {name}:\n{self.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {name} x{count} after {timeout}s:\n{self.log_text()[-3000:]}")
            await asyncio.sleep(0.05)
        return self.events(name)


async def async_wait(check: Any, timeout: float, what: str, last: Any = lambda: None) -> float:
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last()!r}")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


def pid_alive(pid: int) -> bool:
    return is_running(pid)


def kill_namespace_processes(namespace: str) -> None:
    """SIGKILL every process whose command line names ``namespace`` (unique per test)."""
    for pid in all_pids():
        if pid != os.getpid() and namespace in (read_cmdline(pid) or []):
            send_signal(pid, signal.SIGKILL)


@pytest.fixture
async def env(etcd_server: EtcdServer, nats_server: NatsServer, namespace: str,
              tmp_path: Path) -> AsyncIterator[Env]:
    e = Env(tmp_path, namespace, etcd_server, nats_server, EtcdClient(etcd_server.endpoint))
    try:
        yield e
    finally:
        for fe in e.frontends:
            await fe.stop(5)
        for proc in e.controllers:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        kill_namespace_processes(namespace)
        await e.etcd.close()


class Load:
    """``concurrency`` clients sending chat requests back to back through a frontend;
    every answer must be complete (``max_tokens`` tokens, finish_reason length)."""

    def __init__(self, url: str, concurrency: int, max_tokens: int = 60) -> None:
        self.url = url
        self.concurrency = concurrency
        self.max_tokens = max_tokens
        self.ok = 0
        self.failures: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "Load":
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(self.concurrency)]
        return self

    async def _client(self, i: int) -> None:
        assert self._session is not None
        n = 0
        while not self._stop.is_set():
            n += 1
            body = {"model": MODEL, "messages": [{"role": "user", "content": f"client {i} request {n}"}],
                    "max_tokens": self.max_tokens, "ignore_eos": True, "stream": n % 2 == 0}
            try:
                async with self._session.post(f"{self.url}/v1/chat/completions", json=body) as resp:
                    raw = await resp.read()
                    if resp.status != 200:
                        self.failures.append(f"HTTP {resp.status}: {raw[:200]!r}")
                        continue
                    if body["stream"]:
                        text = raw.decode()
                        chunks = [msgspec.json.decode(line[6:]) for line in text.splitlines()
                                  if line.startswith("data: {")]
                        finish = [c["choices"][0].get("finish_reason") for c in chunks if c.get("choices")]
                        if not text.rstrip().endswith("data: [DONE]") or "length" not in finish or \
                                any("error" in c for c in chunks):
                            self.failures.append(f"bad stream: {text[-300:]!r}")
                            continue
                    else:
                        doc = msgspec.json.decode(raw)
                        if doc["usage"]["completion_tokens"] != self.max_tokens or \
                                doc["choices"][0]["finish_reason"] != "length":
                            self.failures.append(f"incomplete: {raw[:300]!r}")
                            continue
                    self.ok += 1
            except Exception as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")

    async def __aexit__(self, *exc: Any) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        if self._session is not None:
            await self._session.close()


async def start_frontend(e: Env, instances: int) -> FrontendProcess:
    fe = FrontendProcess(e.tmp, namespace=e.namespace, etcd_endpoints=e.etcd_server.endpoint,
                         nats_url=e.nats_server.url, expect_instances=instances)
    e.frontends.append(fe)
    return await fe.start()


# ---------------------------------------------------------------------------


async def test_killed_replica_is_replaced_within_period_plus_2s(env: Env) -> None:
    ctl = await env.start_controller(env.write_spec("d.yaml", [model_spec(replicas=2)]), "ctl")
    before = await env.wait_ready(2)
    victim, other = before
    os.kill(victim.pid, signal.SIGKILL)
    killed_at = time.monotonic()

    async def replaced() -> bool:
        return any(i.replica_id == victim.replica_id and i.pid != victim.pid and not i.draining
                   for i in await env.instances())

    took = await async_wait(replaced, PERIOD + 2.0, "replacement registered")
    assert took <= PERIOD + 2.0, took
    after = await env.wait_ready(2)
    by_id = {r.replica_id: r for r in after}
    assert set(by_id) == {victim.replica_id, other.replica_id}
    assert by_id[victim.replica_id].pid != victim.pid and by_id[victim.replica_id].restarts == 1
    assert by_id[victim.replica_id].last_failure == "process exited (code -9)"
    assert (by_id[other.replica_id].pid, by_id[other.replica_id].restarts) == (other.pid, 0)
    # the dead instance's record was removed at once, not left to its lease
    assert sorted((i.replica_id, i.pid) for i in await env.instances()) == sorted((r.replica_id, r.pid) for r in after)
    failed = ctl.events("replica_failed")
    assert [(f["replica_id"], f["relaunch_in"]) for f in failed] == [(victim.replica_id, "0.0")]
    print(f"replaced (registered) {took:.2f}s after SIGKILL; {time.monotonic() - killed_at:.2f}s until ready")


async def test_failing_health_check_and_hung_replica_are_replaced(env: Env) -> None:
    """A replica whose engine health check fails (it deregisters and exits 1) is
    relaunched with exponential backoff; a hung one (SIGSTOP: no pong, no /health) is
    SIGKILLed after the timeout and replaced."""
    sick = model_spec("sick", replicas=1, args={"fail-health-check": True, "health-period": 0.5})
    hung = model_spec("hung", replicas=1, timeout=3.0)
    ctl = await env.start_controller(env.write_spec("d.yaml", [sick, hung]), "ctl")
    [h] = await env.wait_ready(1, "hung")
    # sick: fails, relaunched at once, then after 1 s, then 2 s (backoff doubling)
    failed = await ctl.wait_event("replica_failed", 25, count=3)
    sick_failures = [f for f in failed if f["model"] == "sick"][:3]
    assert [f["relaunch_in"] for f in sick_failures] == ["0.0", "1.0", "2.0"]
    assert [f["restarts"] for f in sick_failures] == ["1", "2", "3"]
    assert all(f["reason"] == '"process exited (code 1)"' for f in sick_failures)
    assert len({f["pid"] for f in sick_failures}) == 3
    sick_logs = list((env.tmp / "state" / "replicas").glob("sick-*.log"))
    assert len(sick_logs) == 1  # one slot, relaunched: its log file grows
    assert sick_logs[0].read_text().count("event=worker_unhealthy") >= 3
    # hung: SIGSTOP → unhealthy → killed after 3 s of failing checks → replaced
    os.kill(h.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    kills = await ctl.wait_event("replica_killing", 15)
    took = time.monotonic() - stopped_at
    assert [k["replica_id"] for k in kills] == [h.replica_id]
    assert kills[0]["reason"].startswith('"health check failing for 3.0s: ping: PingTimeoutError')
    # last good check at most one period before the stop; killed once 3 s have passed
    assert 3.0 - PERIOD <= took <= 3.0 + 2 * PERIOD + 1.5, took

    async def hung_replaced() -> bool:
        rs = await env.replicas("hung")
        return len(rs) == 1 and rs[0].state == "ready" and rs[0].pid != h.pid

    await async_wait(hung_replaced, 15, "hung replica replaced")
    [h2] = await env.replicas("hung")
    assert (h2.replica_id, h2.restarts) == (h.replica_id, 1)
    assert h2.last_failure.startswith("health check failing for 3.0s")
    assert not pid_alive(h.pid)


async def test_controller_sigkill_under_load_then_restart_adopts_same_pids(env: Env) -> None:
    spec = env.write_spec("d.yaml", [model_spec(replicas=2, timeout=5.0)])
    ctl = await env.start_controller(spec, "ctl1")
    before = await env.wait_ready(2)
    fe = await start_frontend(env, 2)
    async with Load(fe.url, concurrency=6) as load:
        await asyncio.sleep(1.0)
        ctl.proc.kill()
        ctl.proc.wait()
        await asyncio.sleep(2.0)  # serving goes on without a controller
        served_without = load.ok
        ctl2 = await env.start_controller(spec, "ctl2")
        await asyncio.sleep(2.0)  # a few health-check periods under the new controller
    assert load.failures == [] and load.ok > 0 and served_without > 0
    [recovered] = ctl2.events("controller_recovered")
    assert (recovered["replicas"], recovered["adopted"], recovered["relaunching"]) == ("2", "2", "0")
    assert ctl2.events("replica_launched") == [] and ctl2.events("replica_failed") == []
    after = await env.wait_ready(2)
    assert [(r.replica_id, r.pid, r.restarts) for r in after] == [(r.replica_id, r.pid, 0) for r in before]
    assert sorted(i.pid for i in await env.instances()) == sorted(r.pid for r in before)
    print(f"{load.ok} requests, 0 failed; {served_without} completed before the new controller")


async def test_worker_killed_while_controller_down_is_replaced_on_return(env: Env) -> None:
    spec = env.write_spec("d.yaml", [model_spec(replicas=2)])
    ctl = await env.start_controller(spec, "ctl1")
    a, b = await env.wait_ready(2)
    ctl.proc.kill()
    ctl.proc.wait()
    os.kill(a.pid, signal.SIGKILL)
    await asyncio.sleep(1.5)
    assert [(r.replica_id, r.pid) for r in await env.replicas()] == [(a.replica_id, a.pid), (b.replica_id, b.pid)]
    ctl2 = await env.start_controller(spec, "ctl2")
    [recovered] = ctl2.events("controller_recovered")
    assert (recovered["adopted"], recovered["relaunching"]) == ("1", "1")
    # Until the new controller writes the relaunch, the stored state still says the dead
    # replica is ready, and its instance record outlives it until its lease expires: wait
    # for the relaunched replica, not for any two ready ones.
    after: dict[str, ReplicaState] = {}

    async def relaunched() -> bool:
        nonlocal after
        after = {r.replica_id: r for r in await env.wait_ready(2)}
        return after[a.replica_id].pid != a.pid

    await async_wait(relaunched, 30.0, "the dead replica relaunched", lambda: after)
    assert after[a.replica_id].restarts == 1
    assert after[a.replica_id].last_failure == "gone while the controller was down"
    assert (after[b.replica_id].pid, after[b.replica_id].restarts) == (b.pid, 0)
    assert [e["replica_id"] for e in ctl2.events("replica_launched")] == [a.replica_id]
    # `dynrt status` shows the controller's replicas with state and restarts
    status = await asyncio.to_thread(subprocess.run, [*spawn_argv(), "status", *env.flags()],
                                     capture_output=True, text=True, timeout=30)
    assert status.returncode == 0, status.stderr
    rows = {line.split()[0]: line.split() for line in status.stdout.splitlines()
            if line.strip().startswith(f"{MODEL}-")}
    assert {rid: (row[2], row[3], row[4]) for rid, row in rows.items()} == {
        a.replica_id: ("ready", str(after[a.replica_id].pid), "1"), b.replica_id: ("ready", str(b.pid), "0")}
    assert "controller: active" in status.stdout and "instances (2)" in status.stdout


async def test_autoscale_up_under_load_and_down_after(env: Env) -> None:
    spec = model_spec(replicas=1, min_replicas=1, max_replicas=3, timeout=5.0,
                      autoscaling={"metric": "in_flight", "target": 4, "window": 3,
                                   "upscale_cooldown": 0, "downscale_cooldown": 2})
    ctl = await env.start_controller(env.write_spec("d.yaml", [spec]), "ctl")
    [first] = await env.wait_ready(1)
    fe = await start_frontend(env, 1)
    async with Load(fe.url, concurrency=12, max_tokens=80) as load:
        up = await env.wait_ready(3, timeout=30)
        await asyncio.sleep(1.0)  # serve on 3 replicas for a moment
    assert load.failures == [] and load.ok > 0
    scaled = await env.autoscaler()
    assert scaled is not None and scaled.target_replicas == 3
    assert scaled.decisions[0].from_replicas == 1 and scaled.decisions[-1].to_replicas == 3
    assert all(d.from_replicas < d.to_replicas for d in scaled.decisions)
    ups = len(scaled.decisions)
    # load gone: after the 3 s window and the cooldown → back to min_replicas, drained
    [down] = await env.wait_ready(1, timeout=20)
    state = await env.autoscaler()
    assert state is not None and state.target_replicas == 1
    downs = state.decisions[ups:]
    assert downs and downs[0].from_replicas == 3 and downs[-1].to_replicas == 1
    assert all(d.from_replicas > d.to_replicas for d in downs) and downs[-1].load <= 4
    drained = ctl.events("replica_drained")
    assert sorted(d["pid"] for d in drained) == sorted(str(r.pid) for r in up if r.pid != down.pid)
    assert all(d["exit_code"] == "0" for d in drained)
    print(f"{load.ok} requests, 0 failed; decisions {[(d.from_replicas, d.to_replicas) for d in state.decisions]}")


async def test_rolling_update_under_load(env: Env) -> None:
    ctl = await env.start_controller(env.write_spec("d.yaml", [model_spec(replicas=2, timeout=5.0)]), "ctl")
    old = await env.wait_ready(2)
    fe = await start_frontend(env, 2)
    new_spec = env.write_spec("new.yaml", [model_spec(replicas=2, timeout=5.0, args={"max-num-seqs": 128})])
    async with Load(fe.url, concurrency=6) as load:
        await asyncio.sleep(0.5)
        apply = await asyncio.to_thread(
            subprocess.run, [*spawn_argv(), "controller", "apply", "-f", str(new_spec), *env.flags(), "--wait", "60"],
            capture_output=True, text=True, timeout=90)
        await asyncio.sleep(0.5)
    assert apply.returncode == 0, apply.stderr + apply.stdout
    assert "generation 2" in apply.stdout and "rollout finished" in apply.stdout
    assert load.failures == [] and load.ok > 0
    new = await env.wait_ready(2)
    assert {r.pid for r in new}.isdisjoint({r.pid for r in old})
    assert not any(pid_alive(r.pid) for r in old)
    # one at a time: each old replica drained only after a new one was ready
    lines = ctl.log_text().splitlines()
    sequence = [("ready" if "event=replica_ready" in l else "drain", re.search(r"replica_id=(\S+)", l).group(1))
                for l in lines if "event=replica_ready" in l or "event=replica_draining" in l]
    assert [kind for kind, _ in sequence] == ["ready", "ready", "ready", "drain", "ready", "drain"]
    assert sorted(rid for kind, rid in sequence if kind == "drain") == sorted(r.replica_id for r in old)
    assert [rid for kind, rid in sequence if kind == "ready"][2:] == [r.replica_id for r in new]
    assert sorted(d["exit_code"] for d in ctl.events("replica_drained")) == ["0", "0"]
    print(f"{load.ok} requests during the rolling update, 0 failed")


def spawn_argv() -> list[str]:
    import sys

    return [sys.executable, "-m", "dynrt.cli"]


async def test_standby_takes_over_when_active_dies(env: Env) -> None:
    spec = env.write_spec("d.yaml", [model_spec(replicas=2)])
    a = await env.start_controller(spec, "ctl-a")
    replicas = await env.wait_ready(2)
    b = await env.start_controller(spec, "ctl-b", wait_elected=False)
    await b.wait_event("controller_standby", 20)

    async def leader() -> str:
        raw = await env.etcd.get(leader_key(env.namespace))
        return "" if raw is None else leader_decoder.decode(raw).controller_id

    a_id = a.events("controller_elected")[0]["controller_id"]
    assert await leader() == a_id
    # A freezes (SIGSTOP): its lease (TTL 2 s) expires, B takes over and adopts
    a.proc.send_signal(signal.SIGSTOP)
    frozen_at = time.monotonic()
    await b.wait_event("controller_recovered", 10)
    took = time.monotonic() - frozen_at
    b_id = b.events("controller_elected")[0]["controller_id"]
    assert await leader() == b_id and 1.0 <= took <= 4.5, took
    assert b.events("controller_recovered")[0]["adopted"] == "2"
    # A wakes up: it finds its lease gone and steps down without touching a replica
    a.proc.send_signal(signal.SIGCONT)
    await a.wait_event("controller_stepped_down", 10)
    await a.wait_event("controller_standby", 10)
    # B dies (SIGKILL): A sees the holder's process is gone and takes over at once
    b.proc.kill()
    b.proc.wait()
    killed_at = time.monotonic()
    await a.wait_event("controller_recovered", 10, count=2)
    assert time.monotonic() - killed_at < 2.0
    assert await leader() == a_id
    assert a.events("controller_recovered")[1]["adopted"] == "2"
    # nothing was ever relaunched: A launched the two at the start, B none
    assert sorted(e["replica_id"] for e in a.events("replica_launched")) == sorted(r.replica_id for r in replicas)
    assert b.events("replica_launched") == [] and a.events("replica_failed") == b.events("replica_failed") == []
    after = await env.wait_ready(2)
    assert [(r.replica_id, r.pid, r.restarts) for r in after] == [(r.replica_id, r.pid, 0) for r in replicas]
