"""``baton-sidecar serve``: load the model, start the engine and the HTTP server, drain on SIGTERM.

The HTTP server listens first, so /health answers (and /ready says 503) while the model loads.
On SIGTERM or SIGINT the sidecar stops admitting (503, /ready fails), lets running requests finish
within ``--drain-timeout`` (the engine cancels what is left), and exits 0.

Configuration precedence at start-up: defaults < ``--policy`` file < flags < ``--config`` file
(the hot-reloaded one; see ``configwatch``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from baton_sidecar.config import (BATCHING_MODES, PREEMPTION_MODES, QUANTIZATIONS, TOOL_CALL_PARSERS, EngineConfig,
                                  PolicyConfig, RouterConfig, ServerConfig)
from baton_sidecar.model_dir import ModelLoadError
from baton_sidecar.server.configwatch import deep_merge, read_admin_token

log = logging.getLogger("baton_sidecar.serve")

ADMIN_TOKEN_ENV = "BATON_ADMIN_TOKEN"


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    d = ServerConfig()
    g = parser.add_argument_group("model and engine")
    g.add_argument("--model", default=None,
                   help="local transformers directory or .gguf file (default: embedded SmolLM2-135M)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16", "auto"))
    g.add_argument("--quantization", default="none", choices=QUANTIZATIONS,
                   help="int8: int8 linear layers, CPU only, ~2x faster decode (default none)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="context length (default: the model's own)")
    g.add_argument("--batching", default="rebatch", choices=BATCHING_MODES)
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: all cores but one, which the event loop keeps)")
    g.add_argument("--max-batch-size", type=int, default=None)
    g.add_argument("--max-kv-tokens", type=int, default=None)
    g.add_argument("--max-queue", type=int, default=None)
    g.add_argument("--preemption", default=None, choices=PREEMPTION_MODES)
    g.add_argument("--policy", metavar="FILE", default=None,
                   help="YAML/JSON file with the policy section's content")
    h = parser.add_argument_group("HTTP server")
    h.add_argument("--host", default=d.host)
    h.add_argument("--port", type=int, default=d.port, help="0 picks a free port")
    h.add_argument("--served-model-name", default=d.served_model_name)
    h.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    h.add_argument("--drain-timeout", type=float, default=d.drain_timeout_s, metavar="SECONDS")
    h.add_argument("--header-timeout", type=float, default=d.header_timeout_s, metavar="SECONDS",
                   help="close a connection whose request headers take longer than this")
    h.add_argument("--body-timeout", type=float, default=d.body_timeout_s, metavar="SECONDS",
                   help="answer 408 when a request body pauses longer than this")
    h.add_argument("--keepalive-timeout", type=float, default=d.keepalive_timeout_s,
                   metavar="SECONDS", help="close an idle keep-alive connection after this")
    h.add_argument("--config", metavar="FILE", default=None,
                   help="sidecar config file (policy and router sections), hot-reloaded")
    h.add_argument("--chat-template", metavar="FILE_OR_TEXT", default=None,
                   help="a Jinja chat template (a file, or the template itself) replacing the model's")
    h.add_argument("--tool-call-parser", default=d.tool_call_parser, choices=TOOL_CALL_PARSERS,
                   help="how auto tool calls are read from the text")
    h.add_argument("--admin-token-file", metavar="FILE", default=None,
                   help=f"bearer token for /admin (else env {ADMIN_TOKEN_ENV}; neither: disabled)")
    r = parser.add_argument_group("A/B router")
    r.add_argument("--incumbent-url", default=None, help="e.g. http://127.0.0.1:8000")
    r.add_argument("--baton-weight", type=float, default=None,
                   help="percent of traffic to Baton, 0..100 (default 100)")
    r.add_argument("--sticky-header", default=None)
    r.add_argument("--fallback-to-baton", action="store_true", default=None)


def build_configs(args: argparse.Namespace, environ: Any = os.environ
                  ) -> tuple[EngineConfig, PolicyConfig, RouterConfig, ServerConfig]:
    """All start-up configuration from the command line; ValueError naming the field if refused."""
    engine = EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                          batching=args.batching, max_model_len=args.max_model_len,
                          quantization=args.quantization)
    policy_dict: dict[str, Any] = PolicyConfig().to_dict()
    if args.policy:
        with open(args.policy) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"--policy {args.policy}: must be a mapping")
        policy_dict = PolicyConfig.from_dict(loaded).to_dict()
    flags: dict[str, Any] = {"limits": {}}
    for flag, key in (("max_batch_size", "max_batch_size"), ("max_kv_tokens", "max_kv_tokens"),
                      ("max_queue", "max_queue")):
        if getattr(args, flag) is not None:
            flags["limits"][key] = getattr(args, flag)
    if args.preemption is not None:
        flags["preemption"] = {"mode": args.preemption}
    policy = PolicyConfig.from_dict(deep_merge(policy_dict, flags))
    router_dict: dict[str, Any] = {}
    for flag, key in (("incumbent_url", "incumbent_url"), ("baton_weight", "baton_weight"),
                      ("sticky_header", "sticky_header"),
                      ("fallback_to_baton", "fallback_to_baton")):
        if getattr(args, flag) is not None:
            router_dict[key] = getattr(args, flag)
    router = RouterConfig.from_dict(router_dict)
    token = read_admin_token(environ.get(ADMIN_TOKEN_ENV), args.admin_token_file)
    server = ServerConfig(host=args.host, port=args.port, served_model_name=args.served_model_name,
                          max_body_bytes=args.max_body_bytes, config_file=args.config,
                          policy_file=args.policy,
                          admin_token=token, drain_timeout_s=args.drain_timeout,
                          header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                          keepalive_timeout_s=args.keepalive_timeout,
                          chat_template=read_chat_template(args.chat_template),
                          tool_call_parser=args.tool_call_parser)
    return engine, policy, router, server


def read_chat_template(value: str | None) -> str | None:
    """``--chat-template``: a file's text, or the value itself when it is a template (vLLM's rule)."""
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if "{" not in value:  # neither a file nor Jinja: most likely a mistyped path
        raise ValueError(f"--chat-template: no such file {value!r}")
    return value


def _load_in_thread(fn, *args) -> asyncio.Future:
    """Run ``fn`` on a daemon thread: a SIGTERM during a long load need not wait for it."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def target() -> None:
        try:
            value = fn(*args)
        except BaseException as exc:  # delivered to the awaiting coroutine
            # Bound now: Python unbinds ``exc`` when this block ends, before the callback runs.
            loop.call_soon_threadsafe(lambda error=exc: fut.done() or fut.set_exception(error))
        else:
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(value))

    threading.Thread(target=target, name="baton-load-model", daemon=True).start()
    return fut


