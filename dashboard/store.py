"""The dashboard's store: one small interface, SQLite (default) and PostgreSQL (a fleet).

Exactly-once storage from at-least-once delivery: every row has the message's own key
(``result_id``, ``feedback_id``, the overlay's (site, device, result_id)) as its primary key
and is written with ``INSERT … ON CONFLICT DO NOTHING`` — a redelivered message, or the same
message taken by a second dashboard instance, changes nothing. Payloads are kept verbatim as
JSON text (they were validated on the way in), plus the few columns the pages sort and filter
on. Devices are one row each, upserted from ``status`` and ``heartbeat``.

Both back ends share the SQL (:class:`SqlStore`); each adds only its connection handling.
:func:`open_store` picks one by URL scheme and imports psycopg only when PostgreSQL is chosen.
Writes and reads raise :class:`StoreError` when the database cannot serve them: the subscriber
then leaves the message unacknowledged (the broker delivers it again), the web answers 503.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.messages import Feedback, Heartbeat, Status
from edge.result import Result
from osteofy.errors import Unavailable, UsageError

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    result_id   TEXT PRIMARY KEY,
    site_id     TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    received_at TEXT NOT NULL,
    payload     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS results_newest ON results (created_at, result_id);
CREATE INDEX IF NOT EXISTS results_site ON results (site_id, created_at);
CREATE TABLE IF NOT EXISTS overlays (
    site_id     TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    result_id   TEXT NOT NULL,
    received_at TEXT NOT NULL,
    png         {blob} NOT NULL,
    PRIMARY KEY (site_id, device_id, result_id)
);
CREATE TABLE IF NOT EXISTS feedback (
    feedback_id TEXT PRIMARY KEY,
    result_id   TEXT NOT NULL,
    site_id     TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    received_at TEXT NOT NULL,
    payload     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_result ON feedback (result_id);
CREATE TABLE IF NOT EXISTS devices (
    site_id      TEXT NOT NULL,
    device_id    TEXT NOT NULL,
    state        TEXT,
    state_at     TEXT,
    status       TEXT,
    models       TEXT,
    heartbeat    TEXT,
    heartbeat_at TEXT,
    PRIMARY KEY (site_id, device_id)
)
"""

# A device's Last Will carries no model list; keep the last known one (COALESCE).
_UPSERT_STATUS = """
INSERT INTO devices (site_id, device_id, state, state_at, status, models)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (site_id, device_id) DO UPDATE SET
    state = excluded.state, state_at = excluded.state_at, status = excluded.status,
    models = COALESCE(excluded.models, devices.models)
"""
_UPSERT_HEARTBEAT = """
INSERT INTO devices (site_id, device_id, heartbeat, heartbeat_at) VALUES (?, ?, ?, ?)
ON CONFLICT (site_id, device_id) DO UPDATE SET
    heartbeat = excluded.heartbeat, heartbeat_at = excluded.heartbeat_at
"""
# An overlay counts only when it came from the device that published the result.
_OVERLAY_JOIN = """
FROM overlays o JOIN results r ON r.result_id = o.result_id
    AND r.site_id = o.site_id AND r.device_id = o.device_id
WHERE o.result_id = ?
"""


class StoreError(Exception):
    """The database could not take a write now (the message stays unacknowledged)."""


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class StoredResult:
    """One result with what the dashboard knows beside it."""

    payload: dict
    received_at: str
    has_overlay: bool
    feedback: list[dict] = field(default_factory=list)


class Store(ABC):
    """What the subscriber writes and the web pages read."""

    @abstractmethod
    def add_result(self, result: Result, created_at: str, received_at: str) -> bool:
        """True when stored now, False when this ``result_id`` was already stored."""

    @abstractmethod
    def add_overlay(
        self, site_id: str, device_id: str, result_id: str, png: bytes, received_at: str
    ) -> bool: ...

    @abstractmethod
    def add_feedback(self, feedback: Feedback, received_at: str) -> bool: ...

    @abstractmethod
    def set_status(self, status: Status, received_at: str) -> None: ...

    @abstractmethod
    def set_heartbeat(self, heartbeat: Heartbeat, received_at: str) -> None: ...

    @abstractmethod
    def results(self, limit: int = 50, site_id: str | None = None) -> list[dict]:
        """Result payloads, newest ``created_at`` first."""

    @abstractmethod
    def result(self, result_id: str) -> StoredResult | None: ...

    @abstractmethod
    def overlay(self, result_id: str) -> bytes | None: ...

    @abstractmethod
    def devices(self) -> list[dict]: ...

    @abstractmethod
    def close(self) -> None: ...


