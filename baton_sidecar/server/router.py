"""A/B split between the in-process Baton engine and the incumbent server, and the incumbent proxy.

Arm choice is a pure function of (sticky key, weight): a key hashes to a point u in [0, 100) and goes
to Baton when u < baton_weight. Raising the weight therefore only moves sessions from the incumbent
to Baton, never back, and a session keeps its arm while the weight is unchanged. Requests with no
key draw u at random.

The proxy forwards the client's body bytes unchanged and streams the incumbent's response bytes back
unchanged (SSE included), with the W3C trace context propagated. An incumbent that cannot be reached,
times out before answering, or answers 5xx raises ``IncumbentFailure`` before any byte reaches the
client, so the caller can answer 502 or fall back to Baton.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Mapping

import aiohttp
from aiohttp import web

from baton_sidecar.config import RouterConfig
from baton_sidecar.server.tracing import NullTrace

log = logging.getLogger(__name__)

BATON, INCUMBENT = "baton", "incumbent"
# Not forwarded in either direction: connection-level headers, and framing we redo ourselves.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "proxy-connection", "te", "trailer", "trailers", "transfer-encoding",
                        "upgrade", "host", "content-length"})
JSON_STATS_LIMIT = 1 << 20  # bytes of a non-streamed incumbent answer kept to read its usage


def hash_point(key: str) -> float:
    """A stable point in [0, 100) for a sticky key."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64 * 100.0


def choose_arm(key: str | None, baton_weight: float, incumbent_configured: bool,
               rand: Callable[[], float] = random.random) -> str:
    if not incumbent_configured or baton_weight >= 100:
        return BATON
    if baton_weight <= 0:
        return INCUMBENT
    u = hash_point(key) if key else rand() * 100.0
    return BATON if u < baton_weight else INCUMBENT


def sticky_key(headers: Mapping[str, str], header_name: str, user: str | None) -> str | None:
    """The configured header wins over the body's ``user``; empty values do not count."""
    value = headers.get(header_name) if header_name else None
    if value:
        return f"h:{value}"
    return f"u:{user}" if user else None


class Router:
    """Holds the live ``RouterConfig``; replacing it affects only requests assigned afterwards."""

    def __init__(self, config: RouterConfig, rand: Callable[[], float] = random.random) -> None:
        self.config = config
        self._rand = rand

    def update(self, config: RouterConfig) -> None:
        self.config = config

    def assign(self, headers: Mapping[str, str], user: str | None) -> str:
        cfg = self.config
        key = sticky_key(headers, cfg.sticky_header, user)
        return choose_arm(key, cfg.baton_weight, cfg.incumbent_url is not None, self._rand)


