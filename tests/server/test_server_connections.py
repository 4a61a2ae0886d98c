"""Connection-level hardening (``baton_sidecar.server.connections``): slow headers, idle keep-alive,
malformed HTTP. Raw loopback sockets against a tiny app or the sidecar app without a model."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import time

import pytest
import requests
from aiohttp import web

from baton_sidecar.config import PolicyConfig, RouterConfig, ServerConfig
from baton_sidecar.server.connections import MAX_HEADER_BYTES, make_runner
from server_helpers import metric_value

TIMEOUT = 0.5  # header and keep-alive timeouts of these tests, seconds


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _echo(request: web.Request) -> web.Response:
    try:
        body = await request.read()
    except web.RequestPayloadError as exc:  # what the sidecar's body reader must answer too
        return web.json_response({"error": str(exc)}, status=400)
    return web.Response(text=f"got {len(body)}")


async def _boom(request: web.Request) -> web.Response:
    raise RuntimeError("a bug in a handler")


class Tiny:
    """A tiny app behind ``make_runner`` on the server thread; rejections are recorded."""

    def __init__(self, server_thread, header_timeout_s: float = TIMEOUT,
                 keepalive_timeout_s: float = TIMEOUT) -> None:
        self.rejections: list[str] = []
        self._thread = server_thread
        app = web.Application()
        app.router.add_get("/ok", _ok)
        app.router.add_post("/echo", _echo)
        app.router.add_get("/boom", _boom)

        async def start() -> tuple[web.AppRunner, int]:
            runner = make_runner(app, header_timeout_s=header_timeout_s,
                                 keepalive_timeout_s=keepalive_timeout_s,
                                 on_rejection=self.rejections.append)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            return runner, runner.addresses[0][1]

        self._runner, self.port = server_thread.call(start())

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=5)

    def close(self) -> None:
        self._thread.stop_app(self._runner)


@pytest.fixture
def tiny(server_thread):
    t = Tiny(server_thread)
    yield t
    t.close()


def response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    r = http.client.HTTPResponse(sock)
    r.begin()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()


def seconds_until_closed(sock: socket.socket, limit: float = 5.0) -> float:
    """How long until the peer closes ``sock`` (reading, and failing on any data)."""
    start = time.monotonic()
    sock.settimeout(limit)
    try:
        data = sock.recv(4096)
    except ConnectionResetError:
        data = b""
    assert data == b"", data
    return time.monotonic() - start


def trickle(sock: socket.socket, data: bytes, gap_s: float) -> float | None:
    """Send ``data`` a byte every ``gap_s``; the seconds from the first byte until the server
    closed the connection, or None if all was sent and it stayed open (nothing is read)."""
    start = time.monotonic()
    try:
        for i in range(len(data)):
            sock.sendall(data[i:i + 1])
            sock.settimeout(gap_s)
            try:
                if sock.recv(1, socket.MSG_PEEK) == b"":
                    return time.monotonic() - start
            except socket.timeout:
                pass
    except (BrokenPipeError, ConnectionResetError):
        return time.monotonic() - start
    finally:
        sock.settimeout(5)
    return None


def no_tracebacks(caplog) -> None:
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not loud, [(r.name, r.getMessage()) for r in loud]


# -- slow headers ----------------------------------------------------------------------------------

def test_slow_headers_are_cut_off_after_the_header_timeout(tiny):
    with tiny.connect() as sock:
        closed_after = trickle(sock, b"GET /ok HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100, 0.05)
    assert closed_after is not None and TIMEOUT * 0.8 <= closed_after < TIMEOUT + 1.0
    assert tiny.rejections == ["header_timeout"]
    with tiny.connect() as sock:  # the server is fine
        sock.sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        assert response(sock)[::2] == (200, b"ok")


def test_header_clock_runs_per_request_and_not_over_the_body(server_thread):
    tiny = Tiny(server_thread, header_timeout_s=1.0, keepalive_timeout_s=1.0)
    try:
        with tiny.connect() as sock:
            sock.sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
            assert response(sock)[0] == 200
            time.sleep(0.6)  # idle, within the keep-alive timeout
            # The next request's headers take 0.5 s from their own first byte: served, though they
            # end more than the timeout after both the connection's start and the last answer.
            assert trickle(sock, b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n", 0.5 / 29) is None
            assert response(sock)[::2] == (200, b"ok")
            # A body slower than the header timeout is not the header clock's business.
            sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n")
            assert trickle(sock, b"abcd", 0.4) is None
            assert response(sock)[::2] == (200, b"got 4")
        assert tiny.rejections == []
    finally:
        tiny.close()


# -- keep-alive ------------------------------------------------------------------------------------

def test_idle_keepalive_connection_is_closed_after_the_keepalive_timeout(tiny):
    with tiny.connect() as sock:
        sock.sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, _ = response(sock)
        assert status == 200 and headers.get("connection", "").lower() != "close"
        assert TIMEOUT * 0.8 <= seconds_until_closed(sock) < TIMEOUT + 1.0
    with tiny.connect() as sock:  # a connection that never sends a byte
        assert TIMEOUT * 0.8 <= seconds_until_closed(sock) < TIMEOUT + 1.0
    assert tiny.rejections == []  # closing an idle connection refuses nothing


# -- malformed HTTP --------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [
    b"GARBAGE\r\n\r\n",  # bad request line
    b"GET /ok HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",  # space in a header name
    b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"GET /ok HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * (MAX_HEADER_BYTES + 1) + b"\r\n\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",  # TLS on the plain port
], ids=["request-line", "header-name", "content-length", "duplicate-content-length",
        "line-too-long", "tls"])
def test_malformed_http_is_400_with_openai_error_body(tiny, caplog, raw):
    caplog.set_level(logging.DEBUG)
    with tiny.connect() as sock:
        sock.sendall(raw)
        status, headers, body = response(sock)
        assert seconds_until_closed(sock) < 1.0
    assert status == 400 and headers["content-type"].startswith("application/json")
    err = json.loads(body)["error"]
    assert err["message"].startswith("malformed HTTP request: ") and "\n" not in err["message"]
    assert {k: v for k, v in err.items() if k != "message"} == {
        "type": "invalid_request_error", "param": None, "code": "bad_http"}
    assert tiny.rejections == ["bad_http"]
    no_tracebacks(caplog)
    assert [r for r in caplog.records if r.name == "baton_sidecar.server.connections"
            and r.levelno == logging.DEBUG and not r.exc_info]
    with tiny.connect() as sock:
        sock.sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        assert response(sock)[::2] == (200, b"ok")


def test_bad_chunk_framing_fails_the_body_read_at_once(tiny, caplog):
    """aiohttp's C parser would leave the handler waiting for the rest of a broken body."""
    with tiny.connect() as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        time.sleep(0.1)  # the handler is reading the body by now
        start = time.monotonic()
        sock.sendall(b"zz\r\nabc\r\n0\r\n\r\n")
        status, _, body = response(sock)
        assert time.monotonic() - start < 1.0
        assert seconds_until_closed(sock) < 1.0  # one answer, then the connection closes
    assert status == 400 and "chunk" in json.loads(body)["error"]
    assert tiny.rejections == ["bad_http"]
    no_tracebacks(caplog)


