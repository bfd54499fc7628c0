"""Faults the device must survive: a full disk and a clock that jumps (docs/security.md).

Disk full is real, not simulated: ``data_dir`` lives on an 8 MiB tmpfs (mounting needs root;
without it these tests skip and say so) and a filler file takes the space away at the chosen
moment. For each place a write can fail - the overlays of an accepted study, the reason file of
a rejected one, the SQLite commit of a result with its outbox rows, the outbox delete after a
PUBACK - the study must stay in ``work/`` (or the message in the outbox), the database must
pass ``PRAGMA integrity_check``, and once the space returns the same service (or a restarted
one) must finish the work. These tests found three gaps (the daemon ending on a full disk at
the commit, paho's network thread dying on a full disk at a PUBACK, the result list following
the wall clock); they are fixed and the tests guard them.

Clock jumps use monkeypatched clocks (``edge.result.datetime`` for ``created_at``,
``edge.outbox.time`` for queue ages): publishing order is the outbox sequence and ages never go
negative, whatever the wall clock does. A broker certificate that fails verification is
covered by tests/test_mqtt_tls.py.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest

import edge.outbox
import edge.result
import edge.serve
from edge.runtime import Screener
from edge.serve import EdgeService
from osteofy.compat import UTC
from osteofy.config import Config

ROOT = Path(__file__).parent.parent
FS_SIZE = "8m"


@pytest.fixture(scope="module")
def screener(tmp_path_factory: pytest.TempPathFactory) -> Screener:
    """One set of loaded models for every service in this module (its data_dir is apart)."""
    cfg = Config(
        data_dir=tmp_path_factory.mktemp("screener"),
        models_dir=ROOT / "models",
        precision="fp32",
        mqtt={"url": ""},
    )
    return Screener(cfg)


@pytest.fixture()
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs mounted for this test (skips where mounting is not allowed)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={FS_SIZE},mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


class Filler:
    """Takes a file system's free space away (all of it, or all but ``leave`` bytes)."""

    def __init__(self, fs: Path) -> None:
        self.path = fs / "filler"

    def fill(self, leave: int = 0) -> None:
        st = os.statvfs(self.path.parent)
        free = st.f_bavail * st.f_frsize
        with open(self.path, "ab") as fh:
            size = os.fstat(fh.fileno()).st_size
            if free > leave:
                os.posix_fallocate(fh.fileno(), size, free - leave)

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


def _config(data_dir: Path, **mqtt: object) -> Config:
    return Config(
        data_dir=data_dir,
        models_dir=ROOT / "models",
        precision="fp32",
        mqtt={"url": "", **mqtt},
    )


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _integrity(service: EdgeService) -> str:
    with service.store._lock:
        return str(service.store.db.execute("PRAGMA integrity_check").fetchone()[0])