class IncumbentFailure(Exception):
    """The incumbent did not answer usefully; nothing has been sent to the client yet."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # connect | timeout | status


@dataclass
class ProxyResult:
    status: int
    ok: bool  # the incumbent answered < 500 and the body was relayed in full
    cancelled: bool = False  # the client went away
    ttft_s: float | None = None
    e2e_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None
    response: web.StreamResponse | None = None  # what the handler returns


class SSEStats:
    """Reads OpenAI SSE chunks in passing: first content, finish reason, usage. Bytes pass unchanged."""

    def __init__(self, arrival: float) -> None:
        self._arrival = arrival
        self._buf = b""
        self.ttft_s: float | None = None
        self.chunks_with_content = 0
        self.usage: dict[str, Any] | None = None
        self.finish_reason: str | None = None

    def feed(self, data: bytes) -> None:
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                continue
            try:
                chunk = json.loads(payload)
            except ValueError:
                continue
            self._chunk(chunk)

    def _chunk(self, chunk: Any) -> None:
        if not isinstance(chunk, dict):
            return
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            text = choice.get("text") if delta is None else (
                delta.get("content") if isinstance(delta, dict) else None)
            if text:
                self.chunks_with_content += 1
                if self.ttft_s is None:
                    self.ttft_s = time.monotonic() - self._arrival
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]


def forward_headers(headers: Mapping[str, str], trace: NullTrace) -> dict[str, str]:
    out = {k: v for k, v in headers.items()
           if k.lower() not in HOP_BY_HOP and k.lower() != "accept-encoding"}
    if trace.enabled:  # our client span becomes the incumbent's parent
        for k in [k for k in out if k.lower() in ("traceparent", "tracestate")]:
            del out[k]
        trace.inject(out)
    return out  # tracing off: the caller's traceparent/tracestate pass through as they came


async def proxy(request: web.Request, session: aiohttp.ClientSession, config: RouterConfig,
                body: bytes, arrival: float, trace: NullTrace) -> ProxyResult:
    """Relay ``request`` to the incumbent. Raises ``IncumbentFailure`` before answering anything."""
    url = config.incumbent_url.rstrip("/") + request.rel_url.path_qs
    span = trace.incumbent_span(url)
    timeout = aiohttp.ClientTimeout(total=config.incumbent_timeout_s,
                                    sock_connect=min(10.0, config.incumbent_timeout_s))
    try:
        upstream = await session.post(url, data=body, headers=forward_headers(request.headers, span),
                                      timeout=timeout, allow_redirects=False)
    except asyncio.TimeoutError:
        span.end(error_type="timeout")
        raise IncumbentFailure("timeout", f"incumbent at {config.incumbent_url} did not answer "
                                          f"within {config.incumbent_timeout_s:g}s") from None
    except aiohttp.ClientError as exc:
        span.end(error_type=type(exc).__name__)
        raise IncumbentFailure("connect", f"incumbent at {config.incumbent_url} is unreachable: "
                                          f"{exc}") from None
    span.set("http.response.status_code", upstream.status)
    try:
        if upstream.status >= 500:
            detail = (await upstream.content.read(512)).decode("utf-8", "replace")
            span.end(upstream.status, error_type=str(upstream.status))
            raise IncumbentFailure("status", f"incumbent at {config.incumbent_url} answered "
                                             f"{upstream.status}: {detail.strip()}")
        return await _relay(request, upstream, arrival, span)
    finally:
        span.end(upstream.status, error_type="cancelled")  # no-op unless cut short by cancellation
        upstream.release()


async def _relay(request: web.Request, upstream: aiohttp.ClientResponse, arrival: float,
                 span: NullTrace) -> ProxyResult:
    headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
    headers["x-baton-arm"] = INCUMBENT
    resp = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    is_sse = upstream.headers.get("content-type", "").startswith("text/event-stream")
    encoded = upstream.headers.get("content-encoding", "identity") != "identity"
    stats = SSEStats(arrival) if is_sse and not encoded else None
    kept = bytearray()
    result = ProxyResult(status=upstream.status, ok=upstream.status < 500, response=resp)
    try:
        await resp.prepare(request)
        async with contextlib.aclosing(_read(upstream)) as body:
            async for data in body:
                if stats is not None:
                    stats.feed(data)
                elif not encoded and len(kept) < JSON_STATS_LIMIT:
                    kept += data
                await resp.write(data)
        await resp.write_eof()
    except _UpstreamBroke as exc:
        # The status line is gone; cut the client's connection too, so that it sees a broken
        # transfer rather than a well-terminated but truncated body.
        result.ok, result.error = False, f"incumbent stream failed: {exc.__cause__!r}"
        if request.transport is not None:
            request.transport.close()
    except ConnectionError as exc:  # aiohttp's writes to a client that went away
        result.cancelled, result.ok, result.error = True, False, f"client disconnected: {exc}"
    result.e2e_s = time.monotonic() - arrival
    if stats is not None:
        result.ttft_s = stats.ttft_s
        result.finish_reason = stats.finish_reason
        u = stats.usage or {}
        result.prompt_tokens = u.get("prompt_tokens")
        result.completion_tokens = u.get("completion_tokens", stats.chunks_with_content or None)
    elif kept and upstream.status < 400:
        _read_json_usage(bytes(kept), result)
    span.end(upstream.status, error_type=None if result.ok else (
        "client_disconnected" if result.cancelled else "incumbent_stream_error"))
    return result


class _UpstreamBroke(Exception):
    """Reading the incumbent's body failed (told apart from failed writes to the client)."""


async def _read(upstream: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    try:
        async for data in upstream.content.iter_any():
            yield data
    except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
        raise _UpstreamBroke() from exc


def _read_json_usage(data: bytes, result: ProxyResult) -> None:
    try:
        obj = json.loads(data)
        u = obj.get("usage") or {}
        result.prompt_tokens = u.get("prompt_tokens")
        result.completion_tokens = u.get("completion_tokens")
        result.finish_reason = (obj.get("choices") or [{}])[0].get("finish_reason")
    except (ValueError, AttributeError, IndexError, TypeError):
        pass
