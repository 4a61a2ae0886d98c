"""What one engine step costs, in seconds, fitted from the steps the engine really ran.

The model is linear in the work a step does (``StepWork``)::

    seconds = forward_s * forwards + row_s * rows + pair_s * rows * context + token_s * prompt_tokens

- ``forwards``: model forward passes (each reads every weight once): the decode forward,
  and a forward of its own for prompts unless they ride in the decode forward (fused);
- ``rows``: decode rows (linear layers, logits, sampling of one token each);
- ``rows * context``: attention pairs of the decode rows (``context`` = live length + 1);
- ``prompt_tokens``: prompt tokens prefilled in the step (whole prompts and chunks).

On top of it, two times of the engine loop: ``gap_s`` between two steps (publishing
outputs, draining the inbox), charged once per step, and ``wake_s`` from a request reaching
an idle engine to its first step (the engine thread waits for the GIL while the event loop
submits a burst of requests; CPython hands it over within its switch interval, 5 ms).

A model comes from bench runs' ``steps.json`` (``fit_steps``: non-negative least squares
over every recorded step, see ``fit``; ``gap_s`` the mean time between back-to-back steps)
or from a fitted model file written by ``save`` (``load`` reads either). ``SchedulerCost`` lets the
engine's own prefill budget (``engine/budget.py``) ask this model instead of the engine's
live ``StepCostModel``, so simulated budgets size prompt work as the engine would with an
accurate prediction.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..engine.step_cost import StepShape

KIND = "baton-step-cost"  # the "kind" of a fitted model file
COEFFICIENTS = ("forward_s", "row_s", "pair_s", "token_s")
FIELDS = (*COEFFICIENTS, "gap_s", "wake_s")  # every number of a model
# Column scales for the fit: counts of very different sizes, solved at comparable magnitudes.
SCALE = np.array([1.0, 1e-2, 1e-5, 1e-2])
OUTLIER = 3.0  # a step predicted off by more than this factor is left out of the refit
WAKE_S = 0.005  # sys.getswitchinterval(): an idle engine thread's longest wait for the GIL


@dataclass(frozen=True)
class StepWork:
    forwards: int
    rows: int
    context: int  # columns each decode row attends to (live length + 1)
    prompt_tokens: int

    def features(self) -> list[float]:
        return [self.forwards, self.rows, self.rows * self.context, self.prompt_tokens]


@dataclass(frozen=True)
class StepCost:
    """A fitted step-time model (see the module docstring); times in seconds."""

    forward_s: float
    row_s: float
    pair_s: float
    token_s: float
    gap_s: float = 0.0
    wake_s: float = WAKE_S
    source: Mapping[str, Any] = field(default_factory=dict)  # where it came from, in words and numbers

    def __post_init__(self) -> None:
        for name in FIELDS:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name}: must be a number >= 0")

    def seconds(self, forwards: int, rows: int, context: int, prompt_tokens: int) -> float:
        """The step's model time, ``gap_s`` excluded."""
        return (self.forward_s * forwards + self.row_s * rows + self.pair_s * rows * context
                + self.token_s * prompt_tokens)

    def work_seconds(self, work: StepWork) -> float:
        return self.seconds(work.forwards, work.rows, work.context, work.prompt_tokens)

    def decode_run(self, rows: int, context: int) -> tuple[float, float]:
        """Plain decode steps of ``rows`` from ``context``: step i (0-based) lasts ``a + b * i``,
        the loop's gap included (the context grows by one column a step)."""
        return self.seconds(1, rows, context, 0) + self.gap_s, self.pair_s * rows

    def as_dict(self) -> dict[str, Any]:
        return {"kind": KIND, **asdict(self), "source": dict(self.source)}


# --- fitting ---------------------------------------------------------------------------------

def step_work(entry: Mapping[str, Any]) -> StepWork:
    """The work of one ``steps.json`` entry (``bench/systems.py::step_entry``).

    Older files have no ``fused`` key: prompts rode in the decode forward when they took no
    prefill time of their own."""
    rows, prompt = int(entry.get("rows", 0)), int(entry.get("prefill_tokens", 0))
    fused = entry.get("fused")
    if fused is None:
        fused = bool(prompt and rows and not entry.get("prefill_s"))
    forwards = int(rows > 0) + int(prompt > 0 and not fused)
    return StepWork(forwards, rows, int(entry.get("length", 0)) if rows else 0, prompt)


