"""HTML pages, rendered on the server with every value escaped.

No external assets (clinics and the central office may be offline) and nothing inline that a
strict CSP would have to allow: style and script come from ``/static/…`` and the charts are
SVG shapes (attributes, not ``style=``). Patients appear only as the first characters of their
HMAC key — enough to notice two results of one patient, useless to find out who it is.
The tables have the columns ``dashboard/static.py`` rebuilds when it refreshes them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import datetime
from html import escape
from urllib.parse import quote, urlencode

from dashboard.store import StoredResult

STALE_S = 120  # a heartbeat older than this is shown as stale (default period: 30 s)
KEY_PREFIX = 8  # characters of patient_key shown
FLAG_WORDS = {
    "ood_borderline": "image near the edge of what the model knows",
    "low_confidence": "low confidence",
    "missing_clinical_facts": "clinical facts missing",
}


def e(value: object) -> str:
    """Escape for HTML text and attribute values; None becomes an em dash."""
    return "\u2014" if value is None else escape(str(value), quote=True)


def when(iso: str | None) -> str | None:
    return None if not iso else iso[:19].replace("T", " ") + " UTC"


def age(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    s = max(0, round(seconds))
    if s < 90:
        return f"{s} s"
    if s < 5400:
        return f"{round(s / 60)} min"
    if s < 172800:
        return f"{round(s / 3600)} h"
    return f"{round(s / 86400)} d"


def since(iso: str | None, now: float) -> float | None:
    try:
        return now - datetime.fromisoformat(iso).timestamp() if iso else None
    except ValueError:
        return None


def mb(value: float | None) -> str | None:
    if value is None:
        return None
    return f"{value / 1024:.1f} GB" if value >= 1024 else f"{round(value)} MB"


def who_band(tscore: float) -> str:
    """WHO: normal >= -1.0; osteopenia between; osteoporosis <= -2.5."""
    if tscore <= -2.5:
        return "osteoporosis"
    return "osteopenia" if tscore < -1.0 else "normal"


def _td(value: object, cls: str = "") -> str:
    return f'<td class="{e(cls)}">{e(value)}</td>' if cls else f"<td>{e(value)}</td>"


def layout(
    title: str,
    body: str,
    *,
    active: str = "",
    user: str | None = None,
    csrf: str | None = None,
    open_banner: bool = False,
) -> str:
    links = (("devices", "/", "Clinics and devices"), ("results", "/results", "Results"))
    nav = "".join(
        f'<a href="{href}" class="{"active" if key == active else ""}">{label}</a>'
        for key, href, label in links
    )
    logout = ""
    if user is not None and csrf is not None:
        logout = (
            f'<form method="post" action="/logout"><input type="hidden" name="csrf" '
            f'value="{e(csrf)}"><span>{e(user)}</span> '
            '<button type="submit">Log out</button></form>'
        )
    banner = (
        '<div class="banner">No users file is configured: these pages are open to anyone on '
        "this machine (loopback only). Configure users before exposing the dashboard.</div>"
        if open_banner
        else ""
    )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(title)} \u2014 Osteofy dashboard</title>"
        '<link rel="stylesheet" href="/static/app.css"><script src="/static/app.js" defer></script>'
        f"</head><body><header><strong>Osteofy</strong><nav>{nav}</nav>{logout}</header>{banner}"
        f"<main>{body}</main><footer>Osteofy Edge: a screening aid, not a diagnosis \u2014 "
        "confirm with DXA.</footer></body></html>"
    )


# --- clinics and devices -------------------------------------------------------------------


def _models(models: Iterable[dict]) -> str | None:
    text = "; ".join(
        f"{m['site']}: {m['name']} {m['version']} ({m['backend']}, {m['precision']})"
        for m in models
    )
    return text or None


def device_rows(devices: list[dict], now: float) -> str:
    out = []
    sites: dict[str, list[dict]] = {}
    for d in devices:
        sites.setdefault(d["site_id"], []).append(d)
    for site in sorted(sites):
        devs = sites[site]
        online = sum(d["state"] == "online" for d in devs)
        out.append(
            f'<tr class="site"><th colspan="10">Clinic {e(site)} \u2014 {len(devs)} device(s), '
            f"{online} online</th></tr>"
        )
        for d in devs:
            hb = d["heartbeat"]
            hb_age = since(d["heartbeat_at"], now)
            out.append(
                "<tr>"
                + _td(d["device_id"])
                + _td(d["state"], d["state"])
                + _td(when(d["state_at"]))
                + _td(
                    None if hb_age is None else f"{age(hb_age)} ago",
                    "stale" if hb_age is not None and hb_age > STALE_S else "",
                )
                + _td(
                    f"{hb['outbox_depth']} / {hb['outbox_limit']}" if hb else None,
                    "num alarm" if hb and hb["outbox_alarm"] else "num",
                )
                + _td(age(hb["oldest_queued_age_s"]) if hb else None, "num")
                + _td(mb(hb["disk_free_mb"]) if hb else None, "num")
                + _td(_models(d["models"]))
                + _td(d["software"])
                + _td("; ".join(d["problems"]), "alarm" if d["problems"] else "")
                + "</tr>"
            )
    return "".join(out)


def devices_page(devices: list[dict]) -> str:
    rows = device_rows(devices, time.time())
    return (
        '<h1>Clinics and devices</h1><p class="live" data-live-note>refreshes every 5 s</p>'
        "<table><thead><tr><th>Device</th><th>State</th><th>Since</th><th>Last heartbeat</th>"
        "<th>Outbox</th><th>Oldest queued</th><th>Disk free</th><th>Models</th>"
        '<th>Software</th><th>Problems</th></tr></thead><tbody data-devices="/api/devices">'
        f"{rows}</tbody></table>"
        + ("" if devices else '<p class="muted">No device has reported yet.</p>')
    )


# --- results feed --------------------------------------------------------------------------


def result_rows(results: list[dict]) -> str:
    out = []
    for r in results:
        p = r["prediction"]
        refer = "refer" if p["refer"] else ""
        out.append(
            "<tr>"
            + _td(when(r["created_at"]))
            + _td(r["site_id"])
            + _td(r["device_id"])
            + _td(r["body_part"])
            + _td(p["class"], refer)
            + _td(f"{100 * p['probs']['osteoporosis']:.0f} %", "num")
            + _td(f"{p['tscore']:.1f}", "num")
            + _td(refer, refer)
            + _td(", ".join(r["quality"]["flags"]))
            + f'<td><a href="/results/{quote(r["result_id"])}">details</a></td></tr>'
        )
    return "".join(out)


def results_page(results: list[dict], site: str | None, limit: int) -> str:
    query = {"limit": str(limit), **({"site": site} if site else {})}
    api = "/api/results?" + urlencode(query)
    heading = f"Results \u2014 clinic {e(site)}" if site else "Results"
    return (
        f'<h1>{heading}</h1><p class="live" data-live-note>newest first; refreshes every 5 s</p>'
        "<table><thead><tr><th>Screened</th><th>Clinic</th><th>Device</th><th>Body part</th>"
        "<th>Screening result</th><th>P(osteoporosis)</th><th>Est. T-score</th><th>Referral</th>"
        f'<th>Quality flags</th><th></th></tr></thead><tbody data-feed="{e(api)}">'
        f"{result_rows(results)}</tbody></table>"
        + ("" if results else '<p class="muted">No result yet.</p>')
    )


# --- one result ----------------------------------------------------------------------------


def _tscore_scale(tscore: float) -> str:
    """The estimate on the WHO bands, as SVG (-5 .. +2)."""
    lo, hi, x0, width = -5.0, 2.0, 10.0, 400.0

    def x(t: float) -> float:
        return round(x0 + (min(max(t, lo), hi) - lo) / (hi - lo) * width, 1)

    bands = (("osteoporosis", lo, -2.5), ("osteopenia", -2.5, -1.0), ("normal", -1.0, hi))
    rects = "".join(
        f'<rect class="band-{n}" x="{x(a)}" y="8" width="{x(b) - x(a)}" height="18"/>'
        f'<text x="{(x(a) + x(b)) / 2}" y="40" text-anchor="middle">{n}</text>'
        for n, a, b in bands
    )
    ticks = "".join(
        f'<line class="axis" x1="{x(t)}" y1="26" x2="{x(t)}" y2="30"/>'
        f'<text x="{x(t)}" y="54" text-anchor="middle">{t:g}</text>'
        for t in (-4.0, -2.5, -1.0, 0.0, 1.0, 2.0)
    )
    marker = f'<line class="marker" x1="{x(tscore)}" y1="2" x2="{x(tscore)}" y2="32"/>'
    return (
        '<svg width="420" height="60" viewBox="0 0 420 60" role="img" '
        f'aria-label="estimated T-score {tscore:.1f} on the WHO bands">{rects}{ticks}{marker}</svg>'
    )


def _contributions(rows: list[dict]) -> str:
    if not rows:
        return '<p class="muted">This model uses no clinical facts.</p>'
    scale = max(abs(r["log_odds"]) for r in rows) or 1.0
    out = []
    for r in sorted(rows, key=lambda r: -abs(r["log_odds"])):
        w = round(abs(r["log_odds"]) / scale * 100, 1)
        x = 100 if r["log_odds"] >= 0 else 100 - w
        cls = "pos" if r["log_odds"] >= 0 else "neg"
        bar = (
            f'<svg width="200" height="12" viewBox="0 0 200 12" aria-hidden="true">'
            f'<line class="axis" x1="100" y1="0" x2="100" y2="12"/>'
            f'<rect class="{cls}" x="{x}" y="2" width="{w}" height="8"/></svg>'
        )
        out.append(
            "<tr>"
            + _td(r["factor"])
            + _td("known" if r["known"] else "missing", "" if r["known"] else "muted")
            + _td(f"{r['log_odds']:+.2f}", "num")
            + f"<td>{bar}</td></tr>"
        )
    return (
        "<table><thead><tr><th>Clinical fact</th><th></th><th>Log-odds</th>"
        "<th>towards normal | towards osteoporosis</th></tr></thead><tbody>"
        + "".join(out)
        + "</tbody></table>"
    )


def _feedback(items: list[dict]) -> str:
    if not items:
        return '<p class="muted">No clinician feedback yet.</p>'
    out = []
    for f in items:
        agree = {True: "agrees", False: "disagrees", None: "gave no opinion"}[f.get("agree")]
        dxa = f.get("dxa_tscore")
        dxa_text = f"; DXA T-score {dxa:.1f} ({who_band(dxa)})" if dxa is not None else ""
        out.append(f"<li>{e(when(f['at']))}: clinician {e(agree)}{e(dxa_text)}</li>")
    return "<ul>" + "".join(out) + "</ul>"


def result_page(item: StoredResult) -> str:
    r = item.payload
    p, m, q = r["prediction"], r["model"], r["quality"]
    rid = r["result_id"]
    key = r.get("patient_key")
    probs = "".join(
        f'<dt>{e(c)}</dt><dd><meter min="0" max="1" value="{p["probs"][c]:.4f}"></meter> '
        f"{100 * p['probs'][c]:.1f} %</dd>"
        for c in ("normal", "osteopenia", "osteoporosis")
    )
    flags = [FLAG_WORDS.get(f, f) for f in q["flags"]]
    if q["missing_facts"]:
        flags.append("missing: " + ", ".join(q["missing_facts"]))
    peaks = ", ".join(
        f"({100 * k['x']:.0f} %, {100 * k['y']:.0f} %)" for k in r["explanation"]["peaks"]
    )
    overlay = (
        f'<img src="/api/overlay/{quote(rid)}" alt="heat map of the '
        f'{e(r["explanation"]["heatmap_class"])} class over the radiograph">'
        if item.has_overlay
        else '<p class="muted">No overlay image received.</p>'
    )
    band = who_band(p["tscore"])
    refer_text = " \u2014 refer for DXA" if p["refer"] else ""
    key_text = key[:KEY_PREFIX] + "\u2026" if key else None
    return (
        f"<h1>Result {e(rid[:8])} \u2014 {e(r['body_part'])}, clinic {e(r['site_id'])}</h1>"
        '<div class="aid">Screening aid \u2014 not a diagnosis. Confirm with DXA.</div>'
        f'<div class="grid"><div class="overlay">{overlay}'
        f'<p class="muted">Heat map peaks (x, y of the image): {e(peaks or None)}</p></div><div>'
        f'<h2>Screening result: <span class="{"refer" if p["refer"] else ""}">'
        f"{e(p['class'])}</span>{refer_text}</h2>"
        f"<dl>{probs}</dl>"
        f"<h2>Estimated T-score {p['tscore']:.1f} ({e(band)} band)</h2>"
        f"{_tscore_scale(float(p['tscore']))}"
        '<p class="muted">Estimated from the radiograph and clinical facts; WHO bands: normal '
        "\u2265 \u22121.0, osteopenia between, osteoporosis \u2264 \u22122.5.</p>"
        f"<h2>Quality</h2><dl><dt>Out-of-distribution score</dt><dd>{q['ood_score']:.2f} "
        f"(threshold {q['ood_threshold']:.2f})</dd><dt>Flags</dt>"
        f"<dd>{e('; '.join(flags) or 'none')}</dd></dl>"
        "<h2>Clinician feedback</h2>"
        f"{_feedback(item.feedback)}</div></div>"
        "<h2>Clinical contributions</h2>"
        f"{_contributions(r['explanation']['clinical'])}"
        "<h2>Record</h2><dl>"
        f"<dt>Screened</dt><dd>{e(when(r['created_at']))}</dd>"
        f"<dt>Received</dt><dd>{e(when(item.received_at))}</dd>"
        f"<dt>Device</dt><dd>{e(r['device_id'])}</dd>"
        f"<dt>Patient key</dt><dd>{e(key_text)}</dd>"
        f"<dt>Age, sex</dt><dd>{e(r['age_years'])}, {e(r['sex'])}</dd>"
        f"<dt>Model</dt><dd>{e(m['name'])} {e(m['version'])} ({e(m['backend'])}, "
        f"{e(m['precision'])}), sha256 {e(m['sha256'][:12])}\u2026</dd>"
        f"<dt>Result id</dt><dd>{e(rid)}</dd></dl>"
    )


# --- login and errors ----------------------------------------------------------------------


def login_page(error: str | None, next_path: str) -> str:
    msg = f'<p class="error">{e(error)}</p>' if error else ""
    return (
        f"<h1>Log in</h1>{msg}"
        '<form class="login" method="post" action="/login">'
        f'<input type="hidden" name="next" value="{e(next_path)}">'
        '<label>Name <input name="user" autocomplete="username" required></label>'
        '<label>Password <input name="password" type="password" '
        'autocomplete="current-password" required></label>'
        '<button type="submit">Log in</button></form>'
    )


def error_page(status: int, message: str) -> str:
    return f'<h1>{status}</h1><p>{e(message)}</p><p><a href="/">Back to the dashboard</a></p>'
