"""The dashboard's MQTT subscriber (paho-mqtt 2.x), one network thread we own.

- **Plain subscription** ``osteofy/v1/+/+/#`` by default: every instance receives every
  message and storage by key keeps each once. **Shared subscription**
  ``$share/GROUP/osteofy/v1/+/+/#`` (MQTT 5) when ``dashboard.shared_group`` is set: several
  instances split the messages. Not the default because Mosquitto 2.0 drops a shared group's
  messages published after a broker restart until a member has subscribed again (measured:
  1000 of 1000 lost with the group's only member still reconnecting; a plain subscription
  lost none), and each device deletes a result once the broker has acknowledged it.
  Shared subscriptions never replay *retained* messages (MQTT 5, 4.8.2), so a sharing
  instance also subscribes, unshared, to the retained ``status`` topics. A status that
  arrives twice is simply written twice (an idempotent upsert).
- **3.1.1 fallback**: when the broker answers "unsupported protocol version", reconnect with
  MQTT 3.1.1 and a plain subscription (every instance then gets everything; storage by key
  keeps it exactly-once). A broker that speaks 5 but refuses shared subscriptions (reason
  0x9E) gets the plain subscription too.
- **Persistent session** (``clean_start=False`` and a session expiry; ``clean_session=False``
  on 3.1.1) and QoS 1, so messages published while the dashboard is down wait at the broker.
- **Acknowledge after storing, in batches**: ``manual_ack`` — received messages are held
  (unacknowledged) until the socket has nothing more to read or ``max_batch`` are waiting;
  then the handler stores them in one transaction and the PUBACKs go out, in the order the
  messages came (MQTT 4.6), only for those it says are handled (stored, or rejected for
  good). When it cannot store (the database is down) the rest stay unacknowledged and the
  connection is reset after a back-off, so the broker delivers them again. A quiet link
  means batches of one (no added latency); a busy one shares each commit's fsync among many
  messages. The broker sends at most ``RECEIVE_MAXIMUM`` unacknowledged messages at a time
  (MQTT 5 Receive Maximum), which bounds both the batch and the memory it takes.
- **Reconnect with back-off** (jittered, doubling to a ceiling), a fresh paho client per
  attempt (the protocol version is fixed when a paho client is made).
"""

from __future__ import annotations

import logging
import random
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge.publisher import broker_address, read_password
from osteofy.config import Config
from osteofy.errors import UsageError

log = logging.getLogger(__name__)

TOPIC_FILTER = "osteofy/v1/+/+/#"
STATUS_FILTER = "osteofy/v1/+/+/status"
SESSION_EXPIRY_S = 24 * 3600  # a dashboard down longer than a day starts afresh
UNSUPPORTED_PROTOCOL = 0x84
SHARED_NOT_SUPPORTED = 0x9E

DEFAULT_BATCH = 100  # messages per commit at most
RECEIVE_MAXIMUM = 200  # unacknowledged messages the broker may send us at a time (MQTT 5)

# [(topic, payload), ...] -> per message: True when handled for good (acknowledge), False to
# have it delivered again.
Handler = Callable[[Sequence[tuple[str, bytes]]], list[bool]]


def one_by_one(handle: Callable[[str, bytes], bool]) -> Handler:
    """A batch handler from a per-message one (each message on its own)."""
    return lambda messages: [handle(t, p) for t, p in messages]


@dataclass(frozen=True)
class BrokerSettings:
    """Where and how to connect; built from ``cfg.mqtt`` by :func:`broker_settings`."""

    host: str
    port: int
    client_id: str
    tls: bool = False
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    username: str | None = None
    password: str | None = None
    keepalive_s: int = 30
    min_backoff_s: float = 1.0
    max_backoff_s: float = 60.0


def default_client_id(port: int) -> str:
    """Stable across restarts (the persistent session is found by it), unique per instance."""
    return f"osteofy-dashboard-{socket.gethostname()}-{port}"[:128]


