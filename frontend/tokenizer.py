"""The frontend's view of a model's tokenizer, and loading one from a TokenizerSpec.

``kind="mock"`` wraps the mock model's built-in tokenizer. ``kind="hf"`` is a Hugging
Face tokenizer (``transformers``; no torch) with the model's own chat template:

* ``path`` alone: ``AutoTokenizer.from_pretrained(path)`` (a local folder, or a hub id
  already in the local cache).
* ``path`` + ``gguf_file``: the tokenizer stored in a GGUF file. ``transformers`` can
  load one (``AutoTokenizer.from_pretrained(path, gguf_file=...)``), but its GGUF
  reader imports torch, a dependency a frontend should not carry just to read a
  vocabulary. So the GGUF metadata is read with the ``gguf`` package (numpy only) and
  handed to the converter ``transformers`` itself uses for GGUF files; the result is the
  same fast tokenizer, chat template included.

Loading takes seconds: :func:`load_tokenizer_async` runs it in a thread. Tokenizers are
cached per spec for the life of the process.
"""

from __future__ import annotations

import asyncio
import functools
import json
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from dynrt.frontend import errors
from dynrt.frontend.chat_template import TemplateOptions
from dynrt.frontend.detokenizer import (
    ByteDetokenizer,
    DecodeStreamDetokenizer,
    IncrementalDetokenizer,
    WindowDetokenizer,
)
from dynrt.runtime.mock_tokenizer import END_OF_TURN_ID, MockTokenizer, mock_tokenizer
from dynrt.runtime.protocol import TokenizerSpec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# How many prompt ids prime a detokenizer's window (as vLLM does).
DETOKENIZER_CONTEXT = 5
_DEFAULT_OPTIONS = TemplateOptions()


