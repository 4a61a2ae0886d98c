"""OpenAI servers as bench peers: the probe settles a mode, and the replay honours it.

Fake servers (aiohttp, in-process) cover each probe outcome; Baton's own sidecar is a real server
that takes ``ignore_eos`` and token ids; ``transformers serve`` is a real one that takes neither
(the ``hf_serve`` system, started by the bench itself). llama.cpp is not installed here, so the
``llama_server`` lifecycle runs against a stand-in executable that answers like it.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from aiohttp import web

from baton_sidecar.bench.peer import OpenAIPeer, PeerMode, request_body
from baton_sidecar.bench.servers import (LLAMA_SERVER_ENV, ManagedPeer, baton_serve_launch, hf_serve_launch,
                                         llama_server_binary, llama_server_launch, process_cpu_s)
from baton_sidecar.bench.workloads import BenchRequest, Workload
from tiny import tiny_tokenizer

OPTIONAL = ("ignore_eos", "min_tokens", "priority")
NATURAL = 2  # a fake server's answer length when nothing forces max_tokens


def fake_app(accepts: set[str], honours: bool = True, done: bool = True, seen: list | None = None) -> web.Application:
    """An OpenAI-ish server that refuses (422) optional fields not in ``accepts`` and token-id
    prompts unless "ids" is in it; ``honours`` False: it takes ``ignore_eos`` but stops early."""
    seen = seen if seen is not None else []

    async def models(_request):
        return web.json_response({"data": [{"id": "fake-model"}]})

    async def generate(request):
        body = await request.json()
        seen.append(body)
        if isinstance(body.get("prompt"), list) and "ids" not in accepts:
            return web.json_response({"detail": "prompt must be a string."}, status=400)
        refused = [f for f in OPTIONAL if f in body and f not in accepts]
        if refused:
            return web.json_response({"detail": f"Unexpected fields in the request: {refused}"}, status=422)
        forced = honours and (body.get("ignore_eos") or body.get("min_tokens"))
        n = body["max_tokens"] if forced else min(NATURAL, body["max_tokens"])
        prompt_tokens = len(body["prompt"]) if isinstance(body.get("prompt"), list) else 7
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n}
        chat = request.path.endswith("chat/completions")
        if not body.get("stream"):
            return web.json_response({"choices": [{"index": 0, "text": "x" * n}], "usage": usage})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for k in range(n):
            piece = {"delta": {"content": f"t{k}"}} if chat else {"text": f"t{k}"}
            await response.write(f"data: {json.dumps({'choices': [{'index': 0, **piece}]})}\n\n".encode())
            await asyncio.sleep(0.001)
        await response.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        if done:
            await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", generate)
    app.router.add_post("/v1/chat/completions", generate)
    return app


@pytest.fixture
def serve_fake():
    """Factory: serve an app on a loopback port from a loop thread; returns its base URL."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runners = []

    def serve(app: web.Application) -> str:
        async def start():
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            runners.append(runner)
            return site._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{asyncio.run_coroutine_threadsafe(start(), loop).result(10)}"

    yield serve
    for runner in runners:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def workload(priority: int | None = None) -> Workload:
    return Workload("w", [BenchRequest(0, (5, 6, 7), 4, priority=priority),
                          BenchRequest(1, (8, 9), 3, arrival_s=0.02)])


@pytest.mark.parametrize("accepts, api, prompt, length", [
    ({"ids", "ignore_eos", "min_tokens"}, "completions", "ids", "ignore_eos"),
    ({"min_tokens"}, "completions", "text", "min_tokens"),
    (set(), "completions", "text", "natural"),
    ({"ids", "ignore_eos"}, "chat", "text", "ignore_eos"),
    (set(), "chat", "text", "natural"),
])
def test_probe_settles_the_mode_and_the_replay_follows_it(serve_fake, accepts, api, prompt, length):
    seen = []
    url = serve_fake(fake_app(accepts, done=api == "completions", seen=seen))
    tokens = []
    run = OpenAIPeer(url, tiny_tokenizer(), api=api).run(workload(), tokens.append)
    mode = run.info["mode"]
    assert (mode["api"], mode["prompt"], mode["length"]) == (api, prompt, length)
    assert all(status in (200, 400, 422) for status in mode["probes"].values())
    forced = length != "natural"
    expected = [4, 3] if forced else [NATURAL, NATURAL]
    assert [r.output_tokens for r in run.records] == expected and sum(tokens) == sum(expected)
    assert all(r.error is None and r.ttft_s is not None for r in run.records)
    replayed = [b for b in seen if b.get("stream")]
    assert len(replayed) == 2 and all(b["stream_options"] == {"include_usage": True} for b in replayed)
    if api == "chat":
        assert replayed[0]["messages"][0]["content"] in ("w5 w6 w7", "w8 w9")
    elif prompt == "text":
        assert {b["prompt"] for b in replayed} == {"w5 w6 w7", "w8 w9"}
        assert {r.prompt_tokens for r in run.records} == {7}  # the server's usage, not the workload's
    else:
        assert sorted(b["prompt"] for b in replayed) == [[5, 6, 7], [8, 9]]


