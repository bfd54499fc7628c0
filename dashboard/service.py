"""``osteofy dashboard serve``: subscriber -> store -> web, one instance of the central service.

Several instances may run side by side (on one host with different ports and client ids, or
on several hosts) against one PostgreSQL database — or one SQLite file on one host: the
broker's shared subscription splits the messages between them and the store's keys keep
storage exactly-once either way.

The web side binds ``dashboard.host`` (default 127.0.0.1). With no ``api_token_file`` the API
answers loopback clients only, and with no users file the pages do too (see
:mod:`dashboard.auth`); an empty ``mqtt.url`` serves what is stored without subscribing.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from dashboard.auth import Access, load_token, load_users
from dashboard.intake import Counters, Rejected, parse, safe_topic, utc_key
from dashboard.mqtt import BrokerSettings, Subscriber, broker_settings
from dashboard.store import Store, StoreError, open_store
from dashboard.web import App, WebServer
from edge.messages import Feedback, Heartbeat, Status
from edge.result import Result, utc_now
from osteofy.config import Config
from osteofy.errors import Unavailable

log = logging.getLogger(__name__)


class Ingest:
    """The subscriber's handler: validate, store, count. False = not stored, redeliver."""

    def __init__(self, store: Store, counters: Counters) -> None:
        self.store = store
        self.counters = counters

    def __call__(self, topic: str, payload: bytes) -> bool:
        self.counters.add("received")
        try:
            msg = parse(topic, payload)
            if isinstance(msg.message, Result):
                created = utc_key(msg.message.created_at)
                new = self.store.add_result(msg.message, created, utc_now())
            elif msg.kind == "overlay" and msg.png is not None and msg.result_id is not None:
                new = self.store.add_overlay(
                    msg.site_id, msg.device_id, msg.result_id, msg.png, utc_now()
                )
            elif isinstance(msg.message, Feedback):
                new = self.store.add_feedback(msg.message, utc_now())
            elif isinstance(msg.message, Status):
                self.store.set_status(msg.message, utc_now())
                new = True
            elif isinstance(msg.message, Heartbeat):
                self.store.set_heartbeat(msg.message, utc_now())
                new = True
            else:  # parse() only returns the kinds above
                raise Rejected("topic", "unhandled message kind")
        except Rejected as exc:
            self.counters.add("rejected")
            self.counters.add(f"rejected_{exc.category}")
            log.warning("dropped a message on %s: %s", safe_topic(topic), exc)
            return True  # handled for good: a redelivery would be rejected again
        except StoreError as exc:
            self.counters.add("store_errors")
            log.error("could not store a message on %s: %s", safe_topic(topic), exc)
            return False
        self.counters.add(f"{msg.kind}_stored" if new else f"{msg.kind}_duplicate")
        return True


class Dashboard:
    """One instance: store, web server and (unless ``mqtt.url`` is empty) the subscriber."""

    def __init__(
        self,
        cfg: Config,
        *,
        users_file: Path | None = None,
        client_id: str | None = None,
        broker: BrokerSettings | None = None,
    ) -> None:
        # Read every file first: a configuration error must not leave a half-started service.
        token = load_token(cfg.dashboard.api_token_file) if cfg.dashboard.api_token_file else None
        users = load_users(users_file) if users_file else None
        if broker is None and cfg.mqtt.url:
            broker = broker_settings(cfg, client_id)
        self.counters = Counters()
        self.store = open_store(cfg.dashboard.db_url)
        self.subscriber = (
            Subscriber(broker, Ingest(self.store, self.counters)) if broker is not None else None
        )
        app = App(self.store, Access(token, users), self.stats)
        try:
            self.web = WebServer(cfg.dashboard.host, cfg.dashboard.port, app)
        except OSError as exc:
            self.store.close()
            where = f"{cfg.dashboard.host}:{cfg.dashboard.port}"
            raise Unavailable(f"dashboard: cannot listen on {where}: {exc.strerror}") from None
        if token is None:
            log.warning("no dashboard.api_token_file: the API answers this machine only")
        if users is None:
            log.warning("no users file: the pages are open to this machine only")

    def stats(self) -> dict:
        sub = self.subscriber
        return {
            "counts": self.counters.snapshot(),
            "mqtt": None
            if sub is None
            else {
                "client_id": sub.settings.client_id,
                "protocol": "5" if sub.protocol == 5 else "3.1.1",
                "shared": sub.protocol == 5 and sub.shared,
                "subscribed": sub.subscribed.is_set(),
            },
        }

    def start(self) -> None:
        self.web.start()
        if self.subscriber is not None:
            self.subscriber.start()
        log.info("dashboard on http://%s:%d/", *self.web.httpd.server_address[:2])

    def close(self) -> None:
        if self.subscriber is not None:
            self.subscriber.stop()
        self.web.close()
        self.store.close()


def serve(
    cfg: Config,
    stop: threading.Event | None = None,
    *,
    users_file: Path | None = None,
    client_id: str | None = None,
) -> int:
    """Run until ``stop`` is set (or SIGTERM/SIGINT when called from the main thread)."""
    stop = stop or threading.Event()
    dashboard = Dashboard(cfg, users_file=users_file, client_id=client_id)
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():

        def _stop(signum: int, frame: FrameType | None) -> None:
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, _stop)
    try:
        dashboard.start()
        while not stop.wait(1.0):
            pass
    finally:
        dashboard.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
