"""deployment.yaml validation, the worker flags a spec turns into, and the controller's
backoff (no processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynrt.controller.reconcile import backoff_delay
from dynrt.controller.spec import SpecError, load_spec, load_spec_text


def test_full_spec_and_defaults() -> None:
    spec = load_spec_text("""
models:
  - name: small
    args: {speedup: 10, num_blocks: 256, fail-health-check: true, enforce-eager: false}
    replicas: 2
    max_replicas: 4
    autoscaling: {metric: kv_usage, target: 0.7}
  - name: big
    engine: vllm
    model: /models/big
    args: ["--tensor-parallel-size", "2"]
""")
    small, big = spec.models
    assert (small.initial_replicas, small.min_replicas, small.ceiling) == (2, 1, 4)
    assert (small.health_check.period, small.health_check.timeout) == (10.0, 30.0)
    assert small.worker_args() == ["--engine", "mock", "--model", "small", "--served-model-name", "small",
                                   "--drain-timeout", "30.0", "--speedup", "10", "--num-blocks", "256",
                                   "--fail-health-check", "--no-enforce-eager"]
    assert big.worker_args()[:6] == ["--engine", "vllm", "--model", "/models/big", "--served-model-name", "big"]
    assert (big.initial_replicas, big.ceiling, big.autoscaling) == (1, 1, None)


def test_launch_digest_changes_only_with_what_runs() -> None:
    base = "models: [{name: m, args: {speedup: 1}, replicas: 1, max_replicas: 3%s}]"
    a = load_spec_text(base % "").models[0]
    assert load_spec_text(base % ", replicas: 2").models[0].launch_digest() == a.launch_digest()
    assert load_spec_text(base % ", health_check: {period: 1, timeout: 2}").models[0].launch_digest() == a.launch_digest()
    assert load_spec_text(base.replace("speedup: 1", "speedup: 2") % "").models[0].launch_digest() != a.launch_digest()


@pytest.mark.parametrize("text, message", [
    ("models: []", "'models' is empty"),
    ("- a\n- b", "expected a mapping with 'models'"),
    ("models: [{name: m, replicas: x}]", "Expected `int | null`, got `str` - at `$.models[0].replicas`"),
    ("models: [{name: m, replica: 2}]", "unknown field `replica`"),
    ("models: [{name: m, engine: tgi}]", "Invalid enum value 'tgi' - at `$.models[0].engine` (one of: mock, vllm)"),
    ("models: [{name: m, replicas: 5, max_replicas: 2}]", "models[0] (m): replicas (5) > max_replicas (2)"),
    ("models: [{name: m, min_replicas: 3, max_replicas: 2}]", "max_replicas (2) < min_replicas (3)"),
    ("models: [{name: m}, {name: m}]", "model name 'm' appears twice"),
    ("models: [{name: m, health_check: {period: 10, timeout: 5}}]", "timeout (5.0) is shorter than"),
    ("models: [{name: m, health_check: {period: 0}}]", "$.models[0].health_check.period"),
    ("models: [{name: m, autoscaling: {target: 2}}]", "autoscaling needs max_replicas"),
    ("models: [{name: m, max_replicas: 2, autoscaling: {metric: kv_usage, target: 2}}]", "is a fraction"),
    ("models: [{name: m, args: ['--namespace', 'x']}]", "args may not set --namespace"),
    ("models: [{name: m", "not valid YAML"),
])
def test_bad_files_fail_with_the_place_and_the_reason(text: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "deployment.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value), str(info.value)


def test_missing_file() -> None:
    with pytest.raises(SpecError, match="nope.yaml: cannot read: No such file or directory"):
        load_spec("/nonexistent/nope.yaml")


def test_backoff_doubles_to_a_ceiling() -> None:
    assert [backoff_delay(n) for n in range(1, 10)] == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
