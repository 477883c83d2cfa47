"""``dynrt worker --engine vllm``'s command line is vLLM's own parser plus dynrt's flags:
vLLM's flags reach ``AsyncEngineArgs`` with vLLM's names and defaults, the clashes are
the documented ones, dynrt's flags keep their meaning. Parsing only: no model is loaded
(vLLM is imported, so these skip where it is not installed)."""

from __future__ import annotations

import importlib.util
from typing import Any

import msgspec
import pytest

from dynrt.controller.spec import ModelSpec
from dynrt.runtime.config import WorkerConfig, from_args
from dynrt.runtime.protocol import InstanceRecord, TokenizerSpec, encode_json, instance_record_decoder
from dynrt.worker import main as worker_main

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")

# The flags dynrt's WorkerConfig and vLLM's engine parser both define (module docstring
# of dynrt.worker.vllm_config): all vLLM's but --log-level.
DOCUMENTED_CLASHES = {"model", "served_model_name", "tokenizer", "block_size", "max_num_seqs",
                      "max_num_batched_tokens", "log_level"}


def parse(*argv: str) -> Any:
    return worker_main.parse_args(list(argv), "dynrt worker", "test")


def engine_args(*argv: str) -> Any:
    from dynrt.worker import vllm_config

    return vllm_config.engine_args_from(parse(*argv))


@pytest.fixture(autouse=True)
def no_dynrt_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("DYNRT_"):
            monkeypatch.delenv(name)


def test_engine_defaults_to_vllm_and_mock_is_explicit(monkeypatch: pytest.MonkeyPatch) -> None:
    assert worker_main.engine_choice([]) == "vllm"
    assert worker_main.engine_choice(["--engine", "mock"]) == "mock"
    monkeypatch.setenv("DYNRT_ENGINE", "mock")
    assert worker_main.engine_choice([]) == "mock"
    assert worker_main.engine_choice(["--engine", "vllm"]) == "vllm"
    assert WorkerConfig().engine == "vllm"
    mock = parse("--engine", "mock", "--speedup", "inf", "--num-blocks", "7")
    assert not hasattr(mock, "dynrt_dests")  # today's flags, vLLM's parser never built
    config = from_args(WorkerConfig, mock)
    assert (config.engine, config.num_blocks) == ("mock", 7)


@needs_vllm
def test_clashes_are_the_documented_ones() -> None:
    from dynrt.worker import vllm_config

    parser = vllm_config.new_vllm_parser("p", "d")
    found = vllm_config.clashes(vllm_config.option_dests(parser), worker_main.WORKER_SETTINGS)
    assert found == DOCUMENTED_CLASHES, "a vLLM release added or removed a clash: update the table in vllm_config"


@needs_vllm
def test_vllm_flags_reach_engine_args_with_vllm_names() -> None:
    args = engine_args("--model", "/m", "--max-num-seqs", "64", "--max-num-batched-tokens", "8192",
                       "--trust-remote-code", "--quantization", "awq", "--kv-cache-dtype", "fp8", "--enable-lora",
                       "--pipeline-parallel-size", "2", "--revision", "r1", "--download-dir", "/d",
                       "--no-enable-prefix-caching", "--block-size", "16", "--seed", "3", "--namespace", "ns")
    assert (args.model, args.max_num_seqs, args.max_num_batched_tokens) == ("/m", 64, 8192)
    assert args.trust_remote_code and args.enable_lora and args.enable_prefix_caching is False
    assert (args.quantization, args.kv_cache_dtype, args.pipeline_parallel_size) == ("awq", "fp8", 2)
    assert (args.revision, args.download_dir, args.block_size, args.seed) == ("r1", "/d", 16, 3)


