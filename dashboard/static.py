"""The pages' stylesheet and script, served from our own routes (``/static/…``).

Kept as strings in a module, not files, so packaging needs nothing extra and the dashboard
works with no network at all (clinic sites and the central office may be air-gapped). They
are separate responses — not inline — so the Content-Security-Policy can forbid every inline
script and style (``default-src 'self'``): an injected ``<script>`` would not run even if
escaping ever failed.

The script only *refreshes* what the server already rendered: every ``tbody`` with
``data-feed``/``data-devices`` is rebuilt every few seconds from ``/api/results`` or
``/api/devices`` using ``textContent`` (never ``innerHTML``), with the same columns as
``dashboard/pages.py``.
"""

from __future__ import annotations

CSS = """
:root { --ok: #1b7f3b; --bad: #b42318; --warn: #b54708; --muted: #667085; --line: #d0d5dd;
        --bg: #f9fafb; --ink: #101828; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--ink); background: var(--bg); }
header { display: flex; gap: 1.5rem; align-items: center; padding: .6rem 1.2rem;
         background: #0b3b5b; color: #fff; }
header a { color: #fff; text-decoration: none; margin-right: 1rem; }
header a.active { text-decoration: underline; }
header form { margin-left: auto; }
header button { background: transparent; color: #fff; border: 1px solid #fff; border-radius: 4px;
                padding: .15rem .6rem; cursor: pointer; }
main { padding: 1rem 1.2rem 3rem; max-width: 1400px; }
footer { padding: .6rem 1.2rem; color: var(--muted); border-top: 1px solid var(--line); }
h1 { font-size: 1.35rem; margin: .3rem 0 1rem; }
h2 { font-size: 1.1rem; margin: 1.4rem 0 .5rem; }
table { border-collapse: collapse; width: 100%; background: #fff; }
th, td { text-align: left; padding: .35rem .55rem; border-bottom: 1px solid var(--line);
         vertical-align: top; }
tr.site th { background: #eef4f8; font-size: 1rem; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
/* Times, clinic and device ids are read whole: never broken at their hyphens. */
tbody[data-feed] td:nth-child(-n+3), tbody[data-devices] td:nth-child(-n+3),
td.nowrap, th.nowrap { white-space: nowrap; }
.online { color: var(--ok); font-weight: 600; }
.offline { color: var(--bad); font-weight: 600; }
.unknown, .muted { color: var(--muted); }
.stale { color: var(--warn); }
.alarm { background: #fee4e2; color: var(--bad); font-weight: 600; }
.refer { color: var(--bad); font-weight: 600; }
.banner { padding: .5rem 1.2rem; background: #fffaeb; color: #7a2e0e;
          border-bottom: 1px solid #fedf89; }
.aid { padding: .6rem .9rem; border: 2px solid var(--warn); border-radius: 6px;
       background: #fffaeb; font-weight: 600; margin: .5rem 0 1rem; }
.grid { display: grid; grid-template-columns: minmax(280px, 520px) 1fr; gap: 1.5rem; }
.overlay img { max-width: 100%; height: auto; border: 1px solid var(--line); }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem; margin: 0; }
dt { color: var(--muted); }
dd { margin: 0; }
meter { width: 10rem; }
svg text { font-size: 11px; fill: var(--ink); }
.band-osteoporosis { fill: #fda29b; }
.band-osteopenia { fill: #fec84b; }
.band-normal { fill: #a6f4c5; }
.marker { stroke: var(--ink); stroke-width: 3; }
.axis { stroke: var(--muted); stroke-width: 1; }
.pos { fill: #d92d20; }
.neg { fill: #1570ef; }
form.login { max-width: 22rem; display: grid; gap: .6rem; background: #fff; padding: 1.2rem;
             border: 1px solid var(--line); border-radius: 6px; }
form.login input { padding: .4rem; font: inherit; }
.error { color: var(--bad); }
.live { color: var(--muted); font-size: .85rem; }
form.filters { display: flex; flex-wrap: wrap; gap: .5rem 1rem; align-items: end;
               margin: 0 0 .6rem; padding: .6rem .8rem; background: #fff;
               border: 1px solid var(--line); border-radius: 6px; }
form.filters label { display: flex; flex-direction: column; font-size: .8rem;
                     color: var(--muted); gap: .15rem; }
form.filters input, form.filters select { font: inherit; color: var(--ink); padding: .2rem .3rem;
                                          border: 1px solid var(--line); border-radius: 4px; }
form.filters input[type=number] { width: 5rem; }
form.filters button { font: inherit; padding: .25rem .9rem; border-radius: 4px; cursor: pointer;
                      background: #0b3b5b; color: #fff; border: 1px solid #0b3b5b; }
form.filters a { align-self: center; }
form.filters a.csv { margin-left: auto; }
pre, code { font: .9rem/1.4 ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; }
pre { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: .6rem .9rem; }
tr.total th, tr.total td { border-top: 2px solid var(--ink); font-weight: 600; }
td.rate { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
td.rate small { display: block; color: var(--muted); font-size: .8rem; }
td.small-n { color: var(--muted); }
.tag { display: inline-block; font-size: .72rem; padding: 0 .35rem; border-radius: 3px;
       background: #f2f4f7; color: var(--warn); border: 1px solid #fedf89; font-weight: 600; }
svg.chart { background: #fff; border: 1px solid var(--line); border-radius: 6px; }
.grid-line { stroke: var(--line); stroke-width: 1; }
line.sensitivity { stroke: #d92d20; stroke-width: 2; }
line.specificity { stroke: #1570ef; stroke-width: 2; }
circle.sensitivity { fill: #d92d20; }
circle.specificity { fill: #1570ef; }
.small { opacity: .35; }
.legend { color: var(--muted); font-size: .85rem; margin: .2rem 0 .6rem; }
.key { display: inline-block; width: .8rem; height: .8rem; border-radius: 50%;
       vertical-align: middle; }
.key.sensitivity { background: #d92d20; }
.key.specificity { background: #1570ef; }
"""

