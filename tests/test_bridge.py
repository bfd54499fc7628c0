"""firmware_bridge: the C-STORE receiver, the hot folder, the inbox spool and the service.

Every association runs on 127.0.0.1 against a real receiver; every wait is bounded. The
studies carry canary patient names/IDs, and the logs are checked for them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest

pytest.importorskip("pynetdicom", reason="the bridge extra (pynetdicom) is not installed")

from pynetdicom import AE  # noqa: E402

from firmware_bridge.dicom_scp import (  # noqa: E402
    STORAGE_SOP_CLASSES,
    TRANSFER_SYNTAXES,
    DicomReceiver,
    address_allowed,
)
from firmware_bridge.errors import InboxFull  # noqa: E402
from firmware_bridge.hot_folder import HotFolder, open_for_writing  # noqa: E402
from firmware_bridge.options import (  # noqa: E402
    BridgeOptions,
    DicomOptions,
    HotFolderOptions,
)
from firmware_bridge.service import Bridge, serve  # noqa: E402
from firmware_bridge.spool import Inbox, new_name  # noqa: E402
from osteofy.config import Config  # noqa: E402

CANARY_NAME = "CANARY^PHIPATIENT"
CANARY_ID = "CANARY-PHI-4711"
NAME_RE = re.compile(r"\d{8}T\d{12}Z-[0-9a-f]{16}\.dcm")
ROOT = Path(__file__).resolve().parent.parent


# --- fixtures and helpers ----------------------------------------------------------------


def _with_canary(src: Path, dst: Path, sop_instance: str | None = None) -> Path:
    ds = pydicom.dcmread(src)
    ds.PatientName = CANARY_NAME
    ds.PatientID = CANARY_ID
    if sop_instance:
        ds.SOPInstanceUID = sop_instance
        ds.file_meta.MediaStorageSOPInstanceUID = sop_instance
    ds.save_as(dst, enforce_file_format=True)
    return dst


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three uncompressed hand and two JPEG 2000 hip studies (max side 256), canary names."""
    from cohort.generate import SimulateOptions, simulate

    root = tmp_path_factory.mktemp("bridge_cohort")
    for site, n, seed, compression in (("hand", 3, 31, "none"), ("hip", 2, 32, "j2k")):
        opts = SimulateOptions(
            max_side=256, compression=compression, counterfactual=False, workers=1
        )
        simulate(root / compression, site, n, seed, options=opts, progress=False)
    out = root / "canary"
    out.mkdir()
    files = sorted((root / "none").glob("*.dcm")) + sorted((root / "j2k").glob("*.dcm"))
    return [_with_canary(f, out / f.name) for f in files]


@pytest.fixture()
def inbox(tmp_path: Path) -> Inbox:
    box = Inbox(tmp_path / "inbox", reserve_bytes=0)
    box.create()
    return box


def _options(**kw) -> DicomOptions:
    base = DicomOptions(
        host="127.0.0.1",
        port=0,
        acse_timeout_s=3.0,
        network_timeout_s=5.0,
        dimse_timeout_s=5.0,
        max_associations=2,
        max_pending=8,
    )
    return replace(base, **kw)


@pytest.fixture()
def receiver(inbox: Inbox):
    rx = DicomReceiver(_options(), inbox)
    rx.start()
    yield rx
    rx.stop()


def _scu(ae_title: str = "DIGITIZER") -> AE:
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for sop in STORAGE_SOP_CLASSES:
        for syntax in TRANSFER_SYNTAXES[:4]:  # one context each: the SCP picks one per context
            ae.add_requested_context(sop, syntax)
    ae.add_requested_context("1.2.840.10008.1.1")
    return ae


def _store(port: int, path: Path, ae_title: str = "DIGITIZER") -> int | None:
    """C-STORE one file with pynetdicom; the status, or None if no association."""
    ae = _scu(ae_title)
    assoc = ae.associate("127.0.0.1", port, ae_title="OSTEOFY")
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(pydicom.dcmread(path))
        return int(status.Status) if "Status" in status else None
    finally:
        assoc.release()


