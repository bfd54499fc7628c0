"""The outbox: MQTT messages waiting for the broker's PUBACK, durable across power cuts.

The MQTT client library loses unacknowledged messages when its process restarts, so the
device's source of truth is this table, in the *same SQLite database* as the results
(``results.sqlite``, WAL, ``synchronous=FULL``): a result and its messages are committed in
one transaction, and a message row is deleted only when the broker's PUBACK for it arrives.
(SQLite transactions across ATTACHed WAL databases are not atomic as a set, which is why
the outbox is a table here rather than a separate ``outbox.sqlite``; docs/mqtt.md.)

The outbox is bounded (``mqtt.outbox_limit`` messages). Nearing the limit raises an alarm
(heartbeat, status, local screen); at the limit new results are still stored but marked
``queued = 0`` and enqueued later, oldest first, as space frees — never dropped.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass

from edge.messages import topic
from edge.store import ResultStore

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    topic      TEXT NOT NULL,
    payload    BLOB,            -- the message body, or NULL when it is a file (overlay)
    file       TEXT,            -- overlay file name under overlays/
    qos        INTEGER NOT NULL,
    retain     INTEGER NOT NULL,
    kind       TEXT NOT NULL,   -- result | overlay | feedback
    ref        TEXT NOT NULL,   -- result_id or feedback_id
    created    REAL NOT NULL    -- unix time, for the oldest-queued age
);
CREATE TABLE IF NOT EXISTS unqueued (
    result_id  TEXT PRIMARY KEY,
    created    REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Message:
    seq: int
    topic: str
    payload: bytes | None
    file: str | None
    qos: int
    retain: bool
    kind: str
    ref: str


class Outbox:
    def __init__(
        self,
        store: ResultStore,
        site_id: str,
        device_id: str,
        limit: int,
        alarm_fraction: float = 0.8,
    ) -> None:
        self.store = store
        self.site_id = site_id
        self.device_id = device_id
        self.limit = limit
        self.alarm_fraction = alarm_fraction
        with store._lock:
            store.db.executescript(SCHEMA)

    def _topic(self, kind: str, suffix: str | None = None) -> str:
        return topic(self.site_id, self.device_id, kind, suffix)

    # --- enqueue (inside the caller's transaction) -------------------------------------------

    def depth(self, db: sqlite3.Connection | None = None) -> int:
        conn = db or self.store.db
        return int(conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def enqueue_result(
        self, db: sqlite3.Connection, payload: dict, overlay_file: str | None
    ) -> bool:
        """Queue a result (and its overlay) in the caller's transaction; False when full."""
        rid = payload["result_id"]
        if self.depth(db) + 2 > self.limit:
            db.execute("INSERT OR IGNORE INTO unqueued VALUES (?, ?)", (rid, time.time()))
            return False
        now = time.time()
        body = json.dumps(payload, separators=(",", ":")).encode()
        db.execute(
            "INSERT INTO outbox (topic, payload, file, qos, retain, kind, ref, created) "
            "VALUES (?, ?, NULL, 1, 0, 'result', ?, ?)",
            (self._topic("result"), body, rid, now),
        )
        if overlay_file:
            db.execute(
                "INSERT INTO outbox (topic, payload, file, qos, retain, kind, ref, created) "
                "VALUES (?, NULL, ?, 1, 0, 'overlay', ?, ?)",
                (self._topic("overlay", rid), overlay_file, rid, now),
            )
        return True

    def enqueue_feedback(self, db: sqlite3.Connection, payload: dict) -> None:
        db.execute(
            "INSERT INTO outbox (topic, payload, file, qos, retain, kind, ref, created) "
            "VALUES (?, ?, NULL, 1, 0, 'feedback', ?, ?)",
            (
                self._topic("feedback"),
                json.dumps(payload, separators=(",", ":")).encode(),
                payload["feedback_id"],
                time.time(),
            ),
        )

    def backfill(self) -> int:
        """Queue results stored while the outbox was full, oldest first, as space allows."""
        moved = 0
        with self.store.transaction() as db:
            rows = db.execute(
                "SELECT u.result_id, r.payload, r.overlay_public FROM unqueued u "
                "JOIN results r ON r.result_id = u.result_id ORDER BY u.created"
            ).fetchall()
            for rid, payload, overlay in rows:
                if not self.enqueue_result(db, json.loads(payload), overlay):
                    break
                db.execute("DELETE FROM unqueued WHERE result_id = ?", (rid,))
                moved += 1
        return moved

    # --- publisher side ----------------------------------------------------------------------

    def pending(self, exclude: set[int], limit: int) -> list[Message]:
        with self.store._lock:
            rows = self.store.db.execute(
                "SELECT seq, topic, payload, file, qos, retain, kind, ref FROM outbox "
                "ORDER BY seq LIMIT ?",
                (limit + len(exclude),),
            ).fetchall()
        out = [
            Message(
                r[0],
                r[1],
                None if r[2] is None else bytes(r[2]),
                r[3],
                r[4],
                bool(r[5]),
                r[6],
                r[7],
            )
            for r in rows
            if r[0] not in exclude
        ]
        return out[:limit]

    def acknowledged(self, seq: int) -> None:
        """The broker's PUBACK arrived: the message may leave the outbox."""
        with self.store.transaction() as db:
            db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))

    def stats(self) -> dict:
        with self.store._lock:
            depth, oldest = self.store.db.execute(
                "SELECT COUNT(*), MIN(created) FROM outbox"
            ).fetchone()
            waiting = self.store.db.execute("SELECT COUNT(*) FROM unqueued").fetchone()[0]
        return {
            "depth": int(depth),
            "limit": self.limit,
            "unqueued_results": int(waiting),
            "oldest_age_s": None if oldest is None else round(max(time.time() - oldest, 0.0), 1),
            "alarm": depth >= self.alarm_fraction * self.limit or waiting > 0,
        }