async def serve(engine_cfg: EngineConfig, policy: PolicyConfig, router_cfg: RouterConfig,
                server_cfg: ServerConfig) -> int:
    from baton_sidecar.engine import AsyncEngine
    from baton_sidecar.model import load_model
    from baton_sidecar.server.app import attach_engine, drain, init_app
    from baton_sidecar.server.connections import make_runner
    from baton_sidecar.server.state import CONFIG, METRICS

    app = init_app(None, server_cfg, router_cfg, policy)
    rejections = app[METRICS].http_rejections
    runner = make_runner(app, header_timeout_s=server_cfg.header_timeout_s,
                         keepalive_timeout_s=server_cfg.keepalive_timeout_s,
                         on_rejection=lambda reason: rejections.labels(reason).inc())
    await runner.setup()
    site = web.TCPSite(runner, server_cfg.host, server_cfg.port)
    await site.start()
    host, port = runner.addresses[0][:2]
    # Tests and scripts read this line to learn the port when --port 0.
    print(f"baton-sidecar listening on http://{host}:{port}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    engine, failure = None, None
    try:
        # The engine too: building it measures the model (row padding, step cost), which must
        # not block the event loop that answers health checks meanwhile.
        loading = _load_in_thread(lambda: AsyncEngine(load_model(engine_cfg), engine_cfg,
                                                      app[CONFIG].current.policy))
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not loading.done():
            log.info("stopped while loading the model")
            return 0
        stopping.cancel()
        try:
            engine = loading.result()
        except Exception as error:  # the pod must crash-loop with the cause, not stay unready forever
            if not isinstance(error, ModelLoadError):
                log.error("loading the model failed", exc_info=error)
            failure = _one_line(error)
            return 1
        engine.apply_policy(app[CONFIG].current.policy)  # the latest, if it changed while loading
        await engine.start()
        attach_engine(app, engine)
        log.info("ready: model %s, batching %s", engine.model_name, engine_cfg.batching)
        print("baton-sidecar ready", flush=True)
        await stop.wait()
        log.info("draining (up to %.0fs)", server_cfg.drain_timeout_s)
        http_done = asyncio.ensure_future(drain(app, server_cfg.drain_timeout_s + 5))
        await engine.shutdown(drain_timeout_s=server_cfg.drain_timeout_s)
        await http_done
        return 0
    finally:
        await runner.cleanup()
        log.info("stopped")
        if failure:  # the last line: what a crash-looping pod's log shows first
            log.error("cannot serve: %s", failure)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if isinstance(error, ModelLoadError) else f"{type(error).__name__}: {text}"


def set_cpu_threads(requested: int | None) -> None:
    """Leave one core to the event loop: OpenMP workers that spin on every core starve it, and
    oversubscribed spinning slows the model itself several-fold on a small machine."""
    import torch

    torch.set_num_threads(requested if requested and requested > 0 else max(1, (os.cpu_count() or 2) - 1))


def run_serve(args: argparse.Namespace) -> int:
    level = str(getattr(args, "log_level", "INFO")).upper()
    logging.basicConfig(level=getattr(logging, level, logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        configs = build_configs(args)
    except (ValueError, OSError) as exc:
        print(f"baton-sidecar serve: {exc}", file=sys.stderr)
        return 2
    set_cpu_threads(args.threads)
    try:
        return asyncio.run(serve(*configs))
    except ValueError as exc:  # a bad --config file at start-up
        print(f"baton-sidecar serve: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="baton-sidecar serve",
                                     description="Run the Baton sidecar HTTP server.")
    parser.add_argument("--log-level", default="INFO")
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
