"""A chat completion's output text → the assistant message: reasoning, content, tool calls.

Used only when a request needs it (a reasoning parser is configured, or tools are in
play); otherwise the chat path sends the text as content untouched. Behaviour follows
vLLM 0.32's chat serving (``vllm/entrypoints/openai/chat_completion/serving.py`` and
``vllm/parser/abstract_parser.py``):

* ``tool_choice`` ``auto``, ``required`` or a named tool: the configured tool-call
  parser finds the calls (for ``required``/named the output was forced into the
  parser's format, :mod:`dynrt.frontend.tool_grammar`). Finish reason ``tool_calls``:
  ``auto`` when calls were found, ``required`` when generation stopped normally; a
  named tool keeps ``stop``.
* ``none`` / no tools: the text is content.

:func:`parse_message` reads a finished text (non-streaming); :class:`ChatDeltaAssembler`
turns text deltas into message deltas, by diffing successive scans of the whole text
(see :mod:`dynrt.frontend.tool_parsers`) — so the deltas do not depend on how the text
was split (tokens, or a migration that resumed on another worker).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dynrt.frontend.reasoning import ThinkParser
from dynrt.frontend.tool_parsers import PartialCall, ToolCallParser
from dynrt.frontend.tools import FunctionCall, ToolCall, ToolMode, new_tool_call_id


@dataclass(frozen=True, slots=True)
class ChatOutputRules:
    """How one request's output is read (built by :mod:`dynrt.frontend.chat_request`):
    any ``tool_mode`` but ``none`` comes with a ``tool_parser``."""

    tool_mode: ToolMode = "none"
    tool_parser: ToolCallParser | None = None
    reasoning_parser: ThinkParser | None = None
    include_reasoning: bool = True

    @property
    def needed(self) -> bool:
        """False: the output is plain content (the hot path)."""
        return self.tool_mode != "none" or self.reasoning_parser is not None


@dataclass(slots=True)
class ParsedMessage:
    content: str | None
    reasoning: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)


def parse_message(text: str, rules: ChatOutputRules) -> ParsedMessage:
    """The message for a finished output ``text``."""
    reasoning: str | None = None
    content: str | None = text
    if rules.reasoning_parser is not None:
        reasoning, content = rules.reasoning_parser.extract(text)
        if not rules.include_reasoning:
            reasoning = None
    calls: list[FunctionCall] = []
    if rules.tool_mode != "none" and rules.tool_parser is not None:
        parsed_content, calls = rules.tool_parser.extract(content or "")
        if calls:
            content = None if parsed_content is not None and not parsed_content.strip() else parsed_content
        elif rules.tool_mode != "auto" and (content is None or not content.strip()):
            content = None
        else:
            content = parsed_content  # the text, or what the parser keeps of it (mistral: the JSON)
        if rules.tool_mode != "auto":
            content = content or ""  # vLLM's message for a forced call: "" rather than null
    return ParsedMessage(content=content, reasoning=reasoning,
                         tool_calls=[ToolCall(id=_call_id(rules), function=call) for call in calls])


def _call_id(rules: ChatOutputRules) -> str:
    return rules.tool_parser.new_call_id() if rules.tool_parser is not None else new_tool_call_id()


def finish_reason_of(rules: ChatOutputRules, tools_called: bool, engine_reason: str, *, streamed: bool) -> str:
    """vLLM's rule. Non-streaming: ``tool_calls`` when ``auto`` found calls (whatever
    ended generation) or ``required`` stopped normally. Streaming: when calls were sent
    and generation stopped normally, unless the tool was named."""
    if streamed:
        called = tools_called and rules.tool_mode in ("auto", "required")
    else:
        called = (rules.tool_mode == "auto" and tools_called) or rules.tool_mode == "required"
    if not called:
        return engine_reason
    return "tool_calls" if engine_reason == "stop" or (rules.tool_mode == "auto" and not streamed) else engine_reason


@dataclass(slots=True)
class ToolCallDelta:
    """One ``delta.tool_calls`` entry: the first for a call has ``id`` and ``name``."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str | None = None


@dataclass(slots=True)
class MessageDelta:
    reasoning: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


class ChatDeltaAssembler:
    """Streaming: :meth:`feed` each text delta, then :meth:`finish`; each returns the
    message delta to send (falsy: nothing to send yet)."""

    def __init__(self, rules: ChatOutputRules) -> None:
        self.rules = rules
        self._text = ""
        self._sent_reasoning = 0
        self._sent_content = 0
        self._sent_names = 0
        self._sent_args: list[int] = []

    @property
    def tools_called(self) -> bool:
        return self._sent_names > 0

    def feed(self, text: str) -> MessageDelta:
        self._text += text
        return self._delta(final=False)

    def finish(self) -> MessageDelta:
        return self._delta(final=True)

    def _delta(self, *, final: bool) -> MessageDelta:
        rules = self.rules
        reasoning, rest = "", self._text
        if rules.reasoning_parser is not None:
            reasoning, rest = rules.reasoning_parser.scan(self._text, final)
            if not rules.include_reasoning:
                reasoning = ""
        content, calls = self._scan_tools(rest, final)
        delta = MessageDelta()
        if len(reasoning) > self._sent_reasoning:
            delta.reasoning = reasoning[self._sent_reasoning:]
            self._sent_reasoning = len(reasoning)
        if len(content) > self._sent_content:
            delta.content = content[self._sent_content:]
            self._sent_content = len(content)
        for index, call in enumerate(calls):
            if index >= self._sent_names:
                if call.name is None:
                    break
                delta.tool_calls.append(ToolCallDelta(index=index, id=_call_id(rules), name=call.name))
                self._sent_names += 1
                self._sent_args.append(0)
            if len(call.arguments) > self._sent_args[index]:
                delta.tool_calls.append(ToolCallDelta(index=index, arguments=call.arguments[self._sent_args[index]:]))
                self._sent_args[index] = len(call.arguments)
        return delta

    def _scan_tools(self, text: str, final: bool) -> tuple[str, list[PartialCall]]:
        rules = self.rules
        if rules.tool_mode != "none" and rules.tool_parser is not None:
            return rules.tool_parser.scan(text, final)
        return text, []
