"""The example Mosquitto configurations in systemd/mosquitto/, run by a real Mosquitto.

The central broker (central.conf + osteofy.acl): every client needs a certificate of the
Osteofy CA, its CN becomes its username, and a device may write only under its own device
level - checked with raw clients and with the device's own publisher (whose Last Will must
be allowed too). The device broker (device.conf): loopback, passwords, the same ACL.
The shipped files are used as they are, with only paths and the port substituted.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from mqtt_broker import MOSQUITTO, free_port, outbox_with_one_feedback, wait_for

from edge.publisher import Publisher
from osteofy.config import Config

ROOT = Path(__file__).parent.parent
CONF = ROOT / "systemd/mosquitto"

pytestmark = pytest.mark.skipif(
    MOSQUITTO is None or shutil.which("openssl") is None, reason="mosquitto or openssl missing"
)


def _openssl(d: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)


def _ca(d: Path, name: str) -> None:
    _openssl(
        d, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
        f"/CN=Osteofy test {name}", "-keyout", f"{name}.key", "-out", f"{name}.crt",
    )  # fmt: skip


def _cert(d: Path, ca: str, name: str, cn: str, server: bool = False) -> None:
    _openssl(
        d, "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
        "-keyout", f"{name}.key", "-out", f"{name}.csr",
    )  # fmt: skip
    ext = d / f"{name}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n" if server else "extendedKeyUsage=clientAuth\n")
    _openssl(
        d, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", ext.name,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "rogue")
    _cert(d, "ca", "broker", "broker.example.org", server=True)
    _cert(d, "ca", "edge-a", "edge-a")
    _cert(d, "ca", "edge-b", "edge-b")
    _cert(d, "ca", "dashboard", "osteofy-dashboard")
    _cert(d, "rogue", "forged-edge-a", "edge-a")  # the right CN from the wrong CA
    return d


def _shipped(name: str, replacements: dict[str, str]) -> str:
    text = (CONF / name).read_text()
    for old, new in replacements.items():
        assert old in text, f"{name} no longer has {old!r}: update this test"
        text = text.replace(old, new)
    # As root Mosquitto drops to its own user, which cannot read pytest's 0700 directories.
    return text + ("\nuser root\n" if os.geteuid() == 0 else "")


def _start(conf: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [str(MOSQUITTO), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )

    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    if not wait_for(up, 10):
        proc.kill()
        err = proc.stderr.read().decode() if proc.stderr else ""
        pytest.fail(f"mosquitto did not start with {conf.name}: {err}")
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(10)
    if proc.stderr:
        proc.stderr.close()


@pytest.fixture(scope="module")
def central(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    d = tmp_path_factory.mktemp("central")
    (d / "data").mkdir()
    port = free_port()
    for name in ("ca.crt", "broker.crt", "broker.key"):
        shutil.copy(pki / name, d / name)
    shutil.copy(CONF / "osteofy.acl", d / "osteofy.acl")
    conf = d / "central.conf"
    conf.write_text(
        _shipped(
            "central.conf",
            {
                "/etc/mosquitto/osteofy/": f"{d}/",
                "persistence_location /var/lib/mosquitto/": f"persistence_location {d}/data/",
                "listener 8883\n": f"listener {port} 127.0.0.1\n",
            },
        )
    )
    proc = _start(conf, port)
    yield port
    _stop(proc)


class Client:
    """A paho MQTT 5 client that records what the broker answers."""

    def __init__(self, port: int, client_id: str, tls: tuple[Path, str, str] | None = None,
                 username: str | None = None, password: str | None = None) -> None:  # fmt: skip
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        if tls is not None:
            pki, ca, name = tls
            self.c.tls_set(
                ca_certs=str(pki / f"{ca}.crt"),
                certfile=str(pki / f"{name}.crt"),
                keyfile=str(pki / f"{name}.key"),
            )
        if username:
            self.c.username_pw_set(username, password)
        self.connected = threading.Event()
        self.connack: object = None
        self.acks: dict[int, object] = {}
        self.subacks: list[object] = []
        self.received: list[tuple[str, bytes]] = []
        self.c.on_connect = self._on_connect
        self.c.on_publish = lambda c, u, mid, rc, p: self.acks.__setitem__(mid, rc)
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.extend(rcs)
        self.c.on_message = lambda c, u, m: self.received.append((m.topic, m.payload))
        self.port = port

    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:  # noqa: ANN001
        self.connack = reason_code
        if not reason_code.is_failure:
            self.connected.set()

    def connect(self, timeout: float = 5.0) -> bool:
        try:
            self.c.connect("127.0.0.1", self.port, keepalive=10)
        except OSError:  # TLS refused during the handshake
            return False
        self.c.loop_start()
        return self.connected.wait(timeout)

    def publish(self, topic: str, payload: bytes = b"{}") -> object:
        info = self.c.publish(topic, payload, qos=1)
        assert wait_for(lambda: info.mid in self.acks, 5), f"no PUBACK for {topic}"
        return self.acks[info.mid]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_a_device_writes_under_its_own_topic_only(central: int, pki: Path) -> None:
    dash = Client(central, "osteofy-dashboard", (pki, "ca", "dashboard"))
    dev = Client(central, "edge-a", (pki, "ca", "edge-a"))
    try:
        assert dash.connect() and dev.connect()
        dash.c.subscribe("$share/osteofy-dashboard/osteofy/v1/+/+/#", qos=1)
        assert wait_for(lambda: dash.subacks, 5)
        assert not dash.subacks[0].is_failure, dash.subacks  # the dashboard may read all

        own = dev.publish("osteofy/v1/clinic-001/edge-a/result", b'{"n": 1}')
        other = dev.publish("osteofy/v1/clinic-001/edge-b/result", b'{"n": 2}')
        assert not own.is_failure
        assert other.is_failure and "authori" in str(other).lower(), other
        assert wait_for(lambda: dash.received, 5)
        time.sleep(0.5)
        assert dash.received == [("osteofy/v1/clinic-001/edge-a/result", b'{"n": 1}')]

        # A device reads nothing: Mosquitto grants the subscription but delivers no message.
        dev.c.subscribe("osteofy/v1/#", qos=1)
        assert wait_for(lambda: dev.subacks, 5)
        other_dev = Client(central, "edge-b", (pki, "ca", "edge-b"))
        try:
            assert other_dev.connect()
            assert not other_dev.publish("osteofy/v1/clinic-001/edge-b/result").is_failure
            assert wait_for(lambda: len(dash.received) == 2, 5)
            time.sleep(0.5)
            assert dev.received == []
        finally:
            other_dev.close()
    finally:
        dash.close()
        dev.close()


@pytest.mark.parametrize(
    "tls", [None, ("ca", "forged-edge-a")], ids=["no-certificate", "certificate-of-another-ca"]
)
def test_a_client_without_an_osteofy_certificate_gets_nothing(
    central: int, pki: Path, tls: tuple[str, str] | None
) -> None:
    if tls is None:
        c = Client(central, "edge-a")
        c.c.tls_set(ca_certs=str(pki / "ca.crt"))  # TLS, but no client certificate
    else:
        c = Client(central, "edge-a", (pki, *tls))
    try:
        assert not c.connect(timeout=3)
    finally:
        c.close()


def _publisher(tmp_path: Path, port: int, pki: Path, device_id: str, cert: str):  # noqa: ANN202
    cfg = Config(
        site_id="clinic-001",
        device_id=device_id,
        data_dir=tmp_path / "var",
        mqtt={
            "url": f"mqtts://127.0.0.1:{port}",
            "tls": {"ca": pki / "ca.crt", "cert": pki / f"{cert}.crt", "key": pki / f"{cert}.key"},
        },
    )
    outbox = outbox_with_one_feedback(tmp_path / f"{uuid.uuid4().hex}.sqlite", cfg)
    return Publisher(cfg, outbox, tmp_path), outbox


def test_the_device_publisher_passes_the_acl_with_its_last_will(
    central: int, pki: Path, tmp_path: Path
) -> None:
    pub, outbox = _publisher(tmp_path, central, pki, "edge-a", "edge-a")
    pub.start()
    try:
        assert wait_for(lambda: outbox.stats()["depth"] == 0, 20), pub.last_error
    finally:
        pub.stop(timeout=2)
        outbox.store.close()


def test_a_device_configured_with_another_id_cannot_publish(
    central: int, pki: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """device_id edge-b with edge-a's certificate: the broker refuses every message (MQTT 5
    PUBACK "Not authorized"); nothing is lost - it stays in the outbox - and the log says why."""
    pub, outbox = _publisher(tmp_path, central, pki, "edge-b", "edge-a")
    with caplog.at_level("ERROR", logger="edge.publisher"):
        pub.start()
        try:
            assert wait_for(
                lambda: any("Not authorized" in r.getMessage() for r in caplog.records), 20
            )
            assert outbox.stats()["depth"] == 1
        finally:
            pub.stop(timeout=2)
            outbox.store.close()


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd missing")
def test_the_device_broker_takes_local_passwords_and_the_same_acl(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "data").mkdir()
    shutil.copy(CONF / "osteofy.acl", tmp_path / "osteofy.acl")
    passwd = tmp_path / "passwd"
    for i, user in enumerate(("edge-01", "osteofy-dashboard")):
        create = ["-c"] if i == 0 else []
        subprocess.run(
            ["mosquitto_passwd", *create, "-b", str(passwd), user, "pw-" + user],
            check=True,
            capture_output=True,
        )
    conf = tmp_path / "device.conf"
    conf.write_text(
        _shipped(
            "device.conf",
            {
                "/etc/mosquitto/osteofy/": f"{tmp_path}/",
                "persistence_location /var/lib/mosquitto/": (
                    f"persistence_location {tmp_path}/data/"
                ),
                "listener 1883 127.0.0.1\n": f"listener {port} 127.0.0.1\n",
            },
        )
    )
    proc = _start(conf, port)
    anon = Client(port, "anonymous")
    dev = Client(port, "edge-01", username="edge-01", password="pw-edge-01")
    dash = Client(port, "dash", username="osteofy-dashboard", password="pw-osteofy-dashboard")
    try:
        assert not anon.connect(timeout=3)
        assert dev.connect() and dash.connect()
        dash.c.subscribe("osteofy/v1/+/+/#", qos=1)
        assert wait_for(lambda: dash.subacks, 5) and not dash.subacks[0].is_failure
        assert not dev.publish("osteofy/v1/clinic-001/edge-01/heartbeat").is_failure
        assert dev.publish("osteofy/v1/clinic-001/edge-02/heartbeat").is_failure
        assert wait_for(lambda: dash.received, 5)
        assert [t for t, _ in dash.received] == ["osteofy/v1/clinic-001/edge-01/heartbeat"]
    finally:
        for c in (anon, dev, dash):
            c.close()
        _stop(proc)