class SqlStore(Store):
    """The shared SQL; subclasses supply :meth:`_write` and :meth:`_read` (``?`` parameters)."""

    @abstractmethod
    def _write(self, statements: Sequence[tuple[str, tuple]]) -> list[int]:
        """Run the statements in one transaction; the row count of each."""

    @abstractmethod
    def _read(self, sql: str, params: tuple = ()) -> list[tuple]: ...

    def add_result(self, result: Result, created_at: str, received_at: str) -> bool:
        sql = (
            "INSERT INTO results (result_id, site_id, device_id, created_at, received_at, "
            "payload) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (result_id) DO NOTHING"
        )
        args = (
            result.result_id,
            result.site_id,
            result.device_id,
            created_at,
            received_at,
            _dumps(result.payload()),
        )
        return self._write([(sql, args)])[0] == 1

    def add_overlay(
        self, site_id: str, device_id: str, result_id: str, png: bytes, received_at: str
    ) -> bool:
        sql = (
            "INSERT INTO overlays (site_id, device_id, result_id, received_at, png) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (site_id, device_id, result_id) DO NOTHING"
        )
        return self._write([(sql, (site_id, device_id, result_id, received_at, png))])[0] == 1

    def add_feedback(self, feedback: Feedback, received_at: str) -> bool:
        sql = (
            "INSERT INTO feedback (feedback_id, result_id, site_id, device_id, received_at, "
            "payload) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (feedback_id) DO NOTHING"
        )
        payload = _dumps(feedback.model_dump(mode="json", by_alias=True))
        args = (
            feedback.feedback_id,
            feedback.result_id,
            feedback.site_id,
            feedback.device_id,
            received_at,
            payload,
        )
        return self._write([(sql, args)])[0] == 1

    def set_status(self, status: Status, received_at: str) -> None:
        body = status.model_dump(mode="json", by_alias=True)
        models = _dumps(body["models"]) if body["models"] else None
        args = (status.site_id, status.device_id, status.state, received_at, _dumps(body), models)
        self._write([(_UPSERT_STATUS, args)])

    def set_heartbeat(self, heartbeat: Heartbeat, received_at: str) -> None:
        body = _dumps(heartbeat.model_dump(mode="json", by_alias=True))
        self._write(
            [(_UPSERT_HEARTBEAT, (heartbeat.site_id, heartbeat.device_id, body, received_at))]
        )

    def results(self, limit: int = 50, site_id: str | None = None) -> list[dict]:
        where, args = ("WHERE site_id = ? ", (site_id,)) if site_id is not None else ("", ())
        rows = self._read(
            f"SELECT payload FROM results {where}ORDER BY created_at DESC, result_id DESC LIMIT ?",
            (*args, int(limit)),
        )
        return [json.loads(r[0]) for r in rows]

    def result(self, result_id: str) -> StoredResult | None:
        rows = self._read(
            "SELECT payload, received_at, site_id, device_id FROM results WHERE result_id = ?",
            (result_id,),
        )
        if not rows:
            return None
        payload, received_at, site_id, device_id = rows[0]
        has_overlay = bool(self._read("SELECT 1 " + _OVERLAY_JOIN, (result_id,)))
        feedback = self._read(
            "SELECT payload FROM feedback WHERE result_id = ? AND site_id = ? AND device_id = ? "
            "ORDER BY received_at, feedback_id",
            (result_id, site_id, device_id),
        )
        return StoredResult(
            payload=json.loads(payload),
            received_at=received_at,
            has_overlay=has_overlay,
            feedback=[json.loads(f[0]) for f in feedback],
        )

    def overlay(self, result_id: str) -> bytes | None:
        rows = self._read("SELECT o.png " + _OVERLAY_JOIN, (result_id,))
        return bytes(rows[0][0]) if rows else None

    def devices(self) -> list[dict]:
        rows = self._read(
            "SELECT site_id, device_id, state, state_at, status, models, heartbeat, heartbeat_at "
            "FROM devices ORDER BY site_id, device_id"
        )
        out = []
        for site_id, device_id, state, state_at, status, models, heartbeat, hb_at in rows:
            st = json.loads(status) if status else {}
            out.append(
                {
                    "site_id": site_id,
                    "device_id": device_id,
                    "state": state or "unknown",
                    "state_at": state_at,  # when the dashboard heard it (a Will's "at" is old)
                    "software": st.get("software"),
                    "problems": st.get("problems", []),
                    "models": json.loads(models) if models else [],
                    "heartbeat": json.loads(heartbeat) if heartbeat else None,
                    "heartbeat_at": hb_at,
                }
            )
        return out


