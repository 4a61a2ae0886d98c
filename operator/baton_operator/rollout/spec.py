"""``spec.rollout`` parsed: ``RolloutSpec`` (steps, timing, gates, the shadow stage, switches, auto-tune
bounds), and the revision of what is being rolled out.

Pure. ``RolloutSpec.from_spec`` fills the defaults of docs/operator.md and raises ``ValueError`` naming
the bad field (``spec.rollout.<field>``); the CRD schema refuses most of these first, this is the check
for objects applied without validation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from baton_operator.policy import policy_hash

DEFAULT_STEPS = (5, 10, 25, 50, 100)


@dataclass(frozen=True)
class Gates:
    p95_margin_pct: float = 10.0  # Baton's p95 e2e latency may exceed the incumbent's by this much
    ttft_margin_pct: float = 10.0
    max_error_rate: float = 0.01  # Baton's errors / requests during the step
    min_sla_attainment: float | None = None  # None: not checked


@dataclass(frozen=True)
class ShadowSpec:
    """The optional shadow stage before the first step: the sidecars mirror ``percent`` of the requests the
    incumbent serves to Baton (answers discarded) and report paired statistics, judged before any client
    gets a Baton answer."""

    percent: float = 100.0  # of the incumbent's requests, copied to Baton
    min_pairs: int = 100  # complete pairs over all sidecars before the verdict counts
    max_duration_s: float = 3600.0  # no passing verdict by then: rolled back


@dataclass(frozen=True)
class Bounds:
    low: float
    high: float


@dataclass(frozen=True)
class AutoTuneSpec:
    """Nudges ``padding.max_padding_ratio`` within bounds.

    ``padding.compaction_threshold`` is not tuned: it compares live KV slots with the allocated cache
    buffers (memory), not the batch's padding, so the padding ratio says nothing about it.
    ``spec.rollout.autoTune.compactionThreshold`` is still accepted, and ignored.
    """

    enabled: bool = False
    max_padding_ratio: Bounds = Bounds(0.6, 0.95)
    step: float = 0.05
    min_throughput_change: float = 0.05  # a nudge that cost more throughput than this is reverted


@dataclass(frozen=True)
class RolloutSpec:
    steps: tuple[int, ...] = DEFAULT_STEPS  # ascending, unique, always ending at 100
    pause_s: float = 0.0
    interval_s: float = 60.0
    min_samples: int = 50
    gates: Gates = Gates()
    shadow: ShadowSpec | None = None  # None: no shadow stage, the rollout starts at the first step
    failure_threshold: int = 3
    paused: bool = False
    abort: bool = False
    manual_gates: frozenset[int] = frozenset()  # steps that need approvedWeight >= step to enter
    approved_weight: int = 0
    attempt: int = 0
    auto_tune: AutoTuneSpec = AutoTuneSpec()

    @classmethod
    def from_spec(cls, rollout: Mapping[str, Any] | None) -> "RolloutSpec":
        """Parse ``spec.rollout`` (camelCase), filling defaults; ``ValueError`` names the bad field."""
        r = dict(rollout or {})
        steps, gates = _steps(r.get("steps") or DEFAULT_STEPS), _gates(r.get("gates") or {})  # checked first
        return cls(
            steps=steps,
            pause_s=_number("pauseSeconds", r.get("pauseSeconds", 0), 0, None),
            interval_s=_number("analysisIntervalSeconds", r.get("analysisIntervalSeconds", 60), 0.001, None),
            min_samples=int(_number("minSamplesPerArm", r.get("minSamplesPerArm", 50), 1, None)),
            gates=gates,
            shadow=_shadow(r.get("shadow")),
            failure_threshold=int(_number("failureThreshold", r.get("failureThreshold", 3), 1, None)),
            paused=bool(r.get("paused", False)),
            abort=bool(r.get("abort", False)),
            manual_gates=frozenset(int(_number("manualGates", w, 0, 100)) for w in r.get("manualGates") or ()),
            approved_weight=int(_number("approvedWeight", r.get("approvedWeight", 0), 0, 100)),
            attempt=int(_number("attempt", r.get("attempt", 0), 0, None)),
            auto_tune=_auto_tune(r.get("autoTune") or {}),
        )


def _number(name: str, value: Any, low: float | None, high: float | None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"spec.rollout.{name}: must be a number, not {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"spec.rollout.{name}: {value} is outside [{low}, {high if high is not None else 'inf'}]")
    return value


def _integer(name: str, value: Any, low: int) -> int:
    number = _number(name, value, low, None)
    if number != int(number):
        raise ValueError(f"spec.rollout.{name}: must be a whole number, not {value!r}")
    return int(number)


def _steps(given: Any) -> tuple[int, ...]:
    """Ascending percentages, duplicates dropped, 100 appended if missing."""
    steps = [_number("steps", s, 0, 100) for s in given]
    if any(b < a for a, b in zip(steps, steps[1:])):
        raise ValueError("spec.rollout.steps: must be in ascending order")
    unique = tuple(dict.fromkeys(int(s) for s in steps))
    return unique if unique[-1] == 100 else unique + (100,)


def _gates(g: Mapping[str, Any]) -> Gates:
    return Gates(
        p95_margin_pct=_number("gates.p95LatencyMarginPct", g.get("p95LatencyMarginPct", 10.0), 0, 1000),
        ttft_margin_pct=_number("gates.ttftMarginPct", g.get("ttftMarginPct", 10.0), 0, 1000),
        max_error_rate=_number("gates.maxErrorRate", g.get("maxErrorRate", 0.01), 0, 1),
        min_sla_attainment=(None if g.get("minSlaAttainment") is None else
                            _number("gates.minSlaAttainment", g["minSlaAttainment"], 0, 1)))


def _shadow(s: Any) -> ShadowSpec | None:
    if s is None:
        return None
    if not isinstance(s, Mapping):
        raise ValueError(f"spec.rollout.shadow: must be an object with percent, minPairs and maxDurationSeconds, "
                         f"not {s!r}")
    d = ShadowSpec()
    percent = _number("shadow.percent", s.get("percent", d.percent), 0, 100)
    if percent <= 0:  # 0 would mirror nothing, so the stage could never pass
        raise ValueError("spec.rollout.shadow.percent: must be above 0 (remove spec.rollout.shadow to skip the "
                         "shadow stage)")
    return ShadowSpec(percent=percent, min_pairs=_integer("shadow.minPairs", s.get("minPairs", d.min_pairs), 1),
                      max_duration_s=_integer("shadow.maxDurationSeconds",
                                              s.get("maxDurationSeconds", d.max_duration_s), 1))


def _auto_tune(t: Mapping[str, Any]) -> AutoTuneSpec:
    d = AutoTuneSpec()

    def bounds(key: str, default: Bounds) -> Bounds:
        b = t.get(key) or {}
        low = _number(f"autoTune.{key}.min", b.get("min", default.low), 0, 1)
        high = _number(f"autoTune.{key}.max", b.get("max", default.high), 0, 1)
        if low > high:
            raise ValueError(f"spec.rollout.autoTune.{key}: min {low} is above max {high}")
        return Bounds(low, high)

    return AutoTuneSpec(
        enabled=bool(t.get("enabled", False)),
        max_padding_ratio=bounds("maxPaddingRatio", d.max_padding_ratio),
        step=_number("autoTune.stepSize", t.get("stepSize", d.step), 0.001, 0.5),
        min_throughput_change=d.min_throughput_change,
    )


def revision(spec: Mapping[str, Any]) -> str:
    """What is being rolled out: the BatonDeployment's spec without the rollout's own switches (and the
    router's traffic shares), plus the steps and ``attempt``. A new revision starts the rollout again from
    the first stage. The shadow stage's settings are switches too: changing them mid-rollout restarts
    nothing."""
    candidate = {k: v for k, v in spec.items() if k != "rollout"}
    router = {k: v for k, v in (candidate.get("router") or {}).items() if k not in ("weight", "shadowPercent")}
    candidate["router"] = router
    rollout = spec.get("rollout") or {}
    candidate["rollout"] = {"steps": list(rollout.get("steps") or DEFAULT_STEPS), "attempt": rollout.get("attempt", 0)}
    return policy_hash(candidate)
