"""What a chat request's tools, structured output and templating fields mean on this
server: the template options, the engine's output constraint, and how the output is
read back (:class:`~dynrt.frontend.chat_output.ChatOutputRules`).

The server side is :class:`ChatSettings` (``--chat-template``,
``--enable-auto-tool-choice``, ``--tool-call-parser``, ``--reasoning-parser``, as
vLLM's flags). The checks and their messages are vLLM 0.32's
(``vllm/renderers/online_renderer.py``, ``tool_parsers/abstract_tool_parser.py``):

* vLLM loads its tool-call parser only with ``--enable-auto-tool-choice``; without
  it ``tool_choice`` ``auto`` is a 400 naming both flags and ``required`` / a named
  tool a 400 naming ``--tool-call-parser``. ``none`` renders the tools and leaves the
  output unparsed.
* a tool call is forced (``required``, a named tool; ``auto`` with a strict tool or
  ``parallel_tool_calls: false``) by a structural tag in the parser's format
  (:mod:`dynrt.frontend.tool_grammar`). vLLM then drops ``response_format`` /
  ``structured_outputs`` for a forced call (a warning in its log) and merges them into
  the tag for ``auto``; dynrt answers 400 to both combinations instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from dynrt.frontend import errors
from dynrt.frontend.chat_output import ChatOutputRules
from dynrt.frontend.chat_template import TemplateOptions, load_chat_template, template_options
from dynrt.frontend.reasoning import make_reasoning_parser
from dynrt.frontend.structured_output import (
    ResponseFormat,
    StructuredOutputsParams,
    json_schema_output,
    structured_output,
)
from dynrt.frontend.tool_grammar import mistral_tool_schema, tool_call_structural_tag
from dynrt.frontend.tool_parsers import make_tool_call_parser
from dynrt.frontend.tools import ChatTool, NamedToolChoice, ToolChoice, tool_mode, validate_tools
from dynrt.runtime.config import FrontendConfig
from dynrt.runtime.protocol import StructuredOutput


@dataclass(frozen=True, slots=True)
class ChatSettings:
    """The frontend's chat options (validated at startup)."""

    chat_template: str | None = None
    enable_auto_tool_choice: bool = False
    tool_call_parser: str = ""
    reasoning_parser: str = ""

    @classmethod
    def from_config(cls, config: FrontendConfig) -> ChatSettings:
        return cls.of(chat_template=config.chat_template, enable_auto_tool_choice=config.enable_auto_tool_choice,
                      tool_call_parser=config.tool_call_parser, reasoning_parser=config.reasoning_parser)

    @classmethod
    def of(cls, *, chat_template: str, enable_auto_tool_choice: bool, tool_call_parser: str,
           reasoning_parser: str) -> ChatSettings:
        """From the command line; ``ValueError`` names what is wrong."""
        if enable_auto_tool_choice and not tool_call_parser:
            raise ValueError("--enable-auto-tool-choice requires --tool-call-parser")
        if tool_call_parser:
            make_tool_call_parser(tool_call_parser)
        if reasoning_parser:
            make_reasoning_parser(reasoning_parser)
        return cls(chat_template=load_chat_template(chat_template), enable_auto_tool_choice=enable_auto_tool_choice,
                   tool_call_parser=tool_call_parser, reasoning_parser=reasoning_parser)


class ChatFields(Protocol):
    """The request fields this module reads (``ChatCompletionRequest``)."""

    tools: list[ChatTool] | None
    tool_choice: ToolChoice | None
    parallel_tool_calls: bool | None
    response_format: ResponseFormat | None
    structured_outputs: StructuredOutputsParams | None
    chat_template: str | None
    chat_template_kwargs: dict[str, Any] | None
    add_generation_prompt: bool
    continue_final_message: bool
    include_reasoning: bool


@dataclass(frozen=True, slots=True)
class ChatPlan:
    template: TemplateOptions
    structured: StructuredOutput | None
    output: ChatOutputRules


def plan_chat(req: ChatFields, settings: ChatSettings) -> ChatPlan:
    """Validate ``req``'s chat fields against ``settings``; raises a 400 OpenAIError."""
    if req.chat_template is not None:
        # vLLM: only with --trust-request-chat-template, which dynrt does not offer.
        raise errors.bad_request("Chat template is passed with request, but --trust-request-chat-template is not "
                                 "set. Refused request with untrusted chat template.", "chat_template")
    validate_tools(req.tools, req.tool_choice)
    mode = tool_mode(req.tools, req.tool_choice)
    parser_name = settings.tool_call_parser if settings.enable_auto_tool_choice else ""
    if mode == "auto" and not parser_name:
        raise errors.bad_request('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
                                 "to be set", "tool_choice")
    if mode in ("required", "named") and not parser_name:
        choice = req.tool_choice
        desc = f'function "{choice.function.name}"' if isinstance(choice, NamedToolChoice) else f'"{choice}"'
        raise errors.bad_request(f"tool_choice={desc} requires --tool-call-parser to be set", "tool_choice")

    structured = structured_output(req.response_format, req.structured_outputs,
                                   named_tool_choice=isinstance(req.tool_choice, NamedToolChoice))
    if mode != "none":
        assert req.tools is not None
        forced = _tool_constraint(parser_name, req.tools, req.tool_choice, req.parallel_tool_calls)
        if forced is not None:
            if structured is not None:
                raise errors.unsupported_param(
                    "response_format" if req.response_format is not None else "structured_outputs",
                    "together with a forced or strict tool call is not supported")
            structured = forced

    template = template_options(tools=req.tools, add_generation_prompt=req.add_generation_prompt,
                                continue_final_message=req.continue_final_message,
                                chat_template_kwargs=req.chat_template_kwargs, chat_template=settings.chat_template)
    output = ChatOutputRules(
        tool_mode=mode,
        tool_parser=None if mode == "none" else make_tool_call_parser(parser_name,
                                                                      forced=mode in ("required", "named")),
        reasoning_parser=make_reasoning_parser(settings.reasoning_parser) if settings.reasoning_parser else None,
        include_reasoning=req.include_reasoning,
    )
    return ChatPlan(template=template, structured=structured, output=output)


def _tool_constraint(parser: str, tools: list[ChatTool], tool_choice: ToolChoice | None,
                     parallel_tool_calls: bool | None) -> StructuredOutput | None:
    """The constraint vLLM's parser of this name puts on a tool call (tool_grammar.py)."""
    if parser == "mistral":
        schema = mistral_tool_schema(tools, tool_choice)
        return None if schema is None else json_schema_output(schema)
    tag = tool_call_structural_tag(parser, tools, tool_choice, parallel_tool_calls)
    return None if tag is None else StructuredOutput(structural_tag=tag)
