"""The device's result store: SQLite in WAL mode, overlays as files beside it.

One row per screened input, keyed by the sha256 of the input file: processing the same file
again (after a crash between the commit and moving the file out of ``work/``) finds the row
and does not make a second result. ``synchronous=FULL`` so a committed result survives a
power cut. Overlay files are written (atomically) *before* the row that names them, so a row
never points at a missing file.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    result_id    TEXT PRIMARY KEY,
    input_sha256 TEXT NOT NULL UNIQUE,
    created_at   TEXT NOT NULL,
    body_part    TEXT NOT NULL,
    payload      TEXT NOT NULL,
    overlay_local  TEXT,
    overlay_public TEXT,
    source       TEXT,            -- the study's file name in done/ (for re-screening)
    supersedes   TEXT,            -- result_id this one replaces (re-screened with more facts)
    given_facts  TEXT             -- JSON of the facts a person typed for this result
);
CREATE INDEX IF NOT EXISTS results_created ON results (created_at);
CREATE TABLE IF NOT EXISTS feedback (
    feedback_id TEXT PRIMARY KEY,
    result_id   TEXT NOT NULL REFERENCES results (result_id),
    at          TEXT NOT NULL,
    agree       INTEGER,
    dxa_tscore  REAL
);
CREATE TABLE IF NOT EXISTS rejections (
    input_sha256 TEXT PRIMARY KEY,
    created_at   TEXT NOT NULL,
    rule         TEXT NOT NULL,
    reason       TEXT NOT NULL,
    quarantined_as TEXT NOT NULL
);
"""


def connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
    return db


class ResultStore:
    """Results and rejections of one device (``DATA_DIR/results.sqlite``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.db = connect(self.path)
        self.db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def seen(self, input_sha256: str) -> str | None:
        """'result' or 'rejected' when this input was already handled, else None."""
        with self._lock:
            if self.db.execute(
                "SELECT 1 FROM results WHERE input_sha256 = ?", (input_sha256,)
            ).fetchone():
                return "result"
            if self.db.execute(
                "SELECT 1 FROM rejections WHERE input_sha256 = ?", (input_sha256,)
            ).fetchone():
                return "rejected"
        return None

    def add_result(
        self,
        db: sqlite3.Connection,
        input_sha256: str,
        payload: dict,
        overlay_local: str | None,
        overlay_public: str | None,
        source: str | None = None,
        supersedes: str | None = None,
        given_facts: dict | None = None,
    ) -> None:
        """Insert inside a :meth:`transaction` (so the outbox can join the same commit)."""
        db.execute(
            "INSERT INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                payload["result_id"],
                input_sha256,
                payload["created_at"],
                payload["body_part"],
                json.dumps(payload, separators=(",", ":")),
                overlay_local,
                overlay_public,
                source,
                supersedes,
                None if given_facts is None else json.dumps(given_facts, sort_keys=True),
            ),
        )

    def given_facts(self, result_id: str) -> dict:
        """The facts typed for a result (and so carried into its next re-screen)."""
        with self._lock:
            row = self.db.execute(
                "SELECT given_facts FROM results WHERE result_id = ?", (result_id,)
            ).fetchone()
        return {} if row is None or row[0] is None else dict(json.loads(row[0]))

    def source_of(self, result_id: str) -> tuple[str, str] | None:
        """(input_sha256, source file name) of a result."""
        with self._lock:
            row = self.db.execute(
                "SELECT input_sha256, source FROM results WHERE result_id = ?", (result_id,)
            ).fetchone()
        return None if row is None or row[1] is None else (row[0], row[1])

    def add_feedback(self, db: sqlite3.Connection, payload: dict) -> None:
        db.execute(
            "INSERT INTO feedback VALUES (?, ?, ?, ?, ?)",
            (
                payload["feedback_id"],
                payload["result_id"],
                payload["at"],
                None if payload.get("agree") is None else int(payload["agree"]),
                payload.get("dxa_tscore"),
            ),
        )

    def feedback_for(self, result_id: str) -> list[dict]:
        with self._lock:
            rows = self.db.execute(
                "SELECT feedback_id, at, agree, dxa_tscore FROM feedback WHERE result_id = ? "
                "ORDER BY at",
                (result_id,),
            ).fetchall()
        return [
            {
                "feedback_id": r[0],
                "at": r[1],
                "agree": None if r[2] is None else bool(r[2]),
                "dxa_tscore": r[3],
            }
            for r in rows
        ]

    def add_rejection(
        self, input_sha256: str, created_at: str, rule: str, reason: str, quarantined_as: str
    ) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO rejections VALUES (?, ?, ?, ?, ?)",
                (input_sha256, created_at, rule, reason, quarantined_as),
            )

    def results(self, limit: int = 100) -> list[dict]:
        with self._lock:
            rows = self.db.execute(
                "SELECT payload FROM results ORDER BY rowid DESC LIMIT ?", (limit,)
            ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def result(self, result_id: str) -> tuple[dict, str | None, str | None] | None:
        with self._lock:
            row = self.db.execute(
                "SELECT payload, overlay_local, overlay_public FROM results WHERE result_id = ?",
                (result_id,),
            ).fetchone()
        return None if row is None else (json.loads(row[0]), row[1], row[2])

    def count(self) -> int:
        with self._lock:
            return int(self.db.execute("SELECT COUNT(*) FROM results").fetchone()[0])

    def rejections(self, limit: int = 100) -> list[dict]:
        with self._lock:
            rows = self.db.execute(
                "SELECT created_at, rule, reason, quarantined_as FROM rejections "
                "ORDER BY rowid DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            dict(zip(("created_at", "rule", "reason", "quarantined_as"), r, strict=True))
            for r in rows
        ]
