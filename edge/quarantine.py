"""Quarantine: where a rejected or unreadable input goes, with its reason (STYLE.md habit 5).

Nothing is ever deleted: a clinic must be able to show what arrived and why it was refused,
and an engineer must be able to reproduce a rejection. The file is *moved* to a generated
name (UTC time + random hex) in the quarantine folder - never a name built from DICOM values,
which are attacker-controlled (``../``, ``/``) and may identify the patient - and a
``<name>.reason.json`` beside it says why. The original file name is recorded only in that
local reason file (it may carry a UID); it is never logged or published.

Order: the reason file is written (durably) before the move, so a quarantined file always has
its reason; a crash in between leaves the input where it was, to be rejected again.
Each quarantine is an audit event carrying the rule name only (edge/audit.py).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import shutil
from datetime import datetime
from pathlib import Path

from edge.audit import audit_event
from osteofy.compat import UTC
from osteofy.fsutil import atomic_write, fsync_dir

__all__ = ["REASON_SUFFIX", "quarantine", "reason_path"]

log = logging.getLogger(__name__)

REASON_SUFFIX = ".reason.json"
_DIR_MODE = 0o700  # quarantined files hold patient data


def reason_path(quarantined: Path) -> Path:
    """The reason file of a quarantined file."""
    return quarantined.with_name(quarantined.name + REASON_SUFFIX)


def _fresh_name(directory: Path, now: datetime) -> Path:
    """A name no file in ``directory`` has: time-ordered for people, random for uniqueness."""
    while True:
        name = f"{now:%Y%m%dT%H%M%S%fZ}-{secrets.token_hex(8)}"
        candidate = directory / name
        if not candidate.exists() and not reason_path(candidate).exists():
            return candidate


def _move(src: Path, dst: Path) -> None:
    """``os.replace``; across file systems copy, fsync, rename, and only then unlink."""
    try:
        os.replace(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        tmp = dst.with_name(f".{dst.name}.tmp")
        try:
            with open(src, "rb") as fin, open(tmp, "xb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
                fout.flush()
                os.fsync(fout.fileno())
            os.replace(tmp, dst)
        except BaseException:
            tmp.unlink(missing_ok=True)  # our partial copy; the input is untouched
            raise
        fsync_dir(dst.parent)
        os.unlink(src)
    fsync_dir(src.parent)
    fsync_dir(dst.parent)


def quarantine(
    path: Path,
    reason: str,
    quarantine_dir: Path,
    *,
    rule: str | None = None,
    now: datetime | None = None,
) -> Path:
    """Move ``path`` into ``quarantine_dir`` under a generated name; return the new path.

    ``reason`` should be the one-line rejection text (``str(InputRejected)``), ``rule`` the
    name of the rule that failed (``IngestRejected.rule``). Raises OSError only if the file
    cannot be moved at all; then it stays where it was.
    """
    path, quarantine_dir = Path(path), Path(quarantine_dir)
    now = (now or datetime.now(UTC)).astimezone(UTC)
    quarantine_dir.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    dest = _fresh_name(quarantine_dir, now)
    record = {
        "reason": " ".join(str(reason).split()),
        "rule": rule,
        "quarantined_at": now.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "original_name": path.name,  # local only: never logged, never published
        "size_bytes": path.stat().st_size,
    }
    data = (json.dumps(record, ensure_ascii=True, indent=2) + "\n").encode("ascii")
    atomic_write(reason_path(dest), lambda fh: fh.write(data), mode=0o600)
    try:
        _move(path, dest)
    except BaseException:
        reason_path(dest).unlink(missing_ok=True)  # our own record of a move that did not happen
        raise
    log.info("quarantined an input as %s (rule %s)", dest.name, rule or "unknown")
    audit_event("quarantined", rule=_rule_name(rule))
    return dest


def _rule_name(rule: str | None) -> str:
    """The rule as an audit value: an identifier, never free text (which could quote PHI)."""
    if rule and len(rule) <= 40 and rule.replace("_", "").isalnum() and rule.isascii():
        return rule
    return "unknown"