def broker_settings(cfg: Config, client_id: str | None = None) -> BrokerSettings:
    """Read ``cfg.mqtt``; the password file is read here (config objects do no I/O)."""
    m = cfg.mqtt
    host, port, tls = broker_address(m.url)
    password = read_password(m)
    if (m.tls.cert or m.tls.key) and not tls:
        raise UsageError("mqtt.tls.cert/key are set but mqtt.url is not mqtts://")
    for name in ("ca", "cert", "key"):
        path = getattr(m.tls, name)
        if tls and path is not None and not Path(path).is_file():
            raise UsageError(f"mqtt.tls.{name}: no such file: {path}")
    return BrokerSettings(
        host=host,
        port=port,
        client_id=client_id or default_client_id(cfg.dashboard.port),
        tls=tls,
        ca=m.tls.ca,
        cert=m.tls.cert,
        key=m.tls.key,
        username=m.username,
        password=password,
        keepalive_s=m.keepalive_s,
    )


class Subscriber:
    """Runs until ``stop`` is set: connect, subscribe, hand every message to ``handler``."""

    def __init__(
        self,
        settings: BrokerSettings,
        handler: Handler,
        group: str | None = None,
        max_batch: int = DEFAULT_BATCH,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.settings = settings
        self.handler = handler
        self.group = group
        self.max_batch = max_batch
        self._pending: list[tuple[int, int, str, bytes]] = []  # (mid, qos, topic, payload)
        self._received = 0  # messages taken from the socket (to see when it goes quiet)
        self.protocol = 5  # 3 after the broker refused MQTT 5
        self.shared = True  # False after the broker refused shared subscriptions
        self.subscribed = threading.Event()  # set once the broker granted our subscriptions
        self._reset = False  # the current connection must end (refused, or a message not stored)
        self._unhandled = False  # a message could not be handled in this connection
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, args=(self._stop,), name="mqtt-dashboard")
        self._thread.daemon = True
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self, stop: threading.Event) -> None:
        delay = self.settings.min_backoff_s
        while not stop.is_set():
            protocol = self.protocol
            healthy = self._session(stop)
            if stop.is_set():
                break
            if self.protocol != protocol:
                continue  # fall back to 3.1.1 at once
            if healthy:
                delay = self.settings.min_backoff_s
            wait = delay * random.uniform(0.5, 1.0)  # instances must not retry in lock step
            log.info("MQTT: reconnecting in %.1f s", wait)
            stop.wait(wait)
            delay = min(delay * 2, self.settings.max_backoff_s)

    # --- one connection ----------------------------------------------------------------------

    def _client(self) -> Any:
        s = self.settings
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            protocol=mqtt.MQTTv5 if self.protocol == 5 else mqtt.MQTTv311,
            clean_session=None if self.protocol == 5 else False,
            manual_ack=True,
        )
        if s.username:
            c.username_pw_set(s.username, s.password)
        if s.tls:
            c.tls_set(
                ca_certs=str(s.ca) if s.ca else None,
                certfile=str(s.cert) if s.cert else None,
                keyfile=str(s.key) if s.key else None,
            )
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        c.on_disconnect = self._on_disconnect
        return c

    def _session(self, stop: threading.Event) -> bool:
        """Connect and serve until the connection ends; True when it went well (subscribed and
        every message handled), so the next attempt need not back off further."""
        s = self.settings
        self._reset = self._unhandled = False
        self._pending = []
        try:
            client = self._client()
            if self.protocol == 5:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = SESSION_EXPIRY_S
                props.ReceiveMaximum = RECEIVE_MAXIMUM
                client.connect(s.host, s.port, s.keepalive_s, clean_start=False, properties=props)
            else:
                client.connect(s.host, s.port, s.keepalive_s)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            log.warning("MQTT: cannot connect to %s:%d: %s", s.host, s.port, exc)
            return False
        was_subscribed = False
        try:
            while not stop.is_set() and not self._reset:
                seen = self._received
                # Messages waiting: only look whether more are already there, do not wait.
                rc = client.loop(timeout=0.0 if self._pending else 0.2)
                was_subscribed = was_subscribed or self.subscribed.is_set()
                if rc != mqtt.MQTT_ERR_SUCCESS:
                    log.warning("MQTT: connection lost (%s)", mqtt.error_string(rc))
                    break
                if self._pending and (
                    len(self._pending) >= self.max_batch or self._received == seen
                ):
                    self._flush(client)
        except Exception:  # a paho or socket failure must not end the thread
            log.exception("MQTT: network loop failed")
        finally:
            # Store what was received even when the connection is gone: the acknowledgements
            # may not get out, but a broker that lost our session will not send it again.
            self._flush(client)
            self.subscribed.clear()
            if client.is_connected():
                client.disconnect()
                for _ in range(10):  # let DISCONNECT go out; bounded
                    if client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                        break
            sock = client.socket()
            if sock is not None:
                sock.close()
        return was_subscribed and not self._unhandled

    # --- callbacks (our network thread) ------------------------------------------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._reset = True
            if self.protocol == 5 and reason.value == UNSUPPORTED_PROTOCOL:
                log.warning("MQTT: broker refused MQTT 5; using 3.1.1 (no shared subscription)")
                self.protocol = 3
            else:
                log.error("MQTT: broker refused the connection: %s", reason)
            return
        log.info(
            "MQTT connected (v%s, session %s) as %s",
            "5" if self.protocol == 5 else "3.1.1",
            "resumed" if flags.session_present else "new",
            self.settings.client_id,
        )
        client.subscribe(self._filters())

    def _filters(self) -> list[tuple[str, Any]]:
        if self.protocol == 5 and self.shared and self.group:
            opts = SubscribeOptions(qos=1)
            return [(f"$share/{self.group}/{TOPIC_FILTER}", opts), (STATUS_FILTER, opts)]
        if self.protocol == 5:
            return [(TOPIC_FILTER, SubscribeOptions(qos=1))]
        return [(TOPIC_FILTER, 1)]

    def _on_subscribe(
        self, client: Any, userdata: Any, mid: int, reasons: list[Any], props: Any
    ) -> None:
        failed = [r for r in reasons if r.is_failure]
        if not failed:
            self.subscribed.set()
            return
        if self.shared and self.group and any(r.value == SHARED_NOT_SUPPORTED for r in failed):
            log.warning("MQTT: broker refused shared subscriptions; subscribing plainly")
            self.shared = False
            client.subscribe(self._filters())
            return
        log.error("MQTT: subscription refused: %s", ", ".join(str(r) for r in failed))
        self._reset = True

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:  # not valid UTF-8: drop for good
            topic = "\ufffd"
        self._received += 1
        self._pending.append((message.mid, message.qos, topic, message.payload))

    def _flush(self, client: Any) -> None:
        """Hand the held messages to the handler (``max_batch`` at a time), then acknowledge
        the handled ones in order; stop at the first that is not (it and those after it stay
        unacknowledged, and the connection is reset so the broker sends them again)."""
        pending, self._pending = self._pending, []
        for start in range(0, len(pending), self.max_batch):
            chunk = pending[start : start + self.max_batch]
            try:
                handled = self.handler([(t, p) for _, _, t, p in chunk])
                if len(handled) != len(chunk):
                    raise ValueError("the handler answered for a different number of messages")
            except Exception:
                log.exception("MQTT: handler failed; messages left for redelivery")
                handled = [False] * len(chunk)
            for (mid, qos, _, _), ok in zip(chunk, handled, strict=True):
                if not ok:
                    self._reset = self._unhandled = True  # reconnect after a back-off
                    return
                client.ack(mid, qos)

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self.subscribed.clear()
        if reason is not None and getattr(reason, "is_failure", False):
            log.warning("MQTT: disconnected: %s", reason)
