"""The page of one result: the heat map, the estimate on the WHO bands, why, and feedback.

Everything a clinician needs to judge one screening, with the notice that it is an aid and
not a diagnosis. The patient appears only as the first characters of the HMAC key.
"""

from __future__ import annotations

from urllib.parse import quote

from dashboard.export import KEY_PREFIX
from dashboard.pages import e, td, when, who_band
from dashboard.store import StoredResult
from edge.answer import tscore_text

FLAG_WORDS = {
    "ood_borderline": "image near the edge of what the model knows",
    "low_confidence": "low confidence",
    "missing_clinical_facts": "clinical facts missing",
}


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
            + td(r["factor"])
            + td("known" if r["known"] else "missing", "" if r["known"] else "muted")
            + td(f"{r['log_odds']:+.2f}", "num")
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
        f"<h2>Estimated T-score {e(tscore_text(p['tscore']))} ({e(band)} band)</h2>"
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
