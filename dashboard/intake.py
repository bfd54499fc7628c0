"""Every MQTT message is untrusted until it passes here: topic, size, schema, identity.

:func:`parse` turns ``(topic, payload)`` into an :class:`Accepted` message or raises
:class:`Rejected` with a fixed *category* (what gets counted) and a detail that never
contains payload content — a payload can hold anything, including what a buggy device should
never have sent, so it must not reach a log. JSON payloads are validated with the same
strict models the device builds them with (``edge.messages.MESSAGES``: unknown fields
rejected) after a strict parse (:mod:`dashboard.strict_json`: UTF-8, I-JSON, no NUL, bounded
nesting); the schema version must be one we know, every timestamp must parse and fit a store
(years 1..9999 once in UTC); the site and device named by the topic (which the broker's ACL
ties to the publishing device) must be the ones the payload names. Overlays must be a complete
PNG within the contract's 200 KB.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime

from pydantic import BaseModel, ValidationError

from dashboard.strict_json import NotStrict, loads
from edge.messages import MESSAGES, TOPIC_ROOT, Feedback, Heartbeat, Status
from edge.result import Result

MAX_JSON_BYTES = 256 * 1024  # a result is a few KB; refuse to parse anything much bigger
MAX_PNG_BYTES = 200_000  # DESIGN.md, "MQTT contract": overlay <= 200 KB
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

CATEGORIES = (
    "topic",
    "too_large",
    "json",
    "text",
    "number",
    "version",
    "schema",
    "mismatch",
    "timestamp",
    "png",
    "store",  # the database refused it (a check intake lacks)
    "internal",  # intake itself failed on it (a bug; kept for a replay after the fix)
)
SCHEMAS = {kind: f"osteofy.{kind}.v1" for kind in MESSAGES}  # the versions we know


class Rejected(Exception):
    """A message we drop. ``category`` is one of :data:`CATEGORIES`; ``detail`` is safe to log."""

    def __init__(self, category: str, detail: str) -> None:
        super().__init__(f"{category}: {detail}")
        self.category = category
        self.detail = detail


@dataclass(frozen=True)
class Accepted:
    kind: str  # result | status | heartbeat | feedback | overlay
    site_id: str
    device_id: str
    message: BaseModel | None = None  # the validated model (JSON kinds)
    result_id: str | None = None  # overlay only
    png: bytes | None = None  # overlay only


def safe_topic(topic: str) -> str:
    """A topic fit for a log line (bounded, non-printables escaped)."""
    return ascii(topic[:160])


def utc_key(text: str, name: str = "created_at") -> str:
    """ISO 8601 time -> fixed-format UTC text that sorts correctly (``…T…:…:….mmmZ``).

    :class:`Rejected` when it does not parse, or when in UTC it falls outside years 1..9999
    (``9999-12-31T23:59:59-12:00`` is year 10000 in UTC: no store, nor Python, holds it).
    """
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise Rejected("timestamp", f"{name} is not an ISO 8601 time") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)  # the contract says UTC
    try:
        t = t.astimezone(UTC)
    except OverflowError:
        raise Rejected("timestamp", f"{name} is outside years 1..9999 in UTC") from None
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _times(message: BaseModel) -> dict[str, str | None]:
    """The timestamps a message carries, by field name."""
    if isinstance(message, Result):
        return {"created_at": message.created_at}
    if isinstance(message, Heartbeat):
        return {"at": message.at, "last_result_at": message.last_result_at}
    if isinstance(message, Status | Feedback):
        return {"at": message.at}
    return {}


def level_ok(level: str) -> bool:
    """The rule ``osteofy.config`` applies to site_id/device_id, plus no control characters."""
    return 0 < len(level) <= 64 and not any(c in "+# " or ord(c) < 32 or c == "\x7f" for c in level)


def _split(topic: str) -> tuple[str, str, str, str | None]:
    root = TOPIC_ROOT + "/"
    if not topic.startswith(root):
        raise Rejected("topic", "outside the osteofy/v1 tree")
    levels = topic[len(root) :].split("/")
    if len(levels) not in (3, 4):
        raise Rejected("topic", "wrong number of levels")
    site_id, device_id, kind = levels[:3]
    suffix = levels[3] if len(levels) == 4 else None
    if not level_ok(site_id) or not level_ok(device_id):
        raise Rejected("topic", "site or device level is not a valid identifier")
    if kind == "overlay":
        if suffix is None or not UUID_RE.match(suffix):
            raise Rejected("topic", "overlay topic needs a result_id (UUID)")
    elif kind not in MESSAGES or suffix is not None:
        raise Rejected("topic", "unknown message kind")
    return site_id, device_id, kind, suffix


def _check_png(data: bytes) -> None:
    if len(data) > MAX_PNG_BYTES:
        raise Rejected("too_large", f"overlay of {len(data)} bytes (limit {MAX_PNG_BYTES})")
    if not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise Rejected("png", "overlay is not a PNG")
    if not data.endswith(PNG_IEND):
        raise Rejected("png", "overlay PNG is truncated")


def _schema_detail(exc: ValidationError) -> str:
    # Error *types* only: locations may be field names a device invented, inputs are content.
    kinds = sorted({str(e["type"]) for e in exc.errors()})
    return f"{exc.error_count()} error(s): {', '.join(kinds)}"


def parse(topic: str, payload: bytes) -> Accepted:
    """Validate one message; raise :class:`Rejected` for anything we must not store."""
    site_id, device_id, kind, suffix = _split(topic)
    if kind == "overlay":
        _check_png(payload)
        return Accepted(kind, site_id, device_id, result_id=suffix, png=bytes(payload))
    if len(payload) > MAX_JSON_BYTES:
        raise Rejected("too_large", f"{kind} of {len(payload)} bytes (limit {MAX_JSON_BYTES})")
    try:
        obj = loads(payload)
    except NotStrict as exc:
        raise Rejected(exc.category, f"{kind}: {exc.detail}") from None
    if isinstance(obj, dict) and obj.get("schema", SCHEMAS[kind]) != SCHEMAS[kind]:
        raise Rejected("version", f"{kind}: unknown schema version (expected {SCHEMAS[kind]})")
    try:
        # Strict: JSON types as the schema says ("71" is not a number); nothing coerced.
        message = MESSAGES[kind].model_validate(obj, strict=True)
    except ValidationError as exc:
        raise Rejected("schema", f"{kind}: {_schema_detail(exc)}") from None
    if (getattr(message, "site_id", None), getattr(message, "device_id", None)) != (
        site_id,
        device_id,
    ):
        raise Rejected("mismatch", f"{kind}: payload site/device differ from the topic's")
    for name, value in _times(message).items():
        if value is not None:
            utc_key(value, name)
    return Accepted(kind, site_id, device_id, message=message)


class Counters:
    """Per-instance message counts (``/api/stats``): what arrived, stored, repeated, dropped."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._c: Counter[str] = Counter()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._c[name] += n

    def get(self, name: str) -> int:
        with self._lock:
            return self._c[name]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(sorted(self._c.items()))
