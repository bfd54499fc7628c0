"""Audit log of security-relevant events: append-only, hash-chained, durable, free of PHI.

Why it exists: after an incident a clinic must be able to show which model produced its
results, which senders were turned away, who failed to log in and which inputs were
quarantined - and to show that nobody edited that record afterwards. The service logs
(journald) are rotated, filtered and freely editable; this file is not.

Format: one JSON object per line (``DATA_DIR/audit.jsonl`` by convention)::

    {"seq": 7, "at": "2025-01-01T12:00:00.123Z", "kind": "quarantined",
     "detail": {"rule": "pixel_data"}, "prev": "<sha256 of line 6>"}

* ``seq`` starts at 1 and grows by one per event. It is read back from the file's last line,
  so it survives restarts and is shared by every process appending to the same file (an
  exclusive ``flock`` around read-last-line + append).
* ``prev`` is the sha256 of the previous line's bytes (64 zeros for the first), so editing,
  inserting or deleting any line breaks the chain at that point (:func:`verify`). Removing
  lines *at the end* leaves a shorter, valid chain: :func:`head` gives the last ``(seq, hash)``
  so it can be anchored elsewhere (published, printed) to detect that too.
* ``at`` is UTC wall-clock time, for people; order is ``seq``, so a clock that jumps back
  does not reorder the log.
* Every event is fsynced before :meth:`AuditLog.append` returns. A crash in the middle of a
  write can leave a torn last line (no newline); the next append cuts it off and records an
  ``audit_log_repaired`` event saying how many bytes went, so the chain stays verifiable.

``detail`` must never hold patient data: callers pass rule names, package names and hashes,
AE titles, addresses and counts - never DICOM values, file names from the inbox or exception
texts that might quote them. Values are limited to numbers, booleans, strings cut to one
printable line of 200 characters, and small lists/maps of those, which keeps free text (where
PHI hides) short, and a value from the wire can never break a line or the caller.

The daemons call :func:`configure` at start; :func:`audit_event` then writes there, and is a
no-op when nothing is configured (tests, tools such as ``quantize``), so library code can call
it unconditionally. A failure to write the audit log is logged as an error and does not stop
screening: losing the device's function would be worse than a gap, which the error shows.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from osteofy.compat import UTC

__all__ = [
    "AUDIT_FILE",
    "GENESIS",
    "AuditError",
    "AuditLog",
    "audit_config",
    "audit_event",
    "configure",
    "configured",
    "head",
    "running",
    "start",
    "verify",
]

log = logging.getLogger(__name__)

GENESIS = "0" * 64  # the ``prev`` of the first event
AUDIT_FILE = "audit.jsonl"  # in DATA_DIR
FIELDS = ("seq", "at", "kind", "detail", "prev")
MAX_TEXT = 200  # characters of one string value
MAX_ITEMS = 64  # entries of one list or map value
_KIND = re.compile(r"[a-z][a-z0-9_]{0,39}")
_KEY = re.compile(r"[a-z][a-z0-9_]{0,39}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_AT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
_TAIL_CHUNK = 4096
_FILE_MODE = 0o640  # no PHI inside; readable by the service group for review tools

Scalar = str | int | float | bool | None


class AuditError(Exception):
    """The audit log cannot be continued (its last line is not an event: tampered/corrupt)."""


# --- values --------------------------------------------------------------------------------


def _scalar(key: str, value: object) -> Scalar:
    """A JSON scalar; strings cut to one printable line of at most MAX_TEXT characters.

    Strings are cleaned rather than refused: a hook may pass a value from the wire (an AE
    title, an address), and a hostile one must not turn an audit call into a crash.
    """
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"audit detail {key}: not a finite number")
        return value
    if isinstance(value, str):
        return "".join(c if c.isprintable() else "?" for c in value[:MAX_TEXT])
    raise TypeError(f"audit detail {key}: {type(value).__name__} is not allowed")


def _value(key: str, value: object) -> object:
    if isinstance(value, Mapping):
        if len(value) > MAX_ITEMS:
            raise ValueError(f"audit detail {key}: more than {MAX_ITEMS} entries")
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"audit detail {key}: keys must be strings")
            out[str(_scalar(key, k))] = _scalar(f"{key}.{k}", v)
        return dict(sorted(out.items()))
    if isinstance(value, list | tuple):
        if len(value) > MAX_ITEMS:
            raise ValueError(f"audit detail {key}: more than {MAX_ITEMS} entries")
        return [_scalar(key, v) for v in value]
    return _scalar(key, value)


def _checked(kind: str, detail: Mapping[str, object]) -> dict[str, object]:
    """The event's detail, validated (raises ValueError/TypeError on a programming error)."""
    if not isinstance(kind, str) or not _KIND.fullmatch(kind):
        raise ValueError(f"audit kind must match {_KIND.pattern}: {kind!r}")
    for key in detail:
        if not _KEY.fullmatch(key):
            raise ValueError(f"audit detail key must match {_KEY.pattern}: {key!r}")
    return {k: _value(k, detail[k]) for k in sorted(detail)}


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _encode(event: Mapping[str, object]) -> bytes:
    return json.dumps(
        {k: event[k] for k in FIELDS}, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def _digest(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


# --- reading -------------------------------------------------------------------------------


def _tail(fd: int, size: int) -> tuple[bytes, int]:
    """(last complete line without its newline, offset just after it); (b"", 0) if none.

    Reads backwards from the end in small chunks: cost independent of the log's length.
    """
    data = os.pread(fd, min(_TAIL_CHUNK, size), size - min(_TAIL_CHUNK, size))
    start = size - len(data)
    last_nl = data.rfind(b"\n")
    while last_nl < 0 and start > 0:  # no newline at all yet: the whole tail is torn
        more = os.pread(fd, min(_TAIL_CHUNK, start), start - min(_TAIL_CHUNK, start))
        start -= len(more)
        data = more + data
        last_nl = data.rfind(b"\n")
    if last_nl < 0:
        return b"", 0
    end = start + last_nl + 1  # just after the last complete line
    prev_nl = data.rfind(b"\n", 0, last_nl)
    while prev_nl < 0 and start > 0:
        more = os.pread(fd, min(_TAIL_CHUNK, start), start - min(_TAIL_CHUNK, start))
        start -= len(more)
        last_nl += len(more)
        data = more + data
        prev_nl = data.rfind(b"\n", 0, last_nl)
    return data[prev_nl + 1 : last_nl], end


def _parse(line: bytes) -> dict[str, Any]:
    try:
        event = json.loads(line)
    except ValueError:
        raise AuditError("not JSON") from None
    if not isinstance(event, dict) or tuple(event) != FIELDS:
        raise AuditError(f"not an audit event (fields must be {', '.join(FIELDS)})")
    if not isinstance(event["seq"], int) or isinstance(event["seq"], bool) or event["seq"] < 1:
        raise AuditError("seq is not a positive integer")
    return event


# --- writing -------------------------------------------------------------------------------


class AuditLog:
    """One append-only, hash-chained JSON-lines audit file (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        # (inode, size, seq, hash) after our last append: skips re-reading the tail when no
        # other process has written since.
        self._cache: tuple[int, int, int, str] | None = None

    def append(self, kind: str, **detail: object) -> dict[str, object]:
        """Record one event durably (fsync) and return it; raises OSError or AuditError."""
        checked = _checked(kind, detail)
        with self._lock:
            flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
            fd = os.open(self.path, flags, _FILE_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # other processes appending to the same log
                info = os.fstat(fd)
                created = info.st_size == 0
                seq, prev, dropped = self._position(fd, info)
                if dropped:
                    repaired = self._event(
                        seq + 1, "audit_log_repaired", {"dropped_bytes": dropped}, prev
                    )
                    prev = self._write(fd, repaired)
                    seq += 1
                event = self._event(seq + 1, kind, checked, prev)
                digest = self._write(fd, event)
                self._cache = (info.st_ino, os.fstat(fd).st_size, seq + 1, digest)
            finally:
                os.close(fd)  # also releases the flock
            if created:
                _fsync_dir(self.path.parent)
        return event

    def _position(self, fd: int, info: os.stat_result) -> tuple[int, str, int]:
        """(last seq, its line's hash, torn bytes cut off) for the file as it is now."""
        cache = self._cache
        if cache is not None and cache[:2] == (info.st_ino, info.st_size):
            return cache[2], cache[3], 0
        if info.st_size == 0:
            return 0, GENESIS, 0
        line, end = _tail(fd, info.st_size)
        dropped = info.st_size - end
        if dropped:  # a write torn by a crash: it was never acknowledged, so it never counted
            os.ftruncate(fd, end)
            os.fsync(fd)
            log.warning("audit log %s: cut %d bytes of a torn last line", self.path, dropped)
        if not line:
            return 0, GENESIS, dropped
        try:
            last = _parse(line)
        except AuditError as exc:
            raise AuditError(f"{self.path}: the last line is {exc}; run verify()") from None
        return int(last["seq"]), _digest(line), dropped

    @staticmethod
    def _event(seq: int, kind: str, detail: Mapping[str, object], prev: str) -> dict[str, object]:
        return {"seq": seq, "at": _utc_now(), "kind": kind, "detail": dict(detail), "prev": prev}

    @staticmethod
    def _write(fd: int, event: Mapping[str, object]) -> str:
        line = _encode(event)
        data = memoryview(line + b"\n")
        while data:
            n = os.write(fd, data)
            if n <= 0:
                raise OSError(errno.EIO, "short write to the audit log")
            data = data[n:]
        os.fsync(fd)
        return _digest(line)

    def events(self) -> Iterator[dict[str, Any]]:
        """Every complete event in order (unverified: use :func:`verify` to trust them)."""
        yield from _events(self.path)

    def last(self, kind: str) -> dict[str, Any] | None:
        """The most recent event of ``kind``, or None (reads the whole file: start-up use)."""
        found = None
        for event in self.events():
            if event["kind"] == kind:
                found = event
        return found


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _events(path: Path) -> Iterator[dict[str, Any]]:
    try:
        fh = open(path, "rb")  # noqa: SIM115 - a generator owns it
    except FileNotFoundError:
        return
    with fh:
        for raw in fh:
            if raw.endswith(b"\n"):
                try:
                    yield _parse(raw[:-1])
                except AuditError:
                    continue


# --- checking ------------------------------------------------------------------------------


def verify(path: Path) -> tuple[bool, str]:
    """``(True, summary)`` when every line is an event whose seq and ``prev`` chain hold.

    Otherwise ``(False, reason)`` naming the first line that breaks the chain: an edited,
    inserted, removed or reordered line, a torn last line, or a file that is not an audit log.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return False, f"{path}: no audit log"
    except OSError as exc:
        return False, f"{path}: unreadable ({exc.strerror or exc})"
    if not data:
        return True, "0 events"
    lines = data.split(b"\n")
    if lines[-1]:
        return False, f"line {len(lines)}: incomplete last line (a torn write)"
    expected = GENESIS
    for n, line in enumerate(lines[:-1], start=1):
        try:
            event = _parse(line)
        except AuditError as exc:
            return False, f"line {n}: {exc}"
        if event["seq"] != n:
            return False, f"line {n}: seq {event['seq']} where {n} was expected"
        if event["prev"] != expected:
            return False, f"line {n}: the previous line was changed (hash chain broken)"
        if not (isinstance(event["kind"], str) and _KIND.fullmatch(event["kind"])):
            return False, f"line {n}: invalid kind"
        if not (isinstance(event["at"], str) and _AT.fullmatch(event["at"])):
            return False, f"line {n}: invalid time stamp"
        if not isinstance(event["detail"], dict):
            return False, f"line {n}: detail is not an object"
        expected = _digest(line)
    count = len(lines) - 1
    return True, f"{count} events, chain intact, head {expected[:16]}"


def head(path: Path) -> tuple[int, str]:
    """``(seq, sha256)`` of the last complete line, ``(0, GENESIS)`` for an empty/missing log.

    Publish or print it now and then: a later log whose chain does not pass through it has lost
    events at its end, which the chain alone cannot show.
    """
    try:
        fd = os.open(Path(path), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return 0, GENESIS
    try:
        line, _ = _tail(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    if not line:
        return 0, GENESIS
    return int(_parse(line)["seq"]), _digest(line)


# --- the process's default log ---------------------------------------------------------------

_default: AuditLog | None = None


def configure(path: Path | None) -> AuditLog | None:
    """Make ``path`` the log :func:`audit_event` writes to (None: auditing off). Daemons call
    this once at start, e.g. ``configure(cfg.data_dir / "audit.jsonl")``."""
    global _default
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    _default = None if path is None else AuditLog(Path(path))
    return _default


def configured() -> AuditLog | None:
    """The default log, or None when auditing is off in this process."""
    return _default


def audit_event(kind: str, **detail: object) -> dict[str, object] | None:
    """Record an event in the default log; a no-op (returning None) when none is configured.

    A bad ``kind`` or ``detail`` raises even then (a programming error, found by any test); an
    unwritable log is logged as an error and does not raise: the caller's work goes on.
    """
    checked = _checked(kind, detail)
    target = _default
    if target is None:
        return None
    try:
        return target.append(kind, **checked)
    except (OSError, AuditError) as exc:
        log.error("audit log %s: could not record a %s event (%s)", target.path, kind, exc)
        return None


def start(
    daemon: str, data_dir: Path, effective: Mapping[str, object], source: object = None
) -> AuditLog | None:
    """What a daemon calls once at start (``osteofy edge|bridge|dashboard serve``).

    Makes ``DATA_DIR/audit.jsonl`` the default log (daemons of one device share it: appends
    are serialised by ``flock``), records the configuration (``config_loaded``, and
    ``config_changed`` when it differs from the last start's) and ``daemon_started``.
    """
    from osteofy import __version__

    log_ = configure(Path(data_dir) / AUDIT_FILE)
    audit_config(f"{daemon}: {source or 'embedded defaults'}", effective)
    audit_event("daemon_started", daemon=daemon, version=__version__)
    return log_


@contextmanager
def running(
    daemon: str, data_dir: Path, effective: Mapping[str, object], source: object = None
) -> Iterator[AuditLog | None]:
    """:func:`start` for the life of a ``with`` block, then ``daemon_stopped`` and auditing off.

    A ``daemon_started`` without its ``daemon_stopped`` is a crash or a kill; turning the
    default off again keeps a finished command from writing into a log it no longer owns.
    """
    log_ = start(daemon, data_dir, effective, source)
    try:
        yield log_
    finally:
        audit_event("daemon_stopped", daemon=daemon)
        configure(None)


def config_digest(effective: Mapping[str, object]) -> str:
    """sha256 of a configuration as canonical JSON (paths and values; secrets are paths)."""
    text = json.dumps(effective, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def audit_config(source: str, effective: Mapping[str, object]) -> dict[str, object] | None:
    """Record the configuration a daemon starts with: ``config_loaded``, and ``config_changed``
    when its digest differs from the one the previous start recorded (so a change made while
    the device was off still shows up)."""
    target = _default
    if target is None:
        return None
    digest = config_digest(effective)
    try:
        before = target.last("config_loaded")
    except OSError:
        before = None
    previous = None if before is None else before["detail"].get("digest")
    if previous is not None and previous != digest:
        audit_event("config_changed", source=source[-MAX_TEXT:], digest=digest, previous=previous)
    return audit_event("config_loaded", source=source[-MAX_TEXT:], digest=digest)
