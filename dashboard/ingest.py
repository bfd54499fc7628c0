"""The subscriber's handler: validate each message, store a batch in one commit, count.

:class:`Ingest` is handed the messages the subscriber has received but not yet acknowledged
and answers, per message, whether it is *handled for good* or must be delivered again (the
database is down). Handled for good means stored, already stored, or **dead-lettered**: a
message that fails validation, or that the database refuses, is written to the
``dead_letters`` table with its one-line reason, so it is never lost and never holds up
the messages behind it. The subscriber acknowledges only the handled ones, after this
returns, i.e. after the commit.

A batch is committed in one transaction; when the database refuses something in it
(:class:`StoreRefused`: data, not an outage) the batch is written again item by item and the
refused items become dead letters — every other message of the batch is stored as usual.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

from dashboard.intake import TOPIC_ROOT, Counters, Rejected, parse, safe_topic, utc_key
from dashboard.store import (
    DEAD_LETTER_BYTES,
    ClearDeadLetter,
    DeadLetter,
    DeviceHeartbeat,
    DeviceStatus,
    NewFeedback,
    NewOverlay,
    NewResult,
    Store,
    StoredDeadLetter,
    StoreError,
    StoreRefused,
    Write,
)
from edge.messages import Feedback, Heartbeat, Status
from edge.result import Result, utc_now

log = logging.getLogger(__name__)


def to_write(topic: str, payload: bytes, received_at: str) -> tuple[str, Write]:
    """(message kind, what to store) for a valid message; :class:`Rejected` otherwise."""
    msg = parse(topic, payload)
    m = msg.message
    if isinstance(m, Result):
        return msg.kind, NewResult(m, utc_key(m.created_at), received_at)
    if msg.kind == "overlay" and msg.png is not None and msg.result_id is not None:
        return msg.kind, NewOverlay(msg.site_id, msg.device_id, msg.result_id, msg.png, received_at)
    if isinstance(m, Feedback):
        return msg.kind, NewFeedback(m, received_at)
    if isinstance(m, Status):
        return msg.kind, DeviceStatus(m, received_at)
    if isinstance(m, Heartbeat):
        return msg.kind, DeviceHeartbeat(m, received_at)
    raise Rejected("topic", "unhandled message kind")  # parse() returns only the kinds above


def _clean(text: str) -> str | None:
    """Text fit for a dead letter's columns: as it is when every store keeps it, else escaped."""
    if not text:
        return None
    ok = "\x00" not in text and text.isprintable()
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        ok = False
    return text[:512] if ok else ascii(text[:160])


def dead_letter(topic: str, payload: bytes, category: str, reason: str, at: str) -> DeadLetter:
    """The dead letter for a message we cannot store (site/device as the topic claims them)."""
    levels = topic.removeprefix(TOPIC_ROOT + "/").split("/") if topic.startswith(TOPIC_ROOT) else []
    site = _clean(levels[0]) if len(levels) > 1 else None
    device = _clean(levels[1]) if len(levels) > 1 else None
    key = hashlib.sha256(topic.encode("utf-8", "surrogatepass") + b"\x00" + payload).hexdigest()
    return DeadLetter(
        key=key,
        topic=_clean(topic) or "''",
        site_id=site,
        device_id=device,
        category=category,
        reason=" ".join(reason.split())[:300],  # one line, bounded
        received_at=at,
        size=len(payload),
        raw=bytes(payload[:DEAD_LETTER_BYTES]),
    )


@dataclass(frozen=True)
class _Item:
    kind: str  # message kind, or "dead_letter"
    write: Write
    topic: str = ""  # kept for a write the database may refuse (then dead-lettered)
    payload: bytes = b""


