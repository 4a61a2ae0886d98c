"""The rollout's other pure parts: the ConfigMap weight patch, where reports come from, status conditions,
metric parsing, auto-tune, and the operator settings."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

import rollout_testlib  # noqa: F401  (sys.path)

from baton_operator import configmap as cm
from baton_operator import resources as res
from baton_operator.config import OperatorConfig
from baton_operator.policy import DEFAULT_POLICY
from baton_operator.rollout.autotune import EngineSample, TuneState, auto_tune, tuned_padding
from baton_operator.rollout.decide import decide
from baton_operator.rollout.gather import (ANN_REPORT_URLS, endpoint_report_urls, engine_sample, metric_sum,
                                           report_urls_from_annotation, service_name)
from baton_operator.rollout.spec import AutoTuneSpec, Bounds, RolloutSpec
from baton_operator.rollout.state import (ABORTED, AWAITING_APPROVAL, PAUSED, PROGRESSING, PROMOTED, ROLLED_BACK,
                                          SHADOWING, RolloutState)
from baton_operator.rollout.times import iso
from baton_operator.status import (DeploymentProgress, Observation, Problem, build_status, conditions_for, phase_of,
                                   traffic_conditions_stale)

BD = {"apiVersion": res.API_VERSION, "kind": res.KIND,
      "metadata": {"name": "b", "namespace": "ns", "uid": "u-1", "generation": 1},
      "spec": {"mode": "standalone", "router": {"incumbentUrl": "http://inc:8000"}, "rollout": {"steps": [5, 100]}}}


def observed_config_map(weight: float, shadow: float = 0) -> dict:
    config = cm.sidecar_config(DEFAULT_POLICY, cm.router_config(BD["spec"], "http://inc:8000", weight, shadow))
    config_map = cm.desired_config_map(BD, config, "hash")
    config_map["metadata"]["resourceVersion"] = "42"
    return config_map


def patched(config_map: dict, patch: dict) -> dict:
    """``config_map`` after the merge patch (data replaced, annotations merged)."""
    annotations = {**config_map["metadata"]["annotations"], **patch["metadata"]["annotations"]}
    return {**config_map, "data": patch["data"], "metadata": {**config_map["metadata"], "annotations": annotations}}


@pytest.mark.parametrize("before, after", [
    ((5, 0), (25, 0)),  # a weight step
    ((0, 0), (0, 20)),  # the shadow stage starts: weight 0, 20% mirrored
    ((0, 20), (10, 0)),  # it passed: mirroring off (the key left out), the first step
])
def test_traffic_patch_changes_only_the_shares_and_the_reconciler_sees_nothing_to_undo(before, after) -> None:
    config_map = observed_config_map(*before)
    patch = cm.config_map_traffic_patch(config_map, *after)
    assert patch["metadata"]["resourceVersion"] == "42"  # conditional on what was read
    done = patched(config_map, patch)
    old, now = cm.parse_config(config_map), cm.parse_config(done)
    assert (now["router"]["baton_weight"], cm.config_weight(done), cm.config_shadow(done)) == (after[0], *after)
    assert ("shadow_percent" in now["router"]) == (after[1] > 0)  # 0: left out, as older sidecars expect
    traffic = ("baton_weight", "shadow_percent")
    assert now["policy"] == old["policy"] and {k: v for k, v in now["router"].items() if k not in traffic} \
        == {k: v for k, v in old["router"].items() if k not in traffic}
    # What reconcile would build now (it keeps the ConfigMap's shares while spec.rollout is set).
    weight = cm.desired_weight(BD["spec"], "http://inc:8000", cm.config_weight(done))
    shadow = cm.desired_shadow(BD["spec"], "http://inc:8000", cm.config_shadow(done))
    desired = cm.desired_config_map(BD, cm.sidecar_config(DEFAULT_POLICY, cm.router_config(
        BD["spec"], "http://inc:8000", weight, shadow)), "hash")
    assert res.update_body(desired, done) is None


def test_the_shadow_share_without_a_rollout_is_spec_router_shadow_percent() -> None:
    spec = {"router": {"shadowPercent": 30}}
    assert cm.desired_shadow(spec, "http://inc:8000", 0) == 30
    assert cm.desired_shadow(spec, None, 0) == 0  # no incumbent: nothing to mirror
    assert cm.desired_shadow({**spec, "rollout": {}}, "http://inc:8000", 0) == 30  # an empty rollout is none
    assert cm.desired_shadow({**spec, "rollout": {"steps": [5]}}, "http://inc:8000", 12) == 12  # the controller's
    assert cm.router_config(spec, "http://inc:8000", 0, 30)["shadow_percent"] == 30
    assert "shadow_percent" not in cm.router_config(spec, "http://inc:8000", 0)


def test_report_urls_from_endpoint_slices() -> None:
    slices = [
        {"addressType": "IPv4", "endpoints": [
            {"addresses": ["10.0.0.2"], "conditions": {"ready": True}},
            {"addresses": ["10.0.0.3"], "conditions": {"ready": False}},  # not ready: left out
            {"addresses": ["10.0.0.4"]}]},  # readiness unknown counts as ready (the API's own rule)
        {"addressType": "IPv6", "endpoints": [{"addresses": ["fd00::5"], "conditions": {"ready": True}}]},
        {"addressType": "FQDN", "endpoints": [{"addresses": ["x.example"]}]},
    ]
    assert endpoint_report_urls(slices, 8080) == ["http://10.0.0.2:8080", "http://10.0.0.4:8080",
                                                  "http://[fd00::5]:8080"]
    assert service_name(BD) == "b"
    sidecar = {"metadata": {"name": "b"}, "spec": {"mode": "sidecar", "targetDeployment": "llm"}}
    assert service_name(sidecar) == "llm"
    assert service_name({**sidecar, "spec": {**sidecar["spec"], "targetService": "svc"}}) == "svc"


def test_report_urls_annotation() -> None:
    bd = {"metadata": {"annotations": {ANN_REPORT_URLS: "http://127.0.0.1:1/, http://127.0.0.1:2"}}}
    assert report_urls_from_annotation(bd) == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    assert report_urls_from_annotation({"metadata": {}}) is None


DONE = DeploymentProgress(True, "DeploymentAvailable", "ok")


@pytest.mark.parametrize("traffic, phase, conditions", [
    (None, "Ready", {"Ready": ("True", "DeploymentAvailable"), "Progressing": ("False", "DeploymentAvailable"),
                     "Degraded": ("False", "AsExpected")}),
    ("Progressing", "Progressing", {"Progressing": ("True", "TrafficShifting"), "Degraded": ("False", "AsExpected")}),
    ("AwaitingApproval", "Progressing", {"Progressing": ("True", "TrafficShifting")}),
    ("Shadowing", "Progressing", {"Progressing": ("True", "TrafficShifting"), "Degraded": ("False", "AsExpected")}),
    ("Promoted", "Ready", {"Ready": ("True", "DeploymentAvailable"), "Progressing": ("False", "Promoted")}),
    ("RolledBack", "Degraded", {"Ready": ("True", "DeploymentAvailable"), "Degraded": ("True", "RolledBack")}),
    ("Aborted", "Degraded", {"Degraded": ("True", "Aborted")}),
])
def test_conditions_follow_the_rollout_phase(traffic, phase, conditions) -> None:
    rollout = {"phase": traffic, "message": "m"} if traffic else None
    obs = Observation(3, progress=DONE)
    assert phase_of(obs, rollout) == phase
    got = {c["type"]: (c["status"], c["reason"]) for c in conditions_for(obs, rollout)}
    assert {k: got[k] for k in conditions} == conditions
    status = build_status(obs, {"rollout": rollout} if rollout else None, now="T")
    assert status["phase"] == phase and not traffic_conditions_stale({**status, "rollout": rollout})


def test_a_blocking_problem_still_wins_and_stale_conditions_are_noticed() -> None:
    obs = Observation(3, problem=Problem("TargetNotFound", "gone"))
    assert phase_of(obs, {"phase": "RolledBack"}) == "Degraded"
    degraded = next(c for c in conditions_for(obs, {"phase": "RolledBack"}) if c["type"] == "Degraded")
    assert degraded["reason"] == "TargetNotFound"
    before = build_status(Observation(3, progress=DONE), {"rollout": {"phase": "Progressing"}}, now="T")
    assert traffic_conditions_stale({**before, "rollout": {"phase": "RolledBack"}})
    assert traffic_conditions_stale({**before, "rollout": {"phase": "Promoted"}})
    assert not traffic_conditions_stale({**before, "rollout": {"phase": "Paused"}})


METRICS = """# HELP baton_engine_padding_ratio Masked / all KV slots in the running batch
# TYPE baton_engine_padding_ratio gauge
baton_engine_padding_ratio 0.6
baton_tokens_total{arm="baton",kind="completion"} 1200.0
baton_tokens_total{arm="baton",kind="prompt"} 900.0
baton_tokens_total{arm="incumbent",kind="completion"} 5000.0
"""


def test_metric_parsing() -> None:
    assert metric_sum(METRICS, "baton_tokens_total", {"arm": "baton", "kind": "completion"}) == 1200.0
    assert metric_sum(METRICS, "baton_tokens_total", {"kind": "completion"}) == 6200.0
    assert metric_sum(METRICS, "nope") is None
    sample = engine_sample([METRICS, METRICS.replace("0.6", "0.2")], 100.0)
    assert sample == EngineSample(pytest.approx(0.4), 2400.0, 100.0)
    assert engine_sample(["garbage"], 1.0) is None
    assert (sample.kv_slots, sample.kv_padding_slots) == (None, None)  # older sidecars: no counters
    counters = METRICS + "baton_engine_kv_slots_total 1000.0\nbaton_engine_kv_padding_slots_total 250.0\n"
    both = engine_sample([counters, counters], 100.0)
    assert (both.kv_slots, both.kv_padding_slots) == (2000.0, 500.0)
    assert engine_sample([counters, METRICS], 100.0).kv_slots is None  # summed only when every pod has them


TUNE = AutoTuneSpec(enabled=True, max_padding_ratio=Bounds(0.6, 0.95), step=0.1)


def tune_rounds(samples, cap=0.9):
    """Run auto_tune over (padding ratio, tokens) samples 10 s apart, from ``maxPaddingRatio`` ``cap``; each
    round reads the state back from the status the last one wrote, as the controller does."""
    state, results = None, []
    for i, (padding, tokens) in enumerate(samples):
        result = auto_tune(TUNE, {"maxPaddingRatio": cap}, state, EngineSample(padding, tokens, 1000.0 + 10 * i))
        state = TuneState.from_status(json.loads(json.dumps(result.status)))
        results.append(result)
    return results


def steady(padding, rounds):
    return [(padding, 100 * i) for i in range(rounds)]  # 10 tokens/s throughout


def test_auto_tune_lowers_the_cap_while_padding_sits_at_it_and_records_every_change() -> None:
    # 1st round: no throughput yet. Then padding 0.85 is within a step of the cap 0.9: one step down,
    # checked the round after (throughput held), and so on, never below the bound 0.6.
    results = tune_rounds(steady(0.85, 9))
    assert results[0].change is None
    changes = [r.change for r in results if r.change]
    assert [(c.knob, c.from_, c.to) for c in changes] == [
        ("maxPaddingRatio", 0.9, 0.8), ("maxPaddingRatio", 0.8, 0.7), ("maxPaddingRatio", 0.7, 0.6)]
    assert all(r.change is None for r in results[2::2])  # verdict rounds move nothing
    assert all(set(r.values) == {"maxPaddingRatio"} for r in results)  # compactionThreshold is not tuned
    assert results[-1].status["changes"] == [c.to_status() for c in changes]
    assert all("at the admission cap" in c.reason for c in changes)
    assert tuned_padding({"autoTune": {"enabled": True}}, {"autoTune": results[-1].status}) == {
        "max_padding_ratio": 0.6}
    assert tuned_padding({"autoTune": {"enabled": False}}, {"autoTune": results[-1].status}) == {}


def test_auto_tune_raises_the_cap_back_while_padding_is_well_under_it() -> None:
    # Padding 0.2, more than three steps under a lowered cap of 0.7: back up to the bound 0.95, and a
    # raise is never undone by the next round at the same padding.
    results = tune_rounds(steady(0.2, 9), cap=0.7)
    ups = [(c.from_, c.to) for r in results if (c := r.change)]
    assert ups == [(0.7, 0.8), (0.8, 0.9), (0.9, 0.95)]
    assert all("well under the admission cap" in r.change.reason for r in results if r.change)
    assert results[-1].values == {"maxPaddingRatio": 0.95}


def test_auto_tune_leaves_the_cap_alone_between_the_two_rules() -> None:
    # Under the cap by more than one step, but not by more than three: nothing moves either way.
    for padding, cap in ((0.65, 0.9), (0.75, 0.9), (0.45, 0.75)):
        results = tune_rounds(steady(padding, 5), cap=cap)
        assert all(r.change is None for r in results), (padding, cap)
        assert results[-1].values == {"maxPaddingRatio": cap}


def test_auto_tune_does_not_raise_the_cap_while_throughput_falls() -> None:
    # 10 tokens/s, a raise kept, then 5 tokens/s (falling, no nudge pending): hold; steady at 5: raise.
    results = tune_rounds([(0.2, 0), (0.2, 100), (0.2, 200), (0.2, 250), (0.2, 300)], cap=0.7)
    assert results[1].change.to == 0.8 and results[2].change is None
    assert results[3].change is None and results[3].values["maxPaddingRatio"] == 0.8
    assert results[4].change.to == 0.9


def test_auto_tune_reverts_a_nudge_that_cost_throughput_and_does_not_retry_it() -> None:
    # Throughput 10 tokens/s, then after the nudge only 5: undone, and that direction is blocked.
    results = tune_rounds([(0.85, 0), (0.85, 100), (0.85, 150), (0.85, 250), (0.85, 350), (0.2, 450)])
    first, revert = results[1].change, results[2].change
    assert (first.knob, first.to) == ("maxPaddingRatio", 0.8)
    assert revert.to == 0.9 and revert.reason.startswith("reverted")
    assert results[2].values["maxPaddingRatio"] == 0.9
    assert results[-1].status["blocked"] == ["maxPaddingRatio:down"]
    assert results[3].change is None and results[4].change is None  # still at the cap, not lowered again
    assert results[5].change.to == 0.95  # the other direction is still open


def test_auto_tune_makes_no_nudge_in_an_idle_round_and_never_stalls_on_one() -> None:
    # No tokens in rounds 1-2 (idle): nothing moves. Traffic in round 3: the cap comes down, is judged
    # in round 4 and comes down again in round 5; before the fix an idle round's nudge froze the tuner.
    results = tune_rounds([(0.85, 0), (0.85, 0), (0.85, 0), (0.85, 100), (0.85, 200), (0.85, 300)])
    assert [r.change for r in results[:3]] == [None, None, None]
    moves = [(r.change.from_, r.change.to) for r in results if r.change]
    assert moves == [(0.9, 0.8), (0.8, 0.7)]
    # A status written by an older operator with such a nudge pending (throughput_before 0) moves on.
    stuck = TuneState.from_status(json.loads(json.dumps(results[3].status)))
    stuck = dataclasses.replace(stuck, pending=dataclasses.replace(stuck.pending, throughput_before=0.0))
    again = auto_tune(TUNE, {"maxPaddingRatio": 0.9}, stuck, EngineSample(0.85, 500, 1100.0))
    assert again.state.pending is None and again.change is None
    after = auto_tune(TUNE, {"maxPaddingRatio": 0.9}, TuneState.from_status(json.loads(json.dumps(again.status))),
                      EngineSample(0.85, 600, 1110.0))
    assert after.change is not None and after.change.to == 0.7


def test_auto_tune_reads_the_padding_ratio_of_the_round_from_the_counters() -> None:
    # The gauge says 0.2 (an instant between batches), the counters say 0.85 over the round: the counters
    # win, so the cap comes down; the first round (no counters to compare with) reads the gauge.
    def sample(i, slots, padding):
        return EngineSample(0.2, 100.0 * i, 1000.0 + 10 * i, kv_slots=slots, kv_padding_slots=padding)

    first = auto_tune(TUNE, {"maxPaddingRatio": 0.9}, None, sample(0, 1000.0, 500.0))
    assert first.status["paddingRatioBasis"] == "gauge" and first.status["lastPaddingRatio"] == 0.2
    second = auto_tune(TUNE, {"maxPaddingRatio": 0.9}, first.state, sample(1, 3000.0, 2200.0))
    assert second.status["paddingRatioBasis"] == "counters" and second.status["lastPaddingRatio"] == 0.85
    assert second.change.to == 0.8 and second.change.padding_ratio == 0.85
    # Counters that went back (a sidecar restarted) or vanished (an older sidecar): the gauge again.
    for slots, padding in ((10.0, 1.0), (None, None)):
        third = auto_tune(TUNE, {"maxPaddingRatio": 0.9}, second.state, sample(2, slots, padding))
        assert third.status["paddingRatioBasis"] == "gauge" and third.status["lastPaddingRatio"] == 0.2
    # Without counters the gauge's 0.2 reads as well under the cap: the same rounds raise it instead.
    plain = tune_rounds(steady(0.2, 2))
    assert plain[1].change.to == 0.95 and plain[1].status["paddingRatioBasis"] == "gauge"


def test_auto_tune_drops_compaction_state_left_by_an_older_operator() -> None:
    # An older operator tuned compactionThreshold and left a nudge of it pending; throughput has fallen
    # since, which would have reverted it. Now: no revert, the knob and its blocks are gone.
    old = {"padding": {"compactionThreshold": 0.4, "maxPaddingRatio": 0.9}, "lastTokens": 0,
           "lastTime": iso(1000.0), "lastThroughput": 10.0, "blocked": ["compactionThreshold:up"],
           "pending": {"knob": "compactionThreshold", "from": 0.5, "to": 0.4, "throughputBefore": 10.0},
           "changes": [{"knob": "compactionThreshold", "from": 0.5, "to": 0.4, "reason": "compact sooner"}]}
    assert tuned_padding({"autoTune": {"enabled": True}}, {"autoTune": old}) == {"max_padding_ratio": 0.9}
    result = auto_tune(TUNE, {"maxPaddingRatio": 0.9}, TuneState.from_status(old), EngineSample(0.7, 50, 1010.0))
    assert result.change is None and result.values == {"maxPaddingRatio": 0.9}
    assert result.status["padding"] == {"maxPaddingRatio": 0.9}
    assert result.status["pending"] is None and result.status["blocked"] == []
    assert result.status["changes"] == old["changes"]  # the history stays


def test_auto_tune_status_keeps_the_shape_older_operators_wrote_and_read() -> None:
    # status.rollout.autoTune after a nudge, exactly as the operator before the rollout package wrote it;
    # the typed state reads it back unchanged, so either operator resumes the other's tuning.
    nudge = {"time": "1970-01-01T00:16:50Z", "knob": "maxPaddingRatio", "from": 0.9, "to": 0.8, "paddingRatio": 0.85,
             "throughput": 10.0, "reason": "padding ratio 0.85 at the admission cap: hold back padding-heavy newcomers"}
    expected = {"padding": {"maxPaddingRatio": 0.8}, "lastTokens": 100, "lastTime": "1970-01-01T00:16:50Z",
                "lastPaddingRatio": 0.85, "paddingRatioBasis": "gauge", "lastKvSlots": None, "lastKvPaddingSlots": None,
                "lastThroughput": 10.0, "pending": {**nudge, "throughputBefore": 10.0}, "blocked": [],
                "changes": [nudge]}
    status = tune_rounds(steady(0.85, 2))[-1].status
    assert json.loads(json.dumps(status)) == expected
    assert TuneState.from_status(expected).to_status() == expected
    blocked = {**expected, "pending": None, "blocked": ["maxPaddingRatio:down"]}
    assert TuneState.from_status(blocked).to_status() == blocked


def test_operator_settings_for_the_rollout() -> None:
    cfg = OperatorConfig.from_env({"BATON_ROLLOUT_TICK_SECONDS": "0.5", "BATON_ROLLOUT_ALLOW_REPORT_URLS": "true",
                                   "BATON_ROLLOUT_REPORT_TIMEOUT_SECONDS": "3"})
    assert (cfg.rollout_tick_s, cfg.allow_report_urls, cfg.report_timeout_s) == (0.5, True, 3.0)
    assert OperatorConfig.from_env({}).allow_report_urls is False
    with pytest.raises(ValueError, match="BATON_ROLLOUT_TICK_SECONDS"):
        OperatorConfig.from_env({"BATON_ROLLOUT_TICK_SECONDS": "0"})


def test_status_rollout_fields_are_in_the_crd() -> None:
    crd = yaml.safe_load((rollout_testlib.ROOT / "manifests" / "crds" / "baton.dev_batondeployments.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["rollout"]
    state = decide(RolloutSpec.from_spec({"shadow": {}}), RolloutState(), "rev", 1000.0).state.to_status()
    written = set(state) | {"analysis", "lastDecision", "autoTune"}
    assert "shadow" in written and written <= set(schema["properties"]), written - set(schema["properties"])
    assert set(schema["properties"]["phase"]["enum"]) == {SHADOWING, PROGRESSING, PAUSED, AWAITING_APPROVAL,
                                                          PROMOTED, ROLLED_BACK, ABORTED}
    json.dumps(state)  # plain JSON
