"""The vLLM engine's pure mappings (no vLLM needed): sampling parameters, finish
reasons, EOS ids and load reports from vLLM's scheduler stats."""

from __future__ import annotations

from types import SimpleNamespace

import msgspec

from dynrt.runtime.protocol import SamplingParams, StructuredOutput, TokenLogprobs
from dynrt.worker.vllm_sampling import (
    PRIOR_OUTPUT_KEY,
    finish_reason,
    model_eos_ids,
    prior_output_count,
    sampling_kwargs,
    structured_kwargs,
    token_logprobs,
)
from dynrt.worker.vllm_stats import VllmStepStats


def test_sampling_kwargs_one_to_one() -> None:
    sampling = SamplingParams(max_tokens=12, temperature=0.5, top_p=0.9, top_k=-1, seed=3, min_tokens=2,
                              stop_token_ids=[7, 2], logprobs=1, min_p=0.05, presence_penalty=0.8,
                              frequency_penalty=-0.5, repetition_penalty=1.3, logit_bias={5: -100.0, 9: 2.5},
                              allowed_token_ids=[5, 9, 11], bad_words=["foo bar"])
    assert sampling_kwargs(sampling, frozenset({2})) == dict(
        temperature=0.5, top_p=0.9, top_k=0, seed=3, stop_token_ids=[7, 2], max_tokens=12, min_tokens=2,
        ignore_eos=False, logprobs=1, flat_logprobs=True, detokenize=False, min_p=0.05, presence_penalty=0.8,
        frequency_penalty=-0.5, repetition_penalty=1.3, logit_bias={5: -100.0, 9: 2.5}, allowed_token_ids=[5, 9, 11],
        bad_words=["foo bar"], structured_outputs=None)
    defaults = sampling_kwargs(SamplingParams(max_tokens=1), frozenset())
    assert defaults["stop_token_ids"] is None and defaults["logprobs"] is None and not defaults["flat_logprobs"]
    assert (defaults["logit_bias"], defaults["allowed_token_ids"], defaults["bad_words"]) == (None, None, None)
    assert sampling_kwargs(SamplingParams(max_tokens=1, top_k=40), frozenset())["top_k"] == 40
    # Every field of the wire's SamplingParams is mapped (or, for structured, turned into kwargs).
    mapped = set(sampling_kwargs(sampling, frozenset())) | {"structured"}
    assert {f.name for f in msgspec.structs.fields(SamplingParams)} - mapped == set()


def test_every_sampling_kwarg_is_one_vllm_accepts() -> None:
    vllm = __import__("pytest").importorskip("vllm")
    from vllm.sampling_params import StructuredOutputsParams

    sampling = SamplingParams(max_tokens=4, presence_penalty=0.5, logit_bias={3: 1.0}, logprobs=2, bad_words=["x"],
                              structured=StructuredOutput(json='{"type": "object"}'))
    kwargs = sampling_kwargs(sampling, frozenset(), prior_output_tokens=3)
    kwargs["structured_outputs"] = StructuredOutputsParams(**kwargs["structured_outputs"])
    params = vllm.SamplingParams(**kwargs)
    assert params.structured_outputs.json == '{"type": "object"}'
    assert params.extra_args == {PRIOR_OUTPUT_KEY: 3} and params.flat_logprobs


def test_structured_output_kwargs() -> None:
    assert structured_kwargs(StructuredOutput(json='{"type": "object"}', disable_any_whitespace=True)) == dict(
        json='{"type": "object"}', disable_any_whitespace=True, disable_additional_properties=False,
        whitespace_pattern=None)
    assert structured_kwargs(StructuredOutput(json_object=True))["json_object"] is True
    assert "json_object" not in structured_kwargs(StructuredOutput(regex="a+"))  # False would count as set
    assert structured_kwargs(StructuredOutput(choice=["yes", "no"]))["choice"] == ["yes", "no"]
    for name in ("grammar", "structural_tag"):
        assert structured_kwargs(StructuredOutput(**{name: "x"}))[name] == "x"  # type: ignore[arg-type]
    kwargs = sampling_kwargs(SamplingParams(structured=StructuredOutput(regex="a+")), frozenset())
    assert kwargs["structured_outputs"]["regex"] == "a+"


def test_prior_output_is_marked_only_where_vllm_would_count_it_as_prompt() -> None:
    def extra(prior: int, **fields: object) -> object:
        return sampling_kwargs(SamplingParams(**fields), frozenset(), prior).get("extra_args")  # type: ignore[arg-type]

    assert extra(5, frequency_penalty=1.0) == {PRIOR_OUTPUT_KEY: 5}
    assert extra(5, presence_penalty=-0.2) == {PRIOR_OUTPUT_KEY: 5}
    assert extra(5, bad_words=["x"]) == {PRIOR_OUTPUT_KEY: 5}
    assert extra(5, structured=StructuredOutput(regex="a")) == {PRIOR_OUTPUT_KEY: 5}
    assert extra(0, frequency_penalty=1.0) is None  # not migrated
    assert extra(5, repetition_penalty=1.5, logprobs=3, temperature=0.3) is None  # nothing to correct
    assert prior_output_count({PRIOR_OUTPUT_KEY: 4}) == 4
    assert prior_output_count(None) == prior_output_count({}) == prior_output_count({PRIOR_OUTPUT_KEY: "4"}) == 0


def test_token_logprobs_from_flat_logprobs() -> None:
    # vLLM's layout: per position the sampled token, then the top k by rank; the
    # sampled token appears twice when it is among the top k.
    flat = SimpleNamespace(start_indices=[0, 3], end_indices=[3, 6], token_ids=[7, 7, 4, 9, 7, 9],
                           logprobs=[-0.1, -0.1, -2.5, -3.0, -0.2, -3.0])
    assert token_logprobs(flat, 2) == [TokenLogprobs(-0.1, [7, 4], [-0.1, -2.5]),
                                       TokenLogprobs(-3.0, [7, 9], [-0.2, -3.0])]
    # More columns than k (the batch's largest k): only the first k after the sampled one.
    assert token_logprobs(flat, 1) == [TokenLogprobs(-0.1, [7], [-0.1]), TokenLogprobs(-3.0, [7], [-0.2])]
    only_sampled = SimpleNamespace(start_indices=[0], end_indices=[1], token_ids=[5], logprobs=[-1.5])
    assert token_logprobs(only_sampled, 0) == [TokenLogprobs(-1.5, [], [])]


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
