"""Fixtures for the sidecar server tests.

One engine (the real embedded model, loaded once per session by ``tests/conftest.py``'s
``real_model``) hosted with every test app on a dedicated event-loop thread, so test code can use
real blocking clients (the ``openai`` package, ``requests``) or its own asyncio loop against real
loopback sockets. The incumbent is a real third-party server, ``transformers serve
--continuous-batching`` (``hf_incumbent``); a ``baton-sidecar serve`` subprocess (``incumbent``) plays it
only where the test needs the incumbent's own OpenTelemetry spans, which ``transformers serve`` does
not export.
"""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web

from baton_sidecar.config import EngineConfig, PolicyConfig, RouterConfig, ServerConfig
from baton_sidecar.server.app import init_app
from baton_sidecar.server.tracing import Tracing
from hf_incumbent import TransformersServe
from server_helpers import MODEL_NAME, OTLPReceiver, ServerThread, SidecarProcess


@pytest.fixture(scope="session")
def server_thread():
    st = ServerThread()
    yield st
    st.close()


@pytest.fixture(scope="session")
def engine(server_thread, real_model):
    """The real engine over the real embedded model, started once per session."""
    from baton_sidecar.engine import AsyncEngine

    async def start():
        eng = AsyncEngine(real_model, EngineConfig(), PolicyConfig())
        await eng.start()
        return eng

    eng = server_thread.call(start(), timeout=300)
    yield eng
    server_thread.call(eng.shutdown(drain_timeout_s=5), timeout=60)


@pytest.fixture
def make_server(server_thread, engine):
    """Factory: start an app on a free loopback port, return (base_url, app). Stopped at teardown."""
    runners: list[web.AppRunner] = []

    def make(server: ServerConfig | None = None, router: RouterConfig | None = None,
             policy: PolicyConfig | None = None, tracing: Tracing | None = None,
             engine_override: Any = "default", **kwargs) -> tuple[str, web.Application]:
        eng = engine if engine_override == "default" else engine_override
        app = server_thread.run_sync(lambda: init_app(
            eng, server or ServerConfig(served_model_name=MODEL_NAME), router or RouterConfig(),
            policy or PolicyConfig(), tracing=tracing or Tracing(None), **kwargs))
        runner, url = server_thread.start_app(app)
        runners.append(runner)
        return url, app

    yield make
    for runner in reversed(runners):
        server_thread.stop_app(runner)


@pytest.fixture
def server(make_server):
    """A plain sidecar (no incumbent, no admin) at its base URL."""
    url, _ = make_server()
    return url


@pytest.fixture(scope="session")
def otlp_receiver(server_thread):
    receiver = OTLPReceiver(server_thread)
    yield receiver
    receiver.close()


@pytest.fixture(scope="session")
def incumbent(otlp_receiver):
    """A real incumbent: a second sidecar serving the same model with run-to-completion batching.

    It exports its own spans to the session's OTLP receiver, configured only through the standard
    OTEL_* variables, so trace propagation can be followed across the process boundary.
    """
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.url, "OTEL_SERVICE_NAME": "incumbent",
           "OTEL_BSP_SCHEDULE_DELAY": "100"}
    proc = SidecarProcess("--batching", "run_to_completion", "--served-model-name", MODEL_NAME,
                          env=env)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def hf_incumbent():
    """``transformers serve --continuous-batching`` serving the embedded model as ``MODEL_NAME``."""
    proc = TransformersServe(MODEL_NAME)
    yield proc
    proc.stop()
