"""HTML pages, rendered on the server with every value escaped: layout, devices, results feed.

No external assets (clinics and the central office may be offline) and nothing inline that a
strict CSP would have to allow: style and script come from ``/static/…`` and the charts are
SVG shapes (attributes, not ``style=``). Patients appear only as the first characters of their
HMAC key — enough to notice two results of one patient, useless to find out who it is.
The tables have the columns ``dashboard/static.py`` rebuilds when it refreshes them.
The result page is :mod:`dashboard.pages_result`, acceptance :mod:`dashboard.pages_acceptance`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import datetime
from html import escape
from urllib.parse import quote, urlencode

from dashboard.query import ResultFilter
from dashboard.store import StoredDeadLetter
from edge.answer import tscore_text
from edge.result import CLASSES

STALE_S = 120  # a heartbeat older than this is shown as stale (default period: 30 s)
NAV = (
    ("devices", "/", "Clinics and devices"),
    ("results", "/results", "Results"),
    ("acceptance", "/acceptance", "Clinical acceptance"),
)


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


def td(value: object, cls: str = "") -> str:
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
    nav = "".join(
        f'<a href="{href}" class="{"active" if key == active else ""}">{label}</a>'
        for key, href, label in NAV
    )
    logout = ""
    if user is not None and csrf is not None:
        logout = (
            f'<form method="post" action="/logout"><input type="hidden" name="csrf" '
            f'value="{e(csrf)}"><span>{e(user)}</span> '
            '<button type="submit">Log out</button></form>'
        )
    banner = (
        '<div class="banner">Open mode (open_pages, no users file): these pages are open to '
        "anyone on this machine (loopback only), without a login. Give staff accounts before "
        "anyone else uses the dashboard.</div>"
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
                + td(d["device_id"])
                + td(d["state"], d["state"])
                + td(when(d["state_at"]))
                + td(
                    None if hb_age is None else f"{age(hb_age)} ago",
                    "stale" if hb_age is not None and hb_age > STALE_S else "",
                )
                + td(
                    f"{hb['outbox_depth']} / {hb['outbox_limit']}" if hb else None,
                    "num alarm" if hb and hb["outbox_alarm"] else "num",
                )
                + td(age(hb["oldest_queued_age_s"]) if hb else None, "num")
                + td(mb(hb["disk_free_mb"]) if hb else None, "num")
                + td(_models(d["models"]))
                + td(d["software"])
                + td("; ".join(d["problems"]), "alarm" if d["problems"] else "")
                + "</tr>"
            )
    return "".join(out)


def dead_letter_section(letters: list[StoredDeadLetter], total: int) -> str:
    """Messages that could not be stored: every value escaped (they are what a device sent)."""
    if not total:
        return '<h2>Dead letters</h2><p class="muted">No message has been refused.</p>'
    rows = "".join(
        "<tr>"
        + td(when(d.received_at))
        + td(d.site_id)
        + td(d.device_id)
        + td(d.topic)
        + td(d.times, "num")
        + td(f"{d.size:,} B", "num")
        + td(f"{d.category}: {d.reason}", "alarm")
        + "</tr>"
        for d in letters
    )
    shown = f", the latest {len(letters)} shown" if len(letters) < total else ""
    return (
        f"<h2>Dead letters</h2><p>{total} message(s) could not be stored{shown}; "
        "<code>osteofy dashboard dead-letters --replay</code> tries them again after a fix "
        "(<code>/api/dead-letters</code>).</p>"
        "<table><thead><tr><th>Last received</th><th>Clinic</th><th>Device</th><th>Topic</th>"
        "<th>Times</th><th>Size</th><th>Reason</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )


def devices_page(devices: list[dict], dead_letters: str = "") -> str:
    rows = device_rows(devices, time.time())
    return (
        '<h1>Clinics and devices</h1><p class="live" data-live-note>refreshes every 5 s</p>'
        "<table><thead><tr><th>Device</th><th>State</th><th>Since</th><th>Last heartbeat</th>"
        "<th>Outbox</th><th>Oldest queued</th><th>Disk free</th><th>Models</th>"
        '<th>Software</th><th>Problems</th></tr></thead><tbody data-devices="/api/devices">'
        f"{rows}</tbody></table>"
        + ("" if devices else '<p class="muted" data-empty>No device has reported yet.</p>')
        + dead_letters
    )


# --- results feed --------------------------------------------------------------------------


def result_rows(results: list[dict]) -> str:
    out = []
    for r in results:
        p = r["prediction"]
        refer = "refer" if p["refer"] else ""
        out.append(
            "<tr>"
            + td(when(r["created_at"]))
            + td(r["site_id"])
            + td(r["device_id"])
            + td(r["body_part"])
            + td(p["class"], refer)
            + td(f"{100 * p['probs']['osteoporosis']:.0f} %", "num")
            + td(tscore_text(p["tscore"]), "num")
            + td(refer, refer)
            + td(", ".join(r["quality"]["flags"]))
            + f'<td><a href="/results/{quote(r["result_id"])}">details</a></td></tr>'
        )
    return "".join(out)


def _options(values: Iterable[str], chosen: str | None, any_label: str) -> str:
    opts = [f'<option value="">{e(any_label)}</option>']
    opts += [
        f'<option value="{e(v)}"{" selected" if v == chosen else ""}>{e(v)}</option>'
        for v in values
    ]
    return "".join(opts)


def filter_form(filt: ResultFilter, sites: list[str]) -> str:
    """The feed's filters as a GET form: the URL then names the view (shareable, reloadable)."""
    site_choices = sorted(set(sites) | ({filt.site} if filt.site else set()))
    day = lambda d: d.isoformat() if d else ""  # noqa: E731
    csv_url = "/api/results.csv?" + urlencode(filt.params(with_limit=False))
    return (
        '<form class="filters" method="get" action="/results">'
        f'<label>Clinic <select name="site">{_options(site_choices, filt.site, "all")}</select>'
        "</label>"
        f'<label>Result <select name="class">{_options(CLASSES, filt.cls, "any")}</select>'
        "</label>"
        f'<label>From <input type="date" name="from" value="{e(day(filt.date_from))}"></label>'
        f'<label>To <input type="date" name="to" value="{e(day(filt.date_to))}"></label>'
        f'<label>Rows <input type="number" name="limit" min="1" max="500" '
        f'value="{filt.limit}"></label>'
        '<button type="submit">Filter</button>'
        + ('<a href="/results">clear</a>' if filt.active else "")
        + f'<a class="csv" href="{e(csv_url)}" download>Download CSV (all matching)</a></form>'
    )


