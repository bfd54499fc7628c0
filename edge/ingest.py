"""Ingest: is this file a radiograph this device can screen? (DESIGN.md; STYLE.md habit 5.)

Every file from the inbox is hostile until shown otherwise. A file is read in two passes over
ONE open handle, so the file checked is the file decoded:

1. header pass: size limit, DICM marker, the data set up to (not including) Pixel Data, the
   Pixel Data element's own header and, for compressed syntaxes, its fragment layout and the
   codestream's frame header; then :data:`RULES` in order, each returning ``(ok, reason)``;
2. pixel pass, only when every rule passed: the full read and decode (``raw_from_dataset``).

No length is trusted before it is compared with the file size and the image size, so a header
claiming a 60000 x 60000 image or a 4 GB element is rejected by arithmetic, never allocated.
Every failure becomes :class:`IngestRejected`: one plain line a technician understands, with no
patient data in it (DICOM values appear only when they are short coded strings such as Modality
or Body Part). Patient ID and Study UID are read as raw bytes, so pydicom never validates, and
so never logs, them; they stay in memory for the caller's keyed hashes.
"""

from __future__ import annotations

import logging
import math
import os
import re
import stat
import struct
import threading
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from pydicom import config as dicom_config
from pydicom import dcmread
from pydicom import uid as U
from pydicom.dataset import Dataset

from edge.dicom_values import IngestRejected
from edge.dicom_values import raw_value as _raw
from edge.dicom_values import reject as _reject
from edge.dicom_values import text_value as _text
from edge.facts import facts_from_dicom, merge_facts, read_sidecar
from edge.preprocess import RawImage, raw_from_dataset
from osteofy.config import IngestConfig
from osteofy.errors import InputRejected

__all__ = [
    "RULES",
    "SOP_CLASSES",
    "TRANSFER_SYNTAXES",
    "Header",
    "IngestRejected",
    "PixelElement",
    "Rule",
    "Study",
    "check_header",
    "failed_rule",
    "inspect_header",
    "load_study",
]

log = logging.getLogger(__name__)

# Module defaults (IngestConfig may grow these fields).
SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.1": "CR Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "DX Image Storage - For Presentation",
}
NATIVE = frozenset({U.ImplicitVRLittleEndian, U.ExplicitVRLittleEndian})
JPEG = frozenset({U.JPEGLossless, U.JPEGLosslessSV1, U.JPEGLSLossless, U.JPEGLSNearLossless})
J2K = frozenset({U.JPEG2000Lossless, U.JPEG2000})
TRANSFER_SYNTAXES = NATIVE | JPEG | J2K
# Coded anatomy of DX files whose optional Body Part Examined is absent -> the body part term.
ANATOMY_CODES = {
    "85562004": "HAND", "74670003": "WRIST", "29836001": "HIP",
    "816092008": "PELVIS", "12921003": "PELVIS", "71341001": "FEMUR",
}  # fmt: skip

_PIXEL_TAGS = {0x7FE00010: "ok", 0x7FE00008: "float", 0x7FE00009: "float"}
_LONG_VRS = {b"OB", b"OW", b"OD", b"OF", b"OL", b"OV", b"SQ", b"UC", b"UN", b"UR", b"UT"}
_DEFER = 1 << 20  # header elements above 1 MiB are skipped, not read
_MAX_FRAGMENTS = 100_000
_CODESTREAM_PEEK = 1 << 18  # bytes of the first fragment searched for SOF / SIZ
_CS = re.compile(r"[A-Z0-9 _]{1,16}")
_UIDRE = re.compile(r"[0-9.]{1,64}")
_SNIFF = {
    b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"%PDF": "a PDF",
    b"PK\x03\x04": "a ZIP archive", b"II*\x00": "a TIFF image", b"MM\x00*": "a TIFF image",
}  # fmt: skip


@dataclass(frozen=True)
class PixelElement:
    """Where Pixel Data lies and what its header claims, found without reading its value."""

    offset: int  # file offset of the value
    length: int | None  # declared length; None = undefined (encapsulated)
    fragments: int = 0  # encapsulated: fragments after the Basic Offset Table
    frame: tuple[int, int, int] | None = None  # rows, columns, components from the codestream
    problem: str | None = None  # a structural fault, already worded as a reason


