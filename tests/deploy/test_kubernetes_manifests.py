"""Offline checks of the Kubernetes manifests (``deploy/kubernetes``): no cluster needed.

1. Every kustomization lists exactly the YAML files of its folder (nothing listed is
   missing, nothing unlisted is left behind), and ``kubectl kustomize`` renders it where
   kubectl is installed (kustomize is built into kubectl; the check skips without it).
2. Every object validates against the Kubernetes JSON schemas of ``K8S_VERSION``
   (``kubernetes-validate``, which bundles them: strict, so an unknown or misspelt field
   fails), and objects of CRDs (KEDA's ScaledObject, the Prometheus Operator's
   ServiceMonitor) against the minimal schemas vendored in ``deploy/kubernetes/schemas``.
3. The wiring that would break silently on a cluster: probe paths and ports are the ones
   dynrt serves (``--http-port`` / ``--system-port``, bound on 0.0.0.0), Service, PDB,
   HPA and ServiceMonitor selectors and ports match the workloads, every Secret and
   ConfigMap key referenced exists in the base or in ``operator-secrets.yaml``, every
   ``DYNRT_*`` variable is a real setting of that component (and its value passes
   dynrt's own validation), every container runs a real ``dynrt`` subcommand with real
   flags, the etcd/NATS endpoints match the charts' values, and the autoscalers' metrics
   are metrics dynrt exports.

``test_checks_catch_breakage`` breaks a copy of the manifests in each of these ways and
asserts that the checks notice.

What this cannot check: anything at run time (scheduling, GPUs, the charts' rendering —
no helm binary here —, the adapter's queries against a real Prometheus). See
deploy/kubernetes/README.md.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate  # the dev extra: Kubernetes' JSON schemas, bundled (no network)
import pytest
import yaml

from dynrt.runtime import config as dynrt_config

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
BASE = K8S / "base"
KUSTOMIZATIONS = [BASE, K8S / "overlays" / "keda", K8S / "overlays" / "mock"]
SCHEMAS = K8S / "schemas"
HELM = K8S / "helm"
OPERATOR_SECRETS = K8S / "operator-secrets.yaml"
ENTRYPOINT = ROOT / "deploy" / "docker" / "entrypoint.sh"
NAMESPACE = "dynrt"

# The Kubernetes version whose schemas the manifests must pass: the oldest minor the
# manifests promise to work on (README). kubernetes-validate bundles 1.25 onwards.
K8S_VERSION = "1.33"

# Which settings a container may set, by its dynrt subcommand.
CONFIGS: dict[str, type] = {
    "frontend": dynrt_config.FrontendConfig,
    "worker": dynrt_config.WorkerConfig,
    "router": dynrt_config.RouterConfig,
    "controller": dynrt_config.ControllerConfig,
}
# Read by the image's entrypoint, not by dynrt (deploy/docker/entrypoint.sh).
ENTRYPOINT_VARS = {"DYNRT_ETCD_PASSWORD_FILE", "DYNRT_TLS_CA_FILE"}
# vLLM's own engine flags, which a vLLM worker reads as DYNRT_<FLAG> too
# (worker/vllm_config.py, apply_env_defaults). Listed by hand: importing vLLM to ask
# its parser would take longer than this whole test may.
VLLM_ENGINE_VARS = {"DYNRT_GPU_MEMORY_UTILIZATION", "DYNRT_TENSOR_PARALLEL_SIZE", "DYNRT_MAX_MODEL_LEN",
                    "DYNRT_DTYPE", "DYNRT_ENFORCE_EAGER", "DYNRT_MAX_NUM_SEQS", "DYNRT_MAX_NUM_BATCHED_TOKENS",
                    "DYNRT_SERVED_MODEL_NAME", "DYNRT_MODEL", "DYNRT_TOKENIZER", "DYNRT_BLOCK_SIZE"}
# Paths dynrt serves: frontends on their HTTP port, workers and routers on the system port.
LIVE, HEALTH = "/live", "/health"
WORKLOAD_KINDS = {"Deployment", "StatefulSet"}
CLUSTER_SCOPED = {"Namespace"}

Obj = dict[str, Any]
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# -- loading --------------------------------------------------------------------------
@functools.cache
def _parsed(path: Path) -> tuple[Obj, ...]:
    return tuple(doc for doc in yaml.load_all(path.read_text(), Loader=_Loader) if doc is not None)


def _yaml_docs(path: Path) -> list[Obj]:
    """A file's documents, parsed once; each call gets its own copy to change."""
    return copy.deepcopy(list(_parsed(path)))


def kustomization(folder: Path) -> Obj:
    return _yaml_docs(folder / "kustomization.yaml")[0]


def listed_files(folder: Path) -> list[Path]:
    """The local files (not directories) a kustomization lists as resources."""
    return [folder / r for r in kustomization(folder).get("resources", []) if not (folder / r).is_dir()]