def results_page(results: list[dict], filt: ResultFilter, sites: list[str]) -> str:
    api = "/api/results?" + urlencode(filt.params())
    parts = [f"clinic {e(filt.site)}" if filt.site else "", e(filt.cls) if filt.cls else ""]
    if filt.date_from or filt.date_to:
        start = e(filt.date_from) if filt.date_from else "the start"
        parts.append(f"{start} to {e(filt.date_to) if filt.date_to else 'now'}")
    heading = "Results" + "".join(f" \u2014 {x}" for x in parts if x)
    return (
        f"<h1>{heading}</h1>{filter_form(filt, sites)}"
        '<p class="live" data-live-note>newest first; refreshes every 5 s</p>'
        "<table><thead><tr><th>Screened</th><th>Clinic</th><th>Device</th><th>Body part</th>"
        "<th>Screening result</th><th>P(osteoporosis)</th><th>Est. T-score</th><th>Referral</th>"
        f'<th>Quality flags</th><th></th></tr></thead><tbody data-feed="{e(api)}">'
        f"{result_rows(results)}</tbody></table>"
        + ("" if results else '<p class="muted" data-empty>No result matches.</p>')
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


def no_accounts_page() -> str:
    """What every page says while nobody can log in (no users file, pages not opened)."""
    return (
        "<h1>No staff accounts yet</h1>"
        "<p>The dashboard shows patient screening results, so every page needs a login, and "
        "no users file is configured. On the dashboard's server:</p>"
        "<pre>python -m dashboard.auth NAME &gt;&gt; users</pre>"
        "<p>(it asks for the password twice and appends one line), then set "
        "<code>dashboard.users_file: users</code> in the configuration (or "
        "<code>OSTEOFY_DASHBOARD__USERS_FILE=users</code>) and restart the service.</p>"
        '<p class="muted">Machines use the API with a bearer token '
        "(<code>dashboard.api_token_file</code>); without one, <code>/api/*</code> answers "
        "this machine only.</p>"
    )
