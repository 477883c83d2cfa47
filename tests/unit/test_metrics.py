"""``dynrt.runtime.metrics``: the series of prometheus_client's default registry that a
library registers (vLLM's ``vllm:*``) are served from dynrt's registry, also when the
library re-creates them (one engine after another in a process); ``dynrt_build_info``;
bucket ranges that reach vLLM's."""

from __future__ import annotations

import ast
import importlib.util
import platform
import subprocess
from collections.abc import Iterator
from pathlib import Path

import prometheus_client
import pytest

from dynrt import __version__
from dynrt.runtime import metrics
from harness.metrics import metric, parse_metrics

ROOT = Path(__file__).resolve().parents[2]


def served() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    body, _ = metrics.render()
    return parse_metrics(body.decode())


@pytest.fixture
def default_registry_series() -> Iterator[list[prometheus_client.Gauge]]:
    """Gauges the test registers in the default registry; unregistered afterwards."""
    made: list[prometheus_client.Gauge] = []
    yield made
    for gauge in made:
        try:
            prometheus_client.REGISTRY.unregister(gauge)
        except KeyError:
            pass


def test_default_registry_series_are_served_by_prefix(default_registry_series: list[prometheus_client.Gauge]) -> None:
    metrics.serve_default_registry("vllmtest:")
    metrics.serve_default_registry("vllmtest:")  # idempotent: no second copy
    first = prometheus_client.Gauge("vllmtest:num_requests_running", "running", ["engine"])
    default_registry_series.append(first)
    first.labels("0").set(3)
    body = metrics.render()[0].decode()
    assert body.count("# TYPE vllmtest:num_requests_running gauge") == 1
    assert metric(served(), "vllmtest:num_requests_running", engine="0") == 3
    # other series of the default registry stay out (python_gc_*, process_*)
    assert not [name for name, _ in served() if name.startswith(("python_gc", "process_"))]

    # A second engine in the process: the library unregisters its series and registers
    # new ones under the same names (vLLM: unregister_vllm_metrics()).
    prometheus_client.REGISTRY.unregister(first)
    second = prometheus_client.Gauge("vllmtest:num_requests_running", "running", ["engine"])
    default_registry_series.append(second)
    second.labels("0").set(5)
    assert metric(served(), "vllmtest:num_requests_running", engine="0") == 5
    assert metrics.render()[0].decode().count("# TYPE vllmtest:num_requests_running gauge") == 1


def test_build_info() -> None:
    info = [(labels, value) for (name, labels), value in served().items() if name == "dynrt_build_info"]
    assert len(info) == 1
    labels, value = dict(info[0][0]), info[0][1]
    assert value == 1
    assert labels["version"] == __version__ and labels["python"] == platform.python_version()
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    assert labels["revision"] == (git.stdout.strip() if git.returncode == 0 else "unknown")


def test_buckets_reach_vllms_range() -> None:
    assert max(metrics.TOKEN_BUCKETS) >= 131072
    assert list(metrics.TOKEN_BUCKETS) == sorted(set(metrics.TOKEN_BUCKETS))
    assert max(metrics.REQUEST_LATENCY_BUCKETS) >= 7680
    assert list(metrics.REQUEST_LATENCY_BUCKETS) == sorted(set(metrics.REQUEST_LATENCY_BUCKETS))


def test_request_latency_buckets_contain_vllms() -> None:
    """So dynrt's and vLLM's request latencies compare bucket for bucket. Read from the
    installed vLLM's source: importing vLLM takes seconds (torch)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        pytest.skip("vLLM is not installed")
    tree = ast.parse((Path(spec.origin).parent / "v1" / "metrics" / "buckets.py").read_text())
    vllm_buckets = next(ast.literal_eval(node.value) for node in ast.walk(tree)
                        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                        and node.target.id == "REQUEST_LATENCY_BUCKETS")
    assert len(vllm_buckets) > 10
    assert set(vllm_buckets) <= set(metrics.REQUEST_LATENCY_BUCKETS)
