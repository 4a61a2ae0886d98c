"""Shared helpers for the rollout tests: synthetic A/B reports in the sidecar's own format, states.

Named uniquely (not ``helpers``): ``tests/`` has no packages, so every test directory shares one module
namespace. Puts ``operator/`` and ``tests/operator/`` (the API emulator harness) on ``sys.path``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import requests
import yaml
from aiohttp import web

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for extra in (ROOT / "operator", ROOT / "tests" / "operator"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from baton_sidecar.server.abstats import ABStats, Outcome, SLATargets, parse_flag, parse_since  # noqa: E402

from baton_operator.rollout.gather import ANN_REPORT_URLS  # noqa: E402
from baton_operator.rollout.measurement import ARMS, Baseline, PodBaseline  # noqa: E402
from baton_operator.rollout.state import PROGRESSING, RolloutState  # noqa: E402
from operator_testlib import Cluster, wait_for  # noqa: E402,F401  (wait_for is re-exported for the tests)

SLA = {"interactive": SLATargets(ttft_ms=1000.0, e2e_ms=2000.0)}


def arm_outcomes(arm: str, latencies: Sequence[float], errors: int = 0, ttft_fraction: float | None = 0.3,
                 ) -> list[Outcome]:
    """Outcomes with the given e2e latencies (s); TTFT a fixed fraction of e2e (None: unknown, as for a
    non-streamed incumbent answer); ``errors`` failed requests on top."""
    out = [Outcome(arm, ok=True, e2e_s=float(x), ttft_s=None if ttft_fraction is None else float(x) * ttft_fraction,
                   completion_tokens=8) for x in latencies]
    out += [Outcome(arm, ok=False, e2e_s=0.01) for _ in range(errors)]
    return out


def recorded(baton: Sequence[Outcome], incumbent: Sequence[Outcome], instance: str = "i0",
             stats: ABStats | None = None) -> ABStats:
    """The sidecar's own ``ABStats`` with the given outcomes recorded (``instance`` fixed for the tests)."""
    stats = stats or ABStats()
    stats.instance = instance
    for outcome in [*baton, *incumbent]:
        stats.record(outcome)
    return stats


def sidecar_report(stats: ABStats, weight: float = 25, since: int | None = None,
                   samples: bool = True) -> dict[str, Any]:
    """A real ``GET /baton/ab/report`` body, as the controller asks for it (``?samples=true&since=...``)."""
    rep = stats.report(SLA, "interactive", since=since, samples=samples)
    rep["router"] = {"incumbent_url": "http://incumbent", "baton_weight": weight, "sticky_header": "",
                     "fallback_to_baton": False}
    return rep


def report(baton: Sequence[Outcome], incumbent: Sequence[Outcome], weight: float = 25, instance: str = "i0",
           samples: bool = True) -> dict[str, Any]:
    """A sidecar's report of the given outcomes since its cursor 0 (every outcome is this step's)."""
    return sidecar_report(recorded(baton, incumbent, instance), weight, since=0, samples=samples)


def legacy(rep: dict[str, Any]) -> dict[str, Any]:
    """The same report as an older sidecar (no cursors, no samples) would send it."""
    old = {k: v for k, v in rep.items() if k not in ("instance", "cursor", "since", "truncated")}
    old["arms"] = {a: {k: v for k, v in e.items() if k not in ("samples", "truncated", "window_errors")}
                   for a, e in rep["arms"].items()}
    return old


def paired_block(pairs: int, verdict: str, median_diff_s: float = -0.2) -> dict[str, Any]:
    """A sidecar's ``paired`` block of ``/baton/ab/report`` (the shadow stage's contract), e2e-judged."""
    figures = {"n": pairs, "median_diff_s": median_diff_s, "median_ci95": [median_diff_s - 0.05, median_diff_s + 0.05],
               "p95_diff_s": median_diff_s * 1.5, "p95_ci95": [median_diff_s * 2, median_diff_s],
               "baton_faster_share": 0.8 if median_diff_s < 0 else 0.2, "p_value": 0.001 if pairs else None}
    return {"pairs": pairs, "verdict": verdict, "basis": f"e2e median difference {median_diff_s:+.3f} s over {pairs} "
                                                         f"pairs ({verdict})",
            "metric": "e2e", "margin_pct": 10.0, "metrics": {"e2e": figures, "ttft": figures},
            "agreement": {"greedy_pairs": 0, "identical_share": None, "mean_edit_distance": None},
            "contention": {"mean_incumbent_in_flight": 1.5, "mean_baton_in_flight": 0.5}}


