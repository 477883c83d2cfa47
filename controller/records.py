"""What the controller keeps in etcd: typed records and their keys.

Every value is JSON, not leased (it outlives every process), under
``dynrt/{ns}/controller/``:

- ``leader``                     → ``LeaderRecord``, under the active controller's lease
- ``spec``                       → ``SpecRecord``: the ``DeploymentSpec``, its generation,
  the digest of the file the controller was started with
- ``replicas/{model}/{replica}`` → ``ReplicaState``: pid, host, log, state, restarts,
  start/ready/last-healthy times, the launch digest it runs
- ``autoscaler/{model}``         → ``AutoscalerState``: target count, recent load samples,
  last decisions

The controller writes them; ``dynrt controller apply`` writes the spec; ``dynrt status``
and the container probe read them.
"""

from __future__ import annotations

import time
from typing import Literal, TypeVar

import msgspec

from dynrt.controller.spec import DeploymentSpec
from dynrt.runtime.discovery import EtcdClient
from dynrt.runtime.protocol import controller_prefix, safe_token

ReplicaStatus = Literal["pending", "starting", "ready", "unhealthy", "draining"]


class ReplicaState(msgspec.Struct, kw_only=True):
    """One replica slot of a model: the controller's record of it, kept across its
    process's restarts (``restarts`` counts them)."""

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


class ControllerRecords(msgspec.Struct, kw_only=True):
    """Everything under the controller's prefix, decoded (what ``dynrt status`` shows)."""

    leader: LeaderRecord | None = None
    spec: SpecRecord | None = None
    replicas: list[ReplicaState] = []
    autoscalers: list[AutoscalerState] = []


# -- keys ---------------------------------------------------------------------------


def leader_key(ns: str) -> str:
    return controller_prefix(ns) + "leader"


def spec_key(ns: str) -> str:
    return controller_prefix(ns) + "spec"


def replicas_prefix(ns: str) -> str:
    return controller_prefix(ns) + "replicas/"


def replica_key(ns: str, model: str, replica_id: str) -> str:
    return f"{replicas_prefix(ns)}{key_token(model)}/{replica_id}"


def autoscalers_prefix(ns: str) -> str:
    return controller_prefix(ns) + "autoscaler/"


def autoscaler_key(ns: str, model: str) -> str:
    return f"{autoscalers_prefix(ns)}{key_token(model)}"


def key_token(name: str) -> str:
    """A model name as one etcd key segment (and the start of its replica ids): unlike a
    NATS subject token, an etcd key segment may hold '.'."""
    return safe_token(name, keep="-_.")


# -- encoding -----------------------------------------------------------------------

spec_record_decoder = msgspec.json.Decoder(SpecRecord)
replica_decoder = msgspec.json.Decoder(ReplicaState)
autoscaler_decoder = msgspec.json.Decoder(AutoscalerState)
leader_decoder = msgspec.json.Decoder(LeaderRecord)
encode = msgspec.json.Encoder().encode


T = TypeVar("T")


def decode_valid(decoder: msgspec.json.Decoder[T], values: dict[str, bytes]) -> list[T]:
    """The values (of an etcd prefix) that decode; a malformed one is skipped, not fatal."""
    out: list[T] = []
    for value in values.values():
        try:
            out.append(decoder.decode(value))
        except msgspec.DecodeError:
            continue
    return out


# -- reading and writing ------------------------------------------------------------


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
    await etcd.put(spec_key(ns), encode(record))
    return record


async def read_replicas(etcd: EtcdClient, ns: str) -> list[ReplicaState]:
    _, values = await etcd.get_prefix(replicas_prefix(ns))
    return decode_valid(replica_decoder, values)


async def read_autoscalers(etcd: EtcdClient, ns: str) -> list[AutoscalerState]:
    _, values = await etcd.get_prefix(autoscalers_prefix(ns))
    return decode_valid(autoscaler_decoder, values)


async def read_controller_records(etcd: EtcdClient, ns: str) -> ControllerRecords:
    """One read of the whole prefix; malformed values are left out."""
    _, values = await etcd.get_prefix(controller_prefix(ns))
    records = ControllerRecords(replicas=[], autoscalers=[])
    for key, value in values.items():
        try:
            if key == leader_key(ns):
                records.leader = leader_decoder.decode(value)
            elif key == spec_key(ns):
                records.spec = spec_record_decoder.decode(value)
            elif key.startswith(replicas_prefix(ns)):
                records.replicas.append(replica_decoder.decode(value))
            elif key.startswith(autoscalers_prefix(ns)):
                records.autoscalers.append(autoscaler_decoder.decode(value))
        except msgspec.DecodeError:
            continue
    return records
