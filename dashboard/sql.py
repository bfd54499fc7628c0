"""The SQL both back ends share (``?`` placeholders; PostgreSQL's module rewrites them).

Payloads are kept verbatim as JSON text (they were validated on the way in), plus the few
columns the pages sort and filter on — among them ``class`` and ``refer`` copied from
``prediction`` when the row is written. They used to be read from the payload with each
database's JSON operator, but PostgreSQL's refuses a whole payload that holds ``"\u0000"``
anywhere, so one such row made every class-filtered view fail; rows from before the columns
existed get them from :meth:`SqlStore._backfill`, decoded by Python, which takes any payload.
Devices are one row each, upserted from ``status`` and ``heartbeat``. Dead letters are one
row per distinct (topic, payload), with the first and last time it came and how often.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, assert_never

from dashboard.query import ResultFilter
from dashboard.store import (
    DEAD_LETTER_BYTES,
    ClearDeadLetter,
    DeadLetter,
    DeviceHeartbeat,
    DeviceStatus,
    FeedbackOutcome,
    NewFeedback,
    NewOverlay,
    NewResult,
    Store,
    StoredDeadLetter,
    StoredResult,
    Write,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    result_id   TEXT PRIMARY KEY,
    site_id     TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    received_at TEXT NOT NULL,
    payload     TEXT NOT NULL,
    class       TEXT,
    refer       INTEGER
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
);
CREATE TABLE IF NOT EXISTS dead_letters (
    key               TEXT PRIMARY KEY,
    topic             TEXT NOT NULL,
    site_id           TEXT,
    device_id         TEXT,
    category          TEXT NOT NULL,
    reason            TEXT NOT NULL,
    first_received_at TEXT NOT NULL,
    received_at       TEXT NOT NULL,
    times             INTEGER NOT NULL,
    size              INTEGER NOT NULL,
    raw               {blob} NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_newest ON dead_letters (received_at)
"""

# Added after the first release: a store made before them gets them from its migration.
RESULT_COLUMNS = {"class": "TEXT", "refer": "INTEGER"}
_INSERT_RESULT = (
    "INSERT INTO results (result_id, site_id, device_id, created_at, received_at, payload, "
    "class, refer) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (result_id) DO NOTHING"
)
_INSERT_OVERLAY = (
    "INSERT INTO overlays (site_id, device_id, result_id, received_at, png) "
    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (site_id, device_id, result_id) DO NOTHING"
)
_INSERT_FEEDBACK = (
    "INSERT INTO feedback (feedback_id, result_id, site_id, device_id, received_at, payload) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (feedback_id) DO NOTHING"
)
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
# The same bad message again: one row, counted (a redelivery, or a device that keeps sending it).
_UPSERT_DEAD_LETTER = """
INSERT INTO dead_letters (key, topic, site_id, device_id, category, reason, first_received_at,
    received_at, times, size, raw)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?)
ON CONFLICT (key) DO UPDATE SET
    category = excluded.category, reason = excluded.reason,
    received_at = excluded.received_at, times = dead_letters.times + 1
"""
_DELETE_DEAD_LETTER = "DELETE FROM dead_letters WHERE key = ?"
_DEAD_LETTER_COLUMNS = (
    "key, topic, site_id, device_id, category, reason, first_received_at, received_at, times, size"
)
# An overlay or a feedback counts only when it came from the device that published the result.
_OVERLAY_JOIN = """
FROM overlays o JOIN results r ON r.result_id = o.result_id
    AND r.site_id = o.site_id AND r.device_id = o.device_id
WHERE o.result_id = ?
"""
_FEEDBACK_JOIN = """
FROM feedback f JOIN results r ON r.result_id = f.result_id
    AND r.site_id = f.site_id AND r.device_id = f.device_id
"""
_IN_CHUNK = 500  # ids per "IN (…)" list: well under every database's parameter limit


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _statement(item: Write) -> tuple[str, tuple]:
    """The one SQL statement that stores ``item``."""
    if isinstance(item, NewResult):
        r = item.result
        payload = dumps(r.payload())
        return _INSERT_RESULT, (
            r.result_id,
            r.site_id,
            r.device_id,
            item.created_at,
            item.received_at,
            payload,
            r.prediction.class_,
            int(r.prediction.refer),
        )
    if isinstance(item, NewOverlay):
        args = (item.site_id, item.device_id, item.result_id, item.received_at, item.png)
        return _INSERT_OVERLAY, args
    if isinstance(item, NewFeedback):
        f = item.feedback
        payload = dumps(f.model_dump(mode="json", by_alias=True))
        return _INSERT_FEEDBACK, (
            f.feedback_id,
            f.result_id,
            f.site_id,
            f.device_id,
            item.received_at,
            payload,
        )
    if isinstance(item, DeviceStatus):
        s = item.status
        body = s.model_dump(mode="json", by_alias=True)
        models = dumps(body["models"]) if body["models"] else None
        return _UPSERT_STATUS, (
            s.site_id,
            s.device_id,
            s.state,
            item.received_at,
            dumps(body),
            models,
        )
    if isinstance(item, DeviceHeartbeat):
        hb = item.heartbeat
        body_text = dumps(hb.model_dump(mode="json", by_alias=True))
        return _UPSERT_HEARTBEAT, (hb.site_id, hb.device_id, body_text, item.received_at)
    if isinstance(item, DeadLetter):
        return _UPSERT_DEAD_LETTER, (
            item.key,
            item.topic,
            item.site_id,
            item.device_id,
            item.category,
            item.reason,
            item.received_at,
            item.received_at,
            item.size,
            item.raw[:DEAD_LETTER_BYTES],
        )
    if isinstance(item, ClearDeadLetter):
        return _DELETE_DEAD_LETTER, (item.key,)
    assert_never(item)