def patch_files(folder: Path) -> list[Path]:
    return [folder / p["path"] for p in kustomization(folder).get("patches", []) if "path" in p]


def objects_of(folder: Path) -> list[Obj]:
    """The objects a kustomization puts together, before kustomize's transformations:
    its base folders' objects, then its own files'."""
    out: list[Obj] = []
    for resource in kustomization(folder).get("resources", []):
        path = folder / resource
        out.extend(objects_of(path) if path.is_dir() else _yaml_docs(path))
    return out


def base_objects() -> list[Obj]:
    return objects_of(BASE)


def by_kind(objects: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def name(o: Obj) -> str:
    return f"{o['kind']}/{o['metadata']['name']}"


def operator_secrets() -> dict[str, Any]:
    return _yaml_docs(OPERATOR_SECRETS)[0]


def helm_values(chart: str) -> Obj:
    return _yaml_docs(HELM / f"{chart}-values.yaml")[0]


# -- 1. kustomizations ----------------------------------------------------------------
@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def test_kustomization_lists_every_file(folder: Path) -> None:
    k = kustomization(folder)
    resources = k.get("resources", [])
    missing = [r for r in resources if not (folder / r).exists()]
    assert not missing, f"{folder}: listed but missing: {missing}"
    for r in resources:
        if (folder / r).is_dir():
            assert (folder / r / "kustomization.yaml").exists(), f"{folder}: {r} has no kustomization.yaml"
    on_disk = {p.name for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.name != "kustomization.yaml"}
    missing = [p for p in patch_files(folder) if not p.exists()]
    assert not missing, f"{folder}: patch files missing: {missing}"
    unlisted = on_disk - {Path(r).name for r in resources if not (folder / r).is_dir()} - {p.name for p in patch_files(folder)}
    assert not unlisted, f"{folder}: YAML files neither a resource nor a patch in kustomization.yaml: {sorted(unlisted)}"
    assert len(resources) == len(set(resources)), f"{folder}: a resource is listed twice"


def test_every_manifest_folder_is_a_kustomization() -> None:
    """A folder of manifests nobody applies is a folder that silently rots."""
    known = set(KUSTOMIZATIONS) | {SCHEMAS, HELM, K8S / "overlays"}
    for folder in [p for p in K8S.rglob("*") if p.is_dir()]:
        assert folder in known, f"{folder}: not checked by this test (add it to KUSTOMIZATIONS)"


@functools.cache
def kubectl_render(folder: Path) -> list[Obj] | None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    done = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"kubectl kustomize {folder}: {done.stderr}"
    return [d for d in yaml.safe_load_all(done.stdout) if d is not None]


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def test_kustomize_renders(folder: Path) -> None:
    """kustomize itself (kubectl's) builds each kustomization; every rendered object
    passes the schemas, sits in namespace dynrt, and the images are the dynrt ones."""
    rendered = kubectl_render(folder)
    if rendered is None:
        pytest.skip("kubectl not installed: kustomize rendering not checked (the file-level checks still run)")
    errors = [e for o in rendered for e in schema_errors(o)] + all_checks(rendered)
    assert not errors, "\n".join(errors)
    for o in rendered:
        if o["kind"] not in CLUSTER_SCOPED:
            assert o["metadata"].get("namespace") == NAMESPACE, f"{name(o)}: namespace {o['metadata'].get('namespace')}"
    for workload in [o for o in rendered if o["kind"] in WORKLOAD_KINDS]:
        for c in workload["spec"]["template"]["spec"]["containers"]:
            assert c["image"].split("/")[-1].split(":")[0] in ("dynrt", "dynrt-vllm"), c["image"]
    # Same objects as the file-level checks below look at, less any deleted by a patch.
    names = {name(o) for o in rendered}
    assert names <= {name(o) for o in objects_of(folder)}
    if folder != BASE:
        # KEDA owns the worker's HPA: the base's must be gone, or two HPAs fight.
        targets = [o["spec"]["scaleTargetRef"]["name"] for o in rendered
                   if o["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")]
        assert len(targets) == len(set(targets)), f"{folder}: two autoscalers on one target: {targets}"


# -- 2. schemas -----------------------------------------------------------------------
@functools.cache
def crd_schema(kind: str, api_version: str) -> Obj | None:
    group, _, version = api_version.rpartition("/")
    path = SCHEMAS / f"{kind.lower()}-{group.split('.')[0]}-{version}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _is_builtin(api_version: str) -> bool:
    group = api_version.rpartition("/")[0]
    return group == "" or "." not in group or group.endswith(".k8s.io")


def schema_errors(o: Obj) -> list[str]:
    where = name(o)
    if _is_builtin(o["apiVersion"]):
        try:
            kubernetes_validate.validate(o, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            return [f"{where}: {exc.json_path}: {exc.message}"]  # a jsonschema.ValidationError
        except kubernetes_validate.SchemaNotFoundError as exc:
            return [f"{where}: {exc.message}"]
        return []
    schema = crd_schema(o["kind"], o["apiVersion"])
    if schema is None:
        return [f"{where}: no schema for {o['apiVersion']} {o['kind']} in {SCHEMAS}"]
    errors = [f"{where}: {e.json_path}: {e.message}" for e in jsonschema.Draft202012Validator(schema).iter_errors(o)]
    behavior = o.get("spec", {}).get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
    if behavior is not None:  # KEDA passes it to the HPA it creates: the HPA's schema applies
        hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "x"},
               "spec": {"scaleTargetRef": {"kind": "StatefulSet", "name": "x"}, "maxReplicas": 1, "behavior": behavior}}
        errors += [f"{where} (HPA behavior): {e}" for e in schema_errors(hpa)]
    return errors


