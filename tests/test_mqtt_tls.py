"""MQTT over TLS with per-device client certificates; a wrong broker certificate is refused
with a clear message and the queued results are kept."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from mqtt_broker import MOSQUITTO, Broker, outbox_with_one_feedback, wait_for

from edge.publisher import Publisher, check_broker
from osteofy.config import Config

pytestmark = pytest.mark.skipif(
    MOSQUITTO is None or shutil.which("openssl") is None, reason="mosquitto or openssl missing"
)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(d: Path, name: str) -> None:
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.crt",
        cwd=d,
    )


def _signed(d: Path, ca: str, name: str, cn: str, server: bool) -> None:
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        f"/CN={cn}",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        cwd=d,
    )
    ext = d / f"{name}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n" if server else "extendedKeyUsage=clientAuth\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.crt",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        f"{name}.crt",
        "-extfile",
        ext.name,
        cwd=d,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "rogue")
    _signed(d, "ca", "server", "broker", server=True)
    _signed(d, "ca", "device", "edge-01", server=False)
    return d


@pytest.fixture()
def tls_broker(pki: Path, tmp_path: Path):
    broker = Broker(
        tmp_path / "broker",
        extra=(
            f"cafile {pki / 'ca.crt'}",
            f"certfile {pki / 'server.crt'}",
            f"keyfile {pki / 'server.key'}",
            "require_certificate true",
            "use_identity_as_username true",
        ),
    )
    broker.start()
    yield broker.port
    broker.stop()


def _config(tmp_path: Path, port: int, pki: Path, ca: str) -> Config:
    return Config(
        data_dir=tmp_path / "var",
        mqtt={
            "url": f"mqtts://127.0.0.1:{port}",
            "tls": {"ca": pki / f"{ca}.crt", "cert": pki / "device.crt", "key": pki / "device.key"},
        },
    )


def test_client_certificate_connection_drains_the_outbox(tls_broker, pki, tmp_path):
    cfg = _config(tmp_path, tls_broker, pki, "ca")
    ok, detail = check_broker(cfg)
    assert ok and "TLS" in detail
    outbox = outbox_with_one_feedback(tmp_path / "results.sqlite", cfg)
    pub = Publisher(cfg, outbox, tmp_path)
    pub.start()
    try:
        assert wait_for(lambda: outbox.stats()["depth"] == 0, 15)
    finally:
        pub.stop(timeout=2)
        outbox.store.close()


def test_an_untrusted_broker_is_refused_clearly_and_data_is_kept(tls_broker, pki, tmp_path, caplog):
    cfg = _config(tmp_path, tls_broker, pki, "rogue")  # we trust another CA than the broker's
    ok, detail = check_broker(cfg)
    assert not ok and "certificate refused" in detail
    outbox = outbox_with_one_feedback(tmp_path / "results.sqlite", cfg)
    pub = Publisher(cfg, outbox, tmp_path)
    with caplog.at_level("ERROR", logger="edge.publisher"):
        pub.start()
        assert wait_for(lambda: pub.last_error is not None, 15)
    try:
        assert "certificate refused" in pub.last_error
        assert not pub.connected.is_set()
        assert outbox.stats()["depth"] == 1
        assert any("certificate refused" in r.getMessage() for r in caplog.records)
    finally:
        pub.stop(timeout=1)
        outbox.store.close()
