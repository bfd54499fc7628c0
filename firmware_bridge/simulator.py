"""A digitizer that speaks the serial protocol - for tests, demos and bring-up of real links.

It plays the device side of docs/serial-protocol.md over a pseudo-terminal pair (``os.openpty``:
the bridge opens the slave by name with pyserial, exactly as it opens ``/dev/ttyUSB0``) or over
a real serial port, and can damage its own traffic on purpose - flip bytes, drop bytes, send a
frame twice, insert garbage, ignore an ACK as if lost - so that the receiver's NAK,
retransmission and resynchronisation paths are exercised, not just described.

``python -m firmware_bridge.simulator [FILE.dcm ...]`` (``osteofy bridge simulate-digitizer``)
sends the pixels and metadata of DICOM files (e.g. from ``osteofy simulate``), or synthetic
test patterns when no file is given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import select
import sys
import time
import tty
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from firmware_bridge.errors import BridgeError, FramingError
from firmware_bridge.framing import (
    MAX_CHUNK,
    Frame,
    FrameDecoder,
    FrameType,
    NakReason,
    chunk_payload,
    crc32,
    encode_frame,
    end_payload,
    parse_nak,
)
from osteofy.errors import InputRejected, OsteofyError, Unavailable, UsageError

__all__ = [
    "Digitizer",
    "DigitizerError",
    "Faults",
    "FdLink",
    "Link",
    "PtyPair",
    "image_from_dicom",
    "main",
    "open_pty",
    "synthetic_image",
]

log = logging.getLogger("firmware_bridge.simulator")  # also when run with -m


class DigitizerError(BridgeError):
    """The simulated device gave up: no answer, or the bridge refused the image for good."""


class Link(Protocol):
    def write(self, data: bytes) -> None: ...

    def read(self, timeout_s: float) -> bytes: ...


@dataclass(frozen=True)
class PtyPair:
    master_fd: int
    slave_fd: int
    slave_name: str

    def close(self) -> None:
        for fd in (self.master_fd, self.slave_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def open_pty() -> PtyPair:
    """A raw pseudo-terminal pair; the bridge opens ``slave_name`` like a serial device.

    The slave is put in raw mode before any byte moves (no echo, no CR/LF translation), and its
    fd stays open here so the pair lives until :meth:`PtyPair.close`.
    """
    master, slave = os.openpty()
    tty.setraw(slave)
    return PtyPair(master, slave, os.ttyname(slave))


class FdLink:
    """A :class:`Link` over a file descriptor (the pty master).

    Writes give up after ``write_timeout_s`` when nobody drains the other end (the bridge has
    not opened the port yet, and the pty buffer of a few KiB is full): the bytes are lost, as
    on a real line with no listener, instead of blocking the device for ever.
    """

    def __init__(self, fd: int, write_timeout_s: float = 1.0) -> None:
        self.fd = fd
        self.write_timeout_s = write_timeout_s
        os.set_blocking(fd, False)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + self.write_timeout_s
        while view:
            left = deadline - time.monotonic()
            _, ready, _ = select.select([], [self.fd], [], max(left, 0.0))
            if not ready:
                return
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:
                continue

    def read(self, timeout_s: float) -> bytes:
        ready, _, _ = select.select([self.fd], [], [], max(timeout_s, 0.0))
        if not ready:
            return b""
        try:
            return os.read(self.fd, 65536)
        except BlockingIOError:
            return b""


class SerialLink:
    """A :class:`Link` over a real serial port (pyserial)."""

    def __init__(self, device: str, baudrate: int) -> None:
        try:
            import serial
        except ImportError:
            raise Unavailable("--port needs pyserial: pip install 'osteofy-edge[bridge]'") from None
        self.port = serial.Serial(device, baudrate, timeout=0.05)

    def write(self, data: bytes) -> None:
        self.port.write(data)

    def read(self, timeout_s: float) -> bytes:
        self.port.timeout = max(timeout_s, 0.001)
        return bytes(self.port.read(max(1, self.port.in_waiting)))


@dataclass
class Faults:
    """Probabilities, per frame sent, of damaging the device's own traffic."""

    flip: float = 0.0  # XOR one byte with a random non-zero value
    drop: float = 0.0  # delete 1-8 bytes
    duplicate: float = 0.0  # send the frame twice
    garbage: float = 0.0  # send 1-32 random bytes before the frame
    lose_ack: float = 0.0  # ignore an ACK, as if the line had eaten it
    seed: int = 0
    injected: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def _hit(self, name: str, p: float) -> bool:
        if p > 0 and self.rng.random() < p:
            self.injected[name] = self.injected.get(name, 0) + 1
            return True
        return False

    def lose_this_ack(self) -> bool:
        return self._hit("lose_ack", self.lose_ack)

    def damage(self, wire: bytes) -> list[bytes]:
        """What actually goes on the line for one encoded frame."""
        data = bytearray(wire)
        if self._hit("flip", self.flip):
            data[self.rng.randrange(len(data))] ^= self.rng.randrange(1, 256)
        if self._hit("drop", self.drop):
            at = self.rng.randrange(len(data))
            del data[at : at + self.rng.randint(1, 8)]
        out = [bytes(data)]
        if self._hit("garbage", self.garbage):
            out.insert(0, self.rng.randbytes(self.rng.randint(1, 32)))
        if self._hit("duplicate", self.duplicate):
            out.append(bytes(data))
        return out


