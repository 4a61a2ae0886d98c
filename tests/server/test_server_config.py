"""Live configuration: file hot reload, PUT /baton/admin/config, and no in-flight request disturbed."""

import asyncio
import json
import time

import aiohttp
import pytest
import requests

from baton_sidecar.config import PolicyConfig, RouterConfig, ServerConfig
from server_helpers import MODEL_NAME, metric_value

pytestmark = pytest.mark.model

TOKEN = "s3cret-admin"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def wait_until(fn, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not fn():
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.05)


def weight(url):
    return requests.get(url + "/baton/ab/report", timeout=30).json()["router"]["baton_weight"]


@pytest.fixture
def restore_engine_policy(engine, server_thread):
    yield
    server_thread.run_sync(lambda: engine.apply_policy(PolicyConfig()))


def test_config_file_hot_reload(make_server, tmp_path, engine, restore_engine_policy):
    path = tmp_path / "baton.yaml"
    path.write_text("router:\n  baton_weight: 100\npolicy:\n  limits: {max_queue: 100}\n")
    url, _ = make_server(server=ServerConfig(served_model_name=MODEL_NAME, config_file=str(path)),
                         router=RouterConfig(incumbent_url="http://127.0.0.1:9"),
                         watch_interval_s=0.1)
    assert weight(url) == 100
    path.write_text("router:\n  baton_weight: 40\npolicy:\n  limits: {max_queue: 50}\n")
    wait_until(lambda: weight(url) == 40)
    assert engine.policy.limits.max_queue == 50
    path.write_text("router:\n  baton_weight: 400\n")  # refused: the previous config stays
    wait_until(lambda: metric_value(requests.get(url + "/baton/metrics", timeout=5).text,
                                    "baton_config_reload_errors_total", {"source": "file"}) == 1)
    assert weight(url) == 40 and engine.policy.limits.max_queue == 50
    text = requests.get(url + "/baton/metrics", timeout=5).text
    assert metric_value(text, "baton_config_reloads_total", {"source": "file"}) == 2
    assert metric_value(text, "baton_router_baton_weight") == 40


def test_admin_put_applies_policy_and_router(make_server, engine, restore_engine_policy):
    url, _ = make_server(server=ServerConfig(served_model_name=MODEL_NAME, admin_token=TOKEN))
    doc = "router:\n  incumbent_url: http://127.0.0.1:9\n  baton_weight: 25\npolicy:\n  aging_s: 7\n"
    resp = requests.put(url + "/baton/admin/config", data=doc, headers=AUTH, timeout=10)
    assert resp.status_code == 200
    body = resp.json()
    assert body["router"]["baton_weight"] == 25 and body["policy"]["aging_s"] == 7
    assert engine.policy.aging_s == 7 and weight(url) == 25
    # A patch: keys not mentioned keep their values.
    resp = requests.put(url + "/baton/admin/config", json={"router": {"baton_weight": 60}}, headers=AUTH,
                        timeout=10)
    assert resp.json()["router"]["incumbent_url"] == "http://127.0.0.1:9"
    current = requests.get(url + "/baton/admin/config", headers=AUTH, timeout=10).json()
    assert current["router"]["baton_weight"] == 60 and current["policy"]["aging_s"] == 7


def test_reloads_never_drop_in_flight_requests(make_server, tmp_path, engine, restore_engine_policy):
    path = tmp_path / "baton.yaml"
    path.write_text("policy:\n  aging_s: 30\n")
    url, _ = make_server(server=ServerConfig(served_model_name=MODEL_NAME, admin_token=TOKEN,
                                             config_file=str(path)), watch_interval_s=0.1)

    async def scenario():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
            async def stream(i):
                body = {"model": MODEL_NAME, "prompt": f"Story {i}:", "max_tokens": 8,
                        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
                async with s.post(url + "/v1/completions", json=body) as r:
                    return r.status, await r.text()

            tasks = [asyncio.create_task(stream(i)) for i in range(4)]
            await asyncio.sleep(0.3)
            for k in range(3):  # reconfigure repeatedly while they run
                patch = {"policy": {"limits": {"max_batch_size": 2 + k}, "aging_s": 5 + k},
                         "router": {"baton_weight": 100 - k}}
                async with s.put(url + "/baton/admin/config", json=patch, headers=AUTH) as r:
                    assert r.status == 200
                path.write_text(f"policy:\n  aging_s: {10 + k}\n")
                await asyncio.sleep(0.2)
            return await asyncio.gather(*tasks)

    results = asyncio.run(scenario())
    for status, text in results:
        assert status == 200 and text.endswith("data: [DONE]\n\n")
        usage = json.loads(text.split("data: ")[-2])["usage"]
        assert usage["completion_tokens"] == 8
