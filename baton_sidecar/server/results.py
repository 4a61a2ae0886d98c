"""What serving one request on an arm came to, as the sidecar saw it (both arms, one shape)."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web


@dataclass
class ArmResult:
    """Filled in while the answer is relayed; read once it is done (``generate.account``).

    ``ok``: the arm answered (< 500) and the whole answer reached the client. Latencies are
    seconds from the request's arrival at the sidecar.
    """

    status: int = 200
    ok: bool = True
    cancelled: bool = False  # the client went away
    ttft_s: float | None = None
    e2e_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None
    queue_s: float | None = None  # Baton only: waiting before first scheduled
    preemptions: int = 0  # Baton only
    text: str | None = None  # the incumbent's first choice's text (for shadow pairs' agreement)
    response: web.StreamResponse | None = None  # the incumbent's relayed answer (the handler's)

    @property
    def served(self) -> bool:
        """What the A/B statistics count as a success: answered in full with a non-error status."""
        return self.ok and self.status < 400
