"""Outbox + publisher against a real Mosquitto: nothing lost across outages and restarts."""

from __future__ import annotations

import json
import uuid

import pytest
from mqtt_broker import MOSQUITTO, Broker, Listener, wait_for

from edge.messages import Heartbeat, Status
from edge.outbox import Outbox
from edge.publisher import Publisher
from edge.result import Result
from edge.runtime import Screener
from edge.store import ResultStore

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")


@pytest.fixture()
def payload_and_overlay(device_scans, device_config, tmp_path):
    from edge.overlay import encode_png

    outcome = Screener(device_config).screen(device_scans[0])
    png = encode_png(outcome.overlay(include_image=False))
    return outcome.result.payload(), png


def _store_results(store, outbox, overlays, payload, png, n):  # noqa: ANN001
    ids = []
    for _ in range(n):
        p = dict(payload, result_id=str(uuid.uuid4()))
        name = f"{p['result_id']}.png"
        (overlays / name).write_bytes(png)
        with store.transaction() as db:
            store.add_result(db, uuid.uuid4().hex, p, None, name)
            outbox.enqueue_result(db, p, name)
        ids.append(p["result_id"])
    return ids


def test_results_reach_the_broker_across_an_outage_and_a_restart(
    payload_and_overlay, device_config, tmp_path
):
    payload, png = payload_and_overlay
    broker = Broker(tmp_path)
    cfg = device_config.model_copy(
        update={
            "mqtt": device_config.mqtt.model_copy(update={"url": broker.url, "heartbeat_s": 0.5})
        }
    )
    overlays = tmp_path / "overlays"
    overlays.mkdir()
    store = ResultStore(tmp_path / "results.sqlite")
    outbox = Outbox(store, cfg.site_id, cfg.device_id, limit=1000)
    first = _store_results(store, outbox, overlays, payload, png, 4)  # broker still down
    assert outbox.stats()["depth"] == 8
    pub = Publisher(cfg, outbox, overlays)
    pub.start()
    broker.start()
    listener = Listener(broker.port)
    try:
        assert wait_for(lambda: outbox.stats()["depth"] == 0, 20)
        got = {json.loads(m[1])["result_id"] for m in listener.of("result")}
        # Queued before the listener subscribed: delivered to it only if sent after; the
        # outbox emptied only on PUBACKs, which is what the device can know.
        broker.stop()  # outage: results keep arriving
        assert wait_for(lambda: not pub.connected.is_set(), 10)
        second = _store_results(store, outbox, overlays, payload, png, 3)
        assert outbox.stats()["depth"] == 6
        # Process restart while offline: a new publisher over the same database.
        pub.stop(timeout=1)
        store.close()
        store = ResultStore(tmp_path / "results.sqlite")
        outbox = Outbox(store, cfg.site_id, cfg.device_id, limit=1000)
        assert outbox.stats()["depth"] == 6
        broker.start()
        listener.close()
        listener = Listener(broker.port)
        assert wait_for(lambda: listener.client.is_connected(), 10)
        pub = Publisher(cfg, outbox, overlays)
        pub.start()
        assert wait_for(lambda: outbox.stats()["depth"] == 0, 20)
        assert wait_for(lambda: len(listener.of("result")) >= 3, 10)
        got = {json.loads(m[1])["result_id"] for m in listener.of("result")}
        assert set(second) <= got
        for _, body, _ in listener.of("result"):
            Result.model_validate(json.loads(body))
        overlays_got = listener.of("overlay")
        assert len(overlays_got) >= 3 and all(
            m[1][:8] == b"\x89PNG\r\n\x1a\n" for m in overlays_got
        )
        assert all(len(m[1]) <= 200_000 for m in overlays_got)
        assert wait_for(lambda: listener.of("heartbeat"), 5)
        hb = Heartbeat.model_validate(json.loads(listener.of("heartbeat")[-1][1]))
        assert hb.outbox_limit == 1000
        status = Status.model_validate(json.loads(listener.of("status")[-1][1]))
        assert status.state == "online"
        # Abrupt loss of the device (no DISCONNECT): the broker publishes the Last Will.
        pub.stopping.set()
        pub.client.socket().close()
        assert wait_for(
            lambda: any(json.loads(m[1])["state"] == "offline" for m in listener.of("status")), 10
        )
        assert first  # queued while the broker was down; they left only on PUBACK
    finally:
        pub.client.loop_stop()
        listener.close()
        broker.stop()
        store.close()


def test_full_outbox_keeps_results_and_raises_the_alarm(payload_and_overlay, tmp_path):
    payload, png = payload_and_overlay
    overlays = tmp_path / "overlays"
    overlays.mkdir()
    store = ResultStore(tmp_path / "results.sqlite")
    outbox = Outbox(store, "clinic-001", "edge-01", limit=10, alarm_fraction=0.8)
    _store_results(store, outbox, overlays, payload, png, 4)
    st = outbox.stats()
    assert st["depth"] == 8 and st["alarm"] and st["unqueued_results"] == 0
    _store_results(store, outbox, overlays, payload, png, 3)  # only one more fits
    st = outbox.stats()
    assert st["depth"] == 10 and st["unqueued_results"] == 2 and store.count() == 7
    for m in outbox.pending(set(), 4):
        outbox.acknowledged(m.seq)
    assert outbox.backfill() == 2
    st = outbox.stats()
    assert st["unqueued_results"] == 0 and st["depth"] == 10
    store.close()
