"""Reading DICOM values defensively, and the refusal every ingest step raises.

Shared by ``edge.ingest`` (the header and pixel passes) and ``edge.facts`` (clinical facts):
a value is read as its raw bytes or text without pydicom's conversion, so a malformed element
reads as absent instead of raising — and pydicom never validates (and so never logs) it.
"""

from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset

from osteofy.errors import InputRejected

__all__ = ["IngestRejected", "raw_value", "reject", "text_value"]


class IngestRejected(InputRejected):
    """An input refused by a named rule; ``rule`` goes into the quarantine reason file."""

    def __init__(self, reason: str, rule: str) -> None:
        super().__init__(" ".join(reason.split()))  # always one line
        self.rule = rule


def reject(reason: str, rule: str) -> IngestRejected:
    return IngestRejected(reason, rule)


def raw_value(ds: Dataset, tag: int) -> Any:
    """An element's value without pydicom's conversion (and its value-quoting validation)."""
    try:
        elem = ds.get_item(tag)
    except Exception:  # a malformed element must read as absent, never raise
        return None
    return None if elem is None else elem.value


def text_value(ds: Dataset, tag: int) -> str | None:
    v = raw_value(ds, tag)
    if isinstance(v, bytes | bytearray):
        v = bytes(v).decode("latin-1")
    if v is None or not isinstance(v, str | int | float):
        return None
    return str(v).strip(" \x00") or None
