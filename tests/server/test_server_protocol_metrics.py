"""The model-server protocol series the Gateway API Inference Extension's endpoint picker scrapes:
served on the standalone ``/metrics`` under the picker's default (vLLM) names, read with
Prometheus' own parser, and tracking the engine in the very scrape the picker would take."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import aiohttp
import requests
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from baton_sidecar.config import Limits, PolicyConfig, RouterConfig
from baton_sidecar.server.metrics import Metrics
from server_helpers import MODEL_NAME
from baton_sidecar.server.protocol_metrics import (CACHE_INFO, KV_USAGE, LORA_INFO, QUEUED, RUNNING,
                                                   SERIES)

# The picker's defaults (gateway-api-inference-extension, pkg/epp/server/options.go and the
# core-metrics extractor's built-in "vllm" engine config), written out here so a rename on
# Baton's side cannot pass unnoticed.
PICKER_DEFAULTS = {"vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                   "vllm:lora_requests_info", "vllm:cache_config_info"}


def parse(text: str) -> dict[str, list]:
    """family name -> its samples, as Prometheus' text parser reads them."""
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def only(families: dict[str, list], name: str):
    (sample,) = families[name]  # one series: the picker keeps one per family, so there is no choice
    return sample


def scrape(url: str, path: str = "/metrics") -> dict[str, list]:
    resp = requests.get(url + path, timeout=10)
    assert resp.status_code == 200
    return parse(resp.text)


def test_series_names_are_the_pickers_defaults():
    assert set(SERIES) == PICKER_DEFAULTS


def test_values_labels_and_edges_from_one_snapshot():
    stats = SimpleNamespace(running=2, waiting=3, swapped=4, batch_size=2, padding_ratio=0.0,
                            kv_tokens_used=900, kv_tokens_capacity=600, steps=1, preemptions_total=4,
                            kv_slots_total=0, kv_padding_slots_total=0, refusals_by_reason={},
                            finished_by_reason={})
    engine = SimpleNamespace(stats=lambda: stats)
    got = parse(Metrics(lambda: engine, model_name="m").render().decode())
    assert only(got, QUEUED).value == 7  # waiting + swapped: both wait for admission
    assert only(got, RUNNING).value == 2
    assert only(got, "baton_engine_kv_usage_ratio").value == 1.5  # a shrunk budget: over 1 ...
    assert only(got, KV_USAGE).value == 1.0  # ... capped for the picker, which scores on 0..1
    for name in (QUEUED, RUNNING, KV_USAGE):
        assert only(got, name).labels == {"model_name": "m"}
    lora = only(got, LORA_INFO)
    assert lora.labels == {"max_lora": "0", "running_lora_adapters": "", "waiting_lora_adapters": ""}
    assert lora.value > 1e9  # its last-update time (epoch seconds), as the protocol has it
    assert only(got, CACHE_INFO).labels == {}  # no block geometry for the picker to tune from

    stats.kv_tokens_capacity = 0
    unlabelled = parse(Metrics(lambda: engine).render().decode())
    assert only(unlabelled, KV_USAGE).value == 0.0 and only(unlabelled, KV_USAGE).labels == {}
    assert not set(SERIES) & set(parse(Metrics(lambda: None).render().decode()))  # no engine yet


def test_standalone_metrics_track_the_engine_in_the_same_scrape(make_server, engine, server_thread):
    # One row at a time: three long requests at once leave two waiting behind the first.
    server_thread.run_sync(lambda: engine.apply_policy(PolicyConfig(limits=Limits(max_batch_size=1))))
    statuses: list[int] = []

    async def three():
        async with aiohttp.ClientSession() as session:
            async def one(i: int) -> int:
                body = {"prompt": f"Story {i}:", "max_tokens": 40, "ignore_eos": True}
                async with session.post(url + "/v1/completions", json=body) as resp:
                    await resp.read()
                    return resp.status
            statuses.extend(await asyncio.gather(*(one(i) for i in range(3))))

    try:
        url, _ = make_server()
        clients = threading.Thread(target=asyncio.run, args=(three(),))
        clients.start()
        deadline = time.monotonic() + 120
        while True:  # until a scrape shows one row running and some waiting behind it
            got = scrape(url)
            busy = only(got, QUEUED).value >= 1 and only(got, RUNNING).value == 1
            if busy or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert busy, "no scrape showed a request waiting behind max_batch_size=1"
        assert only(got, QUEUED).labels == {"model_name": MODEL_NAME}  # the served name, as vLLM labels it
        # Same scrape, same snapshot: the protocol series equal Baton's own engine series.
        assert only(got, QUEUED).value == (only(got, "baton_engine_waiting_requests").value
                                           + only(got, "baton_engine_swapped_requests").value)
        assert only(got, RUNNING).value == only(got, "baton_engine_running_requests").value == 1
        kv = only(got, KV_USAGE).value
        assert 0.0 < kv <= 1.0 and kv == min(1.0, only(got, "baton_engine_kv_usage_ratio").value)
        # /baton/metrics carries them too (the path to scrape when a pod names an incumbent).
        assert set(SERIES) <= set(scrape(url, "/baton/metrics"))
        clients.join(180)
        assert statuses == [200, 200, 200]

        deadline = time.monotonic() + 60
        while True:  # the last snapshot may predate the last step
            got = scrape(url)
            if only(got, QUEUED).value == only(got, RUNNING).value == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert only(got, QUEUED).value == only(got, RUNNING).value == 0
        assert only(got, KV_USAGE).value == only(got, "baton_engine_kv_usage_ratio").value
    finally:
        server_thread.run_sync(lambda: engine.apply_policy(PolicyConfig()))


def test_with_an_incumbent_the_root_metrics_are_the_incumbents(make_server, server_thread):
    async def incumbent_metrics(_: web.Request) -> web.Response:
        return web.Response(text="incumbent_only_series 1\n")

    incumbent = web.Application()
    incumbent.router.add_get("/metrics", incumbent_metrics)
    runner, incumbent_url = server_thread.start_app(incumbent)
    try:
        url, _ = make_server(router=RouterConfig(incumbent_url=incumbent_url))
        root = scrape(url)
        assert "incumbent_only_series" in root and not set(SERIES) & set(root)
        assert set(SERIES) <= set(scrape(url, "/baton/metrics"))
    finally:
        server_thread.stop_app(runner)

