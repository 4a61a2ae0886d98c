"""Connection-level hardening of the sidecar's HTTP server: slow headers, idle keep-alive, bad HTTP.

``make_runner(app, header_timeout_s=..., keepalive_timeout_s=...)`` is ``web.AppRunner`` with a
request handler (aiohttp's per-connection protocol) that

- closes a connection whose request headers are not complete within ``header_timeout_s`` of that
  request's first byte (a slow-header, "slowloris", client), reporting ``"header_timeout"``;
- closes an idle keep-alive connection after ``keepalive_timeout_s`` (aiohttp's own timer, from
  the connection's start or the last answer; its default is an hour). The first byte of a request
  stops it and starts the header clock instead;
- answers malformed HTTP (bad request line, bad header, bad ``Content-Length``, over-long lines)
  with aiohttp's status (400) and OpenAI's error body with ``code: bad_http``, logged as one DEBUG
  line instead of a traceback at ERROR, reporting ``"bad_http"``. Bad framing inside a body that a
  handler is reading (a bad chunk size) fails that read with ``web.RequestPayloadError`` at once,
  for the app to answer, and closes the connection after the answer; also reported ``"bad_http"``.

The header clock runs only while the connection waits for a new request: no request queued or being
handled and the previous request's body complete. Partial headers of a request pipelined behind one
being handled are not timed here; once that request is answered the connection is idle and the
keep-alive timer bounds them.

Relies on aiohttp 3.x internals (checked against 3.14): ``AppRunner._make_server``,
``Server.__call__`` and ``Server._kwargs``; ``RequestHandler``'s ``data_received`` and
``handle_error``, its ``_messages``, ``_request_count``, ``_request_in_progress`` and
``_keepalive_handle`` fields, and its ``_ErrInfo`` parse-error messages.
tests/server/test_server_connections.py pins each behaviour.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler, RequestPayloadError, _ErrInfo

from baton_sidecar.server.errors import APIError

log = logging.getLogger(__name__)

OnRejection = Callable[[str], None]  # called with "header_timeout" or "bad_http"
# A request line or header field may be this long, as on uvicorn and other servers (aiohttp's own
# default, 8190 bytes, would refuse what the incumbent accepts); the client to the incumbent too.
MAX_HEADER_BYTES = 65536


def make_runner(app: web.Application, *, header_timeout_s: float, keepalive_timeout_s: float,
                on_rejection: OnRejection | None = None) -> web.AppRunner:
    """An ``AppRunner`` (handler cancellation on, no access log) with the hardened handler."""
    for name, value in (("header_timeout_s", header_timeout_s),
                        ("keepalive_timeout_s", keepalive_timeout_s)):
        if not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"{name}: must be a positive number")
    return _AppRunner(app, header_timeout_s=float(header_timeout_s), on_rejection=on_rejection,
                      handler_cancellation=True, access_log=None,
                      keepalive_timeout=float(keepalive_timeout_s),
                      max_line_size=MAX_HEADER_BYTES, max_field_size=MAX_HEADER_BYTES)


class _AppRunner(web.AppRunner):
    __slots__ = ("_header_timeout_s", "_on_rejection")

    def __init__(self, app: web.Application, *, header_timeout_s: float,
                 on_rejection: OnRejection | None, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._on_rejection = on_rejection

    async def _make_server(self) -> web.Server:
        # aiohttp's server (app start-up run, request factory, handler kwargs) rebuilt as ours; no
        # site is listening yet, so nothing holds the first one.
        plain = await super()._make_server()
        return _Server(plain.request_handler, request_factory=plain.request_factory,
                       handler_cancellation=plain.handler_cancellation, loop=plain._loop,
                       header_timeout_s=self._header_timeout_s, on_rejection=self._on_rejection,
                       **plain._kwargs)


class _Server(web.Server):
    def __init__(self, *args: Any, header_timeout_s: float, on_rejection: OnRejection | None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.on_rejection = on_rejection

    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)


class _Handler(RequestHandler):
    """One connection. See the module docstring for what it adds to aiohttp's handler."""

    __slots__ = ("_header_timeout_s", "_on_rejection", "_header_deadline", "_last_payload")

    def __init__(self, manager: _Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout_s = manager.header_timeout_s
        self._on_rejection = manager.on_rejection
        self._header_deadline: asyncio.TimerHandle | None = None
        # The body of the last parsed request: bytes arriving before it is complete are body, not
        # the start of the next request.
        self._last_payload: StreamReader | None = None

    def _awaiting_request(self) -> bool:
        """True while the next byte on the connection would start a new request."""
        if (self._request_in_progress or self._messages or self._upgraded or self._close
                or self._force_close or self._payload_parser is not None):
            return False
        body = self._last_payload
        if body is not None and not body.is_eof() and body.exception() is None:
            return False
        self._last_payload = None
        return True

    def data_received(self, data: bytes) -> None:
        if data and self._header_deadline is None and self._awaiting_request():
            # A request has begun: the header clock replaces the idle one (which aiohttp arms again
            # once this request is answered), so a request starting just before the keep-alive
            # timeout still gets its full header time.
            if self._keepalive_handle is not None:
                self._keepalive_handle.cancel()
                self._keepalive_handle = None
            self._header_deadline = self._loop.call_later(self._header_timeout_s,
                                                          self._header_timed_out)
        body, parsed = self._last_payload, self._request_count
        super().data_received(data)
        if self._request_count == parsed or not self._messages:
            return
        # The parser yielded a message (or a parse error): the headers are complete.
        self._cancel_header_deadline()
        message, self._last_payload = self._messages[-1]
        if (isinstance(message, _ErrInfo) and body is not None and not body.is_eof()
                and (self._request_in_progress or any(p is body for _, p in self._messages))):
            self._bad_body(body, message)

    def _bad_body(self, body: StreamReader, error: _ErrInfo) -> None:
        """Bad framing inside a body a handler reads (a bad chunk size, say).

        aiohttp's C parser only raises (its pure-Python parser also fails the body), which leaves
        the handler's read waiting for bytes that never come and queues a second answer behind its
        own. Instead: the handler's read raises ``RequestPayloadError`` (the app answers it), the
        body counts as ended so aiohttp does not drain it after the answer, and the connection
        closes after that answer.
        """
        self._messages.pop()  # the queued parse error: the handler answers for it
        self._last_payload = None
        detail = _first_line(error.message)
        if body.exception() is None:
            body.set_exception(RequestPayloadError(f"malformed HTTP request body: {detail}"))
        body.feed_eof()
        self.close()
        self._rejected(f"malformed HTTP request body from {self.peername}: {detail}")

    def _rejected(self, what: str, reason: str = "bad_http") -> None:
        log.debug("%s", what)
        if self._on_rejection is not None:
            self._on_rejection(reason)

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _header_timed_out(self) -> None:
        self._header_deadline = None
        if self.transport is None or not self._awaiting_request():
            return
        self._rejected(f"closing connection from {self.peername}: request headers incomplete "
                       f"after {self._header_timeout_s:g} s", "header_timeout")
        self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_header_deadline()
        self._last_payload = None
        super().connection_lost(exc)

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None, message: str | None = None
                     ) -> web.StreamResponse:
        if status >= 500:  # a fault of the server (a handler raised or timed out): aiohttp's way
            return super().handle_error(request, status, exc, message)
        # Below 500 only the parser calls this: the client sent something that is not HTTP/1.1.
        detail = _first_line(message or str(exc or ""))
        self._rejected(f"malformed HTTP request from {request.remote} ({status}): {detail}")
        err = APIError(status, f"malformed HTTP request: {detail}", code="bad_http")
        resp = web.json_response(err.body(), status=status)
        resp.force_close()
        return resp


def _first_line(message: str) -> str:
    """aiohttp's parser messages are multi-line, with a caret under the offending byte."""
    lines = message.strip().splitlines()
    return (lines[0].rstrip(":").strip() if lines else "")[:200] or "malformed request"