def shadow_report(pairs: int | None, verdict: str = "better", weight: float = 0, shadow: float | None = 20,
                  instance: str = "i0") -> dict[str, Any]:
    """A sidecar's plain report in the shadow stage: incumbent traffic only, the router block saying
    ``shadow_percent`` (None: an older report that does not) and a paired block (None: none at all)."""
    rep = sidecar_report(recorded([], arm_outcomes("incumbent", normal(1.0, 0.1, 100, 11)), instance), weight,
                         samples=False)
    if shadow is not None:
        rep["router"]["shadow_percent"] = shadow
    if pairs is not None:
        rep["paired"] = paired_block(pairs, verdict)
    return rep


def zero_baseline(pods: int = 1) -> Baseline:
    """Sidecars ``pod-<i>`` (process ``i<i>``) based at cursor 0 with no requests: all their traffic counts."""
    zeros = {a: 0 for a in ARMS}
    return Baseline({f"pod-{i}": PodBaseline(f"i{i}", 0, zeros, zeros) for i in range(pods)})


def normal(mean: float, sd: float, n: int, seed: int) -> np.ndarray:
    return np.clip(np.random.default_rng(seed).normal(mean, sd, n), 0.001, None)


def state_at(step: int, weight: float, rev: str = "rev", failures: int = 0, applied_at: float = 0.0,
             baseline: Baseline | None = None, phase: str = PROGRESSING) -> RolloutState:
    """A rollout at ``step`` whose weight every sidecar applies since ``applied_at``, analysed long ago
    (by default one sidecar, ``pod-0``, based at cursor 0)."""
    return RolloutState(revision=rev, phase=phase, step=step, weight=weight, step_started_at=applied_at,
                        applied_at=applied_at, last_analysis_at=applied_at, failures=failures,
                        baseline=baseline or zero_baseline())


# --- the emulated cluster, the operator, and what stands in for kubelet ---------------------------