def loop_gaps(entries: Sequence[Mapping[str, Any]]) -> list[float]:
    """Seconds between one step's end and the next one's start, where the engine had work all
    along: before a plain decode step (rows decoding, no prompt joining), whose rows were there
    when the previous step ended. Elsewhere the engine may have waited, idle, for arrivals."""
    return [(after["t"] - after["step_s"]) - before["t"] for before, after in zip(entries, entries[1:])
            if after.get("rows") and not after.get("prefill_tokens")]


def nonnegative_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0: a column whose coefficient comes out negative
    is dropped and the rest refitted (no count of work makes a step faster)."""
    active = list(range(x.shape[1]))
    theta = np.zeros(x.shape[1])
    while active:
        solution = np.linalg.lstsq(x[:, active], y, rcond=None)[0]
        if (solution >= 0).all():
            theta[active] = solution
            return theta
        active.pop(int(np.argmin(solution)))
    return theta


def fit(works: Sequence[StepWork], seconds: Sequence[float], gap_s: float = 0.0,
        fixed: Mapping[str, float] | None = None, source: Mapping[str, Any] | None = None) -> StepCost:
    """A ``StepCost`` from observed steps; ``fixed`` coefficients are taken as given.

    - Squared errors are divided by each step's seconds, so a few long prefill steps do not
      outweigh thousands of decode steps.
    - Steps the first fit misses by more than a factor ``OUTLIER`` (the machine stalled) are
      left out of the second, so they do not bend the coefficients.
    - The free coefficients are then scaled so that the steps' predicted total is their
      measured total, stalls included: simulated time adds up as the engine's did.
    """
    if not works:
        raise ValueError("cost model: no steps to fit")
    fixed = dict(fixed or {})
    x = np.array([w.features() for w in works], dtype=float)
    measured = np.array(seconds, dtype=float)
    fixed_part = sum(x[:, i] * fixed[name] for i, name in enumerate(COEFFICIENTS) if name in fixed)
    y = measured - fixed_part  # what the free coefficients must explain
    free = [i for i, name in enumerate(COEFFICIENTS) if name not in fixed]
    scaled = x[:, free] * SCALE[free]
    weight = 1 / np.sqrt(np.maximum(measured, 1e-6))

    def solve(rows: np.ndarray) -> np.ndarray:
        return nonnegative_lstsq(scaled[rows] * weight[rows, None], y[rows] * weight[rows])

    keep = np.ones(len(y), dtype=bool)
    theta = solve(keep)
    ratio = np.maximum(scaled @ theta + fixed_part, 1e-12) / np.maximum(measured, 1e-12)
    keep = np.maximum(ratio, 1 / ratio) <= OUTLIER
    theta = solve(keep)
    free_total = (scaled @ theta).sum()
    if free_total > 0:
        theta = theta * max(0.0, y.sum() / free_total)
    predicted = scaled @ theta + fixed_part
    relative = np.abs(predicted - measured) / np.maximum(measured, 1e-9)
    values = dict(fixed)
    values.update({COEFFICIENTS[i]: float(v) for i, v in zip(free, theta * SCALE[free])})
    stats = {"steps": len(works), "outliers_left_out": int((~keep).sum()),
             "median_relative_error": float(np.median(relative)),
             "p90_relative_error": float(np.percentile(relative, 90)),
             "total_seconds_relative_error": float((predicted.sum() - measured.sum()) / measured.sum())}
    return StepCost(**values, gap_s=gap_s, source={**(source or {}), "fit": stats})


def fit_steps(runs: Mapping[str, Sequence[Mapping[str, Any]]], origin: str = "") -> StepCost:
    """Fit every run of a ``steps.json`` (label -> entries); the loop gap is the mean of theirs."""
    works, seconds, gaps = [], [], []
    for entries in runs.values():
        entries = [e for e in entries if e.get("rows") or e.get("prefill_tokens")]
        works += [step_work(e) for e in entries]
        seconds += [float(e["step_s"]) for e in entries]
        gaps += loop_gaps(entries)
    gap = max(0.0, statistics.fmean(gaps)) if gaps else 0.0
    return fit(works, seconds, gap, source={"fitted_from": origin or "steps.json", "runs": sorted(runs)})


# --- files -----------------------------------------------------------------------------------

def load(text: Path | str) -> StepCost:
    """A fitted model file (``save``), or bench runs' ``steps.json`` (files or their output
    directories, comma-separated), fitted together on the spot."""
    paths = [_steps_path(Path(p)) for p in str(text).split(",") if p]
    data = [_read(path) for path in paths]
    if len(data) == 1 and isinstance(data[0], dict) and data[0].get("kind") == KIND:
        try:
            return StepCost(**{k: data[0][k] for k in COEFFICIENTS}, gap_s=data[0].get("gap_s", 0.0),
                            wake_s=data[0].get("wake_s", WAKE_S), source=data[0].get("source") or {})
        except KeyError as error:
            raise ValueError(f"--cost-model: {paths[0]} lacks {error.args[0]}") from None
    runs: dict[str, Any] = {}
    for path, steps in zip(paths, data):
        if not (isinstance(steps, dict) and steps and all(isinstance(v, list) for v in steps.values())):
            raise ValueError(f"--cost-model: {path} is neither a fitted model ({KIND}) nor a bench steps.json")
        prefix = f"{path.parent.name}/" if len(paths) > 1 else ""
        runs.update({f"{prefix}{label}": entries for label, entries in steps.items()})
    model = fit_steps(runs, ", ".join(map(str, paths)))
    context = [bench_context(path.parent / "result.json") for path in paths]
    return replace(model, source={**model.source, "bench": context if len(context) > 1 else context[0]})


def _steps_path(path: Path) -> Path:
    return path / "steps.json" if path.is_dir() else path


def _read(path: Path) -> Any:
    if not path.is_file():
        raise ValueError(f"--cost-model: {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"--cost-model: {path} is not JSON ({error.msg})") from None


def bench_context(result_path: Path) -> dict[str, Any]:
    """What machine and model a bench run's steps come from (its ``result.json``, if beside them)."""
    try:
        result = json.loads(result_path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    host = result.get("host") or {}
    return {"command": result.get("command"), "started_at": result.get("started_at"),
            "model": result.get("model"), "device": result.get("device"), "dtype": result.get("dtype"),
            "cpu_model": host.get("cpu_model"), "cpu_count": host.get("cpu_count"),
            "torch_threads": host.get("torch_threads"), "load_avg_start": host.get("load_avg_start")}


def save(model: StepCost, path: Path | str, **extra: Any) -> None:
    """Write ``model`` (plus ``extra`` keys, e.g. a suggested policy) as a fitted model file."""
    Path(path).write_text(json.dumps({**model.as_dict(), **extra}, indent=1) + "\n")


def suggested_policy(path: Path | str) -> dict[str, Any] | None:
    """A fitted model file's ``policy`` block (limits the measured machine ran with), if any."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data.get("policy") if isinstance(data, dict) and data.get("kind") == KIND else None


# --- the engine's prefill budget asks this model -------------------------------------------------

class SchedulerCost:
    """Stands in for the engine's ``StepCostModel`` in ``StepBudget``: ``predict(StepShape)``.

    The budget only predicts while rows decode, and every shape it asks about holds the
    step's decode rows, ``decode_shape(rows, context)``, plus prompt work; the replica tells
    this object the batch before each plan (``set_batch``) so the prompt tokens can be told
    apart from the decode rows."""

    def __init__(self, model: StepCost) -> None:
        self.model = model
        self.rows = 0
        self.context = 0

    def set_batch(self, rows: int, context: int) -> None:
        self.rows, self.context = rows, context

    def predict(self, shape: StepShape) -> float:
        prompt_tokens = max(0, shape.tokens - self.rows)
        return self.model.seconds(shape.forwards, self.rows, self.context, prompt_tokens)


def describe(model: StepCost) -> str:
    return (f"forward {model.forward_s * 1e3:.2f} ms, row {model.row_s * 1e3:.3f} ms, "
            f"pair {model.pair_s * 1e9:.1f} ns, prompt token {model.token_s * 1e3:.3f} ms, "
            f"loop gap {model.gap_s * 1e3:.2f} ms")

