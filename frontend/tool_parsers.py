"""Tool-call parsers: find the tool calls a model wrote in its output text.

Written by hand: no maintained library parses these formats outside vLLM (vLLM's
parsers import vLLM's request and tokenizer types, which the frontend image does not
carry). They follow vLLM 0.32's parsers of the same name
(``vllm/tool_parsers/{hermes,llama}_tool_parser.py``; ``mistral``: the pre-v11
``[TOOL_CALLS][...]`` path of ``vllm/parser/mistral.py``), and tests compare the two
on the same texts, streamed and not.

Each parser is pure and works on the whole text generated so far:

* :meth:`ToolCallParser.extract` — the finished text → ``(content, calls)``;
* :meth:`ToolCallParser.scan` — any prefix of it → the content that may be sent so far
  and the calls seen so far (name once complete, arguments as text so far). Every
  field only ever grows by appending as the prefix grows, so a stream is the diff of
  successive scans (:mod:`dynrt.frontend.chat_output`). Because the scan reads the
  whole text, how the text was cut into deltas — by tokens, by a migration that
  resumed the stream on another worker — does not change what the client gets.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass
from typing import Any, Protocol

from dynrt.frontend.tools import FunctionCall, new_tool_call_id

TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral")


@dataclass(slots=True)
class PartialCall:
    name: str | None
    arguments: str


class ToolCallParser(Protocol):
    def extract(self, text: str) -> tuple[str | None, list[FunctionCall]]: ...

    def scan(self, text: str, final: bool = False) -> tuple[str, list[PartialCall]]:
        """``final``: ``text`` is the whole output (held-back text may go out)."""
        ...

    def new_call_id(self) -> str:
        """An id for a call this parser found (the format the model family uses)."""
        ...


def partial_tag_overlap(text: str, tag: str) -> int:
    """Length of the longest proper prefix of ``tag`` that ends ``text``."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def _is_complete_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


