"""Helpers for the sidecar server tests: a server event-loop thread, metric parsing, and real
``baton-sidecar serve`` subprocesses."""

from __future__ import annotations

import asyncio
import functools
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import requests
from aiohttp import web

from baton_sidecar.config import ServerConfig
from baton_sidecar.server.state import METRICS, STATE
from baton_sidecar.server.connections import make_runner

REPO = Path(__file__).resolve().parents[2]
MODEL_NAME = "baton-test"


class ServerThread:
    """An asyncio loop on its own thread, hosting the engine and any number of apps."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-server-loop",
                                        daemon=True)
        self._thread.start()

    def call(self, coro, timeout: float = 120.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run_sync(self, fn: Callable[[], Any], timeout: float = 30.0) -> Any:
        async def wrapper():
            return fn()
        return self.call(wrapper(), timeout)

    async def _start(self, app: web.Application, header_timeout_s: float | None,
                     keepalive_timeout_s: float | None) -> tuple[web.AppRunner, str]:
        # As serve.py does: timeouts from the app's ServerConfig, rejections counted in its metrics.
        cfg = app[STATE].config if STATE in app else ServerConfig()
        runner = make_runner(app, header_timeout_s=header_timeout_s or cfg.header_timeout_s,
                             keepalive_timeout_s=keepalive_timeout_s or cfg.keepalive_timeout_s,
                             on_rejection=_rejection_counter(app))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        return runner, f"http://{host}:{port}"

    def start_app(self, app: web.Application, header_timeout_s: float | None = None,
                  keepalive_timeout_s: float | None = None) -> tuple[web.AppRunner, str]:
        """Serve ``app`` on a free loopback port; timeouts default to its ``ServerConfig``'s."""
        return self.call(self._start(app, header_timeout_s, keepalive_timeout_s))

    def stop_app(self, runner: web.AppRunner) -> None:
        self.call(runner.cleanup())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def _rejection_counter(app: web.Application) -> Callable[[str], None] | None:
    """serve.py's ``on_rejection``: ``baton_http_rejections_total{reason}`` of a sidecar app."""
    if METRICS not in app:
        return None
    rejections = app[METRICS].http_rejections
    return lambda reason: rejections.labels(reason).inc()


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    """One sample's value from Prometheus text, or None if absent."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if labels is None or all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return None


@functools.lru_cache(maxsize=1)
def serve_command() -> tuple[str, ...]:
    """``baton-sidecar serve`` when the installed CLI works, else the module's own entry point."""
    exe = Path(sys.executable).parent / "baton-sidecar"
    if exe.exists():
        probe = subprocess.run([str(exe), "serve", "--help"], capture_output=True, timeout=120)
        if probe.returncode == 0:
            return (str(exe), "serve")
    return (sys.executable, "-m", "baton_sidecar.server.serve")


class SidecarProcess:
    """A real ``baton-sidecar serve`` subprocess on a free loopback port."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, timeout: float = 180.0,
                 wait_ready: bool = True):
        self.proc = subprocess.Popen(
            [*serve_command(), "--host", "127.0.0.1", "--port", "0", *args], cwd=REPO,
            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        self.lines: list[str] = []
        self._new = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.url = self.wait_for(r"listening on (http://\S+)", timeout)
        if wait_ready:
            self.wait_for(r"baton-sidecar ready", timeout)

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            self._new.put(line)
        self._new.put(None)

    def wait_for(self, pattern: str, timeout: float) -> str:
        """The first group (or the line) of the next output line matching ``pattern``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._new.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"no {pattern!r} within {timeout}s:\n" + self.output()) from None
            if line is None:
                raise RuntimeError(f"sidecar exited before {pattern!r}:\n" + self.output())
            m = re.search(pattern, line)
            if m:
                return m.group(1) if m.groups() else line

    def output(self) -> str:
        return "".join(self.lines[-60:])

    def get(self, path: str) -> requests.Response:
        return requests.get(self.url + path, timeout=10)

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


