"""The results feed's filters, the CSV export, clinical acceptance, batched ingest and the
rule for who may see what when nothing is configured.

Builders, HTTP helpers and the ``db_url`` fixture (SQLite, and PostgreSQL where a server
answers on 127.0.0.1:5432) come from ``test_dashboard``.
"""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import test_dashboard as base
from test_dashboard import (
    SITE,
    TOKEN,
    http_get,
    http_post,
    make_config,
    make_result,
    start_dashboard,
)

from dashboard import export
from dashboard.acceptance import MIN_N, summarise, wilson
from dashboard.auth import hash_password
from dashboard.ingest import Ingest
from dashboard.intake import Counters, utc_key
from dashboard.mqtt import BrokerSettings, Subscriber
from dashboard.query import BadRequest, ResultFilter, parse_filter
from dashboard.store import (
    FeedbackOutcome,
    NewFeedback,
    NewResult,
    Store,
    StoreError,
    Write,
    open_store,
)
from dashboard.store_sqlite import SqliteStore
from edge.messages import Feedback, topic
from edge.result import Result, utc_now

# Fixtures shared with test_dashboard (pytest finds them by these module-level names).
db_url = base.db_url
pg_url = base.pg_url
token_file = base.token_file

# --- builders --------------------------------------------------------------------------------


def result(
    site: str = SITE,
    device: str = "edge-01",
    created_at: str = "2025-02-10T09:00:00Z",
    cls: str = "osteoporosis",
    refer: bool = True,
    tscore: float = -2.8,
) -> Result:
    p = make_result(site=site, device=device, created_at=created_at)
    p["prediction"].update({"class": cls, "refer": refer, "tscore": tscore})
    return Result.model_validate(p)


def fb(
    r: Result, agree: bool | None, dxa: float | None, at: str = "2025-03-01T00:00:00Z"
) -> Feedback:
    return Feedback(
        feedback_id=str(uuid.uuid4()),
        result_id=r.result_id,
        device_id=r.device_id,
        site_id=r.site_id,
        at=at,
        agree=agree,
        dxa_tscore=dxa,
    )


def put(store: Store, *items: Result | Feedback) -> None:
    writes: list[Any] = [
        NewResult(i, utc_key(i.created_at), utc_now())
        if isinstance(i, Result)
        else NewFeedback(i, utc_now())
        for i in items
    ]
    store.write(writes)


def q(**params: str) -> dict[str, list[str]]:
    return {k.rstrip("_"): [v] for k, v in params.items()}


# --- filters ---------------------------------------------------------------------------------


def test_parse_filter_accepts_the_documented_parameters_and_nothing_else() -> None:
    f = parse_filter(q(site="clinic-7", class_="osteopenia", from_="2025-01-01", to="2025-01-31"))
    assert (f.site, f.cls, str(f.date_from), str(f.date_to), f.limit) == (
        "clinic-7",
        "osteopenia",
        "2025-01-01",
        "2025-01-31",
        50,
    )
    assert f.created_range() == ("2025-01-01", "2025-02-01")  # "to" is inclusive
    assert parse_filter({k: [v] for k, v in f.params().items()}) == f  # links round-trip
    assert parse_filter(q(site="", class_="")) == ResultFilter()  # empty form fields: "any"
    for bad in (
        q(class_="fracture"),
        q(from_="2025-1-1"),
        q(from_="2025-02-01", to="2025-01-01"),
        q(limit="0"),
        q(limit="501"),
        q(site="a b"),
        {"site": ["a", "b"]},
    ):
        with pytest.raises(BadRequest):
            parse_filter(bad)


