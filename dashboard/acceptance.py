"""Clinical acceptance: how often clinicians agree, and how the referral fares against DXA.

Two questions, per site and per month (of the result's ``created_at``, UTC):

- **Agreement**: of the results a clinician gave an opinion on, the share they agreed with.
- **Referral against DXA**: where a DXA T-score came back, the screening's ``refer`` decision
  is the test and DXA osteoporosis (T ≤ −2.5, WHO) the truth. Sensitivity = referred among
  those with osteoporosis; specificity = not referred among those without.

Each result counts once: its *latest* opinion and its *latest* DXA value (feedback may come
in pieces — an opinion today, the DXA weeks later). Every rate carries its counts and a 95 %
Wilson interval, because a clinic sees few DXA results a month and a rate from a handful of
cases says almost nothing: ``small_n`` marks rates from fewer than :data:`MIN_N` cases. This is
monitoring, not a validation study — the cases with DXA are those clinicians chose to refer
to DXA, which biases both rates (verification bias).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from dashboard.store import FeedbackOutcome

OSTEOPOROSIS_T = -2.5  # WHO: DXA T-score <= -2.5
MIN_N = 30  # below this many cases a rate is shown as "small n"
Z95 = 1.959964

NOTE = (
    "Small n is not evidence: a rate from a few cases can be far from the truth; read the "
    f"95 % interval, not the point. Rates from fewer than {MIN_N} cases are marked small n. "
    "DXA values exist mostly for referred patients (verification bias), so sensitivity and "
    "specificity here monitor the screening, they do not validate it."
)


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval for k successes in n trials (sound at small n and at 0 or n)."""
    if n <= 0:
        return None
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(k: int, n: int) -> dict:
    """A proportion with its counts and interval, JSON-ready (``value`` None when n = 0)."""
    ci = wilson(k, n)
    return {
        "k": k,
        "n": n,
        "value": None if n == 0 else round(k / n, 4),
        "ci95": None if ci is None else [round(ci[0], 4), round(ci[1], 4)],
        "small_n": n < MIN_N,
    }


@dataclass
class Tally:
    """Counts for one site and period (or a total over several)."""

    results: int = 0
    agree: int = 0
    disagree: int = 0
    tp: int = 0  # referred, DXA osteoporosis
    fn: int = 0  # not referred, DXA osteoporosis
    tn: int = 0  # not referred, no DXA osteoporosis
    fp: int = 0  # referred, no DXA osteoporosis

    def add(self, other: Tally) -> None:
        for name in ("results", "agree", "disagree", "tp", "fn", "tn", "fp"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict:
        return {
            "results": self.results,
            "opinions": self.agree + self.disagree,
            "agree": self.agree,
            "disagree": self.disagree,
            "agreement": rate(self.agree, self.agree + self.disagree),
            "dxa": self.tp + self.fn + self.tn + self.fp,
            "tp": self.tp,
            "fn": self.fn,
            "tn": self.tn,
            "fp": self.fp,
            "sensitivity": rate(self.tp, self.tp + self.fn),
            "specificity": rate(self.tn, self.tn + self.fp),
        }


@dataclass
class _Latest:
    site_id: str
    period: str
    refer: bool
    agree: bool | None = None
    dxa: float | None = None


def _latest(outcomes: Iterable[FeedbackOutcome]) -> list[_Latest]:
    """One entry per result: its latest opinion and latest DXA value (by the clinician's
    ``at``, then by arrival)."""
    by_result: dict[str, _Latest] = {}
    for o in sorted(outcomes, key=lambda o: (str(o.feedback.get("at", "")), o.received_at)):
        cur = by_result.setdefault(o.result_id, _Latest(o.site_id, o.period, o.refer))
        if o.feedback.get("agree") is not None:
            cur.agree = bool(o.feedback["agree"])
        if o.feedback.get("dxa_tscore") is not None:
            cur.dxa = float(o.feedback["dxa_tscore"])
    return list(by_result.values())


def summarise(counts: Iterable[tuple[str, str, int]], outcomes: Iterable[FeedbackOutcome]) -> dict:
    """The ``/api/acceptance`` answer from the store's result counts and feedback."""
    cells: dict[tuple[str, str], Tally] = {}
    for site, period, n in counts:
        cells.setdefault((site, period), Tally()).results += n
    for r in _latest(outcomes):
        t = cells.setdefault((r.site_id, r.period), Tally())
        if r.agree is True:
            t.agree += 1
        elif r.agree is False:
            t.disagree += 1
        if r.dxa is not None:
            osteoporosis = r.dxa <= OSTEOPOROSIS_T
            if osteoporosis:
                t.tp += r.refer
                t.fn += not r.refer
            else:
                t.fp += r.refer
                t.tn += not r.refer
    sites: dict[str, Tally] = {}
    overall = Tally()
    for (site, _), t in cells.items():
        sites.setdefault(site, Tally()).add(t)
        overall.add(t)
    return {
        "definition": {
            "period": "calendar month of the result's created_at (UTC)",
            "agreement": "latest clinician opinion per result: agree / (agree + disagree)",
            "truth": f"latest DXA T-score per result <= {OSTEOPOROSIS_T} (WHO osteoporosis)",
            "test": "prediction.refer of the result",
            "interval": "95 % Wilson score interval",
        },
        "note": NOTE,
        "min_n": MIN_N,
        "rows": [
            {"site_id": site, "period": period, **cells[(site, period)].as_dict()}
            for site, period in sorted(cells)
        ],
        "sites": [{"site_id": s, **sites[s].as_dict()} for s in sorted(sites)],
        "overall": overall.as_dict(),
    }
