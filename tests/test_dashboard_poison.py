"""Issue #20: poison messages never block intake, on both stores.

Every hostile or odd payload ends stored (exactly) or dead-lettered with a one-line reason
within a second, the good message behind it is stored, and every view — pages and
``/api/results`` with class filters — keeps answering 200. PostgreSQL cases skip with the
reason where no server answers on 127.0.0.1:5432; the MQTT case runs its own Mosquitto.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
import test_dashboard as base
from test_dashboard import (
    DEVICE,
    SITE,
    TOKEN,
    http_get,
    js,
    make_config,
    make_result,
    publish,
    start_dashboard,
    status,
    wait_until,
)

from dashboard import ingest as ingest_module
from dashboard.ingest import Ingest, print_dead_letters, replay
from dashboard.intake import Counters
from dashboard.query import ResultFilter
from dashboard.store import Store, open_store
from edge.messages import topic
from osteofy.cli import main

db_url = base.db_url
pg_url = base.pg_url
broker = base.broker
token_file = base.token_file

RESULT = topic(SITE, DEVICE, "result")
STATUS = topic(SITE, DEVICE, "status")
HEARTBEAT = topic(SITE, DEVICE, "heartbeat")


def result_with(**fields: object) -> bytes:
    return js({**make_result(), **fields})


def result_text(old: str, new: str) -> bytes:
    """A result whose JSON text has ``old`` replaced by ``new`` (escapes the encoder avoids)."""
    text = json.dumps(make_result())
    assert old in text, old
    return text.replace(old, new, 1).encode()


def nested(depth: int) -> object:
    out: object = 1.0
    for _ in range(depth):
        out = {"x": out}
    return out


def heartbeat_text(**fields: object) -> bytes:
    return js({**base.heartbeat(), **fields})


# (name, topic, payload, expected outcome, category of the dead letter)
CASES: list[tuple[str, str, bytes, str, str | None]] = [
    (
        "year 10000 in UTC",
        RESULT,
        result_with(created_at="9999-12-31T23:59:59-12:00"),
        "dead",
        "timestamp",
    ),
    (
        "year 0 in UTC",
        RESULT,
        result_with(created_at="0001-01-01T00:00:00+01:00"),
        "dead",
        "timestamp",
    ),
    ("last second of 9999", RESULT, result_with(created_at="9999-12-31T23:59:59Z"), "stored", None),
    (
        "year 1 west of UTC",
        RESULT,
        result_with(created_at="0001-01-01T00:00:00-12:00"),
        "stored",
        None,
    ),
    ("+14:00", RESULT, result_with(created_at="2026-06-01T02:00:00+14:00"), "stored", None),
    ("naive time (UTC)", RESULT, result_with(created_at="2026-06-01T12:00:00"), "stored", None),
    ("30 February", RESULT, result_with(created_at="2026-02-30T00:00:00Z"), "dead", "timestamp"),
    (
        "heartbeat at year 10000",
        HEARTBEAT,
        heartbeat_text(at="9999-12-31T23:00:00-05:00"),
        "dead",
        "timestamp",
    ),
    ("surrogate in model name", RESULT, result_text('"hand-v1"', '"hand-\\ud800"'), "dead", "text"),
    ("surrogate in a fact", RESULT, result_text('["bmi"]', '["\\udfff"]'), "dead", "text"),
    ("surrogate in a key", RESULT, result_text('"total"', '"t\\ud83d"'), "dead", "text"),
    (
        "surrogate in status",
        STATUS,
        js(status("online")).replace(b'"problems": []', b'"problems": ["\\ud800"]'),
        "dead",
        "text",
    ),
    ("NUL in model version", RESULT, result_text('"1.2.0"', '"1.2\\u0000"'), "dead", "text"),
    ("NUL in a key", RESULT, result_text('"total"', '"to\\u0000tal"'), "dead", "text"),
    (
        "a real pair (emoji)",
        RESULT,
        result_text('"hand-v1"', '"hand-\\ud83d\\ude00"'),
        "stored",
        None,
    ),
    ("NaN", RESULT, result_text("-2.8", "NaN"), "dead", "json"),
    ("Infinity", RESULT, result_text("-2.8", "-Infinity"), "dead", "json"),
    ("1e400", RESULT, result_text("-2.8", "-1e400"), "dead", "number"),
    ("integer past 2**53", HEARTBEAT, heartbeat_text(outbox_depth=2**60), "dead", "number"),
    (
        "5000 digits",
        HEARTBEAT,
        heartbeat_text().replace(b'"outbox_depth": 9000', b'"outbox_depth": ' + b"9" * 5000),
        "dead",
        "number",
    ),
    ("deep nesting", RESULT, result_with(timings_ms=nested(40)), "dead", "json"),
    (
        "oversized",
        RESULT,
        result_with(timings_ms={f"t{i}": 1.0 for i in range(30_000)}),
        "dead",
        "too_large",
    ),
    (
        "duplicate key",
        RESULT,
        result_text('"body_part": "hand"', '"body_part": "hand", "body_part": "hip"'),
        "dead",
        "json",
    ),
    ("unknown schema version", RESULT, result_with(schema="osteofy.result.v2"), "dead", "version"),
    ("age as a string", RESULT, result_with(age_years="71"), "dead", "schema"),
    ("prediction as a list", RESULT, result_with(prediction=[]), "dead", "schema"),
    ("device differs from topic", RESULT, js(make_result(device="edge-99")), "dead", "mismatch"),
    (
        "unknown device",
        topic(SITE, "edge-never-seen", "result"),
        js(make_result(device="edge-never-seen")),
        "stored",
        None,
    ),
    ("not UTF-8", RESULT, b'{"result_id": "\xff\xfe"}', "dead", "json"),
    ("UTF-16", RESULT, json.dumps(make_result()).encode("utf-16"), "dead", "json"),
    ("byte order mark", RESULT, b"\xef\xbb\xbf" + js(make_result()), "dead", "json"),
    ("empty payload", RESULT, b"", "dead", "json"),
    ("random bytes", RESULT, bytes(range(256)), "dead", "json"),
    (
        "line separator kept exactly",
        RESULT,
        result_text('"hand-v1"', '"a\\u2028b\\u0007<script>"'),
        "stored",
        None,
    ),
]


def _run_cases(store: Store) -> Counters:
    counters = Counters()
    ingest = Ingest(store, counters)
    for name, t, payload, expected, category in CASES:
        good = make_result()
        dead_before = store.dead_letter_count()
        started = time.monotonic()
        assert ingest.handle([(t, payload), (RESULT, js(good))]) == [True, True], name
        assert time.monotonic() - started < 1.0, name
        assert store.result(good["result_id"]) is not None, f"{name}: the good one behind"
        if expected == "dead":
            assert store.dead_letter_count() == dead_before + 1, name
            (letter,) = [
                d for d in store.dead_letters(limit=500, raw=True) if d.raw == payload[: 64 * 1024]
            ]
            assert letter.category == category, (name, letter.reason)
            assert letter.reason and "\n" not in letter.reason, name
            assert letter.size == len(payload) and letter.topic == t, name
            assert letter.device_id == t.split("/")[3], name
        else:
            assert store.dead_letter_count() == dead_before, name
            if t.endswith("/result"):
                sent = json.loads(payload)
                kept = store.result(sent["result_id"])
                assert kept is not None and kept.payload["model"] == sent["model"], name
    return counters


def _views_answer(d_port: int) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for path in (
        "/",
        "/results",
        "/results?class=osteoporosis",
        "/results?class=normal",
        "/acceptance",
    ):
        code, _, body = http_get(d_port, path)
        assert code == 200, (path, body[:200])
        assert b"<script>" not in body, path
    for path in (
        "/api/results",
        "/api/results?class=osteoporosis",
        "/api/results?class=osteopenia&site=" + SITE,
        "/api/acceptance",
        "/api/dead-letters",
        "/api/stats",
        "/api/devices",
        "/api/results.csv?class=osteoporosis",
    ):
        code, _, body = http_get(d_port, path, auth)
        assert code == 200, (path, body[:200])


def test_every_poison_message_is_stored_or_dead_lettered_and_views_answer(
    db_url: str, token_file: Path
) -> None:
    store = open_store(db_url)
    try:
        counters = _run_cases(store)
        dead = sum(c[3] == "dead" for c in CASES)
        assert store.dead_letter_count() == dead
        assert counters.get("dead_lettered") == dead
        # Redelivery of a dead letter: one row, counted twice.
        Ingest(store, counters).handle([(CASES[0][1], CASES[0][2])])
        assert store.dead_letter_count() == dead
        assert max(d.times for d in store.dead_letters(limit=500)) == 2
    finally:
        store.close()
    d = start_dashboard(make_config(None, db_url, token_file), "unused", open_pages=True)
    try:
        _views_answer(d.web.port)
        _, _, body = http_get(d.web.port, "/")
        assert b"Dead letters" in body and b"timestamp: created_at is outside years 1..9999" in body
        listed = base.api(d.web.port, "/api/dead-letters?limit=500")
        assert listed["total"] == dead and len(listed["dead_letters"]) == dead
        key = listed["dead_letters"][0]["key"]
        one = base.api(d.web.port, f"/api/dead-letters/{key}")
        assert "raw_base64" in one
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert http_get(d.web.port, "/api/dead-letters?limit=0", auth)[0] == 400
        assert http_get(d.web.port, "/api/dead-letters")[0] == 401  # the API's own access rule
        assert base.api(d.web.port, "/api/stats")["dead_letters"] == dead
    finally:
        d.close()


def test_a_poison_message_in_the_middle_of_a_batch_refuses_nothing_else(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'd.sqlite'}")
    counters = Counters()
    good = [make_result() for _ in range(3)]
    batch = [
        (RESULT, js(good[0])),
        (RESULT, result_with(created_at="9999-12-31T23:59:59-12:00")),
        (RESULT, js(good[1])),
        (RESULT, result_text('"hand-v1"', '"\\ud800"')),
        (RESULT, js(good[2])),
    ]
    assert Ingest(store, counters).handle(batch) == [True] * 5
    assert counters.get("commits") == 1  # still one commit for the batch
    assert all(store.result(g["result_id"]) for g in good)
    assert store.dead_letter_count() == 2
    store.close()


def test_what_the_database_refuses_is_dead_lettered_item_by_item(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defence in depth: a lone surrogate that got past intake is refused by the database
    (UnicodeEncodeError) — the batch is retried item by item, the rest stored."""
    import dashboard.intake as intake

    monkeypatch.setattr(intake, "loads", lambda payload: json.loads(payload))
    store = open_store(db_url)
    try:
        counters = Counters()
        good = make_result()
        bad = result_text('"hand-v1"', '"\\ud800"')
        assert Ingest(store, counters).handle([(RESULT, bad), (RESULT, js(good))]) == [True, True]
        assert store.result(good["result_id"]) is not None
        (letter,) = store.dead_letters()
        assert letter.category == "store" and "UnicodeEncodeError" in letter.reason
    finally:
        store.close()


