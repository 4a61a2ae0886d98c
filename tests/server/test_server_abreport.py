"""GET /baton/ab/report's cursor (``since``), raw samples, truncation, the report cache, rejections.

No model: the app runs with no engine (/baton/ab/report does not need one) and outcomes are recorded
straight into its ``ABStats``.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer

from baton_sidecar.config import PolicyConfig, RouterConfig, ServerConfig
from baton_sidecar.server import abstats
from baton_sidecar.server.abstats import ABStats, Outcome, SLATargets
from baton_sidecar.server.app import ABSTATS, init_app
from baton_sidecar.server.tracing import Tracing

SLA = {"interactive": SLATargets(e2e_ms=500.0)}


def record(stats: ABStats, arm: str, latencies, ok: bool = True) -> None:
    for x in latencies:
        stats.record(Outcome(arm, ok, ttft_s=float(x) / 4, e2e_s=float(x)))


def two_steps(stats: ABStats) -> int:
    """Step 1: both arms slow (~2 s); the cursor; step 2: Baton fast (~0.1 s), incumbent ~1 s."""
    rng = np.random.default_rng(0)
    record(stats, "baton", rng.normal(2.0, 0.1, 400))
    record(stats, "incumbent", rng.normal(2.0, 0.1, 400))
    cursor = stats.cursor
    record(stats, "baton", rng.normal(0.1, 0.01, 300))
    record(stats, "incumbent", rng.normal(1.0, 0.05, 300))
    return cursor


def test_since_reports_only_the_outcomes_after_the_cursor():
    stats = ABStats()
    cursor = two_steps(stats)
    assert cursor == 800 and stats.cursor == 1400
    whole = stats.report(SLA, "interactive")
    step = stats.report(SLA, "interactive", since=cursor)
    b_whole, b_step = whole["arms"]["baton"], step["arms"]["baton"]
    # The whole window's p95 is step 1's (slow); the step's only reflects step 2.
    assert b_whole["e2e_s"]["p95"]["value"] > 1.8
    assert b_step["e2e_s"]["p95"]["value"] < 0.2 and b_step["e2e_s"]["p95"]["ci95"][1] < 0.2
    assert b_step["window_count"] == 300 and b_step["e2e_s"]["n"] == 300
    assert b_step["count"] == 700  # totals stay totals since start
    # Step 1 would miss the 500 ms target.
    assert b_step["sla"]["evaluated"] == 300 and b_step["sla"]["met"] == 300
    assert step["cursor"] == 1400 and step["since"] == cursor and step["truncated"] is False
    assert step["verdicts"]["e2e_s"]["result"] == "better"
    assert whole["verdicts"]["e2e_s"]["result"] != "better"  # step 1 masks the difference
    nothing = stats.report(SLA, "interactive", since=stats.cursor)
    assert nothing["arms"]["baton"]["window_count"] == 0
    assert nothing["arms"]["baton"]["e2e_s"] == {"n": 0}


def test_a_cursor_older_than_the_window_is_reported_as_truncated():
    stats = ABStats(window=10)
    record(stats, "baton", [1.0] * 5)
    record(stats, "incumbent", [1.0] * 3)
    old = stats.cursor  # 8
    record(stats, "baton", [2.0] * 12)  # baton's window now holds only outcomes after the cursor...
    report = stats.report({}, None, since=old)
    assert report["arms"]["baton"]["truncated"] is True  # ...but two of those were dropped already
    assert report["arms"]["baton"]["window_count"] == 10
    assert report["arms"]["incumbent"]["truncated"] is False and report["truncated"] is True
    recent = stats.report({}, None, since=stats.cursor - 10)
    assert recent["truncated"] is False and recent["arms"]["baton"]["window_count"] == 10
    # A cursor ahead of this process's sequence comes from another one (a restart): truncated too.
    ahead = stats.report({}, None, since=stats.cursor + 5)
    assert ahead["truncated"] is True and ahead["instance"] == stats.instance
    assert ABStats().instance != stats.instance
    stats.reset()
    assert stats.report({}, None, since=old)["truncated"] is True
    assert stats.report({}, None, since=stats.cursor)["truncated"] is False


def test_samples_are_the_raw_latencies_since_the_cursor_without_bootstrap():
    stats = ABStats()
    record(stats, "baton", [5.0, 6.0])
    cursor = stats.cursor
    record(stats, "baton", [0.1234567, 0.2])
    stats.record(Outcome("baton", False, e2e_s=9.0))  # failed: counted, not a latency sample
    stats.record(Outcome("incumbent", True, ttft_s=None, e2e_s=0.3))  # unstreamed: no TTFT
    report = stats.report(SLA, "interactive", since=cursor, samples=True)
    baton, incumbent = report["arms"]["baton"], report["arms"]["incumbent"]
    assert baton["samples"] == {"e2e_s": [0.123457, 0.2], "ttft_s": [0.030864, 0.05]}
    assert incumbent["samples"] == {"e2e_s": [0.3], "ttft_s": []}
    assert baton["window_count"] == 3 and baton["window_errors"] == 1
    assert baton["sla"] == {"evaluated": 3, "met": 2, "attainment": pytest.approx(2 / 3),
                            "default_class": "interactive"}
    assert "ci95" not in baton["e2e_s"]["p95"] and "verdicts" not in report
    plain = stats.report(SLA, "interactive", since=cursor)
    assert "samples" not in plain["arms"]["baton"]
    assert "ci95" in plain["arms"]["baton"]["e2e_s"]["p95"]


def test_a_report_is_computed_once_until_something_new_is_recorded(monkeypatch):
    calls = []
    real = abstats._compute_report
    monkeypatch.setattr(abstats, "_compute_report",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    stats = ABStats()
    record(stats, "baton", [0.1] * 30)
    assert stats.cached_report({}, None) is None
    first = stats.report({}, None)
    first["router"] = {"added": "by the handler"}
    cached = stats.cached_report({}, None)
    assert cached == {k: v for k, v in first.items() if k != "router"}
    stats.report({}, None)
    assert len(calls) == 1
    stats.report({}, None, since=5)  # another selection: its own entry
    stats.report({}, None, since=5, samples=True)
    assert len(calls) == 3
    record(stats, "incumbent", [0.2])
    assert stats.cached_report({}, None) is None
    stats.report({}, None)
    stats.record_fallback()  # changes the report without a new outcome
    stats.report({}, None)
    stats.report(SLA, "interactive")  # another live SLA policy
    assert len(calls) == 6


# --- over HTTP ---------------------------------------------------------------------------------

@pytest.fixture
async def client():
    app = init_app(None, ServerConfig(served_model_name="m"), RouterConfig(baton_weight=30),
                   PolicyConfig(), tracing=Tracing(None))
    async with TestClient(TestServer(app)) as c:
        yield c


@pytest.mark.parametrize("query, param", [
    ("since=abc", "since"), ("since=-1", "since"), ("since=1.5", "since"), ("since=", "since"),
    ("since=99999999999999999999999", "since"), ("samples=maybe", "samples"),
])
async def test_bad_query_values_are_400_naming_the_field(client, query, param):
    resp = await client.get(f"/baton/ab/report?{query}")
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["param"] == param and error["code"] == "invalid_value"
    assert param in error["message"]


async def test_since_and_samples_over_http_and_repeated_scrapes_hit_the_cache(client, monkeypatch):
    stats = client.app[ABSTATS]
    cursor = two_steps(stats)
    first = await (await client.get(f"/baton/ab/report?since={cursor}&samples=true")).json()
    assert first["cursor"] == stats.cursor and first["since"] == cursor
    assert first["router"]["baton_weight"] == 30
    assert len(first["arms"]["baton"]["samples"]["e2e_s"]) == 300
    assert max(first["arms"]["baton"]["samples"]["e2e_s"]) < 0.2
    monkeypatch.setattr(abstats, "_compute_report", lambda *a, **k: pytest.fail("not cached"))
    again = await (await client.get(f"/baton/ab/report?samples=1&since={cursor}")).json()
    assert again == first


async def test_a_slow_report_does_not_block_the_event_loop(client, monkeypatch):
    started = threading.Event()

    def slow(*args, **kwargs):
        started.set()
        time.sleep(0.6)  # stands in for a bootstrap over full windows
        return {"arms": {}}

    monkeypatch.setattr(client.app[ABSTATS], "report", slow)
    report = asyncio.create_task(client.get("/baton/ab/report"))
    await asyncio.to_thread(started.wait, 5)
    t0 = time.monotonic()
    health = await client.get("/baton/health")
    assert health.status == 200 and time.monotonic() - t0 < 0.3
    assert (await report).status == 200
