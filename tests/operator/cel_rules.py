"""Evaluate a CRD's CEL validation rules (``x-kubernetes-validations``) offline, as the API server does.

``CELValidator(crd).violations(new, old=None)`` walks the object alongside the schema and evaluates every
rule where the API server would:

- a rule runs only where its value is present (and not null), with ``self`` bound to that value;
- a rule under ``items`` runs per element, under ``additionalProperties`` per map value;
- a transition rule (one that names ``oldSelf``) runs only on an update, where the old object has a
  value at the same place: the same property, the same map key, the same element of a
  ``x-kubernetes-list-type: map`` list by its keys (or of a ``set`` list); elements of atomic lists
  have none;
- defaults are filled in first, and values reach CEL typed by their schema (a ``number`` is a double
  even when written as 1; an object shows its declared properties only; at the root, ``metadata``
  shows ``name`` and ``generateName`` only).

Compiling is strict, so that no rule goes unchecked: a rule fails to compile when it does not parse,
calls a function that neither CEL (cel-python) nor ``EXTENSIONS`` implements, names a variable other than
``self``/``oldSelf``/a macro's, or selects a field the schema does not declare. Not mirrored: the API
server's static type check beyond field names, its cost limits, and ``optionalOldSelf`` (refused). One
known leniency: cel-python's ``has(a.b.c)`` is false where ``a.b`` is absent; Kubernetes reports an
error there, so write ``has(a.b) && has(a.b.c)``.
"""

from __future__ import annotations

import base64
import copy
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import celpy
import lark
from celpy import celtypes

# Kubernetes' CEL libraries (k8s.io/apiserver/pkg/cel/library) that cel-python lacks: only those the
# CRDs use. A rule calling any other function fails to compile here until it is added.
EXTENSIONS: dict[str, Callable[..., Any]] = {
    # lists.go: list<T>.isSorted() for comparable T
    "isSorted": lambda items: celtypes.BoolType(all(a <= b for a, b in zip(items, items[1:]))),
}
MACROS = {"has", "all", "exists", "exists_one", "map", "filter", "dyn"}
COMPREHENSIONS = {"all", "exists", "exists_one", "map", "filter"}
TYPE_NAMES = {"int", "uint", "double", "bool", "string", "bytes", "list", "map", "null_type", "type",
              "timestamp", "duration"}
RULE_KEYS = {"rule", "message", "messageExpression", "reason", "fieldPath"}
# What the API server shows of an object's root besides its schema (WithTypeAndObjectMeta).
ROOT_FIELDS = {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
               "metadata": {"type": "object", "properties": {"name": {"type": "string"},
                                                             "generateName": {"type": "string"}}}}


class RuleError(ValueError):
    """A rule this helper cannot compile (and so could not check)."""


@dataclass(frozen=True)
class Violation:
    path: str  # in the object, e.g. spec.tolerations[0]
    where: str  # in the schema, e.g. spec.tolerations[] (as CompiledRule.where)
    rule: str
    message: str
    error: str | None = None  # an evaluation error (the API server refuses the object then, too)


@dataclass(frozen=True)
class CompiledRule:
    where: str  # in the schema: "<root>", "spec.tolerations[]", "spec.resources.requests.*"
    rule: str
    message: str
    transition: bool  # names oldSelf: evaluated on updates only
    program: celpy.Runner
    message_program: celpy.Runner | None


# --- compiling ---------------------------------------------------------------------------------

