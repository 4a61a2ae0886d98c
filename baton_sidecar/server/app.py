"""The sidecar's aiohttp application: OpenAI-compatible API, A/B router, metrics, admin.

``init_app(engine, server_config, router_config, policy)`` builds the app; everything it needs lives
under the typed ``web.AppKey``s of ``state``, and what it opens (incumbent client session, config
watcher, tokenizer worker, tracer provider) is a cleanup context, closed in reverse order. The engine's lifetime
belongs to the caller (``serve.py`` or a test fixture): the app only borrows it, and ``engine`` may
be ``None`` while the model is still loading (``attach_engine`` sets it later; until then
/baton/ready answers 503).

Routes: the sidecar owns ``/baton/*`` (``OWN_ROUTES``), routes the two generation endpoints
(``generate``), joins ``GET /v1/models``, and passes every other path to the incumbent when there is
one (``passthrough``). Every failure a client can cause is answered with an OpenAI error body and a
4xx status, never 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

import aiohttp
from aiohttp import web

from baton_sidecar.config import PolicyConfig, RouterConfig, ServerConfig
from baton_sidecar.server.errors import APIError
from baton_sidecar.server.ab_page import ab_page
from baton_sidecar.server.abstats import ABStats, SLATargets, parse_flag, parse_since
from baton_sidecar.server.body import read_whole_body
from baton_sidecar.server.configwatch import (ConfigManager, FileWatcher, LiveConfig, check_bearer,
                                              decode_admin_body)
from baton_sidecar.server.connections import MAX_HEADER_BYTES
from baton_sidecar.server.eligibility import EligibilityCounts
from baton_sidecar.server.engine_api import Engine
from baton_sidecar.server.generate import chat_completions, completions
from baton_sidecar.server.metrics import CONTENT_TYPE, Metrics
from baton_sidecar.server.passthrough import OWN_PREFIX, make_catch_all, models
from baton_sidecar.server.profiles import ProfileRing, export_jsonl, parse_profile_since
from baton_sidecar.server.router import Router
from baton_sidecar.server.paired import PairedStats
from baton_sidecar.server.shadow import Shadow
from baton_sidecar.server.state import (ABSTATS, CONFIG, ELIGIBILITY, EXECUTOR, METRICS, PROFILES,
                                        ROUTER, SESSION, SHADOW, STATE, TRACING, WATCHER, ServerState)
from baton_sidecar.server.tokenize import detokenize, tokenize
from baton_sidecar.server.tracing import Tracing

log = logging.getLogger(__name__)

DEFAULT_SLA_CLASS = "interactive"  # A/B SLA attainment for requests naming no sla_class


def init_app(engine: Engine | None, server_config: ServerConfig, router_config: RouterConfig,
             policy: PolicyConfig, *, tracing: Tracing | None = None,
             watch_interval_s: float = 1.0) -> web.Application:
    """Build the sidecar app. ``policy`` is what the engine was started with; if
    ``server_config.config_file`` is set, that file is read now (a bad file raises ``ValueError``)
    and then watched for changes."""
    app = web.Application(middlewares=[error_middleware])
    state = ServerState(config=server_config, engine=engine)
    metrics = Metrics(lambda: state.engine, model_name=server_config.served_model_name)
    router = Router(router_config)

    def apply_policy(p: PolicyConfig) -> None:
        if state.engine is not None:
            state.engine.apply_policy(p)

    def apply_router(r: RouterConfig) -> None:
        router.update(r)
        metrics.baton_weight.set(r.baton_weight)

    def on_result(source: str, ok: bool) -> None:
        (metrics.config_reloads if ok else metrics.config_reload_errors).labels(source).inc()

    manager = ConfigManager(LiveConfig(policy, router_config), apply_policy, apply_router,
                            on_result)
    metrics.baton_weight.set(router_config.baton_weight)
    app[STATE] = state
    app[METRICS] = metrics
    app[ABSTATS] = ABStats()
    app[SHADOW] = Shadow(PairedStats())
    app[ELIGIBILITY] = EligibilityCounts()
    app[PROFILES] = ProfileRing()
    app[ROUTER] = router
    app[CONFIG] = manager
    app[TRACING] = tracing if tracing is not None else Tracing.from_env()
    if server_config.config_file or server_config.policy_file:
        # One watched file: the full config file if given, else the --policy file.
        watcher = (FileWatcher(server_config.config_file, manager, interval_s=watch_interval_s)
                   if server_config.config_file else
                   FileWatcher(server_config.policy_file, manager, interval_s=watch_interval_s,
                               section="policy"))
        watcher.load_initial()
        app[WATCHER] = watcher

    for path, methods in OWN_ROUTES.items():
        for method, handler in methods.items():
            if method == "GET":
                app.router.add_get(path, handler)  # and HEAD
            else:
                app.router.add_route(method, path, handler)
    app.router.add_route("*", "/{tail:.*}", make_catch_all(OWN_ROUTES, STANDALONE_ALIASES))

    app.cleanup_ctx.extend([_tracer, _idle_event, _tokenizer_worker, _incumbent_session, _shadow_copies,
                            _config_watcher])
    return app


def attach_engine(app: web.Application, engine: Engine) -> None:
    """Hand the app its engine once the model is loaded; applies the live policy if it moved on."""
    state = app[STATE]
    state.engine = engine
    live = app[CONFIG].current.policy
    if live != app[CONFIG].startup.policy:
        engine.apply_policy(live)


# -- what the app opens: each a cleanup context (opened at start-up, closed at clean-up) -------------

async def _shadow_copies(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[SHADOW].close()  # copies still running are cancelled (their rows freed)


async def _idle_event(app: web.Application) -> AsyncIterator[None]:
    app[STATE].idle = asyncio.Event()
    app[STATE].idle.set()
    yield


async def _incumbent_session(app: web.Application) -> AsyncIterator[None]:
    # Unlimited connections: concurrency is bounded by admission control, not by the pool.
    # Relayed bytes stay as the incumbent sent them, and only the client's own headers go out.
    # One connection per request: the incumbent is on loopback, where a connection costs little,
    # and a pooled one can go stale without notice (uvicorn closes after a 500 without saying so).
    # No cookie jar: a Set-Cookie meant for one client must never ride along on another's request.
    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True), auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(), max_line_size=MAX_HEADER_BYTES, max_field_size=MAX_HEADER_BYTES,
            skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type")) as session:
        app[SESSION] = session
        yield


async def _tokenizer_worker(app: web.Application) -> AsyncIterator[None]:
    """One thread for chat templates and long prompts (see ``local.prepare_prompt``)."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="baton-tokenize")
    app[EXECUTOR] = executor
    yield
    executor.shutdown(wait=False, cancel_futures=True)


