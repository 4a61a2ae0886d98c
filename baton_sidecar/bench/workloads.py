"""Benchmark workloads: the same tokenized requests, with arrival times, for every system.

A workload is a list of ``BenchRequest`` (prompt token ids, exact output length, arrival
offset in seconds from the start of the run, optional priority / SLA class) plus a
``description`` dict that the report prints: where the requests came from and every
scaling factor applied to them. Sources:

- ``offline``: N requests all at t=0, uniform prompt and output lengths (seeded).
- ``poisson``: the same lengths, exponential inter-arrival times at a given rate.
- ``trace``: Azure LLM inference trace rows (TIMESTAMP, ContextTokens, GeneratedTokens),
  token counts divided by scale factors and times multiplied by a time scale.
- ``prompts``: Arena-Hard questions as prompts; output length = the token length of the
  recorded answer to the same question (then scaled and capped).
- ``jsonl``: one JSON object per line with ``prompt`` or ``prompt_token_ids``,
  ``max_tokens``, optional ``arrival_s``, ``priority``, ``sla_class``.

A request may carry ``Features`` (``--scenario features``): engine sampling features that
only Baton's engine systems apply; every other system runs it plain.

Prompts of a given length (offline, poisson, trace) are real text: windows cut from the
token stream of the Arena-Hard prompts and answers, so attention sees realistic inputs.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

if TYPE_CHECKING:
    from .azure_trace import TraceRow

REPO_ROOT = Path(__file__).resolve().parents[2]
AZURE_CONV = "AzureLLMInferenceTrace_conv_2023.csv"
AZURE_CODE = "AzureLLMInferenceTrace_code_2023.csv"
ARENA_QUESTIONS = "arena_hard_v0.1_question.jsonl"
ARENA_ANSWERS = "arena_hard_v0.1_answer_gpt-4-0314.jsonl"


class WorkloadError(ValueError):
    """A workload file is missing or malformed (the message says which and how to fix it)."""


@dataclass(frozen=True)
class Features:
    """Engine features of one request; ``kind`` names its class in the report ("json", "n", ...)."""

    kind: str
    n: int = 1  # choices forked from one prefill; each produces max_tokens tokens
    temperature: float = 0.0
    seed: int | None = None
    json_schema: str | None = None  # the output must match it; such a row ends at EOS, not max_tokens
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0


@dataclass(frozen=True)
class BenchRequest:
    index: int
    prompt_token_ids: tuple[int, ...]
    max_tokens: int  # exact output length: every system runs greedy with ignore_eos
    arrival_s: float = 0.0  # offset from the start of the run
    priority: int | None = None  # lower = more urgent (engine convention); None = the engine's default
    sla_class: str | None = None
    features: Features | None = None  # None: plain (greedy, EOS ignored, one choice)
    kind: str | None = None  # a scenario's class of request ("short", "long"); the systems never see it

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def choices(self) -> int:
        return self.features.n if self.features else 1


@dataclass
class Workload:
    name: str
    requests: list[BenchRequest]
    description: dict[str, Any] = field(default_factory=dict)

    @property
    def span_s(self) -> float:
        return max((r.arrival_s for r in self.requests), default=0.0)

    @property
    def total_output_tokens(self) -> int:
        return sum(r.max_tokens * r.choices for r in self.requests)

    def summary(self) -> dict[str, Any]:
        prompts = [r.prompt_len for r in self.requests]
        outputs = [r.max_tokens for r in self.requests]
        span = self.span_s
        return {
            "name": self.name,
            "num_requests": len(self.requests),
            "prompt_tokens": _length_stats(prompts),
            "output_tokens": _length_stats(outputs),
            "arrival_span_s": span,
            "offered_rate_req_per_s": (len(self.requests) - 1) / span if span > 0 else None,
            **self.description,
        }


def _length_stats(values: Sequence[int]) -> dict[str, float]:
    if not values:
        return {"min": 0, "mean": 0.0, "max": 0, "total": 0}
    return {"min": min(values), "mean": sum(values) / len(values), "max": max(values), "total": sum(values)}


# --- where the data lives --------------------------------------------------------------------

def default_data_dir() -> Path:
    """``$BATON_DATA_DIR`` or ``../shared/data`` relative to the repository root."""
    env = os.environ.get("BATON_DATA_DIR")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def parse_range(text: str, name: str) -> tuple[int, int]:
    """``"10:130"`` or ``"64"`` -> inclusive (lo, hi); raises ValueError naming ``name``."""
    try:
        parts = [int(p) for p in str(text).split(":")]
    except ValueError:
        raise ValueError(f"{name}: expected LO:HI or N, got {text!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or parts[0] < 1 or parts[1] < parts[0]:
        raise ValueError(f"{name}: expected 1 <= LO <= HI, got {text!r}")
    return parts[0], parts[1]


# --- real-text token source --------------------------------------------------------------------

class TokenSource:
    """Windows of real token ids: cut from one long stream of tokenized text.

    ``take(n, rng)`` returns ``n`` consecutive tokens from a random offset (wrapping), so a
    prompt of any length is real text rather than random ids.
    """

    def __init__(self, tokens: Sequence[int], origin: str) -> None:
        if len(tokens) < 2:
            raise ValueError("TokenSource needs at least two tokens")
        self.tokens = list(tokens)
        self.origin = origin

    def take(self, n: int, rng: random.Random) -> tuple[int, ...]:
        start = rng.randrange(len(self.tokens))
        out = self.tokens[start: start + n]
        while len(out) < n:
            out += self.tokens[: n - len(out)]
        return tuple(out)

    @classmethod
    def from_texts(cls, tokenizer, texts: Iterable[str], origin: str) -> "TokenSource":
        tokens: list[int] = []
        for text in texts:
            tokens.extend(tokenizer.encode(text, add_special_tokens=False))
        return cls(tokens, origin)

    @classmethod
    def synthetic(cls, vocab_size: int, seed: int = 0, size: int = 65536) -> "TokenSource":
        """Random ids (avoiding the low, special ids) when no text corpus is available."""
        rng = random.Random(seed)
        low = min(100, vocab_size // 2)
        return cls([rng.randrange(low, vocab_size) for _ in range(size)], "synthetic random token ids")


def load_token_source(tokenizer, data_dir: Path | None = None, limit: int = 200) -> TokenSource:
    """Tokenized Arena-Hard prompts and answers; random ids (said in ``origin``) if absent."""
    data_dir = data_dir or default_data_dir()
    questions, answers = data_dir / ARENA_QUESTIONS, data_dir / ARENA_ANSWERS
    texts: list[str] = []
    if questions.is_file():
        texts += [q["prompt"] for q in _read_jsonl(questions)[:limit]]
    if answers.is_file():
        texts += [_answer_text(a) for a in _read_jsonl(answers)[:limit]]
    texts = [t for t in texts if t]
    if texts:
        return TokenSource.from_texts(tokenizer, texts, f"Arena-Hard prompts+answers ({data_dir})")
    return TokenSource.synthetic(len(tokenizer), 0)


# --- synthetic lengths -----------------------------------------------------------------------

def offline_workload(source: TokenSource, num_requests: int = 32, prompt_range: tuple[int, int] = (10, 130),
                     output_range: tuple[int, int] = (8, 256), seed: int = 0) -> Workload:
    """All requests at t=0: the batch-throughput case."""
    rng = random.Random(seed)
    requests = [BenchRequest(i, source.take(rng.randint(*prompt_range), rng), rng.randint(*output_range))
                for i in range(num_requests)]
    return Workload("offline", requests, {
        "source": source.origin, "seed": seed,
        "prompt_len_range": list(prompt_range), "output_len_range": list(output_range)})


def poisson_workload(source: TokenSource, rate: float, num_requests: int = 32,
                     prompt_range: tuple[int, int] = (10, 130), output_range: tuple[int, int] = (8, 256),
                     seed: int = 0) -> Workload:
    """Exponential inter-arrival times at ``rate`` requests/s (first request at t=0)."""
    if rate <= 0:
        raise ValueError("rate: must be > 0 requests/s")
    base = offline_workload(source, num_requests, prompt_range, output_range, seed)
    rng = random.Random(seed + 1)
    t, requests = 0.0, []
    for request in base.requests:
        requests.append(replace(request, arrival_s=t))
        t += rng.expovariate(rate)
    return Workload("poisson", requests, {**base.description, "rate_req_per_s": rate})


def scale_tokens(count: int, scale: float, cap: int) -> int:
    """``count / scale`` rounded, clamped to [1, cap]."""
    return max(1, min(cap, int(round(count / scale))))


def trace_workload(rows: Sequence[TraceRow], source: TokenSource, *, num_requests: int = 48,
                   start_s: float = 0.0, prompt_scale: float = 8.0, output_scale: float = 4.0,
                   time_scale: float = 1.0, max_prompt: int = 512, max_output: int = 256, seed: int = 0,
                   origin: str = "") -> Workload:
    """``num_requests`` consecutive rows from ``start_s``; token counts divided, times multiplied.

    Arrivals are replayed relative to the first selected row, times ``time_scale``
    (0.5 = twice as fast as the trace).
    """
    if prompt_scale <= 0 or output_scale <= 0 or time_scale <= 0:
        raise ValueError("token and time scales must be > 0")
    selected = [r for r in rows if r.t >= start_s][:num_requests]
    if not selected:
        raise WorkloadError(f"no trace rows at or after {start_s} s")
    rng = random.Random(seed)
    t0 = selected[0].t
    requests = [BenchRequest(i, source.take(scale_tokens(r.context_tokens, prompt_scale, max_prompt), rng),
                             scale_tokens(r.generated_tokens, output_scale, max_output),
                             arrival_s=(r.t - t0) * time_scale)
                for i, r in enumerate(selected)]
    native_span = selected[-1].t - t0
    return Workload("trace", requests, {
        "source": origin, "prompt_text": source.origin, "trace_start_s": start_s,
        "prompt_token_scale": prompt_scale, "output_token_scale": output_scale,
        "max_prompt_tokens": max_prompt, "max_output_tokens": max_output,
        "time_scale": time_scale,
        "native_rate_req_per_s": (len(selected) - 1) / native_span if native_span > 0 else None,
    })


def with_time_scale(workload: Workload, factor: float, **extra: Any) -> Workload:
    """The same requests with every arrival offset multiplied by ``factor``."""
    if factor <= 0:
        raise ValueError("time scale must be > 0")
    requests = [replace(r, arrival_s=r.arrival_s * factor) for r in workload.requests]
    old = workload.description.get("time_scale", 1.0)
    return Workload(workload.name, requests, {**workload.description, "time_scale": old * factor, **extra})


def time_scale_for_rate(workload: Workload, target_rate: float) -> float:
    """The factor that makes the workload's mean offered rate ``target_rate`` requests/s."""
    span = workload.span_s
    if span <= 0 or len(workload.requests) < 2:
        raise ValueError("the workload has no arrival span to scale")
    if target_rate <= 0:
        raise ValueError("target rate must be > 0")
    native = (len(workload.requests) - 1) / span
    return native / target_rate


