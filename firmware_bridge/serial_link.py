"""Serial link, receiving side: frames from a USB-serial digitizer -> DICOM in the inbox.

:class:`SerialSession` is the protocol (docs/serial-protocol.md) as a pure state machine -
frames in, reply frames out - so every rule is testable without a serial port.
:class:`SerialReceiver` is the adapter: it owns the port (pyserial), feeds bytes to a
:class:`FrameDecoder`, and writes the session's replies.

Stop-and-wait: the device sends one frame and waits for its ACK (or NAK) before the next.
The receiver ACKs a frame once it has acted on it; the ACK of END is sent only after the
DICOM file is durable in the inbox. A frame with the same sequence and CRC as the last one is
a retransmission (our ACK was lost): it is ACKed again, not applied twice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, BinaryIO

from pydantic import ValidationError

from firmware_bridge.errors import (
    BridgeUnavailable,
    FramingError,
    ImageRejected,
    InboxFull,
    PayloadCRCError,
    ProtocolError,
)
from firmware_bridge.framing import (
    Frame,
    FrameDecoder,
    FrameType,
    NakReason,
    crc32,
    encode_frame,
    nak_payload,
    parse_chunk,
    parse_end,
)
from firmware_bridge.options import SerialOptions
from firmware_bridge.raw_image import AcquisitionMeta, DeviceInfo, build_dataset, decode_pixels
from firmware_bridge.spool import Inbox

__all__ = ["SerialReceiver", "SerialSession"]

log = logging.getLogger(__name__)


def _ack(seq: int) -> Frame:
    return Frame(FrameType.ACK, seq)


def _nak(seq: int, reason: NakReason) -> Frame:
    return Frame(FrameType.NAK, seq, nak_payload(reason))


def _json(payload: bytes) -> Any:
    try:
        return json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ImageRejected("payload is not UTF-8 JSON") from None


def _field_names(exc: ValidationError) -> str:
    """The names of the invalid META fields - never their values (they may be patient data)."""
    names = sorted({".".join(str(p) for p in e["loc"]) or "(top level)" for e in exc.errors()})
    return ", ".join(n if n.replace("_", "").replace(".", "").isalnum() else "?" for n in names)


class SerialSession:
    """The receiver's protocol state: device info, the image being received, the last reply."""

    def __init__(self, inbox: Inbox, max_image_bytes: int = 120 << 20) -> None:
        self.inbox = inbox
        self.max_image_bytes = max_image_bytes
        self.device = DeviceInfo()
        self.meta: AcquisitionMeta | None = None
        self.pixels = bytearray()
        self._last: tuple[int, int] | None = None  # (seq, frame CRC) of the last frame handled
        self._last_reply: Frame | None = None
        self.stored = 0
        self.naks = 0
        self.duplicates = 0

    # --- entry points --------------------------------------------------------------------

    def handle(self, frame: Frame) -> Frame | None:
        """Act on one good frame; the reply to send (None for frames that get no reply)."""
        if frame.type in (FrameType.ACK, FrameType.NAK):
            return None  # the device does not acknowledge; ignore a confused echo
        key = (frame.seq, crc32(frame.payload) ^ int(frame.type))
        if key == self._last and self._last_reply is not None:
            self.duplicates += 1
            return self._last_reply
        reply = self._dispatch(frame)
        if reply.type == FrameType.NAK:
            self.naks += 1
        # A NAKed frame is not "handled": the device's resend must be processed again.
        self._last = key if reply.type == FrameType.ACK else None
        self._last_reply = reply if reply.type == FrameType.ACK else None
        return reply

    def corrupt(self, error: FramingError) -> Frame | None:
        """A damaged frame: NAK it when its sequence is known, so the device resends at once."""
        if isinstance(error, PayloadCRCError):
            self.naks += 1
            return _nak(error.seq, NakReason.CORRUPT)
        return None

    # --- frames --------------------------------------------------------------------------

    def _dispatch(self, frame: Frame) -> Frame:
        try:
            if frame.type == FrameType.HELLO:
                return self._hello(frame)
            if frame.type == FrameType.META:
                return self._meta(frame)
            if frame.type == FrameType.CHUNK:
                return self._chunk(frame)
            return self._end(frame)
        except ImageRejected as exc:
            log.warning("serial: image refused: %s", exc)
            self._reset()
            return _nak(frame.seq, NakReason.REJECTED)
        except ProtocolError as exc:
            log.warning("serial: protocol error: %s", exc)
            self._reset()
            return _nak(frame.seq, NakReason.PROTOCOL)
        except Exception as exc:  # a bug must not kill the link; no message: it may hold data
            log.error("serial: internal error (%s); the image is refused", type(exc).__name__)
            self._reset()
            return _nak(frame.seq, NakReason.REJECTED)

    def _reset(self) -> None:
        self.meta = None
        self.pixels = bytearray()

    def _hello(self, frame: Frame) -> Frame:
        data = _json(frame.payload)
        try:
            self.device = DeviceInfo.model_validate(data)
        except ValidationError as exc:
            raise ImageRejected(f"HELLO fields invalid: {_field_names(exc)}") from None
        if self.meta is not None:
            log.warning("serial: device said HELLO mid-image; the partial image is dropped")
        self._reset()
        log.info("serial: digitizer %s %s connected", self.device.vendor, self.device.model)
        return _ack(frame.seq)

    def _meta(self, frame: Frame) -> Frame:
        data = _json(frame.payload)
        try:
            meta = AcquisitionMeta.model_validate(data)
        except ValidationError as exc:
            raise ImageRejected(f"META fields invalid: {_field_names(exc)}") from None
        if meta.image_bytes > self.max_image_bytes:
            raise ImageRejected(f"image of {meta.image_bytes >> 20} MiB exceeds the limit")
        if self.meta is not None:
            log.warning("serial: new META mid-image; the partial image is dropped")
        self.meta = meta
        self.pixels = bytearray()
        return _ack(frame.seq)

    def _chunk(self, frame: Frame) -> Frame:
        if self.meta is None:
            raise ProtocolError("CHUNK without a META before it")
        offset, data = parse_chunk(frame.payload)
        if offset != len(self.pixels):
            raise ProtocolError(f"CHUNK at offset {offset}, expected {len(self.pixels)}")
        if offset + len(data) > self.meta.image_bytes:
            raise ProtocolError("CHUNK runs past the image size META declared")
        self.pixels += data
        return _ack(frame.seq)

    def _end(self, frame: Frame) -> Frame:
        meta = self.meta
        if meta is None:
            raise ProtocolError("END without a META before it")
        total, image_crc = parse_end(frame.payload)
        if total != len(self.pixels) or total != meta.image_bytes:
            raise ImageRejected(f"END says {total} bytes; {len(self.pixels)} received")
        if crc32(self.pixels) != image_crc:
            raise ImageRejected("image CRC-32 does not match END")
        pixels = decode_pixels(self.pixels, meta)
        ds = build_dataset(pixels, meta, self.device)
        try:
            dest = self.inbox.deliver(
                lambda fh: _save(ds, fh), size_hint=meta.image_bytes + (64 << 10)
            )
        except (InboxFull, OSError) as exc:
            log.error("serial: cannot store the image (%s); the device will resend END", exc)
            return _nak(frame.seq, NakReason.STORAGE)
        self.stored += 1
        self._reset()
        log.info(
            "serial: stored a %dx%d %d-bit %s image as inbox/%s",
            meta.cols,
            meta.rows,
            meta.bits,
            meta.body_part,
            dest.name,
        )
        return _ack(frame.seq)


