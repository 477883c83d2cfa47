"""Every setting of every component, with its default, in one place.

Each component's settings are a msgspec Struct. ``add_arguments`` turns a Struct into
argparse flags (``--drain-timeout``) and ``from_args`` fills it: a flag given on the
command line wins, then the environment variable (``DYNRT_DRAIN_TIMEOUT``), then the
default written here. ``msgspec.convert`` validates and coerces the values, so a bad
value fails at start-up with the setting's name.

Settings that several components share (``RoutingConfig``) are a Struct of their own,
held in a field of each component's Struct; their flags and environment variables are
top-level all the same (``--prefill-weight``, ``DYNRT_PREFILL_WEIGHT``).
"""

from __future__ import annotations

import argparse
import os
import typing
from collections.abc import Collection, Iterator
from typing import Annotated, Any, Literal, NamedTuple, TypeVar

import msgspec

ENV_PREFIX = "DYNRT_"

T = TypeVar("T", bound=msgspec.Struct)


def _doc(text: str, *, policy: str = "") -> msgspec.Meta:
    """A setting's help text; ``policy``: only that routing policy reads it."""
    return msgspec.Meta(description=text, extra={"policy": policy} if policy else None)


def _group(*, name_policy: bool = False) -> msgspec.Meta:
    """Marks a field holding a Struct of settings shared by several components: its
    settings are flags and environment variables of their own, as if written in place
    (``routing.prefill_weight`` is ``--prefill-weight``, ``DYNRT_PREFILL_WEIGHT``).
    ``name_policy``: prefix the help of a setting that one policy reads with the policy."""
    return msgspec.Meta(extra={"group": True, "name_policy": name_policy})


class CommonConfig(msgspec.Struct, kw_only=True):
    namespace: Annotated[str, _doc("isolates deployments sharing etcd and NATS")] = "dynrt"
    etcd_endpoints: Annotated[str, _doc("comma-separated host:port of etcd members")] = "127.0.0.1:2379"
    etcd_user: Annotated[str, _doc("etcd user (with --etcd-password)")] = ""
    etcd_password: Annotated[str, _doc("etcd password")] = ""
    etcd_ca: Annotated[str, _doc("CA bundle (PEM) to verify etcd servers; setting it (or --etcd-cert) turns on TLS")] = ""
    etcd_cert: Annotated[str, _doc("client certificate (PEM) for etcd mutual TLS (with --etcd-key)")] = ""
    etcd_key: Annotated[str, _doc("client private key (PEM) for --etcd-cert")] = ""
    nats_url: Annotated[str, _doc("comma-separated NATS server URLs")] = "nats://127.0.0.1:4222"
    nats_creds: Annotated[str, _doc("NATS credentials file")] = ""
    lease_ttl: Annotated[int, _doc("etcd lease TTL, seconds; a dead process leaves discovery after this")] = 10
    heartbeat_interval: Annotated[float, _doc("seconds between heartbeats on an idle response stream")] = 1.0
    log_level: Annotated[Literal["debug", "info", "warning", "error"], _doc("log level")] = "info"


