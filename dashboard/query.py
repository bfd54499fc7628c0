"""The results feed's filters, parsed once from a query string and used by every view of it.

The page, ``/api/results``, ``/api/results.csv`` and ``/api/acceptance`` take the same
parameters — ``site``, ``class``, ``from``, ``to`` (UTC days, both inclusive) and ``limit`` —
so a filtered page's links (CSV export, the live refresh) carry exactly what the person
chose. Every value is checked here, before any of it reaches SQL or HTML: a bad one is a
:class:`BadRequest` (HTTP 400) with a message that names the parameter, never its value.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import date, timedelta

from dashboard.intake import level_ok
from edge.result import CLASSES

DEFAULT_LIMIT = 50
MAX_LIMIT = 500  # a page or an API answer; the CSV export pages through everything
MAX_FIELDS = 20  # query parameters accepted at all (parse_qs max_num_fields)


class BadRequest(Exception):
    """A request we refuse with HTTP 400; the message is safe to show and to log."""


@dataclass(frozen=True)
class ResultFilter:
    """Which results: all of them by default, newest first, ``limit`` at a time."""

    site: str | None = None
    cls: str | None = None  # "class" in URLs (a Python keyword)
    date_from: date | None = None
    date_to: date | None = None
    limit: int = DEFAULT_LIMIT

    def created_range(self) -> tuple[str | None, str | None]:
        """Bounds on the stored ``created_at`` key (``YYYY-MM-DDT…Z``): ``[low, high)``.

        The key is fixed-format UTC text, so day bounds compare as strings; ``to`` is
        inclusive, hence the next day as the exclusive upper bound.
        """
        low = self.date_from.isoformat() if self.date_from else None
        high = (self.date_to + timedelta(days=1)).isoformat() if self.date_to else None
        return low, high

    def params(self, with_limit: bool = True) -> dict[str, str]:
        """The query parameters that give this filter back (for links)."""
        out: dict[str, str] = {}
        if self.site:
            out["site"] = self.site
        if self.cls:
            out["class"] = self.cls
        if self.date_from:
            out["from"] = self.date_from.isoformat()
        if self.date_to:
            out["to"] = self.date_to.isoformat()
        if with_limit:
            out["limit"] = str(self.limit)
        return out

    def with_limit(self, limit: int) -> ResultFilter:
        return replace(self, limit=limit)

    @property
    def active(self) -> bool:
        return any((self.site, self.cls, self.date_from, self.date_to))


def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise BadRequest(f"{name} is given more than once")
    return values[0].strip() or None  # an empty form field means "any"


def _day(query: dict[str, list[str]], name: str) -> date | None:
    text = _one(query, name)
    if text is None:
        return None
    try:
        if len(text) != 10:
            raise ValueError(name)
        return date.fromisoformat(text)
    except ValueError:
        raise BadRequest(f"{name} must be a day as YYYY-MM-DD") from None


def parse_filter(
    query: dict[str, list[str]], default_limit: int = DEFAULT_LIMIT, max_limit: int = MAX_LIMIT
) -> ResultFilter:
    """The filter a query string asks for; :class:`BadRequest` for anything malformed."""
    site = _one(query, "site")
    if site is not None and not level_ok(site):
        raise BadRequest("site is not a valid site id")
    cls = _one(query, "class")
    if cls is not None and cls not in CLASSES:
        raise BadRequest(f"class must be one of {', '.join(CLASSES)}")
    text = _one(query, "limit")
    limit = default_limit
    if text is not None:
        if not text.isdigit() or not 1 <= int(text) <= max_limit:
            raise BadRequest(f"limit must be an integer from 1 to {max_limit}")
        limit = int(text)
    date_from, date_to = _day(query, "from"), _day(query, "to")
    if date_from and date_to and date_from > date_to:
        raise BadRequest("from must not be after to")
    return ResultFilter(site, cls, date_from, date_to, limit)
