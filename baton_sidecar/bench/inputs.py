"""The workload the options ask for: checked workload options, the token source, the trace rows.

``build_workload(kind, options, ...)`` returns the base workload (arrivals unscaled) of one
workload kind; the plans (``plans/``) rescale arrivals and assign priorities. Missing data
stops the run (``BenchError``) unless ``synthetic_fallback`` accepts a stand-in, which is
written into ``notes``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from .azure_trace import TraceRow, read_azure_trace, synthetic_conv_rows
from .workloads import (ARENA_ANSWERS, ARENA_QUESTIONS, AZURE_CONV, TokenSource, Workload, arena_workload,
                        default_data_dir, jsonl_workload, load_token_source, offline_workload, poisson_workload,
                        trace_workload)

TRACE_SOURCE = "the Azure LLM inference trace, CC-BY-4.0: Azure/AzurePublicDataset data/AzureLLMInferenceTrace_conv.csv"


class BenchError(Exception):
    """A user-facing problem (bad arguments, missing data): printed, exit code 2."""


@dataclass(frozen=True)
class WorkloadOptions:
    """The workload arguments, checked; ``None`` leaves the choice to the workload or the plan."""

    num_requests: int | None = None
    prompt_range: tuple[int, int] = (10, 130)
    output_range: tuple[int, int] | None = None  # None: 8:256 (the priority plan: 16:64)
    seed: int = 0
    rate: float | None = None  # poisson / prompts arrivals, requests/s
    token_scale: float | None = None
    prompt_scale: float | None = None
    output_scale: float | None = None
    max_prompt: int = 512
    max_output: int = 256
    trace_start_s: float = 0.0
    time_scale: float | None = None
    load: str | None = None  # "--load" as typed; each plan parses it with its own default
    path: str | None = None  # the trace CSV, the JSONL file or the Arena-Hard question file
    data_dir: Path = field(default_factory=default_data_dir)
    synthetic_fallback: bool = False


def parse_loads(text: str | None, default: str | None) -> list[float] | None:
    """``--load`` (or ``default`` when it is absent) as fractions of capacity; None if neither."""
    text = text if text is not None else default
    if text is None:
        return None
    try:
        loads = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise BenchError(f"--load: expected fractions like 0.8 or 0.5,0.8,1.0, got {text!r}") from None
    if not loads or any(x <= 0 for x in loads):
        raise BenchError("--load: fractions must be > 0")
    return loads


def trace_path(options: WorkloadOptions) -> Path:
    return Path(options.path) if options.path else options.data_dir / AZURE_CONV


def check_trace(options: WorkloadOptions) -> Path | None:
    """The trace file; None if it is absent and a stand-in is accepted (else ``BenchError``)."""
    path = trace_path(options)
    if path.is_file():
        return path
    if not options.synthetic_fallback:
        raise BenchError(f"{_missing(path)}; pass --synthetic-fallback to use a synthetic stand-in")
    return None


def _missing(path: Path) -> str:
    return f"trace file {path} is absent ({TRACE_SOURCE})"


def trace_rows(options: WorkloadOptions, notes: list[str]) -> tuple[list[TraceRow], str]:
    """The trace's rows and where they came from (the file, or a synthetic stand-in)."""
    path = check_trace(options)
    if path is not None:
        return read_azure_trace(path), str(path)
    message = _missing(trace_path(options))
    print(f"warning: {message}; using a synthetic stand-in (--synthetic-fallback)", file=sys.stderr)
    notes.append(f"{message}; a synthetic stand-in with the trace's rate and length medians was used")
    n = (options.num_requests or 48) + 1
    return synthetic_conv_rows(max(n, 64), options.seed), "synthetic (Azure conv rate and medians)"


def token_source(tokenizer, options: WorkloadOptions, notes: list[str]) -> TokenSource:
    """Real text (Arena-Hard prompts and answers) to cut prompts from; random ids only if accepted."""
    source = load_token_source(tokenizer, options.data_dir)
    if source.origin.startswith("synthetic"):
        message = f"Arena-Hard text is absent from {options.data_dir}: prompts are random token ids"
        if not options.synthetic_fallback:
            raise BenchError(message + "; pass --synthetic-fallback to accept that")
        print(f"warning: {message}", file=sys.stderr)
        notes.append(message)
    return source


def build_workload(kind: str, options: WorkloadOptions, tokenizer, source: TokenSource | None,
                   notes: list[str]) -> Workload:
    """The base workload (arrivals unscaled) for ``kind``; ``source`` for offline, poisson and trace."""
    n, o = options.num_requests, options
    output_range = o.output_range or (8, 256)
    if kind == "offline":
        return offline_workload(source, n or 32, o.prompt_range, output_range, o.seed)
    if kind == "poisson":
        return poisson_workload(source, o.rate or 1.0, n or 32, o.prompt_range, output_range, o.seed)
    if kind == "trace":
        rows, origin = trace_rows(o, notes)
        return trace_workload(rows, source, num_requests=n or 48, start_s=o.trace_start_s,
                              prompt_scale=o.prompt_scale or o.token_scale or 8.0,
                              output_scale=o.output_scale or o.token_scale or 4.0,
                              max_prompt=o.max_prompt, max_output=o.max_output, seed=o.seed, origin=origin)
    if kind == "prompts":
        questions = Path(o.path) if o.path else o.data_dir / ARENA_QUESTIONS
        answers = questions.parent / ARENA_ANSWERS
        if not (questions.is_file() and answers.is_file()):
            raise BenchError(f"Arena-Hard files are absent ({questions}, {answers}); the prompts workload "
                             "needs both (lmarena/arena-hard-auto data/arena-hard-v0.1)")
        return arena_workload(questions, answers, tokenizer, num_requests=n or 32,
                              output_scale=o.output_scale or o.token_scale or 1.0,
                              max_prompt=o.max_prompt, max_output=o.max_output, rate=o.rate, seed=o.seed)
    if kind == "jsonl":
        if not o.path:
            raise BenchError("jsonl needs a FILE argument")
        return jsonl_workload(Path(o.path), tokenizer, len(tokenizer))
    raise BenchError(f"unknown workload {kind!r}")
