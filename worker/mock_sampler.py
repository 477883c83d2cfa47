"""The mock engine's next-token rule.

Output is a pure function of (every token id so far, seed): a rolling BLAKE2b state
over the token ids, updated once per token, picks the next token, so a request continued
on another engine from prompt + k output tokens produces exactly the tokens the first
engine would have. Temperature, top_p, top_k and logprobs do not change the rule.

Logprobs (``SamplingParams.logprobs == k``) are a pure function of the same state
(:func:`mock_logprobs`): the sampled token is always the most likely one (rank 1, with
the same logprob in ``top_logprobs[0]`` as in ``logprob``), the other ``k - 1`` are
distinct vocabulary ids with decreasing logprobs, and the probabilities sum to <= 1.
So a migrated request gets exactly the logprobs the first engine would have given.
"""

from __future__ import annotations

import hashlib
import math
import struct
from typing import TYPE_CHECKING

from dynrt.runtime.mock_tokenizer import EOS_ID, mock_tokenizer
from dynrt.runtime.protocol import FinishReason, TokenLogprobs

if TYPE_CHECKING:
    from dynrt.worker.mock_sequence import MockSequence

_PACK_TOKEN = struct.Struct("<q").pack


def seeded_rng(seed: int | None, token_ids: list[int]) -> hashlib.blake2b:
    """The rolling state of a request: its seed (None counts as 0), then its tokens."""
    rng = hashlib.blake2b((seed if seed is not None else 0).to_bytes(8, "little", signed=True), digest_size=8)
    rng.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return rng


def mock_logprobs(state: int, token: int, k: int, vocab: list[int]) -> TokenLogprobs:
    """The mock's logprobs of ``token``, sampled from the rolling state ``state`` (the
    digest it was picked with), with the ``k`` most likely tokens. The sampled token
    has probability in [0.5, 0.9); the rest of the mass halves down the ranks."""
    p_top = 0.5 + 0.4 * ((state >> 40) % 1000) / 1000.0
    logprob = math.log(p_top)
    if k <= 0:
        return TokenLogprobs(logprob)
    top_ids = [token]
    top_logprobs = [logprob]
    n = len(vocab)
    start = (state >> 16) % n
    rest = 1.0 - p_top
    j = 0
    while len(top_ids) < k and j < n:
        candidate = vocab[(start + j) % n]
        j += 1
        if candidate == token:
            continue
        rest /= 2
        top_ids.append(candidate)
        top_logprobs.append(math.log(rest))
    return TokenLogprobs(logprob, top_ids, top_logprobs)


class MockSampler:
    """Picks each next token from the mock vocabulary. The engine's own EOS rule: a token
    is EOS with probability about 1/``eos_every`` (0 disables it), unless ``ignore_eos``
    or before ``min_tokens``; stop token ids end the request, but before ``min_tokens``
    they are skipped over as if masked."""

    def __init__(self, eos_every: int) -> None:
        self.eos_every = eos_every
        self._vocab: list[int] = mock_tokenizer().sampleable_ids

    def sample(self, seq: MockSequence) -> FinishReason | None:
        """Append the next token (a function of the rolling hash of every token so
        far) and say whether the request is finished."""
        x = int.from_bytes(seq.rng.digest(), "little")
        may_stop = seq.num_output >= seq.min_tokens
        eos_every = self.eos_every
        reason: FinishReason | None = None
        if may_stop and not seq.ignore_eos and eos_every and (x >> 32) % eos_every == 0:
            token = EOS_ID
            reason = "stop"
        else:
            vocab = self._vocab
            index = x % len(vocab)
            token = vocab[index]
            if token in seq.stop_ids:
                if may_stop:
                    reason = "stop"
                else:
                    # Like a logits processor masking stop tokens before min_tokens.
                    while token in seq.stop_ids:
                        index = (index + 1) % len(vocab)
                        token = vocab[index]
        seq.tokens.append(token)
        seq.rng.update(_PACK_TOKEN(token))
        seq.out.append(token)
        if seq.logprobs_k is not None:
            seq.out_logprobs.append(mock_logprobs(x, token, seq.logprobs_k, self._vocab))
        seq.num_output += 1
        seq.num_generated += 1
        if reason is None and seq.num_generated >= seq.max_tokens:
            reason = "length"
        return reason