def test_store_filters_pages_and_acceptance_rows(db_url: str) -> None:
    """The same answers from SQLite and PostgreSQL (its JSON path operator included)."""
    store = open_store(db_url)
    try:
        jan = result(created_at="2025-01-31T23:59:59.999Z", cls="normal", refer=False)
        feb = result(created_at="2025-02-01T00:00:00Z", cls="osteoporosis", refer=True)
        mar = result(site="clinic-002", created_at="2025-03-05T12:00:00+02:00", cls="osteopenia")
        put(store, jan, feb, mar, fb(feb, True, -3.0), fb(jan, False, None))

        def ids(**kw: Any) -> list[str]:
            return [r["result_id"] for r in store.results(ResultFilter(**kw))]

        assert ids() == [mar.result_id, feb.result_id, jan.result_id]
        assert ids(site=SITE) == [feb.result_id, jan.result_id]
        assert ids(cls="normal") == [jan.result_id]
        f = parse_filter(q(to="2025-01-31"))
        assert [r["result_id"] for r in store.results(f)] == [jan.result_id]
        f = parse_filter(q(from_="2025-02-01", to="2025-03-05"))
        assert [r["result_id"] for r in store.results(f)] == [mar.result_id, feb.result_id]
        # Paging with a cursor (created_at key, result_id): nothing twice, nothing skipped.
        first = store.results(ResultFilter(limit=2))
        last = first[-1]
        rest = store.results(
            ResultFilter(limit=2), (utc_key(last["created_at"]), last["result_id"])
        )
        assert [r["result_id"] for r in first + rest] == ids()

        assert sorted(store.result_counts(ResultFilter())) == [
            ("clinic-001", "2025-01", 1),
            ("clinic-001", "2025-02", 1),
            ("clinic-002", "2025-03", 1),
        ]
        outcomes = {o.result_id: o for o in store.feedback_outcomes(ResultFilter())}
        assert outcomes[feb.result_id].refer is True and outcomes[jan.result_id].refer is False
        assert outcomes[feb.result_id].period == "2025-02"
        assert store.feedback_outcomes(ResultFilter(cls="osteopenia")) == []
        # Feedback from another device about this result does not count.
        stranger = fb(feb, True, -1.0).model_copy(update={"device_id": "edge-99"})
        put(store, stranger)
        assert len(store.feedback_for([feb.result_id])[feb.result_id]) == 1
    finally:
        store.close()


# --- acceptance ------------------------------------------------------------------------------


def test_wilson_interval() -> None:
    low, high = wilson(0, 10) or (None, None)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    low, high = wilson(8, 10) or (None, None)
    assert (low, high) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    assert wilson(0, 0) is None


def test_acceptance_counts_each_result_once_with_its_latest_feedback() -> None:
    def out(
        rid: str, refer: bool, agree: bool | None, dxa: float | None, at: str
    ) -> FeedbackOutcome:
        body = {"at": at, "agree": agree, "dxa_tscore": dxa}
        return FeedbackOutcome(rid, "c1", "2025-01", refer, at, body)

    outcomes = [
        out("tp", True, True, None, "2025-01-02"),
        out("tp", True, None, -2.9, "2025-01-20"),  # DXA later: the opinion stays
        out("fn", False, False, -2.5, "2025-01-03"),  # -2.5 is osteoporosis (WHO: <=)
        out("tn", False, True, -1.0, "2025-01-04"),
        out("fp", True, True, -3.0, "2025-01-05"),
        out("fp", True, False, -2.0, "2025-01-09"),  # corrected: the latest wins
    ]
    s = summarise([("c1", "2025-01", 10), ("c2", "2025-02", 3)], outcomes)
    (row,) = [r for r in s["rows"] if r["site_id"] == "c1"]
    assert (row["results"], row["opinions"], row["agree"], row["disagree"]) == (10, 4, 2, 2)
    assert (row["tp"], row["fn"], row["tn"], row["fp"]) == (1, 1, 1, 1)
    assert row["sensitivity"]["value"] == 0.5 and row["sensitivity"]["n"] == 2
    assert row["sensitivity"]["small_n"] and MIN_N > 2
    assert s["overall"]["results"] == 13 and s["overall"]["specificity"]["k"] == 1
    empty = [r for r in s["rows"] if r["site_id"] == "c2"][0]
    assert empty["sensitivity"] == {
        "k": 0,
        "n": 0,
        "value": None,
        "ci95": None,
        "small_n": True,
    }
    assert "Small n is not evidence" in s["note"]


# --- batched ingest --------------------------------------------------------------------------


class _Down(SqliteStore):
    """A store whose database cannot take writes."""

    def write(self, items: Sequence[Write]) -> list[bool]:
        raise StoreError("the database is down")


def test_ingest_commits_a_batch_once_and_answers_per_message(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'd.sqlite'}")
    counters = Counters()
    ingest = Ingest(store, counters)
    r = make_result()
    t = topic(SITE, "edge-01", "result")
    batch = [
        (t, json.dumps(r).encode()),
        (t, b"not json"),
        (t, json.dumps(r).encode()),  # redelivered within the same batch
        (t, json.dumps(make_result()).encode()),
    ]
    assert ingest.handle(batch) == [True, True, True, True]
    assert counters.get("commits") == 1
    assert counters.get("result_stored") == 2 and counters.get("result_duplicate") == 1
    assert counters.get("rejected_json") == 1
    down = _Down(tmp_path / "down.sqlite")
    # The database is down: the valid message and the invalid one (its dead letter cannot be
    # written either) both wait for redelivery.
    assert Ingest(down, counters).handle(batch[:2]) == [False, False]
    assert counters.get("store_errors") == 1
    down.close()
    store.close()


