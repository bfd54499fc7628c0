"""MQTT publisher: drains the outbox to the broker, announces status, beats the heart.

paho-mqtt 2.x, MQTT 5 (3.1.1 when the broker refuses 5), client id = device id, persistent
session, TLS with client certificates, username/password from a file, reconnect with
backoff (paho's, 1 s to 60 s). The Last Will is the retained ``status`` "offline"; on every
connect the retained "online" status replaces it.

Delivery: the outbox (SQLite) is the truth. The publisher sends at most ``max_inflight``
rows at a time and deletes a row only in ``on_publish`` — called by paho when the broker's
PUBACK for that message arrives. After a disconnect the in-flight set is forgotten and the
rows are sent again; the dashboard stores by ``result_id``, so a duplicate is harmless.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from edge.messages import Heartbeat, ModelStatus, Status, topic
from edge.outbox import Outbox
from edge.result import utc_now
from osteofy import __version__
from osteofy.config import Config, MqttConfig
from osteofy.errors import UsageError

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 7 * 24 * 3600


def broker_address(url: str) -> tuple[str, int, bool]:
    """(host, port, tls) from ``mqtt://host:port`` / ``mqtts://host:port``."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise UsageError(f"mqtt.url must look like mqtt://host:1883 or mqtts://host:8883: {url!r}")
    tls = parts.scheme == "mqtts"
    return parts.hostname, parts.port or (8883 if tls else 1883), tls


def read_password(m: MqttConfig) -> str | None:
    """The MQTT password from ``mqtt.password_file`` (config objects do no I/O)."""
    if m.password_file is None:
        return None
    try:
        return Path(m.password_file).read_text().strip()
    except OSError as exc:
        raise UsageError(f"mqtt.password_file: {exc.strerror}: {m.password_file}") from None


def check_broker(cfg: Config, timeout: float = 3.0) -> tuple[bool, str]:
    """(reachable, one line): TCP, and the TLS handshake with our certificates when mqtts."""
    host, port, tls = broker_address(cfg.mqtt.url)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            if not tls:
                return True, f"{host}:{port} reachable"
            m = cfg.mqtt.tls
            ctx = ssl.create_default_context(cafile=str(m.ca) if m.ca else None)
            if m.cert and m.key:
                ctx.load_cert_chain(str(m.cert), str(m.key))
            with ctx.wrap_socket(sock, server_hostname=host) as tsock:
                return True, f"{host}:{port} reachable, {tsock.version()}"
    except ssl.SSLCertVerificationError as exc:
        return False, f"{host}:{port}: broker certificate refused ({exc.verify_message})"
    except ssl.SSLError as exc:
        return False, f"{host}:{port}: TLS handshake failed ({exc.reason or exc})"
    except OSError as exc:
        return False, f"{host}:{port} unreachable ({exc.strerror or exc})"


