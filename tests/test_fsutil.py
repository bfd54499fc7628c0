from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from osteofy.fsutil import atomic_write, atomic_write_bytes


def test_atomic_write_creates_a_readable_file_and_no_leftovers(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["a.bin"]
    mode = stat.S_IMODE(target.stat().st_mode)
    assert mode & 0o044  # group/other can read (not mkstemp's 0600), umask permitting


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    atomic_write_bytes(target, b"old")

    def boom(fh) -> None:  # type: ignore[no-untyped-def]
        fh.write(b"partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["a.bin"]
