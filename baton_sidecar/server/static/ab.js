/* The A/B page: fetches the report every few seconds and draws it (docs/server.md, "The A/B page").

   The report's URL is relative ("ab/report" beside "ab"), so the page works behind any path prefix.
   Each refresh fetches it twice: plain (percentiles with CIs, verdicts) and with samples=true (the raw
   latencies for the CDFs, the paired histograms); both must agree on the cursor.
   Everything from the report reaches the DOM as textContent or as a computed number in an SVG
   attribute, never as markup. Every number shown sits in a span with data-key (its path in the plain
   report) and data-value (the report's value, as JSON), so the page can be checked against the report.
   ?refresh=N: seconds between refreshes (default 5, at most 3600; 0: load once). */
"use strict";
(() => {
  const REPORT = "ab/report";
  const ARMS = ["baton", "incumbent"];
  const QUANTILES = ["p50", "p95", "p99"];
  const METRICS = [["ttft_s", "Time to first token", "TTFT"], ["e2e_s", "End-to-end latency", "e2e"]];
  const PAIRED = [["e2e", "End-to-end"], ["ttft", "Time to first token"], ["tpot", "Per output token"]];
  const SVG_NS = "http://www.w3.org/2000/svg";
  const W = 440, H = 220, PAD = {left: 54, right: 12, top: 10, bottom: 36};  // chart viewBox, px
  const refreshS = refreshSeconds(new URLSearchParams(location.search).get("refresh"));
  let renders = 0;

  function refreshSeconds(text) {  // 0, or 1 s to an hour: setTimeout wraps delays past 2^31 ms to ~0
    const n = text === null ? 5 : Number(text);
    return Number.isFinite(n) && n >= 0 ? (n === 0 ? 0 : Math.min(Math.max(n, 1), 3600)) : 5;
  }

  // -- DOM helpers: text only ------------------------------------------------------------------------

  function el(tag, cls, ...children) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    for (const c of children) e.append(c);  // strings become text nodes
    return e;
  }

  function svgEl(tag, attrs, text) {
    const e = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    if (text !== undefined) e.textContent = String(text);
    return e;
  }

  function lookup(obj, path) {
    return path.split(".").reduce((o, k) => (o === null || o === undefined ? undefined : o[k]), obj);
  }

  const fmt = {
    ms: (s) => (s * 1000).toFixed(1) + " ms",
    diffMs: (s) => (s > 0 ? "+" : "") + (s * 1000).toFixed(1) + " ms",
    pct: (x) => (x * 100).toFixed(1) + "%",
    int: (n) => String(n),
    fixed2: (x) => x.toFixed(2),
    p: (x) => x.toPrecision(2),
    text: (s) => String(s),
  };

  // One value of the report at ``path``, formatted; "–" when absent or null.
  function value(report, path, format, cls) {
    const v = lookup(report, path);
    const missing = v === null || v === undefined;
    const span = el("span", cls || "v", missing ? "–" : format(v));
    span.dataset.key = path;
    span.dataset.value = JSON.stringify(missing ? null : v);
    return span;
  }

  function ci(report, path, format) {  // "[low, high]" of a two-element ci95 list
    if (!Array.isArray(lookup(report, path))) return el("span", "empty", "");
    return el("span", "ci", "[", value(report, path + ".0", format), ", ",
              value(report, path + ".1", format), "]");
  }

  function table(head, rows, numeric) {  // numeric: indices of right-aligned columns
    const t = el("table");
    t.append(el("tr", "", ...head.map((h, i) => el("th", numeric.includes(i) ? "num" : "", h))));
    for (const row of rows) t.append(el("tr", "", ...row.map((c, i) => el("td", numeric.includes(i) ? "num" : "", c))));
    return t;
  }

  // -- charts ----------------------------------------------------------------------------------------

  function niceTicks(lo, hi, count) {
    const raw = (hi - lo) / count;
    if (!(raw > 0)) return [lo];
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
    const ticks = [];
    for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(t);
    return ticks;
  }

  function msTick(t) { return String(Math.round(t * 1e6) / 1e3); }  // seconds -> ms, no float noise

  // An empty chart over [x0, x1] x [y0, y1] with its axes; returns the svg and the two scales.
  function chart(label, [x0, x1], [y0, y1], xTicks, yTicks, xLabel, yLabel) {
    const svg = svgEl("svg", {viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": label});
    const sx = (v) => PAD.left + (v - x0) / (x1 - x0 || 1) * (W - PAD.left - PAD.right);
    const sy = (v) => H - PAD.bottom - (v - y0) / (y1 - y0 || 1) * (H - PAD.top - PAD.bottom);
    for (const [v, text] of yTicks) {
      svg.append(svgEl("line", {class: "grid", x1: PAD.left, x2: W - PAD.right, y1: sy(v), y2: sy(v)}));
      svg.append(svgEl("text", {x: PAD.left - 5, y: sy(v) + 4, "text-anchor": "end"}, text));
    }
    for (const [v, text] of xTicks) {
      svg.append(svgEl("line", {class: "axis", x1: sx(v), x2: sx(v), y1: H - PAD.bottom, y2: H - PAD.bottom + 4}));
      svg.append(svgEl("text", {x: sx(v), y: H - PAD.bottom + 15, "text-anchor": "middle"}, text));
    }
    svg.append(svgEl("line", {class: "axis", x1: PAD.left, x2: W - PAD.right, y1: H - PAD.bottom, y2: H - PAD.bottom}));
    svg.append(svgEl("line", {class: "axis", x1: PAD.left, x2: PAD.left, y1: PAD.top, y2: H - PAD.bottom}));
    svg.append(svgEl("text", {x: (PAD.left + W - PAD.right) / 2, y: H - 4, "text-anchor": "middle"}, xLabel));
    svg.append(svgEl("text", {x: 12, y: (PAD.top + H - PAD.bottom) / 2, "text-anchor": "middle",
                              transform: `rotate(-90 12 ${(PAD.top + H - PAD.bottom) / 2})`}, yLabel));
    return {svg, sx, sy};
  }

  function figure(caption, content) { return el("figure", "", el("figcaption", "", caption), content); }

  // Empirical CDFs of each arm's samples (seconds), as step paths.
  function cdfChart(metric, title, raw) {
    const samples = Object.fromEntries(ARMS.map((a) => [a, (lookup(raw, `arms.${a}.samples.${metric}`) || [])
      .slice().sort((p, q) => p - q)]));
    const top = Math.max(0, ...ARMS.map((a) => samples[a][samples[a].length - 1] || 0));
    if (top === 0) return figure(`${title}: CDF`, el("p", "empty", "No samples yet."));
    const hi = top * 1.03;
    const xt = niceTicks(0, hi, 5).map((t) => [t, msTick(t)]);
    const yt = [0, 0.25, 0.5, 0.75, 1].map((t) => [t, String(t)]);
    const {svg, sx, sy} = chart(`${title} CDF`, [0, hi], [0, 1], xt, yt, "ms", "share of requests");
    for (const arm of ARMS) {
      const xs = samples[arm];
      if (!xs.length) continue;
      let d = `M${sx(xs[0]).toFixed(2)},${sy(0).toFixed(2)}`;
      xs.forEach((v, i) => {
        d += `H${sx(v).toFixed(2)}V${sy((i + 1) / xs.length).toFixed(2)}`;
      });
      svg.append(svgEl("path", {class: `cdf arm-${arm}`, d, "data-arm": arm, "data-metric": metric,
                                "data-n": xs.length}));
    }
    return figure(`${title}: CDF`, svg);
  }

  // p50/p95/p99 per arm as points, each with its 95% CI as an error bar.
  function quantileChart(metric, title, report) {
    const entries = ARMS.map((a) => [a, lookup(report, `arms.${a}.${metric}`) || {n: 0}]);
    const highs = entries.flatMap(([, e]) => QUANTILES.map((q) => e[q] ? (e[q].ci95 || [0, e[q].value])[1] : 0));
    const top = Math.max(0, ...highs);
    if (top === 0) return figure(`${title}: percentiles`, el("p", "empty", "No samples yet."));
    const hi = top * 1.05;
    const xt = QUANTILES.map((q, i) => [i + 0.5, q]);
    const yt = niceTicks(0, hi, 5).map((t) => [t, msTick(t)]);
    const {svg, sx, sy} = chart(`${title} percentiles`, [0, 3], [0, hi], xt, yt, "percentile (95% CI)", "ms");
    entries.forEach(([arm, e], k) => {
      QUANTILES.forEach((q, i) => {
        if (!e[q]) return;
        const x = sx(i + 0.5 + (k - 0.5) * 0.3);
        const g = svgEl("g", {class: `arm-${arm}`, "data-arm": arm, "data-metric": metric, "data-q": q});
        if (e[q].ci95) {
          const [lo, up] = e[q].ci95;
          g.append(svgEl("line", {class: "ci", x1: x, x2: x, y1: sy(lo), y2: sy(up)}));
          for (const y of [lo, up]) g.append(svgEl("line", {class: "ci", x1: x - 5, x2: x + 5, y1: sy(y), y2: sy(y)}));
        }
        g.append(svgEl("circle", {cx: x, cy: sy(e[q].value), r: 4}));
        svg.append(g);
      });
    });
    return figure(`${title}: percentiles`, svg);
  }

  // A histogram of paired differences (Baton minus incumbent, seconds); bars left of 0: Baton faster.
  function histogramChart(metric, title, hist) {
    const {edges_s: edges, counts} = hist;
    const lo = Math.min(0, edges[0]), up = Math.max(0, edges[edges.length - 1]);
    const pad = (up - lo) * 0.03 || 0.001;
    const yMax = Math.max(...counts);
    const xt = niceTicks(lo - pad, up + pad, 6).map((t) => [t, msTick(t)]);
    const yt = niceTicks(0, yMax, 4).filter((t) => Number.isInteger(t)).map((t) => [t, String(t)]);
    const {svg, sx, sy} = chart(`${title} paired differences`, [lo - pad, up + pad], [0, yMax], xt, yt,
                                "Baton − incumbent, ms (left of 0: Baton faster)", "pairs");
    counts.forEach((c, i) => {
      const x0 = sx(edges[i]), x1 = sx(edges[i + 1]);
      const width = Math.max(x1 - x0 - 1, 3);
      svg.append(svgEl("rect", {class: "bar" + (edges[i + 1] <= 0 ? " faster" : ""), x: (x0 + x1 - width) / 2,
                                y: sy(c), width, height: sy(0) - sy(c), "data-metric": metric, "data-count": c}));
    });
    svg.append(svgEl("line", {class: "zero", x1: sx(0), x2: sx(0), y1: PAD.top, y2: H - PAD.bottom}));
    return figure(`${title}: paired differences`, svg);
  }

  // -- sections ----------------------------------------------------------------------------------------

  function verdictSection(r) {
    const rows = METRICS.map(([m, , short]) => [
      short, value(r, `verdicts.${m}.result`, fmt.text, `v ${lookup(r, `verdicts.${m}.result`)}`),
      value(r, `verdicts.${m}.difference_s`, fmt.diffMs), ci(r, `verdicts.${m}.ci95`, fmt.diffMs),
      el("span", "", value(r, `verdicts.${m}.n.baton`, fmt.int), " / ", value(r, `verdicts.${m}.n.incumbent`, fmt.int)),
      value(r, `verdicts.${m}.reason`, fmt.text)]);
    return [el("p", "", value(r, "verdict", fmt.text, `big ${r.verdict}`), "overall, on p95 latency"),
            el("p", "basis", value(r, "verdict_basis", fmt.text)),
            table(["Metric", "Result", "p95 Baton − incumbent", "95% CI", "Samples (Baton / incumbent)", "Why not decided"],
                  rows, [2, 3, 4]),
            el("p", "basis", value(r, "verdicts.e2e_s.basis", fmt.text))];
  }

  function latencySection(r, raw) {
    const charts = el("div", "charts pairs");
    for (const [m, title] of METRICS) charts.append(cdfChart(m, title, raw), quantileChart(m, title, r));
    const rows = [];
    for (const [m, , short] of METRICS) {
      for (const arm of ARMS) {
        const base = `arms.${arm}.${m}`;
        rows.push([short, el("span", `key arm-${arm}`, arm), value(r, `${base}.n`, fmt.int), value(r, `${base}.mean`, fmt.ms),
                   ...QUANTILES.map((q) => el("span", "", value(r, `${base}.${q}.value`, fmt.ms), " ",
                                                  ci(r, `${base}.${q}.ci95`, fmt.ms)))]);
      }
    }
    return [charts, table(["Metric", "Arm", "Samples", "Mean", "p50 [95% CI]", "p95 [95% CI]", "p99 [95% CI]"],
                          rows, [2, 3, 4, 5, 6])];
  }

  function shareBar(eligible, ineligible) {
    const total = eligible + ineligible;
    const svg = svgEl("svg", {class: "sharebar", viewBox: "0 0 400 14", preserveAspectRatio: "none", role: "img",
                              "aria-label": "eligible and ineligible shares"});
    const w = total ? 400 * eligible / total : 0;
    svg.append(svgEl("rect", {x: 0, y: 0, width: w, height: 14, class: "eligible"}));
    svg.append(svgEl("rect", {x: w, y: 0, width: 400 - w, height: 14, class: "ineligible"}));
    return svg;
  }

  function trafficSection(r) {
    const out = [shareBar(lookup(r, "eligible.count") || 0, lookup(r, "ineligible.count") || 0),
      el("p", "", "Eligible (split between the arms): ", value(r, "eligible.count", fmt.int), " requests, ",
         value(r, "eligible.share", fmt.pct), ". Ineligible (always the incumbent): ",
         value(r, "ineligible.count", fmt.int), ", ", value(r, "ineligible.share", fmt.pct), ".")];
    const reasons = lookup(r, "ineligible.top_reasons") || [];
    if (reasons.length) {
      out.push(table(["Ineligible because", "Requests", "Share"], reasons.map((_, i) => [
        value(r, `ineligible.top_reasons.${i}.reason`, fmt.text), value(r, `ineligible.top_reasons.${i}.count`, fmt.int),
        value(r, `ineligible.top_reasons.${i}.share`, fmt.pct)]), [1, 2]));
    }
    out.push(table(["Arm", "Requests", "Errors", "Error rate", "In window"], ARMS.map((arm) => [
      el("span", `key arm-${arm}`, arm), value(r, `arms.${arm}.count`, fmt.int), value(r, `arms.${arm}.errors`, fmt.int),
      value(r, `arms.${arm}.error_rate`, fmt.pct), value(r, `arms.${arm}.window_count`, fmt.int)]), [1, 2, 3, 4]));
    out.push(el("p", "basis", "Served by Baton after the incumbent failed: ", value(r, "fallbacks_to_baton", fmt.int), "."));
    return out;
  }

  function slaSection(r) {
    return [table(["Arm", "Met", "Judged", "Attainment"], ARMS.map((arm) => [
              el("span", `key arm-${arm}`, arm), value(r, `arms.${arm}.sla.met`, fmt.int),
              value(r, `arms.${arm}.sla.evaluated`, fmt.int), value(r, `arms.${arm}.sla.attainment`, fmt.pct)]), [1, 2, 3]),
            el("p", "basis", "A request meets its SLA class's targets (TTFT, per-token and e2e latency); requests " +
               "naming no class are judged against ", value(r, "arms.baton.sla.default_class", fmt.text), ".")];
  }

  function shadowSection(r, raw) {
    if (!lookup(r, "paired.pairs") && !lookup(r, "router.shadow_percent")) {
      return [el("p", "empty", "Shadow mode is off (router.shadow_percent is 0) and no pairs were recorded.")];
    }
    const skipped = Object.keys(lookup(r, "paired.skipped") || {}).sort();
    const out = [
      el("p", "", value(r, "paired.verdict", fmt.text, `big ${lookup(r, "paired.verdict")}`), "on e2e, within a ",
         value(r, "paired.margin_pct", fmt.text), "% margin"),
      el("p", "basis", value(r, "paired.basis", fmt.text)),
      el("p", "", value(r, "paired.pairs", fmt.int), " pairs of ", value(r, "paired.shadowed", fmt.int),
         " requests copied to Baton", ...(skipped.length ? ["; not copied: ", ...skipped.flatMap((k, i) =>
           [i ? ", " : "", k + " ", value(r, `paired.skipped.${k}`, fmt.int)])] : []), "."),
      el("p", "", "Output agreement (greedy pairs): ", value(r, "paired.agreement.identical_share", fmt.pct),
         " identical of ", value(r, "paired.agreement.greedy_pairs", fmt.int), "; mean word edit distance ",
         value(r, "paired.agreement.mean_edit_distance", fmt.fixed2), ".")];
    const charts = el("div", "charts");
    for (const [m, title] of PAIRED) {
      const hist = lookup(raw, `paired.metrics.${m}.histogram`);
      if (hist && hist.counts.length) charts.append(histogramChart(m, title, hist));
    }
    out.push(charts);
    out.push(table(["Metric", "Pairs", "Median", "95% CI", "p95", "95% CI", "Baton faster", "Sign test p"],
      PAIRED.map(([m, title]) => {
        const base = `paired.metrics.${m}`;
        return [title, value(r, `${base}.n`, fmt.int), value(r, `${base}.median_diff_s`, fmt.diffMs),
                ci(r, `${base}.median_ci95`, fmt.diffMs), value(r, `${base}.p95_diff_s`, fmt.diffMs),
                ci(r, `${base}.p95_ci95`, fmt.diffMs), value(r, `${base}.baton_faster_share`, fmt.pct),
                value(r, `${base}.p_value`, fmt.p)];
      }), [1, 2, 3, 4, 5, 6, 7]));
    out.push(el("p", "basis", "Differences are Baton minus incumbent on the same request. Both arms share the pod: " +
      "mean requests in flight when a pair started, incumbent ", value(r, "paired.contention.mean_incumbent_in_flight", fmt.fixed2),
      ", Baton ", value(r, "paired.contention.mean_baton_in_flight", fmt.fixed2), "."));
    return out;
  }

  function routerSection(r) {
    return [el("p", "", "Baton weight: ", el("span", "big", value(r, "router.baton_weight", fmt.int), "%"),
               "of the eligible requests"),
            table(["Setting", "Value"], ["incumbent_url", "baton_weight", "shadow_percent", "sticky_header", "fallback_to_baton"]
              .map((k) => [k, value(r, `router.${k}`, fmt.text)]), [])];
  }

  // -- refresh -----------------------------------------------------------------------------------------

  async function fetchJSON(url) {  // a hung request must not stop the refreshing: give up after 30 s
    const response = await fetch(url, {cache: "no-store", headers: {Accept: "application/json"},
                                       signal: AbortSignal.timeout(30000)});
    if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
    return response.json();
  }

  async function load() {  // both reports of the same moment (three tries while traffic moves them)
    for (let attempt = 1; ; attempt++) {
      const [plain, raw] = await Promise.all([fetchJSON(REPORT), fetchJSON(REPORT + "?samples=true")]);
      const same = plain.instance === raw.instance && plain.cursor === raw.cursor &&
        lookup(plain, "paired.pairs") === lookup(raw, "paired.pairs");
      if (same || attempt === 3) return [plain, raw];
    }
  }

  function render(r, raw) {
    const sections = {verdict: verdictSection(r), latency: latencySection(r, raw), traffic: trafficSection(r),
                      sla: slaSection(r), shadow: shadowSection(r, raw), router: routerSection(r)};
    for (const [id, children] of Object.entries(sections)) {
      document.querySelector(`#${id} .body`).replaceChildren(...children);
    }
    const status = document.getElementById("status");
    status.className = "";
    status.replaceChildren(`Updated ${new Date().toLocaleTimeString()} · cursor `, value(r, "cursor", fmt.int),
      " · last ", value(r, "window", fmt.int), " outcomes per arm · ",
      refreshS ? `refreshing every ${refreshS} s` : "not refreshing");
    renders += 1;
    Object.assign(document.body.dataset, {state: "ready", cursor: r.cursor, pairs: lookup(r, "paired.pairs"), renders});
  }

  async function refresh() {
    try {
      const [plain, raw] = await load();
      render(plain, raw);
    } catch (err) {
      const status = document.getElementById("status");
      status.className = "error";
      status.textContent = `Report unavailable (${err.message})` + (refreshS ? `; retrying in ${refreshS} s` : "");
      document.body.dataset.state = "error";
    }
    if (refreshS) setTimeout(refresh, refreshS * 1000);
  }

  refresh();
})();
