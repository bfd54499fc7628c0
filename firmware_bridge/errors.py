"""Typed errors of the digitizer bridge, all under :class:`osteofy.errors.OsteofyError`.

Adapters turn these into their protocol's answer (a DICOM failure status, a serial NAK, a
``rejected/`` reason file); only an entry point turns one into an exit code.
"""

from __future__ import annotations

from osteofy.errors import OsteofyError, Unavailable

__all__ = [
    "BridgeError",
    "BridgeUnavailable",
    "FrameTooLarge",
    "FramingError",
    "HeaderCRCError",
    "HeaderError",
    "ImageRejected",
    "InboxFull",
    "PayloadCRCError",
    "ProtocolError",
    "TruncatedFrame",
]


class BridgeError(OsteofyError):
    """Base of the bridge's own errors."""


class BridgeUnavailable(Unavailable):
    """An adapter cannot run here (port taken, optional library missing): exit code 4."""


class InboxFull(BridgeError):
    """The inbox file system has too little free space: refuse now, the sender retries."""


class ImageRejected(BridgeError):
    """A serial image (its META or its pixels) cannot become a valid radiograph."""


class ProtocolError(BridgeError):
    """A well-formed frame whose payload or order breaks the serial protocol."""


class FramingError(BridgeError):
    """Bytes on the serial link are not a valid frame (corrupted, truncated, or garbage)."""


class TruncatedFrame(FramingError):
    """Fewer bytes than one complete frame."""


class HeaderError(FramingError):
    """No start marker, a wrong version, an unknown type or a header CRC mismatch."""


class HeaderCRCError(HeaderError):
    """The header's CRC does not match: noise that looked like a start marker, or damage."""


class FrameTooLarge(FramingError):
    """A header (with a valid CRC) announces a payload beyond the protocol's limit."""


class PayloadCRCError(FramingError):
    """The header is intact but the payload is not: the receiver can NAK this sequence."""

    def __init__(self, message: str, frame_type: int, seq: int) -> None:
        super().__init__(message)
        self.frame_type = frame_type
        self.seq = seq
