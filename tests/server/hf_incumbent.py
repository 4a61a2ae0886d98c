"""A real third-party incumbent: ``transformers serve --continuous-batching`` on loopback.

It serves the embedded model's converted cache directory (a complete transformers model directory)
under a short model id: the server names a model by the path it was given, so it is started in a
scratch directory holding a symlink called ``model_id``. Hub access is off (HF_HUB_OFFLINE=1), and
it runs one torch thread so it does not starve the test process on a small machine.
"""

from __future__ import annotations

import os
import queue
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from baton_sidecar.bench.servers import stop_process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def embedded_model_dir() -> Path:
    from baton_sidecar.model import converted_gguf_dir, embedded_model_path

    return converted_gguf_dir(embedded_model_path(), progress=False)


class TransformersServe:
    """``transformers serve --continuous-batching MODEL_ID`` as a subprocess; ``requests`` counts the
    generation requests it logged (its own access log, so what it really served)."""

    def __init__(self, model_id: str, timeout: float = 240.0) -> None:
        self.model_id = model_id
        self._scratch = tempfile.TemporaryDirectory(prefix="hf-incumbent-")
        os.symlink(embedded_model_dir(), Path(self._scratch.name) / model_id)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        exe = Path(sys.executable).parent / "transformers"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(
            [str(exe), "serve", "--continuous-batching", model_id, "--host", "127.0.0.1",
             "--port", str(port), "--log-level", "info", "--device", "cpu"],
            cwd=self._scratch.name, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        self.lines: list[str] = []
        self._new: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
        self.lines.append("<exited>\n")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("transformers serve exited:\n" + self.output())
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("transformers serve not up:\n" + self.output())
            time.sleep(0.5)
        # The first generation builds its paged cache (seconds); pay it here, not in a test.
        requests.post(self.url + "/v1/completions", timeout=timeout,
                      json={"model": self.model_id, "prompt": "warm up", "max_tokens": 2})

    def served(self, path: str = "/v1/", status: str = "200") -> int:
        r"""Requests to paths starting with ``path`` that it answered with ``status`` (a regex:
        ``r"\d+"`` for any), from its access log."""
        pattern = re.compile(r'"(?:GET|POST) (\S+) HTTP/1\.1" (' + status + ")")
        return sum(1 for line in list(self.lines)
                   if (m := pattern.search(line)) and m.group(1).startswith(path))

    def output(self) -> str:
        return "".join(self.lines[-60:])

    def stop(self) -> None:
        stop_process(self.proc)
        self._scratch.cleanup()
