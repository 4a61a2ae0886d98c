"""The data of one engine step: the plan, what executing it produced, and what was observed.

::

    plan    = scheduler.schedule(now, batch view)          -> StepPlan     (decides everything)
    results = core executes the plan on the runner         -> StepResults  (never calls the scheduler)
    update  = scheduler.update_from_output(plan, results)  -> StepUpdate   (rows that leave, outputs)
    core removes update.leave from the batch; step_observer(StepRecord) if one is set

Plain dataclasses, no behaviour: the scheduler and the core agree through these alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .request import Request, RequestOutput


@dataclass(frozen=True)
class Preemption:
    """A running request split off the batch. ``mode`` "swap": its K/V go to host memory and come
    back with no recomputation; "recompute": its K/V are dropped and re-prefilled later (always so
    for a prompt whose chunked prefill had not finished: it has no row to swap)."""

    request: Request
    mode: str


@dataclass(frozen=True)
class PrefillChunk:
    """Tokens ``[start, stop)`` of ``request.prefill_token_ids()``, run in the request's own cache."""

    request: Request
    start: int  # = request.num_computed_tokens when planned
    stop: int
    last: bool  # the prompt's last chunk: the request samples its first token and joins the batch
    reason: str = "tokens"  # why it has this size (``budget.Grant.reason``)


@dataclass
class StepPlan:
    """Everything one step does, decided by the scheduler before any model work.

    Executed in field order: preempt, resume, prefill (together, apart from the batch),
    chunks, then one decode pass over every row of the batch; or, ``fused``, prefill and
    chunks ride in the decode pass (one packed forward, see ``packed.py``).
    """

    preempt: list[Preemption] = field(default_factory=list)  # rows split off the batch
    resume: list[Request] = field(default_factory=list)  # swapped rows embedded back
    prefill: list[Request] = field(default_factory=list)  # new or recompute-resumed, prefilled whole
    chunks: list[PrefillChunk] = field(default_factory=list)  # parts of prompts too long for this step
    # Rows decoded this step that were in the batch before it (riders of a run-to-completion
    # batch included) plus the resumed ones. Newcomers that join this step (``prefill``, a
    # last ``chunk``) are decoded with them unless their first token finished them.
    decode: list[Request] = field(default_factory=list)
    fused: bool = False
    predicted_s: float | None = None  # the step cost model's prediction, with a time budget

    @property
    def empty(self) -> bool:
        """Nobody joins or leaves: a plain decode step."""
        return not (self.preempt or self.resume or self.prefill or self.chunks)


@dataclass
class StepResults:
    """What executing a plan produced, handed to ``update_from_output`` once, at the step's end."""

    joined: list[Request] = field(default_factory=list)  # got a row: prefilled (whole or last chunk), unfinished
    finished: list[Request] = field(default_factory=list)  # ended this step (stop, length, error), row or not
    outputs: list[RequestOutput] = field(default_factory=list)  # deltas not yet delivered, in order
    # What the model work cost, for the step observer (the scheduler ignores them).
    prefill_s: float = 0.0
    prefill_tokens: int = 0
    chunk_s: float = 0.0
    chunk_tokens: int = 0
    decode_s: float = 0.0
    decode_rows: int = 0  # rows in the decode forward (dummy rows of row padding excluded)
    fused: bool = False  # prompts rode in the decode forward (a plan's ``fused`` needs rows to ride with)
    decode_context: int = 0  # columns it attends to: the live window plus the new one
    decode_slots: int = 0  # live window before the decode forward: rows x columns
    decode_padding_slots: int = 0  # ... of which padding


@dataclass
class StepUpdate:
    """``update_from_output``'s answer: rows the core removes from the batch, outputs to deliver."""

    leave: list[Request] = field(default_factory=list)
    outputs: list[RequestOutput] = field(default_factory=list)


@dataclass(frozen=True)
class StepRecord:
    """One step as the ``step_observer`` sees it (times from ``time.perf_counter``).

    The step's phases: ``step_s`` >= ``prefill_s`` + ``chunk_s`` + ``decode_s``; the rest is
    planning, sampling, embedding, row removal and output building.
    """

    t: float  # when the step ended
    step_s: float
    prefill_s: float  # a prompts-only forward of whole prompts (fused steps: in decode_s)
    prefill_tokens: int  # tokens of the prompts prefilled whole (real, not padded)
    chunk_s: float  # a prompts-only forward with chunks in it (fused steps: in decode_s)
    chunk_tokens: int
    decode_s: float  # the decode forward (ModelRunner.decode; fused: the whole packed forward)
    decode_rows: int  # 0: no decode this step
    context: int  # columns the decode attended to (live length + the new one)
    padding_ratio: float  # padding share of the live window the decode read
    batch_rows: int  # rows in the batch when the step ended
    preempted: int
    resumed: int
    joined: int
    finished: int
    fused: bool = False  # prompts rode in the decode forward
    predicted_s: float | None = None  # what the step cost model predicted (time budget only)
    chunk_sizes: tuple[int, ...] = ()  # each chunk's tokens ...
    chunk_reasons: tuple[str, ...] = ()  # ... and why that size (``budget``: whole, time, tokens, floor)