class WorkerConfig(CommonConfig, kw_only=True):
    """dynrt's settings of a worker. With ``--engine vllm`` the engine's settings are
    vLLM's own flags (``dynrt.worker.vllm_config``); the fields here that vLLM also
    defines (model, served_model_name, tokenizer, block_size, max_num_seqs,
    max_num_batched_tokens) are then filled from vLLM's, and the mock-only ones are not
    flags."""

    model: Annotated[str, _doc("model name served (mock) or model path / id (vllm)")] = "mock-model"
    served_model_name: Annotated[str, _doc("name clients use; defaults to --model")] = ""
    engine: Annotated[Literal["mock", "vllm"], _doc("engine: vllm, or mock (a simulated engine, no model needed)")] = "vllm"
    component: Annotated[str, _doc("component name in discovery")] = "backend"
    endpoint: Annotated[str, _doc("endpoint name in discovery")] = "generate"
    host: Annotated[str, _doc("address the system (health) server binds")] = "127.0.0.1"
    system_port: Annotated[int, _doc("health/metrics port (0 = pick a free one)")] = 0
    drain_timeout: Annotated[float, _doc("SIGTERM: seconds to finish in-flight requests before migrating them")] = 30.0
    canary_after: Annotated[float, _doc("idle seconds before a canary 1-token generate (0 disables)")] = 10.0
    canary_timeout: Annotated[float, _doc("seconds a canary may take")] = 10.0
    health_period: Annotated[float, _doc("seconds between engine check_health calls (0 disables)")] = 10.0
    max_queued: Annotated[int, _doc("requests waiting in the engine beyond which new ones get a busy error")] = 1024
    load_interval: Annotated[float, _doc("seconds between load reports while the load changes")] = 0.1
    # 0.1 s: 10 small messages a second per worker, and with --suspect-after 0.3 a hung
    # worker is out of routing 0.2-0.3 s after its last report.
    load_heartbeat: Annotated[float, _doc("most seconds between load reports, even idle: routers take a worker whose reports stop for --suspect-after (at least 3 of these) as hung"), msgspec.Meta(gt=0)] = 0.1
    load_heartbeat_idle: Annotated[float, _doc("most seconds between unchanged load reports while the engine has nothing running or waiting (at least --load-heartbeat): an idle pool's reports cost every router and frontend that much less, a hung idle worker is still suspect within --suspect-after of a request sent to it (no report acknowledges it), and a killed one is refused by NATS at once"), msgspec.Meta(gt=0)] = 1.0
    instances: Annotated[int, _doc("mock: run this many worker instances in this process, each with its own instance id, lease, record, subjects, load reports and KV events (a scale simulation); they share the process's one etcd client and one NATS connection, so only the connection count differs from as many processes"), msgspec.Meta(ge=1)] = 1
    replica_id: Annotated[str, _doc("set by the controller: the replica this process is (put in the instance record)")] = ""
    tokenizer: Annotated[str, _doc("tokenizer path for the instance record (default: model)")] = ""
    # mock engine
    num_blocks: Annotated[int, _doc("mock: KV cache blocks")] = 16384
    block_size: Annotated[int, _doc("mock: tokens per KV block")] = 16
    # None = not given: the engine keeps its own default; a given value always reaches it
    max_num_seqs: Annotated[int | None, _doc("mock: max running sequences (None = 256)")] = None
    max_num_batched_tokens: Annotated[int | None, _doc("mock: token budget per engine step (None = 8192)")] = None
    context_length: Annotated[int, _doc("mock: max prompt + output tokens")] = 8192
    speedup: Annotated[float, _doc("mock engine speed-up over its timing model (inf = no sleeping)")] = 1.0
    fail_health_check: Annotated[bool, _doc("mock: check_health raises (for tests)")] = False


class RoutingConfig(msgspec.Struct, kw_only=True):
    """How a router picks an instance and when it sheds load: the same settings for a
    frontend's own router and for the standalone ``dynrt router``."""

    busy_kv_threshold: Annotated[float, _doc("instance busy above this KV usage fraction (0 or below disables)")] = 0.95
    busy_queue_threshold: Annotated[int, _doc("instance busy when a request sent now would make its waiting queue longer than this (0: whenever it would wait; -1 disables)")] = -1
    busy_prefill_threshold: Annotated[int, _doc("instance busy above this many tokens of queued prefill work (0: while any prompt prefills; -1 disables)")] = -1
    # Off by default: an objective is a promise about the deployment's clients, not a
    # property of the engine; 0 or below disables.
    ttft_slo: Annotated[float, _doc("admit a request only to an instance where its projected time to first token (queued prefill + its own uncached tokens at the instance's reported prefill rate, + any wait for a sequence slot) is at most this many seconds; else 503 + Retry-After (0 disables)")] = 0.0
    # 4, not 1: on benchmarks/routing.py's conversations kv@4 beat kv@1 in every run
    # (TTFT p50 ~45 vs 55-62 ms, hit rate ~0.8 vs ~0.6, same throughput; results/routing.json).
    prefill_weight: Annotated[float, _doc("weight of uncached prompt blocks vs decode blocks", policy="kv")] = 4.0
    router_temperature: Annotated[float, _doc("softmax temperature (0 = best)", policy="kv")] = 0.0
    # 0.3 s, 3 heartbeats: a SIGSTOPped worker's streams move ~0.4 s after their last
    # token (benchmarks/migration.py); a busy worker still reports from its event loop.
    suspect_after: Annotated[float, _doc("an instance whose load reports stop this long (s; at least 3 of its heartbeats) while others' arrive is suspect: no new requests until they resume; a frontend pings its streams there and moves them if it does not answer (0 disables)")] = 0.3


class MigrationConfig(msgspec.Struct, kw_only=True):
    """When a frontend's request counts as broken, and how far it may migrate."""

    migration_limit: Annotated[int, _doc("times one request may move to another worker (0 disables)")] = 3
    migration_max_seq_len: Annotated[int, _doc("no migration past this many prompt+output tokens (0 = no limit)")] = 0
    stream_stall_timeout: Annotated[float, _doc("seconds without frames or heartbeats before a stream counts as broken")] = 2.0
    ping_timeout: Annotated[float, _doc("seconds a silent worker has to answer a ping")] = 0.05
    silence_floor: Annotated[float, _doc("a stream silent this long (s, at least) gets its worker pinged")] = 0.03
    down_seconds: Annotated[float, _doc("a failed instance gets no requests for this long (or until it re-registers)")] = 5.0


