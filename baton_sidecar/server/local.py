"""The Baton arm: run one parsed request on the in-process engine and answer it (JSON or SSE).

The engine works on its own thread; here we only submit, relay deltas and format. Chat templates and
long prompts are tokenized on a worker thread so the event loop never stalls on them. A client that
goes away is noticed on the next delta (or by handler cancellation) and its request is cancelled in
the engine, which takes effect within one engine step.
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import Executor
from typing import Any

from aiohttp import web

from baton_sidecar.engine.admission import TOO_LARGE
from baton_sidecar.engine.request import (AdmissionError, RequestOutput, RequestValidationError, best_choices,
                                          collect)
from baton_sidecar.server import oai_response as shapes
from baton_sidecar.server.chat_template import render_tool_chat
from baton_sidecar.server.choices import ChoiceFormatter
from baton_sidecar.server.engine_api import Engine, Stream
from baton_sidecar.server.errors import APIError, bad_request
from baton_sidecar.server.oai_request import ParsedRequest
from baton_sidecar.server.results import ArmResult
from baton_sidecar.server.tracing import NullTrace

# Prompts longer than this (characters) are tokenized on the worker thread, not by submit() on the
# loop; ~1 ms of tokenizer work at this size.
INLINE_TOKENIZE_CHARS = 4096

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


def render_chat(tokenizer: Any, messages: list[dict[str, str]], template: str | None = None) -> list[int]:
    """Chat template (``template``, else the tokenizer's) with the generation prompt, as token
    ids (worker thread)."""
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                             tokenize=False)
    except Exception as exc:  # jinja raises its own errors for conversations it refuses
        raise bad_request("messages", f"the model's chat template refused them: {exc}") from None
    # The template already wrote the special tokens it wants.
    return list(tokenizer.encode(text, add_special_tokens=False))


async def prepare_prompt(engine: Engine, parsed: ParsedRequest, executor: Executor,
                         template: str | None = None) -> str | list[int]:
    """What to submit: token ids, or a short text the engine tokenizes itself. ``template``:
    ``--chat-template``, if given."""
    loop = asyncio.get_running_loop()
    if parsed.kind == "chat" and parsed.tool_template:
        tools = parsed.tools.openai_tools() if parsed.tools is not None else None
        return await loop.run_in_executor(executor, render_tool_chat, engine.tokenizer, parsed.messages,
                                          tools, template)
    if parsed.kind == "chat":
        return await loop.run_in_executor(executor, render_chat, engine.tokenizer, parsed.messages, template)
    prompt = parsed.prompt
    if isinstance(prompt, list) or len(prompt) <= INLINE_TOKENIZE_CHARS:
        return prompt
    ids = await loop.run_in_executor(executor, engine.tokenizer.encode, prompt)
    if not ids:  # as the engine says of a short one
        raise bad_request("prompt", "encodes to no tokens")
    return list(ids)


def admission_error(exc: AdmissionError, kind: str) -> APIError:
    retry = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s or 1)))}
    if exc.reason == "queue_full":
        return APIError(429, f"server overloaded: {exc}", type="rate_limit_error",
                           code="queue_full", headers=retry)
    if exc.reason == "too_large":
        return APIError(400, str(exc), param="messages" if kind == "chat" else "prompt",
                           code="context_length_exceeded")
    return APIError(503, f"server is shutting down: {exc}", type="service_unavailable",
                       code="shutting_down", headers=retry)


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


class LocalRun:
    """One request on the engine. ``submit`` raises ``APIError`` for refusals; ``respond`` answers."""

    def __init__(self, request: web.Request, engine: Engine, parsed: ParsedRequest,
                 model_name: str, request_id: str, arrival: float, trace: NullTrace) -> None:
        self.request = request
        self.engine = engine
        self.parsed = parsed
        self.model_name = model_name
        self.arrival = arrival
        self.trace = trace
        self.response_id = ("chatcmpl-" if parsed.kind == "chat" else "cmpl-") + request_id
        self.request_id = request_id
        self.created = shapes.now()
        self.result = ArmResult()
        self.stream: Stream | None = None
        self.formatter: ChoiceFormatter | None = None  # made at submit, once the prompt is known
        self._open_choices = parsed.params.num_sequences  # choices without their final delta yet
        self._completion_tokens: dict[int, int] = {}  # by choice
        self._failed: RequestOutput | None = None  # the first choice that ended in error

    def _token_text(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id])

    async def submit(self, executor: Executor, chat_template: str | None = None) -> None:
        parsed = self.parsed
        prompt = await prepare_prompt(self.engine, parsed, executor, chat_template)
        self.trace.set_request(parsed.params, parsed.priority, parsed.sla_class, parsed.stream)
        echo = None
        if parsed.echo:  # the prompt as given; token ids decoded
            echo = parsed.prompt if isinstance(parsed.prompt, str) else self.engine.tokenizer.decode(prompt)
        self.formatter = ChoiceFormatter(parsed, self._token_text, echo)
        extra: dict[str, Any] = {}
        if parsed.priority is not None:
            extra["priority"] = parsed.priority
        if parsed.sla_class is not None:
            extra["sla_class"] = parsed.sla_class
        try:
            if parsed.params.structured is not None:  # compiled off the loop and the engine thread
                await self.engine.compile_grammar(parsed.params.structured)
            self.stream = self.engine.submit(prompt, parsed.params, request_id=self.request_id,
                                             **extra)
        except RequestValidationError as exc:  # the engine says max_tokens for either cap
            field = {"max_tokens": parsed.max_tokens_field, "prompt_logprobs": "echo"}.get(exc.field, exc.field)
            raise bad_request(field, exc.message) from None
        except AdmissionError as exc:
            raise admission_error(exc, parsed.kind) from None

    async def respond(self) -> web.StreamResponse:
        finished = False
        try:
            if self.parsed.stream:
                resp = await self._respond_stream()
            else:
                resp = await self._respond_json()
            finished = self.result.finish_reason is not None
            return resp
        finally:
            if not finished:  # client gone, handler cancelled, or a write failed
                self.stream.cancel()
                self.result.ok, self.result.cancelled = False, True
                self.result.finish_reason = self.result.finish_reason or "cancelled"
            self.result.e2e_s = time.monotonic() - self.arrival

    def _note(self, out: RequestOutput) -> None:
        """Account one delta. The request is done when every choice has had its final delta:
        its finish reason is the last choice's (the first error wins), its completion tokens
        the choices' sum, its prompt counted once."""
        self.trace.engine_events(out.events)
        r = self.result
        if out.token_ids and r.ttft_s is None:
            r.ttft_s = time.monotonic() - self.arrival
        if not out.finished:
            return
        self._open_choices -= 1
        self._completion_tokens[out.index] = out.completion_tokens
        r.preemptions = max(r.preemptions, out.num_preemptions)
        if out.finish_reason in ("error", "cancelled") and self._failed is None:
            self._failed = out
        if self._open_choices:
            return
        r.prompt_tokens, r.completion_tokens = out.prompt_tokens, sum(self._completion_tokens.values())
        if out.times is not None:
            r.queue_s = out.times.queue_s
            if out.times.first_token is not None:  # the engine's stamp, same clock
                r.ttft_s = min(r.ttft_s or math.inf, out.times.first_token - self.arrival)
        failed = self._failed
        r.finish_reason = (failed or out).finish_reason or "stop"
        if r.finish_reason == "error":
            r.ok, r.error = False, failed.error or "engine error"
            r.status = 400 if r.error.startswith(f"{TOO_LARGE}:") else 500  # a tighter policy: admission's 400
        elif r.finish_reason == "cancelled":  # by the server: drain deadline passed
            r.ok, r.status = False, 503
            r.error = failed.error or "cancelled by the server (shutting down)"

    def _failure(self) -> APIError:
        r = self.result
        if r.status == 400:  # queued when the policy shrank: refused now as admission would refuse it
            return admission_error(AdmissionError(TOO_LARGE, r.error.partition(": ")[2]), self.parsed.kind)
        if r.status == 503:
            return APIError(503, r.error, type="service_unavailable", code="shutting_down")
        return APIError(500, f"generation failed: {r.error}", type="server_error",
                           code="engine_error")

    def _headers(self) -> dict[str, str]:
        return {"x-request-id": self.request_id, "x-baton-arm": "baton"}

    async def _respond_json(self) -> web.Response:
        deltas: list[list[RequestOutput]] = [[] for _ in range(self.parsed.params.num_sequences)]
        async for out in self.stream:
            self._note(out)
            deltas[out.index].append(out)
            if client_gone(self.request):
                return web.Response(status=499)  # never reaches anyone; ends the handler
        r = self.result
        if r.finish_reason is None:  # the stream ended without every final delta
            raise RuntimeError("engine stream ended without a finished output")
        if not r.ok:
            raise self._failure()
        params = self.parsed.params
        outputs = [collect(d, params) for d in deltas]
        if params.ranks_choices:  # best_of > n: the n most likely; usage counts those returned
            outputs = best_choices(outputs, params.n)
            r.completion_tokens = sum(o.completion_tokens for o in outputs)
        body = shapes.body(self.parsed.kind, self.response_id, self.created, self.model_name,
                           [self.formatter.choice(o) for o in outputs], r.prompt_tokens, r.completion_tokens)
        return web.json_response(body, headers=self._headers())

    async def _respond_stream(self) -> web.StreamResponse:
        resp = web.StreamResponse(headers={**SSE_HEADERS, **self._headers()})
        p = self.parsed

        def chunk(choice: dict) -> bytes:
            return shapes.sse(shapes.chunk(p.kind, self.response_id, self.created, self.model_name, choice,
                                           p.include_usage))
        try:
            await resp.prepare(self.request)
            for opening in self.formatter.opening():
                await resp.write(chunk(opening))
            async for out in self.stream:
                self._note(out)
                if client_gone(self.request):
                    return resp
                for choice in self.formatter.delta(out):
                    await resp.write(chunk(choice))
                if out.finished and out.finish_reason not in ("error", "cancelled"):
                    for choice in self.formatter.finish(out):
                        await resp.write(chunk(choice))
            r = self.result
            if r.finish_reason is None:
                raise RuntimeError("engine stream ended without a finished output")
            if not r.ok:
                await resp.write(shapes.sse(self._failure().body()))
            elif p.include_usage:
                await resp.write(shapes.sse(shapes.usage_chunk(
                    self.response_id, self.created, self.model_name, p.kind, r.prompt_tokens or 0,
                    r.completion_tokens or 0)))
            await resp.write(shapes.SSE_DONE)
            await resp.write_eof()
        except ConnectionError:  # aiohttp's write to a closed client
            pass
        return resp
