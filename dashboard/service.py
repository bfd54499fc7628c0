"""``osteofy dashboard serve``: subscriber -> store -> web, one instance of the central service.

Several instances may run side by side (on one host with different ports and client ids, or
on several hosts) against one PostgreSQL database — or one SQLite file on one host: the
broker's shared subscription splits the messages between them and the store's keys keep
storage exactly-once either way.

The web side binds ``dashboard.host`` (default 127.0.0.1). Access (see :mod:`dashboard.auth`):
with no ``api_token_file`` the API answers loopback clients only; with no users file the
pages refuse everyone (with how to make a user) unless ``open_pages`` asks for them to be
open to loopback clients — the one-machine demo. An empty ``mqtt.url`` serves what is stored
without subscribing.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from dashboard.auth import Access, load_token, load_users
from dashboard.ingest import Ingest
from dashboard.intake import Counters
from dashboard.mqtt import DEFAULT_BATCH, BrokerSettings, Subscriber, broker_settings
from dashboard.store import StoreError, open_store
from dashboard.web import App, WebServer
from osteofy.config import Config
from osteofy.errors import Unavailable

log = logging.getLogger(__name__)


class Dashboard:
    """One instance: store, web server and (unless ``mqtt.url`` is empty) the subscriber."""

    def __init__(
        self,
        cfg: Config,
        *,
        users_file: Path | None = None,
        client_id: str | None = None,
        broker: BrokerSettings | None = None,
        open_pages: bool = False,
        max_batch: int = DEFAULT_BATCH,
    ) -> None:
        # Read every file first: a configuration error must not leave a half-started service.
        token = load_token(cfg.dashboard.api_token_file) if cfg.dashboard.api_token_file else None
        users = load_users(users_file) if users_file else None
        if broker is None and cfg.mqtt.url:
            broker = broker_settings(cfg, client_id)
        self.counters = Counters()
        self.store = open_store(cfg.dashboard.db_url)
        ingest = Ingest(self.store, self.counters)
        self.subscriber = (
            Subscriber(broker, ingest.handle, group=cfg.dashboard.shared_group, max_batch=max_batch)
            if broker is not None
            else None
        )
        access = Access(token, users, open_pages=open_pages)
        app = App(self.store, access, self.stats)
        try:
            self.web = WebServer(cfg.dashboard.host, cfg.dashboard.port, app)
        except OSError as exc:
            self.store.close()
            where = f"{cfg.dashboard.host}:{cfg.dashboard.port}"
            raise Unavailable(f"dashboard: cannot listen on {where}: {exc.strerror}") from None
        if token is None:
            log.warning("no dashboard.api_token_file: the API answers this machine only")
        if users is None and open_pages:
            log.warning("no users file, open_pages: the pages are open to this machine only")
        elif users is None:
            log.warning("no users file: the pages refuse everyone (python -m dashboard.auth NAME)")
        elif open_pages:
            log.warning("open_pages is ignored: a users file is configured, staff log in")

    def stats(self) -> dict:
        sub = self.subscriber
        try:
            dead: int | None = self.store.dead_letter_count()
        except StoreError:
            dead = None  # the counters still answer while the database is down
        return {
            "counts": self.counters.snapshot(),
            "dead_letters": dead,
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
    open_pages: bool = False,
) -> int:
    """Run until ``stop`` is set (or SIGTERM/SIGINT when called from the main thread).

    ``open_pages``: without a users file, let loopback clients see the pages (a demo on one
    machine); never needed, and ignored, when staff have accounts.
    """
    stop = stop or threading.Event()
    dashboard = Dashboard(cfg, users_file=users_file, client_id=client_id, open_pages=open_pages)
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
