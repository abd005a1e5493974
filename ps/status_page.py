"""The live status page (``ps-server --http-port P``): one self-contained HTML page and ``/api/status``.

Read-only and unauthenticated (the gRPC token does not cover it): on a
non-loopback ``--host`` anyone who can reach the port sees the run's status. The
page loads nothing from elsewhere (no CDN): it polls ``/api/status`` every second
and draws its plots as inline SVG in plain JavaScript.
"""

from __future__ import annotations

import dataclasses

import json
import logging
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from paramhub.ps.metrics import ServerMetrics
from paramhub.ps.status import StatusView

log = logging.getLogger("paramhub.ps")


def _finite(value: float | None) -> float | None:
    """``value``, or None for NaN/inf: JSON has no NaN, and browsers refuse it."""
    return value if value is not None and math.isfinite(value) else None


def page_status(status: StatusView, metrics: ServerMetrics) -> dict:
    """The run as JSON-ready data, for ``/api/status``: the status view plus the metrics' rates and histories."""
    rates = metrics.rates()
    last_staleness = metrics.staleness_by_worker()
    losses, evaluations = metrics.history()
    workers = []
    for w in status.workers:
        push_rate, sample_rate = rates.get(w.worker_id, (0.0, 0.0))
        workers.append({
            "id": w.worker_id, "name": w.name, "shard": w.shard, "state": w.state,
            "last_base_version": w.last_base_version, "staleness": last_staleness.get(w.worker_id),
            "applied": w.applied, "accepted": w.accepted, "dropped": w.dropped,
            "seconds_since_seen": round(w.seconds_since_seen, 3),
            "pushes_per_second": push_rate, "samples_per_second": sample_rate, "last_loss": _finite(w.last_loss),
        })
    accuracy = {"version": [e["version"] for e in evaluations]}
    accuracy.update({key: [_finite(e.get(key)) for e in evaluations] for key in ("time", "top1", "top5", "loss")})
    return {
        "time": time.time(),
        "version": status.version,
        "done": status.done,
        "mode": status.mode,
        "update": status.update,
        "workers_expected": status.workers_expected,
        "staleness_bound": status.staleness_bound,  # None: unbounded async
        "pushes_per_second": sum(p for p, _ in rates.values()),
        "samples_per_second": sum(s for _, s in rates.values()),
        "pushes_applied": status.pushes_applied,
        "pushes_dropped": status.pushes_dropped,
        "pushes_rejected": status.pushes_rejected,
        "replication": {"role": status.role, "term": status.term, "standby": status.standby_state,
                        "replicated_version": status.replicated_version, "primary": status.primary,
                        "failovers": status.failovers},
        "last_loss": _finite(status.last_loss),
        "staleness_histogram": [[staleness, count] for staleness, count in sorted(status.staleness_histogram.items())],
        "workers": workers,
        "departed_workers": status.departed_workers,
        "workers_not_listed": status.not_listed,  # departures older than the --keep-departed remembered
        "membership": dataclasses.asdict(status.membership) if status.membership is not None else None,
        "leases": dataclasses.asdict(status.leases) if status.leases is not None else None,  # None: no data leases
        # columns, not rows: 2000 points poll every second
        "loss_history": {"version": [v for v, _, _ in losses], "time": [t for _, t, _ in losses],
                         "loss": [_finite(loss) for _, _, loss in losses]},
        "accuracy_history": accuracy,
    }