def all_at_once(workload: Workload) -> Workload:
    """The same requests, all arriving at t=0 (capacity measurement)."""
    return Workload(workload.name, [replace(r, arrival_s=0.0) for r in workload.requests],
                    {**workload.description, "arrivals": "all at t=0"})


def assign_priorities(workload: Workload, urgent_fraction: float, seed: int = 0,
                      urgent: int = 0, normal: int = 10) -> Workload:
    """Mark a seeded random ``urgent_fraction`` of requests ``urgent``, the rest ``normal``."""
    if not 0 <= urgent_fraction <= 1:
        raise ValueError("urgent fraction must be in [0, 1]")
    rng = random.Random(seed + 7)
    n = len(workload.requests)
    chosen = set(rng.sample(range(n), int(round(urgent_fraction * n))))
    requests = [replace(r, priority=urgent if i in chosen else normal) for i, r in enumerate(workload.requests)]
    return Workload(workload.name, requests, {**workload.description, "urgent_fraction": urgent_fraction,
                                              "urgent_priority": urgent, "normal_priority": normal})


# --- Arena-Hard prompts with real answer lengths ----------------------------------------------------

def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path) as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise WorkloadError(f"{path}:{line_no}: not JSON ({error.msg})") from None
    return rows


def _answer_text(row: dict[str, Any]) -> str:
    """``messages[1].content.answer`` of an Arena-Hard model-answer row ('' if absent)."""
    try:
        content = row["messages"][1]["content"]
    except (KeyError, IndexError, TypeError):
        return ""
    if isinstance(content, dict):
        return str(content.get("answer", ""))
    return str(content or "")


