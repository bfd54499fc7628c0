"""What the device side needs from Python 3.11+, on Python 3.10.

JetPack 6 ships TensorRT's Python bindings for Python 3.10 only, so everything a device runs
(``edge``, ``firmware_bridge``, the wire contract and the device commands) stays 3.10-compatible;
``tests/test_py310_compat.py`` keeps 3.11-only names out of those modules. Use these instead:

* :data:`UTC` for ``datetime.UTC`` (3.11);
* :func:`parse_iso` for ``datetime.fromisoformat`` on text that may end in ``Z`` or use other
  ISO 8601 forms (3.10's ``fromisoformat`` reads only what ``isoformat`` writes).
"""

from __future__ import annotations

import re
from datetime import datetime, timezone

__all__ = ["UTC", "parse_iso"]

UTC = timezone.utc

_FRACTION = re.compile(r"(\.\d+)")


def parse_iso(text: str) -> datetime:
    """An ISO 8601 date-time as Python 3.11's ``fromisoformat`` reads it, on 3.10 too.

    Accepts a trailing ``Z`` (or ``z``) for UTC, a fraction of any length (cut or padded to
    microseconds) and offsets with or without a colon. Raises ``ValueError`` like
    ``fromisoformat`` for anything else.
    """
    s = text.strip()
    if s[-1:] in ("Z", "z"):
        s = s[:-1] + "+00:00"
    m = re.search(r"([+-])(\d{2})(\d{2})$", s)
    if m and ("T" in s or " " in s) and len(s) > 10:
        s = s[: m.start()] + f"{m.group(1)}{m.group(2)}:{m.group(3)}"
    fraction = _FRACTION.search(s)
    if fraction:
        digits = fraction.group(1)[1:]
        s = s[: fraction.start()] + "." + (digits + "000000")[:6] + s[fraction.end() :]
    return datetime.fromisoformat(s)
