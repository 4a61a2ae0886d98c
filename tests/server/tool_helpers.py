"""Shared by the tool-calling tests: a few function signatures, and a streamed answer put back
together."""

from __future__ import annotations

import random
from typing import Any

from baton_sidecar.server.tool_stream import ToolCallStream
from baton_sidecar.server.tools import ToolRequest, ToolResult

SIGNATURES: list[dict[str, Any]] = [
    {"name": "get_weather", "description": "The weather in a city now",
     "parameters": {"type": "object", "properties": {
         "city": {"type": "string", "description": "e.g. Paris"},
         "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
         "required": ["city", "unit"], "additionalProperties": False}},
    {"name": "add", "description": "Add two integers",
     "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                    "required": ["a", "b"], "additionalProperties": False}},
    {"name": "ping"},  # no parameters at all
    {"name": "search-docs", "description": "Search with filters",
     "parameters": {"type": "object", "properties": {
         "query": {"type": "string", "maxLength": 40},
         "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
         "exact": {"type": "boolean"}},
         "required": ["query", "tags", "exact"], "additionalProperties": False}},
    {"name": "book_room", "description": "Book a room with $defs",
     "parameters": {"type": "object", "properties": {
         "guest": {"$ref": "#/$defs/person"}, "nights": {"type": "integer", "minimum": 1, "maximum": 9}},
         "required": ["guest", "nights"], "additionalProperties": False,
         "$defs": {"person": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}},
                              "required": ["name"], "additionalProperties": False}}}},
]


def tools_body(*names: str) -> list[dict[str, Any]]:
    chosen = [s for s in SIGNATURES if not names or s["name"] in names]
    return [{"type": "function", "function": s} for s in chosen]


def random_pieces(text: str, rng: random.Random, most: int = 6) -> list[str]:
    pieces, i = [], 0
    while i < len(text):
        n = rng.randint(1, most)
        pieces.append(text[i:i + n])
        i += n
    return pieces


def streamed(request: ToolRequest, pieces: list[str]) -> tuple[ToolResult, list[dict[str, Any]], bool]:
    """(the deltas folded into a finished answer, the deltas, whether calls were made)."""
    stream = ToolCallStream(request)
    deltas = [d for piece in pieces for d in stream.feed(piece)] + stream.finish()
    content = "".join(d.get("content", "") for d in deltas)
    calls: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        for part in delta.get("tool_calls", ()):
            if "id" in part:
                assert part["index"] == len(calls), "calls start in order"
                calls[part["index"]] = {"id": part["id"], "type": part["type"],
                                        "function": dict(part["function"])}
            else:
                calls[part["index"]]["function"]["arguments"] += part["function"]["arguments"]
    return ToolResult(content or (None if calls else ""), list(calls.values())), deltas, stream.called


def without_ids(result: ToolResult) -> tuple[str | None, list[tuple[str, str]]]:
    return result.content, [(c["function"]["name"], c["function"]["arguments"]) for c in result.tool_calls]
