"""The incumbent proxy: any method, any path, request and response streamed through unchanged.

The client's method, raw path and query, headers (minus hop-by-hop ones) and body bytes go to the
incumbent; its status, headers (minus hop-by-hop ones) and body bytes come back as they arrive, SSE
included. ``Content-Length`` is kept both ways, so framing matches a direct answer. W3C trace
context is propagated (see ``forward_headers``).

Two modes:
- plain pass-through (ineligible requests, routes the sidecar does not own): nothing is read or
  changed, ``Accept-Encoding`` included;
- accounted (A/B requests on the incumbent arm): ``Accept-Encoding`` is dropped so the answer can be
  read in passing for its first-token time, finish reason and token usage.

An incumbent that cannot be reached or does not send its response headers within
``incumbent_timeout_s`` raises ``IncumbentFailure`` before any byte reaches the client; so does a
5xx when the caller asks for it (``fail_on_5xx``, to fall back to Baton). Otherwise a 5xx is relayed
like any other answer. A body stream that stalls is answered 408 by the caller (``BodyTimeout``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any, AsyncIterator, Mapping

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from baton_sidecar.config import RouterConfig
from baton_sidecar.server.errors import APIError
from baton_sidecar.server.results import ArmResult
from baton_sidecar.server.router import INCUMBENT
from baton_sidecar.server.tracing import NULL_TRACE, NullTrace

# Not forwarded in either direction: connection-level headers, and framing aiohttp redoes itself.
# Content-Length is kept (see ``_request_headers`` and ``_relay``).
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "proxy-connection", "te", "trailer", "trailers", "transfer-encoding",
                        "upgrade", "host", "content-length"})
JSON_STATS_LIMIT = 1 << 20  # bytes of a non-streamed incumbent answer kept to read its usage

Upload = bytes | AsyncIterator[bytes] | None


class IncumbentFailure(Exception):
    """The incumbent did not answer usefully; nothing has been sent to the client yet."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # connect | timeout | status

    @classmethod
    def timeout(cls, config: RouterConfig) -> "IncumbentFailure":
        return cls("timeout", f"incumbent at {config.incumbent_base} did not answer within "
                              f"{config.incumbent_timeout_s:g}s")

    @classmethod
    def unreachable(cls, config: RouterConfig, exc: Exception) -> "IncumbentFailure":
        return cls("connect", f"incumbent at {config.incumbent_base} is unreachable: {exc}")


class SSEStats:
    """Reads OpenAI SSE chunks in passing: first content, finish reason, usage. Bytes pass unchanged."""

    def __init__(self, arrival: float) -> None:
        self._arrival = arrival
        self._buf = b""
        self.ttft_s: float | None = None
        self.chunks_with_content = 0
        self.usage: dict[str, Any] | None = None
        self.finish_reason: str | None = None
        self.text_parts: list[str] = []  # choice 0's text, in order

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
                if choice.get("index", 0) == 0 and isinstance(text, str):
                    self.text_parts.append(text)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]


def forward_headers(headers: Mapping[str, str], trace: NullTrace,
                    keep_encoding: bool = True) -> CIMultiDict[str]:
    """The client's headers for the incumbent, repeated ones (two ``Cookie`` lines) kept apart."""
    drop = HOP_BY_HOP if keep_encoding else HOP_BY_HOP | {"accept-encoding"}
    out = CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)
    if trace.enabled:  # our client span becomes the incumbent's parent
        for k in [k for k in out if k.lower() in ("traceparent", "tracestate")]:
            del out[k]
        trace.inject(out)
    return out  # tracing off: the caller's traceparent/tracestate pass through as they came


def incumbent_url(config: RouterConfig, request: web.Request) -> URL:
    """The incumbent's URL for this request: its base (credentials apart: ``with_credentials``) plus
    the client's raw path and query."""
    return URL(config.incumbent_base.rstrip("/") + request.raw_path, encoded=True)


def with_credentials(headers: CIMultiDict[str], config: RouterConfig) -> CIMultiDict[str]:
    """Basic auth from ``user:password@`` in the incumbent's URL, unless the client sent its own
    ``Authorization`` (an OpenAI SDK always does), which goes through untouched."""
    base = URL(config.incumbent_url)
    if base.user is not None and "Authorization" not in headers:
        headers["Authorization"] = aiohttp.BasicAuth(base.user, base.password or "").encode()
    return headers


