"""``serve``: command-line configuration, and a real process that hot-reloads and drains on SIGTERM."""

import argparse
import json
import signal
import time

import pytest
import requests

from baton_sidecar.config import ServerConfig
from baton_sidecar.server.serve import add_serve_arguments, build_configs
from server_helpers import MODEL_NAME, SidecarProcess


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(list(argv))


def test_build_configs_precedence(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("limits: {max_queue: 9, max_batch_size: 3}\npreemption: {mode: recompute}\n")
    token = tmp_path / "token"
    token.write_text("file-token\n")
    engine, pol, router, server = build_configs(parse(
        "--policy", str(policy), "--max-batch-size", "5", "--batching", "run_to_completion",
        "--incumbent-url", "http://127.0.0.1:8000", "--baton-weight", "10", "--port", "0",
        "--admin-token-file", str(token), "--served-model-name", "m", "--dtype", "float32"),
        environ={"BATON_ADMIN_TOKEN": "env-token"})
    assert pol.limits.max_queue == 9 and pol.limits.max_batch_size == 5  # flag beats --policy
    assert pol.preemption.mode == "recompute" and engine.batching == "run_to_completion"
    assert router.incumbent_url == "http://127.0.0.1:8000" and router.baton_weight == 10
    assert server.admin_token == "file-token" and server.port == 0 and server.served_model_name == "m"
    _, _, router, server = build_configs(parse(), environ={"BATON_ADMIN_TOKEN": "env-token"})
    assert server.admin_token == "env-token" and router.incumbent_url is None
    assert build_configs(parse(), environ={})[3].admin_token is None


def test_quantization_flag_reaches_the_engine_config():
    assert build_configs(parse("--quantization", "int8"), environ={})[0].quantization == "int8"
    assert build_configs(parse(), environ={})[0].quantization == "none"


def test_timeout_flags_reach_the_server_config():
    server = build_configs(parse("--header-timeout", "5", "--body-timeout", "7.5",
                                 "--keepalive-timeout", "20"), environ={})[3]
    def timeouts(s: ServerConfig) -> tuple[float, float, float]:
        return s.header_timeout_s, s.body_timeout_s, s.keepalive_timeout_s

    assert timeouts(server) == (5, 7.5, 20)
    assert timeouts(build_configs(parse(), environ={})[3]) == timeouts(ServerConfig())


@pytest.mark.parametrize("argv, field", [
    (("--baton-weight", "120"), "baton_weight"),
    (("--max-queue", "0"), "max_queue"),
    (("--incumbent-url", "localhost:80"), "incumbent_url"),
    (("--header-timeout", "0"), "header_timeout_s"),
    (("--body-timeout", "-1"), "body_timeout_s"),
    (("--keepalive-timeout", "0"), "keepalive_timeout_s"),
])
def test_build_configs_refuses_by_name(argv, field):
    with pytest.raises(ValueError, match=field):
        build_configs(parse(*argv), environ={})


@pytest.mark.model
def test_process_reloads_and_drains_on_sigterm(tmp_path):
    config = tmp_path / "baton.yaml"
    config.write_text("router:\n  baton_weight: 100\npolicy:\n  limits: {max_queue: 11}\n")
    token = tmp_path / "token"
    token.write_text("proc-token")
    proc = SidecarProcess("--config", str(config), "--admin-token-file", str(token),
                          "--served-model-name", MODEL_NAME, "--max-queue", "7",
                          "--drain-timeout", "60")
    auth = {"Authorization": "Bearer proc-token"}
    try:
        assert proc.get("/baton/ready").status_code == 200
        live = requests.get(proc.url + "/baton/admin/config", headers=auth, timeout=10).json()
        assert live["policy"]["limits"]["max_queue"] == 11  # the --config file wins over flags
        config.write_text("router:\n  baton_weight: 55\n")
        deadline = time.monotonic() + 15
        while requests.get(proc.url + "/baton/admin/config", headers=auth,
                           timeout=10).json()["router"]["baton_weight"] != 55:
            assert time.monotonic() < deadline, "config file change not picked up"
            time.sleep(0.1)
        live = requests.get(proc.url + "/baton/admin/config", headers=auth, timeout=10).json()
        assert live["policy"]["limits"]["max_queue"] == 7  # no longer in the file: the flag again

        # A streaming request is in flight when SIGTERM arrives: it must finish normally.
        body = {"model": MODEL_NAME, "prompt": "Tell me a story.", "max_tokens": 12,
                "ignore_eos": True, "stream": True}
        resp = requests.post(proc.url + "/v1/completions", json=body, stream=True, timeout=180)
        lines = resp.iter_lines()
        first = next(line for line in lines if line)
        assert first.startswith(b"data: ")
        proc.proc.send_signal(signal.SIGTERM)
        proc.wait_for(r"draining", 30)
        refused = requests.post(proc.url + "/v1/completions", json={"prompt": "x"}, timeout=30)
        assert refused.status_code == 503
        assert proc.get("/baton/ready").status_code == 503
        rest = [line for line in lines if line]
        assert rest[-1] == b"data: [DONE]"
        final = json.loads(rest[-2][len(b"data: "):])
        assert final["choices"][0]["finish_reason"] == "length"
        assert proc.proc.wait(60) == 0
    finally:
        proc.stop()
