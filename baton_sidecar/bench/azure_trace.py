"""Azure LLM inference traces (TIMESTAMP, ContextTokens, GeneratedTokens): read from their CSV,
or a synthetic stand-in with the conversation trace's rate and length medians.
``workloads.trace_workload`` turns the rows into requests."""

from __future__ import annotations

import csv
import math
import random
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from .workloads import WorkloadError


@dataclass(frozen=True)
class TraceRow:
    t: float  # seconds since the trace's first row
    context_tokens: int
    generated_tokens: int


def _parse_timestamp(text: str) -> float:
    text = text.strip()
    # Seven fractional digits (100 ns ticks) are more than datetime parses: keep six.
    if "." in text:
        head, frac = text.split(".", 1)
        text = f"{head}.{frac[:6]}"
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return float(text)  # already seconds


def read_azure_trace(path: Path) -> list[TraceRow]:
    """Rows of an Azure LLM inference trace CSV, times relative to its first row, in time order."""
    path = Path(path)
    if not path.is_file():
        raise WorkloadError(f"trace file {path} does not exist")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(reader.fieldnames or ())
        if missing:
            raise WorkloadError(f"{path}: missing column(s) {sorted(missing)}; expected TIMESTAMP, "
                                "ContextTokens, GeneratedTokens")
        raw = []
        for line, row in enumerate(reader, start=2):
            try:
                raw.append((_parse_timestamp(row["TIMESTAMP"]), int(row["ContextTokens"]),
                            int(row["GeneratedTokens"])))
            except (TypeError, ValueError) as error:
                raise WorkloadError(f"{path}:{line}: bad row ({error})") from None
    if not raw:
        raise WorkloadError(f"{path}: no rows")
    raw.sort(key=lambda r: r[0])
    t0 = raw[0][0]
    return [TraceRow(t - t0, c, g) for t, c, g in raw]


def synthetic_conv_rows(num_rows: int, seed: int = 0) -> list[TraceRow]:
    """A stand-in for the Azure conversation trace: its rate (~5.4 req/s) and length medians.

    Log-normal lengths with the trace's medians (context 1020, generated 129) and a
    similar spread; Poisson arrivals. Used only with ``--synthetic-fallback``.
    """
    rng = random.Random(seed)
    rows, t = [], 0.0
    for _ in range(num_rows):
        context = max(1, min(14000, int(rng.lognormvariate(math.log(1020), 0.6))))
        generated = max(1, min(1000, int(rng.lognormvariate(math.log(129), 0.9))))
        rows.append(TraceRow(t, context, generated))
        t += rng.expovariate(5.4)
    return rows
