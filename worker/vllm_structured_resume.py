"""Structured output that resumes after a migration: vLLM's grammar is advanced over the
request's prior output before its first new token.

vLLM compiles a fresh grammar matcher per request
(``StructuredOutputManager._create_grammar`` in ``vllm/v1/structured_output``) and
advances it over the request's *output* only. A migrated request's prior output reaches
vLLM as the last ``k`` prompt ids (``extra_args[PRIOR_OUTPUT_KEY] = k``, set by
``dynrt.worker.vllm_sampling``), so the matcher would start from the grammar's start
and the continuation would be constrained as if nothing had been generated: invalid
output. :func:`install` wraps ``_create_grammar`` so that, for such a request, the
compiled matcher accepts those ``k`` ids first (the xgrammar matcher, like every vLLM
backend, advances over given tokens: ``accept_tokens``). If the grammar refuses them, or
the engine runs a reasoning parser (its output would mix reasoning and constrained
tokens), the grammar fails with :class:`StructuredOutputResumeError`; vLLM then finishes
the request with finish reason ``error`` (as for any grammar that fails to compile), and
the worker answers ``bad_request`` "structured output cannot resume: ..." — never
unconstrained output. vLLM returns no message with that finish reason, and its engine
core runs in another process (``AsyncLLM`` always starts one), so the worker finds the
reason itself: :class:`ResumeDiagnosis` replays the prior output into the same grammar
in the worker's process (only on that failure path).

Where it is applied: as a vLLM general plugin (entry point ``vllm.general_plugins`` in
``pyproject.toml``), which vLLM loads in every process it starts, the engine core's
included (``AsyncLLM`` runs its engine core in a child process, on CPU hosts too); and
in the worker's own process at engine start, for an engine core run in-process.
:func:`install` is idempotent, and the wrapper is inert for requests without dynrt's
key (vLLM's own server on the same host included). ``VLLM_PLUGINS``, if set, must name
``dynrt_structured_resume``.
"""

from __future__ import annotations

import threading
from typing import Any

from dynrt.worker.vllm_sampling import prior_output_count

_lock = threading.Lock()


class StructuredOutputResumeError(ValueError):
    """The request's prior output cannot be replayed into its grammar."""


def resume_grammar(grammar: Any, request_id: str, prior: list[int]) -> None:
    """Advance ``grammar`` (a vLLM ``StructuredOutputGrammar``) over ``prior``; raise
    :class:`StructuredOutputResumeError` naming the first refused token if it refuses."""
    accepted = grammar.validate_tokens(prior)  # does not advance the matcher
    if len(accepted) < len(prior):
        position = len(accepted)
        raise StructuredOutputResumeError(
            f"structured output cannot resume: the grammar refuses prior output token {prior[position]} "
            f"at position {position} of {len(prior)}")
    if not grammar.accept_tokens(request_id, prior):
        raise StructuredOutputResumeError(
            f"structured output cannot resume: the grammar did not accept the {len(prior)} prior output tokens")


def _wrap(original: Any) -> Any:
    def _create_grammar(self: Any, request: Any) -> Any:
        params = request.sampling_params
        k = prior_output_count(params.extra_args if params is not None else None)
        if not k:
            return original(self, request)
        try:
            if getattr(self, "reasoner_cls", None) is not None:
                raise StructuredOutputResumeError(
                    "structured output cannot resume: the engine runs a reasoning parser, so the prior "
                    "output's reasoning and constrained parts cannot be told apart")
            prompt = request.prompt_token_ids or []
            if k > len(prompt):
                raise StructuredOutputResumeError(
                    f"structured output cannot resume: {k} prior output tokens but a prompt of {len(prompt)}")
            grammar = original(self, request)
            resume_grammar(grammar, request.request_id, list(prompt[-k:]))
            return grammar
        except StructuredOutputResumeError:
            # vLLM logs it ("Failed to compile grammar") and finishes the request with
            # finish reason "error"; the worker explains it (ResumeDiagnosis).
            raise

    _create_grammar.dynrt_resume = True  # type: ignore[attr-defined]
    _create_grammar.__wrapped__ = original  # type: ignore[attr-defined]
    return _create_grammar


def install() -> None:
    """Wrap vLLM's ``StructuredOutputManager._create_grammar`` (once per process). Also
    the ``vllm.general_plugins`` entry point."""
    from vllm.v1.structured_output import StructuredOutputManager

    with _lock:
        current = StructuredOutputManager._create_grammar
        if getattr(current, "dynrt_resume", False):
            return
        StructuredOutputManager._create_grammar = _wrap(current)  # type: ignore[method-assign]


class ResumeDiagnosis:
    """Why a migrated structured-output request's grammar failed in the engine core,
    found again in the worker's process: the same checks as the wrapper, on a grammar
    compiled by vLLM's xgrammar backend (its default) from vLLM's own tokenizer. The
    backend (the tokenizer's vocabulary as xgrammar sees it) is built on first use."""

    def __init__(self, llm: Any) -> None:
        self._llm = llm
        self._backend: Any = None

    def explain(self, structured: Any, prior: list[int]) -> str | None:
        """The reason (``structured``: the request's ``StructuredOutputsParams``), or
        None if these checks pass here."""
        vllm_config = self._llm.vllm_config
        if vllm_config.structured_outputs_config.reasoning_parser:
            return ("structured output cannot resume: the engine runs a reasoning parser, so the prior "
                    "output's reasoning and constrained parts cannot be told apart")
        from vllm.v1.structured_output.backend_xgrammar import XgrammarBackend
        from vllm.v1.structured_output.request import get_structured_output_key

        if self._backend is None:
            self._backend = XgrammarBackend(vllm_config, tokenizer=self._llm.tokenizer,
                                            vocab_size=vllm_config.model_config.get_vocab_size())
        try:
            grammar = self._backend.compile_grammar(*get_structured_output_key(structured))
        except Exception as exc:
            return f"structured output failed: the grammar does not compile: {exc}"
        try:
            resume_grammar(grammar, "dynrt-diagnosis", prior)
        except StructuredOutputResumeError as exc:
            return str(exc)
        return None