def _echo(port: int) -> bool:
    assoc = _scu().associate("127.0.0.1", port, ae_title="OSTEOFY")
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return "Status" in status and status.Status == 0
    finally:
        assoc.release()


def _inbox_files(box: Inbox) -> list[Path]:
    return sorted(p for p in box.directory.iterdir() if not p.name.startswith("."))


def _assert_no_phi(text: str) -> None:
    assert "CANARY" not in text.upper(), "patient data in the logs"
    assert "PHIPATIENT" not in text.upper()


def _wait(predicate, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


# --- the inbox spool ---------------------------------------------------------------------


def test_generated_names_are_unique_and_not_from_the_data() -> None:
    names = {new_name() for _ in range(200)}
    assert len(names) == 200
    assert all(NAME_RE.fullmatch(n) for n in names)


def test_stale_temp_files_of_a_killed_run_are_removed_and_nothing_else(inbox: Inbox) -> None:
    ours = inbox.directory / f".{new_name()}.ab_c1234.tmp"
    foreign = inbox.directory / ".something-else.tmp"
    study = inbox.directory / new_name()
    for p in (ours, foreign, study):
        p.write_bytes(b"x")
    assert inbox.remove_stale_temps() == 1
    assert not ours.exists() and foreign.exists() and study.exists()


def test_a_failed_write_leaves_nothing_in_the_inbox(inbox: Inbox) -> None:
    def broken(fh) -> None:
        fh.write(b"half")
        raise OSError("disk went away")

    with pytest.raises(OSError):
        inbox.deliver(broken)
    assert list(inbox.directory.iterdir()) == []


def test_inbox_refuses_when_the_disk_is_nearly_full(tmp_path: Path) -> None:
    box = Inbox(tmp_path, reserve_bytes=shutil.disk_usage(tmp_path).free + (1 << 30))
    with pytest.raises(InboxFull):
        box.deliver(lambda fh: fh.write(b"x"))
    assert list(tmp_path.iterdir()) == []


# --- the C-STORE receiver ----------------------------------------------------------------


def test_accepted_syntaxes_are_what_the_device_can_decode() -> None:
    from edge.ingest import SOP_CLASSES
    from edge.ingest import TRANSFER_SYNTAXES as INGEST_SYNTAXES

    assert set(TRANSFER_SYNTAXES) == {str(u) for u in INGEST_SYNTAXES}
    assert set(SOP_CLASSES) <= set(STORAGE_SOP_CLASSES)


def test_address_allowlist_takes_addresses_and_networks() -> None:
    assert address_allowed("10.1.2.3", ())
    assert address_allowed("10.1.2.3", ("10.1.2.3",))
    assert address_allowed("10.1.2.3", ("192.168.0.9", "10.1.0.0/16"))
    assert not address_allowed("10.2.0.1", ("10.1.0.0/16",))
    assert not address_allowed("not-an-ip", ("10.1.0.0/16",))
    assert not address_allowed("10.1.2.3", ("garbage",))


def test_stores_are_durable_byte_identical_and_logged_without_phi(
    receiver: DicomReceiver, inbox: Inbox, studies: list[Path], caplog
) -> None:
    caplog.set_level(logging.DEBUG, logger="firmware_bridge")
    for path in studies:
        assert _store(receiver.port, path) == 0x0000
    files = _inbox_files(inbox)
    assert len(files) == len(studies)
    assert all(NAME_RE.fullmatch(f.name) for f in files)
    assert [p for p in inbox.directory.iterdir() if p.name.startswith(".")] == []
    received = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, files)}
    for path in studies:
        src = pydicom.dcmread(path)
        got = received[str(src.SOPInstanceUID)]
        assert got.PixelData == src.PixelData
        assert got.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID
        assert got.file_meta.SourceApplicationEntityTitle == "DIGITIZER"
    assert {str(d.file_meta.TransferSyntaxUID) for d in received.values()} == {
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.4.90",
    }
    from edge.ingest import load_study
    from osteofy.config import IngestConfig

    rules = IngestConfig(min_side=64)  # the test images are small (max side 256)
    for f in files:  # what arrives is what the edge daemon accepts
        assert load_study(f, rules, sites_available={"hand", "hip"}).site
    assert "stored a study" in caplog.text
    _assert_no_phi(caplog.text)