def _temp_files(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


@pytest.fixture()
def no_retry_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(edge.serve, "RETRY_S", 0.0)  # the daemon waits 5 s before retrying


# --- disk full -------------------------------------------------------------------------------


def test_disk_full_while_writing_overlays_keeps_the_study_and_recovers(
    small_fs: Path, screener: Screener, device_scans: list[Path], caplog, no_retry_wait
) -> None:
    service = EdgeService(_config(small_fs / "var"), screener=screener)
    study = service.folders.inbox / "s.dcm"
    shutil.copy(device_scans[0], study)
    digest = _sha(study)
    filler = Filler(small_fs)
    filler.fill(leave=64 * 1024)  # room for the claim, not for the overlays
    with caplog.at_level(logging.ERROR, logger="edge.serve"):
        assert service.run_once() == 0
    alarm = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("No space left on device" in m and "stays in work/" in m for m in alarm), alarm
    assert _sha(service.folders.work / "s.dcm") == digest  # kept, byte for byte
    assert service.store.count() == 0 and _integrity(service) == "ok"
    assert _temp_files(service.folders.root) == []
    filler.release()
    assert service.run_once() == 1
    assert service.store.count() == 1 and (service.folders.done / "s.dcm").is_file()
    assert _integrity(service) == "ok"
    service.close()


def test_disk_full_while_quarantining_keeps_the_input_and_recovers(
    small_fs: Path, screener: Screener, caplog, no_retry_wait
) -> None:
    service = EdgeService(_config(small_fs / "var"), screener=screener)
    junk = service.folders.inbox / "junk.dcm"
    junk.write_bytes(b"\x00" * 4096)
    filler = Filler(small_fs)
    filler.fill()
    with caplog.at_level(logging.ERROR, logger="edge.serve"):
        assert service.run_once() == 0
    assert "No space left on device" in caplog.text
    assert (service.folders.work / "junk.dcm").read_bytes() == b"\x00" * 4096
    assert list(service.folders.quarantine.iterdir()) == []  # no reason file without its input
    assert _integrity(service) == "ok" and _temp_files(service.folders.root) == []
    filler.release()
    assert service.run_once() == 1
    assert len(list(service.folders.quarantine.glob("*.reason.json"))) == 1
    assert service.store.rejections()[0]["rule"] == "dicom_file"
    service.close()


def _outbox_on_full_disk(small_fs: Path, tmp_path: Path, screener: Screener) -> EdgeService:
    """A service whose overlays live off the small file system, so the commit is what fails."""
    data_dir = small_fs / "var"
    data_dir.mkdir()
    (tmp_path / "overlays").mkdir()
    (data_dir / "overlays").symlink_to(tmp_path / "overlays")
    return EdgeService(_config(data_dir), screener=screener)


def test_disk_full_at_the_result_and_outbox_commit_loses_nothing(
    small_fs: Path, tmp_path: Path, screener: Screener, device_scans: list[Path], no_retry_wait
) -> None:
    service = _outbox_on_full_disk(small_fs, tmp_path, screener)
    shutil.copy(device_scans[0], service.folders.inbox / "s.dcm")
    filler = Filler(small_fs)
    filler.fill()
    try:
        service.run_once()
    except sqlite3.OperationalError as exc:  # today: the daemon exits, systemd restarts it
        assert "full" in str(exc)
    assert (service.folders.work / "s.dcm").is_file()
    assert service.store.count() == 0 and service.outbox.depth() == 0
    assert _integrity(service) == "ok"
    filler.release()
    service.close()
    restarted = EdgeService(_config(small_fs / "var"), screener=screener)
    assert restarted.run_once() == 1
    assert restarted.store.count() == 1 and restarted.outbox.depth() == 2
    assert _integrity(restarted) == "ok"
    restarted.close()


def test_disk_full_at_the_commit_is_an_alarm_and_the_daemon_keeps_running(
    small_fs: Path, tmp_path: Path, screener: Screener, device_scans: list[Path], caplog,
    no_retry_wait,
) -> None:  # fmt: skip
    service = _outbox_on_full_disk(small_fs, tmp_path, screener)
    shutil.copy(device_scans[0], service.folders.inbox / "s.dcm")
    Filler(small_fs).fill()
    try:
        with caplog.at_level(logging.ERROR, logger="edge.serve"):
            assert service.run_once() == 0
        assert "full" in caplog.text and (service.folders.work / "s.dcm").is_file()
    finally:
        service.close()


def _one_result(service: EdgeService, scan: Path) -> None:
    shutil.copy(scan, service.folders.inbox / scan.name)
    assert service.run_once() == 1


def test_disk_full_when_a_puback_arrives_keeps_the_message_queued(
    small_fs: Path, screener: Screener, device_scans: list[Path]
) -> None:
    service = EdgeService(_config(small_fs / "var"), screener=screener)
    _one_result(service, device_scans[0])
    (first, *_) = service.outbox.pending(set(), 10)
    filler = Filler(small_fs)
    filler.fill()
    with pytest.raises(sqlite3.OperationalError, match="full"):
        service.outbox.acknowledged(first.seq)
    assert service.outbox.depth() == 2 and _integrity(service) == "ok"  # sent again later
    filler.release()
    service.outbox.acknowledged(first.seq)
    assert service.outbox.depth() == 1 and _integrity(service) == "ok"
    service.close()


def test_a_puback_on_a_full_disk_does_not_kill_the_mqtt_thread(
    small_fs: Path, screener: Screener, device_scans: list[Path]
) -> None:
    from edge.publisher import Publisher

    cfg = _config(small_fs / "var", url="mqtt://127.0.0.1:9")  # never connected here
    service = EdgeService(cfg, screener=screener)
    _one_result(service, device_scans[0])
    (first, *_) = service.outbox.pending(set(), 10)
    publisher = Publisher(cfg, service.outbox, service.folders.overlays)
    publisher._inflight[1] = first.seq
    Filler(small_fs).fill()
    try:
        publisher._on_publish(publisher.client, None, 1, None, None)  # paho's PUBACK callback
        assert service.outbox.depth() == 2
    finally:
        service.close()


# --- clock jumps -----------------------------------------------------------------------------


class FakeClock:
    """A wall clock the test moves; ``datetime`` and ``time`` stand-ins read it."""

    def __init__(self, start: datetime) -> None:
        self.now = start
        clock = self

        class _Datetime(datetime):
            @classmethod
            def now(cls, tz=None):  # type: ignore[no-untyped-def,override]  # noqa: ANN001,ANN206
                return clock.now if tz is not None else clock.now.replace(tzinfo=None)

        self.datetime = _Datetime
        self.time = SimpleNamespace(time=lambda: clock.now.timestamp())


@pytest.fixture()
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock(datetime(2025, 6, 1, 12, 0, tzinfo=UTC))
    monkeypatch.setattr(edge.result, "datetime", fake.datetime)  # created_at of results
    monkeypatch.setattr(edge.outbox, "time", fake.time)  # outbox ages
    return fake


def _study(src: Path, dst: Path, i: int) -> Path:
    ds = pydicom.dcmread(src)
    ds.PatientID, ds.StudyInstanceUID = f"CLOCK-{i}", f"1.2.826.0.1.3680043.8.498.77{i}"
    ds.save_as(dst)
    return dst


def test_a_clock_going_backwards_keeps_publishing_order_and_queue_ages_sane(
    clock: FakeClock, screener: Screener, device_scans: list[Path], tmp_path: Path
) -> None:
    service = EdgeService(_config(tmp_path / "var"), screener=screener)
    _study(device_scans[0], service.folders.inbox / "a.dcm", 1)
    assert service.run_once() == 1
    clock.now -= timedelta(days=1)  # an RTC reset, or NTP stepping back
    _study(device_scans[1], service.folders.inbox / "b.dcm", 2)
    assert service.run_once() == 1
    rows = service.store.db.execute("SELECT result_id, created_at FROM results").fetchall()
    assert len(rows) == 2 and rows[0][1] > rows[1][1]  # the second result is "older"
    pending = service.outbox.pending(set(), 10)
    assert [m.kind for m in pending] == ["result", "overlay", "result", "overlay"]
    assert [m.ref for m in pending][::2] == [rows[0][0], rows[1][0]]  # sent in screening order
    clock.now += timedelta(seconds=30)
    assert service.outbox.stats()["oldest_age_s"] == pytest.approx(30.0, abs=1.0)
    clock.now -= timedelta(days=3)  # behind every queued message
    stats = service.outbox.stats()
    assert stats["oldest_age_s"] == 0.0 and stats["depth"] == 4 and not stats["alarm"]
    service.close()


def test_the_newest_result_is_listed_first_even_after_the_clock_went_back(
    clock: FakeClock, screener: Screener, device_scans: list[Path], tmp_path: Path
) -> None:
    service = EdgeService(_config(tmp_path / "var"), screener=screener)
    _study(device_scans[0], service.folders.inbox / "a.dcm", 1)
    service.run_once()
    clock.now -= timedelta(hours=2)
    _study(device_scans[1], service.folders.inbox / "b.dcm", 2)
    service.run_once()
    newest = service.store.db.execute(
        "SELECT result_id FROM results ORDER BY rowid DESC"
    ).fetchone()
    try:
        assert service.store.results()[0]["result_id"] == newest[0]
    finally:
        service.close()
