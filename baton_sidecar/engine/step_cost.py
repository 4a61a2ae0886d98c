"""A live model of what an engine step costs, to size prefill chunks by time.

A step's seconds are modelled as linear in four counts of the work it does (``StepShape``)::

    seconds = theta . (forwards, tokens / 1e3, logit rows / 1e3, attention pairs / 1e6)

- ``forwards``: model forward passes (each reads every weight once: the CPU's floor);
- ``tokens``: query tokens through the linear layers;
- ``logit rows``: positions the output head computes (a sizeable share for small models);
- ``attention pairs``: query-key pairs attended (a decode row: its context; a chunk of ``C``
  tokens after ``S``: ``C * S + C * (C + 1) / 2``).

``theta`` starts from a prior measured on the model at start-up (``calibrate``: a handful of
forwards) and follows the engine's own steps: each observation updates exponentially decayed
normal equations, solved with a ridge pull towards the prior, so a run of alike steps (which
cannot tell the counts apart) leaves the other coefficients where the prior put them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache

from .step import StepPlan, StepResults

SCALE = np.array([1.0, 1e-3, 1e-3, 1e-6])  # counts -> features of comparable size
TYPICAL = np.array([1.0, 0.05, 0.01, 0.3])  # a typical step's features, for the prior's weight
PRIOR_STEPS = 1.0  # the prior weighs as much as one typical step
DECAY = 0.98  # per observation: the fit follows the last fifty steps or so


@dataclass(frozen=True)
class StepShape:
    forwards: int = 0
    tokens: int = 0
    logit_rows: int = 0
    pairs: int = 0

    def __add__(self, other: "StepShape") -> "StepShape":
        return StepShape(self.forwards + other.forwards, self.tokens + other.tokens,
                         self.logit_rows + other.logit_rows, self.pairs + other.pairs)

    def features(self) -> np.ndarray:
        return np.array([self.forwards, self.tokens, self.logit_rows, self.pairs], dtype=float) * SCALE


def decode_shape(rows: int, context: int) -> StepShape:
    """``rows`` decode rows, each attending to ``context`` columns (no forward counted)."""
    return StepShape(0, rows, rows, rows * context)


def prompt_shape(start: int, count: int, last: bool) -> StepShape:
    """Prompt tokens ``[start, start + count)``; the last part's last token computes logits."""
    return StepShape(0, count, int(last), count * start + count * (count + 1) // 2)


def executed_shape(plan: StepPlan, results: StepResults, packs_prompts: bool) -> StepShape:
    """The work an executed step did, for ``StepCostModel.observe``: its decode rows, its prompts
    and chunks, and its forwards (packed prompts share one; fused, the decode rows' too)."""
    shape = StepShape()
    if results.decode_rows:
        shape = shape + decode_shape(results.decode_rows, results.decode_context)
    prompts = bool(plan.prefill or plan.chunks)
    if packs_prompts:
        forwards = bool(results.decode_rows) + (prompts and not results.fused)
    else:
        forwards = bool(results.decode_rows) + bool(plan.prefill) + len(plan.chunks)
    shape = shape + StepShape(forwards=forwards)
    for request in plan.prefill:
        shape = shape + prompt_shape(0, request.num_prefill_tokens, True)
    for chunk in plan.chunks:
        shape = shape + prompt_shape(chunk.start, chunk.stop - chunk.start, chunk.last)
    return shape


FORWARD = StepShape(forwards=1)


class StepCostModel:
    def __init__(self, prior: np.ndarray) -> None:
        self.prior = np.maximum(np.asarray(prior, dtype=float), 0.0)
        self.theta = self.prior.copy()
        self._ridge = np.diag(PRIOR_STEPS * TYPICAL ** 2)
        self._gram = np.zeros((4, 4))
        self._moment = np.zeros(4)
        self.observed = 0

    def predict(self, shape: StepShape) -> float:
        """Seconds."""
        return float(self.theta @ shape.features())

    def observe(self, shape: StepShape, seconds: float) -> None:
        x = shape.features()
        self._gram = DECAY * self._gram + np.outer(x, x)
        self._moment = DECAY * self._moment + x * seconds
        theta = np.linalg.solve(self._gram + self._ridge, self._moment + self._ridge @ self.prior)
        self.theta = np.maximum(theta, 0.0)  # no count makes a step faster
        self.observed += 1


# --- the prior ------------------------------------------------------------------------------

PRIOR_ATTRIBUTE = "_baton_step_cost_prior"  # cached on the model: one calibration per model


@torch.inference_mode()
def calibrate(model: torch.nn.Module, device: torch.device, tokens: int = 32, prefix: int = 256) -> np.ndarray:
    """Least-squares ``theta`` from a few timed forwards of ``model`` (about a second on a CPU)."""
    cached = getattr(model, PRIOR_ATTRIBUTE, None)
    if cached is not None:
        return cached
    vocab = min(int(model.config.vocab_size), 1000)
    runs: list[tuple[StepShape, float]] = []

    def timed(count: int, cache: DynamicCache, keep: int) -> None:
        past = cache.get_seq_length()
        ids = torch.randint(vocab, (1, count), device=device)
        positions = torch.arange(past, past + count, device=device)[None]
        start = time.perf_counter()
        model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=keep)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        runs.append((FORWARD + prompt_shape(past, count, False) + StepShape(logit_rows=keep or count),
                     time.perf_counter() - start))

    fresh = (lambda: DynamicCache(config=model.config))
    timed(tokens, fresh(), 1)  # warm-up, dropped
    runs.clear()
    timed(1, fresh(), 1)
    timed(tokens, fresh(), 1)
    timed(tokens, fresh(), 0)  # every position's logits
    long = fresh()
    timed(prefix, long, 1)
    timed(tokens, long, 1)  # after the prefix: attention pairs
    features = np.stack([shape.features() for shape, _ in runs])
    seconds = np.array([s for _, s in runs])
    theta = np.maximum(np.linalg.lstsq(features, seconds, rcond=None)[0], 0.0)
    setattr(model, PRIOR_ATTRIBUTE, theta)
    return theta
