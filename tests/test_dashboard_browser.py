"""Acceptance in a real browser: headless Chromium, driven over the DevTools protocol.

A staff member logs in (users file), opens the results feed, and a result a device publishes
through Mosquitto appears in the table without a reload. Then the four main views are
captured at 1280x800 — ``OSTEOFY_DOCS_SCREENSHOTS=1`` writes them to
``docs/img/dashboard-*.png`` (the pictures in ``docs/dashboard.md``), otherwise to the test's
temporary folder.

Data: clinics and devices with a live heartbeat, an outbox alarm and one device offline;
results over six months with clinician feedback and DXA values; one result screened by the
real runtime from a simulated radiograph, so the detail page shows a real heat map.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from test_dashboard import TOKEN, heartbeat, make_config, publish, start_dashboard, status

from bench.fleet import MOSQUITTO, Mosquitto, result_payload
from dashboard.auth import hash_password
from dashboard.intake import utc_key
from dashboard.store import (
    DeviceHeartbeat,
    DeviceStatus,
    NewFeedback,
    NewOverlay,
    NewResult,
    Write,
    open_store,
)
from edge.messages import Feedback, Heartbeat, Status, topic
from edge.result import Result, utc_now
from osteofy.config import Config

websocket = pytest.importorskip("websocket", reason="websocket-client drives the browser")
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.skipif(BROWSER is None, reason="no Chromium to drive"),
    pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed"),
]
DOCS_IMG = Path(__file__).resolve().parent.parent / "docs" / "img"
WIDTH, HEIGHT = 1280, 800


class Chromium:
    """Just enough of the DevTools protocol: navigate, evaluate, wait, screenshot."""

    def __init__(self, profile: Path) -> None:
        assert BROWSER is not None
        profile.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                BROWSER,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--remote-debugging-port=0",
                "--remote-allow-origins=*",
                f"--user-data-dir={profile}",
                f"--window-size={WIDTH},{HEIGHT}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            assert time.monotonic() < deadline, "Chromium did not open its DevTools port"
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.loads(r.read()) if t["type"] == "page")
        self.ws = websocket.create_connection(
            page["webSocketDebuggerUrl"], timeout=30, suppress_origin=True
        )
        self._id = 0
        self.call("Page.enable")
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=WIDTH,
            height=HEIGHT,
            deviceScaleFactor=1,
            mobile=False,
        )

    def call(self, method: str, **params: Any) -> dict:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:  # events arrive in between; bounded by the socket timeout
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return dict(msg["result"])

    def eval(self, expression: str) -> Any:
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return r["result"].get("value")

    def wait(self, expression: str, timeout: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.eval(expression):
                return True
            time.sleep(0.1)
        return bool(self.eval(expression))

    def goto(self, url: str, path: str) -> None:
        self.call("Page.navigate", url=url)
        assert self.wait(
            f"location.pathname === {json.dumps(path)} && document.readyState === 'complete'"
        ), f"{url} did not load as {path}"

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture()
def chromium(tmp_path: Path) -> Iterator[Chromium]:
    c = Chromium(tmp_path / "chromium")
    try:
        yield c
    finally:
        c.close()


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def seed(db_url: str, screened: tuple[dict, bytes]) -> str:
    """A small network: 3 clinics, 6 devices, ~6 months of results with feedback."""
    rng = random.Random(11)
    now = datetime.now(UTC)
    writes: list[Write] = []
    devices = [
        ("clinic-north", "edge-01"),
        ("clinic-north", "edge-02"),
        ("clinic-river", "edge-01"),
        ("clinic-river", "edge-02"),
        ("clinic-hill", "edge-01"),
        ("clinic-hill", "edge-02"),
    ]
    for i, (site, dev) in enumerate(devices):
        state = "offline" if i == 3 else "online"
        writes.append(DeviceStatus(Status.model_validate(status(state, site, dev)), utc_now()))
        depth = 8600 if i == 4 else rng.randint(0, 3)
        hb = Heartbeat.model_validate(heartbeat(site, dev, depth=depth))
        writes.append(DeviceHeartbeat(hb, _iso(now - timedelta(seconds=5 + 400 * (i == 3)))))
    for _ in range(360):
        site, dev = rng.choice(devices)
        when = now - timedelta(days=rng.uniform(0, 180))
        p = result_payload(site, dev, rng, created_at=_iso(when))
        r = Result.model_validate(p)
        writes.append(NewResult(r, utc_key(r.created_at), _iso(when + timedelta(seconds=1))))
        if rng.random() < 0.6:
            true_t = p["prediction"]["tscore"] + rng.gauss(0, 0.6)
            referred = p["prediction"]["refer"]
            dxa = round(true_t, 1) if rng.random() < (0.7 if referred else 0.25) else None
            f = Feedback(
                feedback_id=str(uuid.uuid4()),
                result_id=r.result_id,
                device_id=dev,
                site_id=site,
                at=_iso(when + timedelta(days=2)),
                agree=rng.random() < 0.85,
                dxa_tscore=dxa,
            )
            writes.append(NewFeedback(f, utc_now()))
    payload, png = screened
    r = Result.model_validate(payload)
    writes.append(NewResult(r, utc_key(r.created_at), utc_now()))
    writes.append(NewOverlay(r.site_id, r.device_id, r.result_id, png, utc_now()))
    store = open_store(db_url)
    store.write(writes)
    store.close()
    return r.result_id


@pytest.fixture()
def screened(device_scans: list[Path], device_config: Config) -> tuple[dict, bytes]:
    """One real result and its overlay, from the device runtime."""
    from edge.overlay import encode_png
    from edge.runtime import Screener

    cfg = device_config.model_copy(update={"site_id": "clinic-north", "device_id": "edge-01"})
    outcome = Screener(cfg).screen(device_scans[0])
    return outcome.result.payload(), encode_png(outcome.overlay(outcome.publishable_pixels))


def test_staff_log_in_and_see_a_new_result_arrive_live(
    tmp_path: Path, chromium: Chromium, screened: tuple[dict, bytes]
) -> None:
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    users = tmp_path / "users"
    users.write_text(f"ana:{hash_password('correct horse battery', 1000)}\n")
    token = tmp_path / "api.token"
    token.write_text(TOKEN + "\n")
    cfg = make_config(broker.port, f"sqlite:///{tmp_path / 'd.sqlite'}", token)
    detail_id = seed(cfg.dashboard.db_url, screened)
    d = start_dashboard(cfg, "dash-browser", users_file=users)
    base = f"http://127.0.0.1:{d.web.port}"
    shots = DOCS_IMG if os.environ.get("OSTEOFY_DOCS_SCREENSHOTS") == "1" else tmp_path
    try:
        # No anonymous access: the feed sends a stranger to the login form.
        chromium.call("Page.navigate", url=f"{base}/results")
        assert chromium.wait(
            "location.pathname === '/login' && document.querySelector('form.login') !== null"
        ), "no login asked for"
        chromium.eval(
            "document.querySelector('input[name=user]').value = 'ana';"
            "document.querySelector('input[name=password]').value = 'correct horse battery';"
            "document.querySelector('form.login').submit()"
        )
        assert chromium.wait(
            "location.pathname === '/results' && document.readyState === 'complete'"
        ), chromium.eval("location.href + ' ' + document.body.textContent.slice(0, 300)")
        assert chromium.eval("document.querySelector('header form span').textContent") == "ana"

        # Live: a device publishes; the row appears while the page stays the same page.
        chromium.eval("window.osteofyMarker = 42")
        rng = random.Random(5)
        new = result_payload("clinic-river", "edge-01", rng)
        publish(
            broker.port,
            [(topic("clinic-river", "edge-01", "result"), json.dumps(new).encode(), 1, False)],
        )
        link = f"document.querySelector('tbody[data-feed] a[href=\"/results/{new['result_id']}\"]')"
        assert chromium.wait(f"{link} !== null", timeout=15), "the new result did not appear"
        assert chromium.eval("window.osteofyMarker") == 42, "the page was reloaded"
        assert chromium.eval("document.querySelector('[data-live-note]').textContent").startswith(
            "live"
        )
        chromium.screenshot(shots / "dashboard-results.png")

        chromium.goto(f"{base}/", "/")
        assert chromium.eval("document.body.textContent.includes('8600 / 10000')")
        chromium.screenshot(shots / "dashboard-devices.png")
        chromium.goto(f"{base}/results/{detail_id}", f"/results/{detail_id}")
        assert chromium.wait(
            "document.querySelector('.overlay img') && "
            "document.querySelector('.overlay img').naturalWidth > 0"
        ), "the overlay image did not load"
        chromium.screenshot(shots / "dashboard-result.png")
        chromium.goto(f"{base}/acceptance", "/acceptance")
        assert chromium.eval("document.body.textContent.includes('Small n is not evidence')")
        assert chromium.eval("document.querySelectorAll('svg.chart circle').length") > 0
        chromium.screenshot(shots / "dashboard-acceptance.png")
        for name in ("results", "devices", "result", "acceptance"):
            assert (shots / f"dashboard-{name}.png").stat().st_size > 10_000
    finally:
        d.close()
        broker.stop()
