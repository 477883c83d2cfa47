"""Worker flags → engine settings: a sizing flag that was given reaches the engine even
when it equals a default; one that was not given leaves the engine its own default.
Pure mappings: no vLLM needed."""

from __future__ import annotations

import argparse

import pytest

from dynrt.runtime import config as config_flags
from dynrt.runtime.config import WorkerConfig, from_args
from dynrt.worker.mock_engine import MockEngineConfig, mock_engine_config
from dynrt.worker.vllm_config import async_engine_args, vllm_engine_config

SIZING = ("max_num_seqs", "max_num_batched_tokens")


def parse(*argv: str) -> WorkerConfig:
    parser = argparse.ArgumentParser()
    config_flags.add_arguments(parser, WorkerConfig)
    return from_args(WorkerConfig, parser.parse_args(list(argv)))


@pytest.fixture(autouse=True)
def no_sizing_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SIZING:
        monkeypatch.delenv(f"DYNRT_{name.upper()}", raising=False)


def test_unset_sizing_flags_are_none() -> None:
    config = parse()
    assert (config.max_num_seqs, config.max_num_batched_tokens) == (None, None)


@pytest.mark.parametrize("on_cpu", [False, True])
def test_vllm_gets_an_explicit_value_equal_to_the_mock_default(on_cpu: bool) -> None:
    mock_defaults = MockEngineConfig()
    config = parse("--engine", "vllm", "--model", "m", "--max-num-seqs", str(mock_defaults.max_num_seqs),
                   "--max-num-batched-tokens", str(mock_defaults.max_num_batched_tokens))
    vllm_config = vllm_engine_config(config, on_cpu=on_cpu)
    assert vllm_config.max_num_seqs == 256 == mock_defaults.max_num_seqs
    assert vllm_config.max_num_batched_tokens == 8192 == mock_defaults.max_num_batched_tokens
    kwargs = async_engine_args(vllm_config, served_model_name="m", on_cpu=on_cpu)
    assert (kwargs["max_num_seqs"], kwargs["max_num_batched_tokens"]) == (256, 8192)


def test_vllm_keeps_its_own_defaults_when_unset() -> None:
    vllm_config = vllm_engine_config(parse("--engine", "vllm", "--model", "m"), on_cpu=False)
    assert (vllm_config.max_num_seqs, vllm_config.max_num_batched_tokens) == (None, None)
    kwargs = async_engine_args(vllm_config, served_model_name="m", on_cpu=False)
    assert not set(SIZING) & set(kwargs)
    assert kwargs["block_size"] == 16 and kwargs["gpu_memory_utilization"] == 0.9
    assert kwargs["served_model_name"] == ["m"] and kwargs["enable_prefix_caching"] is True


def test_vllm_on_cpu_block_size_and_eager() -> None:
    default = vllm_engine_config(parse("--model", "m"), on_cpu=True)
    assert default.block_size is None and default.enforce_eager
    assert "block_size" not in async_engine_args(default, served_model_name="m", on_cpu=True)
    assert "gpu_memory_utilization" not in async_engine_args(default, served_model_name="m", on_cpu=True)
    assert vllm_engine_config(parse("--model", "m", "--block-size", "64"), on_cpu=True).block_size == 64
    assert not vllm_engine_config(parse("--model", "m"), on_cpu=False).enforce_eager


def test_engine_args_override_last() -> None:
    vllm_config = vllm_engine_config(parse("--model", "m", "--max-num-seqs", "8"), on_cpu=False)
    vllm_config.engine_args = {"max_num_seqs": 4, "seed": 1}
    kwargs = async_engine_args(vllm_config, served_model_name="m", on_cpu=False)
    assert (kwargs["max_num_seqs"], kwargs["seed"]) == (4, 1)


def test_mock_gets_explicit_values_and_its_defaults_when_unset() -> None:
    defaults = MockEngineConfig()
    unset = mock_engine_config(parse())
    assert (unset.max_num_seqs, unset.max_num_batched_tokens) == (defaults.max_num_seqs, defaults.max_num_batched_tokens)
    same = mock_engine_config(parse("--max-num-seqs", "256", "--max-num-batched-tokens", "8192"))
    assert (same.max_num_seqs, same.max_num_batched_tokens) == (256, 8192)
    other = mock_engine_config(parse("--max-num-seqs", "3", "--max-num-batched-tokens", "64", "--num-blocks", "7",
                                     "--served-model-name", "served", "--speedup", "inf"))
    assert (other.max_num_seqs, other.max_num_batched_tokens, other.num_blocks) == (3, 64, 7)
    assert other.model == "served" and other.speedup == float("inf")


def test_environment_sets_sizing_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYNRT_MAX_NUM_SEQS", "256")
    config = parse("--engine", "vllm", "--model", "m")
    assert config.max_num_seqs == 256
    assert vllm_engine_config(config, on_cpu=True).max_num_seqs == 256


def test_help_names_the_mock_defaults() -> None:
    parser = argparse.ArgumentParser()
    config_flags.add_arguments(parser, WorkerConfig)
    text = " ".join(parser.format_help().split())
    defaults = MockEngineConfig()
    assert f"{defaults.max_num_seqs} on mock" in text
    assert f"{defaults.max_num_batched_tokens} on mock" in text
