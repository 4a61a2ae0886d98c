"""The series and label names a Grafana dashboard's PromQL reads, to check them against a real scrape.

Expressions are parsed by ``promql-parser`` (Prometheus' grammar, implemented in Rust), so function
names, keywords (``by``, ``on``, ``group_left``, ``offset``, ``bool``, ``and``/``or``/``unless``),
string literals and durations are never taken for series names. Grafana's own syntax is handled
before parsing: its interval variables (``$__rate_interval``) become a duration, and a variable
query (``label_values(selector, label)``, ``query_result(expr)``) is split into its PromQL and the
label it lists. Other ``$variables`` may appear only inside label values, where they are plain
strings to PromQL; anywhere else the parser rejects them, and so does the check.

A label counts as present on a series when the scrape shows it there, when Prometheus attaches it
to every target (``target_labels``), or when the expression itself makes it (``count_values``,
``label_replace``, ``label_join``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterator

import promql_parser as pql
from prometheus_client.parser import text_string_to_metric_families

# Grafana replaces these with durations before the query reaches Prometheus ($__range_s and the
# like are numbers, not durations, and are left alone so the parser rejects them where they can't be).
GRAFANA_DURATION = re.compile(r"\$(?:__(?:rate_interval|interval|range)\b(?!_)"
                              r"|\{__(?:rate_interval|interval|range)(?::\w+)?\})")
LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<selector>.*\S)\s*,)?\s*(?P<label>[A-Za-z_]\w*)\s*\)\s*$",
                          re.DOTALL)
QUERY_RESULT = re.compile(r"^\s*query_result\((?P<expr>.*)\)\s*$", re.DOTALL)
# Functions whose string argument names a label they add: argument index of that name.
LABEL_MAKERS = {"label_replace": 1, "label_join": 1}
LEAVES = (pql.VectorSelector, pql.NumberLiteral, pql.StringLiteral)


@dataclass(frozen=True)
class Query:
    where: str  # what in the dashboard holds it: 'panel "Queue time" target B', 'variable pod', ...
    expr: str  # PromQL as Grafana sends it, its variables unexpanded; "" for label_values(label)
    label: str | None = None  # label_values(..., label): the label whose values the variable lists


@dataclass(frozen=True)
class Selector:
    name: str  # the series read: a sample name as scraped (foo_total, foo_bucket, foo_sum)
    labels: frozenset[str]  # label names its matchers use, __name__ left out


@dataclass(frozen=True)
class Grouping:
    what: str  # "sum by", "on", "group_left", ...
    labels: frozenset[str]
    selectors: tuple[Selector, ...]  # the series whose labels these must be
    made: frozenset[str]  # labels the expression under the grouping makes itself


def parse(expr: str) -> pql.Expr:
    """The PromQL AST of ``expr`` as Grafana would send it (interval variables as durations)."""
    return pql.parse(GRAFANA_DURATION.sub("5m", expr))


def _children(node: Any) -> list[Any]:
    if isinstance(node, LEAVES):
        return []
    if isinstance(node, pql.AggregateExpr):
        return [n for n in (node.param, node.expr) if n is not None]
    if isinstance(node, pql.BinaryExpr):
        return [node.lhs, node.rhs]
    if isinstance(node, pql.Call):
        return list(node.args)
    if isinstance(node, (pql.ParenExpr, pql.UnaryExpr, pql.SubqueryExpr)):
        return [node.expr]
    if isinstance(node, pql.MatrixSelector):
        return [node.vector_selector]
    # A node this walk does not know could hide series names: refuse it rather than miss them.
    raise TypeError(f"unknown PromQL node {type(node).__name__}: {node}")


def _nodes(node: Any) -> Iterator[Any]:
    yield node
    for child in _children(node):
        yield from _nodes(child)


def _selector(node: pql.VectorSelector) -> Selector:
    matchers = [*node.matchers.matchers, *(m for group in node.matchers.or_matchers for m in group)]
    name = node.name
    for m in matchers:
        if m.name == "__name__":
            if m.op != pql.MatchOp.Equal:
                raise ValueError(f"{node}: a series name matched by {m.op} cannot be checked")
            if name is not None and name != m.value:
                raise ValueError(f"{node}: two series names")
            name = m.value
    if name is None:
        raise ValueError(f"{node}: a selector without a series name cannot be checked")
    return Selector(name, frozenset(m.name for m in matchers if m.name != "__name__"))


def selectors(expr: pql.Expr) -> list[Selector]:
    """Every series selector in ``expr``, in order."""
    return [_selector(n) for n in _nodes(expr) if isinstance(n, pql.VectorSelector)]


def _made(expr: pql.Expr) -> frozenset[str]:
    made = set()
    for n in _nodes(expr):
        if isinstance(n, pql.AggregateExpr) and str(n.op) == "count_values":
            made.add(n.param.val)
        elif isinstance(n, pql.Call) and n.func.name in LABEL_MAKERS:
            made.add(n.args[LABEL_MAKERS[n.func.name]].val)
    return frozenset(made)


def groupings(expr: pql.Expr) -> list[Grouping]:
    """Every ``by``/``without`` of an aggregation and ``on``/``ignoring``/``group_x`` of a binary
    operation, each with the series it groups."""
    out = []
    for n in _nodes(expr):
        if isinstance(n, pql.AggregateExpr) and n.modifier is not None and n.modifier.labels:
            kind = "by" if n.modifier.type == pql.AggModifierType.By else "without"
            out.append(Grouping(f"{n.op} {kind}", frozenset(n.modifier.labels), tuple(selectors(n.expr)),
                                _made(n.expr)))
        elif isinstance(n, pql.BinaryExpr) and n.modifier is not None:
            both = (*selectors(n.lhs), *selectors(n.rhs))
            made = _made(n.lhs) | _made(n.rhs)
            matching = n.modifier.matching
            if matching is not None and matching.labels:
                kind = "on" if matching.type == pql.LabelModifierType.Include else "ignoring"
                out.append(Grouping(kind, frozenset(matching.labels), both, made))
            if n.modifier.group_labels:  # copied from the "one" side
                left = n.modifier.card == pql.VectorMatchCardinality.ManyToOne
                one = n.rhs if left else n.lhs
                out.append(Grouping("group_left" if left else "group_right",
                                    frozenset(n.modifier.group_labels), tuple(selectors(one)), _made(one)))
    return out


def _panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # a collapsed row keeps its panels inside


def dashboard_queries(dashboard: dict) -> list[Query]:
    """Every PromQL query of a dashboard: panel targets, annotations and variable queries."""
    out = []
    for panel in _panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                out.append(Query(f'panel "{panel.get("title")}" target {target.get("refId")}', target["expr"]))
    for ann in dashboard.get("annotations", {}).get("list", []):
        expr = ann.get("expr") or ann.get("target", {}).get("expr")
        if expr:
            out.append(Query(f'annotation "{ann.get("name")}"', expr))
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        text = query.get("query", "") if isinstance(query, dict) else query
        out.append(variable_query(f'variable {var.get("name")}', text))
    return out


def variable_query(where: str, text: str) -> Query:
    """A Prometheus variable's query: ``label_values([selector,] label)`` or ``query_result(expr)``."""
    if m := LABEL_VALUES.match(text):
        return Query(where, m.group("selector") or "", m.group("label"))
    if m := QUERY_RESULT.match(text):
        return Query(where, m.group("expr"))
    raise ValueError(f"{where}: {text!r} is not a variable query this check reads")