def test_a_server_that_takes_ignore_eos_but_stops_early_is_reported(serve_fake):
    url = serve_fake(fake_app({"ids", "ignore_eos"}, honours=False))
    run = OpenAIPeer(url, tiny_tokenizer()).run(workload(), lambda n: None)
    assert [r.error for r in run.records] == ["short output (2 < 4)", "short output (2 < 3)"]


def test_priority_is_sent_only_where_accepted(serve_fake):
    for accepts, sent in (({"ids", "ignore_eos", "priority"}, True), ({"ids", "ignore_eos"}, False)):
        seen = []
        url = serve_fake(fake_app(accepts, seen=seen))
        run = OpenAIPeer(url, tiny_tokenizer()).run(workload(priority=0), lambda n: None)
        assert run.info["mode"]["priority"] == ("sent" if sent else "not sent")
        first = next(b for b in seen if b.get("stream") and b["prompt"] == [5, 6, 7])
        assert ("priority" in first) == sent and all(r.error is None for r in run.records)


def test_request_body_per_mode():
    chat = request_body(PeerMode("chat", "text", "min_tokens"), "m", [1, 2], "hi", 5)
    assert chat["messages"] == [{"role": "user", "content": "hi"}] and chat["min_tokens"] == 5
    assert "prompt" not in chat and "ignore_eos" not in chat
    plain = request_body(PeerMode("completions", "ids", "natural"), "m", [1, 2], "hi", 5, priority=1, stream=False)
    assert plain == {"model": "m", "max_tokens": 5, "temperature": 0, "prompt": [1, 2]}
    with pytest.raises(ValueError, match="prompt"):
        PeerMode("chat", "ids", "natural")


# --- launch commands ---------------------------------------------------------------------------

def test_launch_commands(tmp_path, monkeypatch):
    hf = hf_serve_launch(tmp_path / "model", 8123, tmp_path, threads=2, dtype="float32", device="cpu")
    assert (tmp_path / hf.model_id).is_symlink() and hf.cwd == str(tmp_path)
    assert hf.argv[1:4] == ("serve", "--continuous-batching", hf.model_id) and hf.env["OMP_NUM_THREADS"] == "2"
    assert hf.url == "http://127.0.0.1:8123"
    llama = llama_server_launch(Path("/bin/llama-server"), Path("/m/x.gguf"), 9000, threads=1, parallel=4)
    argv = list(llama.argv)
    assert argv[argv.index("--parallel") + 1] == "4" and argv[argv.index("-c") + 1] == str(4 * 2048)
    assert argv[argv.index("-t") + 1] == "1" and argv[argv.index("-ngl") + 1] == "0" and llama.model_id == "x"
    monkeypatch.delenv(LLAMA_SERVER_ENV, raising=False)
    assert llama_server_binary(None) is None
    monkeypatch.setenv(LLAMA_SERVER_ENV, str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="not an executable"):
        llama_server_binary(None)
    assert process_cpu_s(os.getpid()) > 0


STAND_IN = '''\
    import argparse
    from aiohttp import web

    parser = argparse.ArgumentParser()
    for flag in ("-m", "--host", "--port", "--parallel", "-c", "-ngl", "--alias", "-t", "-tb"):
        parser.add_argument(flag)
    parser.add_argument("--cont-batching", action="store_true")
    args = parser.parse_args()

    async def health(_request):
        return web.json_response({"status": "ok"})

    async def completions(request):
        body = await request.json()
        n = body["max_tokens"] if body.get("ignore_eos") else 1
        if not body.get("stream"):
            return web.json_response({"choices": [{"text": "x"}], "usage": {"completion_tokens": n}})
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(n):
            await response.write(b'data: {"choices": [{"index": 0, "text": "x"}]}\\n\\n')
        await response.write(b'data: {"choices": [], "usage": {"completion_tokens": %d}}\\n\\n' % n)
        await response.write(b"data: [DONE]\\n\\n")
        return response

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/v1/completions", completions)
    web.run_app(app, host=args.host, port=int(args.port), print=None)
'''


def test_llama_server_lifecycle_with_a_stand_in(tmp_path):
    binary = tmp_path / "llama-server"
    binary.write_text(f"#!{sys.executable}\n" + textwrap.dedent(STAND_IN))
    binary.chmod(0o755)
    gguf = tmp_path / "model.gguf"
    system = ManagedPeer("llama_server", lambda port, _: llama_server_launch(binary, gguf, port, threads=1),
                         tiny_tokenizer(), ready_timeout_s=60)
    run = system.run(workload(), lambda n: None)
    assert [r.output_tokens for r in run.records] == [4, 3] and all(r.error is None for r in run.records)
    assert run.info["mode"]["length"] == "ignore_eos" and "--parallel 16" in run.info["command"]
    assert run.cpu_s >= 0 and system.local


