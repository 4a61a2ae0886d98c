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

from baton_sidecar.engine.request import AdmissionError, RequestOutput, RequestValidationError
from baton_sidecar.server import oai_response as shapes
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


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Chat template with the generation prompt, as token ids (worker thread)."""
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # jinja raises its own errors for conversations it refuses
        raise bad_request("messages", f"the model's chat template refused them: {exc}") from None
    # The template already wrote the special tokens it wants.
    return list(tokenizer.encode(text, add_special_tokens=False))


async def prepare_prompt(engine: Engine, parsed: ParsedRequest, executor: Executor
                         ) -> str | list[int]:
    """What to submit: token ids, or a short text the engine tokenizes itself."""
    loop = asyncio.get_running_loop()
    if parsed.kind == "chat":
        return await loop.run_in_executor(executor, render_chat, engine.tokenizer, parsed.messages)
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
        self._text_offset = 0
        self._lp = shapes.LogprobFormatter(self._token_text)

    def _token_text(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id])

    async def submit(self, executor: Executor) -> None:
        parsed = self.parsed
        prompt = await prepare_prompt(self.engine, parsed, executor)
        self.trace.set_request(parsed.params, parsed.priority, parsed.sla_class, parsed.stream)
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
            field = parsed.max_tokens_field if exc.field == "max_tokens" else exc.field
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
        self.trace.engine_events(out.events)
        if out.token_ids and self.result.ttft_s is None:
            self.result.ttft_s = time.monotonic() - self.arrival
        if out.finished:
            r = self.result
            r.finish_reason = out.finish_reason or "stop"
            r.prompt_tokens, r.completion_tokens = out.prompt_tokens, out.completion_tokens
            r.preemptions = out.num_preemptions
            if out.times is not None:
                r.queue_s = out.times.queue_s
                if out.times.first_token is not None:  # the engine's stamp, same clock
                    r.ttft_s = out.times.first_token - self.arrival
            if r.finish_reason == "error":
                r.ok, r.status, r.error = False, 500, out.error or "engine error"
            elif r.finish_reason == "cancelled":  # by the server: drain deadline passed
                r.ok, r.status = False, 503
                r.error = out.error or "cancelled by the server (shutting down)"

    def _failure(self) -> APIError:
        r = self.result
        if r.status == 503:
            return APIError(503, r.error, type="service_unavailable", code="shutting_down")
        return APIError(500, f"generation failed: {r.error}", type="server_error",
                           code="engine_error")

    def _headers(self) -> dict[str, str]:
        return {"x-request-id": self.request_id, "x-baton-arm": "baton"}

    async def _respond_json(self) -> web.Response:
        texts: list[str] = []
        logprobs: list = []
        async for out in self.stream:
            self._note(out)
            texts.append(out.text)
            if out.logprobs:
                logprobs.extend(out.logprobs)
            if out.finished:
                break
            if client_gone(self.request):
                return web.Response(status=499)  # never reaches anyone; ends the handler
        r = self.result
        if r.finish_reason is None:  # the stream ended without a final delta
            raise RuntimeError("engine stream ended without a finished output")
        if not r.ok:
            raise self._failure()
        text = "".join(texts)
        want_lp = self.parsed.logprobs is not None
        if self.parsed.kind == "chat":
            body = shapes.chat_body(self.response_id, self.created, self.model_name, text, r.finish_reason,
                                self._lp.chat(logprobs) if want_lp else None, r.prompt_tokens,
                                r.completion_tokens)
        else:
            body = shapes.completion_body(self.response_id, self.created, self.model_name, text,
                                      r.finish_reason,
                                      self._lp.completion(logprobs, 0) if want_lp else None,
                                      r.prompt_tokens, r.completion_tokens)
        return web.json_response(body, headers=self._headers())

    def _chunk(self, text: str | None, reason: str | None, logprobs: tuple | None,
               role: bool = False) -> dict:
        p = self.parsed
        if p.kind == "chat":
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            if role:  # as OpenAI's opening delta: the model never refuses here
                delta["refusal"] = None
            lp = self._lp.chat(logprobs) if logprobs else None
            return shapes.chat_chunk(self.response_id, self.created, self.model_name, delta, reason, lp,
                                 p.include_usage)
        lp = None
        if logprobs:
            lp = self._lp.completion(logprobs, self._text_offset)
        self._text_offset += len(text or "")
        return shapes.completion_chunk(self.response_id, self.created, self.model_name, text or "", reason, lp,
                                   p.include_usage)

    async def _respond_stream(self) -> web.StreamResponse:
        resp = web.StreamResponse(headers={**SSE_HEADERS, **self._headers()})
        p = self.parsed
        want_lp = p.logprobs is not None
        try:
            await resp.prepare(self.request)
            if p.kind == "chat":
                await resp.write(shapes.sse(self._chunk("", None, None, role=True)))
            async for out in self.stream:
                self._note(out)
                if client_gone(self.request):
                    return resp
                lps = out.logprobs if want_lp else None
                if out.text or lps:
                    await resp.write(shapes.sse(self._chunk(out.text, None, lps)))
                if out.finished:
                    break
            r = self.result
            if r.finish_reason is None:
                raise RuntimeError("engine stream ended without a finished output")
            if not r.ok:
                await resp.write(shapes.sse(self._failure().body()))
            else:
                await resp.write(shapes.sse(self._chunk(None if p.kind == "chat" else "",
                                                    r.finish_reason, None)))
                if p.include_usage:
                    await resp.write(shapes.sse(shapes.usage_chunk(
                        self.response_id, self.created, self.model_name, p.kind, r.prompt_tokens or 0,
                        r.completion_tokens or 0)))
            await resp.write(shapes.SSE_DONE)
            await resp.write_eof()
        except ConnectionError:  # aiohttp's write to a closed client
            pass
        return resp