class Ingest:
    """Validate, store, count. ``handle`` takes a batch; calling it takes one message."""

    def __init__(self, store: Store, counters: Counters) -> None:
        self.store = store
        self.counters = counters

    def __call__(self, topic: str, payload: bytes) -> bool:
        return self.handle([(topic, payload)])[0]

    def _refused(self, topic: str, payload: bytes, category: str, reason: str, at: str) -> Write:
        self.counters.add("rejected")
        self.counters.add(f"rejected_{category}")
        log.warning("dead letter from %s: %s: %s", safe_topic(topic), category, reason)
        return dead_letter(topic, payload, category, reason, at)

    def _item(self, topic: str, payload: bytes, now: str) -> _Item:
        try:
            kind, write = to_write(topic, payload, now)
        except Rejected as exc:
            letter = self._refused(topic, payload, exc.category, exc.detail, now)
            return _Item("dead_letter", letter)
        except Exception as exc:  # a check we lack must not stop intake: keep it for a fix
            log.exception("intake failed on a message from %s", safe_topic(topic))
            reason = f"intake failed: {type(exc).__name__}"
            return _Item("dead_letter", self._refused(topic, payload, "internal", reason, now))
        return _Item(kind, write, topic, payload)

    def handle(self, messages: Sequence[tuple[str, bytes]]) -> list[bool]:
        """Per message: True = acknowledge (handled for good), False = deliver again."""
        self.counters.add("received", len(messages))
        now = utc_now()
        items = [self._item(t, p, now) for t, p in messages]
        handled = [True] * len(messages)
        try:
            new = self.store.write([it.write for it in items])
        except StoreRefused as exc:
            log.warning("the database refused a batch of %d (%s); item by item", len(items), exc)
            return self._one_by_one(items, now)
        except StoreError as exc:
            self.counters.add("store_errors")
            log.error("could not store %d message(s): %s", len(items), exc)
            return [False] * len(messages)
        self.counters.add("commits")
        self._count(items, new)
        return handled

    def _one_by_one(self, items: list[_Item], now: str) -> list[bool]:
        handled = [True] * len(items)
        for n, it in enumerate(items):
            try:
                try:
                    fresh = self.store.write([it.write])
                except StoreRefused as exc:
                    if isinstance(it.write, DeadLetter):
                        raise StoreError(f"a dead letter was refused: {exc}") from exc
                    letter = self._refused(it.topic, it.payload, "store", str(exc), now)
                    it = _Item("dead_letter", letter)
                    fresh = self.store.write([letter])
            except StoreError as exc:
                self.counters.add("store_errors")
                log.error("could not store %d message(s): %s", len(items) - n, exc)
                for k in range(n, len(items)):
                    handled[k] = False
                return handled
            self.counters.add("commits")
            self._count([it], fresh)
        return handled

    def _count(self, items: Sequence[_Item], new: Sequence[bool]) -> None:
        for it, fresh in zip(items, new, strict=True):
            if it.kind == "dead_letter":
                self.counters.add("dead_lettered")
            else:
                self.counters.add(f"{it.kind}_stored" if fresh else f"{it.kind}_duplicate")


@dataclass(frozen=True)
class Replayed:
    stored: int  # now stored (or already were): gone from the dead letters
    still_bad: list[tuple[str, str]]  # (key, today's reason): kept as they were
    truncated: int  # only the first bytes were kept: cannot be replayed


def replay(store: Store, limit: int = 10_000) -> Replayed:
    """Run intake again on the kept bytes of every dead letter (after a fix).

    One that now passes is stored and leaves the dead letters in the same transaction; one
    still refused stays as it is. :class:`StoreError` when the database is down (nothing
    half done: each letter is its own transaction).
    """
    stored = truncated = 0
    still_bad: list[tuple[str, str]] = []
    for letter in store.dead_letters(limit=limit, raw=True):
        if letter.truncated or letter.raw is None:
            truncated += 1
            continue
        reason = _replay_one(store, letter)
        if reason is None:
            stored += 1
        else:
            still_bad.append((letter.key, reason))
    return Replayed(stored, still_bad, truncated)


def _replay_one(store: Store, letter: StoredDeadLetter) -> str | None:
    """None when stored now; else why not."""
    try:
        _, write = to_write(letter.topic, letter.raw or b"", letter.first_received_at)
    except Rejected as exc:
        return f"{exc.category}: {exc.detail}"
    try:
        store.write([write, ClearDeadLetter(letter.key)])
    except StoreRefused as exc:
        return f"store: {exc}"
    return None


def print_dead_letters(
    store: Store, replay_them: bool = False, limit: int = 100, out: TextIO | None = None
) -> int:
    """``osteofy dashboard dead-letters [--replay]``: one line per letter; 0, or 1 when some
    are still refused after a replay."""
    out = out or sys.stdout
    code = 0
    if replay_them:
        r = replay(store)
        print(
            f"replayed: {r.stored} stored, {len(r.still_bad)} still refused, "
            f"{r.truncated} truncated (cannot be replayed)",
            file=out,
        )
        for key, reason in r.still_bad:
            print(f"still refused {key[:12]}: {reason}", file=out)
        code = 1 if r.still_bad or r.truncated else 0
    total = store.dead_letter_count()
    print(f"{total} dead letter(s)", file=out)
    for d in store.dead_letters(limit=limit):
        print(
            f"{d.received_at} {d.key[:12]} {d.topic} x{d.times} {d.size} B  "
            f"{d.category}: {d.reason}",
            file=out,
        )
    return code
