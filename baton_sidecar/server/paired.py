"""Paired statistics from shadow traffic: the same request on both arms, compared request by request.

A shadowed request (``shadow.py``) is answered by the incumbent and also run on Baton, so each one
yields a pair. Differences are taken per pair (Baton minus incumbent, seconds: negative means Baton
was faster), which removes what varies between requests (prompt and output lengths, content) and
leaves what the arms do differently. A verdict therefore needs far fewer requests than comparing
two independent samples (the unpaired A/B in ``abstats``).

Per metric (TTFT, e2e, per-output-token latency): the median and p95 of the differences with their
distribution-free CIs (``stats.percentile_ci``), the share of pairs where Baton was faster, an exact
two-sided sign test, and (``?samples=true`` reports only) a histogram of the differences. Greedy
pairs also give output agreement: identical text, else a normalised word-level edit distance.

The verdict is on e2e: ``better`` when the median difference's CI lies below zero, ``not_worse``
when it lies below ``MARGIN_PCT`` of the incumbent's median e2e, ``worse`` when it lies above that
margin, else (or under ``MIN_PAIRS`` pairs) ``insufficient``.

Both arms share the pod's CPU/GPU, so shadow latencies are measured under contention; each pair
records the other arm's in-flight count when it started, and the block reports their means.
"""

from __future__ import annotations

import collections
import statistics
import threading
from dataclasses import dataclass
from typing import Any, Sequence

from baton_sidecar import stats

MIN_PAIRS = 20  # fewer: the verdict is "insufficient" whatever the CIs say
MARGIN_PCT = 10.0  # Baton's median e2e may exceed the incumbent's by this share and be "not worse"
EDIT_WORDS = 256  # edit distance over at most this many words of each text (quadratic cost)
HISTOGRAM_BINS = 20  # of each metric's differences (the A/B page draws them)
BETTER, NOT_WORSE, WORSE, INSUFFICIENT = "better", "not_worse", "worse", "insufficient"


@dataclass(frozen=True)
class ArmTiming:
    """One arm's answer to a shadowed request; seconds from its arrival at the sidecar."""

    ttft_s: float | None
    e2e_s: float
    completion_tokens: int | None
    text: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or not self.completion_tokens or self.completion_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.completion_tokens - 1)


@dataclass(frozen=True)
class Pair:
    baton: ArmTiming
    incumbent: ArmTiming
    greedy: bool
    incumbent_in_flight: int  # the incumbent's requests in flight when the pair started
    baton_in_flight: int  # the engine's requests (running and waiting) then
    edit_distance: float | None = None  # greedy pairs: ``output_distance`` of the two texts

    def difference(self, metric: str) -> float | None:
        a, b = getattr(self.baton, f"{metric}_s"), getattr(self.incumbent, f"{metric}_s")
        return None if a is None or b is None else a - b


def output_distance(greedy: bool, baton: ArmTiming, incumbent: ArmTiming) -> float | None:
    """0 for identical texts, 1 for nothing in common; None unless greedy with both texts.
    Up to EDIT_WORDS² steps: run it off the event loop."""
    if not greedy or baton.text is None or incumbent.text is None:
        return None
    return 0.0 if baton.text == incumbent.text else word_edit_distance(baton.text, incumbent.text)


def word_edit_distance(a: str, b: str) -> float:
    """Levenshtein distance over words, divided by the longer text's word count (first EDIT_WORDS)."""
    x, y = a.split()[:EDIT_WORDS], b.split()[:EDIT_WORDS]
    if not x and not y:
        return 0.0 if a == b else 1.0
    previous = list(range(len(y) + 1))
    for i, word in enumerate(x, 1):
        current = [i]
        for j, other in enumerate(y, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (word != other)))
        previous = current
    return previous[-1] / max(len(x), len(y))


def sign_test(differences: Sequence[float]) -> float | None:
    """Exact two-sided sign test p-value of "the median difference is zero" (ties dropped)."""
    below = sum(d < 0 for d in differences)
    above = sum(d > 0 for d in differences)
    n = below + above
    if n == 0:
        return None
    tail = stats.binomial_tail(n, 0.5, max(below, above))  # P(X >= the larger count)
    return min(1.0, 2.0 * tail)


def histogram(ordered: Sequence[float], bins: int = HISTOGRAM_BINS) -> dict[str, list]:
    """Equal-width bins from the smallest to the largest of ``ordered`` (ascending): ``edges_s`` has
    bins + 1 ascending edges, ``counts`` the values in each [edge, next edge), the last bin closed.
    One bin when all values are equal; none for no values."""
    if not ordered:
        return {"edges_s": [], "counts": []}
    low, high = ordered[0], ordered[-1]
    if low == high:
        return {"edges_s": [low, high], "counts": [len(ordered)]}
    width = (high - low) / bins
    counts = [0] * bins
    for d in ordered:
        counts[min(int((d - low) / width), bins - 1)] += 1
    return {"edges_s": [low + i * width for i in range(bins)] + [high], "counts": counts}


