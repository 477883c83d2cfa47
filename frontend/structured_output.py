"""Structured output requests: ``response_format`` (OpenAI) and ``structured_outputs``
(vLLM's extension), mapped to the engine's :class:`~dynrt.runtime.protocol.StructuredOutput`.

The rules are vLLM 0.32's (``structured_outputs_from_response_format`` and the request
validators in ``vllm/entrypoints/openai/chat_completion/protocol.py``):

* ``response_format`` ``json_object`` / ``json_schema`` override the same-named
  constraint of ``structured_outputs``; ``text`` changes nothing.
* after that exactly one constraint (json, regex, choice, grammar, json_object) may be
  set, else 400.
* a constraint together with a named ``tool_choice`` is a 400.

The older ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar`` /
``guided_whitespace_pattern`` / ``guided_decoding_backend`` fields were removed from
vLLM; vLLM 0.32 ignores them (unconstrained output, a warning in its log). dynrt answers
400 naming the ``structured_outputs`` field to use instead: never a silent drop.

``structural_tag`` is refused: vLLM validates it with xgrammar before the request
reaches the engine, and the frontend does not carry xgrammar.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from dynrt.frontend import errors
from dynrt.runtime.protocol import StructuredOutput


class JsonSchemaFormat(msgspec.Struct, kw_only=True):
    name: str
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class ResponseFormat(msgspec.Struct, kw_only=True):
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """vLLM's ``structured_outputs`` request field (``StructuredOutputsParams``)."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: Any = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None


_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")

# Removed from vLLM; the structured_outputs field that replaces each.
REMOVED_GUIDED_FIELDS = {
    "guided_json": "structured_outputs.json",
    "guided_regex": "structured_outputs.regex",
    "guided_choice": "structured_outputs.choice",
    "guided_grammar": "structured_outputs.grammar",
    "guided_whitespace_pattern": "structured_outputs.whitespace_pattern",
    "guided_decoding_backend": "(nothing: the backend is the engine's choice)",
}


def refuse_guided_fields(req: object) -> None:
    """400 for any of :data:`REMOVED_GUIDED_FIELDS` the request sets."""
    for name, replacement in REMOVED_GUIDED_FIELDS.items():
        if getattr(req, name) is not None:
            raise errors.bad_request(
                f"'{name}' was removed from vLLM's API (vLLM now ignores it and does not constrain the output); "
                f"use {replacement} instead", name)


def structured_output(response_format: ResponseFormat | None, params: StructuredOutputsParams | None,
                      *, named_tool_choice: bool = False) -> StructuredOutput | None:
    """The engine's constraint for a request, or ``None``; raises a 400
    :class:`~dynrt.frontend.errors.OpenAIError` where vLLM answers 400."""
    if params is not None and named_tool_choice and _count(params, ("json", "regex", "choice")):
        raise errors.bad_request("You can only either use constraints for structured outputs or tools, not both.",
                                 "structured_outputs")
    if response_format is not None and response_format.type == "json_schema" and response_format.json_schema is None:
        raise errors.bad_request("When response_format type is 'json_schema', the 'json_schema' field must be "
                                 "provided.", "response_format")
    if response_format is not None and response_format.type == "structural_tag":
        raise errors.unsupported_param("response_format", "of type 'structural_tag' is not supported")
    if response_format is None or response_format.type == "text":
        if params is None:
            return None
        merged = params
        param = "structured_outputs"
    else:
        merged = params if params is not None else StructuredOutputsParams()
        if response_format.type == "json_object":
            merged = msgspec.structs.replace(merged, json_object=True)
        else:
            assert response_format.json_schema is not None
            merged = msgspec.structs.replace(merged, json=response_format.json_schema.schema)
        param = "response_format"
    return _to_wire(merged, param)


def json_schema_output(schema: dict[str, Any]) -> StructuredOutput:
    """A JSON-schema constraint (the forced tool call of ``tool_choice``)."""
    return StructuredOutput(json=msgspec.json.encode(schema).decode())


def _count(params: StructuredOutputsParams, names: tuple[str, ...]) -> int:
    return sum(getattr(params, name) is not None for name in names)


def _to_wire(params: StructuredOutputsParams, param: str) -> StructuredOutput:
    count = _count(params, _CONSTRAINTS)
    if count > 1:
        raise errors.bad_request("You can only use one kind of structured outputs constraint but multiple are "
                                 f"specified: {', '.join(n for n in _CONSTRAINTS if getattr(params, n) is not None)}",
                                 param)
    if count < 1:
        raise errors.bad_request("You must use one kind of structured outputs constraint but none are specified",
                                 param)
    if params.structural_tag is not None:
        raise errors.unsupported_param("structured_outputs.structural_tag")
    if params.json_object is False:
        # vLLM counts an explicit false as the constraint; the wire has no way to say it.
        raise errors.bad_request("'structured_outputs.json_object' must be true when given",
                                 "structured_outputs.json_object")
    schema = params.json
    return StructuredOutput(
        json=msgspec.json.encode(schema).decode() if isinstance(schema, dict) else schema,
        regex=params.regex,
        choice=params.choice,
        grammar=params.grammar,
        json_object=bool(params.json_object),
        disable_any_whitespace=params.disable_any_whitespace,
        disable_additional_properties=params.disable_additional_properties,
        whitespace_pattern=params.whitespace_pattern,
    )
