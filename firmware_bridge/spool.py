"""The inbox spool: the one place every adapter delivers a complete study.

Each study is written as ``inbox/.<name>.<random>.tmp`` -> fsync -> rename to
``inbox/<name>`` -> fsync of the directory (:func:`osteofy.fsutil.atomic_write`). The edge
daemon skips hidden and ``.tmp`` names, so it only ever sees complete files, and once
:meth:`Inbox.deliver` returns the study survives a power cut: only then may an adapter
acknowledge it.

Names are generated (UTC time for people, random hex for uniqueness), never taken from DICOM
values or from a sender's file name, which may be hostile (``../``) or identify the patient.
"""

from __future__ import annotations

import logging
import re
import secrets
import shutil
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from firmware_bridge.errors import InboxFull
from osteofy.compat import UTC
from osteofy.fsutil import atomic_write

__all__ = ["DEFAULT_RESERVE_BYTES", "FILE_MODE", "Inbox", "copy_stream", "new_name"]

log = logging.getLogger(__name__)

DEFAULT_RESERVE_BYTES = 64 << 20  # free space kept for the edge daemon's own writes
FILE_MODE = 0o640  # studies hold patient data: owner and the service group only
_NAME = r"\d{8}T\d{12}Z-[0-9a-f]{16}\.dcm"
# atomic_write's temp files for our names: ".<name>.<mkstemp random>.tmp"
_STALE_TMP = re.compile(rf"\.{_NAME}\.[A-Za-z0-9_]+\.tmp")


def new_name(now: datetime | None = None) -> str:
    """A fresh study file name: ``20250101T120000123456Z-0123456789abcdef.dcm``."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    return f"{now:%Y%m%dT%H%M%S%fZ}-{secrets.token_hex(8)}.dcm"


class Inbox:
    """Durable, atomic delivery of complete studies into ``directory``."""

    def __init__(self, directory: Path, reserve_bytes: int = DEFAULT_RESERVE_BYTES) -> None:
        self.directory = Path(directory)
        self.reserve_bytes = reserve_bytes

    def create(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)

    def check_space(self, size_hint: int) -> None:
        """Raise :class:`InboxFull` unless ``size_hint`` bytes fit above the reserve."""
        free = shutil.disk_usage(self.directory).free
        if free < size_hint + self.reserve_bytes:
            raise InboxFull(
                f"inbox has {free >> 20} MiB free; a {size_hint >> 10} KiB study needs "
                f"{(size_hint + self.reserve_bytes) >> 20} MiB with the reserve"
            )

    def deliver(self, write: Callable[[BinaryIO], object], size_hint: int = 0) -> Path:
        """Write one study through ``write(file)``; return its final path once durable.

        If ``write`` raises, nothing is left in the inbox (the temp file is removed) and the
        exception propagates: the adapter answers with a failure and the sender retries.
        """
        self.check_space(size_hint)
        path = self.directory / new_name()
        atomic_write(path, write, mode=FILE_MODE)
        return path

    def remove_stale_temps(self) -> int:
        """Delete temp files a killed bridge left behind (only names this module makes).

        Call it at start, before any adapter runs: while the bridge runs, a temp file may be a
        study being written.
        """
        removed = 0
        for entry in self.directory.iterdir():
            if _STALE_TMP.fullmatch(entry.name) and entry.is_file():
                entry.unlink(missing_ok=True)
                removed += 1
        if removed:
            log.info("removed %d incomplete temp file(s) left by an earlier run", removed)
        return removed


def copy_stream(src: BinaryIO, dst: BinaryIO, chunk: int = 1 << 20) -> int:
    """Copy ``src`` to ``dst`` in fixed chunks (memory does not grow with the file)."""
    total = 0
    while block := src.read(chunk):
        dst.write(block)
        total += len(block)
    return total