class _Handler(BaseHTTPRequestHandler):
    """GET ``/`` (the page) and ``/api/status`` (JSON); anything else is 404."""

    server_version = "paramhub-status"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/":
            self._send(PAGE.encode(), "text/html; charset=utf-8")
        elif path == "/api/status":
            self._send(json.dumps(self.server.status()).encode(), "application/json")
        else:
            self.send_error(404)

    def _send(self, body: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        log.debug("status page: " + format, *args)  # one line a second per open page: not for INFO


class _StatusHTTPServer(ThreadingHTTPServer):
    """The HTTP server of the page, holding the function that makes ``/api/status``."""

    def __init__(self, address: tuple[str, int], status: Callable[[], dict]):
        # IPv4 or IPv6, as the host says: read by the base class when it makes the socket
        self.address_family = socket.getaddrinfo(*address, type=socket.SOCK_STREAM)[0][0]
        self.status = status
        super().__init__(address, _Handler)


class StatusPage:
    """Serves the page and ``/api/status`` from a daemon thread.

    Args:
        status: returns the ``/api/status`` data (``page_status`` of the server's status view and metrics).
    """

    def __init__(self, status: Callable[[], dict]):
        self._status = status
        self._httpd: _StatusHTTPServer | None = None

    def serve(self, host: str, port: int) -> int:
        """Binds ``host:port`` (0 picks a free port) and serves; returns the port.

        Raises:
            OSError: the address cannot be bound.
        """
        self._httpd = _StatusHTTPServer((host, port), self._status)
        threading.Thread(target=self._httpd.serve_forever, name="ps-status-page", daemon=True).start()
        return self._httpd.server_address[1]

    def close(self) -> None:
        """Stops serving (safe to call twice)."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>paramhub status</title>
<style>
  :root { --ink: #1f2933; --muted: #6b7785; --line: #d9dee4; --accent: #2563eb; --good: #15803d; --bad: #b91c1c; }
  * { box-sizing: border-box; }
  body { margin: 0; padding: 20px 28px; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif;
         color: var(--ink); background: #f6f7f9; }
  header { display: flex; align-items: baseline; gap: 16px; margin-bottom: 14px; }
  h1 { font-size: 20px; margin: 0; }
  h2 { font-size: 15px; margin: 0 0 8px; }
  #connection { color: var(--muted); }
  #connection.down { color: var(--bad); font-weight: 600; }
  .cards { display: flex; flex-wrap: wrap; gap: 10px; margin-bottom: 16px; }
  .card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 8px 14px; min-width: 110px; }
  .card .label { color: var(--muted); font-size: 12px; }
  .card .value { font-size: 20px; font-weight: 600; font-variant-numeric: tabular-nums; }
  section.panel { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px;
                  margin-bottom: 16px; }
  table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
  th, td { text-align: right; padding: 4px 10px; border-bottom: 1px solid var(--line); white-space: nowrap; }
  th:first-child, td:first-child, th:nth-child(2), td:nth-child(2) { text-align: left; }
  th { color: var(--muted); font-weight: 500; font-size: 12px; }
  .alive { color: var(--good); font-weight: 600; }
  .lost { color: var(--bad); font-weight: 600; }
  .left { color: var(--muted); }
  .plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(380px, 1fr)); gap: 16px; }
  .plots section.panel { margin-bottom: 0; }
  svg { width: 100%; height: auto; display: block; }
  svg .axis { stroke: #9aa5b1; stroke-width: 1; }
  svg .grid { stroke: #eef0f3; stroke-width: 1; }
  svg text { fill: var(--muted); font-size: 11px; }
  svg .line { fill: none; stroke: var(--accent); stroke-width: 2; }
  svg .point { fill: var(--accent); }
  svg .bar { fill: var(--accent); opacity: 0.85; }
  svg .empty { font-size: 13px; }
  footer { color: var(--muted); font-size: 12px; margin-top: 16px; }
</style>
</head>
<body>
<header>
  <h1>paramhub</h1>
  <span id="run">connecting&hellip;</span>
  <span id="connection"></span>
</header>
<div class="cards">
  <div class="card"><div class="label">version</div><div class="value" id="version">&ndash;</div></div>
  <div class="card"><div class="label">pushes/s</div><div class="value" id="pushes-per-second">&ndash;</div></div>
  <div class="card"><div class="label">samples/s</div><div class="value" id="samples-per-second">&ndash;</div></div>
  <div class="card"><div class="label">applied</div><div class="value" id="applied">&ndash;</div></div>
  <div class="card"><div class="label">dropped</div><div class="value" id="dropped">&ndash;</div></div>
  <div class="card"><div class="label">rejected</div><div class="value" id="rejected">&ndash;</div></div>
  <div class="card"><div class="label">last loss</div><div class="value" id="last-loss">&ndash;</div></div>
  <div class="card"><div class="label">top-1</div><div class="value" id="top1">&ndash;</div></div>
</div>
<section class="panel">
  <h2>Workers</h2>
  <table id="workers">
    <thead><tr><th>name</th><th>state</th><th>last base version</th><th>staleness</th><th>applied</th>
      <th>dropped</th><th>pushes/s</th><th>last loss</th><th>seen</th></tr></thead>
    <tbody></tbody>
  </table>
  <p id="not-listed"></p>
  <p id="membership"></p>
</section>
<section class="panel" id="leases-panel" hidden>
  <h2>Data leases</h2>
  <table id="leases">
    <thead><tr><th>epoch</th><th>done</th><th>in pushes</th><th>leased</th><th>pending</th></tr></thead>
    <tbody></tbody>
  </table>
  <p id="leases-summary"></p>
</section>
<div class="plots">
  <section class="panel"><h2>Training loss vs version</h2><svg id="loss-plot" viewBox="0 0 480 240"></svg></section>
  <section class="panel"><h2>Top-1 accuracy vs version</h2>
    <svg id="accuracy-plot" viewBox="0 0 480 240"></svg></section>
  <section class="panel"><h2>Staleness of applied pushes</h2>
    <svg id="staleness-plot" viewBox="0 0 480 240"></svg></section>
</div>
<footer>Read-only view of this server; refreshed every second from <a href="/api/status">/api/status</a>.</footer>
<script>
"use strict";
const NS = "http://www.w3.org/2000/svg";
const W = 480, H = 240, LEFT = 52, RIGHT = 14, TOP = 12, BOTTOM = 34;

function svgEl(parent, name, attrs, text) {
  const node = document.createElementNS(NS, name);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  parent.appendChild(node);
  return node;
}

function num(value, digits) {
  return value === null || value === undefined ? "\\u2013" : Number(value).toFixed(digits);
}

function label(value) {  // short tick labels: 1234.5 -> 1235, 0.123456 -> 0.123, 0.750 -> 0.75
  return Math.abs(value) >= 100 ? String(Math.round(value)) : String(Number(value.toPrecision(3)));
}

function clear(svg, count) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  svg.setAttribute("data-points", count);
}

function empty(svg, message) {
  svgEl(svg, "text", {x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty"}, message);
}

// A line plot of (x, y) points with its axes; y limits fixed when given, else from the data.
function linePlot(svg, xs, ys, yMin, yMax, xName, emptyMessage) {
  const points = xs.map((x, i) => [x, ys[i]]).filter(p => p[1] !== null && Number.isFinite(p[1]));
  clear(svg, points.length);
  if (!points.length) return empty(svg, emptyMessage);
  let x0 = Math.min(...points.map(p => p[0])), x1 = Math.max(...points.map(p => p[0]));
  let y0 = yMin ?? Math.min(...points.map(p => p[1])), y1 = yMax ?? Math.max(...points.map(p => p[1]));
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { const pad = Math.abs(y0) * 0.1 || 1; y0 -= pad; y1 += pad; }
  const sx = x => LEFT + (x - x0) / (x1 - x0) * (W - LEFT - RIGHT);
  const sy = y => H - BOTTOM - (y - y0) / (y1 - y0) * (H - TOP - BOTTOM);
  for (let i = 0; i <= 4; i++) {
    const y = y0 + (y1 - y0) * i / 4;
    svgEl(svg, "line", {x1: LEFT, x2: W - RIGHT, y1: sy(y), y2: sy(y), class: "grid"});
    svgEl(svg, "text", {x: LEFT - 6, y: sy(y) + 4, "text-anchor": "end"}, label(y));
  }
  svgEl(svg, "line", {x1: LEFT, x2: W - RIGHT, y1: H - BOTTOM, y2: H - BOTTOM, class: "axis"});
  svgEl(svg, "line", {x1: LEFT, x2: LEFT, y1: TOP, y2: H - BOTTOM, class: "axis"});
  for (const x of new Set([x0, Math.round((x0 + x1) / 2), x1])) {  // versions are whole numbers
    svgEl(svg, "text", {x: sx(x), y: H - BOTTOM + 15, "text-anchor": "middle"}, label(x));
  }
  svgEl(svg, "text", {x: (LEFT + W - RIGHT) / 2, y: H - 4, "text-anchor": "middle"}, xName);
  svgEl(svg, "polyline", {class: "line", "data-points": points.length,
                          points: points.map(p => sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1)).join(" ")});
  if (points.length <= 200) {  // dots only while they stay apart
    for (const p of points) svgEl(svg, "circle", {class: "point", cx: sx(p[0]), cy: sy(p[1]), r: 3});
  }
}

// One bar per staleness from 0 to the bound (or the largest seen, if larger), labelled with its count.
function barPlot(svg, histogram, bound) {
  const counts = new Map(histogram);
  if (!histogram.length) {
    clear(svg, 0);
    svg.setAttribute("data-bars", 0);
    return empty(svg, "no update applied yet");
  }
  const largest = Math.max(bound ?? 0, ...histogram.map(h => h[0]));
  clear(svg, histogram.length);
  svg.setAttribute("data-bars", largest + 1);
  const top = Math.max(...histogram.map(h => h[1]));
  const slot = (W - LEFT - RIGHT) / (largest + 1);
  const width = Math.min(slot * 0.7, 48);
  svgEl(svg, "line", {x1: LEFT, x2: W - RIGHT, y1: H - BOTTOM, y2: H - BOTTOM, class: "axis"});
  for (let s = 0; s <= largest; s++) {
    const count = counts.get(s) || 0;
    const height = count / top * (H - TOP - BOTTOM - 14);
    const middle = LEFT + (s + 0.5) * slot;
    svgEl(svg, "rect", {class: "bar", x: middle - width / 2, width: width, y: H - BOTTOM - height, height: height,
                        "data-staleness": s, "data-count": count});
    if (count) svgEl(svg, "text", {x: middle, y: H - BOTTOM - height - 4, "text-anchor": "middle"}, count);
    svgEl(svg, "text", {x: middle, y: H - BOTTOM + 15, "text-anchor": "middle"}, s);
  }
  svgEl(svg, "text", {x: (LEFT + W - RIGHT) / 2, y: H - 4, "text-anchor": "middle"}, "staleness (versions)");
}

function workersTable(workers) {
  const body = document.querySelector("#workers tbody");
  body.replaceChildren();
  for (const w of workers) {
    const row = document.createElement("tr");
    row.setAttribute("data-worker", w.name);
    const cells = [w.name, w.state, w.last_base_version, w.staleness ?? "\\u2013", w.applied, w.dropped,
                   num(w.pushes_per_second, 2), num(w.last_loss, 4), num(w.seconds_since_seen, 1) + " s"];
    cells.forEach((value, i) => {
      const cell = document.createElement("td");
      cell.textContent = value;
      if (i === 1) cell.className = w.state;
      row.appendChild(cell);
    });
    body.appendChild(row);
  }
}

function leasesTable(leases) {
  document.getElementById("leases-panel").hidden = leases === null;
  if (leases === null) return;
  const body = document.querySelector("#leases tbody");
  body.replaceChildren();
  for (const e of leases.epochs) {
    const row = document.createElement("tr");
    for (const value of [e.epoch, e.done, e.in_pushes, e.leased, e.pending]) {
      const cell = document.createElement("td");
      cell.textContent = value;
      row.appendChild(cell);
    }
    body.appendChild(row);
  }
  document.getElementById("leases-summary").textContent =
    `${leases.completed} epoch${leases.completed === 1 ? "" : "s"} complete; ` +
    `${leases.reassigned} leased sample${leases.reassigned === 1 ? "" : "s"} given back by departures`;
}

function render(s) {
  const bound = s.staleness_bound === null ? "unbounded" : s.staleness_bound;
  document.getElementById("run").textContent =
    `${s.mode}/${s.update} \\u00b7 ${s.workers_expected} worker${s.workers_expected === 1 ? "" : "s"}` +
    ` \\u00b7 staleness bound ${bound}` +
    ` \\u00b7 ${s.replication.role} (term ${s.replication.term}, standby ${s.replication.standby})` +
    (s.done ? " \\u00b7 DONE" : "");
  document.getElementById("version").textContent = s.version;
  document.getElementById("pushes-per-second").textContent = num(s.pushes_per_second, 2);
  document.getElementById("samples-per-second").textContent = num(s.samples_per_second, 1);
  document.getElementById("applied").textContent = s.pushes_applied;
  document.getElementById("dropped").textContent = s.pushes_dropped;
  document.getElementById("rejected").textContent = s.pushes_rejected;
  document.getElementById("last-loss").textContent = num(s.last_loss, 4);
  const top1 = s.accuracy_history.top1;
  document.getElementById("top1").textContent = top1.length ? num(top1[top1.length - 1], 3) : "\\u2013";
  workersTable(s.workers);
  document.getElementById("not-listed").textContent = s.workers_not_listed
    ? `${s.workers_not_listed} older departed worker${s.workers_not_listed === 1 ? "" : "s"} not listed` : "";
  const m = s.membership;
  document.getElementById("membership").textContent = m
    ? `a round waits for ${m.round_members}; at least ${m.min_workers} to start, at most ` +
      `${m.max_workers === null ? "any number" : m.max_workers} at once; ${m.joins} joins, ${m.departures} departures`
    : "";
  leasesTable(s.leases);
  linePlot(document.getElementById("loss-plot"), s.loss_history.version, s.loss_history.loss, null, null,
           "version", "no update applied yet");
  linePlot(document.getElementById("accuracy-plot"), s.accuracy_history.version, top1, 0, 1,
           "version", "no evaluation yet (ps-server --eval-data DIR --eval-every V)");
  barPlot(document.getElementById("staleness-plot"), s.staleness_histogram, s.staleness_bound);
}

async function poll() {
  const connection = document.getElementById("connection");
  try {
    const reply = await fetch("/api/status", {cache: "no-store"});
    render(await reply.json());
    connection.textContent = "updated " + new Date().toLocaleTimeString();
    connection.className = "";
  } catch (err) {
    connection.textContent = "server unreachable";
    connection.className = "down";
  }
  setTimeout(poll, 1000);  // after the reply, so slow replies never pile up
}
poll();
</script>
</body>
</html>
"""
