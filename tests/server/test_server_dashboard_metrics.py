"""The chart's Grafana dashboard reads only series a real sidecar exports, under labels it really puts on
them: every PromQL query of ``helm/baton/dashboards/baton.json`` (panels, annotations, variables) is
parsed and its series and label names are looked up in a live ``/baton/metrics`` scrape, read with
Prometheus' own parser, of a sidecar that has served both arms and met each failure the dashboard
counts. The name extraction (``promql_names``) is tested on its own first."""

from __future__ import annotations

import json
import socket

import pytest
import requests

from baton_sidecar.config import PolicyConfig, RouterConfig, ServerConfig
from baton_sidecar.server.app import init_app
from baton_sidecar.server.router import BATON, INCUMBENT
from baton_sidecar.server.tracing import Tracing
from promql_names import (Query, dashboard_queries, groupings, parse, problems, scraped_labels, selectors,
                          variable_query)
from server_helpers import MODEL_NAME, REPO, StubIncumbent

DASHBOARD = REPO / "helm" / "baton" / "dashboards" / "baton.json"
# Labels every scrape target gets, whichever of the chart's monitors found it: Prometheus' own (job,
# instance), and the Prometheus Operator's for ServiceMonitor and PodMonitor targets alike (a
# ServiceMonitor's `service` is left out: PodMonitor targets, the injected sidecars, have none).
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "container", "endpoint"})


# --- the extraction, without a model ---------------------------------------------------------------------

def names(expr: str) -> list[str]:
    return [s.name for s in selectors(parse(expr))]


@pytest.mark.parametrize("expr, expected", [
    # Functions, aggregations and Grafana's interval variable are not series.
    ('histogram_quantile(0.99, sum by (le, arm) (rate(baton_e2e_request_latency_seconds_bucket'
     '{namespace=~"$namespace", pod=~"$pod"}[$__rate_interval])))', ["baton_e2e_request_latency_seconds_bucket"]),
    # Keywords between operands, a subquery, offset and @, bool, unary minus.
    ("sum(rate(a_total[5m] offset 1h)) / ignoring (x) group_left (y) b > bool 0 and on (pod) c "
     "unless d or -max_over_time(e[10m:1m] @ end())", ["a_total", "b", "c", "d", "e"]),
    # String literals that look like series names, label names inside braces, a colon in a name.
    ('label_replace(vllm:num_requests_waiting{model_name="baton_fake_total"}, "dst_total", "$1", '
     '"model_name", "(baton_.*)")', ["vllm:num_requests_waiting"]),
    ('count_values("le", x) + topk(3, y{le="0.5"}) + {__name__="z_sum"}', ["x", "y", "z_sum"]),
    ("time() - 42 + vector(1) + scalar(w)", ["w"]),
    ("rate(a[$window])", None),  # a variable of the dashboard's own as a duration: rejected, not guessed
])
def test_selectors_are_the_series_and_nothing_else(expr, expected) -> None:
    if expected is None:
        with pytest.raises(ValueError):
            parse(expr)
    else:
        assert names(expr) == expected


def test_groupings_name_their_labels_and_series() -> None:
    got = {(g.what, tuple(sorted(g.labels)), tuple(s.name for s in g.selectors), tuple(sorted(g.made)))
           for g in groupings(parse('sum without (le) (a) * on (pod) group_left (node) '
                                    'count_values by (w) ("w", label_replace(b, "p", "$1", "q", "(.*)"))'))}
    assert got == {("sum without", ("le",), ("a",), ()),
                   ("on", ("pod",), ("a", "b"), ("p", "w")),
                   ("group_left", ("node",), ("b",), ("p", "w")),
                   ("count_values by", ("w",), ("b",), ("p",))}


def test_variable_queries_split_into_promql_and_label() -> None:
    assert variable_query("v", 'label_values(m{a=~"$x", b="1,2"}, pod)') == Query("v", 'm{a=~"$x", b="1,2"}', "pod")
    assert variable_query("v", "label_values(namespace)") == Query("v", "", "namespace")
    assert variable_query("v", "query_result(topk(5, m))") == Query("v", "topk(5, m)")
    with pytest.raises(ValueError):
        variable_query("v", "metrics(baton_.*)")


def test_grafana_variables_outside_label_values_are_refused() -> None:
    scraped = {"m": {"arm"}}
    assert problems(Query("q", 'sum by ($label) (m{arm=~"$arm"})'), scraped, TARGET_LABELS)
    assert problems(Query("q", '{__name__=~"$metric"}'), scraped, TARGET_LABELS)  # a name that can't be read
    assert problems(Query("q", 'sum by (arm) (rate(m{arm=~"$arm"}[$__rate_interval]))'), scraped, TARGET_LABELS) == []


def test_the_dashboard_is_read_whole() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = dashboard_queries(dashboard)
    targets = [t for p in dashboard["panels"] for t in p.get("targets", [])]
    variables = [v for v in dashboard["templating"]["list"] if v["type"] == "query"]
    assert len(queries) == len(targets) + len(variables) + 1  # + the rollout annotation
    for query in queries:
        parse(query.expr)  # every one parses, Grafana's variables included
    assert {q.label for q in queries if q.label} == {"namespace", "job", "pod"}