class _Client:
    def __init__(self) -> None:
        self.acked: list[int] = []

    def ack(self, mid: int, qos: int) -> None:
        self.acked.append(mid)


def test_subscriber_acknowledges_in_order_only_what_was_handled() -> None:
    answers = [[True, True], [True, False], [True]]
    seen: list[list[str]] = []

    def handler(msgs: Any) -> list[bool]:
        seen.append([t for t, _ in msgs])
        return answers[len(seen) - 1]

    settings = BrokerSettings(host="127.0.0.1", port=1, client_id="x")
    sub = Subscriber(settings, handler, max_batch=2)
    sub._pending = [(mid, 1, f"t{mid}", b"") for mid in (1, 2, 3, 4, 5)]
    client = _Client()
    sub._flush(client)
    # Batches of two; the 4th failed: neither it nor the 5th is acknowledged (MQTT 4.6 order).
    assert seen == [["t1", "t2"], ["t3", "t4"]]
    assert client.acked == [1, 2, 3] and sub._reset and sub._pending == []


# --- CSV -------------------------------------------------------------------------------------


def _csv(body: bytes) -> list[dict[str, str]]:
    assert body.startswith(b"\xef\xbb\xbf")
    return list(csv.DictReader(io.StringIO(body[3:].decode())))


def test_csv_export_filters_pages_and_defuses_formulas(
    tmp_path: Path, token_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export, "PAGE", 3)  # several pages even for a few rows
    cfg = make_config(None, f"sqlite:///{tmp_path / 'd.sqlite'}", token_file)
    store = open_store(cfg.dashboard.db_url)
    same_time = "2025-04-01T08:00:00Z"  # a tie on created_at: the cursor must still page
    rows = [result(created_at=same_time, tscore=-1.5 - i / 10) for i in range(7)]
    evil = result(device='=HYPERLINK("http://x")', created_at="2025-04-02T08:00:00Z")
    other = result(site="clinic-002", cls="normal", refer=False, created_at=same_time)
    put(store, *rows, evil, other, fb(rows[0], False, -2.7))
    store.close()
    d = start_dashboard(cfg, "unused")
    try:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        code, h, body = http_get(d.web.port, f"/api/results.csv?site={SITE}", auth)
        assert code == 200 and h["content-type"].startswith("text/csv")
        assert h["content-disposition"].startswith('attachment; filename="osteofy-results-')
        got = _csv(body)
        assert tuple(got[0]) == export.COLUMNS
        assert len(got) == 8 and len({g["result_id"] for g in got}) == 8
        assert got[0]["device_id"] == '\'=HYPERLINK("http://x")'  # text: defused
        by_id = {g["result_id"]: g for g in got}
        first = by_id[rows[0].result_id]
        assert first["tscore_estimate"] == "-1.50"  # a number stays a number
        assert first["clinician_agrees"] == "0" and first["dxa_tscore"] == "-2.7"
        assert first["patient_key_prefix"] == rows[0].patient_key[:8]  # type: ignore[index]
        text = body.decode()
        assert rows[0].patient_key not in text and rows[0].study_key not in text  # type: ignore[operator]
        assert "study_key" not in text
        _, _, body = http_get(d.web.port, "/api/results.csv?class=normal&limit=5", auth)
        assert [g["result_id"] for g in _csv(body)] == [other.result_id]
        _, _, body = http_get(d.web.port, "/api/results.csv?site=nowhere", auth)
        assert _csv(body) == []
        assert http_get(d.web.port, "/api/results.csv")[0] == 401  # the token guards it too
        assert http_get(d.web.port, "/api/results.csv?class=x", auth)[0] == 400
    finally:
        d.close()


def test_csv_cells() -> None:
    for cell in ("=1+1", "+1", "-1", "@SUM(A1)", "\tx", "\rx"):
        assert export.text(cell) == "'" + cell
    assert export.text("clinic-001") == "clinic-001" and export.text(None) == ""
    assert export.number(-2.5, 2) == "-2.50"


# --- pages and API over HTTP -----------------------------------------------------------------