JS = r"""
"use strict";
(function () {
  var POLL_MS = 5000;
  var STALE_S = 120;

  function cell(tr, text, cls) {
    var td = document.createElement("td");
    td.textContent = text === null || text === undefined ? "\u2014" : String(text);
    if (cls) { td.className = cls; }
    tr.appendChild(td);
    return td;
  }
  function when(iso) { return iso ? iso.slice(0, 19).replace("T", " ") + " UTC" : null; }
  function age(seconds) {
    if (seconds === null || seconds === undefined) { return null; }
    var s = Math.max(0, Math.round(seconds));
    if (s < 90) { return s + " s"; }
    if (s < 5400) { return Math.round(s / 60) + " min"; }
    if (s < 172800) { return Math.round(s / 3600) + " h"; }
    return Math.round(s / 86400) + " d";
  }
  function since(iso) {
    var t = iso ? Date.parse(iso) : NaN;
    return isNaN(t) ? null : (Date.now() - t) / 1000;
  }
  function mb(v) {
    if (v === null || v === undefined) { return null; }
    return v >= 1024 ? (v / 1024).toFixed(1) + " GB" : Math.round(v) + " MB";
  }

  function renderResults(tbody, list) {
    var rows = document.createDocumentFragment();
    list.forEach(function (r) {
      var tr = document.createElement("tr");
      var p = r.prediction;
      cell(tr, when(r.created_at));
      cell(tr, r.site_id);
      cell(tr, r.device_id);
      cell(tr, r.body_part);
      cell(tr, p["class"], p.refer ? "refer" : "");
      cell(tr, (100 * p.probs.osteoporosis).toFixed(0) + " %", "num");
      cell(tr, p.tscore.toFixed(1), "num");
      cell(tr, p.refer ? "refer" : "", p.refer ? "refer" : "");
      cell(tr, r.quality.flags.join(", ") || "");
      var a = document.createElement("a");
      a.href = "/results/" + encodeURIComponent(r.result_id);
      a.textContent = "details";
      cell(tr, "").replaceChildren(a);
      rows.appendChild(tr);
    });
    tbody.replaceChildren(rows);
  }

  function models(list) {
    return list.map(function (m) {
      return m.site + ": " + m.name + " " + m.version + " (" + m.backend + ", " + m.precision + ")";
    }).join("; ");
  }

  function renderDevices(tbody, list) {
    var rows = document.createDocumentFragment();
    var sites = {};
    list.forEach(function (d) { (sites[d.site_id] = sites[d.site_id] || []).push(d); });
    Object.keys(sites).sort().forEach(function (site) {
      var devs = sites[site];
      var online = devs.filter(function (d) { return d.state === "online"; }).length;
      var head = document.createElement("tr");
      head.className = "site";
      var th = document.createElement("th");
      th.colSpan = 10;
      th.textContent = "Clinic " + site + " \u2014 " + devs.length + " device(s), " +
        online + " online";
      head.appendChild(th);
      rows.appendChild(head);
      devs.forEach(function (d) {
        var tr = document.createElement("tr");
        var hb = d.heartbeat;
        var hbAge = since(d.heartbeat_at);
        cell(tr, d.device_id);
        cell(tr, d.state, d.state);
        cell(tr, when(d.state_at));
        cell(tr, hbAge === null ? null : age(hbAge) + " ago",
             hbAge !== null && hbAge > STALE_S ? "stale" : "");
        cell(tr, hb ? hb.outbox_depth + " / " + hb.outbox_limit : null,
             hb && hb.outbox_alarm ? "num alarm" : "num");
        cell(tr, hb ? age(hb.oldest_queued_age_s) : null, "num");
        cell(tr, hb ? mb(hb.disk_free_mb) : null, "num");
        cell(tr, models(d.models) || null);
        cell(tr, d.software);
        cell(tr, d.problems.join("; ") || "", d.problems.length ? "alarm" : "");
        rows.appendChild(tr);
      });
    });
    tbody.replaceChildren(rows);
  }

  function poll(tbody, url, render) {
    var note = document.querySelector("[data-live-note]");
    var empty = document.querySelector("[data-empty]");
    function tick() {
      fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (r) { if (!r.ok) { throw new Error(String(r.status)); } return r.json(); })
        .then(function (data) {
          render(tbody, data);
          if (empty) { empty.hidden = data.length > 0; }
          if (note) { note.textContent = "live \u00b7 updated " + new Date().toLocaleTimeString(); }
        })
        .catch(function (err) {
          if (note) { note.textContent = "not updating (" + err.message + ")"; }
        })
        .finally(function () { window.setTimeout(tick, POLL_MS); });
    }
    window.setTimeout(tick, POLL_MS);
  }

  document.addEventListener("DOMContentLoaded", function () {
    var feed = document.querySelector("tbody[data-feed]");
    if (feed) { poll(feed, feed.getAttribute("data-feed"), renderResults); }
    var devices = document.querySelector("tbody[data-devices]");
    if (devices) { poll(devices, devices.getAttribute("data-devices"), renderDevices); }
  });
})();
"""
