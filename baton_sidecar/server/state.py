"""What the sidecar's handlers share: the per-app mutable state and the typed app keys.

Handlers live in several modules (``generate``, ``passthrough``, ``app``); they all reach the app's
parts through these ``web.AppKey``s, which ``app.init_app`` fills in.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from baton_sidecar.config import ServerConfig
from baton_sidecar.server.abstats import ABStats
from baton_sidecar.server.configwatch import ConfigManager, FileWatcher
from baton_sidecar.server.eligibility import EligibilityCounts
from baton_sidecar.server.engine_api import Engine
from baton_sidecar.server.metrics import Metrics
from baton_sidecar.server.oai_response import now
from baton_sidecar.server.profiles import ProfileRing
from baton_sidecar.server.router import Router
from baton_sidecar.server.shadow import Shadow
from baton_sidecar.server.tracing import Tracing


@dataclass
class ServerState:
    """Mutable per-app state (the app itself is frozen once started)."""

    config: ServerConfig
    engine: Engine | None = None  # None while the model loads
    draining: bool = False
    started_at: int = field(default_factory=now)
    in_flight: int = 0
    idle: asyncio.Event | None = None  # set whenever in_flight == 0

    @property
    def ready(self) -> bool:
        return self.engine is not None and bool(self.engine.is_ready) and not self.draining

    def enter(self) -> None:
        self.in_flight += 1
        if self.idle is not None:
            self.idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self.idle is not None:
            self.idle.set()


STATE = web.AppKey("state", ServerState)
METRICS = web.AppKey("metrics", Metrics)
ABSTATS = web.AppKey("abstats", ABStats)
ELIGIBILITY = web.AppKey("eligibility", EligibilityCounts)
ROUTER = web.AppKey("router", Router)
CONFIG = web.AppKey("config", ConfigManager)
TRACING = web.AppKey("tracing", Tracing)
EXECUTOR = web.AppKey("executor", ThreadPoolExecutor)
SESSION = web.AppKey("incumbent_session", aiohttp.ClientSession)
WATCHER = web.AppKey("config_watcher", FileWatcher)
PROFILES = web.AppKey("profiles", ProfileRing)
SHADOW = web.AppKey("shadow", Shadow)
