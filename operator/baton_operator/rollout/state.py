"""``status.rollout`` as the decision function sees it: ``RolloutState``, its phases, and the one
transition every weight change goes through (``start_step``).

Pure. The state lives in the BatonDeployment's status, not in the operator's memory, so an operator
restarted mid-rollout resumes at the same step with the same baseline. ``to_status`` and
``from_status`` are inverse; a status written by an older operator (no per-sidecar baseline) loads too.

Phases::

    none, or a new revision ──start──► Progressing    (Promoted at once when the first step is 100)
    Progressing ◄──► Paused                            spec.rollout.paused
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
PROMOTED, ROLLED_BACK, ABORTED = "Promoted", "RolledBack", "Aborted"
ACTIVE_PHASES = (PROGRESSING, PAUSED, AWAITING_APPROVAL)  # traffic still shifting
FAILED_PHASES = (ROLLED_BACK, ABORTED)  # weight 0, Degraded
FINAL_PHASES = (PROMOTED, ROLLED_BACK)  # nothing moves until a new revision

HISTORY_LIMIT = 20  # weight changes kept in status.rollout.history


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
    failures: int = 0  # consecutive failed analyses
    last_analysis_at: float | None = None
    message: str = ""
    history: tuple[Mapping[str, Any], ...] = ()  # {weight, action, time}, the last HISTORY_LIMIT

    @classmethod
    def from_status(cls, data: Mapping[str, Any] | None) -> "RolloutState":
        d = dict(data or {})
        return cls(
            revision=d.get("revision"), phase=d.get("phase"), step=int(d.get("step") or 0),
            weight=d.get("weight"), step_started_at=from_iso(d.get("stepStartedAt")),
            applied_at=from_iso(d.get("weightAppliedAt")), baseline=Baseline.from_status(d.get("baseline")),
            failures=int(d.get("failedAnalyses") or 0), last_analysis_at=from_iso(d.get("lastAnalysisTime")),
            message=d.get("message") or "", history=tuple(d.get("history") or ()))

    def to_status(self) -> dict[str, Any]:
        return {
            "revision": self.revision, "phase": self.phase, "step": self.step, "weight": self.weight,
            "stepStartedAt": iso(self.step_started_at), "weightAppliedAt": iso(self.applied_at),
            "baseline": self.baseline.to_status() if self.baseline else None,
            "failedAnalyses": self.failures, "lastAnalysisTime": iso(self.last_analysis_at),
            "message": self.message, "history": [dict(h) for h in self.history],
        }


def start_step(state: RolloutState, step: int, weight: float, phase: str, action: str, message: str,
               now: float) -> RolloutState:
    """A new weight: the step's clock, baseline and failure count start afresh; the history records it."""
    entry = {"weight": weight, "action": action, "time": iso(now)}
    return replace(state, phase=phase, step=step, weight=weight, step_started_at=now, applied_at=None,
                   baseline=None, failures=0, message=message,
                   history=(*state.history, entry)[-HISTORY_LIMIT:])