class HermesParser:
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (Hermes 2 Pro, Qwen2.5/3)."""

    new_call_id = staticmethod(new_tool_call_id)

    start, end = "<tool_call>", "</tool_call>"
    _calls = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)
    _name = re.compile(r'"name"\s*:\s*"([^"]+)"')
    _arguments = re.compile(r'"arguments"\s*:\s*')

    def extract(self, text: str) -> tuple[str | None, list[FunctionCall]]:
        if self.start not in text:
            return text, []
        try:
            raw = [json.loads(a or b) for a, b in self._calls.findall(text)]
            calls = [FunctionCall(name=c["name"], arguments=_dumps(c["arguments"])) for c in raw]
        except (ValueError, KeyError, TypeError):
            return text, []  # vLLM: the output stays content
        content = text[: text.find(self.start)]
        return content or None, calls

    def scan(self, text: str, final: bool = False) -> tuple[str, list[PartialCall]]:
        first = text.find(self.start)
        if first < 0:
            return text if final else text[: len(text) - partial_tag_overlap(text, self.start)], []
        content_end = first
        calls: list[PartialCall] = []
        for body, complete in self._bodies(text):
            match = self._name.search(body)
            if match is None:
                break  # a later call cannot start before this one has its name
            calls.append(PartialCall(match.group(1), self._arguments_of(body, complete)))
        return text[:content_end], calls

    def _bodies(self, text: str) -> list[tuple[str, bool]]:
        bodies: list[tuple[str, bool]] = []
        pos = 0
        while (start := text.find(self.start, pos)) >= 0:
            body_start = start + len(self.start)
            end = text.find(self.end, body_start)
            if end >= 0:
                bodies.append((text[body_start:end].strip(), True))
                pos = end + len(self.end)
                continue
            raw = text[body_start:]
            overlap = partial_tag_overlap(raw, self.end)
            body = (raw[:-overlap] if overlap else raw).strip()
            bodies.append((body, _is_complete_json(body) if body else False))
            break
        return bodies

    def _arguments_of(self, body: str, complete: bool) -> str:
        match = self._arguments.search(body)
        if match is None:
            return ""
        raw = body[match.end():]
        if complete:  # drop the brace that closes the outer object
            raw = raw.rstrip()
            if raw.endswith("}"):
                raw = raw[:-1].rstrip()
        return raw


class Llama3JsonParser:
    """Llama 3.x JSON tool calls: ``{"name": ..., "parameters": {...}}``, optionally after
    ``<|python_tag|>``, several separated by ``; ``."""

    bot = "<|python_tag|>"
    _decoder = json.JSONDecoder()
    new_call_id = staticmethod(new_tool_call_id)
    _name = re.compile(r'"name"\s*:\s*"([^"]+)"')

    def extract(self, text: str) -> tuple[str | None, list[FunctionCall]]:
        if self.bot not in text and "{" not in text:
            return text, []
        calls: list[FunctionCall] = []
        end = -1
        for match in re.finditer(r"\{", text):
            if match.start() <= end:
                continue  # inside an object already parsed
            try:
                obj, length = self._decoder.raw_decode(text[match.start():])
                end = match.start() + length
                args = obj["arguments"] if "arguments" in obj else obj["parameters"]
                calls.append(FunctionCall(name=obj["name"], arguments=_dumps(args)))
            except (ValueError, KeyError, TypeError):
                return text, []  # vLLM: any malformed call leaves the whole output as content
        return (None, calls) if calls else (text, [])

    def scan(self, text: str, final: bool = False) -> tuple[str, list[PartialCall]]:
        # As vLLM's streaming parser: tool calls only when the output starts with them.
        if not (text.startswith(self.bot) or text.startswith("{")) and not (self.bot.startswith(text) and not final):
            return text, []
        pos = len(self.bot) if text.startswith(self.bot) else 0
        calls: list[PartialCall] = []
        while pos < len(text):
            rest = text[pos:]
            try:
                obj, length = self._decoder.raw_decode(rest)
            except ValueError:
                match = self._name.search(rest)
                if match is not None:
                    calls.append(PartialCall(match.group(1), ""))
                break
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                break
            args = obj.get("arguments", obj.get("parameters"))
            calls.append(PartialCall(obj["name"], "" if args is None else _dumps(args)))
            pos += length
            pos += len(text[pos:]) - len(text[pos:].lstrip("; \n"))
        if final and not calls:
            return text, []  # not a tool call after all: the output is content
        return "", calls


_ALPHANUMERIC = string.ascii_letters + string.digits
_NAME_KEY = re.compile(r'"name"\s*:\s*"([^"]+)"')
_ARGUMENTS_KEY = re.compile(r'"arguments"\s*:\s*')


class MistralParser:
    """Mistral's ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`` (tokenizers
    before v11, the Hugging Face format of Mistral 7B Instruct v0.3 and its kin). With
    ``forced`` (``tool_choice`` required / named) the output is the bare array the
    forced JSON schema allows (:mod:`dynrt.frontend.tool_grammar`), without the marker.

    As vLLM's: streamed arguments are the model's own text of the arguments object,
    non-streamed ones are re-serialized; after the array, streamed text is content."""

    bot = "[TOOL_CALLS]"
    _decoder = json.JSONDecoder()
    _array = re.compile(r"\[{.*}\]", re.DOTALL)

    def __init__(self, forced: bool = False) -> None:
        self.forced = forced

    @staticmethod
    def new_call_id() -> str:
        """Mistral's format: 9 alphanumeric characters."""
        return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(9))

    def extract(self, text: str) -> tuple[str | None, list[FunctionCall]]:
        content: str | None = None
        if self.bot in text:
            content, *segments = text.split(self.bot)
            body = next((segment.strip() for segment in segments if segment.strip()), "")
        elif self.forced:
            body = text.strip()
        else:
            return text, []
        try:
            parsed, _ = self._decoder.raw_decode(body)
        except ValueError:
            try:
                parsed = json.loads(self._array.findall(body)[0])
            except (IndexError, ValueError):
                parsed = None
        calls = _mistral_calls(parsed)
        if not calls:
            return body, []  # vLLM: the JSON after the marker becomes the content
        return (content if content and content.strip() else None), calls

    def scan(self, text: str, final: bool = False) -> tuple[str, list[PartialCall]]:
        marker = text.find(self.bot)
        if marker < 0 and not self.forced:
            return text if final else text[: len(text) - partial_tag_overlap(text, self.bot)], []
        content, pos = ("", 0) if marker < 0 else (text[:marker], marker + len(self.bot))
        body_start = pos + len(text[pos:]) - len(text[pos:].lstrip())
        calls: list[PartialCall] = []
        if text.startswith("{", body_start):  # a bare object: one call
            end = self._element(text, body_start, calls)
            return content + (text[end:] if end is not None else ""), calls
        if not text.startswith("[", body_start):
            return content, calls
        pos = body_start + 1
        while True:
            pos += len(text[pos:]) - len(text[pos:].lstrip(", \n\t\r"))
            if text.startswith("]", pos):
                return content + text[pos + 1:], calls
            if not text.startswith("{", pos):
                return content, calls
            end = self._element(text, pos, calls)
            if end is None:
                return content, calls
            pos = end

    def _element(self, text: str, start: int, calls: list[PartialCall]) -> int | None:
        """Adds the call starting at ``start``; its end, or ``None`` while incomplete."""
        try:
            _, end = self._decoder.raw_decode(text, start)
        except ValueError:
            end = None
        element = text[start:end]
        arguments = _ARGUMENTS_KEY.search(element)
        name = _NAME_KEY.search(element, 0, arguments.start() if arguments else len(element))
        if name is None:
            return end
        raw = ""
        if arguments is not None:
            args_start = start + arguments.end()
            try:
                value, args_end = self._decoder.raw_decode(text, args_start)
                raw = value if isinstance(value, str) else text[args_start:args_end]
            except ValueError:
                raw = "" if text.startswith('"', args_start) else text[args_start:]
        calls.append(PartialCall(name.group(1), raw))
        return end


def _mistral_calls(parsed: Any) -> list[FunctionCall]:
    """vLLM's ``_pre_v11_function_calls``: a bare object is one call; entries that are
    not call objects are skipped; string arguments stay as they are."""
    items = [parsed] if isinstance(parsed, dict) else parsed if isinstance(parsed, list) else []
    calls: list[FunctionCall] = []
    for item in items:
        if not isinstance(item, dict) or not ("name" in item or "arguments" in item):
            continue
        name, arguments = item.get("name"), item.get("arguments")
        if arguments is None:
            arguments = "{}"
        elif not isinstance(arguments, str):
            arguments = _dumps(arguments)
        calls.append(FunctionCall(name=name if isinstance(name, str) else "", arguments=arguments))
    return calls


def make_tool_call_parser(name: str, *, forced: bool = False) -> ToolCallParser:
    """``forced``: ``tool_choice`` is required or a named tool."""
    if name == "hermes":
        return HermesParser()
    if name == "llama3_json":
        return Llama3JsonParser()
    if name == "mistral":
        return MistralParser(forced)
    raise ValueError(f"unknown tool call parser {name!r}; known: {', '.join(TOOL_CALL_PARSERS)}")
