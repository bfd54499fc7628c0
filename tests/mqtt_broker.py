"""A private Mosquitto for tests (``osteofy.mosquitto``), and a bounded wait."""

from __future__ import annotations

import threading
import time

from osteofy.mosquitto import MOSQUITTO, free_port
from osteofy.mosquitto import Mosquitto as Broker

__all__ = ["MOSQUITTO", "Broker", "Listener", "free_port", "outbox_with_one_feedback", "wait_for"]


def wait_for(predicate, timeout: float = 10.0, step: float = 0.05) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


class Listener:
    """A subscriber on the test's own broker that records every message under the device topics."""

    def __init__(self, port: int, client_id: str = "listener") -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes, bool]] = []  # topic, payload, retained
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, u, f, rc, p=None: c.subscribe("osteofy/v1/#", qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:  # noqa: ANN001
        with self.lock:
            self.messages.append((msg.topic, msg.payload, msg.retain))

    def of(self, kind: str) -> list[tuple[str, bytes, bool]]:
        """Messages whose topic kind (``osteofy/v1/<clinic>/<device>/<kind>``) is ``kind``."""
        with self.lock:
            return [m for m in self.messages if m[0].split("/")[4] == kind]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def outbox_with_one_feedback(db_path, cfg):  # noqa: ANN001, ANN201
    """A new result store at ``db_path`` whose outbox holds one feedback of ``cfg``'s device."""
    import uuid

    from edge.outbox import Outbox
    from edge.store import ResultStore

    store = ResultStore(db_path)
    outbox = Outbox(store, cfg.site_id, cfg.device_id, limit=100)
    with store.transaction() as db:
        outbox.enqueue_feedback(
            db,
            {
                "schema": "osteofy.feedback.v1",
                "feedback_id": str(uuid.uuid4()),
                "result_id": str(uuid.uuid4()),
                "device_id": cfg.device_id,
                "site_id": cfg.site_id,
                "at": "2026-11-21T00:00:00Z",
                "agree": True,
            },
        )
    return outbox
