"""The simulator's requests: arrival, prompt and output token counts (and priority), as arrays.

The simulator needs no token ids, so a workload is four columns, cheap at a million rows.
Sources are the bench's (``bench/workloads.py``, ``bench/azure_trace.py``):

- ``trace``: Azure LLM inference trace rows, token counts divided and capped as the bench's
  ``trace`` workload does; asked for more rows than the file has, the trace is replayed end
  to end (each repeat starts one mean inter-arrival after the last).
- ``offline`` / ``poisson``: uniform prompt and output lengths, all at t=0 or Poisson arrivals.
- ``requests``: a bench run's ``requests.json`` (one run's label): exactly the requests the
  engine was given, at the times they were submitted (validation replays).
- ``bench``: any bench ``Workload`` (``prompts``, ``jsonl``: tokenized by the bench's loaders).

``at_rate`` rescales arrivals to a mean offered rate as the bench's ``--load`` does; a workload
with every request at t=0 gets Poisson arrivals at that rate instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..bench.azure_trace import TraceRow, read_azure_trace, synthetic_conv_rows
from ..bench.workloads import Workload, WorkloadError


@dataclass(frozen=True)
class SimWorkload:
    name: str
    arrival_s: np.ndarray  # float64, ascending
    prompt_tokens: np.ndarray  # int64, >= 1
    output_tokens: np.ndarray  # int64, >= 1 (exact: requests ignore EOS, as in the bench)
    priority: np.ndarray | None = None  # int64; None: every request the engine's default
    sla_class: Sequence[str | None] | None = None
    description: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.arrival_s)
        if not n:
            raise WorkloadError(f"{self.name}: no requests")
        if len(self.prompt_tokens) != n or len(self.output_tokens) != n:
            raise WorkloadError(f"{self.name}: columns differ in length")
        if (np.diff(self.arrival_s) < 0).any():
            raise WorkloadError(f"{self.name}: arrivals must be in time order")
        if (self.prompt_tokens < 1).any() or (self.output_tokens < 1).any():
            raise WorkloadError(f"{self.name}: prompt and output token counts must be >= 1")

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def span_s(self) -> float:
        return float(self.arrival_s[-1] - self.arrival_s[0])

    @property
    def offered_rate(self) -> float | None:
        """Requests per second over the arrival span (None: all at once)."""
        return (len(self) - 1) / self.span_s if self.span_s > 0 else None

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "num_requests": len(self), "arrival_span_s": self.span_s,
                "offered_rate_req_per_s": self.offered_rate,
                "prompt_tokens_mean": float(self.prompt_tokens.mean()),
                "output_tokens_mean": float(self.output_tokens.mean()), **self.description}

    def all_at_once(self) -> "SimWorkload":
        return replace(self, arrival_s=np.zeros(len(self)), description={**self.description, "arrivals": "all at t=0"})

    def at_rate(self, rate: float, seed: int = 0) -> "SimWorkload":
        """The same requests at a mean of ``rate`` requests/s: the arrival times scaled (the
        bench's ``time_scale_for_rate``), or Poisson arrivals if they all come at t=0."""
        if rate <= 0:
            raise ValueError("rate: must be > 0 requests/s")
        if self.span_s > 0:
            factor = self.offered_rate / rate
            arrivals = (self.arrival_s - self.arrival_s[0]) * factor
            how = {"time_scale": factor}
        else:
            gaps = np.random.default_rng(seed + 1).exponential(1.0 / rate, len(self) - 1)
            arrivals = np.concatenate([[0.0], np.cumsum(gaps)])
            how = {"arrivals": f"poisson (seed {seed})"}
        return replace(self, arrival_s=arrivals,
                       description={**self.description, **how, "offered_rate_req_per_s": rate})

    def head(self, n: int) -> "SimWorkload":
        pick = slice(0, n)
        return replace(self, arrival_s=self.arrival_s[pick], prompt_tokens=self.prompt_tokens[pick],
                       output_tokens=self.output_tokens[pick],
                       priority=None if self.priority is None else self.priority[pick],
                       sla_class=None if self.sla_class is None else list(self.sla_class)[pick])


def from_bench(workload: Workload) -> SimWorkload:
    """A bench ``Workload`` (token ids dropped; choices and sampling features ignored)."""
    requests = sorted(workload.requests, key=lambda r: (r.arrival_s, r.index))
    priorities = [r.priority for r in requests]
    classes = [r.sla_class for r in requests]
    return SimWorkload(
        workload.name, np.array([r.arrival_s for r in requests], dtype=float),
        np.array([r.prompt_len for r in requests], dtype=np.int64),
        np.array([r.max_tokens for r in requests], dtype=np.int64),
        None if all(p is None for p in priorities) else np.array([p or 0 for p in priorities], dtype=np.int64),
        None if all(c is None for c in classes) else classes,
        {k: v for k, v in workload.description.items() if isinstance(v, (str, int, float, bool, type(None)))})


def from_requests_json(path: Path | str, label: str | None = None) -> SimWorkload:
    """The requests of one run of a bench ``requests.json`` (default: its first label)."""
    path = Path(path)
    try:
        runs = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise WorkloadError(f"{path}: not a readable requests.json ({error})") from None
    if not isinstance(runs, dict) or not runs:
        raise WorkloadError(f"{path}: expected {{label: [requests]}}")
    label = label or next(iter(runs))
    if label not in runs:
        raise WorkloadError(f"{path}: no run {label!r}; runs: {', '.join(runs)}")
    rows = sorted(runs[label], key=lambda r: (r["submitted_s"], r["index"]))
    priorities = [r.get("priority") for r in rows]
    return SimWorkload(
        "requests", np.array([r["submitted_s"] for r in rows], dtype=float),
        np.array([r["prompt_tokens"] for r in rows], dtype=np.int64),
        np.array([r["max_tokens"] for r in rows], dtype=np.int64),
        None if all(p is None for p in priorities) else np.array([p or 0 for p in priorities], dtype=np.int64),
        description={"source": f"{path} ({label})"})


def trace_rows(path: Path | None, synthetic_rows: int = 0) -> tuple[list[TraceRow], str]:
    """The Azure trace's rows, or ``synthetic_rows`` of the bench's stand-in when ``path`` is None."""
    if path is not None:
        return read_azure_trace(path), str(path)
    return synthetic_conv_rows(synthetic_rows), "synthetic (Azure conv rate and medians)"


def trace(rows: Sequence[TraceRow], num_requests: int, *, prompt_scale: float = 8.0, output_scale: float = 4.0,
          max_prompt: int = 512, max_output: int = 256, start_s: float = 0.0, origin: str = "") -> SimWorkload:
    """Rows from ``start_s`` as the bench's ``trace_workload`` scales them; replayed end to end
    when more requests are asked than the rows hold."""
    if prompt_scale <= 0 or output_scale <= 0:
        raise ValueError("token scales must be > 0")
    selected = [r for r in rows if r.t >= start_s]
    if not selected:
        raise WorkloadError(f"no trace rows at or after {start_s} s")
    t = np.array([r.t for r in selected]) - selected[0].t
    context = np.array([r.context_tokens for r in selected], dtype=float)
    generated = np.array([r.generated_tokens for r in selected], dtype=float)
    repeats = -(-num_requests // len(selected))
    period = t[-1] + (t[-1] / (len(t) - 1) if len(t) > 1 else 1.0)
    arrivals = np.concatenate([t + k * period for k in range(repeats)])[:num_requests]
    prompt = np.tile(_scaled(context, prompt_scale, max_prompt), repeats)[:num_requests]
    output = np.tile(_scaled(generated, output_scale, max_output), repeats)[:num_requests]
    return SimWorkload("trace", arrivals, prompt, output, description={
        "source": origin, "trace_start_s": start_s, "prompt_token_scale": prompt_scale,
        "output_token_scale": output_scale, "max_prompt_tokens": max_prompt, "max_output_tokens": max_output,
        "trace_repeats": repeats})


def _scaled(counts: np.ndarray, scale: float, cap: int) -> np.ndarray:
    """``bench.workloads.scale_tokens`` over an array: ``count / scale`` rounded (half to even,
    as Python's ``round``), clamped to [1, cap]."""
    return np.clip(np.round(counts / scale), 1, cap).astype(np.int64)


def uniform(num_requests: int, prompt_range: tuple[int, int], output_range: tuple[int, int],
            rate: float | None = None, seed: int = 0) -> SimWorkload:
    """Uniform lengths (inclusive ranges); all at t=0, or Poisson arrivals at ``rate``."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(prompt_range[0], prompt_range[1] + 1, num_requests)
    output = rng.integers(output_range[0], output_range[1] + 1, num_requests)
    workload = SimWorkload("offline" if rate is None else "poisson", np.zeros(num_requests), prompt, output,
                           description={"seed": seed, "prompt_len_range": list(prompt_range),
                                        "output_len_range": list(output_range)})
    return workload if rate is None else workload.at_rate(rate, seed)
