"""Servers the bench starts itself on loopback, then loads through ``OpenAIPeer``.

- ``baton_serve``   ``baton-sidecar serve`` standalone on the same model, threads, dtype, device and
                    quantization: Baton through its HTTP server, like the other servers here.
- ``hf_serve``      ``transformers serve --continuous-batching`` on the same model directory (a GGUF
                    is served from its converted cache directory), dtype and device, with
                    ``OMP_NUM_THREADS`` = the bench's threads.
- ``llama_server``  llama.cpp's ``llama-server`` on the GGUF file itself, same threads, ``--parallel``
                    slots (16), continuous batching on. Only when a binary is named
                    (``--llama-server PATH`` or ``BATON_LLAMA_SERVER``); benchmarks only, never CI.

Each run starts a fresh server on a free port, waits for its health route, lets the probe's
requests warm it (transformers builds its paged cache on the first one), replays the workload
and stops it (SIGTERM, then SIGKILL). The run's CPU seconds are the server process's own (all
its threads, from ``/proc``), so tokens per CPU-second compare with the in-process engines.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .peer import OpenAIPeer
from .systems import Progress, SystemRun
from .workloads import Workload

LLAMA_SERVER_ENV = "BATON_LLAMA_SERVER"
HF_MODEL_ID = "baton-bench"  # the name transformers serve knows the model by (a symlink in its cwd)
SLOT_CONTEXT = 2048  # llama-server splits -c over its slots; each must hold prompt + output


@dataclass(frozen=True)
class Launch:
    """One server to start: command line, environment additions, working directory, routes."""

    name: str
    argv: tuple[str, ...]
    model_id: str
    port: int
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    health_path: str = "/health"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hf_serve_launch(model_dir: Path, port: int, scratch: Path, threads: int | None, dtype: str,
                    device: str) -> Launch:
    """``transformers serve`` names a model by the path it is given: ``scratch/HF_MODEL_ID`` links
    to ``model_dir`` and the server runs in ``scratch``, offline."""
    link = scratch / HF_MODEL_ID
    if not link.exists():
        os.symlink(model_dir, link)
    exe = shutil.which("transformers") or str(Path(sys.executable).parent / "transformers")
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    argv = (exe, "serve", "--continuous-batching", HF_MODEL_ID, "--host", "127.0.0.1", "--port", str(port),
            "--dtype", dtype, "--device", device, "--log-level", "warning")
    return Launch("hf_serve", argv, HF_MODEL_ID, port, env, str(scratch))


def baton_serve_launch(model: Path | None, port: int, threads: int | None, dtype: str, device: str,
                       quantization: str) -> Launch:
    """``baton-sidecar serve``, standalone (no incumbent); ``model`` None: the embedded default."""
    argv = [sys.executable, "-m", "baton_sidecar.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", HF_MODEL_ID, "--dtype", dtype, "--device", device,
            "--quantization", quantization]
    if model is not None:
        argv += ["--model", str(model)]
    if threads:
        argv += ["--threads", str(threads)]
    return Launch("baton_serve", tuple(argv), HF_MODEL_ID, port, {"TOKENIZERS_PARALLELISM": "false"},
                  health_path="/ready")


def llama_server_launch(binary: Path, gguf: Path, port: int, threads: int | None, parallel: int = 16,
                        slot_context: int = SLOT_CONTEXT, gpu: bool = False) -> Launch:
    """``llama-server`` on ``gguf``: ``parallel`` slots of ``slot_context`` tokens each."""
    argv = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "--parallel", str(parallel), "-c", str(parallel * slot_context), "--cont-batching",
            "-ngl", "999" if gpu else "0", "--alias", gguf.stem]
    if threads:
        argv += ["-t", str(threads), "-tb", str(threads)]
    return Launch("llama_server", tuple(argv), gguf.stem, port)


def llama_server_binary(given: str | None) -> Path | None:
    """``--llama-server`` or ``$BATON_LLAMA_SERVER``; None when neither names one."""
    value = given or os.environ.get(LLAMA_SERVER_ENV)
    if not value:
        return None
    path = Path(value).expanduser()
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise ValueError(f"llama_server: {path} is not an executable llama-server binary")
    return path


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) of a live process, from ``/proc/PID/stat``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM (a server drains and exits), then SIGKILL after 30 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class ServerProcess:
    """A ``Launch`` as a child process; its output goes to a log file shown when it fails."""

    def __init__(self, launch: Launch) -> None:
        self.launch = launch
        self._log = tempfile.NamedTemporaryFile(prefix=f"bench-{launch.name}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(launch.argv, cwd=launch.cwd, env={**os.environ, **launch.env},
                                     stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def tail(self, lines: int = 40) -> str:
        text = Path(self._log.name).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.launch.name} exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.launch.url + self.launch.health_path, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass  # not listening yet, or 503 while the model loads
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.launch.name} not ready in {timeout_s:.0f} s:\n{self.tail()}")
            time.sleep(0.5)

    def cpu_s(self) -> float:
        return process_cpu_s(self.proc.pid)

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()
        os.unlink(self._log.name)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ManagedPeer:
    """A bench system that starts its server (``make_launch(port, scratch)``) for every run."""

    local = True  # its CPU time is the server's own

    def __init__(self, name: str, make_launch: Callable[[int, Path], Launch], tokenizer, api: str = "completions",
                 prompt: str = "auto", ready_timeout_s: float = 300.0) -> None:
        self.name, self.make_launch, self.tokenizer = name, make_launch, tokenizer
        self.api, self.prompt, self.ready_timeout_s = api, prompt, ready_timeout_s

    def run(self, workload: Workload, progress: Progress) -> SystemRun:
        with tempfile.TemporaryDirectory(prefix=f"bench-{self.name}-") as scratch:
            launch = self.make_launch(free_port(), Path(scratch))
            with ServerProcess(launch) as server:
                server.wait_ready(self.ready_timeout_s)
                peer = OpenAIPeer(launch.url, self.tokenizer, launch.model_id, self.name, self.api, self.prompt,
                                  cpu_clock=server.cpu_s)
                run = peer.run(workload, progress)
        run.info.update(command=" ".join(launch.argv[1:]), env=dict(launch.env))
        return run
