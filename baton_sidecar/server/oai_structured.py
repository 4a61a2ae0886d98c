"""Structured-output fields of a request body -> one ``StructuredOutput`` (or None).

Accepted, on both routes, as OpenAI and vLLM spell them (at most one per request; vLLM's rule):

======================================================  =================================
body                                                    StructuredOutput(kind, spec)
======================================================  =================================
``response_format: {"type": "text"}``                   None
``response_format: {"type": "json_object"}``            ("json_object", "")
``response_format: {"type": "json_schema",              ("json", the schema as JSON text)
  "json_schema": {"name", "schema", "strict"}}``
``structured_outputs: {"json" | "regex" | "choice" |     the same kinds (vLLM >= 0.10.2)
  "grammar" | "json_object": ...}``
``guided_json`` / ``guided_regex`` / ``guided_choice``   the same kinds (vLLM's older names)
  / ``guided_grammar``
======================================================  =================================

A schema is always enforced, ``strict`` or not (the grammar engine has no lax mode). The shape
is checked here (400 naming the field); whether the grammar compiles is the engine's check,
``AsyncEngine.compile_grammar``, which names the same field.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from baton_sidecar.engine.request import RequestValidationError, StructuredOutput
from baton_sidecar.server.errors import bad_request

# vLLM's structured_outputs keys -> our kinds.
STRUCTURED_KEYS = {"json": "json", "regex": "regex", "choice": "choice", "grammar": "grammar",
                   "json_object": "json_object"}
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}
MAX_SPEC_CHARS = 256 * 1024  # a schema or grammar larger than this is refused, not compiled


def parse_structured(body: Mapping[str, Any]) -> StructuredOutput | None:
    """The request's one output constraint, or None."""
    found = [c for c in (_response_format(body), _structured_outputs(body), *_guided(body)) if c is not None]
    if len(found) > 1:
        raise bad_request(found[1].field, f"only one structured-output constraint per request; "
                                          f"{found[0].field} is given too")
    return found[0] if found else None


def _make(kind: str, value: Any, field: str) -> StructuredOutput:
    """``value`` as a spec of ``kind`` (schemas and choices serialised to JSON text)."""
    if kind == "json_object":
        if value not in (True, None, {}):
            raise bad_request(field, "must be true", code="invalid_type")
        return StructuredOutput("json_object", "", field)
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise bad_request(field, "must be a JSON schema (an object, or its JSON text)") from None
        if not isinstance(value, (dict, bool)):
            raise bad_request(field, "must be a JSON schema object", code="invalid_type")
        spec = json.dumps(value, sort_keys=True)
    elif kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise bad_request(field, "must be a non-empty list of non-empty strings", code="invalid_type")
        spec = json.dumps(value)
    else:  # regex, grammar
        if not isinstance(value, str) or not value:
            raise bad_request(field, "must be a non-empty string", code="invalid_type")
        spec = value
    if len(spec) > MAX_SPEC_CHARS:
        raise bad_request(field, f"is longer than {MAX_SPEC_CHARS} characters")
    try:
        return StructuredOutput(kind, spec, field)
    except RequestValidationError as exc:
        raise bad_request(exc.field, exc.message) from None


def _response_format(body: Mapping[str, Any]) -> StructuredOutput | None:
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise bad_request("response_format", "must be an object with a string `type`", code="invalid_type")
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("json_object", "", "response_format")
    if kind != "json_schema":
        raise bad_request("response_format.type", "must be one of text, json_object, json_schema")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise bad_request("response_format.json_schema", "is required with type json_schema and must "
                                                         "be an object", code="invalid_type")
    name = spec.get("name")
    if not isinstance(name, str) or not name:  # required by OpenAI and vLLM alike
        raise bad_request("response_format.json_schema.name", "is required and must be a non-empty string",
                          code="invalid_type" if name is not None else "missing_field")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise bad_request("response_format.json_schema.strict", "must be a boolean", code="invalid_type")
    schema = spec.get("schema", {})  # OpenAI: absent means any JSON
    return _make("json", schema, "response_format.json_schema.schema")


def _structured_outputs(body: Mapping[str, Any]) -> StructuredOutput | None:
    options = body.get("structured_outputs")
    if options is None:
        return None
    if not isinstance(options, dict):
        raise bad_request("structured_outputs", "must be an object", code="invalid_type")
    given = [k for k in STRUCTURED_KEYS if options.get(k) not in (None, False)]
    if len(given) != 1:
        raise bad_request("structured_outputs", f"must set exactly one of {', '.join(STRUCTURED_KEYS)}")
    key = given[0]
    return _make(STRUCTURED_KEYS[key], options[key], f"structured_outputs.{key}")


def _guided(body: Mapping[str, Any]) -> list[StructuredOutput | None]:
    return [_make(kind, body[name], name) for name, kind in GUIDED_FIELDS.items() if body.get(name) is not None]
