"""The structured-output resume wrapper around vLLM's grammar creation, with a stand-in
grammar (the real one, xgrammar, is exercised in tests/integration/test_vllm_sampling.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("vllm")

from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402

from dynrt.worker import vllm_structured_resume  # noqa: E402
from dynrt.worker.vllm_sampling import PRIOR_OUTPUT_KEY  # noqa: E402


class Grammar:
    """Accepts tokens while they follow ``allowed`` in order."""

    def __init__(self, allowed: list[int]) -> None:
        self.allowed = allowed
        self.accepted: list[int] = []

    def validate_tokens(self, tokens: list[int]) -> list[int]:
        prefix = []
        for token, expected in zip(tokens, self.allowed[len(self.accepted):], strict=False):
            if token != expected:
                break
            prefix.append(token)
        return prefix

    def accept_tokens(self, request_id: str, tokens: list[int]) -> bool:
        if self.validate_tokens(tokens) != tokens:
            return False
        self.accepted += tokens
        return True


def request(request_id: str, prompt: list[int], extra_args: dict[str, Any] | None) -> SimpleNamespace:
    return SimpleNamespace(request_id=request_id, prompt_token_ids=prompt,
                           sampling_params=SimpleNamespace(extra_args=extra_args))


def create(manager: Any, req: SimpleNamespace) -> Grammar:
    return manager._create_grammar(req)


@pytest.fixture
def manager(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    monkeypatch.setattr(StructuredOutputManager, "_create_grammar", lambda self, req: Grammar([10, 11, 12, 13]))
    vllm_structured_resume.install()
    vllm_structured_resume.install()  # idempotent: wrapped once
    wrapped = StructuredOutputManager._create_grammar
    assert wrapped.dynrt_resume and not getattr(wrapped.__wrapped__, "dynrt_resume", False)
    return SimpleNamespace(_create_grammar=lambda req: wrapped(SimpleNamespace(reasoner_cls=None), req))


def test_grammar_resumes_from_the_prior_output(manager: SimpleNamespace) -> None:
    grammar = manager._create_grammar(request("a.0", [1, 2, 10, 11], {PRIOR_OUTPUT_KEY: 2}))
    assert grammar.accepted == [10, 11]


def test_requests_without_dynrts_key_are_untouched(manager: SimpleNamespace) -> None:
    assert manager._create_grammar(request("b.0", [1, 2, 3], None)).accepted == []
    assert manager._create_grammar(request("c.0", [1, 2, 3], {"other": 1})).accepted == []


def test_refused_prior_output_fails_with_the_reason(manager: SimpleNamespace) -> None:
    with pytest.raises(vllm_structured_resume.StructuredOutputResumeError,
                       match="cannot resume: the grammar refuses prior output token 99 at position 1 of 2"):
        manager._create_grammar(request("d.0", [1, 10, 99], {PRIOR_OUTPUT_KEY: 2}))


def test_a_reasoning_parser_in_the_engine_refuses_to_resume(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(StructuredOutputManager, "_create_grammar", lambda self, req: Grammar([10]))
    vllm_structured_resume.install()
    engine_manager = SimpleNamespace(reasoner_cls=object)
    with pytest.raises(vllm_structured_resume.StructuredOutputResumeError, match="reasoning parser"):
        StructuredOutputManager._create_grammar(engine_manager, request("e.0", [1, 10], {PRIOR_OUTPUT_KEY: 1}))