def scraped_labels(text: str) -> dict[str, set[str]]:
    """Sample name -> the label names it carries, from Prometheus text as Prometheus' parser reads it.
    A family with no sample yet (a labelled counter never incremented) contributes no name."""
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def problems(query: Query, scraped: dict[str, set[str]], target_labels: frozenset[str]) -> list[str]:
    """What ``query`` reads that ``scraped`` (``scraped_labels`` of a real scrape) lacks."""
    try:
        expr = parse(query.expr) if query.expr else None
        sels = selectors(expr) if expr is not None else []
        groups = groupings(expr) if expr is not None else []
    except (ValueError, TypeError) as exc:
        return [f"{query.where}: {exc}"]
    out = []

    def labels_of(s: Selector) -> set[str]:
        return scraped.get(s.name, set()) | target_labels

    for s in sels:
        if s.name not in scraped:
            out.append(f"{query.where}: no series {s.name} in the scrape")
        elif missing := s.labels - labels_of(s):
            out.append(f"{query.where}: {s.name} has no label {', '.join(sorted(missing))}")
    for g in groups:
        for s in g.selectors:
            if s.name in scraped and (missing := g.labels - labels_of(s) - g.made):
                out.append(f"{query.where}: {g.what} ({', '.join(sorted(missing))}) over {s.name}, "
                           f"which has no such label")
    if query.label is not None:
        among = [labels_of(s) for s in sels] or [set(target_labels).union(*scraped.values())]
        if not all(query.label in labels for labels in among):
            out.append(f"{query.where}: label_values of {query.label}, which the series do not carry")
    return list(dict.fromkeys(out))  # one report per problem, however often the query repeats it