def rule_sites(node: dict[str, Any], where: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node, with its path: properties by name, ``items`` as ``[]``, map values as ``.*``."""
    yield where or "<root>", node
    for name, sub in (node.get("properties") or {}).items():
        yield from rule_sites(sub, f"{where}.{name}" if where else name)
    if isinstance(node.get("items"), dict):
        yield from rule_sites(node["items"], f"{where}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from rule_sites(node["additionalProperties"], f"{where}.*")


def _properties(node: dict[str, Any], root: bool) -> dict[str, Any]:
    return {**(node.get("properties") or {}), **ROOT_FIELDS} if root else (node.get("properties") or {})


def _field(node: dict[str, Any] | None, name: str, root: bool) -> dict[str, Any] | None:
    """The schema of ``node.name`` as CEL sees it, or None where the API server's compiler refuses it."""
    if node is None or node.get("x-kubernetes-int-or-string"):
        return None
    if name in (props := _properties(node, root)):
        return props[name]
    extra = node.get("additionalProperties")
    return extra if isinstance(extra, dict) else None


def _chain(tree: Any) -> list[str] | None:
    """``a.b.c`` as ["a", "b", "c"]; None for anything but a plain selection from a variable."""
    if isinstance(tree, lark.Tree):
        if tree.data in ("member", "primary", "expr", "conditionalor", "conditionaland", "relation",
                         "addition", "multiplication", "unary") and len(tree.children) == 1:
            return _chain(tree.children[0])
        if tree.data == "ident":
            return [str(tree.children[0])]
        if tree.data == "member_dot":
            head = _chain(tree.children[0])
            return None if head is None else head + [str(tree.children[1])]
    return None


def _problems(ast: lark.Tree, node: dict[str, Any], root: bool) -> list[str]:
    known = set(celpy.evaluation.base_functions) | set(EXTENSIONS) | MACROS
    bound = {"self", "oldSelf"} | TYPE_NAMES
    calls = [(str(t.children[1]), t) for t in ast.iter_subtrees() if t.data == "member_dot_arg"]
    calls += [(str(t.children[0]), t) for t in ast.iter_subtrees() if t.data == "ident_arg"]
    for name, call in calls:
        args = next((c for c in call.children if isinstance(c, lark.Tree) and c.data == "exprlist"), None)
        if name in COMPREHENSIONS and args is not None:
            bound |= set(_chain(args.children[0]) or ())  # x.all(v, ...): v is bound
    problems = [f"unknown function {name}()" for name, _ in calls if name not in known]
    problems += [f"undeclared variable {t.children[0]}" for t in ast.iter_subtrees()
                 if t.data == "ident" and str(t.children[0]) not in bound]
    for tree in ast.iter_subtrees():
        chain = _chain(tree) if tree.data == "member_dot" else None
        if chain and chain[0] in ("self", "oldSelf"):
            schema: dict[str, Any] | None = node
            for depth, name in enumerate(chain[1:]):
                schema = _field(schema, name, root and depth == 0)
                if schema is None:
                    problems.append(f"undefined field {'.'.join(chain[:depth + 2])}")
                    break
    return sorted(set(problems))


def _compile(source: str, label: str, node: dict[str, Any], root: bool) -> tuple[lark.Tree, celpy.Runner]:
    env = celpy.Environment()
    try:
        ast = env.compile(source)
    except celpy.CELParseError as exc:
        raise RuleError(f"{label}: {source!r} does not parse: {exc}") from exc
    if problems := _problems(ast, node, root):
        raise RuleError(f"{label}: {source!r}: {'; '.join(problems)}")
    return ast, env.program(ast, functions=EXTENSIONS)


def compile_rule(where: str, node: dict[str, Any], rule: dict[str, Any]) -> CompiledRule:
    """Compile one rule of the schema node at ``where``; raises RuleError naming every problem found."""
    if unknown := set(rule) - RULE_KEYS:
        raise RuleError(f"{where}: {rule.get('rule')!r}: unsupported keys {sorted(unknown)}")
    root = where == "<root>"
    ast, program = _compile(rule["rule"], where, node, root)
    message = rule.get("messageExpression")
    message_program = _compile(message, where, node, root)[1] if message else None
    transition = any(t.data == "ident" and str(t.children[0]) == "oldSelf" for t in ast.iter_subtrees())
    return CompiledRule(where, rule["rule"], rule.get("message") or f"failed rule: {rule['rule']}",
                        transition, program, message_program)


def compile_rules(openapi: dict[str, Any]) -> list[CompiledRule]:
    return [compile_rule(where, node, rule) for where, node in rule_sites(openapi)
            for rule in node.get("x-kubernetes-validations", [])]


# --- values as CEL sees them --------------------------------------------------------------------

def with_defaults(node: dict[str, Any], value: Any) -> Any:
    """``value`` with the schema's defaults filled in where a property is absent (in place)."""
    if isinstance(value, dict):
        for name, sub in (node.get("properties") or {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                with_defaults(sub, value[name])
        if isinstance(extra := node.get("additionalProperties"), dict):
            for item in value.values():
                with_defaults(extra, item)
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for item in value:
            with_defaults(node["items"], item)
    return value


STRING_FORMATS: dict[str, Callable[[str], Any]] = {
    "date-time": celtypes.TimestampType, "date": celtypes.TimestampType,
    "duration": celtypes.DurationType, "byte": lambda text: celtypes.BytesType(base64.b64decode(text)),
}


def to_cel(node: dict[str, Any], value: Any, root: bool = False) -> Any:
    """A JSON value as the API server hands it to CEL, typed by its schema ``node``."""
    if value is None:
        return None
    if node.get("x-kubernetes-int-or-string"):
        return celtypes.IntType(value) if isinstance(value, int) else celtypes.StringType(value)
    kind = node.get("type")
    if kind == "integer":
        return celtypes.IntType(value)
    if kind == "number":
        return celtypes.DoubleType(float(value))
    if kind == "boolean":
        return celtypes.BoolType(value)
    if kind == "string":
        return STRING_FORMATS.get(node.get("format", ""), celtypes.StringType)(value)
    if kind == "array" and isinstance(node.get("items"), dict):
        return celtypes.ListType([to_cel(node["items"], item) for item in value])
    if kind == "object" and isinstance(extra := node.get("additionalProperties"), dict):
        return celtypes.MapType({celtypes.StringType(k): to_cel(extra, v) for k, v in value.items()})
    if kind == "object" and (root or "properties" in node):
        props = _properties(node, root)
        return celtypes.MapType({celtypes.StringType(k): to_cel(props[k], v) for k, v in value.items()
                                 if k in props})
    return celpy.json_to_cel(value)  # x-kubernetes-preserve-unknown-fields without properties


# --- evaluating ---------------------------------------------------------------------------------

def _list_key(node: dict[str, Any], item: Any) -> Any:
    if node.get("x-kubernetes-list-type") == "map" and isinstance(item, dict):
        return tuple(item.get(k) for k in node.get("x-kubernetes-list-map-keys", []))
    return repr(item)  # set: an element correlates with an equal one


class CELValidator:
    def __init__(self, crd: dict[str, Any]) -> None:
        self.kind = crd["spec"]["names"]["kind"]
        self.openapi = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        self.rules = compile_rules(self.openapi)
        self._at: dict[str, list[CompiledRule]] = {}
        for rule in self.rules:
            self._at.setdefault(rule.where, []).append(rule)

    def violations(self, obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[Violation]:
        """Every rule the object breaks: on create without ``old``, on update with the stored object."""
        new = with_defaults(self.openapi, copy.deepcopy(obj))
        old = with_defaults(self.openapi, copy.deepcopy(old)) if old is not None else None
        return list(self._walk(self.openapi, new, old, "", ""))

    def messages(self, obj: dict[str, Any], old: dict[str, Any] | None = None) -> set[str]:
        return {v.message for v in self.violations(obj, old)}

    def _walk(self, node: dict[str, Any], value: Any, old: Any, where: str, path: str) -> Iterator[Violation]:
        if value is None:
            return
        for rule in self._at.get(where or "<root>", ()):
            if not rule.transition or old is not None:
                yield from self._check(rule, node, value, old, path or "<root>", where == "")
        if isinstance(value, dict):
            for name, sub in (node.get("properties") or {}).items():
                if name in value:
                    was = old.get(name) if isinstance(old, dict) else None
                    yield from self._walk(sub, value[name], was, _join(where, name), _join(path, name))
            if isinstance(extra := node.get("additionalProperties"), dict):
                for key, item in value.items():
                    was = old.get(key) if isinstance(old, dict) else None
                    yield from self._walk(extra, item, was, f"{where}.*", _join(path, key))
        elif isinstance(value, list) and isinstance(items := node.get("items"), dict):
            atomic = node.get("x-kubernetes-list-type", "atomic") == "atomic"
            olds = {} if atomic or not isinstance(old, list) else {_list_key(node, o): o for o in old}
            for index, item in enumerate(value):
                was = olds.get(_list_key(node, item))
                yield from self._walk(items, item, was, f"{where}[]", f"{path}[{index}]")

    @staticmethod
    def _check(rule: CompiledRule, node: dict[str, Any], value: Any, old: Any, path: str,
               root: bool) -> Iterator[Violation]:
        context = {"self": to_cel(node, value, root)}
        if rule.transition:
            context["oldSelf"] = to_cel(node, old, root)
        try:
            result = rule.program.evaluate(context)
        except celpy.CELEvalError as exc:
            yield Violation(path, rule.where, rule.rule, rule.message, error=str(exc.args[0]))
            return
        if not isinstance(result, celtypes.BoolType):
            yield Violation(path, rule.where, rule.rule, rule.message, error=f"returned {result!r}, not a bool")
        elif not result:
            message = rule.message
            if rule.message_program is not None:
                try:
                    message = str(rule.message_program.evaluate(context))
                except celpy.CELEvalError:
                    pass  # the API server falls back to message, too
            yield Violation(path, rule.where, rule.rule, message)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name