def _all_objects() -> Iterator[tuple[str, Obj]]:
    """Each object once, by the file that holds it (a base's files belong to the base)."""
    for folder in KUSTOMIZATIONS:
        for path in listed_files(folder):
            for o in _yaml_docs(path):
                yield f"{path.relative_to(K8S)}:{name(o)}", o


ALL_OBJECTS = list(_all_objects())


@pytest.mark.parametrize("o", [o for _, o in ALL_OBJECTS], ids=[i for i, _ in ALL_OBJECTS])
def test_schema(o: Obj) -> None:
    errors = schema_errors(o)
    assert not errors, "\n".join(errors)


def test_strict_schemas_reject_unknown_fields() -> None:
    """The validation is strict: a misspelt field fails, it is not ignored."""
    o = copy.deepcopy(by_kind(base_objects(), "Deployment")[0])
    c = o["spec"]["template"]["spec"]["containers"][0]
    c["readinesProbe"] = c["readinessProbe"]
    assert schema_errors(o)
    so = copy.deepcopy(_yaml_docs(K8S / "overlays" / "keda" / "scaledobject.yaml")[0])
    so["spec"]["maxReplicas"] = 3
    assert schema_errors(so)


# -- 3. wiring ------------------------------------------------------------------------
def containers(o: Obj) -> list[Obj]:
    return o["spec"]["template"]["spec"]["containers"]


def subcommand(c: Obj) -> str:
    argv = c.get("args") or []
    return argv[0] if argv else ""


def env_of(c: Obj, objects: list[Obj]) -> dict[str, str]:
    """A container's plain environment: its ConfigMaps (envFrom) then its own values."""
    maps = {m["metadata"]["name"]: m.get("data", {}) for m in by_kind(objects, "ConfigMap")}
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            env.update(maps.get(source["configMapRef"]["name"], {}))
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
    return env


def env_names(c: Obj, objects: list[Obj]) -> set[str]:
    return set(env_of(c, objects)) | {v["name"] for v in c.get("env", [])}


@functools.cache
def settings_of(command: str) -> frozenset[str]:
    return frozenset(dynrt_config._env_name(s.field.name) for s in dynrt_config._settings(CONFIGS[command]))


def _is_vllm_worker(c: Obj, env: dict[str, str]) -> bool:
    argv = c.get("args") or []
    engine = argv[argv.index("--engine") + 1] if "--engine" in argv else env.get("DYNRT_ENGINE", "vllm")
    return subcommand(c) == "worker" and engine == "vllm"


def check_commands(objects: list[Obj]) -> list[str]:
    """Every container runs a dynrt subcommand, with flags that subcommand has."""
    from dynrt.cli import SUBCOMMANDS

    errors = []
    for w in [o for o in objects if o["kind"] in WORKLOAD_KINDS]:
        for c in containers(w):
            if c.get("command"):
                errors.append(f"{name(w)}/{c['name']}: command {c['command']} replaces the image's entrypoint "
                              "(which reads secret files: deploy/docker/entrypoint.sh); use args")
            cmd = subcommand(c)
            if cmd not in SUBCOMMANDS:
                errors.append(f"{name(w)}/{c['name']}: args {c.get('args')} do not start with a dynrt subcommand")
                continue
            if cmd not in CONFIGS:
                continue
            parser = argparse.ArgumentParser(prog=f"dynrt {cmd}", exit_on_error=False, allow_abbrev=False)
            dynrt_config.add_arguments(parser, CONFIGS[cmd])
            try:
                parser.parse_args(c["args"][1:])
            except (argparse.ArgumentError, SystemExit) as exc:
                errors.append(f"{name(w)}/{c['name']}: dynrt {cmd} does not take {c['args'][1:]}: {exc}")
    return errors


