"""The subscriber's handler: validate each message, store a batch in one commit, count.

:class:`Ingest` is handed the messages the subscriber has received but not yet acknowledged
and answers, per message, whether it is *handled for good* (stored, already stored, or
rejected — a redelivery would be rejected again) or must be delivered again (the database
could not take the batch). The subscriber acknowledges only the handled ones, after this
returns, i.e. after the commit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from dashboard.intake import Counters, Rejected, parse, safe_topic, utc_key
from dashboard.store import (
    DeviceHeartbeat,
    DeviceStatus,
    NewFeedback,
    NewOverlay,
    NewResult,
    Store,
    StoreError,
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


class Ingest:
    """Validate, store, count. ``handle`` takes a batch; calling it takes one message."""

    def __init__(self, store: Store, counters: Counters) -> None:
        self.store = store
        self.counters = counters

    def __call__(self, topic: str, payload: bytes) -> bool:
        return self.handle([(topic, payload)])[0]

    def handle(self, messages: Sequence[tuple[str, bytes]]) -> list[bool]:
        """Per message: True = acknowledge (handled for good), False = deliver again."""
        self.counters.add("received", len(messages))
        now = utc_now()
        kinds: list[str] = []
        writes: list[Write] = []
        where: list[int] = []  # index of each write's message
        for i, (topic, payload) in enumerate(messages):
            try:
                kind, write = to_write(topic, payload, now)
            except Rejected as exc:
                self.counters.add("rejected")
                self.counters.add(f"rejected_{exc.category}")
                log.warning("dropped a message on %s: %s", safe_topic(topic), exc)
                continue
            kinds.append(kind)
            writes.append(write)
            where.append(i)
        handled = [True] * len(messages)
        if not writes:
            return handled
        try:
            new = self.store.write(writes)
        except StoreError as exc:
            self.counters.add("store_errors")
            log.error("could not store %d message(s): %s", len(writes), exc)
            for i in where:
                handled[i] = False
            return handled
        self.counters.add("commits")
        for kind, fresh in zip(kinds, new, strict=True):
            self.counters.add(f"{kind}_stored" if fresh else f"{kind}_duplicate")
        return handled