class Publisher:
    def __init__(
        self,
        cfg: Config,
        outbox: Outbox,
        overlays: Path,
        models: list[ModelStatus] | None = None,
        problems: list[str] | None = None,
        last_result_at: Callable[[], str | None] = lambda: None,
        max_inflight: int = 20,
    ) -> None:
        self.cfg = cfg
        self.outbox = outbox
        self.overlays = Path(overlays)
        self.models = models or []
        self.problems = problems or []
        self.last_result_at = last_result_at
        self.max_inflight = max_inflight
        self.started = time.monotonic()
        self.connected = threading.Event()
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self._inflight: dict[int, int] = {}  # mid -> outbox seq
        self._lock = threading.Lock()
        self.protocol = 5
        self.client = self._client(5)
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        self._next_beat = 0.0

    # --- client set-up -----------------------------------------------------------------------

    def _status(self, state: str) -> bytes:
        s = Status(
            state=state,
            device_id=self.cfg.device_id,
            site_id=self.cfg.site_id,
            at=utc_now(),
            software=__version__,
            models=self.models if state == "online" else [],
            problems=self.problems if state == "online" else [],
        )
        return json.dumps(s.model_dump(mode="json", by_alias=True)).encode()

    def _topic(self, kind: str) -> str:
        return topic(self.cfg.site_id, self.cfg.device_id, kind)

    def _client(self, protocol: int):  # noqa: ANN202 - paho Client
        import paho.mqtt.client as mqtt

        version = mqtt.MQTTv5 if protocol == 5 else mqtt.MQTTv311
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.cfg.device_id,
            protocol=version,
            clean_session=None if protocol == 5 else False,
        )
        c.max_inflight_messages_set(self.max_inflight)
        c.reconnect_delay_set(min_delay=1, max_delay=60)
        c.will_set(self._topic("status"), self._status("offline"), qos=1, retain=True)
        m = self.cfg.mqtt
        if m.username:
            c.username_pw_set(m.username, read_password(m))
        _, _, tls = broker_address(m.url)
        if tls:
            c.tls_set(
                ca_certs=str(m.tls.ca) if m.tls.ca else None,
                certfile=str(m.tls.cert) if m.tls.cert else None,
                keyfile=str(m.tls.key) if m.tls.key else None,
            )
        self._client_protocol = protocol
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_connect_fail = self._on_connect_fail
        return c

    # --- callbacks (paho's network thread) ----------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:  # noqa: ANN001
        if reason_code.is_failure:
            self.last_error = f"broker refused the connection: {reason_code}"
            log.error("MQTT: %s", self.last_error)
            if self.protocol == 5 and "protocol" in str(reason_code).lower():
                self.protocol = 3  # the loop rebuilds the client for MQTT 3.1.1
            return
        log.info("MQTT connected (v%s) to %s", self.protocol, self.cfg.mqtt.url)
        self.last_error = None
        with self._lock:
            self._inflight.clear()
        client.publish(self._topic("status"), self._status("online"), qos=1, retain=True)
        self.connected.set()
        self.wake.set()

    def _on_connect_fail(self, client, userdata) -> None:  # noqa: ANN001
        ok, detail = check_broker(self.cfg)
        reason = detail if not ok else "connection failed"
        if reason != self.last_error:  # say it once per distinct reason, not every retry
            log.error("MQTT: %s; results stay queued", reason)
        self.last_error = reason

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None) -> None:  # noqa: ANN001
        self.connected.clear()
        with self._lock:
            self._inflight.clear()
        if not self.stopping.is_set():
            log.warning("MQTT disconnected (%s); results stay queued", reason_code)

    def _on_publish(self, client, userdata, mid, reason_code=None, properties=None) -> None:  # noqa: ANN001
        with self._lock:
            seq = self._inflight.pop(mid, None)
        if seq is None:
            return
        if reason_code is not None and getattr(reason_code, "is_failure", False):
            log.error("broker refused a message (%s); it stays queued", reason_code)
            return
        try:
            self.outbox.acknowledged(seq)
        except sqlite3.Error as exc:  # e.g. disk full: never let paho's network thread die
            log.error(
                "outbox: cannot drop an acknowledged message (%s); it will be sent again", exc
            )
            return
        self.wake.set()

    # --- the loop ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mqtt-publisher", daemon=True)
        self._thread.start()

    def _connect(self) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        host, port, _ = broker_address(self.cfg.mqtt.url)
        if self.protocol == 5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = SESSION_EXPIRY_S
            self.client.connect_async(
                host,
                port,
                keepalive=self.cfg.mqtt.keepalive_s,
                clean_start=False,
                properties=props,
            )
        else:
            self.client.connect_async(host, port, keepalive=self.cfg.mqtt.keepalive_s)
        self.client.loop_start()

    def _run(self) -> None:
        self._connect()
        while not self.stopping.is_set():
            try:
                self._step()
            except Exception:  # noqa: BLE001 - the publisher must outlive any one failure
                log.exception("MQTT publisher step failed; retrying")
                self.stopping.wait(1.0)
            self.wake.wait(0.5)
            self.wake.clear()

    def _step(self) -> None:
        if self.protocol != self._client_protocol:  # the broker refused MQTT 5
            self.client.loop_stop()
            self.client = self._client(3)
            self._connect()
        if self.connected.is_set():
            self._send_some()
            if time.monotonic() >= self._next_beat:
                self._heartbeat()
                self._next_beat = time.monotonic() + self.cfg.mqtt.heartbeat_s
        if self.outbox.stats()["unqueued_results"]:
            self.outbox.backfill()

    def _send_some(self) -> None:
        with self._lock:
            busy = set(self._inflight.values())
            room = self.max_inflight - len(busy)
        if room <= 0:
            return
        for msg in self.outbox.pending(busy, room):
            body = msg.payload
            if body is None and msg.file:
                try:
                    body = (self.overlays / msg.file).read_bytes()
                except OSError:
                    log.error("overlay file %s is gone; its message is dropped", msg.file)
                    self.outbox.acknowledged(msg.seq)
                    continue
            info = self.client.publish(msg.topic, body, qos=msg.qos, retain=msg.retain)
            if info.rc != 0:
                break  # not connected any more: the rows stay for the next connection
            with self._lock:
                self._inflight[info.mid] = msg.seq
                if info.is_published():  # PUBACK may beat us to the map
                    self._inflight.pop(info.mid, None)
                    self.outbox.acknowledged(msg.seq)

    def heartbeat_payload(self) -> Heartbeat:
        st = self.outbox.stats()
        where = Path(self.cfg.data_dir).resolve()
        while not where.exists() and where != where.parent:
            where = where.parent
        free = shutil.disk_usage(where).free / 1e6
        return Heartbeat(
            device_id=self.cfg.device_id,
            site_id=self.cfg.site_id,
            at=utc_now(),
            uptime_s=round(time.monotonic() - self.started, 1),
            outbox_depth=st["depth"],
            outbox_limit=st["limit"],
            outbox_alarm=st["alarm"],
            oldest_queued_age_s=st["oldest_age_s"],
            disk_free_mb=round(free, 1),
            last_result_at=self.last_result_at(),
        )

    def _heartbeat(self) -> None:
        hb = self.heartbeat_payload()
        self.client.publish(
            self._topic("heartbeat"), json.dumps(hb.model_dump(mode="json", by_alias=True)), qos=0
        )

    def stop(self, timeout: float = 5.0) -> None:
        """Graceful: publish 'offline' ourselves (the Will is for the ungraceful), disconnect."""
        self.stopping.set()
        self.wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.connected.is_set():
            info = self.client.publish(
                self._topic("status"), self._status("offline"), qos=1, retain=True
            )
            info.wait_for_publish(timeout)
        self.client.disconnect()
        self.client.loop_stop()