def test_results_page_filters_and_acceptance_views(tmp_path: Path, token_file: Path) -> None:
    cfg = make_config(None, f"sqlite:///{tmp_path / 'd.sqlite'}", token_file)
    store = open_store(cfg.dashboard.db_url)
    a = result(created_at="2025-01-10T10:00:00Z", cls="osteoporosis")
    b = result(created_at="2025-02-10T10:00:00Z", cls="normal", refer=False)
    put(store, a, b, fb(a, True, -2.9), fb(b, True, -0.4))
    store.close()
    users = tmp_path / "users"
    users.write_text(f"ana:{hash_password('correct horse', 1000)}\n")
    d = start_dashboard(cfg, "unused", users_file=users)
    port = d.web.port
    try:
        _, h, _ = http_post(port, "/login", "user=ana&password=correct+horse")
        cookie = {"Cookie": h["set-cookie"].split(";")[0]}
        code, _, body = http_get(port, "/results?class=normal&from=2025-02-01", cookie)
        page = body.decode()
        assert code == 200 and b.result_id in page and a.result_id not in page
        assert 'data-feed="/api/results?class=normal&amp;from=2025-02-01&amp;limit=50"' in page
        assert 'href="/api/results.csv?class=normal&amp;from=2025-02-01"' in page
        assert '<option value="normal" selected>' in page
        assert http_get(port, "/results?from=yesterday", cookie)[0] == 400

        code, _, body = http_get(port, "/acceptance", cookie)
        page = body.decode()
        assert code == 200 and "Small n is not evidence" in page
        assert "Clinic clinic-001 by month" in page and "2025-01" in page and "small n" in page
        got = json.loads(http_get(port, "/api/acceptance", cookie)[2])
        assert got["overall"]["tp"] == 1 and got["overall"]["tn"] == 1
        assert got["overall"]["agreement"]["value"] == 1.0
        assert [r["period"] for r in got["rows"]] == ["2025-01", "2025-02"]
        got = json.loads(http_get(port, "/api/acceptance?to=2025-01-31", cookie)[2])
        assert got["overall"]["results"] == 1
    finally:
        d.close()


def test_no_anonymous_pages_unless_opened_and_the_api_rule(tmp_path: Path) -> None:
    """No users file: pages refuse (and say how to make a user); ``open_pages`` opens them
    to loopback; with no token file the API answers loopback without one (the demo)."""
    cfg = make_config(None, f"sqlite:///{tmp_path / 'd.sqlite'}", None)
    d = start_dashboard(cfg, "unused")
    try:
        for path in ("/", "/results", "/acceptance", "/login"):
            code, _, body = http_get(d.web.port, path)
            assert code == 403, path
            assert b"python -m dashboard.auth NAME &gt;&gt; users" in body
        assert http_post(d.web.port, "/login", "user=a&password=b")[0] == 403
        assert http_get(d.web.port, "/api/results")[0] == 200
    finally:
        d.close()
    d = start_dashboard(cfg, "unused", open_pages=True)
    try:
        code, _, body = http_get(d.web.port, "/acceptance")
        assert code == 200 and b"open to anyone on this machine" in body
    finally:
        d.close()
    users = tmp_path / "users"
    users.write_text(f"ana:{hash_password('correct horse', 1000)}\n")
    d = start_dashboard(cfg, "unused", users_file=users, open_pages=True)  # users win
    try:
        assert http_get(d.web.port, "/")[0] == 303
    finally:
        d.close()


def test_regression_browser_login_refused_as_cross_site_under_no_referrer(
    tmp_path: Path,
) -> None:
    """Under ``Referrer-Policy: no-referrer`` browsers send ``Origin: null`` with form POSTs,
    so every real login was refused as cross-site (found by the Chromium acceptance test).
    The policy is now ``same-origin``; an ``Origin: null`` POST is still refused."""
    users = tmp_path / "users"
    users.write_text(f"ana:{hash_password('correct horse', 1000)}\n")
    d = start_dashboard(make_config(None, f"sqlite:///{tmp_path / 'd.sqlite'}", None), "x", users)
    port = d.web.port
    try:
        code, h, _ = http_get(port, "/login")
        assert code == 200 and h["referrer-policy"] == "same-origin"
        form = "user=ana&password=correct+horse"
        same = {"Origin": f"http://127.0.0.1:{port}", "Host": f"127.0.0.1:{port}"}
        assert http_post(port, "/login", form, same)[0] == 303
        assert http_post(port, "/login", form, {"Origin": "null"})[0] == 403
    finally:
        d.close()