def test_the_same_study_sent_twice_gives_identical_files(
    receiver: DicomReceiver, inbox: Inbox, studies: list[Path]
) -> None:
    """A retry after a lost response must be recognisable (the edge daemon dedups by sha256)."""
    assert _store(receiver.port, studies[0]) == 0
    assert _store(receiver.port, studies[0]) == 0
    a, b = _inbox_files(inbox)
    assert a.read_bytes() == b.read_bytes()


def test_echo_succeeds(receiver: DicomReceiver) -> None:
    assert _echo(receiver.port)


@pytest.mark.parametrize("failure", ["full", "io"])
def test_a_store_that_cannot_be_made_durable_fails_and_leaves_nothing(
    receiver: DicomReceiver, inbox: Inbox, studies: list[Path], monkeypatch, failure: str
) -> None:
    def full(size_hint: int) -> None:
        raise InboxFull("no space")

    def fsync_fails(fd: int) -> None:
        raise OSError(5, "Input/output error")

    if failure == "full":
        monkeypatch.setattr(inbox, "check_space", full)
    else:
        monkeypatch.setattr("osteofy.fsutil.os.fsync", fsync_fails)
    assert _store(receiver.port, studies[0]) == 0xA700
    assert list(inbox.directory.iterdir()) == []
    assert receiver.failed == 1


def test_calling_ae_allowlist_refuses_strangers_and_logs_without_phi(
    inbox: Inbox, studies: list[Path], caplog
) -> None:
    caplog.set_level(logging.INFO, logger="firmware_bridge")
    rx = DicomReceiver(_options(allowed_calling_aets=("DIGITIZER",)), inbox)
    rx.start()
    try:
        assert _store(rx.port, studies[0], ae_title="INTRUDER") is None
        assert _store(rx.port, studies[0], ae_title="DIGITIZER") == 0
    finally:
        rx.stop()
    assert len(_inbox_files(inbox)) == 1
    assert "refused an association from 127.0.0.1 (AE 'INTRUDER')" in caplog.text
    _assert_no_phi(caplog.text)


def test_address_allowlist_refuses_other_hosts(inbox: Inbox, caplog) -> None:
    caplog.set_level(logging.INFO, logger="firmware_bridge")
    rx = DicomReceiver(_options(allowed_addresses=("192.0.2.0/24",)), inbox)
    rx.start()
    try:
        assert not _echo(rx.port)
    finally:
        rx.stop()
    assert "refused a connection from 127.0.0.1" in caplog.text


def test_wrong_called_ae_title_is_refused(receiver: DicomReceiver) -> None:
    assoc = _scu().associate("127.0.0.1", receiver.port, ae_title="SOMEONE")
    assert assoc.is_rejected


