"""PostgreSQL back end (psycopg 3, imported only here): several instances, one database."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from dashboard.sql import RESULT_COLUMNS, SCHEMA, SqlStore
from dashboard.store import StoreError, StoreRefused, redact
from osteofy.errors import Unavailable

SCHEMA_LOCK = 7426001  # pg_advisory_xact_lock key: instances starting together take turns


class PostgresStore(SqlStore):
    """One connection, reopened after it was lost; statements serialised by a lock."""

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
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                    for stmt in SCHEMA.format(blob="BYTEA").split(";"):
                        if stmt.strip():
                            conn.execute(stmt)
                    for name, kind in RESULT_COLUMNS.items():  # a store of an older release
                        conn.execute(f"ALTER TABLE results ADD COLUMN IF NOT EXISTS {name} {kind}")
            self._backfill()
        except (psycopg.Error, StoreError) as exc:
            raise Unavailable(f"PostgreSQL {redact(url)}: {exc}".strip()) from None

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
            except (
                self._psycopg.DataError,
                self._psycopg.IntegrityError,
                UnicodeError,
                OverflowError,
            ) as exc:
                # The data, not the database: refused again on every try.
                raise StoreRefused(f"PostgreSQL refused the data: {type(exc).__name__}") from exc
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
