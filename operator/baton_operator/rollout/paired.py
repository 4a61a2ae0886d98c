"""The shadow stage's evidence: each sidecar's ``paired`` block of ``/baton/ab/report`` (``PairedReport``)
and the sidecars together (``PairedView``); the gate on them is ``gates.shadow_check``.

Pure. While shadowing, a sidecar copies a share of the requests the incumbent serves to Baton and pairs
the two answers to the same prompt; its report then carries::

    "paired": {"pairs": int, "verdict": "better" | "not_worse" | "worse" | "insufficient", "basis": str,
               "metric": "e2e", "margin_pct": float, "metrics": {...}, "agreement": {...}, "contention": {...}}

The verdict is the sidecar's own, over its own pairs: it sends no raw pairs, so the pods cannot be pooled
the way the weighted steps pool latencies. The sidecars together are judged by the most cautious of their
verdicts: ``worse`` if any says so, ``insufficient`` if any has not decided (or sends no block: a sidecar
that predates shadow mode), ``better`` only if all say so, else ``not_worse``. Pairs are summed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

BETTER, NOT_WORSE, WORSE, INSUFFICIENT = "better", "not_worse", "worse", "insufficient"
VERDICTS = (BETTER, NOT_WORSE, WORSE, INSUFFICIENT)
PASSING = (BETTER, NOT_WORSE)
NO_BLOCK = "the report has no paired block (a sidecar without shadow mode?)"


@dataclass(frozen=True)
class PairedReport:
    """One sidecar's ``paired`` block; ``block`` is kept as sent, for the status."""

    pairs: int = 0
    verdict: str = INSUFFICIENT
    basis: str = NO_BLOCK
    block: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, block: Any) -> "PairedReport":
        """A report's ``paired`` value; absent or malformed counts as no pairs, undecided."""
        if not isinstance(block, Mapping):
            return cls()
        pairs, verdict = block.get("pairs"), block.get("verdict")
        if isinstance(pairs, bool) or not isinstance(pairs, int) or pairs < 0 or verdict not in VERDICTS:
            return cls(basis=f"unreadable paired block (pairs {pairs!r}, verdict {verdict!r})", block=dict(block))
        return cls(pairs, verdict, str(block.get("basis") or ""), dict(block))


@dataclass(frozen=True)
class PairedView:
    """Every sidecar's paired statistics together: summed pairs and the most cautious verdict."""

    pairs: int
    verdict: str
    basis: str  # why the verdict: the deciding sidecar's own sentence
    sidecars: Mapping[str, PairedReport]  # by URL

    @classmethod
    def of(cls, reports: Mapping[str, PairedReport]) -> "PairedView":
        if not reports:
            return cls(0, INSUFFICIENT, "no sidecar reported", {})
        pairs = sum(r.pairs for r in reports.values())
        for verdict in (WORSE, INSUFFICIENT):
            deciding = [(url, r) for url, r in sorted(reports.items()) if r.verdict == verdict]
            if deciding:
                return cls(pairs, verdict, _basis(deciding, len(reports)), dict(reports))
        verdict = BETTER if all(r.verdict == BETTER for r in reports.values()) else NOT_WORSE
        return cls(pairs, verdict, _basis(sorted(reports.items()), len(reports)), dict(reports))

    def to_status(self) -> dict[str, Any]:
        """``status.rollout.analysis.paired``: the verdict, and each sidecar's block as it sent it."""
        return {"pairs": self.pairs, "verdict": self.verdict, "basis": self.basis,
                "sidecars": {url: dict(r.block) or {"pairs": 0, "verdict": r.verdict, "basis": r.basis}
                             for url, r in sorted(self.sidecars.items())}}


def _basis(deciding: Sequence[tuple[str, PairedReport]], pods: int) -> str:
    url, first = deciding[0]
    if pods == 1:
        return first.basis
    more = f" (and {len(deciding) - 1} more)" if len(deciding) > 1 else ""
    return f"{url}: {first.basis}{more}"