def summarize_differences(differences: Sequence[float]) -> dict[str, Any]:
    ordered = sorted(differences)
    n = len(ordered)
    if n == 0:
        return {"n": 0, "median_diff_s": None, "median_ci95": None, "p95_diff_s": None, "p95_ci95": None,
                "baton_faster_share": None, "p_value": None}
    return {"n": n,
            "median_diff_s": stats.percentile(ordered, 50), "median_ci95": list(stats.percentile_ci(ordered, 50)),
            "p95_diff_s": stats.percentile(ordered, 95), "p95_ci95": list(stats.percentile_ci(ordered, 95)),
            "baton_faster_share": sum(d < 0 for d in ordered) / n, "p_value": sign_test(ordered)}


def paired_verdict(e2e: dict[str, Any], incumbent_median_s: float | None,
                   margin_pct: float = MARGIN_PCT, min_pairs: int = MIN_PAIRS) -> tuple[str, str]:
    """(verdict, its basis in words) from the e2e differences' summary."""
    n = e2e["n"]
    if n < min_pairs or incumbent_median_s is None:
        return INSUFFICIENT, f"{n} pairs; a verdict needs {min_pairs}"
    low, high = e2e["median_ci95"]
    allowed = incumbent_median_s * margin_pct / 100
    span = (f"median e2e difference {e2e['median_diff_s'] * 1000:+.0f} ms, 95% CI "
            f"[{low * 1000:+.0f} ms, {high * 1000:+.0f} ms] over {n} pairs")
    if high < 0:
        return BETTER, f"Baton faster: {span}"
    if high <= allowed:
        return NOT_WORSE, f"within the {margin_pct:g}% margin (+{allowed * 1000:.0f} ms): {span}"
    if low > allowed:
        return WORSE, f"slower than the {margin_pct:g}% margin (+{allowed * 1000:.0f} ms) allows: {span}"
    return INSUFFICIENT, f"the CI straddles the {margin_pct:g}% margin (+{allowed * 1000:.0f} ms): {span}"


def paired_block(pairs: Sequence[Pair], margin_pct: float = MARGIN_PCT, min_pairs: int = MIN_PAIRS,
                 histograms: bool = False) -> dict[str, Any]:
    """The report's ``paired`` block for ``pairs``; ``histograms`` adds each metric's ``histogram``
    (only to ``?samples=true`` reports: the operator keeps plain reports' blocks in its status)."""
    metrics = {}
    for metric in ("ttft", "e2e", "tpot"):
        differences = [d for p in pairs if (d := p.difference(metric)) is not None]
        metrics[metric] = summarize_differences(differences)
        if histograms:
            metrics[metric]["histogram"] = histogram(sorted(differences))
    incumbent_e2e = [p.incumbent.e2e_s for p in pairs]
    verdict, basis = paired_verdict(metrics["e2e"], statistics.median(incumbent_e2e) if incumbent_e2e else None,
                                    margin_pct, min_pairs)
    distances = [p.edit_distance for p in pairs if p.edit_distance is not None]
    return {
        "pairs": len(pairs), "verdict": verdict, "basis": basis, "metric": "e2e", "margin_pct": margin_pct,
        "metrics": metrics,
        "agreement": {"greedy_pairs": len(distances),
                      "identical_share": sum(d == 0 for d in distances) / len(distances) if distances else None,
                      "mean_edit_distance": stats.mean(distances)},
        "contention": {"mean_incumbent_in_flight": stats.mean([p.incumbent_in_flight for p in pairs]),
                       "mean_baton_in_flight": stats.mean([p.baton_in_flight for p in pairs])},
    }


class PairedStats:
    """The last ``window`` pairs (thread-safe: pairs are recorded on the loop, reports may be built
    anywhere)."""

    def __init__(self, window: int = 5000) -> None:
        self._pairs: collections.deque[Pair] = collections.deque(maxlen=window)
        self._lock = threading.Lock()
        self.shadowed = 0  # shadow copies started
        self.skipped: collections.Counter[str] = collections.Counter()  # not shadowed, by reason

    def record(self, pair: Pair) -> None:
        with self._lock:
            self._pairs.append(pair)

    def reset(self) -> None:
        with self._lock:
            self._pairs.clear()
            self.shadowed = 0
            self.skipped.clear()

    def block(self, histograms: bool = False) -> dict[str, Any]:
        with self._lock:
            pairs = list(self._pairs)
            shadowed, skipped = self.shadowed, dict(self.skipped)
        return paired_block(pairs, histograms=histograms) | {"shadowed": shadowed, "skipped": skipped}
