"""The gates one analysis applies to a step's figures: samples, error rate, p95 latency, TTFT and
(optionally) SLA attainment, each a ``Check`` that passes, fails, is inconclusive or is skipped; and the
shadow stage's one gate on the sidecars' paired verdicts (``shadow_check``).

Pure. Latency gates compare p95 with confidence intervals: Baton passes when the upper bound of the 95%
CI of ``p95(baton) - p95(incumbent)`` is within the margin (``margin% x p95(incumbent)``), fails when
even the lower bound exceeds it, else the check is inconclusive. A margin of 0 asks Baton to be
demonstrably no slower. The CI of the difference combines the arms' half-widths as independent errors:
``baton_sidecar.stats.compare``, the comparison the sidecar's ``/baton/ab/report`` verdicts use too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from baton_sidecar import stats
from baton_sidecar.stats import Estimate

from baton_operator.rollout.measurement import ARMS, Arm
from baton_operator.rollout.paired import PASSING, WORSE, PairedView
from baton_operator.rollout.spec import RolloutSpec

PASS, FAIL, WAIT, SKIP = "pass", "fail", "inconclusive", "skipped"


@dataclass(frozen=True)
class Check:
    name: str
    result: str  # PASS, FAIL, WAIT (inconclusive) or SKIP
    detail: str

    def to_status(self) -> dict[str, Any]:
        return {"name": self.name, "result": self.result, "detail": self.detail}


def overall(checks: Iterable[Check]) -> str:
    """FAIL if any check failed, else WAIT if any is inconclusive, else PASS."""
    results = {c.result for c in checks}
    return FAIL if FAIL in results else WAIT if WAIT in results else PASS


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def latency_check(name: str, baton: Estimate | None, incumbent: Estimate | None, margin_pct: float,
                  min_samples: int) -> Check:
    """Pass when the CI of p95(baton) - p95(incumbent) lies within the margin, fail when it lies beyond."""
    if baton is None or incumbent is None or min(baton.n, incumbent.n) < min_samples:
        nb, ni = (baton.n if baton else 0), (incumbent.n if incumbent else 0)
        return Check(name, WAIT, f"too few latency samples (baton {nb}, incumbent {ni}, need {min_samples})")
    allowed = incumbent.value * margin_pct / 100.0
    c = stats.compare(baton, incumbent)  # the comparison /baton/ab/report's verdicts use too
    detail = (f"p95 baton {_ms(baton.value)} [{_ms(baton.low)}, {_ms(baton.high)}], incumbent "
              f"{_ms(incumbent.value)} [{_ms(incumbent.low)}, {_ms(incumbent.high)}]; difference "
              f"{_ms(c.difference)}, 95% CI [{_ms(c.lower)}, {_ms(c.upper)}]; allowed +{_ms(allowed)} "
              f"({margin_pct:g}%)")
    return Check(name, {stats.BETTER: PASS, stats.WORSE: FAIL}.get(c.verdict(allowed), WAIT), detail)


def evaluate(spec: RolloutSpec, weight: float, arms: Mapping[str, Arm]) -> list[Check]:
    """The gates for one analysis over this step's figures (``step_view``)."""
    if weight <= 0:
        return [Check("traffic", SKIP, "no traffic goes to Baton at 0%; nothing to compare")]
    new = {a: arms[a].requests for a in ARMS}
    samples = Check("samples", PASS if min(new.values()) >= spec.min_samples else WAIT,
                    f"requests this step: baton {new['baton']}, incumbent {new['incumbent']} "
                    f"(need {spec.min_samples} per arm)")
    if samples.result != PASS:
        return [samples]
    b, i = arms["baton"], arms["incumbent"]
    checks = [samples, error_check(b, spec.gates.max_error_rate),
              latency_check("p95Latency", b.e2e_p95, i.e2e_p95, spec.gates.p95_margin_pct, spec.min_samples),
              ttft_check(b, i, spec.gates.ttft_margin_pct, spec.min_samples)]
    if spec.gates.min_sla_attainment is not None:
        checks.append(sla_check(b, i, spec.gates.min_sla_attainment, spec.min_samples))
    return checks


def error_check(baton: Arm, max_error_rate: float) -> Check:
    """Baton's errors / requests this step (``baton.requests`` > 0: the samples check passed first)."""
    rate = baton.errors / baton.requests
    return Check("errorRate", PASS if rate <= max_error_rate else FAIL,
                 f"baton error rate {rate:.2%} ({baton.errors} of {baton.requests}); allowed {max_error_rate:.2%}")


def ttft_check(baton: Arm, incumbent: Arm, margin_pct: float, min_samples: int) -> Check:
    """The latency check on time to first token, skipped when either arm has too few TTFT samples."""
    b, i = baton.ttft_p95, incumbent.ttft_p95
    if b and i and min(b.n, i.n) >= min_samples:
        return latency_check("ttft", b, i, margin_pct, min_samples)
    return Check("ttft", SKIP, "too few time-to-first-token samples to compare (the incumbent's "
                               "TTFT is known only for streamed responses)")


def sla_check(baton: Arm, incumbent: Arm, minimum: float, min_samples: int) -> Check:
    """Baton meets ``minimum``, or does at least as well as the incumbent (the floor is then out of reach
    for the workload, not for Baton)."""
    if baton.sla_evaluated < min_samples:
        return Check("slaAttainment", WAIT, f"{baton.sla_evaluated} Baton requests judged against an SLA "
                                            f"(need {min_samples}; requests need an sla_class with targets)")
    att_b, att_i = baton.sla_attainment, incumbent.sla_attainment
    assert att_b is not None  # sla_evaluated >= min_samples >= 1
    vs = f", incumbent {att_i:.1%}" if att_i is not None else ""
    detail = f"SLA attainment baton {att_b:.1%}{vs}; required {minimum:.1%} or at least the incumbent's"
    ok = att_b >= minimum or (incumbent.sla_evaluated >= min_samples and att_i is not None and att_b >= att_i)
    return Check("slaAttainment", PASS if ok else FAIL, detail)


def shadow_check(view: PairedView, min_pairs: int) -> Check:
    """Pass with ``min_pairs`` pairs and a passing verdict (better, not_worse); fail on ``worse`` once there
    are ``min_pairs``; else inconclusive (too few pairs, or the sidecars have not decided)."""
    detail = f"{view.pairs} pairs (need {min_pairs}), verdict {view.verdict}: {view.basis}"
    if view.pairs < min_pairs:
        return Check("pairedVerdict", WAIT, detail)
    return Check("pairedVerdict", PASS if view.verdict in PASSING else FAIL if view.verdict == WORSE else WAIT,
                 detail)
