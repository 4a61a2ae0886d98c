"""Everything the sidecar does not serve itself goes to the incumbent, untouched.

With an incumbent configured, the sidecar owns only ``/baton/*`` (its health, readiness, metrics,
A/B report and admin routes) and routes the two generation endpoints; every other method and path
(``/v1/embeddings``, ``/tokenize``, ``/v1/responses``, the incumbent's own ``/health`` and
``/metrics``, ...) is relayed as is and counted as ineligible traffic (``other_route``).
``GET /v1/models`` answers the incumbent's list with Baton's served name added when missing.

With no incumbent, the sidecar stands alone: unknown routes get 404, known routes with another
method 405, and ``/health``, ``/ready`` and ``/metrics`` answer at the root as well, as a vLLM
server's would.
"""

from __future__ import annotations

import json
import time
from typing import Awaitable, Callable

from aiohttp import web

from baton_sidecar.server.errors import APIError
from baton_sidecar.server.oai_response import model_list
from baton_sidecar.server.body import body_stream
from baton_sidecar.server.eligibility import OTHER_ROUTE
from baton_sidecar.server.proxy import IncumbentFailure, Upload, fetch, proxy
from baton_sidecar.server.router import INCUMBENT
from baton_sidecar.server.state import ELIGIBILITY, METRICS, ROUTER, SESSION, STATE
from baton_sidecar.server.tracing import NULL_TRACE

OWN_PREFIX = "/baton/"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def incumbent_failure(app: web.Application, failure: IncumbentFailure) -> APIError:
    """502 (unreachable) or 504 (no answer in time), counted; nothing reached the client yet."""
    app[METRICS].incumbent_failures.labels(failure.kind).inc()
    app[METRICS].refusals.labels(INCUMBENT, "incumbent_" + failure.kind).inc()
    status, code = (504, "incumbent_timeout") if failure.kind == "timeout" else (
        502, "incumbent_unavailable")
    return APIError(status, f"{failure} (Baton's sidecar relays this request to the incumbent)",
                       type="upstream_error", code=code)


async def relay(request: web.Request, body: Upload, reason: str) -> web.StreamResponse:
    """Pass an ineligible request to the incumbent unchanged; counted under ``reason``."""
    app = request.app
    state, metrics = app[STATE], app[METRICS]
    app[ELIGIBILITY].record_ineligible(reason)
    metrics.ineligible.labels(reason).inc()
    state.enter()
    metrics.in_flight.labels(INCUMBENT).inc()
    try:
        result = await proxy(request, app[SESSION], app[ROUTER].config, body, time.monotonic(),
                             NULL_TRACE)
    except IncumbentFailure as failure:
        raise incumbent_failure(app, failure) from None
    finally:
        metrics.in_flight.labels(INCUMBENT).dec()
        state.leave()
    if not result.ok and not result.cancelled:
        metrics.incumbent_failures.labels("status" if result.status >= 500 else "stream").inc()
    return result.response


def make_catch_all(own_routes: dict[str, dict[str, Handler]],
                   standalone_aliases: dict[str, dict[str, Handler]]) -> Handler:
    """The handler of every path no route matched (``own_routes``: path -> method -> handler)."""

    async def catch_all(request: web.Request) -> web.StreamResponse:
        path = request.path
        if request.app[ROUTER].config.incumbent_url is not None and not path.startswith(OWN_PREFIX):
            body = body_stream(request, request.app[STATE].config.body_timeout_s,
                               lambda: request.app[METRICS].http_rejections.labels(
                                   "body_timeout").inc())
            return await relay(request, body, OTHER_ROUTE)
        alias = standalone_aliases.get(path, {})
        handler = alias.get("GET" if request.method == "HEAD" else request.method)
        if handler is not None:
            return await handler(request)
        methods = set(own_routes.get(path, ())) | set(alias)
        if "GET" in methods:
            methods |= {"HEAD"}
        if methods:
            allow = ", ".join(sorted(methods))
            raise APIError(405, f"method {request.method} is not allowed on {path}; use {allow}",
                              code="405", headers={"Allow": allow})
        raise APIError(404, f"no route {request.method} {path}", type="not_found_error",
                          code="404")

    return catch_all


async def models(request: web.Request) -> web.StreamResponse:
    """``GET /v1/models``: Baton's served name, joined to the incumbent's list when there is one."""
    app = request.app
    state = app[STATE]
    engine = state.engine
    max_len = getattr(engine, "max_model_len", None) if engine is not None else None
    own = model_list(state.config.served_model_name, state.started_at, max_len)
    if app[ROUTER].config.incumbent_url is None:
        return web.json_response(own)
    try:
        status, headers, data = await fetch(request, app[SESSION], app[ROUTER].config)
    except IncumbentFailure as failure:
        raise incumbent_failure(app, failure) from None
    listing = _model_listing(data) if status == 200 else None
    ours = own["data"][0]
    if listing is None or any(m.get("id") == ours["id"] for m in listing["data"]):
        # Not a list to join, or Baton's name is in it already: the incumbent's answer as it came.
        headers["x-baton-arm"] = INCUMBENT
        return web.Response(status=status, body=data, headers=headers)
    listing["data"].append(ours)
    return web.json_response(listing)


def _model_listing(data: bytes) -> dict | None:
    try:
        listing = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if isinstance(listing, dict) and isinstance(listing.get("data"), list) and all(
            isinstance(m, dict) for m in listing["data"]):
        return listing
    return None
