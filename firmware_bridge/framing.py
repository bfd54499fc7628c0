"""Frames of the serial link (docs/serial-protocol.md): encoding, decoding, resynchronisation.

A USB-serial line corrupts, drops and (through a confused firmware) repeats bytes, so every
frame carries enough to be found and checked on its own::

    offset  size  field
    0       2     start marker  A5 5A
    2       1     version       01
    3       1     type          HELLO 01, META 02, CHUNK 03, END 04, ACK 06, NAK 15
    4       2     sequence      uint16 little endian
    6       4     length        payload bytes, uint32 little endian, <= MAX_PAYLOAD
    10      4     header CRC    CRC-32 of bytes 0-9
    14      n     payload
    14+n    4     frame CRC     CRC-32 of bytes 0 .. 13+n (header and payload)

The header has its own CRC so that a corrupted length is caught before we wait for the
bytes it announces. :class:`FrameDecoder` scans for the marker, checks the header, waits
for the payload and checks the frame CRC; on any failure it skips ONE byte past the marker
and scans again, so a frame that starts inside the bytes a bad frame claimed is still found.
It raises only :class:`~firmware_bridge.errors.FramingError` subclasses, and only for
failures the receiver can act on; header noise is skipped and counted.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum

from firmware_bridge.errors import (
    FrameTooLarge,
    FramingError,
    HeaderCRCError,
    HeaderError,
    PayloadCRCError,
    ProtocolError,
    TruncatedFrame,
)

__all__ = [
    "HEADER_LEN",
    "MAGIC",
    "MAX_PAYLOAD",
    "TRAILER_LEN",
    "VERSION",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "FramingError",
    "NakReason",
    "chunk_payload",
    "decode_frame",
    "encode_frame",
    "end_payload",
    "nak_payload",
    "parse_chunk",
    "parse_end",
    "parse_nak",
]

MAGIC = b"\xa5\x5a"
VERSION = 1
MAX_CHUNK = 65536
MAX_PAYLOAD = MAX_CHUNK + 4  # a CHUNK: 4-byte offset + at most 64 KiB of pixels
_HEADER = struct.Struct("<2sBBHI")  # marker, version, type, seq, length
HEADER_LEN = _HEADER.size + 4
TRAILER_LEN = 4
_U32 = struct.Struct("<I")


class FrameType(IntEnum):
    HELLO = 0x01
    META = 0x02
    CHUNK = 0x03
    END = 0x04
    ACK = 0x06
    NAK = 0x15


class NakReason(IntEnum):
    """Why the receiver refused a frame; the device's reaction is in the protocol document."""

    CORRUPT = 1  # payload CRC failed: send the same frame again
    PROTOCOL = 2  # frame out of place (CHUNK before META, wrong offset): restart the image
    REJECTED = 3  # META invalid, or END does not match the pixels: restart the image
    STORAGE = 4  # the bridge could not store the image: send END again later


@dataclass(frozen=True)
class Frame:
    type: FrameType
    seq: int
    payload: bytes = b""


def crc32(data: bytes | bytearray | memoryview) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def encode_frame(frame: Frame) -> bytes:
    if not 0 <= frame.seq <= 0xFFFF:
        raise ValueError(f"sequence {frame.seq} is not a uint16")
    if len(frame.payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(frame.payload)} bytes exceeds {MAX_PAYLOAD}")
    head = _HEADER.pack(MAGIC, VERSION, int(frame.type), frame.seq, len(frame.payload))
    head += _U32.pack(crc32(head))
    body = head + frame.payload
    return body + _U32.pack(crc32(body))


def _parse_header(head: bytes | bytearray | memoryview) -> tuple[FrameType, int, int]:
    """(type, seq, length) of a 14-byte header; raises HeaderError or FrameTooLarge."""
    magic, version, ftype, seq, length = _HEADER.unpack_from(head)
    if magic != MAGIC:
        raise HeaderError("no start marker")
    (claimed,) = _U32.unpack_from(head, _HEADER.size)
    if crc32(head[: _HEADER.size]) != claimed:
        raise HeaderCRCError("header CRC mismatch")
    if version != VERSION:
        raise HeaderError(f"protocol version {version} is not {VERSION}")
    try:
        kind = FrameType(ftype)
    except ValueError:
        raise HeaderError(f"unknown frame type 0x{ftype:02x}") from None
    if length > MAX_PAYLOAD:
        raise FrameTooLarge(f"frame announces {length} payload bytes (limit {MAX_PAYLOAD})")
    return kind, seq, length


