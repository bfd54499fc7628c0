"""``/api/results.csv``: the filtered results feed as a spreadsheet, safe to open.

Columns come from the ``osteofy.result.v1`` payload (plus the latest clinician feedback).
The patient appears only as the first :data:`KEY_PREFIX` characters of ``patient_key`` —
enough to see two rows of one patient, like the pages — and ``study_key`` not at all: a
spreadsheet travels further than the dashboard, so it carries no more than a person needs.

CSV injection: a spreadsheet runs a cell that starts with ``=``, ``+``, ``-`` or ``@`` (and
some also tab or carriage return) as a formula, and site and device ids come from devices.
Every *text* cell that starts with one of those gets a leading ``'``. Numbers are written by
us from floats (``-2.80``): a spreadsheet reads them as numbers, never as formulas, so a
negative T-score stays a number.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator

from dashboard.intake import utc_key
from dashboard.query import ResultFilter
from dashboard.store import Store
from edge.result import CLASSES

KEY_PREFIX = 8  # characters of patient_key in exports and pages
PAGE = 500  # rows read per query while streaming
MAX_ROWS = 1_000_000  # rows per export at most (and the default): ?limit= asks for fewer
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")

COLUMNS = (
    "result_id",
    "created_at",
    "site_id",
    "device_id",
    "patient_key_prefix",
    "age_years",
    "sex",
    "body_part",
    "model_name",
    "model_version",
    "model_backend",
    "model_precision",
    "class",
    *(f"p_{c}" for c in CLASSES),
    "tscore_estimate",
    "refer",
    "ood_score",
    "ood_threshold",
    "quality_flags",
    "missing_facts",
    "clinician_agrees",
    "dxa_tscore",
)


def text(value: object) -> str:
    """A text cell that no spreadsheet will run as a formula."""
    s = "" if value is None else str(value)
    return "'" + s if s.startswith(FORMULA_START) else s


def number(value: float | None, digits: int) -> str:
    return "" if value is None else f"{float(value):.{digits}f}"


def _latest(feedback: list[dict], name: str) -> object:
    values = [f[name] for f in feedback if f.get(name) is not None]
    return values[-1] if values else None


def row(r: dict, feedback: list[dict]) -> list[str]:
    """One result as CSV cells, in :data:`COLUMNS` order."""
    p, m, q = r["prediction"], r["model"], r["quality"]
    key = r.get("patient_key")
    agree = _latest(feedback, "agree")
    dxa = _latest(feedback, "dxa_tscore")
    return [
        text(r["result_id"]),
        text(r["created_at"]),
        text(r["site_id"]),
        text(r["device_id"]),
        text(key[:KEY_PREFIX] if key else None),
        number(r.get("age_years"), 1),
        text(r.get("sex")),
        text(r["body_part"]),
        text(m["name"]),
        text(m["version"]),
        text(m["backend"]),
        text(m["precision"]),
        text(p["class"]),
        *(number(p["probs"][c], 4) for c in CLASSES),
        number(p["tscore"], 2),
        "1" if p["refer"] else "0",
        number(q["ood_score"], 2),
        number(q["ood_threshold"], 2),
        text(";".join(q["flags"])),
        text(";".join(q["missing_facts"])),
        "" if agree is None else ("1" if agree else "0"),
        number(dxa if isinstance(dxa, int | float) else None, 1),
    ]


def _line(cells: list[str] | tuple[str, ...]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerow(cells)
    return buf.getvalue().encode("utf-8")


def stream_csv(store: Store, filt: ResultFilter) -> Iterator[bytes]:
    """The CSV of at most ``filt.limit`` results, newest first, read page by page: memory
    stays flat however many rows match. The first chunk already holds the first page, so a
    database that is down fails before the response has begun (a 503, not a cut file)."""
    head = b"\xef\xbb\xbf" + _line(COLUMNS)  # BOM: spreadsheets then read UTF-8 correctly
    before: tuple[str, str] | None = None
    sent = 0
    while sent < filt.limit:
        results = store.results(filt.with_limit(min(PAGE, filt.limit - sent)), before)
        if not results:
            break
        feedback = store.feedback_for([r["result_id"] for r in results])
        yield head + b"".join(_line(row(r, feedback.get(r["result_id"], []))) for r in results)
        head = b""
        sent += len(results)
        last = results[-1]
        before = (utc_key(last["created_at"]), last["result_id"])
    if head:
        yield head  # nothing matched: the header alone
