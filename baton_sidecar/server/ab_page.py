"""``GET /baton/ab``: the live A/B page, ``/baton/ab/report`` drawn for people.

One self-contained HTML document: ``static/ab.html`` with ``static/ab.css`` and ``static/ab.js``
inlined, so it loads nothing from anywhere (the pod reaches no CDN) and a saved copy still renders.
The script fetches ``ab/report`` (relative to the page, so any prefix in front of ``/baton/`` works)
every few seconds and draws the charts as SVG itself; see docs/server.md, "The A/B page".

Like the report, the page needs no admin token and shows no request content. The Content-Security-
Policy lets it run exactly its two inline blocks (pinned by SHA-256) and fetch from its own origin,
nothing else.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from importlib import resources

from aiohttp import web


def _sha256_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


@functools.cache
def page() -> tuple[bytes, str]:
    """(the page's HTML, its Content-Security-Policy), built once from the package's static files."""
    static = resources.files("baton_sidecar.server") / "static"
    html, style, script = ((static / name).read_text("utf-8") for name in ("ab.html", "ab.css", "ab.js"))
    if "</style" in style.lower() or "</script" in script.lower():  # inlined as raw text
        raise RuntimeError("ab.css or ab.js would close its own element early")
    html = html.replace("<style></style>", f"<style>{style}</style>", 1)
    html = html.replace("<script></script>", f"<script>{script}</script>", 1)
    csp = ("default-src 'none'; "
           f"script-src {_sha256_source(script)}; style-src {_sha256_source(style)}; "
           "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'")
    return html.encode("utf-8"), csp


async def ab_page(request: web.Request) -> web.Response:
    body, csp = page()
    return web.Response(body=body, content_type="text/html", charset="utf-8", headers={
        "Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"})
