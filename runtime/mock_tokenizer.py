"""The mock model's tokenizer: a fixed vocabulary of real English words with a byte
fallback, so any UTF-8 text encodes and ``decode(encode(text)) == text``.

The frontend uses it to tokenize prompts and detokenize output for ``--engine mock``
workers; the mock engine only ever samples word tokens, so its output reads as words.
It lives in ``runtime`` because both sides need the same vocabulary and the frontend
never imports the worker.

Layout of ids: 0 <pad>, 1 <bos>, 2 <eos>, 3..7 chat-role markers, 8..263 one token per
byte (fallback), then the word pieces: each word alone and with a leading space, then
punctuation and white space.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from dynrt.runtime.protocol import TokenizerSpec

_WORDS = """
the of and to in is that it was for on are as with his they at be this from have or
by one had not but what all were when we there can an your which their said if do
will each about how up out them then she many some so these would other into has
more her two like him see time could no make than first been its who now people my
made over did down only way find use may water long little very after words called
just where most know get through back much go good new write our me man too any day
same right look think also around another came come work three word must because does
part even place well such here take why things help put years different away again off
went old number great tell men say small every found still between name should home big
give air line set own under read last never us left end along while might next sound
below saw something thought both few those always looked show large often together asked
house world going want school important until form food keep children feet land side
without boy once animals life enough took sometimes four head above kind began almost
live page got earth need far hand high year mother light parts country father let night
following picture being study second eyes soon times story boys since white days ever
paper hard near sentence better best across during today others however sure means knew
try told young miles sun ways thing whole hear example heard several change answer room
sea against top turned learn point city play toward five using himself usually money
seen car morning body upon family later turn move face door cut done group true half red
fish plants living black eat short united run book gave order open ground cold really
table remember tree course front american space inside ago making mary feel fire ready
green quickly horse beautiful river become model token stream worker cache block router
fast slow server client request answer quiet bright gentle brave simple clear early
""".split()

_PUNCT = [".", ",", "!", "?", ";", ":", "'", '"', "-", "(", ")", "\n", " ", "  ", "\n\n"]

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
SYSTEM_ID, USER_ID, ASSISTANT_ID, TOOL_ID, END_OF_TURN_ID = 3, 4, 5, 6, 7
_SPECIAL = ["<pad>", "<bos>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>"]
BYTE_BASE = len(_SPECIAL)  # 8
WORD_BASE = BYTE_BASE + 256  # 264

_ROLE_IDS = {"system": SYSTEM_ID, "user": USER_ID, "assistant": ASSISTANT_ID, "tool": TOOL_ID, "developer": SYSTEM_ID}

# A word, optionally preceded by one space; a run of punctuation; a run of white space.
_PRETOKEN = re.compile(r" ?[A-Za-z]+| ?[^\sA-Za-z]|\s+")


class MockTokenizer:
    """Deterministic tokenizer for the mock model (no files, no downloads)."""

    name = "dynrt-mock"

    def __init__(self) -> None:
        pieces: list[str] = []
        for word in dict.fromkeys(_WORDS):
            pieces.append(word)
            pieces.append(" " + word)
        pieces.extend(dict.fromkeys(_PUNCT))
        self._pieces: list[bytes] = (
            [s.encode() for s in _SPECIAL]
            + [bytes([b]) for b in range(256)]
            + [p.encode() for p in pieces]
        )
        self._piece_to_id: dict[str, int] = {p: WORD_BASE + i for i, p in enumerate(pieces)}
        self.vocab_size: int = len(self._pieces)
        self.eos_token_id: int = EOS_ID
        self.bos_token_id: int = BOS_ID
        # The ids the mock engine samples from: whole words with a leading space,
        # plus a few punctuation marks, so generated text reads as prose.
        self.sampleable_ids: list[int] = [
            self._piece_to_id[p] for p in pieces if p.startswith(" ") and len(p) > 1
        ] + [self._piece_to_id[p] for p in (".", ",")]

    # -- encoding ---------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for match in _PRETOKEN.finditer(text):
            piece = match.group(0)
            token = self._piece_to_id.get(piece)
            if token is not None:
                ids.append(token)
                continue
            if piece.startswith(" ") and len(piece) > 1:
                space = self._piece_to_id[" "]
                rest = self._piece_to_id.get(piece[1:])
                if rest is not None:
                    ids.extend((space, rest))
                    continue
            ids.extend(BYTE_BASE + b for b in piece.encode("utf-8"))
        return ids

    # -- decoding ---------------------------------------------------------
    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (specials decode to nothing)."""
        if token_id < BYTE_BASE or token_id >= self.vocab_size:
            return b""
        return self._pieces[token_id]

    def piece(self, token_id: int) -> bytes:
        """A token's vocabulary entry, special tokens included (``<bos>``); empty for an
        id outside the vocabulary."""
        return self._pieces[token_id] if 0 <= token_id < self.vocab_size else b""

    def decode_bytes(self, token_ids: Iterable[int]) -> bytes:
        return b"".join(self.token_bytes(t) for t in token_ids)

    def decode(self, token_ids: Iterable[int]) -> str:
        return self.decode_bytes(token_ids).decode("utf-8", errors="replace")

    # -- chat -------------------------------------------------------------
    def apply_chat_template(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        """``<bos> (<|role|> content <|end|>)* <|assistant|>`` as token ids."""
        ids = [BOS_ID]
        for message in messages:
            ids.append(_ROLE_IDS.get(message.get("role", "user"), USER_ID))
            ids.extend(self.encode(message.get("content") or ""))
            ids.append(END_OF_TURN_ID)
        if add_generation_prompt:
            ids.append(ASSISTANT_ID)
        return ids

    def spec(self) -> TokenizerSpec:
        return TokenizerSpec(kind="mock")


_shared: MockTokenizer | None = None


def mock_tokenizer() -> MockTokenizer:
    """The process-wide instance (the vocabulary is built once)."""
    global _shared
    if _shared is None:
        _shared = MockTokenizer()
    return _shared