async def _config_watcher(app: web.Application) -> AsyncIterator[None]:
    if WATCHER not in app:
        yield
        return
    app[WATCHER].start()
    yield
    await app[WATCHER].stop()


async def _tracer(app: web.Application) -> AsyncIterator[None]:
    yield
    await asyncio.to_thread(app[TRACING].shutdown)  # flushes pending spans


async def drain(app: web.Application, timeout_s: float) -> bool:
    """Refuse new work (503, /ready fails) and wait for in-flight requests; True if all finished."""
    state = app[STATE]
    state.draining = True
    await app[SHADOW].close()  # shadow copies answer no one: they never hold up a drain
    if state.idle is None or state.in_flight == 0:
        return True
    try:
        await asyncio.wait_for(state.idle.wait(), timeout_s)
        return True
    except asyncio.TimeoutError:
        return False


# -- errors ----------------------------------------------------------------------------------------

_HTTP_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
                     413: "invalid_request_error"}


def error_response(err: APIError) -> web.Response:
    return web.json_response(err.body(), status=err.status, headers=err.headers)


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except APIError as err:
        resp = error_response(err)
        if getattr(err, "closes_connection", False):
            # The rest of the body will not come (stalled or broken): answer, then close, rather
            # than let aiohttp linger on the connection waiting for it.
            resp.force_close()
            await resp.prepare(request)
            await resp.write_eof()
            if request.transport is not None:
                request.transport.close()  # after the buffered answer is flushed
        return resp
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(APIError(exc.status, exc.reason or "error",
                                          type=_HTTP_ERROR_TYPES.get(exc.status,
                                                                     "invalid_request_error"),
                                          code=str(exc.status), headers=_keep_headers(exc)))
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error serving %s %s", request.method, request.path)
        return error_response(APIError(500, "internal server error", type="server_error",
                                          code="internal_error"))


def _keep_headers(exc: web.HTTPException) -> dict[str, str]:
    return {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "www-authenticate")}


# -- plain endpoints -------------------------------------------------------------------------------

async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.ready:
        return web.json_response({"status": "ready"})
    reason = "draining" if state.draining else "loading"
    return web.json_response({"status": reason}, status=503, headers={"Retry-After": "5"})