class StubIncumbent:
    """A scripted incumbent on the server thread that records what it receives.

    ``mode``: "sse" (fixed SSE bytes in several writes), "json", "500", "slow" (sleeps before
    answering), "stall" (sends the first SSE part, then sleeps) or "break" (sends the first SSE
    part, then drops the connection).
    """

    SSE_PARTS = (b'data: {"id":"stub-1","object":"chat.completion.chunk","choices":[{"index":0,'
                 b'"delta":{"role":"assistant","content":""}}]}\n\n',
                 b': a comment line the proxy must not touch\n\n',
                 b'data: {"id":"stub-1","object":"chat.completion.chunk","choices":[{"index":0,'
                 b'"delta":{"content":"Hel',
                 b'lo"}}]}\n\ndata: {"id":"stub-1","object":"chat.completion.chunk","choices":'
                 b'[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n',
                 b'data: {"id":"stub-1","choices":[],"usage":{"prompt_tokens":3,'
                 b'"completion_tokens":1,"total_tokens":4}}\n\ndata: [DONE]\n\n')
    JSON_BODY = (b'{"id":"stub-2","object":"text_completion","choices":[{"index":0,"text":"  odd '
                 b' spacing ","finish_reason":"length"}],  "usage":{"prompt_tokens":2,'
                 b'"completion_tokens":5,"total_tokens":7}}')

    def __init__(self, server_thread: ServerThread, mode: str = "sse") -> None:
        self.mode = mode
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.cancelled = 0  # handlers cut short because the sidecar closed the connection
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._thread = server_thread
        self._runner, self.url = server_thread.start_app(app)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.received.append((dict(request.headers), await request.read()))
        if self.mode == "500":
            return web.json_response({"error": {"message": "boom"}}, status=500)
        if self.mode == "slow":
            await asyncio.sleep(30)
        if self.mode == "json":
            return web.Response(body=self.JSON_BODY, content_type="application/json",
                                headers={"x-incumbent": "yes"})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "x-incumbent": "yes"})
        await resp.prepare(request)
        try:
            for part in self.SSE_PARTS:
                await resp.write(part)
                if self.mode == "break":
                    request.transport.close()
                    return resp
                await asyncio.sleep(30 if self.mode == "stall" else 0.01)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        await resp.write_eof()
        return resp

    def close(self) -> None:
        self._thread.stop_app(self._runner)


def closed_port_url() -> str:
    """A loopback URL nothing listens on."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _any_value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_any_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


class OTLPReceiver:
    """A local OTLP/HTTP trace receiver: decodes ExportTraceServiceRequest protobufs into dicts."""

    def __init__(self, server_thread: ServerThread) -> None:
        self.spans: list[dict[str, Any]] = []
        self.content_types: set[str] = set()
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/traces", self._handle)
        self._thread = server_thread
        self._runner, self.url = server_thread.start_app(app)

    async def _handle(self, request: web.Request) -> web.Response:
        import gzip

        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest, ExportTraceServiceResponse)

        data = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            data = gzip.decompress(data)
        self.content_types.add(request.content_type)
        msg = ExportTraceServiceRequest()
        msg.ParseFromString(data)
        for rs in msg.resource_spans:
            resource = {a.key: _any_value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for sp in ss.spans:
                    self.spans.append({
                        "name": sp.name, "kind": sp.kind, "trace_id": sp.trace_id.hex(),
                        "span_id": sp.span_id.hex(), "parent_span_id": sp.parent_span_id.hex(),
                        "attributes": {a.key: _any_value(a.value) for a in sp.attributes},
                        "events": [e.name for e in sp.events],
                        "event_times": [e.time_unix_nano for e in sp.events],
                        "status": sp.status.code, "resource": resource,
                        "start": sp.start_time_unix_nano, "end": sp.end_time_unix_nano})
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    def wait_for(self, predicate: Callable[[dict], bool], count: int = 1,
                 timeout: float = 20.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            found = [s for s in list(self.spans) if predicate(s)]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def close(self) -> None:
        self._thread.stop_app(self._runner)
