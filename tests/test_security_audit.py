"""The audit log (edge/audit.py): sequence, durability, hash chain, hooks, and no PHI in it."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge import audit
from edge.audit import GENESIS, AuditLog, audit_config, audit_event, head, verify
from edge.package import load_package
from edge.quarantine import quarantine
from osteofy.errors import Unavailable

ROOT = Path(__file__).parent.parent


@pytest.fixture()
def default_log(tmp_path: Path) -> Iterator[AuditLog]:
    log = audit.configure(tmp_path / "audit.jsonl")
    assert log is not None
    try:
        yield log
    finally:
        audit.configure(None)


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def test_events_are_numbered_chained_and_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    first = log.append("model_loaded", package="hand-v1", version="1.0.0")
    log.append("quarantined", rule="pixel_data")
    assert first["seq"] == 1 and first["prev"] == GENESIS and first["at"].endswith("Z")
    restarted = AuditLog(path)  # a new process: the sequence continues from the file
    third = restarted.append("association_rejected", peer="10.0.0.9", calling_ae="EVIL")
    assert third["seq"] == 3
    assert verify(path) == (True, f"3 events, chain intact, head {head(path)[1][:16]}")
    events = list(restarted.events())
    assert [e["seq"] for e in events] == [1, 2, 3]
    assert events[1]["detail"] == {"rule": "pixel_data"}
    assert head(path)[0] == 3 and os.stat(path).st_mode & 0o777 == 0o640


def test_every_event_is_fsynced_before_append_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    log = AuditLog(tmp_path / "audit.jsonl")
    for i in range(3):
        before = len(calls)
        log.append("quarantined", rule="header")
        assert len(calls) > before, f"event {i} returned without fsync"


@pytest.mark.parametrize(
    "tamper,where",
    [
        ("edit", "line 3: the previous line was changed"),
        ("delete", "line 2: seq 3 where 2 was expected"),
        ("swap", "line 2: seq 3 where 2 was expected"),
        ("insert", "line 3: seq 99 where 3 was expected"),
        ("torn", "line 6: incomplete last line"),
        ("garbage", "line 4: not JSON"),
    ],
)
def test_tampering_is_detected(tmp_path: Path, tamper: str, where: str) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    for rule in ("header", "pixel_data", "modality", "ood", "bits"):
        log.append("quarantined", rule=rule)
    lines = _lines(path)
    if tamper == "edit":
        lines[1] = lines[1].replace(b"pixel_data", b"dimensions")
    elif tamper == "delete":
        del lines[1]
    elif tamper == "swap":
        lines[1], lines[2] = lines[2], lines[1]
    elif tamper == "insert":
        event = json.loads(lines[1])
        lines.insert(2, json.dumps({**event, "seq": 99}, separators=(",", ":")).encode())
    elif tamper == "garbage":
        lines[3] = b"not an event"
    text = b"\n".join(lines) + b"\n"
    path.write_bytes(text + (b'{"seq":6,"at"' if tamper == "torn" else b""))
    ok, reason = verify(path)
    assert not ok and reason.startswith(where), reason


def test_removing_events_at_the_end_is_caught_by_an_anchored_head(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    for rule in ("header", "pixel_data", "ood"):
        log.append("quarantined", rule=rule)
    anchored = head(path)  # e.g. published in the heartbeat, printed by an inspector
    path.write_bytes(b"\n".join(_lines(path)[:2]) + b"\n")
    assert verify(path)[0]  # a shorter chain is still a valid chain...
    assert head(path) != anchored  # ...but not the one that was anchored


def test_a_torn_last_line_is_cut_and_recorded_on_the_next_append(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    AuditLog(path).append("quarantined", rule="header")
    with path.open("ab") as fh:
        fh.write(b'{"seq":2,"at":"2025-')  # a power cut in the middle of a write
    assert not verify(path)[0]
    event = AuditLog(path).append("quarantined", rule="ood")
    events = list(AuditLog(path).events())
    assert [e["kind"] for e in events] == ["quarantined", "audit_log_repaired", "quarantined"]
    assert events[1]["detail"] == {"dropped_bytes": 20} and event["seq"] == 3
    assert verify(path)[0]


def test_an_unreadable_last_line_stops_the_chain_loudly(tmp_path: Path, caplog) -> None:
    path = tmp_path / "audit.jsonl"
    AuditLog(path).append("quarantined", rule="header")
    with path.open("ab") as fh:
        fh.write(b"edited by hand\n")
    with pytest.raises(audit.AuditError, match="last line"):
        AuditLog(path).append("quarantined", rule="ood")
    audit.configure(path)
    try:
        with caplog.at_level(logging.ERROR, logger="edge.audit"):
            assert audit_event("quarantined", rule="ood") is None  # the caller goes on
    finally:
        audit.configure(None)
    assert "could not record a quarantined event" in caplog.text


def test_processes_appending_at_once_share_one_sequence(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    code = (
        "import sys; from pathlib import Path; from edge.audit import AuditLog\n"
        "log = AuditLog(Path(sys.argv[1]))\n"
        "for i in range(40): log.append('quarantined', rule='p' + sys.argv[2])\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(path), str(n)], cwd=ROOT)
        for n in range(3)
    ]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    assert verify(path) == (True, f"120 events, chain intact, head {head(path)[1][:16]}")


def test_details_are_short_flat_values_never_free_text(default_log: AuditLog) -> None:
    hostile_ae = 'EVIL\r\n{"seq":1}' + "x" * 300  # from the wire: cleaned, never refused
    event = audit_event("association_rejected", calling_ae=hostile_ae, peer="10.0.0.9")
    assert event is not None
    value = event["detail"]["calling_ae"]
    assert value.startswith('EVIL??{"seq":1}') and len(value) == 200 and value.isprintable()
    assert verify(default_log.path)[0] and len(_lines(default_log.path)) == 1
    audit.configure(None)
    for bad in ({"nested": {"a": {"b": 1}}}, {"value": object()}, {"value": float("nan")},
                {"Bad-Key": 1}):  # fmt: skip
        with pytest.raises((ValueError, TypeError)):
            audit_event("quarantined", **bad)  # programming errors: refused even with no log
    with pytest.raises(ValueError):
        audit_event("Quarantined!")
    assert audit_event("quarantined", rule="ok") is None  # no log configured: a no-op


def test_a_daemon_records_its_configuration_start_and_stop(tmp_path: Path) -> None:
    with audit.running("edge", tmp_path, {"site_id": "c1"}, "/etc/osteofy/config.yaml") as log:
        assert audit.configured() is log is not None
    assert audit.configured() is None  # a finished command leaves no default behind
    with audit.running("bridge", tmp_path, {"site_id": "c1"}, None):
        pass
    events = list(AuditLog(tmp_path / audit.AUDIT_FILE).events())
    assert [e["kind"] for e in events] == [
        "config_loaded", "daemon_started", "daemon_stopped",
        "config_loaded", "daemon_started", "daemon_stopped",
    ]  # fmt: skip
    assert events[0]["detail"]["source"] == "edge: /etc/osteofy/config.yaml"
    assert events[3]["detail"]["source"] == "bridge: embedded defaults"
    assert events[1]["detail"]["daemon"] == "edge" and events[1]["detail"]["version"]


def test_configuration_loads_and_changes_are_recorded(default_log: AuditLog) -> None:
    audit_config("/etc/osteofy/config.yaml", {"site_id": "clinic-001", "mqtt": {"url": ""}})
    audit_config("/etc/osteofy/config.yaml", {"site_id": "clinic-001", "mqtt": {"url": ""}})
    audit_config("/etc/osteofy/config.yaml", {"site_id": "clinic-001", "mqtt": {"url": "x"}})
    kinds = [e["kind"] for e in default_log.events()]
    assert kinds == ["config_loaded", "config_loaded", "config_changed", "config_loaded"]
    changed = [e for e in default_log.events() if e["kind"] == "config_changed"][0]
    assert changed["detail"]["previous"] != changed["detail"]["digest"]


def test_model_loads_and_refusals_are_audited(default_log: AuditLog, tmp_path: Path) -> None:
    package = load_package(ROOT / "models" / "hand-v1")
    loaded = list(default_log.events())[-1]
    assert loaded["kind"] == "model_loaded"
    assert loaded["detail"]["package"] == "hand-v1" and loaded["detail"]["verified"] is True
    assert loaded["detail"]["files"] == package.card["files"]
    tampered = tmp_path / "hand-v1"
    shutil.copytree(ROOT / "models" / "hand-v1", tampered, ignore=shutil.ignore_patterns("eval*"))
    onnx = tampered / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0x01  # the one-byte flip of tests/test_quantize.py
    onnx.write_bytes(bytes(data))
    with pytest.raises(Unavailable, match="integrity check"):
        load_package(tampered)
    refused = list(default_log.events())[-1]
    assert refused["kind"] == "model_refused"
    assert refused["detail"] == {"check": "sha256", "package": "hand-v1"}
    assert verify(default_log.path)[0]


def test_each_quarantine_is_audited_with_its_rule_only(
    default_log: AuditLog, tmp_path: Path
) -> None:
    for i, rule in enumerate(("pixel_data", "DOE^JANE said so", None)):
        src = tmp_path / f"PATIENT-DOE-{i}.dcm"
        src.write_bytes(b"DOE^JANE")
        quarantine(src, "reason quoting DOE^JANE", tmp_path / "q", rule=rule)
    events = [e for e in default_log.events() if e["kind"] == "quarantined"]
    assert [e["detail"] for e in events] == [
        {"rule": "pixel_data"},
        {"rule": "unknown"},
        {"rule": "unknown"},
    ]
    assert b"DOE" not in default_log.path.read_bytes()
