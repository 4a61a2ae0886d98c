"""Validate custom resources against a CRD's OpenAPI v3 schema with jsonschema, offline.

Kubernetes' structural schemas are OpenAPI 3.0 (boolean ``exclusiveMinimum``, ``nullable``, the
``x-kubernetes-*`` extensions), closest to JSON Schema draft 4. The conversion adds what the API server
does on its side: unknown fields are errors here (``kubectl --validate=strict`` reports them; the API
server would otherwise prune them silently). Not covered: CEL rules (x-kubernetes-validations; evaluated
by ``cel_rules``), defaulting, and list-type semantics.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import yaml


def to_jsonschema(node: Any) -> Any:
    if isinstance(node, list):
        return [to_jsonschema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    is_object = node.get("type") == "object"
    if is_object and "properties" in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if "pattern" in out and "anyOf" in out:  # int-or-string quantities: the pattern applies to strings only
        pattern = out.pop("pattern")
        out["anyOf"] = [dict(alt, pattern=pattern) if alt.get("type") == "string" else alt for alt in out["anyOf"]]
    return out


class CRDValidator:
    def __init__(self, crd: dict[str, Any]) -> None:
        self.crd = crd
        self.kind = crd["spec"]["names"]["kind"]
        version = crd["spec"]["versions"][0]
        self.api_version = f"{crd['spec']['group']}/{version['name']}"
        self.openapi = version["schema"]["openAPIV3Schema"]
        self.schema = to_jsonschema(copy.deepcopy(self.openapi))
        jsonschema.Draft4Validator.check_schema(self.schema)
        self._validator = jsonschema.Draft4Validator(self.schema)

    def errors(self, obj: dict[str, Any]) -> list[str]:
        found = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                 for e in self._validator.iter_errors(obj)]
        if obj.get("kind") != self.kind or obj.get("apiVersion") != self.api_version:
            found.append(f"not a {self.api_version} {self.kind}")
        return found


def load_crds(directory: Path) -> dict[str, CRDValidator]:
    validators = {}
    for path in sorted(directory.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            validators[doc["spec"]["names"]["kind"]] = CRDValidator(doc)
    return validators


def cel_rules(node: Any, where: str = "") -> Iterator[tuple[str, dict[str, str]]]:
    """Every x-kubernetes-validations rule in a schema, with the path of the node that carries it."""
    if isinstance(node, dict):
        for rule in node.get("x-kubernetes-validations", []):
            yield where or "<root>", rule
        for key, value in node.items():
            if key == "properties":
                for name, sub in value.items():
                    yield from cel_rules(sub, f"{where}.{name}" if where else name)
            elif key in ("items", "additionalProperties"):
                yield from cel_rules(value, f"{where}[]")
