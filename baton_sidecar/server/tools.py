"""OpenAI tool calling, the request half and the finished answer: ``tools`` and ``tool_choice``
in, an output constraint and ``message.tool_calls`` out.

======================  =========================================  ================================
``tool_choice``         what the model is held to                  how its text becomes tool calls
======================  =========================================  ================================
``"none"``              nothing (the tools are still in the        none: the text is the content
                        prompt, as vLLM renders them)
``"auto"`` (default)    nothing                                    Hermes blocks:
                                                                   ``<tool_call>{"name": ...,
                                                                   "arguments": {...}}</tool_call>``
``"required"``          a JSON array, at least one item, each      each item is one call
                        ``{"name": <a tool>, "parameters": {..}}``
                        (at most one: ``parallel_tool_calls``
                        false, which keeps auto answers to their
                        first call too)
``{"type": "function",  the named tool's parameters schema         the whole text is the arguments
"function": {"name"}}``
======================  =========================================  ================================

Parsing follows vLLM (``Hermes2ProToolParser``, ``ChatCompletionRequest``): an auto answer whose
blocks do not all parse stays plain content; text before the first block is the content, text
after it is dropped; ``finish_reason`` is "tool_calls" for auto and required calls and stays the
engine's for a named one (OpenAI's rule). ``tool_stream.ToolCallStream`` gives the same answer
as deltas.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Mapping

from baton_sidecar.engine.request import StructuredOutput
from baton_sidecar.server.errors import bad_request
from baton_sidecar.server.oai_structured import MAX_SPEC_CHARS

NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function names
MAX_TOOLS = 128  # OpenAI's limit
CHOICES = ("none", "auto", "required")
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
# A closed block, or an unclosed one running to the end of the text (vLLM accepts both).
TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)
# A function declared without parameters takes none (vLLM leaves the object open: a small model
# then fills it with whatever it likes).
EMPTY_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class Tool:
    """One function the model may call. ``parameters``: a JSON schema object, or None."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def openai(self) -> dict[str, Any]:
        """The ``tools[i]`` entry, as chat templates expect it."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = self.parameters if self.parameters is not None else dict(EMPTY_PARAMETERS)
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolResult:
    """A finished answer: ``content`` (the text; None only beside tool calls with no text before
    them, as OpenAI answers) and OpenAI ``message.tool_calls``."""

    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class ToolRequest:
    """A request's tools and choice: "none", "auto", "required", or "named" with ``named`` the
    function ``tool_choice`` names."""

    tools: tuple[Tool, ...]
    choice: str = "auto"
    named: str | None = None
    parallel: bool = True  # ``parallel_tool_calls``: False keeps an answer to one call

    def openai_tools(self) -> list[dict[str, Any]]:
        """``tools`` for ``chat_template.render_tool_chat``."""
        return [tool.openai() for tool in self.tools]

    def structured(self) -> StructuredOutput | None:
        """The output constraint of ``required`` and named choices; None for auto and none."""
        if self.choice == "required":
            schema = _required_schema(self.tools, self.parallel)
            where = "tools"
        elif self.named is not None:
            i, tool = next((i, t) for i, t in enumerate(self.tools) if t.name == self.named)
            schema = tool.parameters if tool.parameters is not None else dict(EMPTY_PARAMETERS)
            where = f"tools[{i}].function.parameters"  # compile errors name the schema at fault
        else:
            return None
        spec = json.dumps(schema, ensure_ascii=False)  # key order kept: arguments come in it
        if len(spec) > MAX_SPEC_CHARS:
            raise bad_request(where, f"the tools' schema is longer than {MAX_SPEC_CHARS} characters")
        return StructuredOutput("json", spec, where)

    def parse(self, text: str) -> ToolResult:
        """A finished output as content and tool calls."""
        if self.choice == "none":
            return ToolResult(text)
        if self.named is not None:
            return ToolResult(None, [tool_call(self.named, text)])
        result = _parse_required(text) if self.choice == "required" else _parse_hermes(text)
        if not self.parallel and len(result.tool_calls) > 1:
            return ToolResult(result.content, result.tool_calls[:1])  # vLLM keeps the first
        return result

    def finish_reason(self, engine_reason: str, called: bool) -> str:
        """OpenAI's ``finish_reason``: "tool_calls" when auto or required calls were made (a
        required answer only when it ended by itself); a named call keeps the engine's."""
        if called and (self.choice == "auto" or (self.choice == "required" and engine_reason == "stop")):
            return "tool_calls"
        return engine_reason


def tool_call_id() -> str:
    return "call_" + secrets.token_hex(12)  # 24 hex digits


def tool_call(name: str, arguments: str, call_id: str | None = None) -> dict[str, Any]:
    """One ``message.tool_calls`` entry; ``arguments`` is JSON text."""
    return {"id": call_id or tool_call_id(), "type": "function",
            "function": {"name": name, "arguments": arguments}}


def dump_arguments(value: Any) -> str:
    """Arguments as JSON text, as vLLM writes them (non-ASCII kept)."""
    return json.dumps(value, ensure_ascii=False)


# -- parsing the finished text --------------------------------------------------------------------

def _parse_hermes(text: str) -> ToolResult:
    start = text.find(TOOL_CALL_START)
    if start < 0:
        return ToolResult(text)
    calls = []
    for closed, unclosed in TOOL_CALL_RE.findall(text):
        call = _loads(closed or unclosed)
        if not (isinstance(call, dict) and isinstance(call.get("name"), str) and "arguments" in call):
            return ToolResult(text)  # one bad block: the whole answer is content (vLLM)
        calls.append(tool_call(call["name"], dump_arguments(call["arguments"])))
    return ToolResult(text[:start] or None, calls)