def arena_workload(question_path: Path, answer_path: Path, tokenizer, *, num_requests: int = 32,
                   output_scale: float = 1.0, max_prompt: int = 512, max_output: int = 256,
                   rate: float | None = None, seed: int = 0) -> Workload:
    """Arena-Hard prompts; each output length = its real answer's token length (scaled, capped).

    Questions without an answer are skipped. Prompts longer than ``max_prompt`` tokens are
    cut to their first ``max_prompt`` tokens. ``rate`` None = all at t=0, else Poisson.
    """
    for path in (question_path, answer_path):
        if not Path(path).is_file():
            raise WorkloadError(f"{path} does not exist")
    answers = {row.get("uid"): _answer_text(row) for row in _read_jsonl(answer_path)}
    pairs = [(q["prompt"], answers[q["uid"]]) for q in _read_jsonl(question_path)
             if q.get("uid") in answers and answers[q["uid"]] and q.get("prompt")]
    if not pairs:
        raise WorkloadError(f"no question in {question_path} has an answer in {answer_path}")
    rng = random.Random(seed)
    rng.shuffle(pairs)
    arrivals = random.Random(seed + 1)
    t, requests = 0.0, []
    for i, (prompt, answer) in enumerate(pairs[:num_requests]):
        prompt_ids = tuple(tokenizer.encode(prompt, add_special_tokens=False)[:max_prompt]) or (0,)
        answer_len = len(tokenizer.encode(answer, add_special_tokens=False))
        requests.append(BenchRequest(i, prompt_ids, scale_tokens(answer_len, output_scale, max_output),
                                     arrival_s=t))
        if rate:
            t += arrivals.expovariate(rate)
    return Workload("prompts", requests, {
        "source": f"{question_path.name} + {answer_path.name}", "seed": seed,
        "output_len": "token length of the recorded answer", "output_token_scale": output_scale,
        "max_prompt_tokens": max_prompt, "max_output_tokens": max_output,
        "rate_req_per_s": rate, "arrivals": "poisson" if rate else "all at t=0"})


