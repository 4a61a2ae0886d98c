"""``status.rollout`` as the decision function sees it: ``RolloutState``, its phases, and the one
transition every weight change goes through (``start_step``).

Pure. The state lives in the BatonDeployment's status, not in the operator's memory, so an operator
restarted mid-rollout resumes at the same step with the same baseline. ``to_status`` and
``from_status`` are inverse; a status written by an older operator (no per-sidecar baseline) loads too.

Phases::

    none, or a new revision ──start──► Progressing    (Promoted at once when the first step is 100)
                            ──start──► Shadowing      with spec.rollout.shadow: weight 0, mirroring
    Shadowing ──► Progressing                          the paired verdict passed: the first step
    Shadowing ──► RolledBack                           verdict worse (failureThreshold), or maxDurationSeconds
    Progressing, Shadowing ◄──► Paused                 spec.rollout.paused
    Progressing ──► AwaitingApproval ──► next step     manualGates, approvedWeight
    Progressing, AwaitingApproval ──► Promoted         the last step passed: final
    Progressing ──► RolledBack                         failureThreshold reached: final for the revision
    any ──► Aborted ──► start again                    spec.rollout.abort set, then cleared
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

from baton_operator.rollout.measurement import Baseline
from baton_operator.rollout.times import from_iso, iso

PROGRESSING, PAUSED, AWAITING_APPROVAL = "Progressing", "Paused", "AwaitingApproval"
SHADOWING = "Shadowing"
PROMOTED, ROLLED_BACK, ABORTED = "Promoted", "RolledBack", "Aborted"
ACTIVE_PHASES = (SHADOWING, PROGRESSING, PAUSED, AWAITING_APPROVAL)  # traffic still shifting
FAILED_PHASES = (ROLLED_BACK, ABORTED)  # weight 0, Degraded
FINAL_PHASES = (PROMOTED, ROLLED_BACK)  # nothing moves until a new revision

HISTORY_LIMIT = 20  # weight changes kept in status.rollout.history

# ShadowState.outcome: the stage is on, or how it ended (kept as the record until a new revision).
RUNNING, PASSED, FAILED, CANCELLED = "running", "passed", "failed", "cancelled"


@dataclass(frozen=True)
class ShadowState:
    """``status.rollout.shadow``: the shadow stage, and its pairs and verdict as of the last analysis."""

    percent: float
    outcome: str = RUNNING  # CANCELLED: aborted, or spec.rollout.shadow removed mid-stage
    pairs: int = 0
    verdict: str | None = None  # None: not analysed yet
    basis: str = ""

    @classmethod
    def from_status(cls, d: Any) -> "ShadowState | None":
        if not isinstance(d, Mapping) or not isinstance(d.get("percent"), (int, float)):
            return None
        return cls(percent=d["percent"], outcome=d.get("outcome") or RUNNING, pairs=int(d.get("pairs") or 0),
                   verdict=d.get("verdict"), basis=d.get("basis") or "")

    def to_status(self) -> dict[str, Any]:
        return {"percent": self.percent, "outcome": self.outcome, "pairs": self.pairs, "verdict": self.verdict,
                "basis": self.basis}


@dataclass(frozen=True)
class RolloutState:
    """``status.rollout`` as the decision function sees it."""

    revision: str | None = None
    phase: str | None = None
    step: int = 0
    weight: float | None = None
    step_started_at: float | None = None  # when the step's weight was written
    applied_at: float | None = None  # when every sidecar reported the weight (None: not yet)
    baseline: Baseline | None = None  # per sidecar: where the step started
    failures: int = 0  # failed analyses since the last passing one (inconclusive ones don't reset)
    last_analysis_at: float | None = None
    message: str = ""
    history: tuple[Mapping[str, Any], ...] = ()  # {weight, action, time}, the last HISTORY_LIMIT
    shadow: ShadowState | None = None  # the revision's shadow stage (None: it has none)

    @property
    def shadowing(self) -> bool:
        """In the shadow stage (also while paused in it): mirroring on, weight 0."""
        return self.shadow is not None and self.shadow.outcome == RUNNING and self.phase in ACTIVE_PHASES

    @property
    def shadow_percent(self) -> float:
        """``router.shadow_percent`` for the ConfigMap: the stage's share while in it, else 0."""
        return self.shadow.percent if self.shadowing and self.shadow is not None else 0

    @classmethod
    def from_status(cls, data: Mapping[str, Any] | None) -> "RolloutState":
        d = dict(data or {})
        return cls(
            revision=d.get("revision"), phase=d.get("phase"), step=int(d.get("step") or 0),
            weight=d.get("weight"), step_started_at=from_iso(d.get("stepStartedAt")),
            applied_at=from_iso(d.get("weightAppliedAt")), baseline=Baseline.from_status(d.get("baseline")),
            failures=int(d.get("failedAnalyses") or 0), last_analysis_at=from_iso(d.get("lastAnalysisTime")),
            message=d.get("message") or "", history=tuple(d.get("history") or ()),
            shadow=ShadowState.from_status(d.get("shadow")))

    def to_status(self) -> dict[str, Any]:
        out = {
            "revision": self.revision, "phase": self.phase, "step": self.step, "weight": self.weight,
            "stepStartedAt": iso(self.step_started_at), "weightAppliedAt": iso(self.applied_at),
            "baseline": self.baseline.to_status() if self.baseline else None,
            "failedAnalyses": self.failures, "lastAnalysisTime": iso(self.last_analysis_at),
            "message": self.message, "history": [dict(h) for h in self.history],
        }
        if self.shadow is not None:  # absent, not null, without a shadow stage: statuses as before
            out["shadow"] = self.shadow.to_status()
        return out


def start_step(state: RolloutState, step: int, weight: float, phase: str, action: str, message: str,
               now: float, shadow_percent: float = 0) -> RolloutState:
    """A new weight (or mirroring share): the step's clock, baseline and failure count start afresh; the
    history records it. ``state.shadow`` is the caller's: it starts the stage, and ends it with how it ended."""
    entry: dict[str, Any] = {"weight": weight, "action": action, "time": iso(now)}
    if shadow_percent:
        entry["shadowPercent"] = shadow_percent
    return replace(state, phase=phase, step=step, weight=weight, step_started_at=now, applied_at=None,
                   baseline=None, failures=0, message=message, history=(*state.history, entry)[-HISTORY_LIMIT:])


def end_shadow(state: RolloutState, outcome: str) -> RolloutState:
    """The shadow stage, if still running, ended with ``outcome`` (kept as the revision's record)."""
    if state.shadow is None or state.shadow.outcome != RUNNING:
        return state
    return replace(state, shadow=replace(state.shadow, outcome=outcome))