def test_every_panel_and_the_annotation_follow_the_variables() -> None:
    for query in dashboard_queries(json.loads(DASHBOARD.read_text())):
        if query.label is None:  # variables filter by the ones before them only
            for s in selectors(parse(query.expr)):
                assert {"namespace", "job", "pod"} <= s.labels, f"{query.where}: {s.name}"
                for name in ("namespace", "job", "pod"):
                    assert f'{name}=~"${name}"' in query.expr, query.where


# --- against a live scrape ------------------------------------------------------------------------------

def completion(url: str, session: str, **body) -> requests.Response:
    return requests.post(url + "/v1/completions", headers={"x-baton-session": session}, timeout=120,
                         json={"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 6,
                               "ignore_eos": True, "stream": True, **body})


@pytest.fixture(scope="module")
def scraped(server_thread, engine) -> dict[str, set[str]]:
    """``/baton/metrics`` of a sidecar splitting traffic with an incumbent after it has served both arms,
    relayed an ineligible request, and met an incumbent 5xx, an unreachable incumbent (a refusal) and a
    malformed HTTP request: each labelled series the dashboard reads has samples only after such events."""
    stub = StubIncumbent(server_thread)
    app = server_thread.run_sync(lambda: init_app(
        engine, ServerConfig(served_model_name=MODEL_NAME), RouterConfig(incumbent_url=stub.url, baton_weight=50),
        PolicyConfig(), tracing=Tracing(None)))
    runner, url = server_thread.start_app(app)
    stub_open = True
    try:
        arms: dict[str, str] = {}  # arm -> a session the router sends there
        for i in range(64):
            resp = completion(url, f"s{i}")
            assert resp.status_code == 200, resp.text
            arms.setdefault(resp.headers["x-baton-arm"], f"s{i}")
            if len(arms) == 2:
                break
        assert set(arms) == {BATON, INCUMBENT}
        assert completion(url, arms[BATON], model="another-model").status_code == 200  # ineligible: relayed
        stub.mode = "500"
        assert completion(url, arms[INCUMBENT]).status_code == 500
        stub.close()
        stub_open = False
        assert completion(url, arms[INCUMBENT], model="another-model").status_code == 502  # refused
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            assert b" 400 " in sock.recv(4096).split(b"\r\n")[0]  # answered by aiohttp's parser: bad_http
        text = requests.get(url + "/baton/metrics", timeout=10).text
    finally:
        server_thread.stop_app(runner)
        if stub_open:
            stub.close()
    return scraped_labels(text)


@pytest.mark.model
def test_every_dashboard_query_reads_only_scraped_series_and_labels(scraped) -> None:
    queries = dashboard_queries(json.loads(DASHBOARD.read_text()))
    found = [p for q in queries for p in problems(q, scraped, TARGET_LABELS)]
    assert found == []
    read = {s.name for q in queries if q.expr for s in selectors(parse(q.expr))}
    # The families the brief of the dashboard names are all on it (a panel can't silently go missing).
    assert {"baton_time_to_first_token_seconds_bucket", "baton_time_per_output_token_seconds_bucket",
            "baton_e2e_request_latency_seconds_bucket", "baton_request_queue_time_seconds_bucket",
            "baton_requests_total", "baton_incumbent_failures_total", "baton_request_refusals_total",
            "baton_http_rejections_total", "baton_engine_waiting_requests", "baton_engine_running_requests",
            "baton_engine_kv_usage_ratio", "baton_engine_padding_ratio", "baton_engine_kv_padding_slots_total",
            "baton_engine_kv_slots_total", "baton_engine_preemptions_total", "baton_router_baton_weight"} <= read


@pytest.mark.model
def test_a_made_up_series_or_label_fails_the_check(scraped) -> None:
    """The check can fail: a series the sidecar does not export, a label it does not put on a series it
    does, and a variable listing such a label are each reported."""
    def found(expr: str, label: str | None = None) -> list[str]:
        return problems(Query("q", expr, label), scraped, TARGET_LABELS)

    assert found('sum by (arm) (rate(baton_requests_total{namespace=~"$namespace"}[$__rate_interval]))') == []
    (made_up,) = found('sum by (arm) (rate(baton_requests_made_up_total{namespace=~"$namespace"}[$__rate_interval]))')
    assert "baton_requests_made_up_total" in made_up
    # A family the scrape declares but has no sample of (no configuration was reloaded) is not there.
    assert "baton_config_reloads_total" not in scraped and found("rate(baton_config_reloads_total[5m])")
    assert found("rate(baton_time_to_first_token_seconds[5m])")  # a histogram is read through _bucket/_sum/_count
    assert found("rate(baton_requests[5m])")  # a counter through _total
    (label,) = found("sum by (finish_reason) (rate(baton_incumbent_failures_total[5m]))")
    assert "finish_reason" in label
    assert found('baton_engine_kv_usage_ratio{arm="baton"}')
    assert found("baton_router_baton_weight", "arm") and not found("baton_router_baton_weight", "pod")
    assert found("histogram_quantile(0.5, sum by (le, service) (rate(baton_e2e_request_latency_seconds_bucket[5m])))")
