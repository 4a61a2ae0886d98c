"""The operator's liveness and readiness endpoints, served from process start.

kopf's own (``--liveness``) starts only after the startup handlers, and a standby replica waits for the
Lease inside one (``leadership``): kubelet would restart it in a loop. This one answers ``GET /healthz``
as soon as the event loop runs, leader or standby; like kopf's without probe handlers, it proves that
the loop is responsive. Enabled by ``BATON_HEALTH_ADDRESS`` (``host:port``; the chart sets
``0.0.0.0:8081``).

``GET /readyz`` answers the same, for a standby too. Readiness is not leadership: the operator serves
no traffic, so readiness only paces rollouts and disruption budgets, and a standby that never became
ready would stall both (with ``maxUnavailable: 0`` the new pod, a standby until the old leader stops,
must be ready before the old one is stopped).
"""

from __future__ import annotations

from aiohttp import web


async def serve_health(address: str) -> web.AppRunner:
    """Start serving ``/healthz`` and ``/readyz`` on ``host:port``; the caller keeps the runner
    (``cleanup()`` stops it)."""
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        raise ValueError(f"BATON_HEALTH_ADDRESS: expected host:port, got {address!r}")

    async def ok(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/healthz", ok)
    app.router.add_get("/readyz", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host or "0.0.0.0", int(port)).start()
    return runner
