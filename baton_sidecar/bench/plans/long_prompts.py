"""``--scenario long-prompts``: short interactive streams while long prompts prefill.

Two seeded Poisson streams (``Mix``), prompts cut from real text, each stream with its own
generator so that the short one is the same whatever the long one:

- short: prompts 20-100 tokens, outputs 64-128, 0.3 req/s over ``duration_s`` (three or four
  running at once where one takes ~10 s: one CPU thread), SLA class ``interactive``;
- long: prompts 2048-6144 tokens, outputs 16, one every ``long_interval_s`` (60 s) on
  average, arriving only in the first ``duration_s - long_tail_s`` seconds so that each
  prefill meets short streams (one at the middle of that window if the draw puts none there);
  no SLA class.

Every system runs twice on the same requests: ``NAME`` on the whole mix and
``NAME:short_only`` on the short stream alone (``ShortOnly``), the reference for its short ITL.
Systems: Baton's engine under each prefill policy of ``VARIANTS``, ``hf_cb``, and
``llama_server`` with ``--llama-server``. ``scenario.systems.<name>`` holds the short
requests' ITL (every gap, and the gaps that overlap a long request's prefill window: its
submission to its first token), their TTFT, the long requests' TTFT, and the ratios the
floors hold (``floors.py``).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any, Mapping, Sequence

from ..inputs import BenchError, WorkloadOptions, token_source
from ..metrics import SLO, first_token_windows, itl_gaps, makespan_s, percentile, ratio
from ..metrics import summarize as summarize_records
from ..runner import Plan, Runner
from ..workloads import BenchRequest, TokenSource, Workload

SHORT, LONG = "short", "long"  # BenchRequest.kind
SHORT_SLA_CLASS = "interactive"
BASELINE_SUFFIX = ":short_only"  # the label of a system's run on the short stream alone
# label -> (policy.prefill.budget, policy.prefill.mode); baton_tokens is the engine before the time budget.
VARIANTS = {"baton_tokens": ("tokens", "separate"), "baton_time": ("time", "separate"),
            "baton_fused": ("time", "fused")}
REFERENCE = "baton_tokens"  # every system's long TTFT p50 is divided by this one's
PEERS = ("hf_cb", "llama_server")
SYSTEMS = (*VARIANTS, *PEERS)


@dataclass(frozen=True)
class Mix:
    """The two request streams; lengths are inclusive (lo, hi) token counts."""

    duration_s: float = 150.0  # short arrivals over [0, duration_s)
    short_rate: float = 0.3  # req/s
    short_prompt: tuple[int, int] = (20, 100)
    short_output: tuple[int, int] = (64, 128)
    long_interval_s: float = 60.0  # mean gap between long arrivals
    long_prompt: tuple[int, int] = (2048, 6144)
    long_output: tuple[int, int] = (16, 16)
    long_tail_s: float = 20.0  # about one 4k-token prefill on two CPU cores

    def __post_init__(self) -> None:
        for name in ("duration_s", "short_rate", "long_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0")
        if self.long_tail_s < 0:
            raise ValueError("long_tail_s: must be >= 0")
        for name in ("short_prompt", "short_output", "long_prompt", "long_output"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name}: expected 1 <= lo <= hi, got {(lo, hi)}")

    @property
    def long_window_s(self) -> float:
        """Long prompts arrive in [0, this): the duration less the tail, at least half of it."""
        return max(self.duration_s - self.long_tail_s, self.duration_s / 2)

    @property
    def longest(self) -> int:
        """The most prompt + output tokens one request of the mix holds."""
        return max(self.short_prompt[1] + self.short_output[1], self.long_prompt[1] + self.long_output[1])


def slot_context(mix: Mix, round_to: int = 256) -> int:
    """Tokens per ``llama_server`` slot that hold the longest request of ``mix``."""
    return -(-mix.longest // round_to) * round_to


# --- the requests ---------------------------------------------------------------------------------

def mixed_workload(source: TokenSource, mix: Mix, seed: int = 0) -> Workload:
    """Both streams, merged by arrival and indexed in that order (the same for the same ``seed``)."""
    short = _stream(source, random.Random(seed), mix.short_rate, mix.duration_s, mix.short_prompt, mix.short_output)
    rng = random.Random(seed + 1)
    long = _stream(source, rng, 1 / mix.long_interval_s, mix.long_window_s, mix.long_prompt, mix.long_output)
    if not long:  # a short run: one long prompt all the same, so that every number exists
        long = [(mix.long_window_s / 2, source.take(rng.randint(*mix.long_prompt), rng),
                 rng.randint(*mix.long_output))]
    items = sorted([(*item, SHORT) for item in short] + [(*item, LONG) for item in long], key=lambda x: x[0])
    requests = [BenchRequest(i, ids, max_tokens, arrival_s=t, sla_class=SHORT_SLA_CLASS if kind == SHORT else None,
                             kind=kind)
                for i, (t, ids, max_tokens, kind) in enumerate(items)]
    return Workload("long-prompts", requests, {
        "source": source.origin, "seed": seed, **asdict(mix), "long_window_s": mix.long_window_s,
        "short_requests": len(short), "long_requests": len(long)})


def _stream(source: TokenSource, rng: random.Random, rate: float, window_s: float, prompt: tuple[int, int],
            output: tuple[int, int]) -> list[tuple[float, tuple[int, ...], int]]:
    """(arrival, prompt ids, output tokens) of each arrival of a Poisson process at ``rate`` in [0, window_s)."""
    out, t = [], rng.expovariate(rate)
    while t < window_s:
        out.append((t, source.take(rng.randint(*prompt), rng), rng.randint(*output)))
        t += rng.expovariate(rate)
    return out


# --- the plan ---------------------------------------------------------------------------------------

def parse_systems(text: str | None, llama_server: bool) -> list[str]:
    """``--systems`` (a subset of ``SYSTEMS``), else the three variants and hf_cb (and llama_server)."""
    if not text:
        return [*VARIANTS, "hf_cb", *(["llama_server"] if llama_server else [])]
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown or not names:
        raise BenchError(f"--systems: the long-prompts scenario runs some of {', '.join(SYSTEMS)}"
                         + (f"; not {unknown[0]!r}" if unknown else ""))
    if len(set(names)) != len(names):
        raise BenchError("--systems: a system is listed twice")
    return names


def plan(runner: Runner, workload: WorkloadOptions, mix: Mix = Mix(), *, systems: str | None = None) -> Plan:
    """Each system on the mix and on its short stream alone; ``systems`` as ``--systems``."""
    names = parse_systems(systems, runner.options.llama_server is not None)
    runner.load(names)
    if runner.loaded is not None and mix.longest > runner.loaded.max_model_len:
        raise BenchError(f"--long-prompt-len/--long-output-len: {mix.longest} tokens in one request, over the "
                         f"model's context ({runner.loaded.max_model_len})")
    requests = mixed_workload(token_source(runner.tokenizer, workload, runner.notes), mix, workload.seed)
    built: dict[str, Any] = {}
    for name in names:  # each system's two runs side by side, so that they meet similar machine load
        built[name + BASELINE_SUFFIX] = ShortOnly(_system(runner, name))
        built[name] = _system(runner, name)
    return Plan(title="scenario: long-prompts", kind="long-prompts", systems=built, workload=requests,
                baseline=REFERENCE if REFERENCE in names else names[0],
                finish=partial(_finish, runner, requests, names))


def _system(runner: Runner, name: str):
    """A variant of ``VARIANTS`` (Baton's engine, rebatching, with that prefill policy), or a peer."""
    from ..systems import EngineSystem

    if name not in VARIANTS:
        return runner.system(name)
    budget, mode = VARIANTS[name]
    policy = runner.options.policy
    return EngineSystem(name, runner.loaded, replace(runner.options.engine_config, batching="rebatch"),
                        replace(policy, prefill=replace(policy.prefill, budget=budget, mode=mode)))


@dataclass
class ShortOnly:
    """``system`` on a workload's short requests alone: the same requests, the long ones left out."""

    system: Any

    @property
    def local(self) -> bool:
        return getattr(self.system, "local", True)

    def run(self, workload: Workload, progress):
        requests = [r for r in workload.requests if r.kind != LONG]
        return self.system.run(Workload(workload.name, requests, {**workload.description, "long_requests": 0}),
                               progress)


# --- the summary ----------------------------------------------------------------------------------

def _finish(runner: Runner, workload: Workload, names: Sequence[str], result: dict[str, Any]) -> None:
    summarize(workload, names, runner.runs, runner.options.slo, result)


def summarize(workload: Workload, names: Sequence[str], runs: Mapping[str, Any], slo: SLO,
              result: dict[str, Any]) -> None:
    """``scenario`` (per system: short ITL and TTFT, long TTFT, the floors' ratios) and ``by_kind``.

    ``runs``: label -> ``SystemRun`` of each system's two runs (``NAME``, ``NAME:short_only``).
    """
    kinds = {r.index: r.kind for r in workload.requests}
    systems, by_kind = {}, {}
    for name in names:
        records = runs[name].records
        short = [r for r in records if kinds[r.index] == SHORT]
        long = [r for r in records if kinds[r.index] == LONG]
        systems[name] = system_entry(short, long, runs[name + BASELINE_SUFFIX].records)
        duration = makespan_s(records)
        by_kind[name] = {SHORT: summarize_records(short, slo, duration), LONG: summarize_records(long, slo, duration)}
    reference = systems.get(REFERENCE, {}).get("long_ttft_p50_s")
    for entry in systems.values():
        entry["long_ttft_p50_vs_baton_tokens"] = ratio(entry["long_ttft_p50_s"], reference)
    result["scenario"] = {
        "name": "long-prompts", "variants": {name: dict(zip(("prefill_budget", "prefill_mode"), VARIANTS[name]))
                                             for name in names if name in VARIANTS},
        "baseline_runs": f"NAME{BASELINE_SUFFIX}: the same short requests, the long ones left out",
        "in_prefill": "gaps between consecutive tokens of a short request that overlap a long request's "
                      "submission-to-first-token window",
        "systems": systems}
    result["by_kind"] = by_kind


def system_entry(short: Sequence[Any], long: Sequence[Any], baseline: Sequence[Any]) -> dict[str, Any]:
    """One system's numbers: records of its short and long requests, and of its short-only run."""
    windows = first_token_windows(long)
    all_gaps, in_prefill = itl_gaps(short), itl_gaps(short, windows)
    short_ttft, long_ttft = _ttfts(short), _ttfts(long)
    entry: dict[str, Any] = {
        "short_requests": len(short), "short_completed": sum(r.ok for r in short),
        "long_requests": len(long), "long_completed": sum(r.ok for r in long),
        **_spread("short_itl", all_gaps), **_spread("short_itl_in_prefill", in_prefill),
        "in_prefill_gap_share": ratio(len(in_prefill), len(all_gaps)),
        **_spread("baseline_itl", itl_gaps(baseline)),
        "short_ttft_p50_s": percentile(short_ttft, 50), "short_ttft_p95_s": percentile(short_ttft, 95),
        "baseline_ttft_p50_s": percentile(_ttfts(baseline), 50),
        "long_ttft_p50_s": percentile(long_ttft, 50), "long_ttft_max_s": max(long_ttft, default=None)}
    entry["short_itl_in_prefill_p99_vs_baseline_p50"] = ratio(entry["short_itl_in_prefill_p99_s"],
                                                              entry["baseline_itl_p50_s"])
    entry["short_itl_p99_vs_baseline_p50"] = ratio(entry["short_itl_p99_s"], entry["baseline_itl_p50_s"])
    return entry


def _spread(prefix: str, values: Sequence[float]) -> dict[str, Any]:
    """``{prefix_p50_s, prefix_p99_s, prefix_max_s, prefix_gaps}``."""
    return {f"{prefix}_p50_s": percentile(values, 50), f"{prefix}_p99_s": percentile(values, 99),
            f"{prefix}_max_s": max(values, default=None), f"{prefix}_gaps": len(values)}


def _ttfts(records: Sequence[Any]) -> list[float]:
    return [v for r in records if r.ok and (v := r.ttft_s) is not None]
