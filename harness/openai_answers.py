"""OpenAI answers in one comparable shape, whether they came as one JSON body or as a
stream of chunks, so two servers' answers to the same request can be compared field by
field (ids, timestamps and fingerprints aside).

The shape: ``{"choices": [per-choice dict sorted by index], "usage": {...}}``. A chat
choice has ``content``, ``reasoning_content``, ``tool_calls`` ([{name, arguments}]),
``finish_reason`` and ``logprobs`` (the ``content`` list, or None); a completion choice
has ``text``, ``finish_reason`` and ``logprobs`` (the four parallel lists, or None).
"""

from __future__ import annotations

import math
from typing import Any

Answer = dict[str, Any]

_USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")


def _usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if usage is None else {k: usage.get(k) for k in _USAGE_FIELDS}


def _tool_calls(calls: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    return [{"name": c["function"]["name"], "arguments": c["function"]["arguments"], "type": c.get("type")}
            for c in calls or []]


def from_body(body: dict[str, Any]) -> Answer:
    """A non-streamed chat or completion response."""
    choices = []
    for choice in sorted(body["choices"], key=lambda c: c["index"]):
        if "message" in choice:
            message = choice["message"]
            logprobs = choice.get("logprobs")
            choices.append({"index": choice["index"], "content": message.get("content"),
                            "reasoning_content": message.get("reasoning_content") or message.get("reasoning"),
                            "tool_calls": _tool_calls(message.get("tool_calls")),
                            "finish_reason": choice["finish_reason"],
                            "logprobs": None if logprobs is None else logprobs.get("content")})
        else:
            choices.append({"index": choice["index"], "text": choice["text"],
                            "finish_reason": choice["finish_reason"], "logprobs": choice.get("logprobs")})
    return {"choices": choices, "usage": _usage(body.get("usage"))}


def from_chunks(chunks: list[dict[str, Any]]) -> Answer:
    """A streamed response's chunks (every ``data:`` payload before ``[DONE]``)."""
    by_index: dict[int, dict[str, Any]] = {}
    usage = None
    for chunk in chunks:
        assert "error" not in chunk, chunk
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices", []):
            acc = by_index.setdefault(choice["index"], {"index": choice["index"], "parts": [], "reasoning": [],
                                                        "calls": {}, "finish_reason": None, "logprobs": None})
            if "delta" in choice:
                delta = choice["delta"]
                if delta.get("content"):
                    acc["parts"].append(delta["content"])
                reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                if reasoning:
                    acc["reasoning"].append(reasoning)
                for call in delta.get("tool_calls") or []:
                    slot = acc["calls"].setdefault(call["index"], {"name": "", "arguments": "", "type": None})
                    function = call.get("function") or {}
                    slot["name"] += function.get("name") or ""
                    slot["arguments"] += function.get("arguments") or ""
                    slot["type"] = call.get("type") or slot["type"]
                logprobs = choice.get("logprobs")
                if logprobs is not None and logprobs.get("content") is not None:
                    acc["logprobs"] = (acc["logprobs"] or []) + logprobs["content"]
            else:
                acc["parts"].append(choice.get("text") or "")
                logprobs = choice.get("logprobs")
                if logprobs is not None:
                    merged = acc["logprobs"] or {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                                 "text_offset": []}
                    for key in merged:
                        merged[key] = merged[key] + (logprobs.get(key) or [])
                    acc["logprobs"] = merged
            if choice.get("finish_reason"):
                acc["finish_reason"] = choice["finish_reason"]
    choices = []
    for index in sorted(by_index):
        acc = by_index[index]
        if chunks and chunks[0].get("object") == "text_completion":
            choices.append({"index": index, "text": "".join(acc["parts"]), "finish_reason": acc["finish_reason"],
                            "logprobs": acc["logprobs"]})
        else:
            calls = [acc["calls"][i] for i in sorted(acc["calls"])]
            choices.append({"index": index, "content": "".join(acc["parts"]) or None,
                            "reasoning_content": "".join(acc["reasoning"]) or None,
                            "tool_calls": calls, "finish_reason": acc["finish_reason"],
                            "logprobs": acc["logprobs"]})
    return {"choices": choices, "usage": _usage(usage)}


def differences(got: Any, want: Any, *, tolerance: float = 2e-3, path: str = "$") -> list[str]:
    """Where ``got`` differs from ``want`` (floats: within ``tolerance``), as readable
    lines; empty when equal."""
    if isinstance(want, float) or isinstance(got, float):
        if isinstance(got, (int, float)) and isinstance(want, (int, float)):
            if math.isclose(float(got), float(want), abs_tol=tolerance, rel_tol=tolerance):
                return []
        return [f"{path}: {got!r} != {want!r}"]
    if isinstance(want, dict) and isinstance(got, dict):
        out = []
        for key in sorted(set(want) | set(got)):
            if key not in got:
                out.append(f"{path}.{key}: missing (want {want[key]!r})")
            elif key not in want:
                out.append(f"{path}.{key}: unexpected {got[key]!r}")
            else:
                out += differences(got[key], want[key], tolerance=tolerance, path=f"{path}.{key}")
        return out
    if isinstance(want, list) and isinstance(got, list):
        if len(got) != len(want):
            return [f"{path}: {len(got)} items != {len(want)}"]
        out = []
        for i, (g, w) in enumerate(zip(got, want)):
            out += differences(g, w, tolerance=tolerance, path=f"{path}[{i}]")
        return out
    return [] if got == want else [f"{path}: {got!r} != {want!r}"]