class ResumeConfig(msgspec.Struct, kw_only=True):
    """Resumable streams (``docs/resumable-streams.md``): how long a client may take to
    come back, and how often a stream's checkpoint is written to JetStream. The
    frontend's settings; a worker keeps a detached request for the grace the frontend
    put in its generate request."""

    resume_grace: Annotated[float, _doc("seconds a stream whose client or frontend is gone stays resumable: the worker keeps generating, its checkpoint stays in JetStream"), msgspec.Meta(gt=0)] = 30.0
    # 0.2 s: ~5 JetStream writes a second per stream whatever the token rate
    # (benchmarks/checkpoint.py; results/checkpoint.json).
    checkpoint_interval: Annotated[float, _doc("at most one checkpoint write per stream per this many seconds"), msgspec.Meta(ge=0)] = 0.2
    checkpoint_tokens: Annotated[int, _doc("write a stream's checkpoint sooner once this many new tokens wait"), msgspec.Meta(ge=1)] = 64
    checkpoint_deltas: Annotated[int, _doc("a full checkpoint after this many incremental ones (0: always full)"), msgspec.Meta(ge=0, le=62)] = 32
    checkpoint_replicas: Annotated[int, _doc("copies of the checkpoint bucket in a NATS cluster (3 in the HA compose deployment: a checkpoint then survives a NATS server too)"), msgspec.Meta(ge=1, le=5)] = 1


class AuthConfig(msgspec.Struct, kw_only=True):
    """Who may call a component's HTTP endpoints (``dynrt.runtime.auth``): API keys for
    the OpenAI endpoints, admin keys for the endpoints that change state. A list setting
    is a repeatable flag, and comma-separated in its environment variable."""

    api_key: Annotated[list[str], _doc("an accepted API key ('Authorization: Bearer KEY'); none at all = the OpenAI endpoints are open")] = msgspec.field(default_factory=list)
    api_key_file: Annotated[str, _doc("file of accepted API keys, one per line ('#' comments), e.g. a secret")] = ""
    admin_api_key: Annotated[list[str], _doc("an accepted admin key, for endpoints that change state (POST /busy_threshold); none = those take the API keys (no key at all: open)")] = msgspec.field(default_factory=list)
    admin_api_key_file: Annotated[str, _doc("file of accepted admin keys, one per line")] = ""


class FrontendConfig(CommonConfig, kw_only=True):
    http_host: Annotated[str, _doc("HTTP bind address")] = "127.0.0.1"
    http_port: Annotated[int, _doc("HTTP port")] = 8000
    auth: Annotated[AuthConfig, _group()] = msgspec.field(default_factory=AuthConfig)
    max_body_bytes: Annotated[int, _doc("largest request body accepted (413 beyond)")] = 4 * 1024 * 1024
    drain_timeout: Annotated[float, _doc("SIGTERM: seconds to let open streams finish")] = 30.0
    default_max_tokens: Annotated[int, _doc("max_tokens when the client gives none")] = 4096
    router_mode: Annotated[Literal["kv", "round-robin", "random", "least-loaded", "remote"], _doc("routing policy, or 'remote' for the standalone router")] = "kv"
    remote_router_timeout: Annotated[float, _doc("seconds to wait for the standalone router before bypassing it")] = 0.05
    # The policy is a choice here (--router-mode): the help names the policy a setting is for.
    routing: Annotated[RoutingConfig, _group(name_policy=True)] = msgspec.field(default_factory=RoutingConfig)
    migration: Annotated[MigrationConfig, _group()] = msgspec.field(default_factory=MigrationConfig)
    resume: Annotated[ResumeConfig, _group()] = msgspec.field(default_factory=ResumeConfig)
    # Chat: templates, tools, reasoning (vLLM's flags; frontend/chat_request.py)
    chat_template: Annotated[str, _doc("chat template overriding the model's: a file, or the template itself")] = ""
    enable_auto_tool_choice: Annotated[bool, _doc("parse tool calls from the output for tool_choice 'auto' (needs --tool-call-parser)")] = False
    tool_call_parser: Annotated[Literal["", "hermes", "llama3_json", "mistral"], _doc("tool-call format the model writes (hermes: also Qwen2.5/3 JSON calls; mistral: [TOOL_CALLS] before tokenizer v11)")] = ""
    reasoning_parser: Annotated[Literal["", "deepseek_r1"], _doc("fill message.reasoning from <think>...</think> output")] = ""