def check_env(objects: list[Obj]) -> list[str]:
    """Every DYNRT_* variable a container gets is a setting of its component (or read by
    the entrypoint, or a vLLM engine flag on a vLLM worker), and the values pass dynrt's
    own validation (``from_args`` reads them exactly as the process will)."""
    errors = []
    for w in [o for o in objects if o["kind"] in WORKLOAD_KINDS]:
        for c in containers(w):
            cmd = subcommand(c)
            if cmd not in CONFIGS:
                continue
            env = env_of(c, objects)
            allowed = settings_of(cmd) | ENTRYPOINT_VARS | (VLLM_ENGINE_VARS if _is_vllm_worker(c, env) else set())
            for var in sorted(n for n in env_names(c, objects) if n.startswith(dynrt_config.ENV_PREFIX)):
                if var not in allowed:
                    errors.append(f"{name(w)}/{c['name']}: {var} is not a setting of dynrt {cmd}")
            own = {k: v for k, v in env.items() if k in settings_of(cmd)}
            saved = {k: v for k, v in os.environ.items() if k.startswith(dynrt_config.ENV_PREFIX)}
            try:
                for k in saved:
                    del os.environ[k]
                os.environ.update(own)
                dynrt_config.from_args(CONFIGS[cmd])
            except SystemExit as exc:
                errors.append(f"{name(w)}/{c['name']}: {exc}")
            finally:
                for k in own:
                    os.environ.pop(k, None)
                os.environ.update(saved)
    for var in ENTRYPOINT_VARS:
        assert var in ENTRYPOINT.read_text(), f"{var} is no longer read by {ENTRYPOINT}"
    return errors


def _port_number(c: Obj, port: int | str) -> int | None:
    if isinstance(port, int):
        return port
    return next((p["containerPort"] for p in c.get("ports", []) if p.get("name") == port), None)