def _dead_letter(row: tuple, raw: bool) -> StoredDeadLetter:
    key, topic, site, device, category, reason, first, last, times, size = row[:10]
    return StoredDeadLetter(
        str(key),
        str(topic),
        site,
        device,
        str(category),
        str(reason),
        str(first),
        str(last),
        int(times),
        int(size),
        bytes(row[10]) if raw else None,
    )


def _truthy(value: object) -> bool:
    """The ``refer`` column as the database hands it back (1/0)."""
    return value in (1, True, "1", "true")


class SqlStore(Store):
    """The shared SQL; subclasses supply the connection handling and one dialect detail."""

    @abstractmethod
    def _write(self, statements: Sequence[tuple[str, tuple]]) -> list[int]:
        """Run the statements in one transaction; the row count of each."""

    @abstractmethod
    def _read(self, sql: str, params: tuple = ()) -> list[tuple]: ...

    def _backfill(self) -> int:
        """Fill ``class``/``refer`` of rows stored before those columns; how many."""
        rows = self._read("SELECT result_id, payload FROM results WHERE class IS NULL")
        updates = []
        for rid, payload in rows:
            pred = json.loads(payload).get("prediction", {})
            updates.append(
                (
                    "UPDATE results SET class = ?, refer = ? WHERE result_id = ?",
                    (str(pred.get("class")), int(bool(pred.get("refer"))), rid),
                )
            )
        for i in range(0, len(updates), _IN_CHUNK):
            self._write(updates[i : i + _IN_CHUNK])
        return len(updates)

    # --- writes ------------------------------------------------------------------------------

    def write(self, items: Sequence[Write]) -> list[bool]:
        if not items:
            return []
        counts = self._write([_statement(i) for i in items])
        keyed = (NewResult, NewOverlay, NewFeedback)
        return [
            c == 1 if isinstance(i, keyed) else True for i, c in zip(items, counts, strict=True)
        ]

    # --- reads -------------------------------------------------------------------------------

    def _where(self, filt: ResultFilter, table: str = "") -> tuple[list[str], list[Any]]:
        """Conditions (on ``results``, aliased ``table``) and their parameters."""
        p = f"{table}." if table else ""
        where: list[str] = []
        args: list[Any] = []
        if filt.site is not None:
            where.append(f"{p}site_id = ?")
            args.append(filt.site)
        if filt.cls is not None:
            where.append(f"{p}class = ?")
            args.append(filt.cls)
        low, high = filt.created_range()
        if low is not None:
            where.append(f"{p}created_at >= ?")
            args.append(low)
        if high is not None:
            where.append(f"{p}created_at < ?")
            args.append(high)
        return where, args

    def results(
        self, filt: ResultFilter | None = None, before: tuple[str, str] | None = None
    ) -> list[dict]:
        filt = filt or ResultFilter()
        where, args = self._where(filt)
        if before is not None:
            where.append("(created_at < ? OR (created_at = ? AND result_id < ?))")
            args += [before[0], before[0], before[1]]
        clause = f"WHERE {' AND '.join(where)} " if where else ""
        rows = self._read(
            f"SELECT payload FROM results {clause}ORDER BY created_at DESC, result_id DESC LIMIT ?",
            (*args, int(filt.limit)),
        )
        return [json.loads(r[0]) for r in rows]

    def result(self, result_id: str) -> StoredResult | None:
        rows = self._read(
            "SELECT payload, received_at FROM results WHERE result_id = ?", (result_id,)
        )
        if not rows:
            return None
        payload, received_at = rows[0]
        has_overlay = bool(self._read("SELECT 1 " + _OVERLAY_JOIN, (result_id,)))
        return StoredResult(
            payload=json.loads(payload),
            received_at=received_at,
            has_overlay=has_overlay,
            feedback=self.feedback_for([result_id]).get(result_id, []),
        )

    def feedback_for(self, result_ids: Sequence[str]) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        ids = list(dict.fromkeys(result_ids))
        for i in range(0, len(ids), _IN_CHUNK):
            chunk = ids[i : i + _IN_CHUNK]
            marks = ", ".join("?" * len(chunk))
            rows = self._read(
                f"SELECT f.result_id, f.payload {_FEEDBACK_JOIN} WHERE f.result_id IN ({marks}) "
                "ORDER BY f.received_at, f.feedback_id",
                tuple(chunk),
            )
            for rid, payload in rows:
                out.setdefault(rid, []).append(json.loads(payload))
        return out

    def result_counts(self, filt: ResultFilter) -> list[tuple[str, str, int]]:
        where, args = self._where(filt)
        clause = f"WHERE {' AND '.join(where)} " if where else ""
        rows = self._read(
            f"SELECT site_id, substr(created_at, 1, 7), COUNT(*) FROM results {clause}"
            "GROUP BY site_id, substr(created_at, 1, 7)",
            tuple(args),
        )
        return [(str(s), str(m), int(n)) for s, m, n in rows]

    def feedback_outcomes(self, filt: ResultFilter) -> list[FeedbackOutcome]:
        where, args = self._where(filt, "r")
        clause = f"WHERE {' AND '.join(where)} " if where else ""
        rows = self._read(
            "SELECT f.result_id, r.site_id, substr(r.created_at, 1, 7), r.refer, "
            f"f.received_at, f.payload {_FEEDBACK_JOIN}{clause}"
            "ORDER BY f.result_id, f.received_at, f.feedback_id",
            tuple(args),
        )
        return [
            FeedbackOutcome(str(rid), str(site), str(period), _truthy(ref), str(at), json.loads(p))
            for rid, site, period, ref, at, p in rows
        ]

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

    def dead_letters(self, limit: int = 100, raw: bool = False) -> list[StoredDeadLetter]:
        cols = _DEAD_LETTER_COLUMNS + (", raw" if raw else "")
        rows = self._read(
            f"SELECT {cols} FROM dead_letters ORDER BY received_at DESC, key LIMIT ?",
            (int(limit),),
        )
        return [_dead_letter(r, raw) for r in rows]

    def dead_letter(self, key: str) -> StoredDeadLetter | None:
        rows = self._read(
            f"SELECT {_DEAD_LETTER_COLUMNS}, raw FROM dead_letters WHERE key = ?", (key,)
        )
        return _dead_letter(rows[0], True) if rows else None

    def dead_letter_count(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM dead_letters")[0][0])