class SqliteStore(SqlStore):
    """One file in WAL mode; several dashboard processes may share it (busy timeout 30 s).

    ``synchronous=FULL`` because the broker is acknowledged right after the commit: a
    message acknowledged must survive a power cut.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            str(self.path), timeout=30.0, isolation_level=None, check_same_thread=False
        )
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA.format(blob="BLOB"))

    def _write(self, statements: Sequence[tuple[str, tuple]]) -> list[int]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    counts = [self._db.execute(sql, args).rowcount for sql, args in statements]
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(f"SQLite {self.path}: {exc}") from exc
        return counts

    def _read(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"SQLite {self.path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()


class PostgresStore(SqlStore):
    """PostgreSQL through psycopg 3 (imported here only); reconnects after a lost connection."""

    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError:
            raise Unavailable(
                "a postgresql:// db_url needs psycopg: pip install -e '.[dashboard]'"
            ) from None
        self._psycopg = psycopg
        self.url = url
        self._lock = threading.Lock()
        self._conn: Any = None
        try:
            with self._lock:
                conn = self._connection()
                with conn.transaction():
                    # Two instances starting together must not race on CREATE TABLE.
                    conn.execute("SELECT pg_advisory_xact_lock(7426001)")
                    for stmt in SCHEMA.format(blob="BYTEA").split(";"):
                        if stmt.strip():
                            conn.execute(stmt)
        except psycopg.Error as exc:
            raise Unavailable(f"PostgreSQL {_redact(url)}: {exc}".strip()) from None

    def _connection(self) -> Any:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = self._psycopg.connect(self.url, connect_timeout=5, autocommit=True)
        return self._conn

    def _write(self, statements: Sequence[tuple[str, tuple]]) -> list[int]:
        with self._lock:
            try:
                conn = self._connection()
                counts = []
                with conn.transaction():
                    for sql, args in statements:
                        counts.append(conn.execute(_pg(sql), args).rowcount)
                return counts
            except self._psycopg.Error as exc:
                raise StoreError(f"PostgreSQL: {exc}") from exc

    def _read(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._connection().execute(_pg(sql), params).fetchall()
            except self._psycopg.Error as exc:
                raise StoreError(f"PostgreSQL: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()


def _pg(sql: str) -> str:
    """Our SQL uses ``?`` placeholders (sqlite3); psycopg wants ``%s``. No literal ``?``/``%``."""
    return sql.replace("?", "%s")


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    head, sep, tail = url.partition("@")
    if not sep or "://" not in head:
        return url
    scheme, _, creds = head.partition("://")
    return f"{scheme}://{creds.split(':', 1)[0]}@{tail}"


def _sqlite(url: str) -> Store:
    path = url.removeprefix("sqlite:///")
    if not path or path == ":memory:":
        raise UsageError("dashboard.db_url: sqlite:///PATH needs a file (shared by threads)")
    return SqliteStore(Path(path))


# Scheme -> factory; choosing one never imports another's library.
STORES: dict[str, Callable[[str], Store]] = {
    "sqlite": _sqlite,
    "postgresql": PostgresStore,
    "postgres": PostgresStore,
}


def open_store(url: str) -> Store:
    """The store for ``dashboard.db_url``: ``sqlite:///relative/or//absolute`` or
    ``postgresql://user@host/db``."""
    scheme = url.partition("://")[0]
    factory = STORES.get(scheme)
    if factory is None or "://" not in url:
        raise UsageError(
            f"dashboard.db_url: unsupported {_redact(url)!r} "
            "(sqlite:///PATH or postgresql://USER@HOST/DB)"
        )
    return factory(url)