def check_probes(objects: list[Obj]) -> list[str]:
    """Probes hit the paths dynrt serves, on the port the process is told to listen on,
    and the process listens on all addresses (dynrt binds 127.0.0.1 by default)."""
    errors = []
    for w in [o for o in objects if o["kind"] in WORKLOAD_KINDS]:
        for c in containers(w):
            cmd, env, where = subcommand(c), env_of(c, objects), f"{name(w)}/{c['name']}"
            if cmd == "frontend":
                port_var, host_var, default = "DYNRT_HTTP_PORT", "DYNRT_HTTP_HOST", dynrt_config.FrontendConfig().http_port
            elif cmd in ("worker", "router"):
                port_var, host_var, default = "DYNRT_SYSTEM_PORT", "DYNRT_HOST", 0
            else:
                continue
            port = int(env.get(port_var, default))
            if port == 0:
                errors.append(f"{where}: {port_var} unset: the process would pick a random port no probe can find")
                continue
            if env.get(host_var) != "0.0.0.0":
                errors.append(f"{where}: {host_var}={env.get(host_var)!r}: probes and Prometheus need 0.0.0.0")
            if port not in [p["containerPort"] for p in c.get("ports", [])]:
                errors.append(f"{where}: no containerPort {port} ({port_var})")
            wanted = {"livenessProbe": LIVE, "readinessProbe": HEALTH}
            for probe_name, path in wanted.items():
                probe = c.get(probe_name)
                if probe is None:
                    errors.append(f"{where}: no {probe_name}")
                    continue
                get = probe.get("httpGet", {})
                if get.get("path") != path:
                    errors.append(f"{where}: {probe_name} path {get.get('path')!r}, dynrt serves {path}")
                if _port_number(c, get.get("port")) != port:
                    errors.append(f"{where}: {probe_name} port {get.get('port')!r} is not {port_var}={port}")
            startup = c.get("startupProbe")
            if startup is not None:
                get = startup.get("httpGet", {})
                if get.get("path") not in (LIVE, HEALTH) or _port_number(c, get.get("port")) != port:
                    errors.append(f"{where}: startupProbe {get} is not /live or /health on {port}")
            if _is_vllm_worker(c, env):
                # Model load: download + weights + CUDA graphs take minutes; /health is 503
                # "loading" until then. The startup probe must wait for it, on /health.
                if startup is None or startup["httpGet"]["path"] != HEALTH:
                    errors.append(f"{where}: a vLLM worker needs a startupProbe on {HEALTH} for the model load")
                else:
                    budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
                    if budget < 600:
                        errors.append(f"{where}: startupProbe allows {budget} s for the model load, want >= 600")
                limits = c.get("resources", {}).get("limits", {})
                if "nvidia.com/gpu" not in limits:
                    errors.append(f"{where}: a vLLM worker without an nvidia.com/gpu limit")
            if "requests" not in c.get("resources", {}) or "limits" not in c.get("resources", {}):
                errors.append(f"{where}: resources need requests and limits")
            drain = float(env.get("DYNRT_DRAIN_TIMEOUT", 30))
            grace = w["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
            if cmd in ("frontend", "worker") and grace <= drain:
                errors.append(f"{where}: terminationGracePeriodSeconds {grace} <= drain timeout {drain}: "
                              "the kubelet kills it mid-drain")
    return errors


def pod_labels(w: Obj) -> dict[str, str]:
    return w["spec"]["template"]["metadata"].get("labels", {})


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_selectors(objects: list[Obj]) -> list[str]:
    """Services, PDBs, HPAs, ServiceMonitors and StatefulSets point at things that exist."""
    errors = []
    workloads = [o for o in objects if o["kind"] in WORKLOAD_KINDS]
    services = by_kind(objects, "Service")
    for w in workloads:
        if not _matches(w["spec"]["selector"].get("matchLabels", {}), pod_labels(w)):
            errors.append(f"{name(w)}: selector does not match its own pod labels")
    for s in services:
        selected = [w for w in workloads if _matches(s["spec"].get("selector", {}), pod_labels(w))]
        if not selected:
            errors.append(f"{name(s)}: selector {s['spec'].get('selector')} matches no pods")
        for port in s["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for w in selected:
                if not any(_port_number(c, target) for c in containers(w)):
                    errors.append(f"{name(s)}: targetPort {target!r} is no port of {name(w)}")
        if s["spec"].get("sessionAffinity", "None") != "None":
            errors.append(f"{name(s)}: session affinity: resumable streams need none (docs/resumable-streams.md)")
    for pdb in by_kind(objects, "PodDisruptionBudget"):
        if not any(_matches(pdb["spec"]["selector"].get("matchLabels", {}), pod_labels(w)) for w in workloads):
            errors.append(f"{name(pdb)}: selector matches no pods")
    for w in workloads:
        if not any(_matches(p["spec"]["selector"].get("matchLabels", {}), pod_labels(w))
                   for p in by_kind(objects, "PodDisruptionBudget")):
            errors.append(f"{name(w)}: no PodDisruptionBudget")
    for w in by_kind(objects, "StatefulSet"):
        governing = [s for s in services if s["metadata"]["name"] == w["spec"].get("serviceName")]
        if not governing or governing[0]["spec"].get("clusterIP") != "None":
            errors.append(f"{name(w)}: serviceName {w['spec'].get('serviceName')!r} is not a headless Service here")
    for a in by_kind(objects, "HorizontalPodAutoscaler") + by_kind(objects, "ScaledObject"):
        ref = a["spec"]["scaleTargetRef"]
        targets = [w for w in workloads if w["kind"] == ref.get("kind", "Deployment") and w["metadata"]["name"] == ref["name"]]
        if not targets:
            errors.append(f"{name(a)}: scaleTargetRef {ref} is no workload here")
        for w in targets:
            if "replicas" in w["spec"]:
                errors.append(f"{name(w)}: sets replicas while {name(a)} scales it (every apply resets the count)")
    for m in by_kind(objects, "ServiceMonitor"):
        selected = [s for s in services if _matches(m["spec"]["selector"].get("matchLabels", {}), s["metadata"].get("labels", {}))]
        if not selected:
            errors.append(f"{name(m)}: selects no Service (by the Services' own labels)")
        for e in m["spec"]["endpoints"]:
            for s in selected:
                if e.get("port") not in [p.get("name") for p in s["spec"]["ports"]]:
                    errors.append(f"{name(m)}: endpoint port {e.get('port')!r} is no port name of {name(s)}")
    return errors


def check_references(objects: list[Obj]) -> list[str]:
    """Every Secret and ConfigMap key a pod reads exists: in the base, or listed in
    operator-secrets.yaml as created by the operator."""
    errors = []
    config_maps = {m["metadata"]["name"]: set(m.get("data", {})) for m in by_kind(objects, "ConfigMap")}
    secrets = {s["metadata"]["name"]: set(s.get("data", {})) | set(s.get("stringData", {})) for s in by_kind(objects, "Secret")}
    for secret, spec in operator_secrets().items():
        secrets.setdefault(secret, set()).update(spec["keys"])
    operator = operator_secrets()

    def need(kind: str, ref_name: str, key: str | None, where: str, optional: bool) -> None:
        known = config_maps if kind == "ConfigMap" else secrets
        if ref_name not in known:
            errors.append(f"{where}: {kind} {ref_name!r} is neither in the base nor in {OPERATOR_SECRETS.name}")
        elif key is not None and key not in known[ref_name]:
            errors.append(f"{where}: {kind} {ref_name!r} has no key {key!r}")
        if kind == "Secret" and ref_name in operator and operator[ref_name]["optional"] != optional:
            errors.append(f"{where}: Secret {ref_name!r} optional={optional}, {OPERATOR_SECRETS.name} says "
                          f"{operator[ref_name]['optional']}")

    for w in [o for o in objects if o["kind"] in WORKLOAD_KINDS]:
        pod = w["spec"]["template"]["spec"]
        for c in pod["containers"] + pod.get("initContainers", []):
            where = f"{name(w)}/{c['name']}"
            for source in c.get("envFrom", []):
                for kind, field in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                    if field in source:
                        need(kind, source[field]["name"], None, where, source[field].get("optional", False))
            for var in c.get("env", []):
                ref = var.get("valueFrom", {})
                for kind, field in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                    if field in ref:
                        need(kind, ref[field]["name"], ref[field]["key"], where, ref[field].get("optional", False))
            mounted = {m["name"] for m in c.get("volumeMounts", [])}
            declared = {v["name"] for v in pod.get("volumes", [])} | {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
            for missing in sorted(mounted - declared):
                errors.append(f"{where}: volumeMount {missing!r} has no volume")
        for v in pod.get("volumes", []):
            for kind, field, key_name in (("Secret", "secret", "secretName"), ("ConfigMap", "configMap", "name")):
                if field in v:
                    src = v[field]
                    keys = [item["key"] for item in src.get("items", [])] or [None]
                    for key in keys:
                        need(kind, src[key_name], key, f"{name(w)} volume {v['name']}", src.get("optional", False))
    return errors


def min_replicas(w: Obj, objects: list[Obj]) -> int:
    """The fewest replicas a workload runs: its autoscaler's minimum if one targets it
    (then the workload must not set replicas itself: every apply would reset the count)."""
    for a in by_kind(objects, "HorizontalPodAutoscaler") + by_kind(objects, "ScaledObject"):
        ref = a["spec"]["scaleTargetRef"]
        if ref.get("kind", "Deployment") == w["kind"] and ref["name"] == w["metadata"]["name"]:
            return a["spec"].get("minReplicas", a["spec"].get("minReplicaCount", 1))
    return w["spec"].get("replicas", 1)


def check_infrastructure(objects: list[Obj]) -> list[str]:
    """The endpoints in dynrt-config are the members the charts' values create, and the
    checkpoint bucket's replicas fit the NATS cluster."""
    errors = []
    config = next(m["data"] for m in by_kind(objects, "ConfigMap") if m["metadata"]["name"] == "dynrt-config")
    etcd = helm_values("etcd")
    want = ",".join(f"etcd-{i}.etcd-headless:2379" for i in range(etcd["replicaCount"]))
    if config["DYNRT_ETCD_ENDPOINTS"] != want:
        errors.append(f"DYNRT_ETCD_ENDPOINTS {config['DYNRT_ETCD_ENDPOINTS']!r}: the etcd release's members are {want!r}")
    if etcd["replicaCount"] < 3:
        errors.append("etcd: fewer than 3 members")
    nats = helm_values("nats")["config"]
    replicas = nats["cluster"]["replicas"] if nats["cluster"]["enabled"] else 1
    want = ",".join(f"nats://nats-{i}.nats-headless:4222" for i in range(replicas))
    if config["DYNRT_NATS_URL"] != want:
        errors.append(f"DYNRT_NATS_URL {config['DYNRT_NATS_URL']!r}: the NATS release's servers are {want!r}")
    if not (nats["jetstream"]["enabled"] and nats["jetstream"]["fileStore"]["enabled"]):
        errors.append("NATS: resumable streams' checkpoints need JetStream with a file store")
    for w in by_kind(objects, "Deployment"):
        for c in containers(w):
            if subcommand(c) == "frontend":
                cr = int(env_of(c, objects).get("DYNRT_CHECKPOINT_REPLICAS", 1))
                if cr != replicas:
                    errors.append(f"{name(w)}: DYNRT_CHECKPOINT_REPLICAS={cr}, the NATS cluster has {replicas} servers")
                if min_replicas(w, objects) < 2:
                    errors.append(f"{name(w)}: fewer than 2 frontends")
    return errors


@functools.cache
def dynrt_metric_names() -> frozenset[str]:
    """The series dynrt's components export (importing a module registers its metrics)."""
    import dynrt.frontend.server  # noqa: F401
    import dynrt.router.main  # noqa: F401
    import dynrt.worker.router_feed  # noqa: F401
    import dynrt.worker.service  # noqa: F401
    from dynrt.runtime.metrics import REGISTRY

    return frozenset(REGISTRY._names_to_collectors)


def check_autoscaling(objects: list[Obj], adapter: Obj) -> list[str]:
    """The HPA's custom metrics are ones the adapter's rules make, and every dynrt series
    the adapter and KEDA query is one dynrt exports."""
    errors = []
    rules = adapter["rules"]["custom"]
    made = {r["name"]["as"] for r in rules}
    for hpa in by_kind(objects, "HorizontalPodAutoscaler"):
        for m in hpa["spec"].get("metrics", []):
            if m["type"] in ("Pods", "Object", "External"):
                metric = m[m["type"].lower()]["metric"]["name"]
                if metric not in made:
                    errors.append(f"{name(hpa)}: metric {metric!r} is made by no rule of the Prometheus adapter")
    queries = [r["seriesQuery"] + " " + r["metricsQuery"] for r in rules]
    queries += [t["metadata"]["query"] for so in by_kind(objects, "ScaledObject") for t in so["spec"]["triggers"]
                if t["type"] == "prometheus"]
    for query in queries:
        for series in re.findall(r"\bdynrt_[a-z_]+", query):
            if series not in dynrt_metric_names():
                errors.append(f"query {query!r}: dynrt exports no series {series!r}")
    return errors


def all_checks(objects: list[Obj], adapter: Obj | None = None) -> list[str]:
    adapter = helm_values("prometheus-adapter") if adapter is None else adapter
    return (check_commands(objects) + check_env(objects) + check_probes(objects) + check_selectors(objects)
            + check_references(objects) + check_infrastructure(objects) + check_autoscaling(objects, adapter))


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def test_wiring(folder: Path) -> None:
    """The wiring, on the files as written (test_kustomize_renders checks it again on
    kustomize's output, patches applied, where kubectl is installed)."""
    if patch_files(folder):
        pytest.skip("strategic-merge patches: checked on the rendered output only (test_kustomize_renders)")
    objects = objects_of(folder)
    if folder != BASE:  # the KEDA overlay deletes the worker HPA (checked rendered above)
        objects = [o for o in objects if not (o["kind"] == "HorizontalPodAutoscaler" and o["metadata"]["name"] == "dynrt-worker")]
    errors = all_checks(objects)
    assert not errors, "\n".join(errors)


def test_vllm_engine_vars_are_vllm_flags() -> None:
    """The hand-kept VLLM_ENGINE_VARS are fields of vLLM's EngineArgs, read from its
    source where vLLM is installed (importing it would take longer than this test may)."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        pytest.skip("vLLM not installed")
    source = (Path(spec.origin).parent / "engine" / "arg_utils.py").read_text()
    body = source.split("\nclass EngineArgs", 1)[1].split("\nclass ", 1)[0]
    fields = set(re.findall(r"^    ([a-z_]+): ", body, flags=re.MULTILINE))
    unknown = {v for v in VLLM_ENGINE_VARS if v.removeprefix(dynrt_config.ENV_PREFIX).lower() not in fields}
    assert not unknown, f"not vLLM engine arguments: {sorted(unknown)}"


def test_the_pieces_the_issue_asks_for() -> None:
    objects = base_objects()
    kinds = {name(o) for o in objects}
    for wanted in ("Deployment/dynrt-frontend", "Service/dynrt-frontend", "PodDisruptionBudget/dynrt-frontend",
                   "Deployment/dynrt-router", "PodDisruptionBudget/dynrt-router",
                   "StatefulSet/dynrt-worker", "PodDisruptionBudget/dynrt-worker",
                   "HorizontalPodAutoscaler/dynrt-worker"):
        assert wanted in kinds, f"base has no {wanted}"
    frontend = next(o for o in objects if name(o) == "Deployment/dynrt-frontend")
    assert env_of(containers(frontend)[0], objects)["DYNRT_ROUTER_MODE"] == "remote"
    assert "ScaledObject/dynrt-worker" in {name(o) for o in objects_of(K8S / "overlays" / "keda")}
    # dynrt serves these paths where the probes look for them.
    server = (ROOT / "frontend" / "server.py").read_text()
    assert f'"GET", "{LIVE}"' in server and f'"GET", "{HEALTH}"' in server
    health = (ROOT / "runtime" / "health.py").read_text()  # the workers' and router's system server
    assert f'add_get("{LIVE}"' in health and f'add_get("{HEALTH}"' in health


# -- the checks notice when something breaks ----------------------------------------------
def _find(objects: list[Obj], kind_name: str) -> Obj:
    return next(o for o in objects if name(o) == kind_name)


def _worker(objects: list[Obj]) -> Obj:
    return containers(_find(objects, "StatefulSet/dynrt-worker"))[0]


def _frontend(objects: list[Obj]) -> Obj:
    return containers(_find(objects, "Deployment/dynrt-frontend"))[0]


def _router(objects: list[Obj]) -> Obj:
    return containers(_find(objects, "Deployment/dynrt-router"))[0]


def _spec(objects: list[Obj], kind_name: str) -> Obj:
    return _find(objects, kind_name)["spec"]


def _set_env(c: Obj, var: str, value: str) -> None:
    c["env"] = [v for v in c["env"] if v["name"] != var] + [{"name": var, "value": value}]


BREAKAGES = {
    "worker system port differs from the probes'": lambda o: _set_env(_worker(o), "DYNRT_SYSTEM_PORT", "9200"),
    "worker system port unset": lambda o: _worker(o).__setitem__("env", [v for v in _worker(o)["env"] if v["name"] != "DYNRT_SYSTEM_PORT"]),
    "worker bound to loopback": lambda o: _set_env(_worker(o), "DYNRT_HOST", "127.0.0.1"),
    "frontend http port changed": lambda o: _set_env(_frontend(o), "DYNRT_HTTP_PORT", "8080"),
    "liveness on /health": lambda o: _worker(o)["livenessProbe"]["httpGet"].__setitem__("path", "/health"),
    "readiness path typo": lambda o: _router(o)["readinessProbe"]["httpGet"].__setitem__("path", "/healthz"),
    "short startup probe": lambda o: _worker(o)["startupProbe"].__setitem__("failureThreshold", 6),
    "no GPU": lambda o: _worker(o)["resources"]["limits"].pop("nvidia.com/gpu"),
    "Service selector typo": lambda o: _spec(o, "Service/dynrt-frontend")["selector"].__setitem__("app.kubernetes.io/component", "frontends"),
    "Service targetPort unknown": lambda o: _spec(o, "Service/dynrt-router")["ports"][0].__setitem__("targetPort", "metrics"),
    "sticky Service": lambda o: _spec(o, "Service/dynrt-frontend").__setitem__("sessionAffinity", "ClientIP"),
    "PDB selects nothing": lambda o: _spec(o, "PodDisruptionBudget/dynrt-worker")["selector"]["matchLabels"].__setitem__("app.kubernetes.io/component", "workers"),
    "ServiceMonitor port name": lambda o: _spec(o, "ServiceMonitor/dynrt-worker")["endpoints"][0].__setitem__("port", "metrics"),
    "HPA targets a missing workload": lambda o: _spec(o, "HorizontalPodAutoscaler/dynrt-worker")["scaleTargetRef"].__setitem__("kind", "Deployment"),
    "HPA metric no adapter rule makes": lambda o: _spec(o, "HorizontalPodAutoscaler/dynrt-worker")["metrics"][0]["pods"]["metric"].__setitem__("name", "dynrt_worker_queue"),
    "Secret key missing": lambda o: _frontend(o)["env"][-1]["valueFrom"]["secretKeyRef"].__setitem__("key", "token"),
    "unknown Secret": lambda o: _spec(o, "Deployment/dynrt-frontend")["template"]["spec"]["volumes"][0]["secret"].__setitem__("secretName", "api-keys"),
    "ConfigMap missing": lambda o: _router(o)["envFrom"][0]["configMapRef"].__setitem__("name", "dynrt-settings"),
    "DYNRT_ var that is no setting": lambda o: _set_env(_router(o), "DYNRT_ROUTER_MODE", "kv"),
    "DYNRT_ var misspelt": lambda o: _set_env(_frontend(o), "DYNRT_CHECKPOINT_REPLICA", "3"),
    "invalid setting value": lambda o: _set_env(_frontend(o), "DYNRT_ROUTER_MODE", "sticky"),
    "not a dynrt subcommand": lambda o: _router(o).__setitem__("args", ["route"]),
    "unknown flag": lambda o: _worker(o).__setitem__("args", ["worker", "--engin", "vllm"]),
    "command overrides the entrypoint": lambda o: _worker(o).__setitem__("command", ["dynrt"]),
    "etcd endpoints drift from the chart": lambda o: _find(o, "ConfigMap/dynrt-config")["data"].__setitem__("DYNRT_ETCD_ENDPOINTS", "etcd:2379"),
    "checkpoint replicas exceed NATS": lambda o: _set_env(_frontend(o), "DYNRT_CHECKPOINT_REPLICAS", "5"),
    "replicas fixed under an HPA": lambda o: _spec(o, "StatefulSet/dynrt-worker").__setitem__("replicas", 2),
    "one frontend": lambda o: _spec(o, "HorizontalPodAutoscaler/dynrt-frontend").__setitem__("minReplicas", 1),
    "grace shorter than drain": lambda o: _spec(o, "StatefulSet/dynrt-worker")["template"]["spec"].__setitem__("terminationGracePeriodSeconds", 20),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_checks_catch_breakage(breakage: str) -> None:
    objects = base_objects()  # passes all_checks unbroken: test_wiring
    BREAKAGES[breakage](objects)
    assert all_checks(objects), f"breaking it ({breakage}) went unnoticed"


def test_adapter_query_of_a_missing_series_is_caught() -> None:
    adapter = copy.deepcopy(helm_values("prometheus-adapter"))
    adapter["rules"]["custom"][0]["metricsQuery"] = adapter["rules"]["custom"][0]["metricsQuery"].replace(
        "dynrt_worker_waiting_requests", "dynrt_worker_queued_requests")
    assert check_autoscaling(base_objects(), adapter)