class Tokenizer(Protocol):
    @property
    def eos_token_id(self) -> int | None: ...

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end generation: EOS and the chat template's end-of-turn token."""
        ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def convert_ids_to_tokens(self, token_ids: Sequence[int]) -> list[str]:
        """Each id's vocabulary entry (``/tokenize``'s ``token_strs``)."""
        ...

    @property
    def vocab_size(self) -> int:
        """Ids ``0 .. vocab_size - 1`` are tokens (added tokens included)."""
        ...

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            options: TemplateOptions = _DEFAULT_OPTIONS) -> list[int]:
        """The conversation rendered (by default with the generation prompt), as token
        ids. Raises a 400 :class:`~dynrt.frontend.errors.OpenAIError` if the template
        rejects it."""
        ...

    def new_detokenizer(self, context: Sequence[int] = (), skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        """A detokenizer for one output stream; ``context`` is the prompt's ids."""
        ...

    def token_text(self, token_id: int) -> str:
        """One token's text alone, special tokens included (logprobs' ``token``)."""
        ...


class MockModelTokenizer:
    """The mock model's tokenizer behind the :class:`Tokenizer` protocol."""

    def __init__(self, tokenizer: MockTokenizer) -> None:
        self._tok = tokenizer
        self.eos_token_id: int | None = tokenizer.eos_token_id
        self.stop_token_ids: list[int] = [tokenizer.eos_token_id, END_OF_TURN_ID]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text)  # the mock tokenizer adds no special tokens to text

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            return self._tok.decode(token_ids)
        return b"".join(self._tok.piece(t) for t in token_ids).decode("utf-8", errors="replace")

    def convert_ids_to_tokens(self, token_ids: Sequence[int]) -> list[str]:
        return [self._tok.piece(t).decode("utf-8", errors="backslashreplace") for t in token_ids]

    @property
    def vocab_size(self) -> int:
        return self._tok.vocab_size

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            options: TemplateOptions = _DEFAULT_OPTIONS) -> list[int]:
        """The mock's own format; with a ``--chat-template`` the template's text in
        mock tokens (so templated tools can be tested without a real model)."""
        if options.chat_template is not None:
            return self._tok.encode(_render(options.chat_template, messages, options))
        ids = self._tok.apply_chat_template([dict(m) for m in messages],
                                            add_generation_prompt=options.add_generation_prompt)
        if options.continue_final_message and ids and ids[-1] == END_OF_TURN_ID:
            ids.pop()
        return ids

    def new_detokenizer(self, context: Sequence[int] = (), skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        token_bytes = self._tok.token_bytes if skip_special_tokens else self._tok.piece
        return ByteDetokenizer(token_bytes)  # byte tokens need no context

    def token_text(self, token_id: int) -> str:
        return self._tok.piece(token_id).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``transformers`` tokenizer behind the :class:`Tokenizer` protocol."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tok = tokenizer
        self.eos_token_id: int | None = tokenizer.eos_token_id
        stops = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        end_of_turn = self._end_of_turn_id()
        if end_of_turn is not None and end_of_turn not in stops:
            stops.append(end_of_turn)
        self.stop_token_ids: list[int] = stops

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text → ids with the tokenizer's special tokens (BOS if it adds one), as vLLM's
        completions endpoint does."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, token_ids: Sequence[int]) -> list[str]:
        return list(self._tok.convert_ids_to_tokens(list(token_ids)))

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            options: TemplateOptions = _DEFAULT_OPTIONS) -> list[int]:
        from jinja2 import TemplateError

        if self._tok.chat_template is None and options.chat_template is None:
            raise errors.bad_request("This model has no chat template; use /v1/completions", "messages")
        try:
            ids = self._tok.apply_chat_template(
                [dict(m) for m in messages], tools=options.tools, chat_template=options.chat_template,
                add_generation_prompt=options.add_generation_prompt,
                continue_final_message=options.continue_final_message, tokenize=True, return_dict=False,
                **options.template_kwargs)
        except TemplateError as e:
            raise errors.bad_request(f"The model's chat template rejected the messages: {e}", "messages") from None
        except ValueError as e:  # e.g. continue_final_message without a final message to continue
            raise errors.bad_request(f"The chat template could not render the messages: {e}", "messages") from None
        return list(ids)

    def new_detokenizer(self, context: Sequence[int] = (), skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        decode = functools.partial(self.decode, skip_special_tokens=skip_special_tokens)
        context = context[-DETOKENIZER_CONTEXT:]
        backend = self._decoding_backend
        if backend is not None:
            return DecodeStreamDetokenizer.for_backend(backend, decode, context, skip_special_tokens)
        return WindowDetokenizer(decode, context)

    @functools.cached_property
    def _decoding_backend(self) -> Any:
        """The ``tokenizers.Tokenizer`` whose ``decode`` is exactly this tokenizer's (so
        ``DecodeStream`` on it gives the same text), or None: a tokenizer class with its
        own ``_decode``, one that cleans up tokenization spaces after decoding, or a
        ``tokenizers`` older than 0.22 (no ``DecodeStream`` prefilled with the context)."""
        from tokenizers import Tokenizer as BackendTokenizer
        from tokenizers.decoders import DecodeStream
        from transformers.tokenization_utils_tokenizers import TokenizersBackend

        backend = getattr(self._tok, "backend_tokenizer", None)
        own_decode = getattr(type(self._tok), "_decode", None) is not TokenizersBackend._decode
        if not isinstance(backend, BackendTokenizer) or own_decode or self._tok.clean_up_tokenization_spaces:
            return None
        try:
            DecodeStream(ids=[], skip_special_tokens=True)
        except TypeError:
            return None
        return backend

    def token_text(self, token_id: int) -> str:
        """vLLM's ``convert_ids_list_to_tokens``: the decode, with the leading spaces a
        SentencePiece (Metaspace) decode strips put back from the vocabulary piece."""
        text = self._tok.decode([token_id], skip_special_tokens=False) or ""
        marker = self._space_marker
        if marker is None:
            return text
        piece = self._tok.convert_ids_to_tokens(token_id) or ""
        markers = len(piece) - len(piece.lstrip(marker))
        missing = markers - (len(text) - len(text.lstrip(" ")))
        return " " * missing + text if missing > 0 else text

    @functools.cached_property
    def _space_marker(self) -> str | None:
        """The Metaspace replacement character of the tokenizer's pre-tokenizer, if any."""
        backend = getattr(self._tok, "backend_tokenizer", None)
        if backend is None:
            return None
        pre = json.loads(backend.to_str()).get("pre_tokenizer") or {}
        for step in [pre, *pre.get("pretokenizers", [])]:
            if step.get("type") == "Metaspace":
                return step.get("replacement", "\u2581")
        return None

    def _end_of_turn_id(self) -> int | None:
        """The special token the template puts right after an assistant message
        (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ...), if any."""
        from jinja2 import TemplateError

        if self._tok.chat_template is None:
            return None
        marker = "dynrt-end-of-turn-probe"
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
        try:
            rendered = self._tok.apply_chat_template(probe, tokenize=False)
        except TemplateError:
            return None
        if not isinstance(rendered, str) or marker not in rendered:
            return None
        after = rendered.split(marker, 1)[1]
        ids = self._tok.encode(after, add_special_tokens=False)
        if ids and ids[0] in self._tok.all_special_ids:
            return ids[0]
        return None


def _render(template: str, messages: Sequence[Mapping[str, Any]], options: TemplateOptions) -> str:
    """``template`` rendered by the Jinja setup Transformers uses for chat templates."""
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, _ = render_jinja_template(
            [[dict(m) for m in messages]], tools=options.tools, chat_template=template,
            add_generation_prompt=options.add_generation_prompt,
            continue_final_message=options.continue_final_message, **options.template_kwargs)
    except TemplateError as e:
        raise errors.bad_request(f"The chat template rejected the messages: {e}", "messages") from None
    except ValueError as e:
        raise errors.bad_request(f"The chat template could not render the messages: {e}", "messages") from None
    return rendered[0]


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------

_cache: dict[TokenizerSpec, Tokenizer] = {}
_locks: dict[TokenizerSpec, threading.Lock] = {}
_locks_guard = threading.Lock()


def load_tokenizer(spec: TokenizerSpec) -> Tokenizer:
    """The tokenizer for ``spec``, loaded once per process (blocking; seconds for hf)."""
    tokenizer = _cache.get(spec)
    if tokenizer is not None:
        return tokenizer
    with _locks_guard:
        lock = _locks.setdefault(spec, threading.Lock())
    with lock:
        tokenizer = _cache.get(spec)
        if tokenizer is None:
            tokenizer = MockModelTokenizer(mock_tokenizer()) if spec.kind == "mock" else HFTokenizer(_load_hf(spec))
            _cache[spec] = tokenizer
    return tokenizer


async def load_tokenizer_async(spec: TokenizerSpec) -> Tokenizer:
    """:func:`load_tokenizer` in a worker thread, so the event loop keeps serving."""
    tokenizer = _cache.get(spec)
    if tokenizer is not None:
        return tokenizer
    return await asyncio.to_thread(load_tokenizer, spec)


def _load_hf(spec: TokenizerSpec) -> PreTrainedTokenizerBase:
    if spec.gguf_file:
        return _load_gguf(spec.path, spec.gguf_file)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec.path)


# GGUF ``tokenizer.ggml.<key>_id`` entries naming the special tokens.
_GGUF_SPECIAL_TOKENS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def _load_gguf(path: str, gguf_file: str) -> PreTrainedTokenizerBase:
    """The tokenizer in ``path``/``gguf_file`` (``path``: a folder or a cached hub id)."""
    from gguf import GGUFReader
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    from transformers.utils import cached_file

    resolved = cached_file(path, gguf_file)
    if resolved is None:
        raise FileNotFoundError(f"{gguf_file} not found in {path}")
    fields = GGUFReader(resolved).fields
    metadata = {
        key: field.contents()
        for key, field in fields.items()
        if key.startswith("tokenizer.") or key == "general.architecture"
    }
    # Group the keys as transformers' own GGUF loader does: backend vocabulary vs. config.
    grouped = {
        group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in metadata}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    vocabulary, config = grouped["tokenizer"], grouped["tokenizer_config"]
    for name, key in _GGUF_SPECIAL_TOKENS.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        if token_id is not None:
            config[name] = vocabulary["tokens"][token_id]
    backend, extra = convert_gguf_tokenizer(metadata["general.architecture"], vocabulary)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)
