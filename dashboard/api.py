"""``/api/*``: what machines (and the pages' own scripts) read, as :class:`Reply` values.

Routing and answers only — who may ask is decided in :mod:`dashboard.web` before this runs —
so every endpoint can be tested without a socket. All JSON unless said otherwise:

- ``GET /api/results?site=&class=&from=&to=&limit=`` — ``osteofy.result.v1`` objects exactly
  as published, newest ``created_at`` first (limit 1..500, default 50);
- ``GET /api/results.csv?site=&class=&from=&to=[&limit=]`` — the same filter as CSV, every
  matching row (see :mod:`dashboard.export`);
- ``GET /api/results/{id}`` — ``{"result": …, "received_at": …, "overlay": URL|null,
  "feedback": […]}``;
- ``GET /api/overlay/{id}`` — the result's PNG overlay;
- ``GET /api/devices`` — one object per device: state, last heartbeat, models, problems;
- ``GET /api/acceptance?site=&from=&to=`` — agreement and referral sensitivity/specificity
  against DXA per clinic and month (see :mod:`dashboard.acceptance`);
- ``GET /api/dead-letters?limit=`` — messages that could not be stored, newest first (limit
  1..500, default 100): topic, claimed site/device, reason, first/last arrival, times, size;
- ``GET /api/dead-letters/{key}`` — one of them with its kept bytes (base64);
- ``GET /api/stats`` — this instance's message counters and MQTT state.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

from dashboard.acceptance import summarise
from dashboard.export import MAX_ROWS, stream_csv
from dashboard.intake import UUID_RE
from dashboard.query import BadRequest, ResultFilter, parse_filter
from dashboard.store import Store, StoredDeadLetter

_ITEM = re.compile(r"^/api/(results|overlay)/([^/]+)$")
_DEAD_LETTER = re.compile(r"^/api/dead-letters/([0-9a-f]{64})$")
DEAD_LETTER_LIMIT = 100


@dataclass(frozen=True)
class Reply:
    """An HTTP answer; ``body`` may be an iterator of chunks (streamed, no Content-Length)."""

    status: int
    body: bytes | Iterator[bytes]
    ctype: str
    headers: dict[str, str] = field(default_factory=dict)


def json_reply(status: int, obj: Any, headers: dict[str, str] | None = None) -> Reply:
    body = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
    return Reply(status, body, "application/json; charset=utf-8", headers or {})


def not_found(what: str = "not found") -> Reply:
    return json_reply(HTTPStatus.NOT_FOUND, {"error": what})


def acceptance(store: Store, filt: ResultFilter) -> dict:
    """The ``/api/acceptance`` answer (also what the page renders)."""
    return summarise(store.result_counts(filt), store.feedback_outcomes(filt))


def _csv(store: Store, query: dict[str, list[str]]) -> Reply:
    filt = parse_filter(query, default_limit=MAX_ROWS, max_limit=MAX_ROWS)
    day = datetime.now(UTC).strftime("%Y%m%d")
    # A site id may hold quotes or semicolons: only plain characters go into the header.
    site = re.sub(r"[^A-Za-z0-9._-]", "_", filt.site or "")
    name = f"osteofy-results-{site + '-' if site else ''}{day}.csv"
    return Reply(
        HTTPStatus.OK,
        stream_csv(store, filt),
        "text/csv; charset=utf-8",
        {"Content-Disposition": f'attachment; filename="{name}"'},
    )


def _item(store: Store, kind: str, rid: str) -> Reply:
    if kind == "overlay":
        png = store.overlay(rid)
        if png is None:
            return not_found("no overlay for this result")
        return Reply(HTTPStatus.OK, png, "image/png")
    item = store.result(rid)
    if item is None:
        return not_found("no such result")
    return json_reply(
        HTTPStatus.OK,
        {
            "result": item.payload,
            "received_at": item.received_at,
            "overlay": f"/api/overlay/{rid}" if item.has_overlay else None,
            "feedback": item.feedback,
        },
    )


def dead_letter_json(letter: StoredDeadLetter) -> dict:
    out = {
        "key": letter.key,
        "topic": letter.topic,
        "site_id": letter.site_id,
        "device_id": letter.device_id,
        "category": letter.category,
        "reason": letter.reason,
        "first_received_at": letter.first_received_at,
        "received_at": letter.received_at,
        "times": letter.times,
        "size": letter.size,
        "truncated": letter.truncated,
    }
    if letter.raw is not None:
        out["raw_base64"] = base64.b64encode(letter.raw).decode("ascii")
    return out


def _dead_letters(store: Store, query: dict[str, list[str]]) -> Reply:
    values = query.get("limit", [])
    limit = DEAD_LETTER_LIMIT
    if len(values) > 1:
        raise BadRequest("limit is given more than once")
    if values:
        if not values[0].isdigit() or not 1 <= int(values[0]) <= 500:
            raise BadRequest("limit must be an integer from 1 to 500")
        limit = int(values[0])
    letters = store.dead_letters(limit=limit)
    return json_reply(
        HTTPStatus.OK,
        {
            "total": store.dead_letter_count(),
            "dead_letters": [dead_letter_json(d) for d in letters],
        },
    )


def api_reply(
    store: Store, stats: Callable[[], dict], path: str, query: dict[str, list[str]]
) -> Reply:
    """The answer to ``GET path?query``; :class:`dashboard.query.BadRequest` for bad input."""
    if path == "/api/results":
        return json_reply(HTTPStatus.OK, store.results(parse_filter(query)))
    if path == "/api/results.csv":
        return _csv(store, query)
    if path == "/api/devices":
        return json_reply(HTTPStatus.OK, store.devices())
    if path == "/api/acceptance":
        return json_reply(HTTPStatus.OK, acceptance(store, parse_filter(query)))
    if path == "/api/stats":
        return json_reply(HTTPStatus.OK, stats())
    if path == "/api/dead-letters":
        return _dead_letters(store, query)
    d = _DEAD_LETTER.match(path)
    if d:
        letter = store.dead_letter(d.group(1))
        if letter is None:
            return not_found("no such dead letter")
        return json_reply(HTTPStatus.OK, dead_letter_json(letter))
    m = _ITEM.match(path)
    if m and UUID_RE.match(m.group(2)):
        return _item(store, m.group(1), m.group(2))
    return not_found()
