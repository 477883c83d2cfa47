"""The prior-output logits processor's arithmetic, checked against vLLM's own penalty and
bad-words code: a migrated request (prior output resent as prompt) must get the logits
the uninterrupted request gets."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402
from vllm.model_executor.layers.utils import apply_penalties  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate  # noqa: E402
from vllm.v1.sample.ops.bad_words import apply_bad_words  # noqa: E402

from dynrt.worker.vllm_prior_output import PriorOutputLogitsProcessor, corrected_logits  # noqa: E402
from dynrt.worker.vllm_sampling import PRIOR_OUTPUT_KEY  # noqa: E402

VOCAB = 12
PROMPT = [1, 2, 3]
PRIOR = [4, 5, 4, 6, 2]  # earlier output: 4 twice, 2 also in the prompt


def vllm_penalties(logits: torch.Tensor, prompt: list[int], output: list[int], presence: float, frequency: float,
                   repetition: float) -> torch.Tensor:
    """What vLLM's sampler does with a one-request batch (``Sampler.apply_penalties``)."""
    pad = lambda ids: torch.tensor([ids or [VOCAB]], dtype=torch.long)  # noqa: E731  (vocab = padding)
    return apply_penalties(logits.clone(), pad(prompt), pad(output), torch.tensor([presence]),
                           torch.tensor([frequency]), torch.tensor([repetition]))


def processor_for(params: SamplingParams, prompt: list[int], output: list[int]) -> PriorOutputLogitsProcessor:
    processor = PriorOutputLogitsProcessor(None, torch.device("cpu"), False)
    processor.update_state(BatchUpdate(batch_size=1, removed=[], added=[(0, params, prompt, output)], moved=[]))
    return processor


@pytest.mark.parametrize("repetition", [1.0, 1.3, 0.8])
@pytest.mark.parametrize("new_output", [[], [7], [4, 7], [6, 5, 4, 9]])
def test_migrated_request_gets_the_uninterrupted_logits(repetition: float, new_output: list[int]) -> None:
    presence, frequency = 0.8, 1.0
    logits = torch.linspace(-3.0, 4.0, VOCAB).roll(5).unsqueeze(0)
    uninterrupted = vllm_penalties(logits, PROMPT, PRIOR + new_output, presence, frequency, repetition)

    params = SamplingParams(presence_penalty=presence, frequency_penalty=frequency, repetition_penalty=repetition,
                            extra_args={PRIOR_OUTPUT_KEY: len(PRIOR)})
    output = list(new_output)
    processor = processor_for(params, PROMPT + PRIOR, output)
    migrated = vllm_penalties(processor.apply(logits.clone()), PROMPT + PRIOR, output, presence, frequency,
                              repetition)
    torch.testing.assert_close(migrated, uninterrupted, rtol=1e-6, atol=1e-5)
    # Without the processor the migrated request's logits differ (the test can fail).
    plain = vllm_penalties(logits, PROMPT + PRIOR, output, presence, frequency, repetition)
    assert not torch.allclose(plain, uninterrupted)


def test_the_live_output_list_is_followed_step_by_step() -> None:
    presence, frequency = 0.5, 0.25
    params = SamplingParams(presence_penalty=presence, frequency_penalty=frequency,
                            extra_args={PRIOR_OUTPUT_KEY: len(PRIOR)})
    output: list[int] = []
    processor = processor_for(params, PROMPT + PRIOR, output)
    logits = torch.zeros(1, VOCAB)
    for token in (5, 8, 6, -1):  # -1: async scheduling's placeholder, read later
        output.append(token)
        if token < 0:
            break
        uninterrupted = vllm_penalties(logits, PROMPT, PRIOR + output, presence, frequency, 1.0)
        migrated = vllm_penalties(processor.apply(logits.clone()), PROMPT + PRIOR, output, presence, frequency, 1.0)
        torch.testing.assert_close(migrated, uninterrupted)
    output[-1] = 4
    uninterrupted = vllm_penalties(logits, PROMPT, PRIOR + output, presence, frequency, 1.0)
    migrated = vllm_penalties(processor.apply(logits.clone()), PROMPT + PRIOR, output, presence, frequency, 1.0)
    torch.testing.assert_close(migrated, uninterrupted)


def test_requests_without_prior_output_or_penalties_leave_no_state() -> None:
    for params in (SamplingParams(frequency_penalty=1.0),  # not migrated
                   SamplingParams(repetition_penalty=1.2, extra_args={PRIOR_OUTPUT_KEY: 2}),  # nothing to count
                   SamplingParams(frequency_penalty=1.0, extra_args={"other": 1})):
        processor = processor_for(params, PROMPT + PRIOR, [])
        assert processor.requests == {}
        logits = torch.randn(1, VOCAB)
        assert torch.equal(processor.apply(logits.clone()), logits)
    # Removal and moves follow vLLM's batch updates.
    params = SamplingParams(frequency_penalty=1.0, extra_args={PRIOR_OUTPUT_KEY: 2})
    processor = processor_for(params, PROMPT + PRIOR, [])
    processor.update_state(BatchUpdate(batch_size=1, removed=[0], added=[], moved=[]))
    assert processor.requests == {}


def test_bad_word_straddling_the_migration_point_is_banned() -> None:
    bad = [[6, 2, 9], [3, 11]]  # "6 2 9": the prior output ends with 6 2; "3 11" lies in the prompt
    params = SamplingParams(extra_args={PRIOR_OUTPUT_KEY: len(PRIOR)})
    params._bad_words_token_ids = bad

    def banned(prior: list[int], new: list[int], migrated: bool) -> set[int]:
        logits = torch.zeros(1, VOCAB)
        if migrated:
            output = list(new)
            logits = processor_for(params, PROMPT + prior, output).apply(logits)
            apply_bad_words(logits, {0: bad}, [output])
        else:
            apply_bad_words(logits, {0: bad}, [prior + new])
        return {i for i in range(VOCAB) if logits[0, i] == float("-inf")}

    assert banned(PRIOR, [], migrated=False) == {9}
    assert banned(PRIOR, [], migrated=True) == {9}
    assert banned(PRIOR[:-1], [2], migrated=True) == banned(PRIOR[:-1], [2], migrated=False) == {9}
    assert banned(PRIOR, [7], migrated=True) == banned(PRIOR, [7], migrated=False) == set()


def test_corrected_logits_inverts_the_repetition_penalty() -> None:
    x = torch.tensor([-2.0, -0.1, 0.0, 0.05, 1.0, 3.0])
    delta = torch.tensor([0.5, 0.5, 1.0, 0.2, 2.0, 0.7])
    for r in (1.0, 1.5, 0.7):
        rep = lambda v: torch.where(v > 0, v * (1.0 / r), v * r)  # noqa: E731
        torch.testing.assert_close(rep(corrected_logits(x, delta, r)), rep(x) - delta)