def test_a_result_stored_before_the_fix_with_nul_does_not_break_class_filters(
    db_url: str, token_file: Path
) -> None:
    """The issue's 503: a payload holding "\\u0000", stored by an older release, made
    PostgreSQL's jsonb refuse every class-filtered view. Such rows are written here as the
    old release did (no class/refer columns), then the store is opened again."""
    store = open_store(db_url)
    r = make_result()
    r["model"]["version"] = "1.2\x00"
    payload = json.dumps(r, separators=(",", ":"), ensure_ascii=False)
    sql = (
        "INSERT INTO results (result_id, site_id, device_id, created_at, received_at, payload) "
        "VALUES (?, ?, ?, ?, ?, ?)"
    )
    store._write([(sql, (r["result_id"], SITE, DEVICE, r["created_at"], r["created_at"], payload))])  # type: ignore[attr-defined]
    store._write([("UPDATE results SET class = NULL, refer = NULL", ())])  # type: ignore[attr-defined]
    store.close()
    store = open_store(db_url)  # migration: the backfill decodes it in Python
    try:
        assert [x["result_id"] for x in store.results(ResultFilter(cls="osteoporosis"))] == [
            r["result_id"]
        ]
    finally:
        store.close()
    d = start_dashboard(make_config(None, db_url, token_file), "unused", open_pages=True)
    try:
        _views_answer(d.web.port)
    finally:
        d.close()


