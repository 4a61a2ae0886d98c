"""Which requests take part in the A/B split, and the tally of those that do not.

With an incumbent configured, the sidecar is a drop-in: whatever Baton cannot serve goes to the
incumbent untouched, and only requests *both* arms can serve are split by weight and sampled for
the A/B statistics. A request is ineligible for one reason, named so users can see what keeps
traffic out of the pilot:

- ``unsupported:<field>``: a feature Baton cannot honour yet (``suffix``, the legacy ``functions``, ...);
- ``invalid:<field>``: a body Baton's parser refuses (malformed JSON is ``invalid:body``); the
  client gets the incumbent's own answer to it;
- ``other_model``: a ``model`` other than Baton's served name (a LoRA adapter of the incumbent);
- ``body_too_large``: a body over ``--max-body-bytes`` (streamed to the incumbent unread);
- ``other_route``: any path the sidecar does not own (``/v1/embeddings``, ``/tokenize``, ...).

Field names are normalised (list indices dropped: ``messages[3].content`` -> ``messages.content``)
so the reasons form a small, fixed set, fit for a Prometheus label and a report anyone may read: a
path through the client's own keys (an unpaired surrogate's, ``metadata.<key>``) is never one, nor
is any name that is not shaped like an API field (lowercase letters and underscores).
"""

from __future__ import annotations

import itertools
import re
import threading
from collections import Counter
from typing import Any

from baton_sidecar.server.errors import APIError

OTHER_MODEL = "other_model"
OTHER_ROUTE = "other_route"
BODY_TOO_LARGE = "body_too_large"
TOP_REASONS = 10  # reasons listed in the report, most frequent first

MAX_FIELD_DEPTH = 3  # e.g. tools.function.parameters

_INDEX = re.compile(r"\[\d+\]")
_API_NAME = re.compile(r"[a-z][a-z_]{0,39}")  # how OpenAI's (and vLLM's) request fields are spelled


def refusal_reason(err: APIError) -> str:
    """The ineligibility reason for a request Baton's parser (or engine) refused with ``err``."""
    if err.refusal is not None:
        return err.refusal
    kind = "unsupported" if err.code == "unsupported_value" else "invalid"
    steps = _INDEX.sub("", err.param or "").split(".")[:MAX_FIELD_DEPTH]
    known = list(itertools.takewhile(_API_NAME.fullmatch, steps))  # up to the first that is not a field's
    return f"{kind}:{'.'.join(known) or 'body'}"


class EligibilityCounts:
    """Totals since start: requests that took part in the split, and the rest by reason.

    Thread-safe: the report is built on a worker thread while handlers record on the loop.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.eligible = 0
        self.ineligible: Counter[str] = Counter()

    def record_eligible(self) -> None:
        with self._lock:
            self.eligible += 1

    def record_ineligible(self, reason: str) -> None:
        with self._lock:
            self.ineligible[reason] += 1

    def report(self) -> dict[str, Any]:
        """``/ab/report``'s ``eligible`` count and ``ineligible`` block; shares are of all requests
        that reached the router (eligible + ineligible), None before the first."""
        with self._lock:
            eligible, by_reason = self.eligible, Counter(self.ineligible)
        ineligible = sum(by_reason.values())
        total = eligible + ineligible

        def share(n: int) -> float | None:
            return round(n / total, 4) if total else None

        return {
            "eligible": {"count": eligible, "share": share(eligible)},
            "ineligible": {
                "count": ineligible, "share": share(ineligible),
                "top_reasons": [{"reason": r, "count": n, "share": share(n)}
                                for r, n in by_reason.most_common(TOP_REASONS)],
            },
        }
