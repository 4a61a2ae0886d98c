"""The live A/B page in a real browser: Debian's headless Chromium driven by Playwright.

A sidecar on the real model in front of a real ``transformers serve --continuous-batching``
incumbent, at weight 50 with shadow mode on, gets mixed traffic (both arms, streamed and not, some
requests Baton cannot serve). Once traffic stops and the report settles, the page must load with no
console error and no failed request, draw both arms' CDFs, error bars and the paired histograms,
refresh, and show exactly the report's numbers. A screenshot is kept under ``$BATON_TEST_ARTIFACTS``
(default ``tests/artifacts/``, ignored by git); the test prints its path.

Chromium or playwright missing fails the test (``apt-get install chromium``; the ``test`` extra).
"""

from __future__ import annotations

import json
import os
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from baton_sidecar.bench.ab_screenshot import (PROMPT_MARKER, chromium, get_json, open_page, send_traffic,
                                                settled_report)
from baton_sidecar.config import RouterConfig, ServerConfig
from server_helpers import MODEL_NAME, REPO

REQUESTS = 60


def artifacts_dir() -> Path:
    path = Path(os.environ.get("BATON_TEST_ARTIFACTS") or REPO / "tests" / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def lookup(report: Any, key: str) -> Any:
    """The value at a dotted path (``arms.baton.e2e_s.p95.ci95.0``); None where there is none."""
    for part in key.split("."):
        if isinstance(report, list):
            report = report[int(part)] if int(part) < len(report) else None
        elif isinstance(report, dict):
            report = report.get(part)
        else:
            return None
    return report


def shows(text: str, value: Any) -> bool:
    """Whether ``text`` is how the page writes ``value``: strings as they are, seconds in ms and
    shares in % (as rounded for display), other numbers to the digits shown."""
    if value is None:
        return text == "–"
    if isinstance(value, bool):
        return text == str(value).lower()
    if isinstance(value, str):
        return text == value
    m = re.fullmatch(r"([+-]?\d+(?:\.\d+)?(?:e[+-]?\d+)?)( ms|%)?", text)
    if m is None:
        return False
    shown = Decimal(m.group(1))
    scale = {" ms": 1000, "%": 100, None: 1}[m.group(2)]
    half_digit = 5 * 10.0 ** (shown.as_tuple().exponent - 1)
    return abs(float(shown) - value * scale) <= half_digit + 1e-9 * abs(value * scale)


@pytest.fixture
def browser():
    """Debian's headless Chromium; its absence (or playwright's) fails the test, naming the fix."""
    try:
        with chromium() as b:
            yield b
    except RuntimeError as exc:
        pytest.fail(str(exc))


def test_the_ab_page_shows_the_report_in_a_real_browser(browser, make_server, hf_incumbent):
    # An admin token is set: the page must not need it.
    url, _ = make_server(server=ServerConfig(served_model_name=MODEL_NAME, admin_token="secret"),
                         router=RouterConfig(incumbent_url=hf_incumbent.url, baton_weight=50, shadow_percent=100))
    answers = send_traffic(url, MODEL_NAME, REQUESTS)
    assert {arm for arm, status in answers if status == 200} == {"baton", "incumbent"}, answers
    report = settled_report(url)
    assert report["paired"]["pairs"] > 0 and report["ineligible"]["count"] > 0
    raw = get_json(url + "/baton/ab/report?samples=true")

    page, problems = open_page(browser, url + "/baton/ab?refresh=1")
    page.wait_for_selector("body[data-state=ready]:not([data-renders='1'])", timeout=30_000)  # it refreshes
    shot = artifacts_dir() / "ab-page.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nA/B page screenshot: {shot}")
    shown = page.eval_on_selector_all(
        "[data-key]", "es => es.map(e => [e.dataset.key, e.dataset.value, e.textContent])")
    cdfs = page.eval_on_selector_all(
        "path.cdf", "ps => ps.map(p => [p.dataset.arm, p.dataset.metric, Number(p.dataset.n), p.getAttribute('d')])")
    error_bars = page.eval_on_selector_all("g[data-q]", "gs => gs.map(g => [g.dataset.arm, g.dataset.metric, "
                                                        "g.dataset.q, g.querySelectorAll('line.ci').length])")
    bars = page.eval_on_selector_all("rect.bar", "rs => rs.map(r => [r.dataset.metric, Number(r.dataset.count)])")
    html = page.content()
    page.close()
    assert problems == []
    assert get_json(url + "/baton/ab/report") == report  # nothing moved while the page was compared

    # Every number and word the page shows is the report's.
    assert len(shown) > 80
    wrong = [(key, text, lookup(report, key)) for key, value, text in shown
             if json.loads(value) != lookup(report, key) or not shows(text, lookup(report, key))]
    assert wrong == []
    keys = {key for key, _, _ in shown}
    for key in ("verdict", "verdict_basis", "verdicts.e2e_s.result", "arms.baton.e2e_s.p95.ci95.0",
                "arms.incumbent.ttft_s.p99.value", "arms.baton.sla.attainment", "eligible.share",
                "ineligible.top_reasons.0.reason", "paired.verdict", "paired.basis", "paired.agreement.identical_share",
                "paired.metrics.e2e.median_ci95.1", "router.baton_weight", "router.shadow_percent", "cursor"):
        assert key in keys, key

    # Both arms' CDFs, one step per sample; each percentile of each arm with its CI.
    drawn = {(arm, metric): n for arm, metric, n, d in cdfs}
    for arm in ("baton", "incumbent"):
        for metric in ("ttft_s", "e2e_s"):
            samples = raw["arms"][arm]["samples"][metric]
            assert samples and drawn[(arm, metric)] == len(samples), (arm, metric)
    assert all(d.count("V") == n for _, _, n, d in cdfs)
    assert sorted(map(tuple, error_bars)) == sorted((arm, metric, q, 3) for arm in ("baton", "incumbent")
                                        for metric in ("ttft_s", "e2e_s") for q in ("p50", "p95", "p99"))
    # The paired histograms, bin for bin.
    for metric in ("e2e", "ttft", "tpot"):
        counts = raw["paired"]["metrics"][metric]["histogram"]["counts"]
        assert [c for m, c in bars if m == metric] == counts, metric
    assert PROMPT_MARKER not in html  # no request content