async def proxy(request: web.Request, session: aiohttp.ClientSession, config: RouterConfig,
                body: Upload, arrival: float, trace: NullTrace, *, account: bool = False,
                fail_on_5xx: bool = False) -> ArmResult:
    """Relay ``request`` (with ``body``) to the incumbent and its answer back to the client."""
    url = incumbent_url(config, request)
    span = trace.incumbent_span(str(url))
    headers = with_credentials(forward_headers(request.headers, span, keep_encoding=not account), config)
    upload = None
    if body is not None and not isinstance(body, bytes):
        if request.content_length is not None:  # keep the client's framing
            headers["Content-Length"] = str(request.content_length)
        body = upload = _Upload(body)
    try:
        upstream = await asyncio.wait_for(
            _open(session, request.method, url, headers, body, config.incumbent_timeout_s),
            config.incumbent_timeout_s)
    except asyncio.TimeoutError:
        span.end(error_type="timeout")
        raise IncumbentFailure.timeout(config) from None
    except aiohttp.ClientError as exc:
        span.end(error_type=type(exc).__name__)
        if upload is not None and upload.error is not None:  # the client stalled, not the incumbent
            raise upload.error from None
        raise IncumbentFailure.unreachable(config, exc) from None
    span.set("http.response.status_code", upstream.status)
    try:
        if upstream.status >= 500 and fail_on_5xx:
            detail = (await upstream.content.read(512)).decode("utf-8", "replace")
            span.end(upstream.status, error_type=str(upstream.status))
            raise IncumbentFailure("status", f"incumbent at {config.incumbent_base} answered "
                                             f"{upstream.status}: {detail.strip()}")
        return await _relay(request, upstream, arrival, span, account)
    finally:
        span.end(upstream.status, error_type="cancelled")  # no-op unless cut short by cancellation
        upstream.release()  # also stops the upload when the incumbent answered before reading it
        if upload is not None:
            await upload.settled()


async def fetch(request: web.Request, session: aiohttp.ClientSession, config: RouterConfig
                ) -> tuple[int, CIMultiDict[str], bytes]:
    """The incumbent's whole answer to a bodiless copy of ``request`` (to read, not to relay):
    status, headers minus hop-by-hop ones and Content-Length, body."""
    url = incumbent_url(config, request)

    async def get() -> tuple[int, CIMultiDict[str], bytes]:
        headers = with_credentials(forward_headers(request.headers, NULL_TRACE), config)
        async with await _open(session, request.method, url, headers, None,
                               config.incumbent_timeout_s) as upstream:
            kept = CIMultiDict((k, v) for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP)
            return upstream.status, kept, await upstream.read()

    try:
        return await asyncio.wait_for(get(), config.incumbent_timeout_s)
    except asyncio.TimeoutError:
        raise IncumbentFailure.timeout(config) from None
    except aiohttp.ClientError as exc:
        raise IncumbentFailure.unreachable(config, exc) from None


async def _open(session: aiohttp.ClientSession, method: str, url: URL, headers: CIMultiDict[str],
                body: Upload, timeout_s: float) -> aiohttp.ClientResponse:
    # The caller bounds the wait for the response headers; once they are in, a long answer (a
    # stream of many minutes) is never cut by a total timeout.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(10.0, timeout_s))
    return await session.request(method, url, data=body, headers=headers, timeout=timeout,
                                 allow_redirects=False)


class _Upload:
    """The client's body on its way to the incumbent, read by aiohttp's writer task.

    Remembers a client-side failure (a stalled body), which aiohttp would otherwise report as a
    broken connection to the incumbent, and lets the proxy wait until the writer has stopped
    reading: the server reads what is left of the body once the handler returns, and two readers
    of one request stream are an error.
    """

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self.error: APIError | None = None
        self._reader: asyncio.Task | None = None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        self._reader = asyncio.current_task()
        try:
            async for chunk in self._chunks:
                yield chunk
        except APIError as err:
            self.error = err
            raise

    async def settled(self) -> None:
        if self._reader is not None and not self._reader.done():
            await asyncio.wait({self._reader}, timeout=5.0)  # released: already cancelled


async def _relay(request: web.Request, upstream: aiohttp.ClientResponse, arrival: float,
                 span: NullTrace, account: bool) -> ArmResult:
    headers = CIMultiDict((k, v) for k, v in upstream.headers.items()  # two Set-Cookie lines stay two
                          if k.lower() not in HOP_BY_HOP or k.lower() == "content-length")
    headers["x-baton-arm"] = INCUMBENT
    resp = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    encoded = upstream.headers.get("content-encoding", "identity") != "identity"
    is_sse = upstream.headers.get("content-type", "").startswith("text/event-stream")
    stats = SSEStats(arrival) if account and is_sse and not encoded else None
    keep_json = account and stats is None and not encoded
    kept = bytearray()
    result = ArmResult(status=upstream.status, ok=upstream.status < 500, response=resp)
    try:
        await resp.prepare(request)
        async with contextlib.aclosing(_read(upstream)) as body:
            async for data in body:
                if stats is not None:
                    stats.feed(data)
                elif keep_json and len(kept) < JSON_STATS_LIMIT:
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
        result.text = "".join(stats.text_parts)
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


def _read_json_usage(data: bytes, result: ArmResult) -> None:
    try:
        obj = json.loads(data)
        u = obj.get("usage") or {}
        result.prompt_tokens = u.get("prompt_tokens")
        result.completion_tokens = u.get("completion_tokens")
        first = (obj.get("choices") or [{}])[0]
        result.finish_reason = first.get("finish_reason")
        text = first.get("text") if "text" in first else (first.get("message") or {}).get("content")
        result.text = text if isinstance(text, str) else None
    except (ValueError, AttributeError, IndexError, TypeError, RecursionError):
        pass
