"""Per-request records and the numbers the report is made of.

Definitions (all times in seconds, measured by the load generator on ``time.perf_counter``):

- TTFT  = first output token received - request submitted
- TPOT  = (last token - first token) / (output tokens - 1), per request (requests with >= 2 tokens)
- ITL   = every gap between consecutive output tokens of a request, pooled over requests
- E2E   = final result received - request submitted
- output_tokens_per_s = useful output tokens / makespan, where makespan = first submission
  to last completion. Useful = the tokens each request asked for (``max_tokens`` per
  choice), so work a static batch wastes on rows that are already done never counts.
- A request with several choices (``n``): TTFT, TPOT and ITL follow its choice 0; its
  output tokens are every choice's.
- goodput = completed requests that met every stated SLO, per second of makespan.

Percentiles are ``baton_sidecar.stats``'s: linear between order statistics (numpy's default).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from .. import stats

PERCENTILES = (50, 95, 99)


@dataclass
class RequestRecord:
    index: int
    submitted_s: float  # relative to the run's start
    prompt_tokens: int
    max_tokens: int
    priority: int | None = None
    token_times_s: list[float] = field(default_factory=list)  # receipt time of each output token
    finished_s: float | None = None  # final result received
    output_tokens: int = 0
    error: str | None = None
    num_preemptions: int = 0
    choices: int = 1  # token_times_s are choice 0's; output_tokens counts every choice's

    @property
    def ok(self) -> bool:
        return self.error is None and self.finished_s is not None

    @property
    def ttft_s(self) -> float | None:
        return self.token_times_s[0] - self.submitted_s if self.token_times_s else None

    @property
    def e2e_s(self) -> float | None:
        return None if self.finished_s is None else self.finished_s - self.submitted_s

    @property
    def tpot_s(self) -> float | None:
        times = self.token_times_s
        if len(times) < 2:
            return None
        return (times[-1] - times[0]) / (len(times) - 1)

    def itls_s(self) -> list[float]:
        times = self.token_times_s
        return [b - a for a, b in zip(times, times[1:])]


def percentile(values: Sequence[float], q: float) -> float | None:
    """``stats.percentile`` of values in any order (numpy's "linear" definition); None for none."""
    return stats.percentile(sorted(values), q) if values else None


def distribution(prefix: str, values: Sequence[float]) -> dict[str, float | None]:
    """``{prefix_mean_s, prefix_p50_s, prefix_p95_s, prefix_p99_s}``."""
    out: dict[str, float | None] = {f"{prefix}_mean_s": (sum(values) / len(values)) if values else None}
    for q in PERCENTILES:
        out[f"{prefix}_p{q}_s"] = percentile(values, q)
    return out


@dataclass(frozen=True)
class SLO:
    """Per-request objectives; None = not checked. Goodput counts requests meeting all of them."""

    ttft_s: float | None = 2.0
    tpot_s: float | None = 0.5
    e2e_s: float | None = None

    def met(self, record: RequestRecord) -> bool:
        if not record.ok:
            return False
        checks = ((self.ttft_s, record.ttft_s), (self.tpot_s, record.tpot_s), (self.e2e_s, record.e2e_s))
        return all(limit is None or value is None or value <= limit for limit, value in checks)

    def as_dict(self) -> dict[str, float | None]:
        return {"ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "e2e_s": self.e2e_s}


def makespan_s(records: Iterable[RequestRecord]) -> float:
    records = list(records)
    done = [r.finished_s for r in records if r.finished_s is not None]
    if not done:
        return 0.0
    return max(done) - min(r.submitted_s for r in records)


def summarize(records: Sequence[RequestRecord], slo: SLO | None = None,
              duration_s: float | None = None) -> dict[str, Any]:
    """The per-system block of the JSON report (keys documented in docs/benchmarks.md)."""
    slo = slo or SLO()
    ok = [r for r in records if r.ok]
    duration = makespan_s(records) if duration_s is None else duration_s
    useful = sum(min(r.output_tokens, r.max_tokens * r.choices) for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    good = sum(1 for r in ok if slo.met(r))
    per_s = (lambda n: n / duration if duration > 0 else None)
    out: dict[str, Any] = {
        "num_requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors": sorted({r.error for r in records if r.error})[:5],
        "duration_s": duration,
        "output_tokens": useful,
        "prompt_tokens": prompt,
        "output_tokens_per_s": per_s(useful),
        "total_tokens_per_s": per_s(useful + prompt),
        "requests_per_s": per_s(len(ok)),
        "goodput_req_per_s": per_s(good),
        "goodput_fraction": good / len(records) if records else None,
        "slo": slo.as_dict(),
        "preemptions": sum(r.num_preemptions for r in records),
    }
    out.update(distribution("ttft", [v for r in ok if (v := r.ttft_s) is not None]))
    out.update(distribution("tpot", [v for r in ok if (v := r.tpot_s) is not None]))
    out.update(distribution("itl", [g for r in ok for g in r.itls_s()]))
    out.update(distribution("e2e", [v for r in ok if (v := r.e2e_s) is not None]))
    return out


def first_token_windows(records: Iterable[RequestRecord]) -> list[tuple[float, float]]:
    """(submitted, first token) of each record that got a first token: its wait plus prefill."""
    return [(r.submitted_s, r.token_times_s[0]) for r in records if r.token_times_s]


def itl_gaps(records: Iterable[RequestRecord], windows: Sequence[tuple[float, float]] | None = None) -> list[float]:
    """Every gap between consecutive tokens of the completed ``records``, pooled (the ITL values).

    With ``windows`` ((start, end) pairs): only the gaps (a, b) that overlap one, a < end and
    b > start; a gap that spans a whole window counts, one that merely touches it does not.
    """
    gaps = []
    for r in records:
        if not r.ok:
            continue
        times = r.token_times_s
        for a, b in zip(times, times[1:]):
            if windows is None or any(a < end and b > start for start, end in windows):
                gaps.append(b - a)
    return gaps


def summarize_by_priority(records: Sequence[RequestRecord], slo: SLO | None = None) -> dict[str, Any]:
    """``{"priority_<p>": summary}`` per priority class; rates use the whole run's makespan."""
    duration = makespan_s(records)
    classes = sorted({r.priority for r in records if r.priority is not None})
    return {f"priority_{p}": summarize([r for r in records if r.priority == p], slo, duration)
            for p in classes}


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None if either is missing or b is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def summarize_steps(steps: Sequence[dict[str, float]]) -> dict[str, Any]:
    """Engine-side numbers from the per-step log (``systems.step_entry`` of each ``StepRecord``).

    ``padding_ratio_time_weighted`` weights each decode step's padding ratio by that step's
    decode time; ``padding_ratio_slot_weighted`` is masked slots / all slots summed over
    decode steps (the share of attention work spent on padding).
    """
    decode = [s for s in steps if s.get("rows", 0) > 0]
    decode_s = sum(s["decode_s"] for s in decode)
    step_s = sum(s["step_s"] for s in steps)
    prefill_s = sum(s.get("prefill_s", 0.0) for s in steps)
    slots = sum(s["rows"] * s["length"] for s in decode)
    by_batch: dict[int, list[float]] = {}
    for s in decode:
        by_batch.setdefault(int(s["rows"]), []).append(s["decode_s"])
    return {
        "steps": len(steps),
        "decode_steps": len(decode),
        "mean_batch_size": sum(s["rows"] for s in decode) / len(decode) if decode else None,
        "max_batch_size": max((int(s["rows"]) for s in decode), default=0),
        "mean_context_len": sum(s["length"] for s in decode) / len(decode) if decode else None,
        "padding_ratio_time_weighted": (sum(s["padding_ratio"] * s["decode_s"] for s in decode) / decode_s
                                        if decode_s > 0 else None),
        "padding_ratio_slot_weighted": (sum(s["padding_ratio"] * s["rows"] * s["length"] for s in decode) / slots
                                        if slots else None),
        "padding_ratio_step_mean": sum(s["padding_ratio"] for s in decode) / len(decode) if decode else None,
        "step_s": step_s,
        "decode_s": decode_s,
        "prefill_s": prefill_s,
        "prefill_tokens": int(sum(s.get("prefill_tokens", 0) for s in steps)),
        "other_s": step_s - decode_s - prefill_s,
        "decode_step_p50_s_by_batch": {str(b): percentile(v, 50) for b, v in sorted(by_batch.items())},
    }
