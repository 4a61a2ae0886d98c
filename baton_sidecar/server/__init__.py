"""The sidecar's HTTP side: OpenAI-compatible API, A/B router, metrics, tracing, live config."""

from baton_sidecar.server.app import init_app

__all__ = ["init_app"]