# --- real servers ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sidecar_url(real_model):
    """Baton's own sidecar over the real model, on loopback."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
    from server_helpers import ServerThread

    from baton_sidecar.config import EngineConfig, PolicyConfig, RouterConfig, ServerConfig
    from baton_sidecar.engine import AsyncEngine
    from baton_sidecar.server.app import init_app
    from baton_sidecar.server.tracing import Tracing

    thread = ServerThread()

    async def start():
        engine = AsyncEngine(real_model, EngineConfig(), PolicyConfig())
        await engine.start()
        return engine

    engine = thread.call(start(), timeout=300)
    app = thread.run_sync(lambda: init_app(engine, ServerConfig(served_model_name="baton-test"), RouterConfig(),
                                           PolicyConfig(), tracing=Tracing(None)))
    runner, url = thread.start_app(app)
    yield url
    thread.stop_app(runner)
    thread.call(engine.shutdown(drain_timeout_s=5), timeout=60)
    thread.close()


def real_workload(tokenizer) -> Workload:
    prompts = ["The capital of France is", "Write a haiku about the sea.", "List three prime numbers:"]
    return Workload("real", [BenchRequest(i, tuple(tokenizer(p)["input_ids"]), 6, arrival_s=0.05 * i)
                             for i, p in enumerate(prompts)])


@pytest.mark.model
@pytest.mark.parametrize("api, prompt", [("completions", "auto"), ("completions", "text"), ("chat", "auto")])
def test_baton_sidecar_takes_ignore_eos(sidecar_url, real_model, api, prompt):
    w = real_workload(real_model.tokenizer)
    run = OpenAIPeer(sidecar_url, real_model.tokenizer, api=api, prompt=prompt).run(w, lambda n: None)
    mode = run.info["mode"]
    assert mode["length"] == "ignore_eos" and mode["prompt"] == ("ids" if (api, prompt) == ("completions", "auto")
                                                                  else "text")
    for request, record in zip(w.requests, run.records):
        assert record.error is None and record.output_tokens == request.max_tokens
        assert len(record.token_times_s) == request.max_tokens
        if api == "chat":  # the chat template's tokens, as the server counted them
            assert record.prompt_tokens > request.prompt_len


@pytest.mark.model
def test_hf_serve_takes_text_at_natural_lengths(real_model):
    from baton_sidecar.model import converted_gguf_dir, embedded_model_path

    model_dir = converted_gguf_dir(embedded_model_path(), progress=False)
    system = ManagedPeer("hf_serve", lambda port, scratch: hf_serve_launch(model_dir, port, scratch, 1, "float32",
                                                                           "cpu"), real_model.tokenizer)
    w = real_workload(real_model.tokenizer)
    run = system.run(w, lambda n: None)
    mode = run.info["mode"]
    assert (mode["prompt"], mode["length"]) == ("text", "natural")
    assert mode["probes"]["prompt_ids"] == 400 and mode["probes"]["ignore_eos"] == 422
    for request, record in zip(w.requests, run.records):
        assert record.error is None and 0 < record.output_tokens <= request.max_tokens
    assert run.cpu_s > 0 and run.info["env"]["OMP_NUM_THREADS"] == "1"


@pytest.mark.model
def test_baton_serve_is_the_real_sidecar_at_exact_lengths(real_model):
    system = ManagedPeer("baton_serve", lambda port, _: baton_serve_launch(None, port, 1, "float32", "cpu", "none"),
                         real_model.tokenizer)
    w = real_workload(real_model.tokenizer)
    run = system.run(w, lambda n: None)
    mode = run.info["mode"]
    assert (mode["prompt"], mode["length"]) == ("ids", "ignore_eos")
    for request, record in zip(w.requests, run.records):
        assert record.error is None and record.output_tokens == request.max_tokens
    assert run.cpu_s > 0 and "serve" in run.info["command"] and "--threads 1" in run.info["command"]


def test_report_says_which_mode_each_server_used():
    from baton_sidecar.bench.report import server_modes

    probes = {"prompt_ids": 400, "ignore_eos": 422, "min_tokens": 422, "plain": 200}
    systems = {"baton": {"config": {"batching": "rebatch"}},
               "hf_serve": {"output_tokens": 90,
                            "config": {"mode": PeerMode("chat", "text", "natural", probes=probes).as_info()}}}
    assert server_modes(systems, asked=100) == [
        "- `hf_serve`: text prompts through /v1/chat/completions, natural lengths (its own usage counts), "
        "90 of the 100 output tokens asked; refused: prompt_ids 400, ignore_eos 422, min_tokens 422."]


def test_llama_server_without_a_binary_stops_before_loading(monkeypatch, capsys):
    from baton_sidecar.bench import cli

    monkeypatch.delenv(LLAMA_SERVER_ENV, raising=False)
    assert cli.main(["--systems", "baton,llama_server", "--no-progress"]) == 2
    assert "--llama-server PATH" in capsys.readouterr().err
