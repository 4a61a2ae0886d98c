"""GET /baton/ab without a browser or a model: served without the admin token, self-contained (no
external URL), a strict Content-Security-Policy pinning its inline blocks; and the report data the
page draws that only ``?samples=true`` carries (the paired histograms).

The page in a real browser: ``test_server_ab_page.py``.
"""

from __future__ import annotations

import base64
import hashlib
import re
from html.parser import HTMLParser

import pytest
from aiohttp.test_utils import TestClient, TestServer

from baton_sidecar.config import PolicyConfig, RouterConfig, ServerConfig
from baton_sidecar.server.app import init_app
from baton_sidecar.server.paired import ArmTiming, Pair, histogram
from baton_sidecar.server.state import SHADOW
from baton_sidecar.server.tracing import Tracing

SVG_NAMESPACE = "http://www.w3.org/2000/svg"  # the one absolute URL in the page: a name, never fetched


@pytest.fixture
async def client():
    app = init_app(None, ServerConfig(served_model_name="m", admin_token="secret"),
                   RouterConfig(incumbent_url="http://127.0.0.1:9", baton_weight=50, shadow_percent=100),
                   PolicyConfig(), tracing=Tracing(None))
    async with TestClient(TestServer(app)) as c:
        yield c


class Page(HTMLParser):
    """The URLs a document refers to, and its inline style and script texts."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline: dict[str, list[str]] = {"style": [], "script": []}
        self._open: str | None = None

    def handle_starttag(self, tag, attrs):
        self.urls += [v for k, v in attrs if k in ("src", "href", "action", "data", "poster") and v is not None]
        if tag in self.inline:
            assert not dict(attrs).get("src"), "scripts are inline"
            self._open = tag
            self.inline[tag].append("")

    def handle_endtag(self, tag):
        self._open = None

    def handle_data(self, data):
        if self._open:
            self.inline[self._open][-1] += data


def sha256_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


async def test_the_page_is_public_self_contained_and_locked_down(client):
    assert (await client.get("/baton/admin/config")).status == 401  # the token is set...
    resp = await client.get("/baton/ab")  # ...and the page needs none
    assert resp.status == 200 and resp.content_type == "text/html"
    html = await resp.text()
    page = Page()
    page.feed(html)
    # Nothing external: the only URL is the data: icon (it keeps the browser from asking for
    # /favicon.ico, which would go to the incumbent and count as ineligible traffic).
    assert page.urls == ["data:,"]
    assert re.findall(r"https?://[^\s\"'`)]*", html) == [SVG_NAMESPACE]
    assert "ab/report" in page.inline["script"][0] and "/baton/" not in page.inline["script"][0]  # relative
    # The CSP: nothing by default; exactly the inline blocks, by hash; fetches to its own origin only.
    csp = dict(d.strip().split(" ", 1) for d in resp.headers["Content-Security-Policy"].split(";"))
    assert csp["default-src"] == "'none'" and csp["connect-src"] == "'self'"
    assert csp["script-src"] == sha256_source(page.inline["script"][0])
    assert csp["style-src"] == sha256_source(page.inline["style"][0])
    assert "unsafe" not in resp.headers["Content-Security-Policy"]
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    # Every value from the report goes through textContent: the script never writes markup.
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(", html)


async def test_head_and_other_methods(client):
    assert (await client.head("/baton/ab")).status == 200
    resp = await client.post("/baton/ab", data=b"")
    assert resp.status == 405 and "GET" in resp.headers["Allow"]


def test_histogram_bins_cover_the_range_and_count_every_value():
    values = [-0.3, -0.15, -0.12, 0.01, 0.05, 0.2]  # none on an inner edge (-0.2, -0.1, 0, 0.1)
    h = histogram(values, bins=5)
    assert h["edges_s"][0] == -0.3 and h["edges_s"][-1] == 0.2 and len(h["edges_s"]) == 6
    assert h["counts"] == [1, 2, 0, 2, 1]  # the largest value lands in the last, closed bin
    assert histogram([0.1, 0.1]) == {"edges_s": [0.1, 0.1], "counts": [2]}
    assert histogram([]) == {"edges_s": [], "counts": []}


async def test_paired_histograms_only_with_samples(client):
    """The page's histograms come with ``?samples=true``; the plain report's paired block stays as the
    operator stores it in its status (no per-bin lists)."""
    paired = client.server.app[SHADOW].paired
    for i in range(30):
        paired.record(Pair(ArmTiming(0.1, 1.0 + i / 100, 8), ArmTiming(0.2, 1.1, 8), greedy=False,
                           incumbent_in_flight=1, baton_in_flight=0))
    plain = await (await client.get("/baton/ab/report")).json()
    raw = await (await client.get("/baton/ab/report?samples=true")).json()
    assert all("histogram" not in m for m in plain["paired"]["metrics"].values())
    e2e = raw["paired"]["metrics"]["e2e"]
    assert sum(e2e["histogram"]["counts"]) == e2e["n"] == 30
    assert {k: v for k, v in e2e.items() if k != "histogram"} == plain["paired"]["metrics"]["e2e"]
