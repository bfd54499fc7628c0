"""The dashboard's store: one small interface, SQLite (default) and PostgreSQL (a fleet).

Exactly-once storage from at-least-once delivery: every row has the message's own key
(``result_id``, ``feedback_id``, the overlay's (site, device, result_id)) as its primary key
and is written with ``INSERT … ON CONFLICT DO NOTHING`` — a redelivered message, or the same
message taken by a second dashboard instance, changes nothing.

Writes come in batches (:meth:`Store.write`): every item of a batch is committed in *one*
transaction, all or nothing, and the subscriber acknowledges the batch's messages only after
that commit. One commit per message costs one fsync per message (``synchronous=FULL``);
a batch shares it — the ingest-rate figures in ``docs/dashboard.md`` measure the difference.

The shared SQL lives in :mod:`dashboard.sql`, each back end in its own module;
:func:`open_store` picks one by URL scheme and imports psycopg only when PostgreSQL is chosen.
Writes and reads raise :class:`StoreError` when the database cannot serve them: the subscriber
then leaves the messages unacknowledged (the broker delivers them again), the web answers 503.
A write the database refuses for what it holds, not for being down, raises
:class:`StoreRefused`: the subscriber then stores the batch item by item and sends what is
refused to the dead letters (:class:`DeadLetter`), so one bad message never holds up the rest.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dashboard.query import ResultFilter
from edge.messages import Feedback, Heartbeat, Status
from edge.result import Result
from osteofy.errors import UsageError


class StoreError(Exception):
    """The database could not serve a read or take a write now."""


class StoreRefused(StoreError):
    """The database refused the data itself (it would refuse it again): not an outage."""


# --- what can be written ----------------------------------------------------------------------


@dataclass(frozen=True)
class NewResult:
    result: Result
    created_at: str  # utc_key of the payload's created_at: sorts and filters as text
    received_at: str


@dataclass(frozen=True)
class NewOverlay:
    site_id: str
    device_id: str
    result_id: str
    png: bytes
    received_at: str


@dataclass(frozen=True)
class NewFeedback:
    feedback: Feedback
    received_at: str


@dataclass(frozen=True)
class DeviceStatus:
    status: Status
    received_at: str


@dataclass(frozen=True)
class DeviceHeartbeat:
    heartbeat: Heartbeat
    received_at: str


@dataclass(frozen=True)
class DeadLetter:
    """A message that cannot be stored, kept (bounded) with the reason why.

    ``key`` is the SHA-256 of topic and payload: the same bad message arriving again bumps
    ``times`` on its row instead of adding one.
    """

    key: str
    topic: str
    site_id: str | None  # as claimed by the topic
    device_id: str | None
    category: str
    reason: str  # one line, no payload content
    received_at: str
    size: int  # the payload's full length
    raw: bytes  # its first DEAD_LETTER_BYTES


@dataclass(frozen=True)
class ClearDeadLetter:
    """Remove a dead letter (it was replayed and is stored now)."""

    key: str


Write = (
    NewResult
    | NewOverlay
    | NewFeedback
    | DeviceStatus
    | DeviceHeartbeat
    | DeadLetter
    | ClearDeadLetter
)

DEAD_LETTER_BYTES = 64 * 1024  # what is kept of a dead letter's payload


# --- what is read back ------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredResult:
    """One result with what the dashboard knows beside it."""

    payload: dict
    received_at: str
    has_overlay: bool
    feedback: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class StoredDeadLetter:
    """A dead letter as read back (``raw`` only when asked for)."""

    key: str
    topic: str
    site_id: str | None
    device_id: str | None
    category: str
    reason: str
    first_received_at: str
    received_at: str
    times: int
    size: int
    raw: bytes | None = None

    @property
    def truncated(self) -> bool:
        return self.size > DEAD_LETTER_BYTES


@dataclass(frozen=True)
class FeedbackOutcome:
    """One feedback message next to the result it is about (clinical acceptance)."""

    result_id: str
    site_id: str
    period: str  # YYYY-MM of the result's created_at (UTC)
    refer: bool
    received_at: str
    feedback: dict


class Store(ABC):
    """What the subscriber writes and the web pages read."""

    @abstractmethod
    def write(self, items: Sequence[Write]) -> list[bool]:
        """Commit every item in one transaction. Per item: True when it changed the store,
        False when its key was already stored (a redelivery). :class:`StoreError`: nothing
        was written."""

    def add_result(self, result: Result, created_at: str, received_at: str) -> bool:
        """True when stored now, False when this ``result_id`` was already stored."""
        return self.write([NewResult(result, created_at, received_at)])[0]

    def add_overlay(
        self, site_id: str, device_id: str, result_id: str, png: bytes, received_at: str
    ) -> bool:
        return self.write([NewOverlay(site_id, device_id, result_id, png, received_at)])[0]

    def add_feedback(self, feedback: Feedback, received_at: str) -> bool:
        return self.write([NewFeedback(feedback, received_at)])[0]

    def set_status(self, status: Status, received_at: str) -> None:
        self.write([DeviceStatus(status, received_at)])

    def set_heartbeat(self, heartbeat: Heartbeat, received_at: str) -> None:
        self.write([DeviceHeartbeat(heartbeat, received_at)])

    @abstractmethod
    def results(
        self, filt: ResultFilter | None = None, before: tuple[str, str] | None = None
    ) -> list[dict]:
        """Result payloads matching ``filt``, newest ``created_at`` first, at most
        ``filt.limit``; ``before`` = (created_at key, result_id) of the last one already
        seen, to page through everything (the CSV export)."""

    @abstractmethod
    def result(self, result_id: str) -> StoredResult | None: ...

    @abstractmethod
    def feedback_for(self, result_ids: Sequence[str]) -> dict[str, list[dict]]:
        """Feedback payloads per result, oldest first (only from the result's own device)."""

    @abstractmethod
    def result_counts(self, filt: ResultFilter) -> list[tuple[str, str, int]]:
        """(site_id, YYYY-MM, number of results) for the results ``filt`` selects."""

    @abstractmethod
    def feedback_outcomes(self, filt: ResultFilter) -> list[FeedbackOutcome]:
        """Every feedback message about the results ``filt`` selects (``limit`` ignored)."""

    @abstractmethod
    def overlay(self, result_id: str) -> bytes | None: ...

    @abstractmethod
    def devices(self) -> list[dict]: ...

    @abstractmethod
    def dead_letters(self, limit: int = 100, raw: bool = False) -> list[StoredDeadLetter]:
        """Dead letters, most recently received first; ``raw`` adds the kept bytes."""

    @abstractmethod
    def dead_letter(self, key: str) -> StoredDeadLetter | None:
        """One dead letter with its kept bytes."""

    @abstractmethod
    def dead_letter_count(self) -> int: ...

    @abstractmethod
    def close(self) -> None: ...


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    head, sep, tail = url.partition("@")
    if not sep or "://" not in head:
        return url
    scheme, _, creds = head.partition("://")
    return f"{scheme}://{creds.split(':', 1)[0]}@{tail}"


def _sqlite(url: str) -> Store:
    from dashboard.store_sqlite import SqliteStore

    path = url.removeprefix("sqlite:///")
    if not path or path == ":memory:":
        raise UsageError("dashboard.db_url: sqlite:///PATH needs a file (shared by threads)")
    return SqliteStore(Path(path))


def _postgres(url: str) -> Store:
    from dashboard.store_postgres import PostgresStore

    return PostgresStore(url)


# Scheme -> factory; choosing one never imports another's library.
STORES: dict[str, Callable[[str], Store]] = {
    "sqlite": _sqlite,
    "postgresql": _postgres,
    "postgres": _postgres,
}


def open_store(url: str) -> Store:
    """The store for ``dashboard.db_url``: ``sqlite:///relative/or//absolute`` or
    ``postgresql://user@host/db``."""
    scheme = url.partition("://")[0]
    factory = STORES.get(scheme)
    if factory is None or "://" not in url:
        raise UsageError(
            f"dashboard.db_url: unsupported {redact(url)!r} "
            "(sqlite:///PATH or postgresql://USER@HOST/DB)"
        )
    return factory(url)
