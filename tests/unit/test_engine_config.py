"""Worker flags → mock engine settings: a sizing flag that was given reaches the engine
even when it equals a default; one that was not given leaves the engine its own default.
Pure mappings: no vLLM needed. (The vLLM engine's flags are vLLM's own parser:
test_vllm_args.py.)"""

from __future__ import annotations

import argparse

import pytest

from dynrt.runtime import config as config_flags
from dynrt.runtime.config import WorkerConfig, from_args
from dynrt.worker.mock_engine import MockEngineConfig, mock_engine_config

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
    config = parse("--engine", "mock")
    assert config.max_num_seqs == 256
    assert mock_engine_config(config).max_num_seqs == 256


def test_help_names_the_mock_defaults() -> None:
    parser = argparse.ArgumentParser()
    config_flags.add_arguments(parser, WorkerConfig)
    text = " ".join(parser.format_help().split())
    defaults = MockEngineConfig()
    assert f"mock: max running sequences (None = {defaults.max_num_seqs})" in text
    assert f"mock: token budget per engine step (None = {defaults.max_num_batched_tokens})" in text