@contextlib.contextmanager
def running_operator(cluster: Cluster, env: dict[str, str] | None = None) -> Iterator[Any]:
    """The real operator (``kopf run -m baton_operator``) in a background thread, watching the cluster's
    namespace, with a fast rollout tick; leaving the block stops it (a restart is two blocks)."""
    import kopf
    from kopf.testing import KopfRunner

    settings_env = {"BATON_ROLLOUT_POLL_SECONDS": "0.5", "BATON_ROLLOUT_TICK_SECONDS": "0.5",
                    "BATON_ROLLOUT_ALLOW_REPORT_URLS": "true", **(env or {})}
    saved = {k: os.environ.get(k) for k in [*settings_env, "OTEL_EXPORTER_OTLP_ENDPOINT",
                                            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]}
    os.environ.update(settings_env)
    os.environ.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    os.environ.pop("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", None)
    args = ["run", "--standalone", f"--namespace={cluster.namespace}", "--verbose", "-m", "baton_operator"]
    settings = kopf.OperatorSettings()
    settings.queueing.exit_timeout = 0.5
    try:
        with KopfRunner(args, timeout=60, settings=settings) as runner:
            yield runner
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class ConfigMirror:
    """Plays kubelet: copies the ConfigMap's ``baton.yaml`` to ``on_change`` whenever it changes, and
    records the sequences of ``router.baton_weight`` and ``router.shadow_percent`` (absent: 0) values it
    saw."""

    def __init__(self, cluster: Cluster, bd_name: str, on_change: Callable[[str], None],
                 interval_s: float = 0.2) -> None:
        self._url = (f"{cluster.url}/api/v1/namespaces/{cluster.namespace}/configmaps/"
                     f"{bd_name}-baton-config")
        self._on_change = on_change
        self._interval = interval_s
        self._stop = threading.Event()
        self.weights: list[float] = []
        self.shadows: list[float] = []
        self._last: str | None = None
        self._thread = threading.Thread(target=self._run, name="config-mirror", daemon=True)

    def __enter__(self) -> "ConfigMirror":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                resp = requests.get(self._url, timeout=5)
            except requests.RequestException:
                continue
            if resp.status_code != 200:
                continue
            text = (resp.json().get("data") or {}).get("baton.yaml")
            if not text or text == self._last:
                continue
            self._last = text
            router = (yaml.safe_load(text) or {}).get("router") or {}
            for seen, value in ((self.weights, router.get("baton_weight")),
                                (self.shadows, router.get("shadow_percent", 0))):
                if not seen or seen[-1] != value:
                    seen.append(value)
            self._on_change(text)


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` in one step, as kubelet's symlink swap does for a mounted ConfigMap."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rollout_status(cluster: Cluster, name: str) -> dict[str, Any]:
    bd = cluster.get("bd", name) or {}
    return (bd.get("status") or {}).get("rollout") or {}


def wait_for_phase(cluster: Cluster, name: str, phase: str, timeout: float) -> dict[str, Any]:
    """Wait for ``status.rollout.phase``; on timeout, say where the rollout stood and why."""
    seen: dict[str, Any] = {}

    def check() -> dict[str, Any] | None:
        seen.update(rollout_status(cluster, name))
        return dict(seen) if seen.get("phase") == phase else None

    try:
        return wait_for(check, timeout, f"rollout phase {phase}")
    except AssertionError as exc:
        where = {k: seen.get(k) for k in ("phase", "weight", "failedAnalyses", "message", "history")}
        raise AssertionError(f"{exc}; the rollout stood at {dump(where)}") from None


def events_for(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    return [e for e in cluster.list("events") if e["involvedObject"].get("name") == name]


def wait_for_events(cluster: Cluster, name: str, reasons: set[str], timeout: float,
                    kind: str | None = None) -> list[str]:
    """Wait until the object's Events include ``reasons`` (of type ``kind``, if given): kopf posts Events
    in the background, so they can trail the change they report, and a stopped operator drops the rest."""
    def check() -> list[str] | None:
        got = [e["reason"] for e in events_for(cluster, name) if kind is None or e["type"] == kind]
        return got if reasons <= set(got) else None

    return wait_for(check, timeout, f"Events {sorted(reasons)} on {name}")


def batondeployment(name: str, incumbent_url: str, report_url: str, rollout: dict[str, Any],
                    **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "baton.dev/v1alpha1", "kind": "BatonDeployment",
            "metadata": {"name": name, "annotations": {ANN_REPORT_URLS: report_url}},
            "spec": {"mode": "standalone", "router": {"incumbentUrl": incumbent_url}, "rollout": rollout, **spec}}


def apply_object(cluster: Cluster, obj: dict[str, Any], tmp: Path) -> None:
    path = tmp / f"{obj['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(obj))
    cluster.apply(path)


# --- a scripted sidecar: /baton/ab/report and /baton/metrics from synthetic traffic ---------------

class StubSidecar:
    """Serves ``/baton/ab/report`` as a sidecar would under steady traffic of ``rate`` requests/s split by
    ``weight`` (set it as the sidecar would apply its config): Baton's e2e latency ~ N(baton_mean, 10%),
    the incumbent's ~ N(1 s, 10%), both streamed (TTFT known). While ``shadow_percent`` is on, that share
    of the incumbent's requests become pairs, and the report's ``paired`` block says ``paired_verdict``
    once there are ``PAIRS_TO_DECIDE`` of them (``insufficient`` before). Runs on its own event-loop
    thread."""

    PAIRS_TO_DECIDE = 10

    def __init__(self, baton_mean: float = 0.6, rate: float = 60.0, weight: float = 0.0) -> None:
        self.baton_mean, self.rate, self.weight = baton_mean, rate, weight
        self.shadow_percent = 0.0
        self.paired_verdict = "better"
        self.pairs = 0
        self.padding_ratio = 0.3  # the instantaneous gauge
        self.kv_padding_ratio: float | None = None  # set: export KV slot counters growing at this ratio
        self._kv_slots = self._kv_padding_slots = 0.0
        self.reports = 0
        self.queries: list[dict[str, str]] = []  # the query of every /baton/ab/report
        self._stats = ABStats()
        self._rng = np.random.default_rng(0)
        self._last = time.monotonic()
        self._carry = 0.0
        self._tokens = 0
        self._lock = threading.Lock()
        app = web.Application()
        # The sidecar's routes only: in sidecar mode the root paths are the incumbent's.
        app.router.add_get("/baton/ab/report", self._report)
        app.router.add_get("/baton/metrics", self._metrics)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="stub-sidecar", daemon=True)
        self._thread.start()
        self._runner = web.AppRunner(app, access_log=None)
        self._call(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._call(site.start())
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    def apply_config(self, text: str) -> None:
        router = (yaml.safe_load(text) or {}).get("router") or {}
        with self._lock:
            self._traffic()  # what arrived so far was split by the old config
            self.weight = float(router.get("baton_weight", 0))
            self.shadow_percent = float(router.get("shadow_percent", 0))

    def _traffic(self) -> None:
        now = time.monotonic()
        self._carry += (now - self._last) * self.rate
        self._last = now
        n, self._carry = int(self._carry), self._carry - int(self._carry)
        n_baton = int(self._rng.binomial(n, self.weight / 100.0)) if n else 0
        baton = np.clip(self._rng.normal(self.baton_mean, self.baton_mean * 0.1, n_baton), 0.01, None)
        incumbent = np.clip(self._rng.normal(1.0, 0.1, n - n_baton), 0.01, None)
        if self.shadow_percent > 0:
            self.pairs += int(self._rng.binomial(n - n_baton, self.shadow_percent / 100.0))
        for outcome in [*arm_outcomes("baton", baton), *arm_outcomes("incumbent", incumbent)]:
            self._stats.record(outcome)
        self._tokens += 8 * n_baton
        if self.kv_padding_ratio is not None:
            self._kv_slots += 100.0 * n_baton
            self._kv_padding_slots += 100.0 * n_baton * self.kv_padding_ratio

    async def _report(self, request: web.Request) -> web.Response:
        since = parse_since(request.query.get("since"))
        samples = parse_flag("samples", request.query.get("samples"))
        with self._lock:
            self._traffic()
            self.reports += 1
            self.queries.append(dict(request.query))
            body = self._stats.report(SLA, "interactive", since=since, samples=samples)
            verdict = self.paired_verdict if self.pairs >= self.PAIRS_TO_DECIDE else "insufficient"
            body["paired"] = paired_block(self.pairs, verdict, -0.4 if verdict in ("better", "not_worse") else 1.0)
            body["router"] = {"incumbent_url": "http://incumbent", "baton_weight": self.weight, "sticky_header": "",
                              "fallback_to_baton": False, "shadow_percent": self.shadow_percent}
        return web.json_response(body)

    async def _metrics(self, request: web.Request) -> web.Response:
        with self._lock:
            self._traffic()
            text = (f"baton_engine_padding_ratio {self.padding_ratio}\n"
                    f'baton_tokens_total{{arm="baton",kind="completion"}} {float(self._tokens)}\n')
            if self.kv_padding_ratio is not None:
                text += (f"baton_engine_kv_slots_total {self._kv_slots}\n"
                         f"baton_engine_kv_padding_slots_total {self._kv_padding_slots}\n")
        return web.Response(text=text)

    def close(self) -> None:
        self._call(self._runner.cleanup())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True, default=str)