@dataclass(frozen=True)
class Header:
    """A typed summary of the header; identifiers are kept out of ``repr`` (and so of logs)."""

    file_size: int
    transfer_syntax: str | None
    modality: str | None
    sop_class: str | None
    body_part: str | None  # Body Part Examined, upper case, or the coded anatomy's term
    site: str | None  # the model site the body part maps to (IngestConfig.body_parts)
    photometric: str | None
    samples_per_pixel: int | None
    frames: int | None
    bits_allocated: int | None
    bits_stored: int | None
    pixel_representation: int | None
    rows: int | None
    cols: int | None
    burned_in_annotation: str  # "YES", "NO" or "unknown"
    pixel: PixelElement | None
    patient_id: str | None = field(default=None, repr=False)
    study_uid: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class RuleContext:
    cfg: IngestConfig
    sites: frozenset[str] | None  # None: do not check that a model exists for the site


Verdict = tuple[bool, str]


@dataclass(frozen=True)
class Rule:
    """One acceptance rule: a name (recorded in quarantine) and a pure predicate."""

    name: str
    check: Callable[[Header, RuleContext], Verdict]


@dataclass(frozen=True)
class Study:
    """An accepted radiograph: its header, decoded image, site and clinical facts."""

    header: Header
    site: str
    raw: RawImage = field(repr=False)
    facts: dict[str, float | None]  # every INPUT_FACTS name; None = unknown
    notes: tuple[str, ...] = ()  # plain remarks, e.g. a DICOM value dropped as implausible


def _shown(what: str, value: str | None) -> str:
    """``"body part CHEST"`` when the value is a short coded string, else ``"the body part"``.

    Only such values may appear in a reason: anything else could be text a person typed.
    """
    return f"{what} {value}" if value is not None and _CS.fullmatch(value) else f"the {what}"


# --- rules ---------------------------------------------------------------------------------


def _ok() -> Verdict:
    return True, ""


def _modality(h: Header, c: RuleContext) -> Verdict:
    allowed = [m.upper() for m in c.cfg.modalities]
    if h.modality in allowed:
        return _ok()
    if not h.modality:
        return False, "the file does not say which modality made it (Modality is empty)"
    return False, f"{_shown('modality', h.modality)} is not accepted ({', '.join(allowed)} are)"


def _uid_name(value: str | None) -> str | None:
    """The standard's name of a well-known UID (``"CT Image Storage"``), else None."""
    if not value or not _UIDRE.fullmatch(value):
        return None
    name = U.UID(value, validation_mode=dicom_config.IGNORE).name  # no value-quoting warning
    return None if _UIDRE.fullmatch(name) else name


def _sop_class(h: Header, c: RuleContext) -> Verdict:
    if h.sop_class in SOP_CLASSES:
        return _ok()
    name = _uid_name(h.sop_class)
    return False, "the file is not a CR or DX radiograph for presentation" + (
        f" ({name})" if name else ""
    )


def _transfer_syntax(h: Header, c: RuleContext) -> Verdict:
    if h.transfer_syntax in TRANSFER_SYNTAXES:
        return _ok()
    if not h.transfer_syntax:
        return False, "the file has no transfer syntax in its file meta information"
    name = _uid_name(h.transfer_syntax)
    return False, f"the image encoding ({name or 'an unknown transfer syntax'}) is not supported"


def _body_part(h: Header, c: RuleContext) -> Verdict:
    if h.site is not None:
        return _ok()
    if not h.body_part:
        return False, "the file does not say which body part was imaged (Body Part Examined)"
    sites = ", ".join(sorted({s for s in c.cfg.body_parts.values()}))
    return False, f"{_shown('body part', h.body_part)} is not one this device screens ({sites})"


def _site_available(h: Header, c: RuleContext) -> Verdict:
    if c.sites is None or h.site in c.sites:
        return _ok()
    return False, f"no model for the {h.site} is installed on this device"


def _photometric(h: Header, c: RuleContext) -> Verdict:
    if h.photometric in ("MONOCHROME1", "MONOCHROME2"):
        return _ok()
    what = _shown("photometric interpretation", h.photometric)
    if h.photometric and (h.photometric.startswith(("RGB", "YBR")) or "COLOR" in h.photometric):
        return False, f"the image is in colour ({what}), not a grey radiograph"
    return False, f"{what} is not a grey radiograph"


def _samples(h: Header, c: RuleContext) -> Verdict:
    if h.samples_per_pixel == 1:
        return _ok()
    return False, "the image has more than one sample per pixel; a grey radiograph has one"


def _frames(h: Header, c: RuleContext) -> Verdict:
    if h.frames == 1:
        return _ok()
    if h.frames is None:
        return False, "the number of frames is not readable"
    return False, f"the file holds {h.frames} frames; only single radiographs are accepted"


def _bits(h: Header, c: RuleContext) -> Verdict:
    a, s = h.bits_allocated, h.bits_stored
    if a not in (8, 16) or s is None or not 1 <= s <= a:
        return False, "the image bit depth in the header is not valid (Bits Allocated/Stored)"
    if s not in c.cfg.bits_stored:
        return False, f"{s}-bit images are not accepted (accepted: {sorted(c.cfg.bits_stored)})"
    if h.pixel_representation not in (0, 1):
        return False, "the pixel representation in the header is not valid"
    return _ok()


def _dimensions(h: Header, c: RuleContext) -> Verdict:
    r, k, cfg = h.rows, h.cols, c.cfg
    if not r or not k:
        return False, "the header does not give the image size (Rows, Columns)"
    if max(r, k) > cfg.max_side or r * k > cfg.max_pixels:
        return False, f"the image is {k} x {r} pixels, larger than this device accepts"
    if min(r, k) < cfg.min_side:
        return False, f"the image is {k} x {r} pixels, too small (at least {cfg.min_side} a side)"
    return _ok()


def _pixel_data(h: Header, c: RuleContext) -> Verdict:
    p = h.pixel
    if p is None:
        return False, "the file has no image data (or is truncated before it)"
    if p.problem:
        return False, p.problem
    if h.transfer_syntax in NATIVE:
        sizes = [h.rows, h.cols, h.bits_allocated, h.samples_per_pixel, h.frames]
        expected = math.prod(v or 0 for v in sizes) // 8  # the earlier rules made them valid
        if p.length not in (expected, expected + expected % 2):
            return False, "the image data size does not match the image size in the header"
    elif p.frame != (h.rows, h.cols, h.samples_per_pixel):
        return False, "the compressed image size does not match the image size in the header"
    if p.length is not None and p.offset + p.length > h.file_size:
        return False, "the file is truncated (the image data runs past the end of the file)"
    return _ok()


RULES: tuple[Rule, ...] = (
    Rule("modality", _modality),
    Rule("sop_class", _sop_class),
    Rule("transfer_syntax", _transfer_syntax),
    Rule("body_part", _body_part),
    Rule("site_available", _site_available),
    Rule("photometric", _photometric),
    Rule("samples_per_pixel", _samples),
    Rule("frames", _frames),
    Rule("bits", _bits),
    Rule("dimensions", _dimensions),
    Rule("pixel_data", _pixel_data),
)


def failed_rule(
    header: Header, cfg: IngestConfig, sites_available: Collection[str] | None = None
) -> tuple[str, str] | None:
    """``(rule name, reason)`` of the first rule the header fails, or None if it passes all."""
    ctx = RuleContext(cfg, None if sites_available is None else frozenset(sites_available))
    for rule in RULES:
        ok, reason = rule.check(header, ctx)
        if not ok:
            return rule.name, reason
    return None


def check_header(
    header: Header, cfg: IngestConfig, sites_available: Collection[str] | None = None
) -> Verdict:
    """``(True, "")`` when the header passes every rule, else ``(False, reason)``."""
    failure = failed_rule(header, cfg, sites_available)
    return (True, "") if failure is None else (False, failure[1])


# --- reading -------------------------------------------------------------------------------


class _CappedFile:
    """Read-only file whose ``read(n)`` never asks for more than the file still holds.

    ``BufferedReader.read(n)`` reserves n bytes before reading, so a 4 GB length in a header
    would be a 4 GB allocation; here it is at most the rest of the file, itself bounded by
    ``max_file_mb``. It has no ``name``, so pydicom cannot put the path into a message.
    """

    def __init__(self, fh: BinaryIO, size: int, opened: os.stat_result | None = None) -> None:
        self._fh, self._size, self._opened = fh, size, opened

    def read(self, n: int | None = -1) -> bytes:
        left = max(self._size - self._fh.tell(), 0)
        return self._fh.read(left if n is None or n < 0 else min(n, left))

    def readinto(self, buffer: memoryview) -> int:
        """Fill ``buffer`` (at most the rest of the file) without an intermediate copy."""
        left = max(self._size - self._fh.tell(), 0)
        view = buffer[: min(len(buffer), left)]
        done = 0
        while done < len(view):
            n = self._fh.readinto(view[done:])  # type: ignore[attr-defined]
            if not n:
                break
            done += n
        return done

    def changed(self) -> bool:
        """Whether the open file was written to (size or modification time) since it opened."""
        if self._opened is None:
            return False
        now = os.fstat(self._fh.fileno())
        return (now.st_size, now.st_mtime_ns) != (self._opened.st_size, self._opened.st_mtime_ns)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()


@contextmanager
def _opened(path: Path, cfg: IngestConfig) -> Iterator[tuple[_CappedFile, int]]:
    """The file, checked for kind, size and the DICM marker before pydicom sees it."""
    try:  # O_NONBLOCK: a FIFO planted in the inbox must not hang the open
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        raise _reject("the file could not be opened", "dicom_file") from None
    info = os.fstat(fd)  # of the file opened, not of whatever the path names by now
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise _reject("not a regular file", "dicom_file")
    with os.fdopen(fd, "rb") as fh:
        size = info.st_size
        if size > cfg.max_file_mb * 1024 * 1024:
            raise _reject(f"the file is larger than the {cfg.max_file_mb:g} MB limit", "file_size")
        head = fh.read(132)
        if len(head) < 132 or head[128:132] != b"DICM":
            kind = next((k for magic, k in _SNIFF.items() if head.startswith(magic)), None)
            if kind:
                raise _reject(f"not a DICOM file (it is {kind})", "dicom_file")
            if len(head) < 132:
                raise _reject("not a DICOM file (too short, or truncated)", "dicom_file")
            raise _reject("not a DICOM file (no DICM marker at byte 128)", "dicom_file")
        fh.seek(0)
        yield _CappedFile(fh, size, info), size


class _WhileReading(logging.Filter):
    """Drops pydicom's (and its decoders') records in a thread that is reading an input file.

    pydicom quotes a value it finds invalid ("Invalid value for VR UI: '...'"), and in a corrupt
    or hostile file a misread length can put any bytes, the patient's name among them, into that
    value. Other threads' records pass: the filter is keyed to this module's reads only.
    """

    reading = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.reading, "active", False)


_FILTER = _WhileReading()
# pydicom's loggers, and its decoders', which log a traceback for every corrupt codestream.
_READER_LOGGERS = ("pydicom", "pydicom.pixels.decoders.base", "pydicom.pixels.utils", "pylibjpeg")


@contextmanager
def _quiet() -> Iterator[None]:
    """No pydicom warning or log record may carry a value out of a read (see _WhileReading).

    ``warnings.catch_warnings`` is process-wide: run ingest reads from one thread at a time.
    """
    for name in _READER_LOGGERS:  # a logger's filter does not see its children's records
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    _FILTER.reading.active = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        _FILTER.reading.active = False


def _us(ds: Dataset, tag: int) -> int | None:
    v = _raw(ds, tag)
    if isinstance(v, bytes | bytearray):
        if len(v) != 2:
            return None
        little = getattr(ds.get_item(tag), "is_little_endian", True)
        return int(struct.unpack("<H" if little else ">H", v)[0])
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _frames_of(ds: Dataset) -> int | None:
    text = _text(ds, 0x00280008)
    if text is None:
        return 1
    return int(text) if re.fullmatch(r"[+]?\d{1,9}", text.strip()) else None


def _body_part_of(ds: Dataset) -> str | None:
    text = _text(ds, 0x00180015)
    if text:
        return text.upper()
    try:  # DX: Body Part Examined is optional there; Anatomic Region Sequence is not
        for item in ds.get("AnatomicRegionSequence") or []:
            term = ANATOMY_CODES.get(str(item.get("CodeValue", "")))
            if term:
                return term
    except Exception:
        return None
    return None


def _element_at(fh: _CappedFile, pos: int, little: bool, implicit: bool) -> tuple[int, int, int]:
    """(tag, value offset, length) of the element header at ``pos`` (length -1 = undefined)."""
    fh.seek(pos)
    head = fh.read(12)
    if len(head) < 8:
        return -1, pos, 0
    e = "<" if little else ">"
    group, elem = struct.unpack(e + "HH", head[:4])
    if implicit:
        (length,), start = struct.unpack(e + "I", head[4:8]), pos + 8
    elif head[4:6] in _LONG_VRS:
        if len(head) < 12:
            return -1, pos, 0
        (length,), start = struct.unpack(e + "I", head[8:12]), pos + 12
    else:
        (length,), start = struct.unpack(e + "H", head[6:8]), pos + 8
    return (group << 16) | elem, start, (-1 if length == 0xFFFFFFFF else length)


def _fragments(fh: _CappedFile, start: int, size: int) -> tuple[int, int, str | None]:
    """Walk the encapsulated items: (fragments, offset of the first one, problem or None)."""
    pos, count, first = start, 0, -1
    while count <= _MAX_FRAGMENTS:
        fh.seek(pos)
        head = fh.read(8)
        if len(head) < 8:
            return count, first, "the file is truncated (the compressed image data ends early)"
        tag, length = struct.unpack("<HH", head[:4]), struct.unpack("<I", head[4:8])[0]
        if tag == (0xFFFE, 0xE0DD):
            return count, first, None if count else "the compressed image data has no frames"
        if tag != (0xFFFE, 0xE000) or pos + 8 + length > size:
            return count, first, "the compressed image data is corrupt or truncated"
        if pos > start:  # the first item is the Basic Offset Table
            count += 1
            first = pos + 8 if first < 0 else first
        pos += 8 + length
    return count, first, "the compressed image data has too many fragments"


def _jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from a JPEG / JPEG-LS SOF segment."""
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xF7:
            if i + 10 > len(data):
                return None
            rows, cols = struct.unpack(">HH", data[i + 5 : i + 9])
            return rows, cols, data[i + 9]
        seg = struct.unpack(">H", data[i + 2 : i + 4])[0]
        if seg < 2:
            return None
        i += 2 + seg
    return None


def _j2k_frame(data: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from a JPEG 2000 SIZ segment (inside a JP2 box or bare)."""
    off = 0
    if data.startswith(b"\x00\x00\x00\x0cjP  "):
        off = 12
        while True:
            if off + 8 > len(data):
                return None
            box, kind = struct.unpack(">I", data[off : off + 4])[0], data[off + 4 : off + 8]
            if kind == b"jp2c":
                off += 8
                break
            if box < 8:
                return None
            off += box
    siz = data[off : off + 42]
    if len(siz) < 42 or siz[:4] != b"\xff\x4f\xff\x51":
        return None
    xsiz, ysiz, xo, yo = struct.unpack(">4I", siz[8:24])
    if xsiz <= xo or ysiz <= yo:
        return None
    return ysiz - yo, xsiz - xo, struct.unpack(">H", siz[40:42])[0]


def _pixel_element(fh: _CappedFile, pos: int, size: int, ts: str | None) -> PixelElement | None:
    """Locate Pixel Data at ``pos`` (where the header pass stopped) without reading its value."""
    little = ts != U.ExplicitVRBigEndian  # encapsulated syntaxes are little endian too
    tag, start, length = _element_at(fh, pos, little, ts == U.ImplicitVRLittleEndian)
    if tag not in _PIXEL_TAGS:
        return None
    if _PIXEL_TAGS[tag] != "ok":
        return PixelElement(start, length, problem="floating-point image data is not supported")
    if length >= 0:
        if ts in NATIVE:
            return PixelElement(start, length)
        return PixelElement(start, length, problem="compressed image data is not encapsulated")
    if ts in NATIVE:
        return PixelElement(start, None, problem="uncompressed image data has no defined length")
    count, first, problem = _fragments(fh, start, size)
    frame = None
    if problem is None and ts in (JPEG | J2K):
        fh.seek(first)
        peek = fh.read(_CODESTREAM_PEEK)
        frame = _j2k_frame(peek) if ts in J2K else _jpeg_frame(peek)
        if frame is None:
            problem = "the compressed image data has no readable image header"
    return PixelElement(start, None, count, frame, problem)


def _summarise(ds: Dataset, size: int, pixel: PixelElement | None, cfg: IngestConfig) -> Header:
    meta = getattr(ds, "file_meta", None)
    ts = _text(meta, 0x00020010) if meta is not None else None
    body_part = _body_part_of(ds)
    synonyms = {k.upper(): v for k, v in cfg.body_parts.items()}
    burned = (_text(ds, 0x00280301) or "").upper()
    return Header(
        file_size=size,
        transfer_syntax=ts,
        modality=(_text(ds, 0x00080060) or "").upper() or None,
        sop_class=_text(ds, 0x00080016),
        body_part=body_part,
        site=synonyms.get(body_part) if body_part else None,
        photometric=(_text(ds, 0x00280004) or "").upper() or None,
        samples_per_pixel=_us(ds, 0x00280002),
        frames=_frames_of(ds),
        bits_allocated=_us(ds, 0x00280100),
        bits_stored=_us(ds, 0x00280101),
        pixel_representation=_us(ds, 0x00280103),
        rows=_us(ds, 0x00280010),
        cols=_us(ds, 0x00280011),
        burned_in_annotation=burned if burned in ("YES", "NO") else "unknown",
        pixel=pixel,
        patient_id=_text(ds, 0x00100020),
        study_uid=_text(ds, 0x0020000D),
    )


def _header_pass(fh: _CappedFile, size: int, cfg: IngestConfig) -> tuple[Header, Dataset]:
    try:
        with _quiet():
            ds = dcmread(fh, defer_size=_DEFER, stop_before_pixels=True)
            pos = fh.tell()
            meta = getattr(ds, "file_meta", None)
            ts = _text(meta, 0x00020010) if meta is not None else None
            pixel = _pixel_element(fh, pos, size, ts)
            return _summarise(ds, size, pixel, cfg), ds
    except Exception as exc:  # hostile bytes reach pydicom's parser: any failure is a verdict
        log.debug("header unreadable: %s", type(exc).__name__)
        reason = "the DICOM header is unreadable (corrupt or truncated file)"
        raise _reject(reason, "header") from None


def inspect_header(path: Path, cfg: IngestConfig) -> Header:
    """The header summary, read without touching pixel values; raises IngestRejected."""
    with _opened(Path(path), cfg) as (fh, size):
        return _header_pass(fh, size, cfg)[0]


def _lut_entries(ds: Dataset) -> int | None:
    """Entries the VOI LUT Descriptor announces (0 means 65536, PS3.3 C.11.2.1.1)."""
    seq = ds.get("VOILUTSequence")
    return int(seq[0].LUTDescriptor[0]) or 65536 if seq else None


def _check_raw(raw: RawImage, header: Header, lut_entries: int | None) -> str | None:
    """Reasons a decoded image would give a silently wrong result downstream."""
    if raw.pixels.shape != (header.rows, header.cols):
        return "the decoded image size does not match the image size in the header"
    if not (np.isfinite(raw.slope) and np.isfinite(raw.intercept) and raw.slope != 0):
        return "the header's rescale slope or intercept is not valid"
    if raw.window is not None and not all(np.isfinite(raw.window)):
        return "the header's display window is not valid"
    if raw.voi_lut is not None and not (
        raw.voi_lut[1].size == lut_entries and np.isfinite(raw.voi_lut[1]).all()
    ):
        return "the header's VOI LUT is not valid"
    return None


def _checked(raw: RawImage, header: Header, lut_entries: int | None) -> RawImage:
    problem = _check_raw(raw, header, lut_entries)
    if problem:
        raise _reject(problem, "pixel_data")
    return raw


def _pixel_pass(fh: _CappedFile, header: Header, ds: Dataset, cfg: IngestConfig) -> RawImage:
    if header.transfer_syntax in NATIVE and header.bits_allocated in (8, 16):
        return _native_pass(fh, header, ds)
    try:
        with _quiet():
            fh.seek(0)
            ds = dcmread(fh)
            again = _summarise(ds, header.file_size, header.pixel, cfg)
            if again != header:
                raise _reject("the file changed while it was being read", "pixel_data")
            raw = raw_from_dataset(ds)
            lut_entries = _lut_entries(ds)
    except IngestRejected:
        raise
    except InputRejected as exc:  # raw_from_dataset's own verdicts carry no patient data
        raise _reject(str(exc), "pixel_data") from None
    except Exception as exc:  # decoders (pydicom, pylibjpeg, openjpeg) fail in many ways
        log.debug("pixel decode failed: %s", type(exc).__name__)
        raise _reject("the image data could not be decoded (corrupt file)", "pixel_data") from None
    return _checked(raw, header, lut_entries)


def _native_pass(fh: _CappedFile, header: Header, ds: Dataset) -> RawImage:
    """Uncompressed pixels read straight into an array, using the header pass's dataset.

    The rules have already checked everything the read relies on (one frame, one sample,
    8 or 16 bits allocated, the value's offset and length against Rows x Columns and the
    file size). The result equals pydicom's ``pixel_array`` for these files (little-endian
    values, bits above Bits Stored cleared or sign-extended as pydicom does); reading them
    this way saves a second parse of the file and two copies of its pixels
    (``tests/test_ingest.py`` compares the two on every uncompressed variant it writes).
    """
    pixel = header.pixel
    rows, cols = header.rows, header.cols
    if pixel is None or rows is None or cols is None:  # excluded by the rules; kept for mypy
        raise _reject("the file has no image data (or is truncated before it)", "pixel_data")
    kind = "<i" if header.pixel_representation == 1 else "<u"
    pixels = np.empty((rows, cols), np.dtype(f"{kind}{(header.bits_allocated or 16) // 8}"))
    fh.seek(pixel.offset)
    if fh.readinto(memoryview(pixels.data).cast("B")) != pixels.nbytes:
        raise _reject(
            "the file is truncated (the image data runs past the end of the file)", "pixel_data"
        )
    if fh.changed():
        raise _reject("the file changed while it was being read", "pixel_data")
    unused = (header.bits_allocated or 16) - (header.bits_stored or 16)
    if unused > 0:  # pydicom's correct_unused_bits: bits above Bits Stored are not the value
        if header.pixel_representation == 1:
            np.left_shift(pixels, unused, out=pixels)
            np.right_shift(pixels, unused, out=pixels)  # arithmetic: extends the sign
        else:
            np.bitwise_and(
                pixels, pixels.dtype.type((1 << (header.bits_stored or 16)) - 1), out=pixels
            )
    try:
        with _quiet():
            raw = raw_from_dataset(ds, pixels)
            lut_entries = _lut_entries(ds)
    except InputRejected as exc:
        raise _reject(str(exc), "pixel_data") from None
    except Exception as exc:  # a deferred or malformed header value read only now
        log.debug("header value unreadable: %s", type(exc).__name__)
        raise _reject("the image data could not be decoded (corrupt file)", "pixel_data") from None
    return _checked(raw, header, lut_entries)


def load_study(
    path: Path,
    cfg: IngestConfig,
    sites_available: Collection[str],
    clinical: Mapping[str, object] | None = None,
) -> Study:
    """Validate, decode and gather the facts of one radiograph, or raise IngestRejected.

    Facts come from the DICOM header, then the sidecar ``<file>.json`` beside it (if any), then
    ``clinical`` (the ``--clinical`` JSON); later sources override earlier ones.
    """
    path = Path(path)
    with _opened(path, cfg) as (fh, size):
        header, ds = _header_pass(fh, size, cfg)
        failure = failed_rule(header, cfg, sites_available)
        if failure is not None or header.site is None:
            rule, reason = failure or ("body_part", "the body part is not known")
            raise _reject(reason, rule)
        raw = _pixel_pass(fh, header, ds, cfg)
    notes: list[str] = []
    dicom_facts = facts_from_dicom(ds, notes)
    facts = merge_facts(dicom_facts, read_sidecar(path), clinical)
    return Study(header=header, site=header.site, raw=raw, facts=facts, notes=tuple(notes))