class ControllerConfig(CommonConfig, kw_only=True):
    state_dir: Annotated[str, _doc("replica log files go here (default ~/.local/state/dynrt/NAMESPACE)")] = ""
    election_ttl: Annotated[int, _doc("leader lease TTL, seconds: a standby takes over this long after the active controller dies")] = 5
    tick: Annotated[float, _doc("seconds between reconcile passes (process deaths are seen within one)")] = 0.25
    stop_replicas_on_exit: Annotated[bool, _doc("on SIGTERM, drain and stop every replica (dynrt up); default: leave them serving")] = False


class RouterConfig(CommonConfig, kw_only=True):
    host: Annotated[str, _doc("address the system (health/metrics) server binds")] = "127.0.0.1"
    routing: Annotated[RoutingConfig, _group()] = msgspec.field(default_factory=RoutingConfig)
    system_port: Annotated[int, _doc("health/metrics/busy_threshold port (0 = pick a free one)")] = 0
    # POST /busy_threshold on the system port takes an admin key (API keys: when no admin key is set)
    auth: Annotated[AuthConfig, _group()] = msgspec.field(default_factory=AuthConfig)


def _is_list(type_: Any) -> bool:
    return typing.get_origin(type_) is list


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


class _Setting(NamedTuple):
    """One flag: a field of the config Struct, or of one of its groups (``group``)."""

    group: str | None
    field: msgspec.structs.FieldInfo
    type: Any  # the field's type without its ``Annotated`` metadata
    description: str


def _settings(config_type: type[msgspec.Struct], group: str | None = None,
              name_policy: bool = False) -> Iterator[_Setting]:
    hints = typing.get_type_hints(config_type, include_extras=True)
    for field in msgspec.structs.fields(config_type):
        hint = hints[field.name]
        meta = next((m for m in getattr(hint, "__metadata__", ()) if isinstance(m, msgspec.Meta)), None)
        extra = (meta.extra if meta is not None else None) or {}
        base = typing.get_args(hint)[0] if typing.get_origin(hint) is Annotated else hint
        if extra.get("group"):
            yield from _settings(base, field.name, extra["name_policy"])
            continue
        description = (meta.description if meta is not None else None) or ""
        if name_policy and extra.get("policy"):
            description = f"{extra['policy']} router: {description}"
        yield _Setting(group, field, base, description)


def add_arguments(parser: argparse.ArgumentParser, config_type: type[msgspec.Struct],
                  skip: Collection[str] = ()) -> None:
    """One flag per setting (except the settings named in ``skip``). Defaults stay None
    so ``from_args`` can tell a flag the user gave from one they did not (and fall back
    to the environment)."""
    for setting in _settings(config_type):
        field = setting.field
        if field.name in skip:
            continue
        default = "unset" if field.default is None else repr(
            field.default_factory() if field.default is msgspec.NODEFAULT else field.default)
        help_text = f"{setting.description} (default {default}; env {_env_name(field.name)})"
        if _is_list(setting.type):
            help_text = f"{setting.description} (repeatable; env {_env_name(field.name)}, comma-separated)"
            parser.add_argument(_flag(field.name), dest=field.name, default=None, action="append", help=help_text)
        elif setting.type is bool:
            parser.add_argument(_flag(field.name), dest=field.name, default=None,
                                action=argparse.BooleanOptionalAction, help=help_text)
        else:
            choices = list(typing.get_args(setting.type)) if typing.get_origin(setting.type) is Literal else None
            parser.add_argument(_flag(field.name), dest=field.name, default=None,
                                choices=choices, help=help_text)


def from_args(config_type: type[T], args: argparse.Namespace | None = None, **overrides: Any) -> T:
    """Build a config: ``overrides`` > flags > ``DYNRT_*`` environment > defaults."""
    values: dict[str, Any] = {}
    for setting in _settings(config_type):
        name = setting.field.name
        target = values if setting.group is None else values.setdefault(setting.group, {})
        env_value: str | list[str] | None = os.environ.get(_env_name(name))
        if env_value is not None:
            if _is_list(setting.type):
                env_value = [item.strip() for item in env_value.split(",") if item.strip()]
            target[name] = env_value
        flag_value = getattr(args, name, None) if args is not None else None
        if flag_value is not None:
            target[name] = flag_value
        if name in overrides:
            target[name] = overrides[name]
    try:
        return msgspec.convert(values, config_type, strict=False)
    except msgspec.ValidationError as exc:
        raise SystemExit(f"dynrt: invalid setting: {exc}") from None
