"""The sidecar's aiohttp application: OpenAI-compatible API, A/B router, metrics, admin.

``init_app(engine, server_config, router_config, policy)`` builds the app; everything it needs lives
under typed ``web.AppKey``s, and what it opens (incumbent client session, config watcher, tokenizer
worker, tracer provider) is closed on ``on_cleanup``. The engine's lifetime belongs to the caller
(``serve.py`` or a test fixture): the app only borrows it, and ``engine`` may be ``None`` while the
model is still loading (``attach_engine`` sets it later; until then /ready answers 503).

Every failure a client can cause is answered with an OpenAI error body and a 4xx status, never 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from baton_sidecar.config import PolicyConfig, RouterConfig, ServerConfig
from baton_sidecar.server import openai as oa
from baton_sidecar.server.abstats import (ABStats, Outcome, SLATargets, parse_flag,
                                          parse_since)
from baton_sidecar.server.configwatch import (ConfigManager, FileWatcher, LiveConfig, check_bearer,
                                              decode_admin_body)
from baton_sidecar.server.local import LocalRun
from baton_sidecar.server.metrics import CONTENT_TYPE, Metrics
from baton_sidecar.server.router import BATON, INCUMBENT, IncumbentFailure, Router, proxy
from baton_sidecar.server.tracing import Tracing

log = logging.getLogger(__name__)

DEFAULT_SLA_CLASS = "interactive"  # A/B SLA attainment for requests naming no sla_class


@dataclass
class ServerState:
    """Mutable per-app state (the app itself is frozen once started)."""

    config: ServerConfig
    engine: Any | None = None
    draining: bool = False
    started_at: int = field(default_factory=oa.now)
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
ROUTER = web.AppKey("router", Router)
CONFIG = web.AppKey("config", ConfigManager)
TRACING = web.AppKey("tracing", Tracing)
EXECUTOR = web.AppKey("executor", ThreadPoolExecutor)
SESSION = web.AppKey("incumbent_session", aiohttp.ClientSession)
WATCHER = web.AppKey("config_watcher", FileWatcher)


def init_app(engine: Any | None, server_config: ServerConfig, router_config: RouterConfig,
             policy: PolicyConfig, *, tracing: Tracing | None = None,
             watch_interval_s: float = 1.0) -> web.Application:
    """Build the sidecar app. ``policy`` is what the engine was started with; if
    ``server_config.config_file`` is set, that file is read now (a bad file raises ``ValueError``)
    and then watched for changes."""
    app = web.Application(client_max_size=server_config.max_body_bytes,
                          middlewares=[error_middleware])
    state = ServerState(config=server_config, engine=engine)
    metrics = Metrics(lambda: state.engine)
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
    app[ROUTER] = router
    app[CONFIG] = manager
    app[TRACING] = tracing if tracing is not None else Tracing.from_env()
    app[EXECUTOR] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="baton-tokenize")
    if server_config.config_file or server_config.policy_file:
        # One watched file: the full config file if given, else the --policy file.
        watcher = (FileWatcher(server_config.config_file, manager, interval_s=watch_interval_s)
                   if server_config.config_file else
                   FileWatcher(server_config.policy_file, manager, interval_s=watch_interval_s,
                               section="policy"))
        watcher.load_initial()
        app[WATCHER] = watcher

    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/ab/report", ab_report)
    app.router.add_put("/admin/config", admin_put_config)
    app.router.add_get("/admin/config", admin_get_config)

    app.on_startup.append(_on_startup)
    app.on_cleanup.append(_on_cleanup)
    return app


def attach_engine(app: web.Application, engine: Any) -> None:
    """Hand the app its engine once the model is loaded; applies the live policy if it moved on."""
    state = app[STATE]
    state.engine = engine
    live = app[CONFIG].current.policy
    if live != app[CONFIG].startup.policy:
        engine.apply_policy(live)


async def _on_startup(app: web.Application) -> None:
    state = app[STATE]
    state.idle = asyncio.Event()
    state.idle.set()
    # Unlimited connections: concurrency is bounded by admission control, not by the pool.
    app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         auto_decompress=False)
    if WATCHER in app:
        app[WATCHER].start()


async def _on_cleanup(app: web.Application) -> None:
    if WATCHER in app:
        await app[WATCHER].stop()
    await app[SESSION].close()
    app[EXECUTOR].shutdown(wait=False, cancel_futures=True)
    await asyncio.to_thread(app[TRACING].shutdown)  # flushes pending spans


async def drain(app: web.Application, timeout_s: float) -> bool:
    """Refuse new work (503, /ready fails) and wait for in-flight requests; True if all finished."""
    state = app[STATE]
    state.draining = True
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


def error_response(err: oa.APIError) -> web.Response:
    return web.json_response(err.body(), status=err.status, headers=err.headers)


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except oa.APIError as err:
        return error_response(err)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[STATE].config.max_body_bytes
        return error_response(oa.APIError(413, f"request body exceeds {limit} bytes",
                                           param="body", code="request_too_large"))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(oa.APIError(exc.status, exc.reason or "error",
                                          type=_HTTP_ERROR_TYPES.get(exc.status,
                                                                     "invalid_request_error"),
                                          code=str(exc.status), headers=_keep_headers(exc)))
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error serving %s %s", request.method, request.path)
        return error_response(oa.APIError(500, "internal server error", type="server_error",
                                          code="internal_error"))


def _keep_headers(exc: web.HTTPException) -> dict[str, str]:
    return {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "www-authenticate")}


# -- generation ------------------------------------------------------------------------------------

async def read_body(request: web.Request) -> bytes:
    limit = request.app[STATE].config.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise oa.APIError(413, f"request body exceeds {limit} bytes", param="body",
                          code="request_too_large")
    return await request.read()  # aiohttp enforces client_max_size for chunked bodies


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completion")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


def _refuse(app: web.Application, arm: str, reason: str, err: oa.APIError) -> oa.APIError:
    app[METRICS].refusals.labels(arm, reason).inc()
    return err


async def _generate(request: web.Request, kind: str) -> web.StreamResponse:
    arrival = time.monotonic()
    app = request.app
    state, metrics = app[STATE], app[METRICS]
    served = state.config.served_model_name
    try:
        raw = await read_body(request)
        body = oa.decode_json_body(raw)
        if kind == "chat":
            parsed = oa.parse_chat(body)
        else:
            vocab = len(state.engine.tokenizer) if state.engine is not None else None
            parsed = oa.parse_completion(body, vocab)
        if parsed.model is not None and parsed.model != served:
            raise oa.APIError(404, f"model '{parsed.model}' does not exist; this server serves "
                                   f"'{served}'", type="not_found_error", param="model",
                              code="model_not_found")
    except oa.APIError as err:
        reason = {404: "unknown_model", 413: "body_too_large"}.get(err.status, "invalid")
        metrics.refusals.labels("none", reason).inc()
        raise
    if state.draining:
        raise _refuse(app, "none", "shutting_down", oa.APIError(
            503, "server is draining", type="service_unavailable", code="shutting_down",
            headers={"Retry-After": "1"}))

    arm = app[ROUTER].assign(request.headers, parsed.user)
    trace = app[TRACING].start(parsed.operation, parsed.model or served, request.headers, arm)
    request_id = uuid.uuid4().hex
    state.enter()
    metrics.in_flight.labels(arm).inc()
    status, error_type = 500, None
    try:
        if arm == INCUMBENT:
            served_by_incumbent, resp, status, error_type = await _serve_incumbent(
                request, raw, parsed, arrival, trace)
            if served_by_incumbent:
                return resp
            trace.set("baton.router.fallback", True)
        resp, status, error_type = await _serve_baton(request, parsed, arrival, trace, request_id,
                                                      record=arm == BATON)
        return resp
    except oa.APIError as err:
        status, error_type = err.status, err.code or type(err).__name__
        raise
    except asyncio.CancelledError:
        status, error_type = 499, "client_disconnected"
        raise
    except Exception as exc:
        status, error_type = 500, type(exc).__name__
        raise
    finally:
        metrics.in_flight.labels(arm).dec()
        state.leave()
        trace.end(status, error_type)


async def _serve_incumbent(request: web.Request, raw: bytes, parsed: oa.ParsedRequest,
                           arrival: float, trace) -> tuple[bool, Any, int, str | None]:
    """(served, response, status, error type); served False means: fall back to Baton."""
    app = request.app
    metrics, stats, cfg = app[METRICS], app[ABSTATS], app[ROUTER].config
    trace.set_request(parsed.max_tokens, parsed.sampling, parsed.priority, parsed.sla_class,
                      parsed.stream)
    try:
        result = await proxy(request, app[SESSION], cfg, raw, arrival, trace)
    except asyncio.CancelledError:  # the client left (handler cancellation)
        metrics.requests.labels(INCUMBENT, "cancelled").inc()
        raise
    except IncumbentFailure as failure:
        metrics.incumbent_failures.labels(failure.kind).inc()
        outcome = Outcome(INCUMBENT, ok=False, e2e_s=time.monotonic() - arrival,
                          sla_class=parsed.sla_class)
        stats.record(outcome)
        metrics.requests.labels(INCUMBENT, "error").inc()
        if cfg.fallback_to_baton:
            metrics.fallbacks.inc()
            stats.record_fallback()
            log.warning("%s; falling back to Baton", failure)
            return False, None, 0, None
        raise _refuse(app, INCUMBENT, "incumbent_" + failure.kind, oa.APIError(
            502, f"{failure} (Baton's A/B router sent this request to the incumbent)",
            type="upstream_error", code="incumbent_unavailable")) from None
    if not result.ok and not result.cancelled:
        metrics.incumbent_failures.labels("stream").inc()
    reason = "cancelled" if result.cancelled else (
        result.finish_reason or ("error" if not result.ok else f"http_{result.status}"))
    outcome = Outcome(INCUMBENT, ok=result.ok and result.status < 400, ttft_s=result.ttft_s,
                      e2e_s=result.e2e_s, completion_tokens=result.completion_tokens,
                      sla_class=parsed.sla_class)
    if not result.cancelled:
        stats.record(outcome)
        metrics.observe(outcome, reason, prompt_tokens=result.prompt_tokens)
    else:
        metrics.requests.labels(INCUMBENT, "cancelled").inc()
    trace.finish(input_tokens=result.prompt_tokens, output_tokens=result.completion_tokens,
                 finish_reason=result.finish_reason)
    error_type = None if result.ok else ("client_disconnected" if result.cancelled
                                         else "incumbent_stream_error")
    return True, result.response, result.status, error_type


_REFUSAL_REASONS = {"queue_full": "queue_full", "context_length_exceeded": "too_large",
                    "shutting_down": "shutting_down"}


async def _serve_baton(request: web.Request, parsed: oa.ParsedRequest, arrival: float, trace,
                       request_id: str, record: bool) -> tuple[web.StreamResponse, int, str | None]:
    app = request.app
    state, metrics, stats = app[STATE], app[METRICS], app[ABSTATS]
    served = state.config.served_model_name
    if not state.ready:
        reason = "shutting_down" if state.draining else "not_ready"
        raise _refuse(app, BATON, reason, oa.APIError(
            503, "model is loading" if reason == "not_ready" else "server is draining",
            type="service_unavailable", code=reason, headers={"Retry-After": "5"}))
    run = LocalRun(request, state.engine, parsed, served, request_id, arrival, trace)
    try:
        await run.submit(app[EXECUTOR])
    except oa.APIError as err:
        metrics.refusals.labels(BATON, _REFUSAL_REASONS.get(err.code, "invalid")).inc()
        if err.status in (429, 503) and record:  # overload counts against the arm
            stats.record(Outcome(BATON, ok=False, e2e_s=time.monotonic() - arrival,
                                 sla_class=parsed.sla_class))
        raise
    try:
        resp = await run.respond()
        r = run.result
        return resp, r.status, None if r.ok else ("client_disconnected" if r.cancelled else
                                                  "shutting_down" if r.status == 503 else
                                                  "engine_error")
    finally:
        r = run.result
        outcome = Outcome(BATON, ok=r.ok, ttft_s=r.ttft_s, e2e_s=r.e2e_s,
                          completion_tokens=r.completion_tokens, sla_class=parsed.sla_class)
        if r.cancelled:  # the client left: no latency sample, no A/B outcome
            metrics.requests.labels(BATON, "cancelled").inc()
        else:
            metrics.observe(outcome, r.finish_reason or "error", queue_s=r.queue_s,
                            prompt_tokens=r.prompt_tokens, preemptions=r.preemptions)
            if record:
                stats.record(outcome)
        trace.finish(response_id=run.rid, response_model=served, input_tokens=r.prompt_tokens,
                     output_tokens=r.completion_tokens, finish_reason=r.finish_reason)


# -- plain endpoints -------------------------------------------------------------------------------

async def models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    max_len = getattr(state.engine, "max_model_len", None) if state.engine is not None else None
    return web.json_response(oa.model_list(state.config.served_model_name, state.started_at,
                                           max_len))


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
    """``GET /ab/report[?since=<cursor>][&samples=true]`` (see abstats and docs/server.md)."""
    app = request.app
    try:
        since = parse_since(request.query.get("since"))
        samples = parse_flag("samples", request.query.get("samples"))
    except ValueError as exc:
        raise oa.APIError(400, str(exc), param=str(exc).split(":", 1)[0],
                          code="invalid_value") from None
    live = app[CONFIG].current
    targets = _sla_targets(live.policy)
    default = DEFAULT_SLA_CLASS if DEFAULT_SLA_CLASS in targets else None
    stats = app[ABSTATS]
    report = stats.cached_report(targets, default, since=since, samples=samples)
    if report is None:  # bootstrap resampling is CPU work: keep it off the loop
        report = await asyncio.to_thread(stats.report, targets, default, since=since,
                                         samples=samples)
    report["router"] = {"incumbent_url": live.router.incumbent_url,
                        "baton_weight": live.router.baton_weight,
                        "sticky_header": live.router.sticky_header,
                        "fallback_to_baton": live.router.fallback_to_baton}
    if samples:  # up to 4 x window floats: encode them off the loop too
        body = await asyncio.to_thread(json.dumps, report)
        return web.Response(text=body, content_type="application/json")
    return web.json_response(report)


# -- admin -----------------------------------------------------------------------------------------

def _authorize(request: web.Request) -> None:
    token = request.app[STATE].config.admin_token
    if not token:  # admin disabled: indistinguishable from a missing route
        raise oa.APIError(404, "not found", type="not_found_error", code="404")
    if not check_bearer(request.headers.get("Authorization"), token):
        raise oa.APIError(401, "a valid bearer token is required", type="authentication_error",
                          code="invalid_token", headers={"WWW-Authenticate": "Bearer"})


async def admin_put_config(request: web.Request) -> web.Response:
    _authorize(request)
    raw = await read_body(request)
    try:
        live = request.app[CONFIG].apply_patch(decode_admin_body(raw))
    except ValueError as exc:
        field_name = str(exc).split(":", 1)[0]
        raise oa.APIError(400, str(exc), param=field_name, code="invalid_config") from None
    return web.json_response(live.to_dict())


async def admin_get_config(request: web.Request) -> web.Response:
    _authorize(request)
    return web.json_response(request.app[CONFIG].current.to_dict())
