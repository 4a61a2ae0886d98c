"""Policy auto-tune: once per analysis interval while Baton takes traffic, nudge the sidecars'
``padding.max_padding_ratio`` (the admission cap on the batch's padding) by one step within its bounds,
from the round's padding ratio and throughput. Pure; the state is ``status.rollout.autoTune``
(``TuneState``), the reconciler lays the tuned values over the effective policy (``tuned_padding``).

One round (``auto_tune``)::

    sample (sidecars' /baton/metrics) ──► padding ratio of the round (KV slot counters, else the gauge)
                                      ──► throughput of the round (Baton's completion tokens / s)
    a nudge pending from the last round? ──► throughput fell > min_throughput_change: revert it, and
                                             block that direction; in any case the verdict is given
    else: padding ratio within one step of the cap ──► lower the cap by a step
          more than RAISE_MARGIN_STEPS under it, throughput not falling ──► raise it by a step

The rule is a heuristic on the round's mean padding ratio: a guard rail that keeps the cap where the
traffic puts it, not an optimiser.

Status shape (unchanged since the first auto-tuning operator, so an older status loads; entries for
knobs no longer tuned, ``compactionThreshold`` before, are dropped on load, the change history stays)::

    autoTune: {padding: {maxPaddingRatio: 0.85}, lastTokens, lastTime, lastPaddingRatio,
               paddingRatioBasis: counters | gauge, lastKvSlots, lastKvPaddingSlots, lastThroughput,
               pending: {<a change>, throughputBefore} | null, blocked: ["maxPaddingRatio:down"],
               changes: [{time, knob, from, to, paddingRatio, throughput, reason}, ...]}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from baton_operator.rollout.spec import AutoTuneSpec
from baton_operator.rollout.times import from_iso, iso

KNOBS = (("maxPaddingRatio", "max_padding_ratio"),)  # (status / custom resource, baton.yaml)
# The cap is raised only while the padding ratio sits more than this many steps under it: after the
# raise it is still two steps under the new cap, one clear of the rule that lowers it again.
RAISE_MARGIN_STEPS = 3
CHANGES_LIMIT = 20  # auto-tune changes kept in status.rollout.autoTune.changes
DOWN, UP = "down", "up"


@dataclass(frozen=True)
class EngineSample:
    """From the sidecars' /baton/metrics at ``time``: the padding-ratio gauge (mean over pods), the Baton
    arm's completion tokens, and the KV slot and padding-slot counters (summed over pods; None when some
    sidecar is too old to export them)."""

    padding_ratio: float
    completion_tokens: float
    time: float
    kv_slots: float | None = None
    kv_padding_slots: float | None = None


@dataclass(frozen=True)
class Nudge:
    """One change of a knob, as ``autoTune.changes`` records it (values rounded as stored)."""

    knob: str  # camelCase, one of KNOBS
    from_: float
    to: float
    reason: str
    time: float | None = None
    padding_ratio: float | None = None  # of the round that made it
    throughput: float | None = None  # tokens/s of that round (None: not known yet)

    @property
    def direction(self) -> str:
        return DOWN if self.to < self.from_ else UP

    def to_status(self) -> dict[str, Any]:
        return {"time": iso(self.time), "knob": self.knob, "from": self.from_, "to": self.to,
                "paddingRatio": self.padding_ratio, "throughput": self.throughput, "reason": self.reason}

    @classmethod
    def from_status(cls, d: Mapping[str, Any]) -> "Nudge":
        """``ValueError``/``KeyError``/``TypeError`` for a record without a knob and its two values."""
        return cls(knob=str(d["knob"]), from_=float(d["from"]), to=float(d["to"]), reason=str(d.get("reason") or ""),
                   time=from_iso(d.get("time")), padding_ratio=_number(d.get("paddingRatio")),
                   throughput=_number(d.get("throughput")))


@dataclass(frozen=True)
class Pending:
    """The last nudge, awaiting its verdict: the throughput of the round before it, to compare with."""

    nudge: Nudge
    throughput_before: float

    def to_status(self) -> dict[str, Any]:
        return {**self.nudge.to_status(), "throughputBefore": self.throughput_before}


@dataclass(frozen=True)
class TuneState:
    """``status.rollout.autoTune``, typed: the values in force and what the next round compares with."""

    padding: Mapping[str, float] = field(default_factory=dict)  # camelCase knob -> value in force
    last_tokens: float | None = None  # Baton's completion tokens at the last round (summed over pods)
    last_time: float | None = None  # when the last round read them
    last_padding_ratio: float | None = None
    padding_ratio_basis: str | None = None  # "counters" or "gauge"
    last_kv_slots: float | None = None  # the KV slot counters at the last round (None: not exported)
    last_kv_padding_slots: float | None = None
    last_throughput: float | None = None  # tokens/s over the last round
    pending: Pending | None = None
    blocked: frozenset[tuple[str, str]] = frozenset()  # (knob, direction) a reverted nudge went in
    changes: tuple[Mapping[str, Any], ...] = ()  # the history, as stored (older records kept verbatim)

    @classmethod
    def from_status(cls, d: Mapping[str, Any] | None) -> "TuneState":
        d = d or {}
        knobs = {camel for camel, _ in KNOBS}
        padding = d.get("padding") or {}
        return cls(
            padding={k: float(v) for k, v in padding.items() if k in knobs and _number(v) is not None},
            last_tokens=_number(d.get("lastTokens")), last_time=from_iso(d.get("lastTime")),
            last_padding_ratio=_number(d.get("lastPaddingRatio")), padding_ratio_basis=d.get("paddingRatioBasis"),
            last_kv_slots=_number(d.get("lastKvSlots")), last_kv_padding_slots=_number(d.get("lastKvPaddingSlots")),
            last_throughput=_number(d.get("lastThroughput")), pending=_pending(d.get("pending"), knobs),
            blocked=frozenset(b for b in map(_blocked, d.get("blocked") or ()) if b and b[0] in knobs),
            changes=tuple(d.get("changes") or ()))

    def to_status(self) -> dict[str, Any]:
        return {"padding": {k: round(v, 4) for k, v in self.padding.items()}, "lastTokens": self.last_tokens,
                "lastTime": iso(self.last_time), "lastPaddingRatio": self.last_padding_ratio,
                "paddingRatioBasis": self.padding_ratio_basis, "lastKvSlots": self.last_kv_slots,
                "lastKvPaddingSlots": self.last_kv_padding_slots, "lastThroughput": self.last_throughput,
                "pending": self.pending.to_status() if self.pending else None,
                "blocked": sorted(f"{knob}:{direction}" for knob, direction in self.blocked),
                "changes": [dict(c) for c in self.changes]}


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _pending(d: Any, knobs: set[str]) -> Pending | None:
    """A stored pending nudge; None when absent, unreadable, or of a knob no longer tuned."""
    if not isinstance(d, Mapping) or d.get("knob") not in knobs:
        return None
    try:
        return Pending(Nudge.from_status(d), float(d.get("throughputBefore") or 0.0))
    except (KeyError, TypeError, ValueError):
        return None


def _blocked(entry: Any) -> tuple[str, str] | None:
    knob, _, direction = str(entry).partition(":")
    return (knob, direction) if direction in (DOWN, UP) else None


@dataclass(frozen=True)
class TuneResult:
    values: Mapping[str, float]  # camelCase knob -> value now in force
    state: TuneState  # the new status.rollout.autoTune
    change: Nudge | None  # the nudge made now, if any

    @property
    def status(self) -> dict[str, Any]:
        return self.state.to_status()


def round_padding_ratio(sample: EngineSample, prev: TuneState) -> tuple[float, str]:
    """The padding ratio over the round since ``prev``: the increase of the padding-slot counter over
    that of the slot counter, exact over every decode step of the round; the instantaneous gauge when
    the counters are absent (older sidecars), new, or went back (a restart)."""
    slots, padding = prev.last_kv_slots, prev.last_kv_padding_slots
    if sample.kv_slots is not None and sample.kv_padding_slots is not None and slots is not None \
            and padding is not None and sample.kv_slots > slots and sample.kv_padding_slots >= padding:
        return (sample.kv_padding_slots - padding) / (sample.kv_slots - slots), "counters"
    return sample.padding_ratio, "gauge"


def round_throughput(sample: EngineSample, prev: TuneState) -> float | None:
    """Completion tokens per second since the last round; None in the first round or after a restart."""
    if prev.last_tokens is None or prev.last_time is None or sample.time <= prev.last_time \
            or sample.completion_tokens < prev.last_tokens:
        return None
    return (sample.completion_tokens - prev.last_tokens) / (sample.time - prev.last_time)


@dataclass(frozen=True)
class _Round:
    """What this round measured; every nudge made in it records it."""

    time: float
    padding_ratio: float
    throughput: float | None

    def nudge(self, knob: str, current: float, to: float, reason: str) -> Nudge:
        return Nudge(knob, round(current, 4), round(to, 4), reason, self.time, round(self.padding_ratio, 4),
                     round(self.throughput, 3) if self.throughput is not None else None)


def auto_tune(spec: AutoTuneSpec, current: Mapping[str, float], previous: TuneState | None,
              sample: EngineSample) -> TuneResult:
    """One tuning round: ``maxPaddingRatio`` moves by at most ``spec.step``, within its bounds. Pure.

    ``current`` holds the values in the ConfigMap, used for knobs ``previous`` has none of. A nudge
    that cost more than ``min_throughput_change`` of the throughput measured before it is undone, and
    the knob is then left alone in that direction. Otherwise: a padding ratio within one step of the
    admission cap lowers the cap (hold back padding-heavy newcomers); one more than
    ``RAISE_MARGIN_STEPS`` steps under it raises the cap back toward its upper bound (admit more
    freely), unless throughput fell over the last round.
    """
    prev = previous or TuneState()
    values = {camel: prev.padding.get(camel, float(current[camel])) for camel, _ in KNOBS}
    padding_ratio, basis = round_padding_ratio(sample, prev)
    throughput = round_throughput(sample, prev)
    now = _Round(sample.time, padding_ratio, throughput)
    pending, blocked, change = prev.pending, prev.blocked, None
    if pending is not None and throughput is not None:
        # A nudge made while nothing flowed (statuses of older operators may hold one) has no
        # throughput to be judged against: it stands, and the tuner moves on.
        if pending.throughput_before:
            change = _verdict(spec, pending, values, now, throughput)
            if change is not None:
                blocked = blocked | {(pending.nudge.knob, pending.nudge.direction)}
        pending = None
    elif pending is None and throughput:  # a round without output tokens tells nothing: no nudge
        change = _next_nudge(spec, values, now, throughput, prev.last_throughput, blocked)
        if change is not None:
            pending = Pending(change, throughput)
    if change is not None:
        values[change.knob] = change.to
    state = TuneState(
        padding=values, last_tokens=sample.completion_tokens, last_time=sample.time,
        last_padding_ratio=round(padding_ratio, 4), padding_ratio_basis=basis, last_kv_slots=sample.kv_slots,
        last_kv_padding_slots=sample.kv_padding_slots,
        last_throughput=round(throughput, 3) if throughput is not None else None,
        pending=pending, blocked=blocked,
        changes=(*prev.changes, change.to_status())[-CHANGES_LIMIT:] if change else prev.changes)
    return TuneResult(dict(values), state, change)


def _verdict(spec: AutoTuneSpec, pending: Pending, values: Mapping[str, float], now: _Round,
             after: float) -> Nudge | None:
    """The revert of the pending nudge if throughput (``after``) fell by more than ``min_throughput_change``."""
    before = pending.throughput_before
    if after >= before * (1 - spec.min_throughput_change):
        return None
    knob = pending.nudge.knob
    return now.nudge(knob, values[knob], pending.nudge.from_,
                     f"reverted: throughput fell from {before:.2f} to {after:.2f} tokens/s")


def _next_nudge(spec: AutoTuneSpec, values: Mapping[str, float], now: _Round, throughput: float,
                last_throughput: float | None, blocked: frozenset[tuple[str, str]]) -> Nudge | None:
    """Lower the cap while padding sits at it; raise it while padding is well under it and throughput holds."""
    mpr, bounds, p = values["maxPaddingRatio"], spec.max_padding_ratio, now.padding_ratio
    falling = last_throughput is not None and throughput < last_throughput * (1 - spec.min_throughput_change)
    options = [
        (p >= mpr - spec.step, max(bounds.low, mpr - spec.step),
         f"padding ratio {p:.2f} at the admission cap: hold back padding-heavy newcomers"),
        (p < mpr - RAISE_MARGIN_STEPS * spec.step and not falling, min(bounds.high, mpr + spec.step),
         f"padding ratio {p:.2f} well under the admission cap: admit more freely"),
    ]
    for wanted, to, reason in options:
        direction = DOWN if to < mpr else UP
        if wanted and abs(to - mpr) > 1e-9 and ("maxPaddingRatio", direction) not in blocked:
            return now.nudge("maxPaddingRatio", mpr, to, reason)
    return None


def tuned_padding(rollout_spec: Mapping[str, Any] | None, rollout_status: Mapping[str, Any] | None) -> dict[str, float]:
    """The auto-tuned padding knobs in config shape (snake_case), or {} when auto-tune is off."""
    if not ((rollout_spec or {}).get("autoTune") or {}).get("enabled"):
        return {}
    padding = TuneState.from_status((rollout_status or {}).get("autoTune")).padding
    return {snake: padding[camel] for camel, snake in KNOBS if camel in padding}
