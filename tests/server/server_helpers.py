"""Helpers for the sidecar server tests: a server event-loop thread, metric parsing, and real
``baton-sidecar serve`` subprocesses."""

from __future__ import annotations

import asyncio
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import requests
from aiohttp import web

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

    async def _start(self, app: web.Application) -> tuple[web.AppRunner, str]:
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        return runner, f"http://{host}:{port}"

    def start_app(self, app: web.Application) -> tuple[web.AppRunner, str]:
        return self.call(self._start(app))

    def stop_app(self, runner: web.AppRunner) -> None:
        self.call(runner.cleanup())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


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


class SidecarProcess:
    """A real ``baton-sidecar serve`` subprocess on a free loopback port."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, timeout: float = 180.0):
        exe = REPO / ".venv" / "bin" / "baton-sidecar"
        cmd = [str(exe), "serve"] if exe.exists() and self._cli_has_serve() else [
            sys.executable, "-m", "baton_sidecar.server.serve"]
        self.proc = subprocess.Popen(
            [*cmd, "--host", "127.0.0.1", "--port", "0", *args], cwd=REPO,
            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        self.lines: list[str] = []
        self.url = self._wait_for(r"listening on (http://\S+)", timeout)
        self._wait_for(r"baton-sidecar ready", timeout)
        self._pump = threading.Thread(target=self._drain_output, daemon=True)
        self._pump.start()

    @staticmethod
    def _cli_has_serve() -> bool:
        try:
            import baton_sidecar.cli  # noqa: F401
            return True
        except ImportError:
            return False

    def _wait_for(self, pattern: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("sidecar exited early:\n" + "".join(self.lines[-40:]))
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if ready:
                line = self.proc.stdout.readline()
                self.lines.append(line)
                m = re.search(pattern, line)
                if m:
                    return m.group(1) if m.groups() else line
        raise TimeoutError(f"no {pattern!r} within {timeout}s:\n" + "".join(self.lines[-40:]))

    def _drain_output(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

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