def test_association_limit_refuses_extra_and_recovers(receiver: DicomReceiver) -> None:
    held = [_scu().associate("127.0.0.1", receiver.port, ae_title="OSTEOFY") for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        extra = _scu().associate("127.0.0.1", receiver.port, ae_title="OSTEOFY")
        assert extra.is_rejected
    finally:
        for a in held:
            a.release()
    assert _wait(lambda: _echo(receiver.port), 5.0)


def test_when_full_an_idle_association_makes_room_for_a_new_one(inbox: Inbox) -> None:
    rx = DicomReceiver(_options(preempt_idle_s=0.5), inbox)
    rx.start()
    try:
        held = [_scu().associate("127.0.0.1", rx.port, ae_title="OSTEOFY") for _ in range(2)]
        assert all(a.is_established for a in held)
        time.sleep(0.8)
        assert _echo(rx.port)
        assert _wait(lambda: sum(a.is_established for a in held) == 1, 5.0)
        assert rx.gate.preempted == 1
        for a in held:
            if a.is_established:
                a.release()
    finally:
        rx.stop()


def test_an_idle_association_is_dropped_after_the_network_timeout(inbox: Inbox) -> None:
    rx = DicomReceiver(_options(network_timeout_s=1.0), inbox)
    rx.start()
    try:
        assoc = _scu().associate("127.0.0.1", rx.port, ae_title="OSTEOFY")
        assert assoc.is_established
        assert _wait(lambda: not assoc.is_established, 8.0)
        assert _echo(rx.port)
    finally:
        rx.stop()


def _associate_rq_bytes() -> bytes:
    """A well-formed A-ASSOCIATE-RQ PDU, to corrupt."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context

    prim = A_ASSOCIATE()
    prim.application_context_name = "1.2.840.10008.3.1.1.1"
    prim.calling_ae_title = "FUZZER"
    prim.called_ae_title = "OSTEOFY"
    try:  # pynetdicom 3
        from pynetdicom.transport import AddressInformation

        prim.calling_presentation_address = AddressInformation("127.0.0.1", 1)
        prim.called_presentation_address = AddressInformation("127.0.0.1", 2)
    except ImportError:  # pynetdicom 2
        prim.calling_presentation_address = ("127.0.0.1", 1)
        prim.called_presentation_address = ("127.0.0.1", 2)
    cx = build_context("1.2.840.10008.1.1")
    cx.context_id = 1
    prim.presentation_context_definition_list = [cx]
    ml = MaximumLengthNotification()
    ml.maximum_length_received = 16384
    prim.user_information = [ml]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    return bytes(pdu.encode())


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on fuzzed UIDs in the RQs
def test_garbage_malformed_pdus_and_idle_connections_do_not_lock_out_the_digitizer(
    inbox: Inbox, studies: list[Path]
) -> None:
    receiver = DicomReceiver(_options(preempt_idle_s=1.0, acse_timeout_s=2.0), inbox)
    receiver.start()
    rng = random.Random(7)
    port = receiver.port
    rq = _associate_rq_bytes()
    malformed = [
        rng.randbytes(2000),  # noise
        b"\x01\x00" + struct.pack(">I", 0xFFFFFFF0) + b"\x00" * 10,  # claims a 4 GB RQ
        b"\x01\x00\x00\x00\x00\x10" + rng.randbytes(16),  # RQ with nonsense items
        b"\x04\x00\x00\x00\x00\x06" + b"\x00" * 6,  # P-DATA before any association
        b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00",  # A-ABORT out of the blue
        rq[:40],  # a truncated RQ
    ]
    for _ in range(12):  # RQs with random damage
        damaged = bytearray(rq)
        for _ in range(3):
            damaged[rng.randrange(6, len(damaged))] = rng.randrange(256)
        malformed.append(bytes(damaged))
    junk: list[socket.socket] = []
    try:
        for payload in malformed:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(payload)
            junk.append(s)
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(20)]
        junk.extend(idle)
        # The digitizer's association succeeds while all of that is still connected. Damaged
        # RQs that still parse hold association slots; until they have been silent for
        # preempt_idle_s (1 s) a newcomer is rejected by design, and a digitizer retries.
        status = None
        for _ in range(4):  # bounded: a lockout would outlast every try
            status = _store(port, studies[0])
            if status is not None:
                break
            time.sleep(1.0)
        assert status == 0x0000
        echoed = False
        for _ in range(4):  # the same rule: a slot held by a damaged RQ frees within 1 s
            echoed = _echo(port)
            if echoed:
                break
            time.sleep(1.0)
        assert echoed
        assert receiver.healthy()
        # Idle connections are dropped: evicted at once, or after acse_timeout_s (3 s).
        for s in idle:
            s.settimeout(10)
            with contextlib.suppress(ConnectionResetError):  # closed, either way
                assert s.recv(1024) == b""
    finally:
        for s in junk:
            s.close()
        receiver.stop()
    assert len(_inbox_files(inbox)) == 1
    assert receiver.gate.evicted >= 1


# --- with dcmtk --------------------------------------------------------------------------

dcmtk = pytest.mark.skipif(
    shutil.which("storescu") is None or shutil.which("echoscu") is None,
    reason="dcmtk's storescu/echoscu are not installed",
)


def _storescu(port: int, path: Path, timeout: float = 20.0, extra: tuple[str, ...] = ()) -> bool:
    """True only if storescu reported a Success status for the file."""
    syntax = ("-xv",) if "4.90" in str(pydicom.dcmread(path).file_meta.TransferSyntaxUID) else ()
    cmd = [
        "storescu",
        "-v",
        *syntax,
        *extra,
        "-aet",
        "DIGITIZER",
        "-aec",
        "OSTEOFY",
        "-to",
        "3",
        "-ta",
        "3",
        "-td",
        "5",
        "127.0.0.1",
        str(port),
        str(path),
    ]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0 and "Received Store Response (Success)" in done.stdout + done.stderr


@pytest.mark.dcmtk
@dcmtk
def test_storescu_uncompressed_and_jpeg2000_arrive_byte_identical(
    receiver: DicomReceiver, inbox: Inbox, studies: list[Path], caplog
) -> None:
    caplog.set_level(logging.DEBUG, logger="firmware_bridge")
    echo = subprocess.run(
        ["echoscu", "-aec", "OSTEOFY", "127.0.0.1", str(receiver.port)],
        capture_output=True,
        timeout=20,
    )
    assert echo.returncode == 0
    for path in studies:
        assert _storescu(receiver.port, path)
    received = {str(d.SOPInstanceUID): d for d in map(pydicom.dcmread, _inbox_files(inbox))}
    assert len(received) == len(studies)
    for path in studies:
        src = pydicom.dcmread(path)
        got = received[str(src.SOPInstanceUID)]
        assert got.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID
        assert got.PixelData == src.PixelData
        assert got.PatientID == CANARY_ID  # the data set is stored as sent
    _assert_no_phi(caplog.text)


class BridgeProcess:
    """``python -m firmware_bridge.service`` as a child process, to kill and restart."""

    def __init__(self, tmp_path: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.inbox = tmp_path / "var" / "inbox"
        config = tmp_path / "config.yaml"
        config.write_text(
            f"data_dir: {tmp_path / 'var'}\nmqtt: {{url: ''}}\n"
            f"bridge:\n  dicom: {{port: {self.port}}}\n"
        )
        spool = tmp_path / "spool"  # pynetdicom's received-data-set temp files
        spool.mkdir()
        self.env = {**os.environ, "TMPDIR": str(spool), "PYTHONPATH": str(ROOT)}
        self.cmd = [
            sys.executable,
            "-m",
            "firmware_bridge.service",
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
        ]
        self.log_path = tmp_path / "bridge.log"
        self.log = self.log_path.open("ab")
        self.proc: subprocess.Popen | None = None
        self.kills = 0

    def listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def start(self) -> None:
        proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=self.log, stderr=self.log)
        self.proc = proc
        assert _wait(lambda: self.listening() or proc.poll() is not None, 20.0)
        assert proc.poll() is None, self.log_path.read_text()[-2000:]

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL: no cleanup of any kind
        self.proc.wait(timeout=10)
        self.kills += 1

    def peak_rss_kib(self) -> int:
        assert self.proc is not None
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status)[1])  # type: ignore[index]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
        self.log.close()


@pytest.mark.slow
@pytest.mark.dcmtk
@dcmtk
def test_kill_9_while_200_studies_are_sent_loses_no_acknowledged_study(
    tmp_path: Path, studies: list[Path]
) -> None:
    """SIGKILL the bridge at random moments: acknowledged = complete; nothing partial visible."""
    t_start = time.monotonic()
    rng = random.Random(2024)
    send_dir = tmp_path / "send"
    send_dir.mkdir()
    sent = [
        _with_canary(studies[i % 3], send_dir / f"s{i:03d}.dcm", pydicom.uid.generate_uid())
        for i in range(200)  # uncompressed, 256 px
    ]
    bridge = BridgeProcess(tmp_path)
    lock = threading.Lock()
    done = threading.Event()
    bad: list[str] = []

    def killer() -> None:
        while not done.wait(rng.uniform(0.4, 1.6)):
            with lock:
                bridge.kill9()
                if not done.is_set():
                    bridge.start()

    def watcher() -> None:
        """Parse every visible inbox file as soon as it appears: none may be partial."""
        checked: set[str] = set()
        while not done.is_set():
            for entry in os.scandir(bridge.inbox):
                if entry.name.startswith(".") or entry.name in checked:
                    continue
                checked.add(entry.name)
                try:
                    ds = pydicom.dcmread(entry.path)
                    if len(ds.PixelData) != ds.Rows * ds.Columns * 2:
                        bad.append(entry.name)
                except Exception:
                    bad.append(entry.name)
            time.sleep(0.01)

    bridge.start()
    threads = [threading.Thread(target=killer), threading.Thread(target=watcher)]
    for t in threads:
        t.start()
    acknowledged: list[Path] = []
    try:
        for path in sent:
            for _ in range(40):  # a digitizer retries until it gets a status
                if time.monotonic() - t_start > 55:
                    break
                if _storescu(bridge.port, path, timeout=10):
                    acknowledged.append(path)
                    break
                time.sleep(0.05)
    finally:
        done.set()
        for t in threads:
            t.join(timeout=20)
        with lock:
            bridge.stop()
    elapsed = time.monotonic() - t_start
    assert len(acknowledged) == 200, f"only {len(acknowledged)} sent in {elapsed:.0f} s"
    assert bridge.kills >= 3
    assert bad == []
    by_uid: dict[str, list[pydicom.Dataset]] = {}
    for f in _inbox_files(Inbox(bridge.inbox)):
        ds = pydicom.dcmread(f)  # every visible file parses completely
        by_uid.setdefault(str(ds.SOPInstanceUID), []).append(ds)
    for path in acknowledged:
        src = pydicom.dcmread(path)
        copies = by_uid.get(str(src.SOPInstanceUID))
        assert copies, f"{path.name} was acknowledged but is not in the inbox"
        assert all(c.PixelData == src.PixelData for c in copies)
    _assert_no_phi(bridge.log_path.read_text(errors="replace"))
    files = sum(len(v) for v in by_uid.values())
    print(
        f"kill -9: {bridge.kills} kills, {len(acknowledged)} acknowledged, "
        f"{files} files for {len(by_uid)} studies, {elapsed:.1f} s"
    )
    assert elapsed < 60


@pytest.mark.slow
@pytest.mark.dcmtk
@dcmtk
def test_a_large_study_is_received_without_memory_growing_with_its_size(
    tmp_path: Path, studies: list[Path]
) -> None:
    """A 96 MB data set: the bridge's peak RSS grows by far less than the study's size."""
    ds = pydicom.dcmread(studies[0])
    ds.Rows, ds.Columns = 6000, 8000
    ds.PixelData = bytes(6000 * 8000 * 2)
    big = tmp_path / "big.dcm"
    ds.save_as(big, enforce_file_format=True)
    del ds
    bridge = BridgeProcess(tmp_path)
    bridge.start()
    try:
        assert _storescu(bridge.port, studies[0])  # warm up every code path first
        before = bridge.peak_rss_kib()
        assert _storescu(bridge.port, big, timeout=120)
        growth_mib = (bridge.peak_rss_kib() - before) / 1024
    finally:
        bridge.stop()
    (received,) = [f for f in _inbox_files(Inbox(bridge.inbox)) if f.stat().st_size > 9e7]
    assert received.stat().st_size >= big.stat().st_size - 1024
    print(f"large study: {big.stat().st_size >> 20} MiB received, peak RSS +{growth_mib:.1f} MiB")
    assert growth_mib < 24


# --- hot folder --------------------------------------------------------------------------


def _hot(tmp_path: Path, inbox: Inbox, quiet_s: float = 0.3) -> HotFolder:
    hf = HotFolder(HotFolderOptions(path=tmp_path / "hot", poll_s=0.05, quiet_s=quiet_s), inbox)
    hf.folder.mkdir()
    hf.processed_dir.mkdir()
    hf.rejected_dir.mkdir()
    return hf


def _poll(hf: HotFolder, seconds: float) -> int:
    taken = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        taken += hf.scan_once()
        time.sleep(0.05)
    return taken


def test_open_for_writing_sees_our_own_writer(tmp_path: Path) -> None:
    path = tmp_path / "f"
    with path.open("wb"):
        st = path.stat()
        open_now = open_for_writing()
        if open_now is None:
            pytest.skip("no /proc on this system")
        assert (st.st_dev, st.st_ino) in open_now
    after = open_for_writing()
    assert after is not None and (st.st_dev, st.st_ino) not in after


def test_a_file_held_open_by_a_slow_writer_is_not_taken_until_complete(
    tmp_path: Path, inbox: Inbox, studies: list[Path], caplog
) -> None:
    caplog.set_level(logging.DEBUG, logger="firmware_bridge")
    hf = _hot(tmp_path, inbox, quiet_s=0.2)
    data = studies[0].read_bytes()
    target = hf.folder / "DOE_CANARY_PHIPATIENT.dcm"  # digitizers name files after patients
    with target.open("wb") as fh:
        for i in range(0, len(data) - 1000, len(data) // 5):
            fh.write(data[i : i + len(data) // 5])
            fh.flush()
            # pauses longer than the quiet period: only "open for writing" protects us
            assert _poll(hf, 0.5) == 0
        fh.write(data[fh.tell() :])
        fh.flush()
        assert _poll(hf, 0.5) == 0
        assert _inbox_files(inbox) == []
    assert _wait(lambda: hf.scan_once() > 0, 5.0)
    (taken,) = _inbox_files(inbox)
    assert taken.read_bytes() == data
    assert (hf.processed_dir / target.name).read_bytes() == data
    assert not target.exists()
    _assert_no_phi(caplog.text)


def test_a_file_written_in_pieces_with_closes_waits_for_the_quiet_period(
    tmp_path: Path, inbox: Inbox, studies: list[Path]
) -> None:
    """Writers on another machine (SMB) are invisible in /proc: size/mtime must settle."""
    hf = _hot(tmp_path, inbox, quiet_s=0.6)
    data = studies[1].read_bytes()
    target = hf.folder / "scan.dcm"
    step = len(data) // 4
    for i in range(0, len(data), step):
        with target.open("ab") as fh:
            fh.write(data[i : i + step])
        assert _poll(hf, 0.25) == 0  # changes faster than the quiet period
    assert _wait(lambda: hf.scan_once() > 0, 5.0)
    (taken,) = _inbox_files(inbox)
    assert taken.read_bytes() == data


def test_non_dicom_goes_to_rejected_with_a_reason_and_temp_names_are_left(
    tmp_path: Path, inbox: Inbox
) -> None:
    import json

    hf = _hot(tmp_path, inbox, quiet_s=0.0)
    (hf.folder / "notes.txt").write_text("not an image")
    (hf.folder / "upload.dcm.part").write_bytes(b"\0" * 128 + b"DICM")
    (hf.folder / ".hidden.dcm").write_bytes(b"\0" * 128 + b"DICM")
    (hf.folder / "not-started.dcm").write_bytes(b"")
    _poll(hf, 0.3)
    assert _inbox_files(inbox) == []
    (reason,) = hf.rejected_dir.glob("*.reason.json")
    record = json.loads(reason.read_text())
    assert "not a DICOM file" in record["reason"]
    assert record["original_name"] == "notes.txt"
    for name in ("upload.dcm.part", ".hidden.dcm", "not-started.dcm"):
        assert (hf.folder / name).exists()
    assert hf.rejected == 1


def test_a_second_file_with_the_same_name_keeps_both_originals(
    tmp_path: Path, inbox: Inbox, studies: list[Path]
) -> None:
    hf = _hot(tmp_path, inbox, quiet_s=0.0)
    for study in studies[:2]:
        shutil.copy(study, hf.folder / "image.dcm")
        assert _wait(lambda: hf.scan_once() > 0, 3.0)
    assert len(_inbox_files(inbox)) == 2
    assert sorted(p.name for p in hf.processed_dir.iterdir()) == ["image.1.dcm", "image.dcm"]


# --- the service -------------------------------------------------------------------------


def test_options_follow_the_configuration(tmp_path: Path) -> None:
    cfg = Config(
        data_dir=tmp_path / "var",
        bridge={
            "dicom": {"ae_title": "EDGE1", "port": 104, "allowed_calling_aets": ["DX1"]},
            "hot_folder": tmp_path / "hot",
            "serial": "/dev/ttyUSB0",
        },
    )
    o = BridgeOptions.from_config(cfg)
    assert o.inbox == tmp_path / "var" / "inbox"
    assert o.dicom is not None and o.dicom.ae_title == "EDGE1" and o.dicom.port == 104
    assert o.dicom.allowed_calling_aets == ("DX1",)
    assert o.hot_folder is not None and o.hot_folder.path == tmp_path / "hot"
    assert o.serial is not None and o.serial.device == "/dev/ttyUSB0"
    assert BridgeOptions.from_config(Config(data_dir=tmp_path)).hot_folder is None


def test_bridge_runs_the_enabled_adapters_into_one_inbox(
    tmp_path: Path, studies: list[Path]
) -> None:
    options = BridgeOptions(
        inbox=tmp_path / "var" / "inbox",
        dicom=_options(),
        hot_folder=HotFolderOptions(path=tmp_path / "hot", poll_s=0.05, quiet_s=0.1),
        reserve_bytes=0,
    )
    bridge = Bridge(options)
    bridge.start()
    try:
        port = bridge.adapter("dicom").port  # type: ignore[attr-defined]
        assert _store(port, studies[0]) == 0
        shutil.copy(studies[1], tmp_path / "hot" / "x.dcm")
        assert _wait(lambda: len(_inbox_files(bridge.inbox)) == 2, 5.0)
        assert bridge.dead() == []
    finally:
        bridge.stop()


def test_serve_returns_0_when_stopped_and_4_when_the_port_is_taken(tmp_path: Path) -> None:
    from osteofy.errors import Unavailable

    cfg = Config(data_dir=tmp_path / "var")
    stop = threading.Event()
    options = BridgeOptions(inbox=tmp_path / "var" / "inbox", dicom=_options())
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(serve(cfg, stop, options=options)))
    t.start()
    time.sleep(0.5)
    stop.set()
    t.join(timeout=10)
    assert result == [0]

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = replace(options, dicom=_options(port=busy.getsockname()[1]))
        with pytest.raises(Unavailable) as info:
            serve(cfg, threading.Event(), options=taken)
        assert info.value.exit_code == 4


def test_a_study_delivered_twice_is_screened_once_by_the_edge_daemon(
    device_config: Config, small_hand_cohort: Path
) -> None:
    """The contract with edge/serve.py: a sender's retry after a lost response is harmless."""
    from edge.serve import EdgeService

    study = sorted(small_hand_cohort.glob("*.dcm"))[0]
    options = BridgeOptions.from_config(device_config)  # the inbox edge serve watches
    bridge = Bridge(replace(options, dicom=_options(), reserve_bytes=0))
    bridge.start()
    try:
        port = bridge.adapter("dicom").port  # type: ignore[attr-defined]
        assert _store(port, study) == 0 and _store(port, study) == 0
    finally:
        bridge.stop()
    service = EdgeService(device_config)
    try:
        assert service.run_once() == 2
        rows = service.store.db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    finally:
        service.close()
    assert rows == 1
    assert len(list((device_config.data_dir / "done").iterdir())) == 2
