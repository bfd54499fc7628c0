"""Strict JSON for the wire: what every store can keep exactly, or a one-line reason why not.

Python's :func:`json.loads` is lenient where a store is not: it takes ``NaN``/``Infinity``,
turns ``1e400`` into ``inf``, keeps the last of two equal keys, accepts UTF-16 and UTF-32
bytes, and returns lone surrogates (``"\\ud800"``) and NUL (``"\\u0000"``) inside strings.
SQLite and PostgreSQL cannot encode a lone surrogate, PostgreSQL cannot hold NUL in text
(nor in ``jsonb``), and a browser's ``JSON.parse`` loses integers past 2**53. So a payload is
accepted here only when it is UTF-8 (RFC 8259 §8.1, no byte order mark), I-JSON (RFC 7493:
no duplicate keys, no lone surrogates, integers within ±(2**53 − 1), finite numbers), free of
NUL, and nested at most :data:`MAX_DEPTH` deep. Nothing is stripped or replaced: text that is
kept is kept exactly. :class:`NotStrict` carries a reason that never quotes the payload.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 32  # a result nests 4 deep; anything near this is not ours
MAX_SAFE_INT = 2**53 - 1  # I-JSON (RFC 7493 §2.2): integers a double holds exactly


class NotStrict(ValueError):
    """The payload is not strict JSON; ``category`` is ``json``, ``text`` or ``number``."""

    def __init__(self, category: str, detail: str) -> None:
        super().__init__(detail)
        self.category = category
        self.detail = detail


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise NotStrict("json", "duplicate key in an object")
        out[key] = value
    return out


def _constant(name: str) -> float:
    raise NotStrict("json", "NaN or Infinity is not JSON")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise NotStrict("number", "a number is too large for a double")
    return value


def _int(text: str) -> int:
    # Checked on the text: Python refuses to convert more than 4300 digits anyway.
    if len(text.lstrip("-")) > 16 or abs(int(text)) > MAX_SAFE_INT:
        raise NotStrict("number", "an integer is outside ±(2**53 − 1)")
    return int(text)


def check_text(text: str) -> None:
    """Refuse strings no store keeps exactly: lone surrogates and NUL."""
    if "\x00" in text:
        raise NotStrict("text", "a string holds NUL (U+0000), which PostgreSQL cannot store")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise NotStrict("text", "a string holds a lone surrogate (not Unicode text)") from None


def _walk(value: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise NotStrict("json", f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, str):
        check_text(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key)
            _walk(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _walk(item, depth + 1)


def loads(payload: bytes) -> Any:
    """The JSON document in ``payload``; :class:`NotStrict` with the reason otherwise."""
    if not payload.strip():
        raise NotStrict("json", "empty payload")
    if payload.startswith(b"\xef\xbb\xbf"):
        raise NotStrict("json", "starts with a byte order mark")
    try:
        text = payload.decode("utf-8")  # strict: no UTF-16/32 guessing, no invalid bytes
    except UnicodeDecodeError:
        raise NotStrict("json", "not UTF-8 (RFC 8259 §8.1)") from None
    try:
        obj = json.loads(
            text,
            object_pairs_hook=_pairs,
            parse_constant=_constant,
            parse_float=_float,
            parse_int=_int,
        )
    except NotStrict:
        raise
    except RecursionError:
        raise NotStrict("json", f"nested deeper than {MAX_DEPTH} levels") from None
    except ValueError:
        raise NotStrict("json", "not a JSON document") from None
    _walk(obj, 1)
    return obj