def _parse_required(text: str) -> ToolResult:
    items = _loads(text)
    if not isinstance(items, list) or not all(
            isinstance(c, dict) and isinstance(c.get("name"), str) and "parameters" in c for c in items):
        return ToolResult(text)  # cut short (max_tokens): not an array of calls
    return ToolResult(None, [tool_call(c["name"], dump_arguments(c["parameters"])) for c in items])


_NOT_JSON = object()


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return _NOT_JSON


# -- request validation ----------------------------------------------------------------------------

def parse_tools(body: Mapping[str, Any]) -> ToolRequest | None:
    """The request's ``tools`` and ``tool_choice``, checked; None when it offers no tools.

    ``tools: []`` is no tools (vLLM); ``tool_choice`` other than "none" without tools is a 400
    (OpenAI). The legacy ``functions`` / ``function_call`` are refused by name.
    """
    for legacy in ("functions", "function_call"):
        if body.get(legacy):
            raise bad_request(legacy, "is not supported; use tools and tool_choice",
                              code="unsupported_value")
    raw_tools = body.get("tools")
    if raw_tools is not None and not isinstance(raw_tools, list):
        raise bad_request("tools", "must be a list", code="invalid_type")
    if raw_tools and len(raw_tools) > MAX_TOOLS:
        raise bad_request("tools", f"at most {MAX_TOOLS} tools")
    tools = tuple(_tool(t, f"tools[{i}]") for i, t in enumerate(raw_tools or ()))
    seen: dict[str, int] = {}
    for i, tool in enumerate(tools):
        if tool.name in seen:
            raise bad_request(f"tools[{i}].function.name",
                              f"{tool.name!r} is also the name of tools[{seen[tool.name]}]")
        seen[tool.name] = i
    choice, named = _tool_choice(body.get("tool_choice"), seen)
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise bad_request("parallel_tool_calls", "must be a boolean", code="invalid_type")
    if not tools:
        if choice not in (None, "none"):
            raise bad_request("tool_choice", "is only allowed when tools are given")
        return None
    return ToolRequest(tools, choice or "auto", named, parallel is not False)


def _tool(raw: Any, where: str) -> Tool:
    if not isinstance(raw, dict):
        raise bad_request(where, "must be an object", code="invalid_type")
    if raw.get("type", "function") != "function":
        raise bad_request(f"{where}.type", 'must be "function"')
    function = raw.get("function")
    where = f"{where}.function"
    if function is None:
        raise bad_request(where, "is required", code="missing_field")
    if not isinstance(function, dict):
        raise bad_request(where, "must be an object", code="invalid_type")
    name = function.get("name")
    if name is None:
        raise bad_request(f"{where}.name", "is required", code="missing_field")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise bad_request(f"{where}.name", "must be 1 to 64 letters, digits, underscores or dashes")
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise bad_request(f"{where}.description", "must be a string", code="invalid_type")
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise bad_request(f"{where}.parameters", "must be a JSON schema object", code="invalid_type")
    strict = function.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise bad_request(f"{where}.strict", "must be a boolean", code="invalid_type")
    return Tool(name, description, parameters, strict)


def _tool_choice(raw: Any, names: Mapping[str, int]) -> tuple[str | None, str | None]:
    """(choice, named function)."""
    if raw is None or raw in CHOICES:
        return raw, None
    if isinstance(raw, str):
        raise bad_request("tool_choice", 'must be "none", "auto", "required" or '
                                         '{"type": "function", "function": {"name": ...}}')
    if not isinstance(raw, dict):
        raise bad_request("tool_choice", "must be a string or an object", code="invalid_type")
    if raw.get("type") != "function":
        raise bad_request("tool_choice.type", 'must be "function"')
    function = raw.get("function")
    if not isinstance(function, dict):
        raise bad_request("tool_choice.function", "must be an object with a name",
                          code="missing_field" if function is None else "invalid_type")
    name = function.get("name")
    if not isinstance(name, str):
        raise bad_request("tool_choice.function.name", "must be a string",
                          code="missing_field" if name is None else "invalid_type")
    if names and name not in names:
        raise bad_request("tool_choice.function.name", f"{name!r} is not one of the tools")
    return "named", name


def _required_schema(tools: tuple[Tool, ...], parallel: bool) -> dict[str, Any]:
    """vLLM's schema for ``required``: ``[{"name": <one tool>, "parameters": <its schema>}, ...]``.

    Each tool's ``$defs`` move to the root, where ``#/$defs/...`` references resolve; two tools
    defining one name differently is a 400. ``additionalProperties: false`` (vLLM leaves it
    open) keeps a small model from wandering into keys no call reads.
    """
    defs: dict[str, Any] = {}
    items = []
    for i, tool in enumerate(tools):
        parameters = copy.deepcopy(tool.parameters) if tool.parameters is not None else dict(EMPTY_PARAMETERS)
        local = parameters.pop("$defs", None) or {}
        if not isinstance(local, dict):
            raise bad_request(f"tools[{i}].function.parameters.$defs", "must be an object",
                              code="invalid_type")
        for name, schema in local.items():
            if name in defs and defs[name] != schema:
                raise bad_request(f"tools[{i}].function.parameters",
                                  f"$defs.{name} differs from another tool's definition of it")
            defs[name] = schema
        items.append({"type": "object",
                      "properties": {"name": {"type": "string", "enum": [tool.name]},
                                     "parameters": parameters},
                      "required": ["name", "parameters"], "additionalProperties": False})
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema
