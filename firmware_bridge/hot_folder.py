"""Hot folder: for digitizers that write files to a share or a USB drive.

A writer on a share gives no signal when a file is finished, so a file is taken only when
every test we can make says it is complete:

1. its size, mtime and inode are the same on two polls or more, for at least ``quiet_s`` by
   our monotonic clock (covers writers on another machine: SMB, NFS, a camera's USB stack;
   the share's clock is never compared with ours, so a skewed clock cannot stall a file);
2. no process on this machine holds it open for writing (``/proc/*/fd`` and the flags in
   ``/proc/*/fdinfo``; processes we may not inspect are covered by rule 1);
3. the copy is checked against the file afterwards: if size or mtime moved while we copied,
   the copy is thrown away (it never reached the inbox) and the file is tried again later.

A complete file is copied into the inbox atomically (:meth:`Inbox.deliver`), and only then
moved to ``processed/`` - never deleted, so the clinic can always show what arrived. A file
that is not DICOM (no ``DICM`` at byte 128) or too large goes to ``rejected/`` with a
``<name>.reason.json``. Files in sub-folders, hidden files and names that writers use while
still writing (``.tmp``, ``.part``, ``.partial``, ``.crdownload``) are left alone.

File names on a share may carry a patient's name, so they are never logged; only the
generated inbox name is. A crash between the inbox rename and the move to ``processed/``
delivers the file again on restart; the two inbox copies are byte-identical, and the edge
daemon screens a sha256 once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from edge.quarantine import quarantine
from firmware_bridge.errors import InboxFull
from firmware_bridge.options import HotFolderOptions
from firmware_bridge.spool import Inbox, copy_stream
from osteofy.fsutil import fsync_dir

__all__ = ["HotFolder", "open_for_writing"]

log = logging.getLogger(__name__)

PROCESSED = "processed"
REJECTED = "rejected"
# Names writers use while a file is still being written, and sidecars: left alone.
SKIPPED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".filepart", ".json")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR


@dataclass(frozen=True)
class _Signature:
    size: int
    mtime_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, st: os.stat_result) -> _Signature:
        return cls(st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


def open_for_writing(proc: Path = Path("/proc")) -> set[tuple[int, int]] | None:
    """(device, inode) of every file some visible process has open for writing.

    None where ``/proc`` is not available (then only the quiet period protects us).
    """
    if not (proc / "self" / "fd").is_dir():
        return None
    found: set[tuple[int, int]] = set()
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            fds = list((pid_dir / "fd").iterdir())
        except OSError:
            continue  # gone, or another user's process
        for fd in fds:
            try:
                flags_line = next(
                    line
                    for line in (pid_dir / "fdinfo" / fd.name).read_text().splitlines()
                    if line.startswith("flags:")
                )
                if not int(flags_line.split()[1], 8) & _WRITE_FLAGS:
                    continue
                st = os.stat(fd)  # follows the fd link to the open file
            except (OSError, StopIteration, ValueError, IndexError):
                continue
            found.add((st.st_dev, st.st_ino))
    return found


def _is_dicom(path: Path) -> bool:
    with path.open("rb") as fh:
        head = fh.read(132)
    return len(head) == 132 and head[128:] == b"DICM"


class HotFolder:
    """The hot-folder adapter: :meth:`scan_once` does one poll; :meth:`start` polls in a thread."""

    name = "hot_folder"

    def __init__(self, options: HotFolderOptions, inbox: Inbox) -> None:
        self.options = options
        self.inbox = inbox
        self.folder = Path(options.path)
        self.processed_dir = self.folder / PROCESSED
        self.rejected_dir = self.folder / REJECTED
        # path -> (signature, monotonic time it was first seen with that signature)
        self._seen: dict[Path, tuple[_Signature, float]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.taken = 0
        self.rejected = 0

    # --- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.processed_dir.mkdir(exist_ok=True)
        self.rejected_dir.mkdir(exist_ok=True)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="bridge-hot-folder", daemon=True)
        self._thread.start()
        log.info("watching hot folder %s every %.1f s", self.folder, self.options.poll_s)

    def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        problem = None
        while not self._stop.is_set():
            try:
                self.scan_once()
                problem = None
            except OSError as exc:  # the share went away, or a file we may not read
                if str(exc.strerror or exc) != problem:  # once per new problem, not per poll
                    problem = str(exc.strerror or exc)
                    log.warning("hot folder: %s; retrying every poll", problem)
            self._stop.wait(self.options.poll_s)

    # --- one poll ------------------------------------------------------------------------

    def _candidates(self) -> dict[Path, _Signature]:
        now: dict[Path, _Signature] = {}
        for entry in os.scandir(self.folder):
            name = entry.name
            if name.startswith(".") or name.lower().endswith(SKIPPED_SUFFIXES):
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                now[Path(entry.path)] = _Signature.of(entry.stat(follow_symlinks=False))
            except FileNotFoundError:
                continue
        return now

    def scan_once(self) -> int:
        """Take every file that is complete now; returns how many were handled."""
        current = self._candidates()
        now = time.monotonic()
        seen: dict[Path, tuple[_Signature, float]] = {}
        stable = []
        for path, sig in current.items():
            before = self._seen.get(path)
            unchanged = before is not None and before[0] == sig
            since = before[1] if before is not None and unchanged else now
            seen[path] = (sig, since)
            # An empty file is a writer that has not started: never judged, never rejected.
            if unchanged and sig.size > 0 and now - since >= self.options.quiet_s:
                stable.append(path)
        self._seen = seen
        if not stable:
            return 0
        writing = open_for_writing()
        handled = 0
        for path in sorted(stable):
            if self._stop.is_set():
                break
            sig = current[path]
            if writing is not None and (sig.device, sig.inode) in writing:
                continue  # still open for writing: wait
            if self._take(path, sig):
                handled += 1
                self._seen.pop(path, None)
        return handled

    def _take(self, path: Path, sig: _Signature) -> bool:
        try:
            if sig.size > self.options.max_file_bytes:
                self._reject(path, f"file is larger than {self.options.max_file_bytes >> 20} MiB")
                return True
            if not _is_dicom(path):
                self._reject(path, "not a DICOM file (no DICM marker at byte 128)")
                return True
            dest = self._copy(path, sig)
        except FileNotFoundError:
            return False  # someone moved it away
        except _Changed:
            log.info("a hot-folder file changed while being copied; it is retried later")
            return False
        except InboxFull as exc:
            log.error("hot folder: %s; the file waits in the hot folder", exc)
            return False
        self._archive(path)
        self.taken += 1
        log.info("hot folder: took a file as inbox/%s (%d KiB)", dest.name, sig.size >> 10)
        return True

    def _copy(self, path: Path, sig: _Signature) -> Path:
        with path.open("rb") as fh:
            if _Signature.of(os.fstat(fh.fileno())) != sig:
                raise _Changed

            def write(out: BinaryIO) -> None:
                n = copy_stream(fh, out)
                after = _Signature.of(os.stat(path))
                if n != sig.size or after != sig:
                    raise _Changed  # atomic_write removes the temp file: nothing delivered

            return self.inbox.deliver(write, size_hint=sig.size)

    def _archive(self, path: Path) -> None:
        """Move the taken original to processed/, keeping its name unless that is in use."""
        target = self.processed_dir / path.name
        n = 1
        while target.exists():
            target = self.processed_dir / f"{path.stem}.{n}{path.suffix}"
            n += 1
        os.replace(path, target)
        fsync_dir(self.processed_dir)
        fsync_dir(self.folder)

    def _reject(self, path: Path, reason: str) -> None:
        dest = quarantine(path, reason, self.rejected_dir, rule="hot_folder")
        self.rejected += 1
        log.warning("hot folder: rejected a file as rejected/%s: %s", dest.name, reason)


class _Changed(Exception):
    """The file changed between the stability check and the end of the copy."""