async def metrics_handler(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def _sla_targets(policy: PolicyConfig) -> dict[str, SLATargets]:
    return {name: SLATargets(c.ttft_ms, c.tpot_ms, c.e2e_ms)
            for name, c in policy.sla_classes.items()}


async def ab_report(request: web.Request) -> web.Response:
    """``GET /baton/ab/report[?since=<cursor>][&samples=true]`` (see abstats, docs/server.md)."""
    app = request.app
    try:
        since = parse_since(request.query.get("since"))
        samples = parse_flag("samples", request.query.get("samples"))
    except ValueError as exc:
        raise APIError(400, str(exc), param=str(exc).split(":", 1)[0],
                          code="invalid_value") from None
    live = app[CONFIG].current
    targets = _sla_targets(live.policy)
    default = DEFAULT_SLA_CLASS if DEFAULT_SLA_CLASS in targets else None
    stats = app[ABSTATS]
    report = stats.cached_report(targets, default, since=since, samples=samples)
    if report is None:  # sorting and CI searches over full windows: keep them off the loop
        report = await asyncio.to_thread(stats.report, targets, default, since=since,
                                         samples=samples)
    report["router"] = {"incumbent_url": live.router.incumbent_base,
                        "baton_weight": live.router.baton_weight,
                        "shadow_percent": live.router.shadow_percent,
                        "sticky_header": live.router.sticky_header,
                        "fallback_to_baton": live.router.fallback_to_baton}
    report.update(app[ELIGIBILITY].report())
    # CIs over up to 5000 pairs; the page's histograms with the samples
    report["paired"] = await asyncio.to_thread(app[SHADOW].paired.block, samples)
    if samples:  # up to 4 x window floats: encode them off the loop too
        body = await asyncio.to_thread(json.dumps, report)
        return web.Response(text=body, content_type="application/json")
    return web.json_response(report)


async def ab_profile(request: web.Request) -> web.Response:
    """``GET /baton/ab/profile[?since=<unix seconds>]``: the traffic profile as the bench's JSONL
    workload (see profiles, docs/server.md)."""
    app = request.app
    try:
        since = parse_profile_since(request.query.get("since"))
    except ValueError as exc:
        raise APIError(400, str(exc), param="since", code="invalid_value") from None
    selected = app[PROFILES].select(since)
    state = app[STATE]
    if selected and state.engine is None:  # synthetic and chat prompts need the tokenizer
        raise APIError(503, "model is loading", type="service_unavailable", code="not_ready",
                       headers={"Retry-After": "5"})
    tokenizer = state.engine.tokenizer if state.engine is not None else None
    body, skipped = await asyncio.to_thread(export_jsonl, selected, tokenizer,
                                            state.config.chat_template)
    return web.Response(body=body, content_type="application/x-ndjson",
                        headers={"X-Baton-Profile-Skipped": str(skipped)})


# -- admin -----------------------------------------------------------------------------------------

def _authorize(request: web.Request) -> None:
    token = request.app[STATE].config.admin_token
    if not token:  # admin disabled: indistinguishable from a missing route
        raise APIError(404, "not found", type="not_found_error", code="404")
    if not check_bearer(request.headers.get("Authorization"), token):
        raise APIError(401, "a valid bearer token is required", type="authentication_error",
                          code="invalid_token", headers={"WWW-Authenticate": "Bearer"})


async def admin_put_config(request: web.Request) -> web.Response:
    _authorize(request)
    cfg = request.app[STATE].config
    raw = await read_whole_body(request, cfg.max_body_bytes, cfg.body_timeout_s)
    try:
        live = request.app[CONFIG].apply_patch(decode_admin_body(raw))
    except ValueError as exc:
        field_name = str(exc).split(":", 1)[0]
        raise APIError(400, str(exc), param=field_name, code="invalid_config") from None
    return web.json_response(live.to_dict())


async def admin_get_config(request: web.Request) -> web.Response:
    _authorize(request)
    return web.json_response(request.app[CONFIG].current.to_dict())


# -- the route table -------------------------------------------------------------------------------

# path -> method -> handler (each GET answers HEAD too). ``/baton/*`` is always the sidecar's.
OWN_ROUTES = {
    "/v1/completions": {"POST": completions},
    "/v1/chat/completions": {"POST": chat_completions},
    "/v1/models": {"GET": models},
    OWN_PREFIX + "health": {"GET": health},
    OWN_PREFIX + "ready": {"GET": ready},
    OWN_PREFIX + "metrics": {"GET": metrics_handler},
    OWN_PREFIX + "ab": {"GET": ab_page},
    OWN_PREFIX + "ab/report": {"GET": ab_report},
    OWN_PREFIX + "ab/profile": {"GET": ab_profile},
    OWN_PREFIX + "admin/config": {"GET": admin_get_config, "PUT": admin_put_config},
}
# Answered at the root too, as a vLLM server's are, while no incumbent is configured (with one,
# the root belongs to the incumbent).
# vLLM's /tokenize and /detokenize likewise: with an incumbent they are its own, relayed.
STANDALONE_ALIASES = {"/health": {"GET": health}, "/ready": {"GET": ready}, "/metrics": {"GET": metrics_handler},
                      "/tokenize": {"POST": tokenize}, "/detokenize": {"POST": detokenize}}
