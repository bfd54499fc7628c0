"""The central dashboard: intake rules, the two stores, access, pages, and real MQTT round trips.

MQTT tests run a private Mosquitto (one per test, so persistent sessions and shared groups of
one test never leak into another) on a free 127.0.0.1 port; PostgreSQL tests use a throwaway
database on 127.0.0.1:5432. Each skips with its reason where the server is absent. Every wait
is bounded.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import pytest

from dashboard.auth import Access, hash_password, load_users
from dashboard.ingest import Ingest
from dashboard.intake import MAX_PNG_BYTES, Counters, Rejected, parse, utc_key
from dashboard.mqtt import BrokerSettings, Subscriber, broker_settings, one_by_one
from dashboard.query import ResultFilter
from dashboard.service import Dashboard, serve
from dashboard.store import Store, open_store
from dashboard.store_sqlite import SqliteStore
from edge.messages import Feedback, Heartbeat, Status, topic
from edge.result import (
    Contribution,
    Explanation,
    ModelInfo,
    Peak,
    Prediction,
    Probs,
    Quality,
    Result,
    utc_now,
)
from osteofy.config import Config
from osteofy.errors import UsageError
from osteofy.mosquitto import MOSQUITTO, Mosquitto, free_port

PATIENT_KEY = "7e3f" + "a1" * 30
TOKEN = "test-token-0123456789abcdef"
SITE, DEVICE = "clinic-001", "edge-01"


# --- builders --------------------------------------------------------------------------------


def make_result(site: str = SITE, device: str = DEVICE, created_at: str | None = None) -> dict:
    return Result(
        result_id=str(uuid.uuid4()),
        device_id=device,
        site_id=site,
        created_at=created_at or utc_now(),
        patient_key=PATIENT_KEY,
        study_key="b2" * 32,
        age_years=71.0,
        sex="F",
        body_part="hand",
        model=ModelInfo(
            name="hand-v1",
            version="1.2.0",
            sha256="ab" * 32,
            backend="onnxruntime",
            precision="int8",
        ),
        prediction=Prediction(
            class_="osteoporosis",
            probs=Probs(normal=0.1, osteopenia=0.2, osteoporosis=0.7),
            tscore=-2.8,
            refer=True,
        ),
        explanation=Explanation(
            heatmap_class="osteoporosis",
            peaks=[Peak(x=0.4, y=0.6, weight=1.0)],
            clinical=[
                Contribution(factor="prior_fracture", known=True, log_odds=0.8),
                Contribution(factor="bmi", known=False, log_odds=-0.2),
            ],
        ),
        quality=Quality(
            ood_score=1.2,
            ood_threshold=3.0,
            flags=["missing_clinical_facts"],
            missing_facts=["bmi"],
        ),
        timings_ms={"total": 120.0},
    ).payload()


def status(state: str, site: str = SITE, device: str = DEVICE, models: bool = True) -> dict:
    m = [
        {
            "site": "hand",
            "name": "hand-v1",
            "version": "1.2.0",
            "backend": "onnxruntime",
            "precision": "int8",
        }
    ]
    return Status(
        state=state, device_id=device, site_id=site, at=utc_now(), models=m if models else []
    ).model_dump(mode="json", by_alias=True)


def heartbeat(site: str = SITE, device: str = DEVICE, depth: int = 9000) -> dict:
    return Heartbeat(
        device_id=device,
        site_id=site,
        at=utc_now(),
        uptime_s=50.0,
        outbox_depth=depth,
        outbox_limit=10000,
        outbox_alarm=depth >= 8000,
        oldest_queued_age_s=300.0,
        disk_free_mb=2048.0,
    ).model_dump(mode="json", by_alias=True)


def feedback(result_id: str, site: str = SITE, device: str = DEVICE) -> dict:
    return Feedback(
        feedback_id=str(uuid.uuid4()),
        result_id=result_id,
        device_id=device,
        site_id=site,
        at=utc_now(),
        agree=False,
        dxa_tscore=-2.1,
    ).model_dump(mode="json", by_alias=True)


def png_bytes() -> bytes:
    ok, buf = cv2.imencode(".png", np.full((16, 16, 3), 128, np.uint8))
    assert ok
    return buf.tobytes()


def js(obj: dict) -> bytes:
    return json.dumps(obj).encode()


# --- helpers ---------------------------------------------------------------------------------


def wait_until(check: Callable[[], object], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return bool(check())


def http_get(
    port: int, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def http_post(
    port: int, path: str, form: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        h = {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})}
        conn.request("POST", path, body=form.encode(), headers=h)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def api(port: int, path: str) -> Any:
    code, _, body = http_get(port, path, {"Authorization": f"Bearer {TOKEN}"})
    assert code == 200, (path, code, body[:200])
    return json.loads(body)


def publish(port: int, messages: list[tuple[str, bytes, int, bool]]) -> None:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", port, keepalive=10)
    c.loop_start()
    try:
        infos = [c.publish(t, p, qos=q, retain=r) for t, p, q, r in messages]
        for info in infos:
            info.wait_for_publish(timeout=5)
            assert info.is_published()
    finally:
        c.disconnect()
        c.loop_stop()


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture()
def broker(tmp_path: Path) -> Iterator[int]:
    """A private Mosquitto on a free loopback port (one per test: no shared state)."""
    if MOSQUITTO is None:
        pytest.skip("Mosquitto is not installed (apt install mosquitto)")
    b = Mosquitto(tmp_path / "broker", max_queued=1000)
    b.start()
    try:
        yield b.port
    finally:
        b.stop()


@pytest.fixture()
def token_file(tmp_path: Path) -> Path:
    p = tmp_path / "api.token"
    p.write_text(TOKEN + "\n")
    return p


def _pg_admin():  # noqa: ANN202 - psycopg connection or a skip
    psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed ('.[dashboard]')")
    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=1).close()
    except OSError as exc:
        pytest.skip(f"no PostgreSQL server answers on 127.0.0.1:5432 ({exc})")
    try:
        return psycopg.connect(
            "postgresql://postgres@127.0.0.1:5432/postgres", connect_timeout=3, autocommit=True
        )
    except psycopg.Error as exc:
        pytest.skip(f"PostgreSQL on 127.0.0.1:5432 refused user postgres ({exc})")


@pytest.fixture()
def pg_url() -> Iterator[str]:
    """A throwaway database, dropped afterwards."""
    admin = _pg_admin()
    name = f"osteofy_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'dashboard.sqlite'}"
    return str(request.getfixturevalue("pg_url"))


def make_config(broker_port: int | None, db_url: str, token: Path | None, port: int = 0) -> Config:
    url = f"mqtt://127.0.0.1:{broker_port}" if broker_port else ""
    return Config(
        mqtt={"url": url, "keepalive_s": 5},
        dashboard={"host": "127.0.0.1", "port": port, "db_url": db_url, "api_token_file": token},
    )


def start_dashboard(
    cfg: Config,
    client_id: str,
    users_file: Path | None = None,
    open_pages: bool = False,
    max_batch: int = 100,
) -> Dashboard:
    broker = None
    if cfg.mqtt.url:
        broker = replace(broker_settings(cfg, client_id), min_backoff_s=0.1, max_backoff_s=0.5)
    d = Dashboard(
        cfg, users_file=users_file, broker=broker, open_pages=open_pages, max_batch=max_batch
    )
    d.start()
    if d.subscriber is not None:
        assert d.subscriber.subscribed.wait(10), "the dashboard did not subscribe"
    return d


# --- intake ----------------------------------------------------------------------------------


def test_parse_accepts_every_kind_of_the_contract() -> None:
    r = make_result()
    assert parse(topic(SITE, DEVICE, "result"), js(r)).kind == "result"
    assert parse(topic(SITE, DEVICE, "status"), js(status("online"))).kind == "status"
    assert parse(topic(SITE, DEVICE, "heartbeat"), js(heartbeat())).kind == "heartbeat"
    assert parse(topic(SITE, DEVICE, "feedback"), js(feedback(r["result_id"]))).kind == "feedback"
    ov = parse(topic(SITE, DEVICE, "overlay", r["result_id"]), png_bytes())
    assert (ov.kind, ov.result_id, ov.site_id, ov.device_id) == (
        "overlay",
        r["result_id"],
        SITE,
        DEVICE,
    )


@pytest.mark.parametrize(
    ("name", "topic_", "payload", "category"),
    [
        ("unknown field", "result", js({**make_result(), "patient_name": "Jane Doe"}), "schema"),
        ("topic/payload device mismatch", "result", js(make_result(device="edge-99")), "mismatch"),
        ("site mismatch", "heartbeat", js(heartbeat(site="clinic-002")), "mismatch"),
        ("not JSON", "status", b"Jane Doe {", "json"),
        ("NaN", "result", js(make_result()).replace(b"-2.8", b"NaN"), "json"),
        ("deep", "status", b"[" * 100_000, "json"),
        ("not UTF-8", "status", b'{"state": "\xff"}', "json"),
        ("too large", "result", b" " * (300 * 1024), "too_large"),
        ("unknown kind", "firmware", b"{}", "topic"),
        ("outside the tree", "../x", b"{}", "topic"),
    ],
)
def test_parse_rejects(name: str, topic_: str, payload: bytes, category: str) -> None:
    t = topic_ if topic_.startswith("..") else topic(SITE, DEVICE, topic_)
    with pytest.raises(Rejected) as exc:
        parse(t, payload)
    assert exc.value.category == category, name
    assert "Jane" not in str(exc.value)  # never payload content


@pytest.mark.parametrize(
    ("payload", "category"),
    [
        (b"GIF89a" + b"\x00" * 100, "png"),
        (png_bytes()[:-12], "png"),  # truncated: no IEND
        (png_bytes()[:-12] + b"\x00" * (MAX_PNG_BYTES) + png_bytes()[-12:], "too_large"),
    ],
)
def test_overlay_must_be_a_complete_png_within_200kb(payload: bytes, category: str) -> None:
    with pytest.raises(Rejected) as exc:
        parse(topic(SITE, DEVICE, "overlay", str(uuid.uuid4())), payload)
    assert exc.value.category == category
    with pytest.raises(Rejected):
        parse(topic(SITE, DEVICE, "overlay", "not-a-uuid"), png_bytes())


def test_ingest_counts_and_logs_rejections_without_content(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = SqliteStore(tmp_path / "d.sqlite")
    counters = Counters()
    ingest = Ingest(store, counters)
    bad = {**make_result(), "patient_name": "Jane Doe"}
    with caplog.at_level(logging.WARNING, logger="dashboard"):
        assert ingest(topic(SITE, DEVICE, "result"), js(bad)) is True  # acked: dropped for good
    assert counters.get("rejected") == counters.get("rejected_schema") == 1
    assert "Jane" not in caplog.text and "patient_name" not in caplog.text
    assert "extra_forbidden" in caplog.text
    late = make_result(created_at="yesterday")
    assert ingest(topic(SITE, DEVICE, "result"), js(late)) is True
    assert counters.get("rejected_timestamp") == 1
    assert store.results() == []
    store.close()


# --- stores ----------------------------------------------------------------------------------


def test_store_contract(db_url: str) -> None:
    """The same behaviour from SQLite and PostgreSQL (skipped without a server)."""
    store: Store = open_store(db_url)
    try:
        old = Result.model_validate(make_result(created_at="2025-01-01T10:00:00Z"))
        new = Result.model_validate(make_result(created_at="2025-01-01T11:00:00+00:00"))
        other = Result.model_validate(make_result(site="clinic-002", device="edge-07"))
        for r in (old, new, other):
            assert store.add_result(r, utc_key(r.created_at), utc_now()) is True
        assert store.add_result(old, utc_key(old.created_at), utc_now()) is False  # again
        ids = [p["result_id"] for p in store.results(ResultFilter(site=SITE, limit=10))]
        assert ids == [new.result_id, old.result_id]
        assert [p["result_id"] for p in store.results(ResultFilter(limit=1))] == [other.result_id]
        assert store.results(ResultFilter(site="nowhere")) == []

        png = png_bytes()
        # An overlay from another device for this result id is not the result's overlay.
        assert store.add_overlay("clinic-002", "edge-07", old.result_id, b"x", utc_now())
        assert store.overlay(old.result_id) is None
        assert store.add_overlay(SITE, DEVICE, old.result_id, png, utc_now()) is True
        assert store.add_overlay(SITE, DEVICE, old.result_id, png, utc_now()) is False
        assert store.overlay(old.result_id) == png

        fb = Feedback.model_validate(feedback(old.result_id))
        assert store.add_feedback(fb, utc_now()) is True
        assert store.add_feedback(fb, utc_now()) is False
        item = store.result(old.result_id)
        assert item is not None and item.has_overlay and len(item.feedback) == 1
        assert item.payload == old.payload()
        assert store.result(str(uuid.uuid4())) is None

        store.set_status(Status.model_validate(status("online")), utc_now())
        store.set_heartbeat(Heartbeat.model_validate(heartbeat()), utc_now())
        store.set_status(Status.model_validate(status("offline", models=False)), utc_now())
        (dev,) = store.devices()
        assert dev["state"] == "offline"
        assert dev["models"][0]["version"] == "1.2.0"  # the Will's empty list keeps the last
        assert dev["heartbeat"]["outbox_depth"] == 9000 and dev["heartbeat"]["outbox_alarm"]
    finally:
        store.close()


def test_open_store_rejects_unknown_urls(tmp_path: Path) -> None:
    for url in ("mysql://x/y", "sqlite:///", "dashboard.sqlite"):
        with pytest.raises(UsageError):
            open_store(url)


# --- access ----------------------------------------------------------------------------------


def test_users_file_and_tokens(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text(f"# staff\nana:{hash_password('correct horse', 1000)}\n")
    access = Access(TOKEN, load_users(users))
    assert access.login("127.0.0.1", "ana", "correct horse") is not None
    assert access.login("127.0.0.1", "ana", "wrong") is None
    assert access.login("127.0.0.1", "bob", "correct horse") is None
    assert access.bearer_ok(f"Bearer {TOKEN}") and not access.bearer_ok("Bearer nope")
    assert not access.api_allowed("127.0.0.1", None, None)  # a token is configured
    assert Access(None, None).api_allowed("127.0.0.1", None, None)  # open: loopback only
    assert not Access(None, None).api_allowed("10.0.0.8", None, None)
    users.write_text("ana:md5$secret-hash\n")
    with pytest.raises(UsageError, match="line 1") as exc:
        load_users(users)
    assert "secret" not in str(exc.value)


def test_login_protects_pages_and_api(tmp_path: Path, token_file: Path) -> None:
    users = tmp_path / "users"
    users.write_text(f"ana:{hash_password('correct horse', 1000)}\n")
    cfg = make_config(None, f"sqlite:///{tmp_path / 'd.sqlite'}", token_file)
    d = start_dashboard(cfg, "unused", users_file=users)
    port = d.web.port
    try:
        code, h, _ = http_get(port, "/results")
        assert code == 303 and h["location"] == "/login?next=%2Fresults"
        assert http_get(port, "/api/results")[0] == 401
        code, _, body = http_post(port, "/login", "user=ana&password=nope&next=/results")
        assert code == 401 and b"Wrong name or password" in body
        code, _, _ = http_post(
            port, "/login", "user=ana&password=correct+horse", {"Origin": "http://evil.example"}
        )
        assert code == 403
        code, h, _ = http_post(port, "/login", "user=ana&password=correct+horse&next=//evil")
        assert code == 303 and h["location"] == "/"
        assert "HttpOnly" in h["set-cookie"] and "SameSite=Strict" in h["set-cookie"]
        cookie = {"Cookie": h["set-cookie"].split(";")[0]}
        code, _, body = http_get(port, "/", cookie)
        assert code == 200 and b"Log out" in body and b"open to anyone" not in body
        assert http_get(port, "/api/devices", cookie)[0] == 200  # the pages' own polling
        csrf = re.search(rb'name="csrf" value="([^"]+)"', body)
        assert csrf is not None
        assert http_post(port, "/logout", "csrf=wrong", cookie)[0] == 403
        code, h, _ = http_post(port, "/logout", "csrf=" + csrf.group(1).decode(), cookie)
        assert code == 303
        assert http_get(port, "/", cookie)[0] == 303  # the session is gone
    finally:
        d.close()


def test_open_mode_serves_loopback_with_a_banner(tmp_path: Path, token_file: Path) -> None:
    cfg = make_config(None, f"sqlite:///{tmp_path / 'd.sqlite'}", token_file)
    store = open_store(cfg.dashboard.db_url)
    evil = make_result(device="<script>alert(1)</script>")
    store.add_result(Result.model_validate(evil), utc_now(), utc_now())
    store.close()
    d = start_dashboard(cfg, "unused", open_pages=True)
    port = d.web.port
    try:
        code, h, body = http_get(port, "/results")
        assert code == 200 and b"open to anyone on this machine" in body
        assert b"<script>alert" not in body and b"&lt;script&gt;alert(1)" in body
        assert h["content-security-policy"].startswith("default-src 'self'")
        assert "'unsafe-inline'" not in h["content-security-policy"]
        assert h["x-content-type-options"] == "nosniff" and h["x-frame-options"] == "DENY"
        # The token still guards the API; the page's session lets its script poll.
        assert http_get(port, "/api/results")[0] == 401
        cookie = {"Cookie": h["set-cookie"].split(";")[0]}
        assert http_get(port, "/api/results", cookie)[0] == 200
        assert http_get(port, "/api/results?limit=0", cookie)[0] == 400
        assert http_get(port, "/api/results?site=a%2Bb", cookie)[0] == 400
        assert http_get(port, "/api/results?" + "a=1&" * 30, cookie)[0] == 400
        assert http_get(port, "/results/../../etc/passwd")[0] == 404
        code, h, body = http_get(port, "/static/app.js")
        assert code == 200 and h["content-type"].startswith("text/javascript")
        assert b"innerHTML" not in body
    finally:
        d.close()


def test_broker_settings_from_config(tmp_path: Path) -> None:
    pw = tmp_path / "mqtt.password"
    pw.write_text("s3cret\n")
    tls = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "c.pem", "key": tmp_path / "k.pem"}
    for path in tls.values():
        path.write_text("PEM\n")  # read by the TLS layer only when connecting
    cfg = Config(
        mqtt={"url": "mqtts://127.0.0.1", "tls": tls, "username": "dash", "password_file": pw}
    )
    s = broker_settings(cfg)
    assert (s.host, s.port, s.tls, s.username, s.password) == (
        "127.0.0.1",
        8883,
        True,
        "dash",
        "s3cret",
    )
    assert s.ca == tls["ca"] and s.cert == tls["cert"] and s.key == tls["key"]
    assert s.client_id == f"osteofy-dashboard-{socket.gethostname()}-8090"  # stable per instance
    assert broker_settings(cfg, "dash-7").client_id == "dash-7"
    with pytest.raises(UsageError, match="not mqtts"):
        broker_settings(Config(mqtt={"url": "mqtt://127.0.0.1", "tls": tls}))
    with pytest.raises(UsageError, match="mqtt.tls.ca: no such file"):
        broker_settings(Config(mqtt={"url": "mqtts://127.0.0.1", "tls": {"ca": tmp_path / "no"}}))
    with pytest.raises(UsageError, match="password_file"):
        broker_settings(Config(mqtt={"password_file": tmp_path / "missing"}))


def test_subscriptions_plain_by_default_shared_only_in_a_configured_group() -> None:
    settings = BrokerSettings(host="127.0.0.1", port=1, client_id="x")
    plain = Subscriber(settings, lambda t, p: True)
    assert [f for f, _ in plain._filters()] == ["osteofy/v1/+/+/#"]
    sub = Subscriber(settings, lambda t, p: True, group="central")
    # Shared subscriptions get no retained messages (MQTT 5, 4.8.2): "status" also unshared.
    assert [f for f, _ in sub._filters()] == [
        "$share/central/osteofy/v1/+/+/#",
        "osteofy/v1/+/+/status",
    ]
    sub.protocol = 3
    assert [f for f, _ in sub._filters()] == ["osteofy/v1/+/+/#"]
    with pytest.raises(ValueError):
        Config(dashboard={"shared_group": "a/b"})  # a topic level of its own, nothing else


# --- MQTT round trips ------------------------------------------------------------------------


def _page_is_clean(body: bytes, port: int) -> None:
    text = body.decode()
    for url in re.findall(r"https?://[^\s\"'<>]+", text):
        assert url.startswith(f"http://127.0.0.1:{port}"), url  # no external asset
    assert PATIENT_KEY not in text  # a short prefix at most
    assert "<script>" not in text and "style=" not in text  # nothing inline for the CSP


def test_round_trip_through_mosquitto(broker: int, tmp_path: Path, token_file: Path) -> None:
    # A device that was online before the dashboard started: its retained status is replayed.
    publish(
        broker,
        [(topic(SITE, "edge-02", "status"), js(status("online", device="edge-02")), 1, True)],
    )
    cfg = make_config(broker, f"sqlite:///{tmp_path / 'd.sqlite'}", token_file)
    d = start_dashboard(cfg, "dash-a", open_pages=True)
    port = d.web.port
    try:
        assert wait_until(
            lambda: any(x["device_id"] == "edge-02" for x in api(port, "/api/devices"))
        )

        # The device: a Last Will on its status topic, then "online" (retained).
        dev = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=DEVICE, protocol=mqtt.MQTTv5)
        dev.will_set(topic(SITE, DEVICE, "status"), js(status("offline", models=False)), 1, True)
        dev.connect("127.0.0.1", broker, keepalive=30)
        dev.loop_start()
        dev.publish(topic(SITE, DEVICE, "status"), js(status("online")), 1, True).wait_for_publish(
            5
        )

        r1, r2 = make_result(), make_result(created_at="2030-01-01T00:00:00Z")
        publish(
            broker,
            [
                (topic(SITE, DEVICE, "result"), js(r1), 1, False),
                (topic(SITE, DEVICE, "result"), js(r1), 1, False),  # at-least-once: again
                (topic(SITE, DEVICE, "overlay", r1["result_id"]), png_bytes(), 1, False),
                (topic(SITE, DEVICE, "heartbeat"), js(heartbeat()), 0, False),
                (topic(SITE, DEVICE, "feedback"), js(feedback(r1["result_id"])), 1, False),
                (topic(SITE, DEVICE, "result"), js({**make_result(), "extra": 1}), 1, False),
                (topic(SITE, DEVICE, "result"), js(make_result(device="edge-09")), 1, False),
                (topic(SITE, DEVICE, "result"), js(r2), 1, False),
            ],
        )
        assert wait_until(lambda: d.counters.get("result_stored") == 2)
        assert wait_until(lambda: d.counters.get("feedback_stored") == 1)
        assert d.counters.get("result_duplicate") == 1
        assert d.counters.get("rejected_schema") == 1 and d.counters.get("rejected_mismatch") == 1
        assert api(port, "/api/stats")["counts"]["rejected"] == 2

        results = api(port, "/api/results")
        assert [r["result_id"] for r in results] == [r2["result_id"], r1["result_id"]]
        assert results == [r2, r1]  # verbatim contract objects
        assert len(api(port, f"/api/results?site={SITE}&limit=1")) == 1
        detail = api(port, f"/api/results/{r1['result_id']}")
        assert detail["overlay"] == f"/api/overlay/{r1['result_id']}"
        assert detail["feedback"][0]["dxa_tscore"] == -2.1
        code, h, body = http_get(
            port, f"/api/overlay/{r1['result_id']}", {"Authorization": f"Bearer {TOKEN}"}
        )
        assert code == 200 and h["content-type"] == "image/png" and body == png_bytes()

        # The Bearer token: 401 without, 200 with.
        code, h, _ = http_get(port, "/api/results")
        assert code == 401 and h["www-authenticate"].startswith("Bearer")
        assert http_get(port, "/api/devices", {"Authorization": "Bearer wrong"})[0] == 401

        assert wait_until(
            lambda: (
                {x["device_id"]: x["state"] for x in api(port, "/api/devices")}.get(DEVICE)
                == "online"
            )
        )
        devs = {x["device_id"]: x for x in api(port, "/api/devices")}
        assert devs[DEVICE]["heartbeat"]["outbox_alarm"] is True
        assert devs[DEVICE]["models"][0]["backend"] == "onnxruntime"

        # Pages: load, no external URL, no patient identifier, the screening-aid notice.
        for path in ("/", "/results", f"/results/{r1['result_id']}"):
            code, _, body = http_get(port, path)
            assert code == 200, path
            _page_is_clean(body, port)
        _, _, body = http_get(port, f"/results/{r1['result_id']}")
        assert b"Confirm with DXA" in body
        assert PATIENT_KEY[:8].encode() in body and b"osteoporosis band" in body
        assert b"clinician disagrees" in body and b"/api/overlay/" in body
        _, _, body = http_get(port, "/")
        assert b"alarm" in body and b"hand-v1 1.2.0 (onnxruntime, int8)" in body

        # The device dies without a DISCONNECT: the broker publishes its Will.
        dev.loop_stop()
        sock = dev.socket()
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        assert wait_until(
            lambda: (
                {x["device_id"]: x["state"] for x in api(port, "/api/devices")}.get(DEVICE)
                == "offline"
            )
        )
        devs = {x["device_id"]: x for x in api(port, "/api/devices")}
        assert devs[DEVICE]["models"], "the Will must not erase the known model version"
    finally:
        d.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_instances_share_the_load(
    backend: str, broker: int, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = (
        f"sqlite:///{tmp_path / 'shared.sqlite'}"
        if backend == "sqlite"
        else str(request.getfixturevalue("pg_url"))
    )
    base = make_config(broker, url, None)
    cfg = base.model_copy(
        update={"dashboard": base.dashboard.model_copy(update={"shared_group": "central"})}
    )
    a = start_dashboard(cfg, "dash-a")
    b = start_dashboard(cfg, "dash-b")
    try:
        sent = [make_result(device=f"edge-{i % 3}") for i in range(20)]
        publish(broker, [(topic(SITE, r["device_id"], "result"), js(r), 1, False) for r in sent])
        total = lambda: a.counters.get("result_stored") + b.counters.get("result_stored")  # noqa: E731
        assert wait_until(lambda: total() == 20)
        stored = api(a.web.port, "/api/results?limit=100")
        assert sorted(r["result_id"] for r in stored) == sorted(r["result_id"] for r in sent)
        assert a.counters.get("result_duplicate") + b.counters.get("result_duplicate") == 0
        # Mosquitto hands a shared group's messages round-robin: both instances got some.
        assert a.counters.get("result_stored") > 0 and b.counters.get("result_stored") > 0
    finally:
        a.close()
        b.close()


def test_results_published_after_a_broker_restart_wait_for_a_dashboard_still_down(
    tmp_path: Path, token_file: Path
) -> None:
    # Central power cut: the broker restarts and the devices, quicker than the dashboard, send
    # their queued results at once; each device then deletes what the broker acknowledged.
    # Mosquitto 2.0 dropped every one of them for a shared subscription (its only member not
    # yet back); the default plain subscription keeps them all in the restored session.
    if MOSQUITTO is None:
        pytest.skip("Mosquitto is not installed (apt install mosquitto)")
    b = Mosquitto(tmp_path / "broker", persistence=True)
    b.start()
    try:
        cfg = make_config(b.port, f"sqlite:///{tmp_path / 'd.sqlite'}", token_file)
        start_dashboard(cfg, "dash-r").close()  # its persistent session and subscription
        b.stop()
        b.start()  # the session comes back from the persistence file
        sent = [make_result() for _ in range(50)]
        publish(b.port, [(topic(SITE, DEVICE, "result"), js(r), 1, False) for r in sent])
        d = start_dashboard(cfg, "dash-r")
        try:
            assert wait_until(lambda: d.counters.get("result_stored") == 50), d.counters.snapshot()
            stored = api(d.web.port, "/api/results?limit=100")
            assert sorted(r["result_id"] for r in stored) == sorted(r["result_id"] for r in sent)
        finally:
            d.close()
    finally:
        b.stop()


def test_persistent_session_keeps_messages_while_down(
    broker: int, tmp_path: Path, token_file: Path
) -> None:
    cfg = make_config(broker, f"sqlite:///{tmp_path / 'd.sqlite'}", token_file)
    start_dashboard(cfg, "dash-p").close()  # creates the session and the subscription
    r = make_result()
    publish(broker, [(topic(SITE, DEVICE, "result"), js(r), 1, False)])  # while it is down
    d = start_dashboard(cfg, "dash-p")
    try:
        assert wait_until(lambda: d.counters.get("result_stored") == 1)
        assert api(d.web.port, f"/api/results/{r['result_id']}")["result"] == r
    finally:
        d.close()


def test_a_message_not_stored_is_delivered_again(broker: int) -> None:
    """Acknowledge only after storing: a failed store means the broker sends it again."""
    seen: list[bytes] = []

    def flaky(t: str, payload: bytes) -> bool:
        seen.append(payload)
        return len(seen) > 1  # the first attempt "finds the database down"

    settings = BrokerSettings(
        host="127.0.0.1", port=broker, client_id="dash-flaky", min_backoff_s=0.1
    )
    sub = Subscriber(settings, one_by_one(flaky))
    sub.start()
    try:
        assert sub.subscribed.wait(10)
        publish(broker, [(topic(SITE, DEVICE, "result"), b"payload-1", 1, False)])
        assert wait_until(lambda: len(seen) >= 2)
        assert seen[:2] == [b"payload-1", b"payload-1"]
        time.sleep(0.3)
        assert len(seen) == 2  # acknowledged the second time: not sent again
    finally:
        sub.stop()


def _read_packet(conn: socket.socket) -> tuple[int, bytes]:
    head = conn.recv(1)
    if not head:
        raise ConnectionError("closed")
    length, shift = 0, 0
    for _ in range(4):
        b = conn.recv(1)[0]
        length |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    body = b""
    while len(body) < length:
        chunk = conn.recv(length - len(body))
        if not chunk:
            raise ConnectionError("closed")
        body += chunk
    return head[0], body


def test_falls_back_to_mqtt_311_when_the_broker_refuses_5() -> None:
    """A broker that only speaks 3.1.1 (played here on a socket) gets a plain subscription."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(2)
    server.settimeout(10)
    port = server.getsockname()[1]
    levels: list[int] = []
    filters: list[str] = []
    done = threading.Event()

    def play() -> None:
        for _ in range(2):  # bounded: the refused v5 attempt, then v3.1.1
            conn, _ = server.accept()
            conn.settimeout(5)
            _, body = _read_packet(conn)  # CONNECT: protocol name, then level
            levels.append(body[6])
            if body[6] == 5:
                conn.sendall(b"\x20\x02\x00\x01")  # 3.1.1 CONNACK: unacceptable version
                conn.close()
                continue
            conn.sendall(b"\x20\x02\x00\x00")
            kind, body = _read_packet(conn)
            assert kind == 0x82
            i = 2
            while i < len(body):
                n = int.from_bytes(body[i : i + 2], "big")
                filters.append(body[i + 2 : i + 2 + n].decode())
                i += 3 + n
            conn.sendall(b"\x90\x03" + body[:2] + b"\x01")
            done.wait(10)
            conn.close()
            return

    player = threading.Thread(target=play, daemon=True)
    player.start()
    sub = Subscriber(
        BrokerSettings(host="127.0.0.1", port=port, client_id="dash-old", min_backoff_s=0.1),
        lambda t, p: True,
    )
    sub.start()
    try:
        assert sub.subscribed.wait(10)
        assert levels == [5, 4] and sub.protocol == 3
        assert filters == ["osteofy/v1/+/+/#"]  # no $share on 3.1.1
    finally:
        done.set()
        sub.stop()
        server.close()
        player.join(5)


