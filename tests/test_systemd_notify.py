"""systemd readiness and watchdog: ``edge/sdnotify.py`` and ``osteofy edge serve`` under it.

The unit ``osteofy-edge.service`` is ``Type=notify`` with ``WatchdogSec=``; these tests play
systemd's side with a Unix datagram socket, as PID 1 would: READY must come after the models
are loaded, WATCHDOG pings must come from the main loop, so that a loop stuck inside one study
stops them (and systemd would kill and restart the service), and STOPPING on SIGTERM.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from edge import sdnotify

ROOT = Path(__file__).parent.parent


@pytest.fixture()
def short_dir() -> Iterator[Path]:
    """A short directory: a Unix socket path must fit in 108 bytes, pytest's tmp_path may not."""
    d = Path(tempfile.mkdtemp(prefix="sdn", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _bound(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    return sock


def _recv(sock: socket.socket, timeout: float = 2.0) -> bytes:
    sock.settimeout(timeout)
    return sock.recv(4096)


# --- the module ------------------------------------------------------------------------------


def test_without_notify_socket_everything_is_a_quiet_no_op() -> None:
    env: dict[str, str] = {}
    assert sdnotify.ready("x", environ=env) is False
    assert sdnotify.watchdog(environ=env) is False
    assert sdnotify.stopping(environ=env) is False
    assert sdnotify.status("x", environ=env) is False
    assert sdnotify.watchdog_interval(env) is None
    dog = sdnotify.Watchdog(env)
    assert not dog.enabled and dog.ping() is False


def test_datagrams_reach_a_socket_in_the_file_system(short_dir: Path) -> None:
    path = short_dir / "notify"
    env = {"NOTIFY_SOCKET": str(path)}
    with _bound(str(path)) as sock:
        assert sdnotify.ready("models loaded", environ=env)
        assert _recv(sock) == b"READY=1\nSTATUS=models loaded"
        assert sdnotify.watchdog(environ=env)
        assert _recv(sock) == b"WATCHDOG=1"
        assert sdnotify.status("3 studies", environ=env)
        assert _recv(sock) == b"STATUS=3 studies"
        assert sdnotify.stopping(environ=env)
        assert _recv(sock) == b"STOPPING=1"


def test_abstract_namespace_socket_with_at_sign() -> None:
    name = f"osteofy-test-{uuid.uuid4().hex}"
    env = {"NOTIFY_SOCKET": "@" + name}
    with _bound(b"\0" + name.encode()) as sock:
        assert sdnotify.watchdog(environ=env)
        assert _recv(sock) == b"WATCHDOG=1"


def test_status_text_cannot_inject_another_field(short_dir: Path) -> None:
    path = short_dir / "notify"
    env = {"NOTIFY_SOCKET": str(path)}
    with _bound(str(path)) as sock:
        sdnotify.status("bad\nREADY=1\r\n  name", environ=env)
        assert _recv(sock) == b"STATUS=bad READY=1 name"


def test_a_missing_socket_is_not_an_error(short_dir: Path) -> None:
    env = {"NOTIFY_SOCKET": str(short_dir / "nobody-listens")}
    assert sdnotify.ready(environ=env) is False  # logged at debug level, never raised
    assert sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": "relative/path"}) is False


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("2000000", None, 2.0),
        ("2000000", "self", 2.0),
        ("2000000", "1", None),  # WATCHDOG_PID of another process: inherited, not ours
        ("0", None, None),
        ("soon", None, None),
        ("", None, None),
        ("2000000", "x", None),
    ],
)
def test_watchdog_interval_follows_sd_watchdog_enabled(
    usec: str, pid: str | None, expected: float | None
) -> None:
    env = {"WATCHDOG_USEC": usec}
    if pid is not None:
        env["WATCHDOG_PID"] = str(os.getpid()) if pid == "self" else pid
    assert sdnotify.watchdog_interval(env) == expected


def test_watchdog_pings_at_most_every_quarter_interval(short_dir: Path) -> None:
    path = short_dir / "notify"
    env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"}  # 0.4 s: gap 0.1 s
    with _bound(str(path)) as sock:
        dog = sdnotify.Watchdog(env)
        assert dog.enabled and dog.min_gap == pytest.approx(0.1)
        assert dog.ping() is True
        assert dog.ping() is False  # a busy loop does not flood PID 1
        time.sleep(0.12)
        assert dog.ping() is True
        assert [_recv(sock), _recv(sock)] == [b"WATCHDOG=1", b"WATCHDOG=1"]


# --- osteofy edge serve under a fake service manager -----------------------------------------


# `osteofy edge serve` (the CLI's main) with one test hook, set from outside: screening a
# study named wedge-* first reads the FIFO DATA_DIR/gate, which blocks until the test opens it
# for writing - a stand-in for an inference call or a network-share read that never returns.
# Nothing of this is in the product's code.
WEDGED_SCREENER = """
import sys
from pathlib import Path

from edge.runtime import Screener

screen = Screener.screen


def wedged(self, path, *args, **kwargs):
    if Path(path).name.startswith("wedge-"):
        (Path(path).parent.parent / "gate").read_bytes()
    return screen(self, path, *args, **kwargs)


Screener.screen = wedged
from osteofy.cli import main

sys.exit(main(sys.argv[1:]))
"""


class FakeManager:
    """PID 1's notification socket: every datagram with the monotonic time it arrived."""

    def __init__(self) -> None:
        self.name = f"osteofy-test-{uuid.uuid4().hex}"
        self.sock = _bound(b"\0" + self.name.encode())  # the abstract form, as systemd uses
        self.messages: list[tuple[float, str]] = []

    def collect(self, seconds: float) -> list[tuple[float, str]]:
        """Messages arriving in the next ``seconds``."""
        got: list[tuple[float, str]] = []
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            got.append((time.monotonic(), data.decode()))
        self.messages += got
        return got

    def wait_for(self, field: str, timeout: float) -> float:
        """Time at which a message containing ``field`` arrives; fails after ``timeout``."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for t, msg in self.collect(min(0.5, max(0.0, end - time.monotonic()))):
                if field in msg.split("\n"):
                    return t
        pytest.fail(f"no {field} within {timeout} s; got {self.messages}")

    def close(self) -> None:
        self.sock.close()


def _pings(messages: list[tuple[float, str]]) -> list[float]:
    return [t for t, msg in messages if "WATCHDOG=1" in msg.split("\n")]


@pytest.mark.slow
def test_edge_serve_is_ready_pings_from_its_loop_and_a_hung_loop_goes_silent(
    tmp_path: Path,
) -> None:
    interval = 2.0
    cfg = tmp_path / "config.yaml"
    data = tmp_path / "var"
    cfg.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(data),
                "models_dir": str(ROOT / "models"),
                "precision": "fp32",  # no INT8-vs-FP32 timing at start: a faster test
                "mqtt": {"url": ""},
                "screen": {"host": "127.0.0.1", "port": 0},
            }
        )
    )
    manager = FakeManager()
    env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_PID", "NOTIFY_SOCKET")}
    env |= {"NOTIFY_SOCKET": "@" + manager.name, "WATCHDOG_USEC": str(int(interval * 1e6))}
    proc = subprocess.Popen(
        [sys.executable, "-c", WEDGED_SCREENER, "edge", "serve", "--config", str(cfg)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # 1. READY once the models are loaded, before any watchdog ping.
        manager.wait_for("READY=1", timeout=45)
        first = next(i for i, (_, m) in enumerate(manager.messages) if "READY=1" in m.split("\n"))
        assert "STATUS=screening hand, hip" in manager.messages[first][1]
        assert not _pings(manager.messages[:first]), "a ping before READY"

        # 2. An idle loop pings regularly, well within the interval.
        pings = _pings(manager.collect(3 * interval))
        assert len(pings) >= 4, manager.messages
        assert max(b - a for a, b in zip(pings, pings[1:], strict=False)) < interval / 2

        # 3. A study whose screening never returns hangs the main loop: the pings stop, while
        #    the process lives on (its web and MQTT threads too) - only a watchdog sees this.
        gate = data / "gate"
        os.mkfifo(gate)
        tmp = data / "inbox" / ".wedge-1.dcm.tmp"
        tmp.write_bytes(b"not a radiograph")
        tmp.rename(data / "inbox" / "wedge-1.dcm")  # atomically, as the bridge writes
        hung_at = time.monotonic()
        silent = manager.collect(1.0 + 2 * interval)
        late = [round(t - hung_at, 2) for t in _pings(silent) if t > hung_at + 1.0]
        assert late == [], f"pings continued while the loop was stuck: {late}"
        assert (data / "work" / "wedge-1.dcm").exists(), "the daemon did not take the study"
        assert proc.poll() is None, "it must hang, not exit"
        # systemd would have sent SIGABRT after `interval` s without a ping (WatchdogSec=).

        # 4. Unwedge it: the study goes on (and is refused: not DICOM), and the pings resume -
        #    they follow the loop's progress, not a clock.
        os.close(os.open(gate, os.O_WRONLY | os.O_NONBLOCK))  # the waiting reader gets EOF
        resumed = _pings(manager.collect(interval))
        assert resumed, "pings did not resume once the loop moved on"
        assert list((data / "quarantine").glob("*.reason.json")), "the study was not refused"

        # 5. SIGTERM: STOPPING=1, exit 0.
        proc.send_signal(signal.SIGTERM)
        manager.wait_for("STOPPING=1", timeout=20)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
        manager.close()
    assert "Traceback" not in stderr, stderr[-3000:]
