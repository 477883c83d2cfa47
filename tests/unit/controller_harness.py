"""A ``DeploymentState`` with fakes around it, for the controller's unit tests: a fake
launcher (processes are pids in a dict), hooks that stand for etcd (what is stored)
and for the probes (answered by the test), and a fake clock (explicit wall times)."""

from __future__ import annotations

from typing import Any

import pytest

from dynrt.controller.records import ReplicaState
from dynrt.controller.spec import DeploymentSpec, ModelSpec, parse_spec
from dynrt.controller.state import DeploymentState
from dynrt.runtime.protocol import LoadReport

HOST = "this-host"


class FakeLauncher:
    """Processes are pids in a dict; ``exit`` ends one."""

    host = HOST

    def __init__(self) -> None:
        self.running: dict[int, str] = {}  # pid → replica id
        self.exit_codes: dict[int, int] = {}
        self.launched: list[tuple[str, list[str], dict[str, str]]] = []
        self.signals: list[tuple[int, int]] = []
        self.fail_launch: dict[str, Exception] = {}
        self.fail_signal: dict[int, Exception] = {}
        self._next_pid = 1000

    def launch(self, replica_id: str, argv: list[str], env: dict[str, str]) -> tuple[int, str]:
        if replica_id in self.fail_launch:
            raise self.fail_launch[replica_id]
        self._next_pid += 1
        self.running[self._next_pid] = replica_id
        self.launched.append((replica_id, argv, env))
        return self._next_pid, f"/logs/{replica_id}.log"

    def adopt(self, replica_id: str, pid: int, host: str) -> bool:
        return host == self.host and self.running.get(pid) == replica_id

    def find(self, replica_id: str) -> int | None:
        return next((pid for pid, rid in self.running.items() if rid == replica_id), None)

    def alive(self, replica_id: str, pid: int) -> bool:
        return self.running.get(pid) == replica_id

    def exit_code(self, pid: int) -> int | None:
        return self.exit_codes.get(pid)

    def signal(self, pid: int, sig: int) -> None:
        if pid in self.fail_signal:
            raise self.fail_signal[pid]
        self.signals.append((pid, sig))

    def exit(self, pid: int, code: int) -> None:
        del self.running[pid]
        self.exit_codes[pid] = code


class FakeHooks:
    def __init__(self) -> None:
        self.stored: set[str] = set()
        self.gone: list[tuple[str, int]] = []
        self.probes: list[tuple[ReplicaState, ModelSpec, int]] = []  # (replica, model, pid when started)
        self.fail_probe_of: set[str] = set()

    def is_stored(self, r: ReplicaState) -> bool:
        return r.replica_id in self.stored

    def replica_gone(self, r: ReplicaState) -> None:
        self.gone.append((r.replica_id, r.pid))

    def start_probe(self, r: ReplicaState, m: ModelSpec) -> None:
        if r.replica_id in self.fail_probe_of:
            raise RuntimeError("no probe for you")
        self.probes.append((r, m, r.pid))


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def command(replica_id: str, m: ModelSpec) -> tuple[list[str], dict[str, str]]:
    return ["worker", "--replica-id", replica_id, *m.worker_args()], dict(m.env)


def model(replicas: int = 2, **fields: Any) -> ModelSpec:
    """A model ``m`` (checked as a deployment file is) with 1 s health checks."""
    base = {"name": "m", "replicas": replicas, "health_check": {"period": 1, "timeout": 4}, "drain_timeout": 10}
    return parse_spec({"models": [{**base, **fields}]}).models[0]


class Harness:
    """A ``DeploymentState`` and its fakes; ``tick`` = one controller pass + persist."""

    def __init__(self, *models: ModelSpec) -> None:
        self.launcher = FakeLauncher()
        self.hooks = FakeHooks()
        self.clock = Clock()
        self.state = DeploymentState(self.launcher, command, self.hooks)
        self.spec = DeploymentSpec(models=list(models))
        self.loads: dict[str, LoadReport] = {}

    def tick(self, after: float = 0.25) -> None:
        self.state.reconcile(self.spec, self.clock.advance(after), loads=self.loads, fresh_loads=self.loads)
        self.hooks.stored = set(self.state.replicas)  # the controller persists after each pass

    def answer_probes(self, healthy: bool = True, why: str = "", took: float = 0.01) -> None:
        probes, self.hooks.probes = self.hooks.probes, []
        for r, m, pid in probes:
            self.state.probe_finished(r.replica_id)
            self.state.probe_result(r, m, pid, healthy, why, took=took, now=self.clock.now)

    def replicas(self, model: str = "m") -> list[ReplicaState]:
        return sorted((r for r in self.state.replicas.values() if r.model == model), key=lambda r: r.created_at)

    def ready(self, count: int) -> list[ReplicaState]:
        """Ticks and answers probes until ``count`` replicas (of all models) are ready;
        returns those of model ``m``."""
        for _ in range(20):
            self.tick()
            self.answer_probes()
            rs = list(self.state.replicas.values())
            if len(rs) == count and all(r.state == "ready" for r in rs):
                return self.replicas()
        raise AssertionError(f"not {count} ready: {self.state.replicas}")


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [dict(r.dynrt_fields) for r in caplog.records  # type: ignore[attr-defined]
            if getattr(r, "dynrt_fields", {}).get("_event") == name]
