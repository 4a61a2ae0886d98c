"""The README's picture of the live A/B page (``/baton/ab``), taken from a real run.

    python -m baton_sidecar.bench.ab_screenshot [--out docs/img/ab-page.png] [--requests 160]

Starts ``transformers serve --continuous-batching`` on the embedded model (the incumbent) and
``baton-sidecar serve`` in front of it (weight 50, shadow mode on), sends mixed traffic through the
sidecar (both arms, streamed and not, some requests Baton cannot serve), waits until the report
settles, and has headless Chromium screenshot the page. Needs the ``playwright`` package (the
``test`` extra) and Debian's ``chromium``; Playwright never downloads a browser here.

The helpers (traffic, settling, the browser) are shared with ``tests/server/test_server_ab_page.py``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

CHROMIUM = "/usr/bin/chromium"  # Debian's package (apt-get install chromium)
CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync")
STICKY_HEADER = "x-baton-session"  # the router's default: sessions split the arms deterministically
PROMPT_MARKER = "ab-page-probe"  # in every prompt: the page must never show it
COPY_ENDINGS = ("refused", "failed", "unanswered")  # paired.skipped reasons of copies that started


def _post(url: str, body: dict[str, Any], session: str, timeout_s: float) -> tuple[str, int]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={
        "Content-Type": "application/json", STICKY_HEADER: session})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            response.read()  # a stream to its end
            return response.headers.get("x-baton-arm", "?"), response.status
    except urllib.error.HTTPError as err:
        err.read()
        return err.headers.get("x-baton-arm", "?"), err.code


def one_request(base_url: str, model: str, i: int, timeout_s: float = 120.0) -> tuple[str, int]:
    """Request ``i`` of the mix: completions and chat, every other one streamed, output lengths 4..16
    tokens, and every tenth with ``suffix`` (ineligible: relayed to the incumbent)."""
    max_tokens = 4 + (i * 7) % 13
    words = " ".join(["word"] * (i % 9))
    if i % 10 == 9:
        return _post(base_url + "/v1/completions", {"model": model, "prompt": f"{PROMPT_MARKER} {i}",
                                                    "suffix": ".", "max_tokens": 4}, f"s{i}", timeout_s)
    stream = i % 2 == 1
    if i % 4 in (0, 1):
        body = {"model": model, "prompt": f"{PROMPT_MARKER} {i}: {words} then", "max_tokens": max_tokens,
                "temperature": 0, "stream": stream}
        return _post(base_url + "/v1/completions", body, f"s{i}", timeout_s)
    body = {"model": model, "messages": [{"role": "user", "content": f"{PROMPT_MARKER} {i}. Say {words} more."}],
            "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    return _post(base_url + "/v1/chat/completions", body, f"s{i}", timeout_s)


def send_traffic(base_url: str, model: str, requests: int, concurrency: int = 4) -> Counter[tuple[str, int]]:
    """``requests`` requests of the mix, ``concurrency`` at a time; (arm, status) -> count."""
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        return Counter(pool.map(lambda i: one_request(base_url, model, i), range(requests)))


def get_json(url: str, timeout_s: float = 60.0) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return json.loads(response.read())


def settled_report(base_url: str, timeout_s: float = 180.0) -> dict[str, Any]:
    """The plain report once traffic has stopped: every started shadow copy ended, and nothing moved
    between two reports a second apart (copies and outcomes are recorded after the client's answer)."""
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        report = get_json(base_url + "/baton/ab/report")
        paired = report["paired"]
        copies_ended = paired["pairs"] + sum(paired["skipped"].get(k, 0) for k in COPY_ENDINGS)
        if report == last and copies_ended == paired["shadowed"]:
            return report
        if time.monotonic() > deadline:
            raise TimeoutError(f"the A/B report did not settle in {timeout_s:g} s: {paired}")
        last = report
        time.sleep(1.0)


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """Debian's headless Chromium under Playwright; RuntimeError naming what is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise RuntimeError("the playwright package is missing: pip install -e '.[test]'") from None
    if not os.access(CHROMIUM, os.X_OK):
        raise RuntimeError(f"{CHROMIUM} is missing: apt-get install -y chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=list(CHROMIUM_ARGS))
        try:
            yield browser
        finally:
            browser.close()


def open_page(browser: Any, url: str, width: int = 1280) -> tuple[Any, list[str]]:
    """The page at ``url`` once it has rendered a report, and the list its problems go to (console
    errors, uncaught exceptions, failed requests and HTTP errors, while the page stays open)."""
    page = browser.new_page(viewport={"width": width, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
    page.on("pageerror", lambda e: problems.append(f"exception: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"failed: {r.url} {r.failure}"))
    page.on("response", lambda r: r.status >= 400 and problems.append(f"HTTP {r.status}: {r.url}"))
    page.goto(url)
    page.wait_for_selector("body[data-state=ready]", timeout=30_000)
    return page, problems


def main(argv: list[str] | None = None) -> int:
    from baton_sidecar.bench.servers import HF_MODEL_ID, ServerProcess, baton_serve_launch, free_port, hf_serve_launch
    from baton_sidecar.model import converted_gguf_dir, embedded_model_path

    p = argparse.ArgumentParser(prog="python -m baton_sidecar.bench.ab_screenshot", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs/img/ab-page.png")
    p.add_argument("--requests", type=int, default=160)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--weight", type=int, default=50, help="router.baton_weight")
    p.add_argument("--shadow-percent", type=int, default=100, help="router.shadow_percent")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="ab-screenshot-") as scratch:
        model_dir = converted_gguf_dir(embedded_model_path(), progress=False)
        incumbent = hf_serve_launch(model_dir, free_port(), Path(scratch), args.threads, "float32", "cpu")
        config = Path(scratch) / "baton.yaml"
        config.write_text(json.dumps({"router": {"incumbent_url": incumbent.url, "baton_weight": args.weight,
                                                 "shadow_percent": args.shadow_percent}}))  # JSON is YAML
        sidecar = baton_serve_launch(None, free_port(), args.threads, "float32", "cpu", "none")
        # With an incumbent the root's /ready is the incumbent's: the sidecar's own is under /baton/.
        sidecar = replace(sidecar, argv=sidecar.argv + ("--config", str(config)), health_path="/baton/ready")
        with ServerProcess(incumbent) as hf, ServerProcess(sidecar) as baton:
            hf.wait_ready()
            baton.wait_ready()
            one_request(incumbent.url, HF_MODEL_ID, 0)  # transformers serve builds its cache on the first
            arms = send_traffic(sidecar.url, HF_MODEL_ID, args.requests, args.concurrency)
            print("answers (arm, status):", dict(arms))
            settled_report(sidecar.url)
            with chromium() as browser:
                page, problems = open_page(browser, sidecar.url + "/baton/ab?refresh=0")
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=args.out, full_page=True)
            if problems:
                print("the page reported problems:", *problems, sep="\n  ")
                return 1
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
