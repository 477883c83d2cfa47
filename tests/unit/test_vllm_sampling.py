"""The vLLM engine's pure mappings (no vLLM needed): sampling parameters, finish
reasons, EOS ids and load reports from vLLM's scheduler stats."""

from __future__ import annotations

from types import SimpleNamespace

from dynrt.runtime.protocol import SamplingParams
from dynrt.worker.vllm_sampling import finish_reason, model_eos_ids, sampling_kwargs
from dynrt.worker.vllm_stats import VllmStepStats


def test_sampling_kwargs_one_to_one() -> None:
    sampling = SamplingParams(max_tokens=12, temperature=0.5, top_p=0.9, top_k=-1, seed=3, min_tokens=2,
                              stop_token_ids=[7, 2], logprobs=1)
    assert sampling_kwargs(sampling, frozenset({2})) == dict(
        temperature=0.5, top_p=0.9, top_k=0, seed=3, stop_token_ids=[7, 2], max_tokens=12, min_tokens=2,
        ignore_eos=False, logprobs=1, detokenize=False)
    assert sampling_kwargs(SamplingParams(max_tokens=1, top_k=40), frozenset())["top_k"] == 40
    assert sampling_kwargs(SamplingParams(max_tokens=1), frozenset())["stop_token_ids"] is None


def test_ignore_eos_drops_the_models_eos_from_stop_ids() -> None:
    kwargs = sampling_kwargs(SamplingParams(max_tokens=5, ignore_eos=True, stop_token_ids=[2, 7]), frozenset({2}))
    assert kwargs["stop_token_ids"] == [7] and kwargs["ignore_eos"] is True
    only_eos = sampling_kwargs(SamplingParams(max_tokens=5, ignore_eos=True, stop_token_ids=[2]), frozenset({2}))
    assert only_eos["stop_token_ids"] is None


def test_finish_reasons() -> None:
    assert finish_reason("stop", False) == "stop"
    assert finish_reason("length", True) == "length"
    assert finish_reason("abort", False) == "abort"
    assert finish_reason("abort", True) == "cancelled"
    assert finish_reason(None, False) == "abort"


def test_model_eos_ids_from_tokenizer_and_generation_config() -> None:
    def llm(tokenizer_eos: int | None, generation_eos: object) -> SimpleNamespace:
        model_config = SimpleNamespace(try_get_generation_config=lambda: {"eos_token_id": generation_eos})
        return SimpleNamespace(tokenizer=SimpleNamespace(eos_token_id=tokenizer_eos),
                               vllm_config=SimpleNamespace(model_config=model_config))

    assert model_eos_ids(llm(2, [2, 5])) == frozenset({2, 5})
    assert model_eos_ids(llm(None, 9)) == frozenset({9})
    assert model_eos_ids(SimpleNamespace()) == frozenset()  # unknown: logged, nothing dropped


def test_load_report_from_scheduler_stats() -> None:
    stats = VllmStepStats()
    idle = stats.load_report("m", 100, in_flight=0, prefill_tokens=0)
    assert (idle.kv_blocks_used, idle.kv_blocks_total, idle.running, idle.waiting) == (0, 100, 0, 0)
    prefix = SimpleNamespace(queries=0, hits=0)
    stats.record(SimpleNamespace(kv_cache_usage=0.256, num_running_reqs=3, num_waiting_reqs=1,
                                 num_skipped_waiting_reqs=2, prefix_cache_stats=prefix))
    busy = stats.load_report("m", 100, in_flight=6, prefill_tokens=40)
    assert (busy.kv_blocks_used, busy.running, busy.waiting, busy.active_prefill_tokens) == (26, 3, 3, 40)
    # The last step's stats say nothing once no request is in flight.
    assert stats.load_report("m", 100, in_flight=0, prefill_tokens=0).kv_blocks_used == 0
