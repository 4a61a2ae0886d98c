"""Chat messages with tool calls and tool results, and the prompt they render to.

``parse_tool_messages`` checks a chat body's ``messages`` and keeps what a tool-aware template
reads; ``render_tool_chat`` renders them with the tools. A model whose own template knows no
tools (SmolLM2's) gets ``templates/hermes_tools.jinja``: ChatML with the tools in the system turn
and Hermes ``<tool_call>`` / ``<tool_response>`` blocks, the format ``tools.ToolRequest.parse``
reads back.

Message shapes out (what transformers' tool-aware templates expect)::

    {"role": "system" | "user", "content": str}               ("developer" becomes "system")
    {"role": "assistant", "content": str,
     "tool_calls": [{"id", "type": "function",                 only when it made calls;
                     "function": {"name", "arguments": dict}}]}   arguments parsed from JSON
    {"role": "tool", "content": str, "tool_call_id": str, "name": str}   name: the called function
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

from baton_sidecar.server.errors import bad_request

HERMES_TEMPLATE = "hermes_tools.jinja"
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")  # "developer" is read as "system"


@lru_cache(maxsize=1)
def hermes_template() -> str:
    """The shipped tool-aware ChatML template."""
    return resources.files("baton_sidecar").joinpath("templates", HERMES_TEMPLATE).read_text("utf-8")


def pick_template(tokenizer: Any, template: str | None = None) -> str:
    """``template`` if given, else the tokenizer's own when it mentions tools, else Hermes ChatML."""
    if template:
        return template
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, str) and "tools" in own:
        return own
    return hermes_template()


def render_tool_chat(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                     template: str | None = None) -> list[int]:
    """The prompt, generation prompt included, as token ids (worker thread).

    ``tools``: OpenAI ``tools`` entries (``ToolRequest.openai_tools()``), or None.
    """
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools or None,
                                             chat_template=pick_template(tokenizer, template),
                                             add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # jinja raises its own errors for conversations it refuses
        raise bad_request("messages", f"the chat template refused them: {exc}") from None
    return list(tokenizer.encode(text, add_special_tokens=False))  # the template wrote the specials


def has_tool_messages(messages: list[dict[str, Any]]) -> bool:
    """Whether the raw messages hold calls or results (and so need a tool-aware template)."""
    return any(isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls")) for m in messages)


def parse_tool_messages(messages: Any) -> list[dict[str, Any]]:
    """``messages`` checked (400s name the field) and shaped as the module docstring says."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages", "must be a non-empty list", code="invalid_type")
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool call id -> function name, for the results that follow
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise bad_request(where, "must be an object", code="invalid_type")
        role = msg.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise bad_request(f"{where}.role", f"must be one of {', '.join(CHAT_ROLES)}")
        content = msg.get("content")
        calls = msg.get("tool_calls") if role == "assistant" else None
        if content is None and role == "assistant":
            content = ""  # null beside tool calls (or a refusal)
        item: dict[str, Any] = {"role": "system" if role == "developer" else role,
                                "content": message_text(content, f"{where}.content")}
        if calls is not None:
            parsed = _calls(calls, f"{where}.tool_calls", names)
            if parsed:
                item["tool_calls"] = parsed
        if role == "tool":
            call_id = msg.get("tool_call_id")
            if not isinstance(call_id, str):
                raise bad_request(f"{where}.tool_call_id", "is required and must be a string",
                                  code="missing_field" if call_id is None else "invalid_type")
            item["tool_call_id"] = call_id
            name = msg.get("name", names.get(call_id))
            if name is not None:
                item["name"] = name
        out.append(item)
    return out


def message_text(content: Any, where: str) -> str:
    """A message's content as text: a string, or its text parts joined (other parts: 400)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
                    part.get("text"), str):
                raise bad_request(f"{where}[{j}]", "only text content parts are supported",
                                  code="unsupported_value")
            parts.append(part["text"])
        return "".join(parts)
    raise bad_request(where, "must be a string or a list of text parts", code="invalid_type")


def _calls(calls: Any, where: str, names: dict[str, str]) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise bad_request(where, "must be a list", code="invalid_type")
    out = []
    for j, call in enumerate(calls):
        at = f"{where}[{j}]"
        if not isinstance(call, dict):
            raise bad_request(at, "must be an object", code="invalid_type")
        if call.get("type", "function") != "function":
            raise bad_request(f"{at}.type", 'must be "function"')
        function = call.get("function")
        if not isinstance(function, dict):
            raise bad_request(f"{at}.function", "is required and must be an object",
                              code="missing_field" if function is None else "invalid_type")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise bad_request(f"{at}.function.name", "is required and must be a non-empty string",
                              code="missing_field" if name is None else "invalid_type")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):  # OpenAI sends JSON text; templates want the object
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                raise bad_request(f"{at}.function.arguments", "must be JSON text") from None
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise bad_request(f"{at}.id", "must be a string", code="invalid_type")
        if call_id:
            names[call_id] = name
        out.append({"id": call_id or "", "type": "function",
                    "function": {"name": name, "arguments": arguments}})
    return out