# --- generic JSONL ------------------------------------------------------------------------------

def jsonl_workload(path: Path, tokenizer, vocab_size: int | None = None) -> Workload:
    """One request per line: ``prompt`` (text) or ``prompt_token_ids``, ``max_tokens``, and
    optional ``arrival_s`` (default 0), ``priority`` (int), ``sla_class`` (str)."""
    path = Path(path)
    if not path.is_file():
        raise WorkloadError(f"{path} does not exist")
    requests = []
    for i, row in enumerate(_read_jsonl(path)):
        where = f"{path}: request {i}"
        if not isinstance(row, dict):
            raise WorkloadError(f"{where}: must be a JSON object")
        if "prompt_token_ids" in row:
            ids = row["prompt_token_ids"]
            if (not isinstance(ids, list) or not ids
                    or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)
                    or (vocab_size is not None and max(ids) >= vocab_size)):
                raise WorkloadError(f"{where}: prompt_token_ids must be a non-empty list of token ids")
            prompt = tuple(ids)
        elif isinstance(row.get("prompt"), str) and row["prompt"]:
            prompt = tuple(tokenizer.encode(row["prompt"], add_special_tokens=False))
        else:
            raise WorkloadError(f"{where}: needs a non-empty 'prompt' or 'prompt_token_ids'")
        max_tokens = row.get("max_tokens")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise WorkloadError(f"{where}: max_tokens must be an integer >= 1")
        arrival = row.get("arrival_s", 0.0)
        if not isinstance(arrival, (int, float)) or isinstance(arrival, bool) or arrival < 0:
            raise WorkloadError(f"{where}: arrival_s must be a number >= 0")
        priority = row.get("priority")
        if priority is not None and (not isinstance(priority, int) or isinstance(priority, bool)):
            raise WorkloadError(f"{where}: priority must be an integer")
        sla_class = row.get("sla_class")
        if sla_class is not None and not isinstance(sla_class, str):
            raise WorkloadError(f"{where}: sla_class must be a string")
        requests.append(BenchRequest(i, prompt, max_tokens, float(arrival), priority, sla_class))
    if not requests:
        raise WorkloadError(f"{path}: no requests")
    requests.sort(key=lambda r: (r.arrival_s, r.index))
    requests = [replace(r, index=i) for i, r in enumerate(requests)]
    return Workload("jsonl", requests, {"source": str(path)})
