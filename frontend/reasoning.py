"""Reasoning parsers: split a thinking model's output into its reasoning and its answer.

Written by hand (vLLM's parsers need vLLM); tests compare them with vLLM 0.32's
``vllm/reasoning/deepseek_r1_reasoning_parser.py`` on the same texts. As the tool-call
parsers (:mod:`dynrt.frontend.tool_parsers`), :meth:`ThinkParser.scan` reads the whole
text generated so far and its fields only grow, so streams are diffs of scans and a
migrated stream parses as an uninterrupted one.
"""

from __future__ import annotations

from dynrt.frontend.tool_parsers import partial_tag_overlap

REASONING_PARSERS = ("deepseek_r1",)


class ThinkParser:
    """``<think>reasoning</think>answer``. The opening tag is optional (DeepSeek R1's
    template puts it in the prompt): everything before ``</think>`` is reasoning, and
    output that never closes it is all reasoning (as vLLM's ``deepseek_r1``)."""

    start, end = "<think>", "</think>"

    def extract(self, text: str) -> tuple[str | None, str | None]:
        """``(reasoning, content)`` of the finished output, as vLLM's ``extract_reasoning``."""
        before, tag, after = text.partition(self.start)
        text = after if tag else before
        if self.end not in text:
            return text, None
        reasoning, _, content = text.partition(self.end)
        return reasoning, content or None

    def scan(self, text: str, final: bool = False) -> tuple[str, str]:
        """``(reasoning so far, content so far)`` of a prefix of the output."""
        if text.startswith(self.start):
            text = text[len(self.start):]
        elif not final and self.start.startswith(text):
            return "", ""  # may still become the opening tag
        reasoning, tag, content = text.partition(self.end)
        if tag:
            return reasoning, content
        if final:
            return text, ""
        return text[: len(text) - partial_tag_overlap(text, self.end)], ""


def make_reasoning_parser(name: str) -> ThinkParser:
    if name == "deepseek_r1":
        return ThinkParser()
    raise ValueError(f"unknown reasoning parser {name!r}; known: {', '.join(REASONING_PARSERS)}")
