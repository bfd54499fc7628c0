"""SQLite back end: one file in WAL mode, the laptop and single-host default."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

from dashboard.sql import RESULT_COLUMNS, SCHEMA, SqlStore
from dashboard.store import StoreError, StoreRefused


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
        self._migrate()
        self._backfill()

    def _migrate(self) -> None:
        """Add the ``results`` columns a store made by an older release lacks."""
        have = {row[1] for row in self._db.execute("PRAGMA table_info(results)")}
        for name, kind in RESULT_COLUMNS.items():
            if name not in have:
                self._db.execute(f"ALTER TABLE results ADD COLUMN {name} {kind}")

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
            except (sqlite3.DataError, sqlite3.IntegrityError, UnicodeError, OverflowError) as exc:
                # The data, not the database: refused again on every try.
                raise StoreRefused(f"SQLite refused the data: {type(exc).__name__}") from exc
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
