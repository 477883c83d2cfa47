"""The controller's desired state: ``deployment.yaml``, validated with msgspec.

    models:
      - name: mock-model              # the name clients use
        engine: mock                  # mock | vllm
        model: ""                     # vllm: model path / id (default: name)
        args: {speedup: 10, num-blocks: 1024}   # or a list: ["--speedup", "10"]
                                      # vllm: vLLM's own engine flags, passed unchanged
                                      # ({max-num-seqs: 64, enable-prefix-caching: false})
        env: {}                       # extra environment for the worker processes
        replicas: 2                   # initial count (min_replicas..max_replicas)
        min_replicas: 1
        max_replicas: 4
        drain_timeout: 30             # SIGTERM: seconds to finish in-flight requests
        startup_timeout: 300          # seconds a new replica has to become healthy
        health_check: {period: 10, timeout: 30}
        autoscaling:                  # optional; without it the count stays at `replicas`
          metric: in_flight           # in_flight | waiting | kv_usage (per replica)
          target: 8
          window: 10                  # seconds of samples a decision looks at
          upscale_cooldown: 5
          downscale_cooldown: 30

``load_spec(path)`` returns a ``DeploymentSpec`` or raises ``SpecError`` whose message
names the file and the offending field (``$.models[0].replicas``). What the controller stores in
etcd is a ``records.SpecRecord`` around it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import yaml

Positive = Annotated[float, msgspec.Meta(gt=0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Count = Annotated[int, msgspec.Meta(ge=0)]


class SpecError(ValueError):
    """A deployment file that cannot be used; the message says where and why."""


class HealthCheckSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    period: Positive = 10.0
    timeout: Positive = 30.0


class AutoscalingSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    metric: Literal["in_flight", "waiting", "kv_usage"] = "in_flight"
    target: Positive = 8.0
    window: Positive = 10.0
    upscale_cooldown: NonNegative = 5.0
    downscale_cooldown: NonNegative = 30.0


ArgValue = str | int | float | bool


class ModelSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1)]
    engine: Literal["mock", "vllm"] = "mock"
    model: str = ""
    args: list[str] | dict[str, ArgValue] = []
    env: dict[str, str] = {}
    replicas: Count | None = None
    min_replicas: Count = 1
    max_replicas: Count | None = None
    drain_timeout: NonNegative = 30.0
    startup_timeout: Positive = 300.0
    health_check: HealthCheckSpec = msgspec.field(default_factory=HealthCheckSpec)
    autoscaling: AutoscalingSpec | None = None

    @property
    def initial_replicas(self) -> int:
        return self.replicas if self.replicas is not None else self.min_replicas

    @property
    def ceiling(self) -> int:
        return self.max_replicas if self.max_replicas is not None else max(self.initial_replicas, self.min_replicas)

    def worker_args(self) -> list[str]:
        """``dynrt worker`` flags for this model (besides namespace/etcd/NATS/replica id)."""
        argv = ["--engine", self.engine, "--model", self.model or self.name,
                "--served-model-name", self.name, "--drain-timeout", str(self.drain_timeout)]
        if isinstance(self.args, list):
            return argv + list(self.args)
        for key, value in self.args.items():
            flag = "--" + key.lstrip("-").replace("_", "-")
            if value is True:
                argv.append(flag)
            elif value is False:
                argv.append("--no-" + flag[2:])
            else:
                argv += [flag, str(value)]
        return argv

    def launch_digest(self) -> str:
        """Changes when what a replica runs changes (engine, model, args, env): the
        replicas launched from another digest are replaced by a rolling update.
        Counts, health checking and autoscaling apply without replacing anything."""
        payload = msgspec.json.encode([self.engine, self.model or self.name, self.name, self.worker_args(),
                                       sorted(self.env.items())])
        return hashlib.sha256(payload).hexdigest()[:12]


class DeploymentSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    models: list[ModelSpec]


def _check(spec: DeploymentSpec) -> None:
    seen: set[str] = set()
    for i, m in enumerate(spec.models):
        where = f"models[{i}] ({m.name})"
        if m.name in seen:
            raise SpecError(f"{where}: model name '{m.name}' appears twice")
        seen.add(m.name)
        if m.max_replicas is not None and m.max_replicas < m.min_replicas:
            raise SpecError(f"{where}: max_replicas ({m.max_replicas}) < min_replicas ({m.min_replicas})")
        if m.replicas is not None:
            if m.replicas < m.min_replicas:
                raise SpecError(f"{where}: replicas ({m.replicas}) < min_replicas ({m.min_replicas})")
            if m.max_replicas is not None and m.replicas > m.max_replicas:
                raise SpecError(f"{where}: replicas ({m.replicas}) > max_replicas ({m.max_replicas})")
        if m.health_check.timeout < m.health_check.period:
            raise SpecError(f"{where}: health_check.timeout ({m.health_check.timeout}) is shorter than "
                            f"health_check.period ({m.health_check.period})")
        if m.autoscaling is not None and m.max_replicas is None:
            raise SpecError(f"{where}: autoscaling needs max_replicas")
        if m.autoscaling is not None and m.autoscaling.metric == "kv_usage" and m.autoscaling.target > 1:
            raise SpecError(f"{where}: autoscaling.target for kv_usage is a fraction (0-1], got {m.autoscaling.target}")
        if isinstance(m.args, list):
            for flag in ("--namespace", "--etcd-endpoints", "--nats-url", "--replica-id"):
                if flag in m.args:
                    raise SpecError(f"{where}: args may not set {flag} (the controller sets it)")


_CHOICES = {"engine": ("mock", "vllm"), "metric": ("in_flight", "waiting", "kv_usage")}


def parse_spec(data: object, source: str = "deployment") -> DeploymentSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping with 'models', got {type(data).__name__}")
    try:
        spec = msgspec.convert(data, DeploymentSpec, strict=False)
    except msgspec.ValidationError as exc:
        message = str(exc)
        for suffix, choices in _CHOICES.items():
            if "Invalid enum value" in message and message.endswith(f".{suffix}`"):
                message += f" (one of: {', '.join(choices)})"
        raise SpecError(f"{source}: {message}") from None
    if not spec.models:
        raise SpecError(f"{source}: 'models' is empty")
    try:
        _check(spec)
    except SpecError as exc:
        raise SpecError(f"{source}: {exc}") from None
    return spec


def load_spec_text(text: str, source: str = "deployment") -> DeploymentSpec:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{source}: not valid YAML: {exc}") from None
    return parse_spec(data, source)


def load_spec(path: str | Path) -> DeploymentSpec:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read: {exc.strerror}") from None
    return load_spec_text(text, str(path))


def spec_digest(spec: DeploymentSpec) -> str:
    """Identifies a spec's content: a controller restarted with the file it was started
    with does not store it again (a later ``apply`` must not be undone)."""
    return hashlib.sha256(msgspec.json.encode(spec)).hexdigest()[:16]