def decode_frame(data: bytes) -> Frame:
    """Exactly one frame from ``data``; raises a FramingError subclass otherwise."""
    if len(data) < HEADER_LEN + TRAILER_LEN:
        raise TruncatedFrame(f"{len(data)} bytes are fewer than a frame's minimum")
    kind, seq, length = _parse_header(data[:HEADER_LEN])
    end = HEADER_LEN + length
    if len(data) < end + TRAILER_LEN:
        raise TruncatedFrame(f"frame of {end + TRAILER_LEN} bytes cut at {len(data)}")
    if len(data) > end + TRAILER_LEN:
        raise HeaderError(f"{len(data) - end - TRAILER_LEN} bytes after the frame")
    (claimed,) = _U32.unpack_from(data, end)
    if crc32(data[:end]) != claimed:
        raise PayloadCRCError("frame CRC mismatch", int(kind), seq)
    return Frame(kind, seq, bytes(data[HEADER_LEN:end]))


class FrameDecoder:
    """Incremental decoder: :meth:`feed` bytes, then call :meth:`next_frame` until None.

    ``next_frame`` returns the next good frame, or None when more bytes are needed; it raises
    :class:`PayloadCRCError` (intact header: the receiver NAKs that sequence),
    :class:`FrameTooLarge` or :class:`HeaderError` (a CRC-valid header the protocol does not
    allow) - each time after resynchronising, so the caller just calls it again.
    """

    def __init__(self, max_buffer: int = 4 * (HEADER_LEN + MAX_PAYLOAD + TRAILER_LEN)) -> None:
        self._buf = bytearray()
        self.max_buffer = max_buffer
        self.discarded = 0  # bytes skipped while looking for a frame
        self.resyncs = 0  # candidate headers that failed their CRC

    def feed(self, data: bytes | bytearray) -> None:
        self._buf += data
        if len(self._buf) > self.max_buffer:  # a caller that never drains: keep the newest
            cut = len(self._buf) - self.max_buffer
            del self._buf[:cut]
            self.discarded += cut

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def _skip(self, n: int) -> None:
        del self._buf[:n]
        self.discarded += n

    def next_frame(self, final: bool = False) -> Frame | None:
        """The next complete, valid frame; ``final``: the line is idle, give up on a partial."""
        buf = self._buf
        while True:
            start = buf.find(MAGIC)
            if start < 0:
                keep = 1 if buf[-1:] == MAGIC[:1] and not final else 0
                self._skip(len(buf) - keep)
                return None
            if start:
                self._skip(start)
            if len(buf) < HEADER_LEN:
                if final:
                    self._skip(1)
                    continue
                return None
            try:
                kind, seq, length = _parse_header(buf[:HEADER_LEN])
            except HeaderCRCError:
                self._skip(1)
                self.resyncs += 1
                continue  # noise that looked like a marker, or a damaged header
            except (HeaderError, FrameTooLarge):
                self._skip(1)
                raise
            end = HEADER_LEN + length
            if len(buf) < end + TRAILER_LEN:
                if final:
                    self._skip(1)  # bytes were lost inside this frame: look past its marker
                    continue
                return None
            (claimed,) = _U32.unpack_from(buf, end)
            if crc32(memoryview(buf)[:end]) != claimed:
                self._skip(1)
                raise PayloadCRCError("frame CRC mismatch", int(kind), seq)
            payload = bytes(buf[HEADER_LEN:end])
            del buf[: end + TRAILER_LEN]
            return Frame(kind, seq, payload)


# --- payloads ----------------------------------------------------------------------------


def chunk_payload(offset: int, data: bytes) -> bytes:
    if len(data) > MAX_CHUNK:
        raise ValueError(f"chunk of {len(data)} bytes exceeds {MAX_CHUNK}")
    return _U32.pack(offset) + data


def parse_chunk(payload: bytes) -> tuple[int, bytes]:
    if len(payload) < 4:
        raise ProtocolError("CHUNK payload shorter than its offset field")
    return _U32.unpack_from(payload)[0], payload[4:]


def end_payload(total: int, image_crc: int) -> bytes:
    return _U32.pack(total) + _U32.pack(image_crc)


def parse_end(payload: bytes) -> tuple[int, int]:
    if len(payload) != 8:
        raise ProtocolError("END payload must be 8 bytes (length, CRC-32)")
    return _U32.unpack_from(payload)[0], _U32.unpack_from(payload, 4)[0]


def nak_payload(reason: NakReason) -> bytes:
    return bytes([int(reason)])


def parse_nak(payload: bytes) -> NakReason | None:
    try:
        return NakReason(payload[0]) if payload else None
    except ValueError:
        return None
