"""Progressive rollout: step Baton's traffic weight from the sidecars' A/B reports. Pure, but for
``gather`` (HTTP); the kopf adapter is ``baton_operator.rollout_controller``.

One analysis per ``analysisIntervalSeconds`` reads every sidecar's ``GET /baton/ab/report``, merges the
pods' traffic of the current step and judges it against the gates; ``decide`` turns (spec, state in
status, measurement, now) into a ``Decision``: advance, promote, hold or roll back. An optional shadow
stage comes first (weight 0, the incumbent's requests mirrored to Baton), judged on the sidecars' paired
verdicts. The state lives in ``status.rollout``, so an operator restarted mid-rollout resumes at the same
step (or stage).

One job a module, in the order a tick uses them::

    spec         RolloutSpec.from_spec(spec.rollout); revision(spec)
    gather       sidecar URLs (EndpointSlices or annotation), measure() -> Measurement, engine_sample()
    paired       PairedReport (a report's paired block), PairedView (the sidecars' most cautious verdict)
    measurement  PodReport, Measurement, Baseline, step_view() -> StepView (per-arm figures, pooled p95)
    gates        evaluate() -> [Check] (samples, errorRate, p95Latency, ttft, slaAttainment); shadow_check()
    state        RolloutState <-> status.rollout (ShadowState in .shadow), phases, start_step()
    decide       wants_measurement(), decide() -> Decision
    record       rollout_status(): status.rollout after a decision (analysis, lastDecision)
    autotune     TuneState <-> status.rollout.autoTune, auto_tune() -> TuneResult, tuned_padding()
    times        iso() / from_iso(): the status's timestamps

Import from the modules. The package re-exports only what ``tests/test_stats.py`` (the statistics
module's own test, outside the operator's) reads as ``ro.<name>``.
"""

from baton_operator.rollout.gates import FAIL, PASS, WAIT, latency_check
from baton_operator.rollout.measurement import pooled_p95

__all__ = ["FAIL", "PASS", "WAIT", "latency_check", "pooled_p95"]