class Digitizer:
    """The device side: HELLO once, then META, CHUNK..., END per image; stop-and-wait."""

    def __init__(
        self,
        link: Link,
        faults: Faults | None = None,
        ack_timeout_s: float = 0.5,
        max_retries: int = 30,
        chunk_size: int = 4096,
        device: dict[str, Any] | None = None,
    ) -> None:
        if not 1 <= chunk_size <= MAX_CHUNK:
            raise ValueError(f"chunk_size must be 1..{MAX_CHUNK}")
        self.link = link
        self.faults = faults or Faults()
        self.ack_timeout_s = ack_timeout_s
        self.max_retries = max_retries
        self.chunk_size = chunk_size
        self.device = device or {
            "vendor": "OSTEOFY",
            "model": "SIMULATED DIGITIZER",
            "serial": "SIM-0001",
            "firmware": "sim 1",
        }
        self.decoder = FrameDecoder()
        self.seq = 0
        self.retransmissions = 0
        self.naks = 0

    def _next_seq(self) -> int:
        self.seq = (self.seq + 1) & 0xFFFF
        return self.seq

    def _send(self, frame: Frame) -> None:
        for piece in self.faults.damage(encode_frame(frame)):
            self.link.write(piece)

    def _await_reply(self, seq: int, timeout_s: float) -> Frame | None:
        """The ACK or NAK for ``seq``, or None on timeout; other frames are ignored."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            self.decoder.feed(self.link.read(min(left, 0.05)))
            while True:
                try:
                    frame = self.decoder.next_frame()
                except FramingError:
                    continue
                if frame is None:
                    break
                if frame.seq != seq or frame.type not in (FrameType.ACK, FrameType.NAK):
                    continue  # a late answer to an earlier frame
                if frame.type == FrameType.ACK and self.faults.lose_this_ack():
                    continue
                return frame
        return None

    def exchange(self, ftype: FrameType, payload: bytes) -> NakReason | None:
        """Send one frame until it is answered: None when ACKed, else the NAK's reason.

        A CORRUPT NAK or silence resends the same frame (same sequence); a STORAGE NAK waits
        and resends; PROTOCOL and REJECTED are returned to the caller to restart the image.
        """
        frame = Frame(ftype, self._next_seq(), payload)
        for attempt in range(self.max_retries):
            if attempt:
                self.retransmissions += 1
            self._send(frame)
            reply = self._await_reply(frame.seq, self.ack_timeout_s)
            if reply is None:
                continue
            if reply.type == FrameType.ACK:
                return None
            self.naks += 1
            reason = parse_nak(reply.payload)
            if reason in (NakReason.PROTOCOL, NakReason.REJECTED):
                return reason
            if reason == NakReason.STORAGE:
                time.sleep(self.ack_timeout_s)
        raise DigitizerError(f"no acknowledgement of {ftype.name} after {self.max_retries} tries")

    def hello(self) -> None:
        if self.exchange(FrameType.HELLO, json.dumps(self.device).encode()) is not None:
            raise DigitizerError("the bridge refused HELLO")

    def send_image(self, pixels: np.ndarray, meta: dict[str, Any], attempts: int = 3) -> None:
        """One image, restarted from META (up to ``attempts`` times) when the bridge asks."""
        dtype = np.uint8 if int(meta["bits"]) <= 8 else np.dtype("<u2")
        data = np.ascontiguousarray(pixels, dtype=dtype).tobytes()
        header = json.dumps({**meta, "rows": pixels.shape[0], "cols": pixels.shape[1]}).encode()
        for _ in range(attempts):
            if self.exchange(FrameType.META, header) is not None:
                raise DigitizerError("the bridge refused the image metadata")
            if self._send_pixels(data):
                return
        raise DigitizerError(f"image not accepted after {attempts} attempts")

    def _send_pixels(self, data: bytes) -> bool:
        for offset in range(0, len(data), self.chunk_size):
            piece = data[offset : offset + self.chunk_size]
            if self.exchange(FrameType.CHUNK, chunk_payload(offset, piece)) is not None:
                return False
        return self.exchange(FrameType.END, end_payload(len(data), crc32(data))) is None


# --- images ------------------------------------------------------------------------------


def synthetic_image(
    rng: np.random.Generator, rows: int = 320, cols: int = 256, bits: int = 12
) -> np.ndarray:
    """A test pattern (gradient, discs, noise) that exercises every bit of the stored range."""
    y, x = np.mgrid[0:rows, 0:cols]
    top = (1 << bits) - 1
    img = (x + y) / (rows + cols) * 0.6 * top
    for _ in range(4):
        cy, cx, r = rng.integers(0, rows), rng.integers(0, cols), rng.integers(10, 60)
        img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] += 0.3 * top
    img += rng.normal(0, 0.01 * top, img.shape)
    return np.clip(img, 0, top).astype(np.uint16 if bits > 8 else np.uint8)


def image_from_dicom(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Pixels and META of a single-frame grey DICOM image (what a digitizer would send)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
    except Exception as exc:
        raise InputRejected(
            f"{path.name}: not a readable DICOM image ({type(exc).__name__})"
        ) from None
    if pixels.ndim != 2:
        raise InputRejected(f"{path.name}: only single-frame grey images can be sent")
    spacing = ds.get("ImagerPixelSpacing") or ds.get("PixelSpacing") or [0.1, 0.1]
    meta: dict[str, Any] = {
        "bits": int(ds.BitsStored),
        "pixel_spacing_mm": [float(spacing[0]), float(spacing[1])],
        "body_part": str(ds.get("BodyPartExamined", "")).upper() or "HAND",
        "photometric": str(ds.PhotometricInterpretation),
    }
    if ds.get("PatientSex") in ("M", "F", "O"):
        meta["patient_sex"] = str(ds.PatientSex)
    age = str(ds.get("PatientAge", ""))
    if len(age) == 4 and age.endswith("Y") and age[:3].isdigit():
        meta["patient_age_years"] = int(age[:3])
    for key, attr in (("patient_weight_kg", "PatientWeight"), ("patient_height_m", "PatientSize")):
        if ds.get(attr) not in (None, ""):
            meta[key] = float(ds.get(attr))
    return pixels, meta


# --- command line ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="osteofy bridge simulate-digitizer",
        description="Play a serial digitizer: send images to the bridge over a pty or a port.",
    )
    p.add_argument("files", nargs="*", type=Path, help="DICOM images to send (default: patterns)")
    p.add_argument("--port", help="a real serial device; default: create a pseudo-terminal")
    p.add_argument("--baudrate", type=int, default=921_600)
    p.add_argument("--count", type=int, default=3, help="test patterns to send without FILEs")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the bridge")
    p.add_argument("--chunk", type=int, default=4096, help="pixel bytes per CHUNK frame")
    p.add_argument("--ack-timeout", type=float, default=0.5)
    for name in ("flip", "drop", "duplicate", "garbage", "lose-ack"):
        p.add_argument(f"--{name}", type=float, default=0.0, help=f"probability of {name}")
    p.add_argument("--seed", type=int, default=0)
    return p


def run(args: argparse.Namespace) -> int:
    images = [image_from_dicom(f) for f in args.files]
    if not images:
        rng = np.random.default_rng(args.seed)
        meta = {
            "bits": 12,
            "pixel_spacing_mm": [0.15, 0.15],
            "body_part": "HAND",
            "photometric": "MONOCHROME2",
        }
        images = [(synthetic_image(rng), dict(meta)) for _ in range(args.count)]
    faults = Faults(args.flip, args.drop, args.duplicate, args.garbage, args.lose_ack, args.seed)
    pty = None
    if args.port:
        try:
            link: Link = SerialLink(args.port, args.baudrate)
        except OSError as exc:  # serial.SerialException included
            raise Unavailable(f"cannot open {args.port}: {exc}") from None
    else:
        pty = open_pty()
        link = FdLink(pty.master_fd)
        print(f"simulated digitizer on {pty.slave_name}: set bridge.serial to it", flush=True)
    try:
        dev = Digitizer(
            link,
            faults,
            ack_timeout_s=args.ack_timeout,
            chunk_size=args.chunk,
            max_retries=max(3, int(args.wait / args.ack_timeout)),
        )
        dev.hello()
        dev.max_retries = 30
        for i, (pixels, meta) in enumerate(images, 1):
            dev.send_image(pixels, meta)
            print(f"image {i}/{len(images)} acknowledged", flush=True)
    except DigitizerError as exc:
        raise Unavailable(f"simulated digitizer: {exc}") from None
    finally:
        if pty is not None:
            time.sleep(0.2)  # let the last ACKed bytes leave before the pty closes
            pty.close()
    print(
        f"sent {len(images)} image(s); {dev.retransmissions} retransmissions, "
        f"{dev.naks} NAKs, faults injected {faults.injected}",
        flush=True,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        return run(args)
    except OsteofyError as exc:
        print(f"osteofy: {exc}", file=sys.stderr)
        return exc.exit_code
    except ValueError as exc:
        print(f"osteofy: {exc}", file=sys.stderr)
        return UsageError.exit_code


if __name__ == "__main__":
    sys.exit(main())
