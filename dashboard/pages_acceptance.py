"""The clinical acceptance page: agreement and referral against DXA, per clinic and month.

It renders :func:`dashboard.acceptance.summarise` as it is: every rate beside its counts and
its 95 % interval, small-n rates greyed and labelled, and the note that they are not evidence
— staff should see how little a month of one clinic says before they act on it. The chart is
SVG shapes only (the CSP forbids inline style).
"""

from __future__ import annotations

from urllib.parse import urlencode

from dashboard.pages import e
from dashboard.query import ResultFilter

CHART_W, CHART_H, PAD = 600, 180, 44


def rate_cell(r: dict) -> str:
    """``83 %`` over ``10/12 · 55–95 %``; greyed with a "small n" tag below the minimum."""
    if r["n"] == 0:
        return '<td class="rate muted">\u2014</td>'
    low, high = r["ci95"]
    detail = f"{r['k']}/{r['n']} \u00b7 {100 * low:.0f}\u2013{100 * high:.0f} %"
    if r["small_n"]:
        return (
            f'<td class="rate small-n">{100 * r["value"]:.0f} % <span class="tag">small n</span>'
            f"<small>{detail}</small></td>"
        )
    return f'<td class="rate">{100 * r["value"]:.0f} %<small>{detail}</small></td>'


def _cells(t: dict) -> str:
    return (
        f'<td class="num">{t["results"]}</td><td class="num">{t["opinions"]}</td>'
        f"{rate_cell(t['agreement'])}"
        f'<td class="num">{t["dxa"]}</td>'
        f'<td class="num">{t["tp"]} / {t["fn"]} / {t["tn"]} / {t["fp"]}</td>'
        f"{rate_cell(t['sensitivity'])}{rate_cell(t['specificity'])}"
    )


HEAD = (
    "<th>Results</th><th>With opinion</th><th>Clinician agrees</th><th>DXA known</th>"
    '<th title="true positive / false negative / true negative / false positive">'
    "TP / FN / TN / FP</th>"
    "<th>Sensitivity of referral</th><th>Specificity of referral</th>"
)


def _chart(rows: list[dict]) -> str:
    """Sensitivity (red) and specificity (blue) per month with their 95 % intervals."""
    if len(rows) < 2:
        return ""
    step = (CHART_W - 2 * PAD) / (len(rows) - 1)

    def y(v: float) -> float:
        return round(CHART_H - PAD - v * (CHART_H - 2 * PAD), 1)

    out = []
    for v in (0.0, 0.5, 1.0):
        out.append(
            f'<line class="grid-line" x1="{PAD}" y1="{y(v)}" x2="{CHART_W - PAD}" y2="{y(v)}"/>'
            f'<text x="{PAD - 4}" y="{y(v) + 4}" text-anchor="end">{100 * v:.0f} %</text>'
        )
    for i, row in enumerate(rows):
        x = round(PAD + i * step, 1)
        out.append(
            f'<text x="{x}" y="{CHART_H - 8}" text-anchor="middle">{e(row["period"])}</text>'
        )
        for name, dx in (("sensitivity", -4), ("specificity", 4)):
            r = row[name]
            if r["n"] == 0:
                continue
            cls = f"{name}{' small' if r['small_n'] else ''}"
            lo, hi = r["ci95"]
            out.append(
                f'<line class="{cls}" x1="{x + dx}" y1="{y(lo)}" x2="{x + dx}" y2="{y(hi)}"/>'
                f'<circle class="{cls}" cx="{x + dx}" cy="{y(r["value"])}" r="4"/>'
            )
    return (
        f'<svg class="chart" width="{CHART_W}" height="{CHART_H}" '
        f'viewBox="0 0 {CHART_W} {CHART_H}" role="img" aria-label="sensitivity and '
        'specificity of referral per month, with 95 % intervals">'
        + "".join(out)
        + '</svg><p class="legend"><span class="key sensitivity"></span> sensitivity '
        '<span class="key specificity"></span> specificity (dot: rate; line: 95 % interval; '
        "pale: small n)</p>"
    )


def filter_form(filt: ResultFilter) -> str:
    day = lambda d: d.isoformat() if d else ""  # noqa: E731
    api = "/api/acceptance?" + urlencode(filt.params(with_limit=False))
    return (
        '<form class="filters" method="get" action="/acceptance">'
        f'<label>Clinic <input name="site" value="{e(filt.site or "")}" size="12"></label>'
        f'<label>From <input type="date" name="from" value="{e(day(filt.date_from))}"></label>'
        f'<label>To <input type="date" name="to" value="{e(day(filt.date_to))}"></label>'
        '<button type="submit">Filter</button>'
        + ('<a href="/acceptance">clear</a>' if filt.active else "")
        + f'<a class="csv" href="{e(api)}">JSON</a></form>'
    )


def acceptance_page(summary: dict, filt: ResultFilter) -> str:
    d = summary["definition"]
    sites = "".join(
        f'<tr><th scope="row" class="nowrap"><a href="#site-{e(s["site_id"])}">'
        f"{e(s['site_id'])}</a></th>{_cells(s)}</tr>"
        for s in summary["sites"]
    )
    total = (
        f'<tr class="total"><th scope="row" class="nowrap">All clinics</th>'
        f"{_cells(summary['overall'])}</tr>"
    )
    per_site = []
    for s in summary["sites"]:
        rows = [r for r in summary["rows"] if r["site_id"] == s["site_id"]]
        body = "".join(
            f'<tr><th scope="row" class="nowrap">{e(r["period"])}</th>{_cells(r)}</tr>'
            for r in rows
        )
        per_site.append(
            f'<h2 id="site-{e(s["site_id"])}">Clinic {e(s["site_id"])} by month</h2>'
            f"{_chart(rows)}"
            f"<table><thead><tr><th>Month</th>{HEAD}</tr></thead><tbody>{body}</tbody></table>"
        )
    return (
        "<h1>Clinical acceptance</h1>"
        f"{filter_form(filt)}"
        f'<div class="aid">{e(summary["note"])}</div>'
        f'<p class="muted">Agreement: {e(d["agreement"])}. Referral is the test '
        f"({e(d['test'])}); truth is DXA osteoporosis ({e(d['truth'])}). "
        f"Intervals: {e(d['interval'])}. Months: {e(d['period'])}.</p>"
        f"<table><thead><tr><th>Clinic</th>{HEAD}</tr></thead><tbody>{sites}{total}</tbody>"
        "</table>"
        + ("" if summary["sites"] else '<p class="muted">No result matches.</p>')
        + "".join(per_site)
    )