@needs_vllm
def test_unset_flags_keep_vllm_defaults_and_dynrt_keeps_its_flags() -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs

    from dynrt.worker import vllm_config

    ns = parse("--model", "/m", "--namespace", "ns", "--log-level", "debug", "--drain-timeout", "5",
               "--system-port", "9100", "--canary-after", "0")
    args = vllm_config.engine_args_from(ns)
    defaults = AsyncEngineArgs(model="/m")
    for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "gpu_memory_utilization", "dtype",
                 "enable_prefix_caching", "max_model_len"):
        assert getattr(args, name) == getattr(defaults, name), name
    assert args.disable_log_stats is True  # dynrt's default (vLLM's periodic log lines off)
    assert args.enforce_eager is vllm_config.is_cpu_build()  # on by default on a CPU build only
    config = from_args(WorkerConfig, _dynrt_ns(ns))
    assert (config.namespace, config.log_level, config.drain_timeout, config.system_port) == ("ns", "debug", 5.0, 9100)
    assert args.log_level is None  # --log-level is dynrt's: vLLM's logging level stays its own


def _dynrt_ns(ns: Any) -> Any:
    import argparse

    return argparse.Namespace(**{k: getattr(ns, k, None) for k in ns.dynrt_dests})


@needs_vllm
def test_positional_model_and_several_served_names() -> None:
    from dynrt.worker import vllm_config

    args = engine_args("/path/to/model", "--served-model-name", "a", "b")
    assert args.model == "/path/to/model"
    assert vllm_config.served_names(args) == ["a", "b"]
    assert vllm_config.served_names(engine_args("--model", "/m")) == ["/m"]


@needs_vllm
def test_mock_only_unknown_and_dynrt_set_flags_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--model", "/m", "--speedup", "inf"], ["--model", "/m", "--no-such-flag"]):
        with pytest.raises(SystemExit) as exc:
            parse(*argv)
        assert exc.value.code == 2
        assert "unrecognized arguments" in capsys.readouterr().err
    with pytest.raises(ValueError, match="kv-events-config is set by dynrt"):
        engine_args("--model", "/m", "--kv-events-config", '{"enable_kv_cache_events": true}')


@needs_vllm
def test_environment_sets_vllm_flag_defaults_and_the_line_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYNRT_MODEL", "/env-model")
    monkeypatch.setenv("DYNRT_MAX_NUM_SEQS", "7")
    monkeypatch.setenv("DYNRT_ENABLE_PREFIX_CACHING", "false")
    monkeypatch.setenv("DYNRT_SERVED_MODEL_NAME", "")  # compose's ${X:-}: unset
    args = engine_args()
    assert (args.model, args.max_num_seqs, args.enable_prefix_caching, args.served_model_name) == \
        ("/env-model", 7, False, None)
    assert engine_args("--max-num-seqs", "9", "/line-model").max_num_seqs == 9
    assert engine_args("/line-model").model == "/line-model"


@needs_vllm
def test_controller_spec_args_pass_through_unchanged() -> None:
    spec = ModelSpec(name="smol", engine="vllm", model="/m",
                     args=["--max-num-seqs", "2", "--no-enable-prefix-caching", "--kv-cache-dtype", "fp8"])
    argv = spec.worker_args()
    args = engine_args(*argv)
    assert (args.model, args.served_model_name, args.max_num_seqs) == ("/m", ["smol"], 2)
    assert args.enable_prefix_caching is False and args.kv_cache_dtype == "fp8"
    as_dict = ModelSpec(name="smol", engine="vllm", model="/m",
                        args={"max-num-seqs": 2, "enable-prefix-caching": False})
    assert engine_args(*as_dict.worker_args()).enable_prefix_caching is False


def test_loading_record_is_not_routable_and_old_records_decode() -> None:
    record = InstanceRecord(instance_id="i", namespace="n", component="c", endpoint="e", model="m", subject="",
                            engine="vllm", block_size=16, kv_blocks_total=0, context_length=2048, max_num_seqs=2,
                            tokenizer=TokenizerSpec(kind="hf", path="/m"), loading=True)
    assert not record.routable
    ready = msgspec.structs.replace(record, subject="s.i", loading=False)
    assert ready.routable
    old = msgspec.json.decode(encode_json(ready))
    del old["loading"]  # a record written before the field existed
    assert instance_record_decoder.decode(msgspec.json.encode(old)).routable
