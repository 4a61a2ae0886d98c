"""The chart's Grafana dashboards: a ConfigMap per ``dashboards/*.json`` for Grafana's dashboard sidecar,
rendered only when asked for, carrying the sidecar's label and the file unchanged; and the dashboard
itself laid out as Grafana expects. (That its queries read only series the sidecar exports is
tests/server/test_server_dashboard_metrics.py, against a live scrape.)"""

from __future__ import annotations

import json

import kubernetes_validate
import pytest

from test_operator_helm import CHART, K8S_VERSIONS, helm_run, render

ON = ["--set", "grafana.dashboards.enabled=true"]
FILES = sorted((CHART / "dashboards").glob("*.json"))


def dashboards(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] == "ConfigMap" and "-dashboard-" in o["metadata"]["name"]]


def test_there_is_a_dashboard() -> None:
    assert [f.name for f in FILES] == ["baton.json"]


def test_off_by_default(helm) -> None:
    assert dashboards(render(helm)) == []


def test_a_config_map_per_dashboard_with_the_sidecars_label(helm) -> None:
    maps = dashboards(render(helm, *ON))
    assert [m["metadata"]["name"] for m in maps] == [f"baton-dashboard-{f.stem}" for f in FILES]
    for config_map, path in zip(maps, FILES):
        meta = config_map["metadata"]
        assert meta["namespace"] == "baton-system"
        assert meta["labels"]["grafana_dashboard"] == "1"
        assert meta["labels"]["app.kubernetes.io/part-of"] == "baton"
        assert "annotations" not in meta
        assert config_map["data"] == {path.name: path.read_text()}  # the file, byte for byte
        assert json.loads(config_map["data"][path.name]) == json.loads(path.read_text())
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(config_map, version, strict=True)


def test_label_namespace_and_annotations_are_the_values(helm) -> None:
    (config_map,) = dashboards(render(helm, *ON, "--set", "grafana.dashboards.label=example.com/dashboard",
                                      "--set-string", "grafana.dashboards.labelValue=yes",
                                      "--set", "grafana.dashboards.namespace=monitoring",
                                      "--set", "grafana.dashboards.annotations.grafana_folder=Baton"))
    meta = config_map["metadata"]
    assert meta["namespace"] == "monitoring"
    assert meta["labels"]["example.com/dashboard"] == "yes" and "grafana_dashboard" not in meta["labels"]
    assert meta["annotations"] == {"grafana_folder": "Baton"}


def test_lint_strict_with_dashboards_on(helm) -> None:
    helm_run(helm, "lint", "--strict", str(CHART), *ON, "--set", "grafana.dashboards.annotations.grafana_folder=Baton")


@pytest.mark.parametrize("values, complaint", [
    (["--set", "grafana.dashboards.enabled=yes"], "enabled"),
    (["--set", "grafana.dashboards.labelValue=1"], "labelValue"),  # a number: --set-string it
    (["--set", "grafana.dashboards.label=not a label"], "label"),
    (["--set", "grafana.dashboards.namespace=Monitoring"], "namespace"),
    (["--set", "grafana.dashboards.folder=Baton"], "folder"),
])
def test_values_schema_rejects_bad_dashboard_values(helm, values, complaint) -> None:
    proc = helm_run(helm, "template", "baton", str(CHART), *values, check=False)
    assert proc.returncode != 0, f"{values} was accepted"
    assert complaint in proc.stderr


# --- the dashboard's own shape --------------------------------------------------------------------------

@pytest.fixture(params=FILES, ids=[f.name for f in FILES])
def dashboard(request) -> dict:
    return json.loads(request.param.read_text())


def test_importable_anywhere(dashboard) -> None:
    """No data source of this cluster's baked in: every query goes through the `datasource` variable, so
    the file imports into any Grafana with a Prometheus data source."""
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    assert dashboard.get("id") is None and "__inputs" not in dashboard
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    source = {"type": "prometheus", "uid": "${datasource}"}
    queried = [p for p in dashboard["panels"] if p["type"] != "row"]
    for panel in queried:
        assert panel["datasource"] == source, panel["title"]
        assert panel["targets"] and all(t["datasource"] == source for t in panel["targets"]), panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]
    for name in ("namespace", "job", "pod"):
        assert variables[name]["datasource"] == source
    (rollout,) = [a for a in dashboard["annotations"]["list"] if not a.get("builtIn")]
    assert rollout["datasource"] == source and rollout["enable"] is True


def test_panels_tile_the_grid(dashboard) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(set(ids)) == len(ids)
    taken: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & taken, f'{panel["title"]} overlaps another panel'
        taken |= cells