def test_server_faults_keep_aiohttp_500(tiny, caplog):
    with tiny.connect() as sock:
        sock.sendall(b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, _ = response(sock)
    assert status == 500 and headers["content-type"].startswith("text/plain")
    assert tiny.rejections == []
    assert any(r.exc_info for r in caplog.records if r.levelno >= logging.ERROR)


def test_timeouts_must_be_positive():
    app = web.Application()
    with pytest.raises(ValueError, match="header_timeout_s"):
        make_runner(app, header_timeout_s=0, keepalive_timeout_s=1)
    with pytest.raises(ValueError, match="keepalive_timeout_s"):
        make_runner(app, header_timeout_s=1, keepalive_timeout_s=-1)


# -- the sidecar app -------------------------------------------------------------------------------

def test_sidecar_counts_rejections_and_keeps_serving(server_thread, caplog):
    """The sidecar app (no model needed) started like serve.py starts it: timeouts from its
    ServerConfig, rejections in ``baton_http_rejections_total``."""
    from baton_sidecar.server.app import init_app
    from baton_sidecar.server.tracing import Tracing

    cfg = ServerConfig(header_timeout_s=TIMEOUT, keepalive_timeout_s=30)
    app = server_thread.run_sync(lambda: init_app(None, cfg, RouterConfig(), PolicyConfig(),
                                                  tracing=Tracing(None)))
    runner, url = server_thread.start_app(app)
    port = int(url.rsplit(":", 1)[1])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            assert trickle(sock, b"GET /baton/health HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 100, 0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /baton/health HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n")
            status, _, body = response(sock)
        assert status == 400 and json.loads(body)["error"]["code"] == "bad_http"
        assert requests.get(url + "/baton/health", timeout=5).status_code == 200
        text = requests.get(url + "/baton/metrics", timeout=5).text
        for reason in ("header_timeout", "bad_http"):
            assert metric_value(text, "baton_http_rejections_total", {"reason": reason}) == 1
        no_tracebacks(caplog)
    finally:
        server_thread.stop_app(runner)


def test_sidecar_answers_a_broken_chunked_body_with_400(server_thread, caplog):
    """A generation route reading a body whose chunk framing breaks: 400 ``bad_http``, then the
    connection closes; never a 500."""
    from baton_sidecar.server.app import init_app
    from baton_sidecar.server.tracing import Tracing

    app = server_thread.run_sync(lambda: init_app(None, ServerConfig(), RouterConfig(),
                                                  PolicyConfig(), tracing=Tracing(None)))
    runner, url = server_thread.start_app(app)
    port = int(url.rsplit(":", 1)[1])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"pro\r\n")
            time.sleep(0.1)  # the handler is reading the body by now
            sock.sendall(b"zz\r\nabc\r\n0\r\n\r\n")
            status, _, body = response(sock)
            assert seconds_until_closed(sock) < 1.0
        err = json.loads(body)["error"]
        assert status == 400 and err["code"] == "bad_http" and err["param"] == "body"
        text = requests.get(url + "/baton/metrics", timeout=5).text
        assert metric_value(text, "baton_http_rejections_total", {"reason": "bad_http"}) == 1
        no_tracebacks(caplog)
    finally:
        server_thread.stop_app(runner)