def test_serve_runs_until_stopped(broker: int, tmp_path: Path) -> None:
    port = free_port()
    cfg = make_config(broker, f"sqlite:///{tmp_path / 'd.sqlite'}", None, port=port)
    stop = threading.Event()
    rc: list[int] = []
    t = threading.Thread(target=lambda: rc.append(serve(cfg, stop, client_id="dash-s")))
    t.start()
    try:
        assert wait_until(lambda: _answers(port), 10)
        code, _, body = http_get(port, "/api/devices")  # no token file: open on loopback
        assert code == 200 and json.loads(body) == []
    finally:
        stop.set()
        t.join(10)
    assert rc == [0]


def _answers(port: int) -> bool:
    try:
        return http_get(port, "/api/stats")[0] == 200
    except OSError:
        return False


class _EmptyFirst:
    """A store whose first list read is empty: what the page renders; the script must add it."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._first = {"results": True, "devices": True}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def results(self, *args: Any) -> list[dict]:
        first, self._first["results"] = self._first["results"], False
        return [] if first else self._store.results(*args)

    def devices(self) -> list[dict]:
        first, self._first["devices"] = self._first["devices"], False
        return [] if first else self._store.devices()


def test_a_browser_runs_the_live_pages_under_the_csp(tmp_path: Path, token_file: Path) -> None:
    """Headless Chromium: the script loads from our route, polls the token-guarded API with
    the page session and fills the tables the server sent empty."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no Chromium to load the pages with")
    cfg = make_config(None, f"sqlite:///{tmp_path / 'd.sqlite'}", token_file)
    store = open_store(cfg.dashboard.db_url)
    r = make_result()
    store.add_result(Result.model_validate(r), utc_key(r["created_at"]), utc_now())
    store.set_status(Status.model_validate(status("online")), utc_now())
    store.set_heartbeat(Heartbeat.model_validate(heartbeat()), utc_now())
    store.close()
    d = start_dashboard(cfg, "unused", open_pages=True)
    d.web.httpd.app.store = _EmptyFirst(d.web.httpd.app.store)  # type: ignore[assignment]
    try:
        # "/" first: the feed page also reads the devices (for its clinic filter).
        for path, expect in (("/", "9000 / 10000"), ("/results", r["result_id"])):
            out = subprocess.run(
                [
                    browser,
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    f"--user-data-dir={tmp_path / 'chromium'}",
                    "--virtual-time-budget=7000",  # the 5 s poll fires without waiting 5 s
                    "--dump-dom",
                    f"http://127.0.0.1:{d.web.port}{path}",
                ],
                capture_output=True,
                timeout=60,
            )
            dom = out.stdout.decode()
            assert "live \u00b7 updated" in dom, (path, dom[-800:])
            assert expect in dom, path
            assert re.search(r"<p [^>]*data-empty[^>]*hidden", dom), "'nothing yet' still shown"
            assert PATIENT_KEY not in dom
    finally:
        d.close()
