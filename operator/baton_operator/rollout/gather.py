"""Gathering, the rollout's only I/O besides the Kubernetes API: where the sidecars are (EndpointSlice
URLs, or the ``baton.dev/report-urls`` annotation), their ``/baton/ab/report`` (``measure``) and their
``/baton/metrics`` parsed into an ``EngineSample`` for auto-tune.

The HTTP fetches (``fetch_all``, ``measure``) are async (aiohttp); everything else here is pure.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, Iterable, Mapping, Sequence

from baton_operator import resources as res
from baton_operator.rollout.autotune import EngineSample
from baton_operator.rollout.measurement import Baseline, Measurement

ANN_REPORT_URLS = "baton.dev/report-urls"


# --- where the sidecars are ------------------------------------------------------------------------

def report_urls_from_annotation(bd: Mapping[str, Any]) -> list[str] | None:
    """Explicit sidecar base URLs (comma-separated) from the ``baton.dev/report-urls`` annotation."""
    value = ((bd.get("metadata") or {}).get("annotations") or {}).get(ANN_REPORT_URLS)
    if not value:
        return None
    return [u.strip().rstrip("/") for u in value.split(",") if u.strip()]


def service_name(bd: Mapping[str, Any]) -> str:
    """The Service in front of the sidecars: standalone, the BatonDeployment's own; sidecar mode, the target's."""
    spec = bd.get("spec") or {}
    if spec.get("mode") == "sidecar":
        return spec.get("targetService") or spec["targetDeployment"]
    return bd["metadata"]["name"]


def endpoint_report_urls(slices: Iterable[Mapping[str, Any]], port: int) -> list[str]:
    """Base URLs of the ready endpoints of a Service's EndpointSlices, at Baton's port.

    In sidecar mode the pods are the target's, with Baton beside the incumbent on ``port``; a pod that
    has not got the sidecar yet answers nothing there, which holds the analysis until the pods rolled.
    """
    urls = set()
    for endpoint_slice in slices:
        if endpoint_slice.get("addressType") not in (None, "IPv4", "IPv6"):
            continue
        for endpoint in endpoint_slice.get("endpoints") or []:
            if (endpoint.get("conditions") or {}).get("ready") is False:
                continue
            for ip in endpoint.get("addresses") or []:
                urls.add(f"http://[{ip}]:{port}" if ":" in ip else f"http://{ip}:{port}")
    return sorted(urls)


# --- /baton/metrics ------------------------------------------------------------------------------

_METRIC = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", re.M)


def metric_sum(text: str, name: str, labels: Mapping[str, str] | None = None) -> float | None:
    """Sum of a metric's samples in Prometheus text format whose labels include ``labels``."""
    total, found = 0.0, False
    for m in _METRIC.finditer(text):
        if m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if labels and any(got.get(k) != v for k, v in labels.items()):
            continue
        try:
            total += float(m.group(3))
            found = True
        except ValueError:
            continue
    return total if found else None


def engine_sample(metrics_texts: Sequence[str], now: float) -> EngineSample | None:
    """Padding-ratio gauge (mean over pods), Baton's completion tokens and the KV slot counters (sums)
    from /baton/metrics pages."""
    ratios = [r for t in metrics_texts if (r := metric_sum(t, "baton_engine_padding_ratio")) is not None]
    tokens = [metric_sum(t, "baton_tokens_total", {"arm": "baton", "kind": "completion"}) or 0.0
              for t in metrics_texts]
    if not ratios:
        return None

    def counter(name: str) -> float | None:  # summed only when every pod exports it
        values = [metric_sum(t, name) for t in metrics_texts]
        return None if any(v is None for v in values) else sum(v for v in values if v is not None)

    return EngineSample(sum(ratios) / len(ratios), sum(tokens), now, counter("baton_engine_kv_slots_total"),
                        counter("baton_engine_kv_padding_slots_total"))


# --- HTTP ----------------------------------------------------------------------------------------

async def fetch_all(urls: Sequence[str], path: str | Sequence[str], timeout_s: float, as_json: bool = True
                    ) -> tuple[list[Any], list[str]]:
    """GET ``path`` (one for all, or one per URL) from every base URL concurrently: (answers in order, errors)."""
    import aiohttp

    paths = [path] * len(urls) if isinstance(path, str) else list(path)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def one(url: str) -> Any:
            async with session.get(url) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}")
                return await (resp.json() if as_json else resp.text())

        results = await asyncio.gather(*(one(u + p) for u, p in zip(urls, paths)), return_exceptions=True)
    answers, errors = [], []
    for url, p, result in zip(urls, paths, results):
        if isinstance(result, BaseException):
            errors.append(f"{url}{p}: {type(result).__name__} {result}".strip())
        else:
            answers.append(result)
    return answers, errors


def report_path(since: int | None, samples: bool = True) -> str:
    """The raw samples since the step's cursor (no CI computed on the sidecar: the operator pools them); or,
    without ``samples``, the plain report (the shadow stage reads only its ``paired`` block)."""
    if not samples:
        return res.AB_REPORT_PATH
    return f"{res.AB_REPORT_PATH}?samples=true" + (f"&since={since}" if since is not None else "")


async def measure(urls: Sequence[str], timeout_s: float, baseline: Baseline | None = None,
                  samples: bool = True) -> Measurement:
    """Every sidecar's /baton/ab/report since its cursor in ``baseline`` (with ``samples``, else the plain
    report); any unreadable sidecar makes the measurement a problem."""
    if not urls:
        return Measurement.failed("no ready sidecar pod to read /baton/ab/report from")
    base = baseline or Baseline()
    paths = [report_path(base.since(u), samples) for u in urls]
    reports, errors = await fetch_all(urls, paths, timeout_s)
    if errors:
        return Measurement.failed(f"{len(errors)} of {len(urls)} sidecars unreadable ({errors[0]})", len(urls))
    return Measurement.of(reports, urls)
