"""A/B split between the in-process Baton engine and the incumbent server.

Arm choice is a pure function of (sticky key, weight): a key hashes to a point u in [0, 100) and goes
to Baton when u < baton_weight. Raising the weight therefore only moves sessions from the incumbent
to Baton, never back, and a session keeps its arm while the weight is unchanged. Requests with no
key draw u at random.

Only requests both arms can serve are split (see ``eligibility``); the proxy is ``proxy``.
"""

from __future__ import annotations

import hashlib
import random
from typing import Callable, Mapping

from baton_sidecar.config import RouterConfig

BATON, INCUMBENT = "baton", "incumbent"


def hash_point(key: str) -> float:
    """A stable point in [0, 100) for a sticky key."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64 * 100.0


def choose_arm(key: str | None, baton_weight: float, incumbent_configured: bool,
               rand: Callable[[], float] = random.random) -> str:
    if not incumbent_configured or baton_weight >= 100:
        return BATON
    if baton_weight <= 0:
        return INCUMBENT
    u = hash_point(key) if key else rand() * 100.0
    return BATON if u < baton_weight else INCUMBENT


def sticky_key(headers: Mapping[str, str], header_name: str, user: str | None) -> str | None:
    """The configured header wins over the body's ``user``; empty values do not count."""
    value = headers.get(header_name) if header_name else None
    if value:
        return f"h:{value}"
    return f"u:{user}" if user else None


class Router:
    """Holds the live ``RouterConfig``; replacing it affects only requests assigned afterwards."""

    def __init__(self, config: RouterConfig, rand: Callable[[], float] = random.random) -> None:
        self.config = config
        self._rand = rand

    def update(self, config: RouterConfig) -> None:
        self.config = config

    def assign(self, headers: Mapping[str, str], user: str | None) -> str:
        cfg = self.config
        key = sticky_key(headers, cfg.sticky_header, user)
        return choose_arm(key, cfg.baton_weight, cfg.incumbent_url is not None, self._rand)