def _save(ds: Any, fh: BinaryIO) -> None:
    ds.save_as(fh, enforce_file_format=True)


class SerialReceiver:
    """The serial adapter: a thread that owns the port and runs a :class:`SerialSession`.

    An unplugged or missing device is not fatal: the port is reopened every ``reopen_s``, so a
    digitizer plugged in after the bridge started is picked up.
    """

    name = "serial"

    def __init__(
        self,
        options: SerialOptions,
        inbox: Inbox,
        opener: Callable[[SerialOptions], Any] | None = None,
    ) -> None:
        self.options = options
        self.session = SerialSession(inbox, options.max_image_bytes)
        self.decoder = FrameDecoder()
        self._opener = opener or _open_port
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_rx = time.monotonic()

    def start(self) -> None:
        self._opener_check()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="bridge-serial", daemon=True)
        self._thread.start()
        log.info("serial receiver on %s at %d baud", self.options.device, self.options.baudrate)

    def _opener_check(self) -> None:
        if self._opener is _open_port:
            try:
                import serial  # noqa: F401
            except ImportError:
                raise BridgeUnavailable(
                    "the serial receiver needs pyserial: pip install 'osteofy-edge[bridge]'"
                ) from None

    def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        port = None
        warned = False
        while not self._stop.is_set():
            if port is None:
                try:
                    port = self._opener(self.options)
                    warned = False
                except OSError as exc:  # serial.SerialException is an OSError
                    if not warned:
                        log.warning(
                            "serial device %s not available (%s); retrying",
                            self.options.device,
                            exc,
                        )
                        warned = True
                    self._stop.wait(self.options.reopen_s)
                    continue
            try:
                self.pump(port)
            except OSError as exc:
                log.warning("serial device %s lost (%s); reopening", self.options.device, exc)
                _close(port)
                port = None
        if port is not None:
            _close(port)

    def pump(self, port: Any) -> None:
        """Read what the port has (waiting at most its read timeout) and answer every frame.

        When the line has been quiet for ``idle_flush_s`` with a partial frame buffered, bytes
        of that frame were lost: the decoder gives it up and resynchronises.
        """
        data = port.read(max(1, port.in_waiting))
        now = time.monotonic()
        if data:
            self.decoder.feed(data)
            self._last_rx = now
        final = (
            not data
            and self.decoder.buffered > 0
            and now - self._last_rx >= self.options.idle_flush_s
        )
        while True:
            try:
                frame = self.decoder.next_frame(final=final)
            except FramingError as exc:
                reply = self.session.corrupt(exc)
                log.debug("serial: damaged frame (%s)", type(exc).__name__)
            else:
                if frame is None:
                    return
                reply = self.session.handle(frame)
            if reply is not None:
                port.write(encode_frame(reply))


def _open_port(options: SerialOptions) -> Any:
    import serial

    return serial.Serial(options.device, options.baudrate, timeout=0.05, write_timeout=5)


def _close(port: Any) -> None:
    with contextlib.suppress(OSError):
        port.close()