def test_replay_stores_what_passes_now_and_keeps_what_does_not(
    db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store = open_store(db_url)
    try:
        good = make_result()
        ingest = Ingest(store, Counters())
        real = ingest_module.parse

        def refuse_all(t: str, p: bytes):  # noqa: ANN202 - a check that was wrong
            raise ingest_module.Rejected("schema", "a check that was too strict")

        monkeypatch.setattr(ingest_module, "parse", refuse_all)
        ingest.handle([(RESULT, js(good)), (RESULT, b"not json")])
        assert store.dead_letter_count() == 2 and store.result(good["result_id"]) is None
        monkeypatch.setattr(ingest_module, "parse", real)  # the fix
        outcome = replay(store)
        assert outcome.stored == 1 and len(outcome.still_bad) == 1 and outcome.truncated == 0
        assert store.result(good["result_id"]) is not None
        (left,) = store.dead_letters()
        assert left.raw is None and left.category == "schema"
        assert print_dead_letters(store, replay_them=True) == 1  # one still refused
        out = capsys.readouterr().out
        assert "0 stored, 1 still refused" in out and "1 dead letter(s)" in out
    finally:
        store.close()
    monkeypatch.setenv("OSTEOFY_DASHBOARD__DB_URL", db_url)
    assert main(["dashboard", "dead-letters", "--replay"]) == 1
    assert "still refused" in capsys.readouterr().out


def test_poison_between_good_messages_through_mosquitto(
    broker: int, tmp_path: Path, token_file: Path
) -> None:
    cfg = make_config(broker, f"sqlite:///{tmp_path / 'd.sqlite'}", token_file)
    d = start_dashboard(cfg, f"dash-{uuid.uuid4().hex[:6]}", open_pages=True)
    try:
        good = [make_result() for _ in range(4)]
        poison = [
            result_with(created_at="9999-12-31T23:59:59-12:00"),
            result_text('"hand-v1"', '"\\ud800"'),
            result_text('"1.2.0"', '"\\u0000"'),
        ]
        messages = [(RESULT, js(good[0]), 1, False)]
        for p, g in zip(poison, good[1:], strict=True):
            messages += [(RESULT, p, 1, False), (RESULT, js(g), 1, False)]
        publish(broker, messages)
        assert wait_until(lambda: d.counters.get("result_stored") == 4, 10)
        assert wait_until(lambda: d.store.dead_letter_count() == 3, 5)
        assert all(d.store.result(g["result_id"]) for g in good)
        assert d.counters.get("store_errors") == 0
        _views_answer(d.web.port)
    finally:
        d.close()
