"""``POST /v1/completions`` and ``POST /v1/chat/completions``: who serves a request, and how.

1. The body is read (bounded in size and in pauses; see ``body``) and parsed as Baton would.
2. With an incumbent configured, a request Baton cannot serve (a body over the limit, a feature or
   value Baton refuses, another ``model``) goes to the incumbent untouched and is counted as
   ineligible (``eligibility``); with none, it is refused here with OpenAI's 4xx body.
3. An eligible request gets an arm from the router (weight, sticky key). On the incumbent arm it is
   proxied and accounted; on the Baton arm it runs on the engine (``local``). A request the engine
   refuses for what it asks (an unknown ``sla_class``, a prompt over the context) also goes to the
   incumbent when there is one; a refusal for load (429, 503) counts against the Baton arm.

Only eligible requests are split by weight and recorded in the A/B statistics.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, Callable

from aiohttp import web

from baton_sidecar.server.errors import APIError
from baton_sidecar.server.json_body import decode_json_body
from baton_sidecar.server.oai_request import ParsedRequest, parse_chat, parse_completion
from baton_sidecar.server.abstats import Outcome
from baton_sidecar.server.body import read_body, too_large
from baton_sidecar.server.eligibility import BODY_TOO_LARGE, OTHER_MODEL, refusal_reason
from baton_sidecar.server.local import LocalRun
from baton_sidecar.server.passthrough import incumbent_failure, relay
from baton_sidecar.server.profiles import record_answer
from baton_sidecar.server.proxy import IncumbentFailure, proxy
from baton_sidecar.server.results import ArmResult
from baton_sidecar.server.router import BATON, INCUMBENT
from baton_sidecar.server.state import (ABSTATS, CONFIG, ELIGIBILITY, EXECUTOR, METRICS, PROFILES,
                                        ROUTER, SESSION, SHADOW, STATE, TRACING)

log = logging.getLogger(__name__)

_REFUSAL_REASONS = {"queue_full": "queue_full", "context_length_exceeded": "too_large",
                    "shutting_down": "shutting_down"}


async def completions(request: web.Request) -> web.StreamResponse:
    return await generate(request, "completion")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await generate(request, "chat")


def refuse(app: web.Application, arm: str, reason: str, err: APIError) -> APIError:
    app[METRICS].refusals.labels(arm, reason).inc()
    return err


def parse(app: web.Application, kind: str, raw: bytes) -> ParsedRequest:
    """The request as Baton would serve it, or ``APIError`` (404 ``model_not_found`` for another
    model's name)."""
    state = app[STATE]
    body = decode_json_body(raw)
    vocab = len(state.engine.tokenizer) if state.engine is not None else None
    parsed = parse_chat(body, vocab) if kind == "chat" else parse_completion(body, vocab)
    served = state.config.served_model_name
    if parsed.model is not None and parsed.model != served:
        raise APIError(404, f"model '{parsed.model}' does not exist; this server serves "
                               f"'{served}'", type="not_found_error", param="model",
                          code="model_not_found")
    return parsed


def _count_eligible(app: web.Application) -> None:
    app[ELIGIBILITY].record_eligible()
    app[METRICS].eligible.inc()


def ineligibility(err: APIError) -> str:
    return OTHER_MODEL if err.code == "model_not_found" else refusal_reason(err)


class PassToIncumbent(Exception):
    """The Baton arm refused the request for what it asks; with an incumbent, it goes there."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def generate(request: web.Request, kind: str) -> web.StreamResponse:
    arrival = time.monotonic()
    app = request.app
    state, metrics = app[STATE], app[METRICS]
    has_incumbent = app[ROUTER].config.incumbent_url is not None
    if state.draining:
        raise refuse(app, "none", "shutting_down", APIError(
            503, "server is draining", type="service_unavailable", code="shutting_down",
            headers={"Retry-After": "1"}))
    body = await read_body(request, state.config.max_body_bytes, state.config.body_timeout_s,
                           lambda: metrics.http_rejections.labels("body_timeout").inc())
    if not body.complete:
        if has_incumbent:
            return await relay(request, body.stream(), BODY_TOO_LARGE)
        raise refuse(app, "none", "body_too_large", too_large(state.config.max_body_bytes))
    try:
        parsed = parse(app, kind, body.data)
    except APIError as err:
        if has_incumbent:
            return await relay(request, body.data, ineligibility(err))
        reason = {404: "unknown_model", 413: "body_too_large"}.get(err.status, "invalid")
        raise refuse(app, "none", reason, err) from None
    try:
        return await _serve(request, body.data, parsed, arrival)
    except PassToIncumbent as passed:
        return await relay(request, body.data, passed.reason)


async def _serve(request: web.Request, raw: bytes, parsed: ParsedRequest,
                 arrival: float) -> web.StreamResponse:
    """An eligible request on the arm the router picks (raises ``PassToIncumbent``)."""
    app = request.app
    state, metrics = app[STATE], app[METRICS]
    arm = app[ROUTER].assign(request.headers, parsed.user)
    trace = app[TRACING].start(parsed.operation, parsed.model or state.config.served_model_name,
                               request.headers, arm)
    state.enter()
    metrics.in_flight.labels(arm).inc()
    status, error_type = 500, None
    try:
        if arm == INCUMBENT:
            _count_eligible(app)
            served_by_incumbent, resp, status, error_type = await _serve_shadowed(
                request, raw, parsed, arrival, trace)
            if served_by_incumbent:
                return resp
            trace.set("baton.router.fallback", True)
        run = await _submit_baton(request, parsed, arrival, trace, assigned=arm == BATON)
        resp, status, error_type = await _respond_baton(request, run, parsed, trace,
                                                        record=arm == BATON)
        return resp
    except PassToIncumbent as passed:
        status, error_type = None, None
        trace.set("baton.router.ineligible", passed.reason)
        raise
    except APIError as err:
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


async def _serve_shadowed(request: web.Request, raw: bytes, parsed: ParsedRequest,
                          arrival: float, trace) -> tuple[bool, Any, int, str | None]:
    """``_serve_incumbent``, with a copy on Baton when ``router.shadow_percent`` draws it (``shadow``)."""
    app = request.app
    state, shadow = app[STATE], app[SHADOW]
    incumbent_done = shadow.start(app[ROUTER].config.shadow_percent, state.engine, app[CONFIG].current.policy,
                                  parsed, arrival, app[EXECUTOR], state.config.chat_template)
    shadow.incumbent_in_flight += 1
    answers: list[ArmResult] = []
    try:
        return await _serve_incumbent(request, raw, parsed, arrival, trace, answers.append)
    finally:
        shadow.incumbent_in_flight -= 1
        if incumbent_done is not None:  # no answer (failed, fell back, cancelled): no pair
            incumbent_done.set_result(answers[0] if answers else ArmResult(ok=False))


async def _serve_incumbent(request: web.Request, raw: bytes, parsed: ParsedRequest,
                           arrival: float, trace, on_answer: Callable[[ArmResult], None] | None = None
                           ) -> tuple[bool, Any, int, str | None]:
    """(served, response, status, error type); served False means: fall back to Baton.
    ``on_answer``: called with the incumbent's result, if it answered."""
    app = request.app
    metrics, stats, cfg = app[METRICS], app[ABSTATS], app[ROUTER].config
    trace.set_request(parsed.params, parsed.priority, parsed.sla_class, parsed.stream)
    try:
        result = await proxy(request, app[SESSION], cfg, raw, arrival, trace, account=True,
                             fail_on_5xx=cfg.fallback_to_baton)
    except asyncio.CancelledError:  # the client left (handler cancellation)
        metrics.requests.labels(INCUMBENT, "cancelled").inc()
        raise
    except IncumbentFailure as failure:
        stats.record(Outcome(INCUMBENT, ok=False, e2e_s=time.monotonic() - arrival,
                             sla_class=parsed.sla_class))
        metrics.requests.labels(INCUMBENT, "error").inc()
        if cfg.fallback_to_baton:
            metrics.incumbent_failures.labels(failure.kind).inc()
            metrics.fallbacks.inc()
            stats.record_fallback()
            log.warning("%s; falling back to Baton", failure)
            return False, None, 0, None
        raise incumbent_failure(app, failure) from None
    if not result.ok and not result.cancelled:
        metrics.incumbent_failures.labels("status" if result.status >= 500 else "stream").inc()
    reason = result.finish_reason or ("error" if not result.ok else f"http_{result.status}")
    account(app, INCUMBENT, result, reason, parsed.sla_class, trace, record=True, parsed=parsed)
    if on_answer is not None:
        on_answer(result)
    error_type = None if result.ok else ("client_disconnected" if result.cancelled
                                         else "incumbent_stream_error")
    return True, result.response, result.status, error_type


async def _submit_baton(request: web.Request, parsed: ParsedRequest, arrival: float, trace,
                        assigned: bool) -> LocalRun:
    """The request submitted to the engine. When the engine refuses the request itself and an
    incumbent is configured, ``PassToIncumbent``."""
    app = request.app
    state, metrics, stats = app[STATE], app[METRICS], app[ABSTATS]
    if not state.ready:
        reason = "shutting_down" if state.draining else "not_ready"
        raise refuse(app, BATON, reason, APIError(
            503, "model is loading" if reason == "not_ready" else "server is draining",
            type="service_unavailable", code=reason, headers={"Retry-After": "5"}))
    run = LocalRun(request, state.engine, parsed, state.config.served_model_name,
                   uuid.uuid4().hex, arrival, trace)
    try:
        await run.submit(app[EXECUTOR], state.config.chat_template)
    except APIError as err:
        if err.status == 400 and assigned and app[ROUTER].config.incumbent_url is not None:
            raise PassToIncumbent(ineligibility(err)) from None
        metrics.refusals.labels(BATON, _REFUSAL_REASONS.get(err.code, "invalid")).inc()
        if err.status in (429, 503) and assigned:  # overload counts against the arm
            _count_eligible(app)
            stats.record(Outcome(BATON, ok=False, e2e_s=time.monotonic() - arrival,
                                 sla_class=parsed.sla_class))
        raise
    if assigned:
        _count_eligible(app)
    return run


async def _respond_baton(request: web.Request, run: LocalRun, parsed: ParsedRequest, trace,
                         record: bool) -> tuple[web.StreamResponse, int, str | None]:
    app = request.app
    try:
        resp = await run.respond()
        r = run.result
        return resp, r.status, None if r.ok else ("client_disconnected" if r.cancelled else
                                                  "shutting_down" if r.status == 503 else
                                                  "engine_error")
    finally:
        r = run.result
        account(app, BATON, r, r.finish_reason or "error", parsed.sla_class, trace, record=record,
                parsed=parsed, response_id=run.response_id, response_model=run.model_name)


def account(app: web.Application, arm: str, result: ArmResult, reason: str,
            sla_class: str | None, trace, *, record: bool, parsed: ParsedRequest | None = None,
            **response: Any) -> None:
    """A request one arm answered: its Prometheus series, its A/B sample (``record``: the router
    assigned it that arm; fallbacks are not compared), its span's results and, given the client's
    ``parsed`` request, its traffic profile (``profiles``). A client that left gives no latency
    sample and no A/B outcome, but is profiled: its request still arrived and took work."""
    metrics = app[METRICS]
    if parsed is not None:
        state = app[STATE]
        record_answer(app[PROFILES], arm, result, reason, parsed,
                      keep_text=app[ROUTER].config.profile_text,
                      tokenizer=state.engine.tokenizer if state.engine is not None else None,
                      executor=app.get(EXECUTOR), template=state.config.chat_template)
    if result.cancelled:
        metrics.requests.labels(arm, "cancelled").inc()
    else:
        outcome = Outcome(arm, ok=result.served, ttft_s=result.ttft_s, e2e_s=result.e2e_s,
                          completion_tokens=result.completion_tokens, sla_class=sla_class)
        metrics.observe(outcome, reason, queue_s=result.queue_s,
                        prompt_tokens=result.prompt_tokens, preemptions=result.preemptions)
        if record:
            app[ABSTATS].record(outcome)
    trace.finish(input_tokens=result.prompt_tokens, output_tokens=result.completion_tokens,
                 finish_reason=result.finish_reason, **response)
