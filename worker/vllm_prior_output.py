"""A vLLM v1 logits processor that makes a migrated request's prior output count as
output, where vLLM would count it as prompt.

A migrated request reaches vLLM as prompt = original prompt + the ``k`` tokens generated
before the migration (``extra_args[PRIOR_OUTPUT_KEY] = k``, set by
``dynrt.worker.vllm_sampling``). vLLM's sampler counts only the request's own output for:

- ``frequency_penalty`` / ``presence_penalty``: logit[t] -= f * count_out(t) + p * [t in out];
  this processor subtracts what the prior output adds: f * count_prior(t) +
  p * [t in prior and t not in the new output] (vLLM itself charges the tokens already in
  the new output);
- ``bad_words``: a multi-token bad word is banned when the output ends with its prefix;
  while the new output is shorter than a prefix, the prefix may straddle the migration
  point, so this processor checks prior + new output there.

``repetition_penalty`` needs nothing: vLLM applies it to every token of prompt or output
(``apply_repetition_penalties``: ``prompt_mask | output_mask``), the same set after a
migration. Ordering: custom processors run after vLLM's built-in ones (min_tokens,
logit_bias) and before penalties (``Sampler.apply_logits_processors``); the additive
penalties commute with this processor, but the repetition penalty (x/r for x > 0, x*r
otherwise) does not, so when it is on, the correction is applied through it: the new logit
x' satisfies rep(x') = rep(x) - correction exactly as the uninterrupted request's would.

Registered by its name (``PROCESSOR_FQCN``) in the engine's ``logits_processors``
(``dynrt.worker.vllm_engine``); vLLM then builds one per engine core and keeps it told of
every request in the batch (``update_state``). Requests without the key (all but migrated
ones with penalties or bad words) leave no state and cost nothing.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from dynrt.worker.vllm_sampling import prior_output_count

PROCESSOR_FQCN = "dynrt.worker.vllm_prior_output:PriorOutputLogitsProcessor"


def corrected_logits(logits: torch.Tensor, delta: torch.Tensor, repetition_penalty: float) -> torch.Tensor:
    """``logits`` (of the tokens to correct) such that vLLM's penalties then leave them
    ``delta`` lower than they would leave the originals: rep(x') = rep(x) - delta, with
    rep(x) = x * (1/r) if x > 0 else x * r, vLLM's repetition penalty (identity if r == 1)."""
    if repetition_penalty == 1.0:
        return logits - delta
    r = repetition_penalty
    penalized = torch.where(logits > 0, logits * (1.0 / r), logits * r) - delta
    return torch.where(penalized > 0, penalized * r, penalized * (1.0 / r))


class _PriorOutput:
    """One migrated request's prior output, and how far its new output has been read."""

    __slots__ = ("prior", "output", "frequency", "presence", "repetition", "ids", "counts", "position", "unseen",
                 "read", "delta", "bad_words")

    def __init__(self, prior: list[int], output: list[int], frequency: float, presence: float, repetition: float,
                 bad_words: list[list[int]], device: torch.device) -> None:
        self.prior = prior
        self.output = output  # vLLM's live list of the request's new output
        self.frequency = frequency
        self.presence = presence
        self.repetition = repetition
        counts = Counter(prior) if (frequency or presence) else Counter()
        self.position = {t: i for i, t in enumerate(counts)}
        self.ids = torch.tensor(list(counts), dtype=torch.long, device=device)
        self.counts = list(counts.values())
        self.unseen = [1.0] * len(counts)  # Python lists: no device sync to read them
        self.read = 0
        self.delta: torch.Tensor | None = None
        # Only bad words of >= 2 tokens can straddle the migration point.
        self.bad_words = [w for w in bad_words if len(w) > 1]

    def refresh(self) -> None:
        """Read the new output since the last step: a prior token seen again no longer
        earns the presence correction (vLLM charges it now)."""
        output = self.output
        if len(output) < self.read:  # vLLM discarded tokens (a KV load failure): re-read
            self.read = 0
            self.unseen = [1.0] * len(self.unseen)
            self.delta = None
        while self.read < len(output):
            token = output[self.read]
            if token < 0:  # async scheduling's placeholder: read it next step
                break
            self.read += 1
            index = self.position.get(token)
            if index is not None and self.presence and self.unseen[index]:
                self.unseen[index] = 0.0
                self.delta = None
        if self.delta is None:  # at most once per distinct prior token
            f, p = self.frequency, self.presence
            self.delta = torch.tensor([f * c + p * u for c, u in zip(self.counts, self.unseen, strict=True)],
                                      dtype=torch.float32, device=self.ids.device)

    def apply(self, row: torch.Tensor) -> None:
        """Correct one request's logits row in place."""
        if len(self.ids):
            self.refresh()
            assert self.delta is not None
            row[self.ids] = corrected_logits(row[self.ids], self.delta, self.repetition)
        if self.bad_words:
            self._ban_straddling_bad_words(row)

    def _ban_straddling_bad_words(self, row: torch.Tensor) -> None:
        new = [t for t in self.output if t >= 0]
        longest = max(len(w) for w in self.bad_words) - 1
        if len(new) >= longest:
            self.bad_words = []  # vLLM's own check sees whole prefixes from now on
            return
        past = self.prior + new
        for word in self.bad_words:
            prefix = len(word) - 1
            # vLLM's check covers a prefix that lies inside the new output.
            if len(new) < prefix <= len(past) and past[-prefix:] == word[:-1]:
                row[word[-1]] = float("-inf")


class PriorOutputLogitsProcessor(LogitsProcessor):
    """See the module docstring."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.device = device
        self.requests: dict[int, _PriorOutput] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # it changes which token is most likely

    def _new_state(self, params: Any, prompt: list[int] | None, output: list[int]) -> _PriorOutput | None:
        k = prior_output_count(params.extra_args)
        if not k or prompt is None or k > len(prompt):
            return None
        frequency, presence = float(params.frequency_penalty), float(params.presence_penalty)
        bad_words = list(getattr(params, "_bad_words_token_ids", None) or [])
        if not (frequency or presence or bad_words):
            return None
        return _PriorOutput(list(prompt[-k:]), output, frequency, presence, float(params.repetition_penalty),
                            bad_words, self.device)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.requests, batch_update, self._new_state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, state in self.requests.items():
            state.apply(logits[index])
        return logits
