"""firmware_bridge serial link: framing (property tests), the receiver's protocol state
machine, and the simulator talking to the receiver through a pseudo-terminal with faults."""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import select
import shutil
import struct
import subprocess
import termios
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware_bridge.errors import FramingError, InboxFull, PayloadCRCError
from firmware_bridge.framing import (
    HEADER_LEN,
    MAGIC,
    MAX_PAYLOAD,
    Frame,
    FrameDecoder,
    FrameType,
    NakReason,
    chunk_payload,
    crc32,
    decode_frame,
    encode_frame,
    end_payload,
    parse_nak,
)
from firmware_bridge.options import SerialOptions
from firmware_bridge.serial_link import SerialReceiver, SerialSession
from firmware_bridge.simulator import Digitizer, Faults, FdLink, open_pty, synthetic_image
from firmware_bridge.spool import Inbox

needs_pyserial = pytest.mark.skipif(
    importlib.util.find_spec("serial") is None, reason="the bridge extra (pyserial) is missing"
)
CANARY_NAME = "CANARY^PHIPATIENT"
CANARY_ID = "CANARY-PHI-4711"
META = {
    "bits": 12,
    "pixel_spacing_mm": [0.1, 0.1],
    "body_part": "HAND",
    "photometric": "MONOCHROME2",
    "laterality": "L",
    "view_position": "PA",
    "patient_id": CANARY_ID,
    "patient_name": CANARY_NAME,
    "patient_age_years": 67,
    "patient_sex": "F",
    "patient_weight_kg": 61.5,
    "patient_height_m": 1.58,
}

# --- framing -----------------------------------------------------------------------------

frame_types = st.sampled_from(list(FrameType))
frames = st.builds(Frame, frame_types, st.integers(0, 0xFFFF), st.binary(max_size=600))


@given(frames)
def test_encode_decode_round_trip(frame: Frame) -> None:
    wire = encode_frame(frame)
    assert len(wire) == HEADER_LEN + len(frame.payload) + 4
    assert decode_frame(wire) == frame
    decoder = FrameDecoder()
    decoder.feed(wire)
    assert decoder.next_frame() == frame
    assert decoder.next_frame() is None


@given(
    frames,
    st.lists(st.tuples(st.integers(0, 700), st.integers(0, 255)), max_size=4),
    st.integers(-20, 20),
    st.binary(max_size=200),
)
def test_decode_frame_of_damaged_or_arbitrary_bytes_raises_only_framing_errors(
    frame: Frame, edits: list[tuple[int, int]], cut: int, noise: bytes
) -> None:
    wire = bytearray(encode_frame(frame))
    for at, value in edits:
        wire[at % len(wire)] = value
    wire = wire[:cut] if cut < 0 else wire + noise[:cut]
    for data in (bytes(wire), noise, MAGIC + noise):
        with contextlib.suppress(FramingError):  # the only exception allowed
            assert isinstance(decode_frame(data), Frame)


def test_crc_is_the_standard_crc32() -> None:
    assert crc32(b"123456789") == 0xCBF43926  # the check value docs/serial-protocol.md gives


def test_a_crc_valid_header_with_a_huge_length_is_refused_without_waiting() -> None:
    head = struct.pack("<2sBBHI", MAGIC, 1, int(FrameType.CHUNK), 7, MAX_PAYLOAD + 1)
    wire = head + struct.pack("<I", crc32(head))
    decoder = FrameDecoder()
    decoder.feed(wire + encode_frame(Frame(FrameType.ACK, 8)))
    with pytest.raises(FramingError):
        decoder.next_frame()
    assert decoder.next_frame() == Frame(FrameType.ACK, 8)


def test_a_damaged_payload_names_its_sequence() -> None:
    wire = bytearray(encode_frame(Frame(FrameType.CHUNK, 4242, b"pixels" * 10)))
    wire[HEADER_LEN + 3] ^= 0xFF
    decoder = FrameDecoder()
    decoder.feed(bytes(wire))
    with pytest.raises(PayloadCRCError) as info:
        decoder.next_frame()
    assert info.value.seq == 4242 and info.value.frame_type == FrameType.CHUNK


damage = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("drop"), st.integers(0, 10_000), st.integers(1, 12)),
    st.tuples(st.just("noise"), st.binary(min_size=1, max_size=40)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(frames, min_size=1, max_size=12),
    st.lists(st.one_of(st.none(), damage), min_size=12, max_size=12),
    st.lists(st.integers(1, 300), min_size=1, max_size=30),
)
def test_decoder_resynchronises_after_random_corruption(
    sent: list[Frame], damages: list, splits: list[int]
) -> None:
    """Every frame not damaged is recovered, in order; nothing else; only FramingErrors."""
    wire = bytearray()
    expected = []
    for frame, how in zip(sent, damages, strict=False):
        raw = bytearray(encode_frame(frame))
        if how is None:
            expected.append(frame)
        elif how[0] == "noise":  # garbage between frames: the frame itself is intact
            wire += how[1]
            expected.append(frame)
        elif how[0] == "flip":
            raw[how[1] % len(raw)] ^= how[2]
        else:
            at = how[1] % len(raw)
            del raw[at : at + how[2]]
        wire += raw
    decoder = FrameDecoder()
    got: list[Frame] = []
    pos, i = 0, 0
    for _ in range(10_000):  # bounded: feed in uneven pieces, drain after each
        if pos >= len(wire):
            break
        n = splits[i % len(splits)]
        decoder.feed(bytes(wire[pos : pos + n]))
        pos, i = pos + n, i + 1
        got.extend(_drain(decoder, final=False))
    got.extend(_drain(decoder, final=True))  # the line went idle
    assert got == expected
    assert decoder.buffered == 0


def _drain(decoder: FrameDecoder, final: bool) -> list[Frame]:
    out = []
    for _ in range(100_000):
        try:
            frame = decoder.next_frame(final=final)
        except FramingError:
            continue
        if frame is None:
            return out
        out.append(frame)
    raise AssertionError("decoder did not settle")


# --- the receiver's protocol state machine -----------------------------------------------


@pytest.fixture()
def inbox(tmp_path: Path) -> Inbox:
    box = Inbox(tmp_path / "inbox", reserve_bytes=0)
    box.create()
    return box


class _Talk:
    """Drive a SerialSession frame by frame, as the device would."""

    def __init__(self, session: SerialSession) -> None:
        self.session = session
        self.seq = 0

    def send(self, ftype: FrameType, payload: bytes, seq: int | None = None) -> Frame:
        if seq is None:
            self.seq += 1
            seq = self.seq
        reply = self.session.handle(Frame(ftype, seq, payload))
        assert reply is not None and reply.seq == seq
        return reply

    def image(self, pixels: np.ndarray, meta: dict, chunk: int = 1000) -> Frame:
        meta = {**meta, "rows": pixels.shape[0], "cols": pixels.shape[1]}
        assert self.send(FrameType.META, json.dumps(meta).encode()).type == FrameType.ACK
        data = pixels.astype("<u2" if meta["bits"] > 8 else np.uint8).tobytes()
        for off in range(0, len(data), chunk):
            reply = self.send(FrameType.CHUNK, chunk_payload(off, data[off : off + chunk]))
            assert reply.type == FrameType.ACK
        return self.send(FrameType.END, end_payload(len(data), crc32(data)))


def _files(box: Inbox) -> list[Path]:
    return sorted(p for p in box.directory.iterdir() if not p.name.startswith("."))


def _pixels(rows: int = 40, cols: int = 30, bits: int = 12, seed: int = 0) -> np.ndarray:
    return synthetic_image(np.random.default_rng(seed), rows, cols, bits)


def test_session_turns_frames_into_a_dx_file(inbox: Inbox) -> None:
    talk = _Talk(SerialSession(inbox))
    assert talk.send(FrameType.HELLO, b'{"vendor": "ACME", "model": "DR-1"}').type == FrameType.ACK
    pixels = _pixels()
    assert talk.image(pixels, META).type == FrameType.ACK
    (path,) = _files(inbox)
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1"
    assert ds.Modality == "DX" and ds.PresentationIntentType == "FOR PRESENTATION"
    assert np.array_equal(ds.pixel_array, pixels)
    assert (ds.Manufacturer, ds.ManufacturerModelName) == ("ACME", "DR-1")
    assert (ds.PatientAge, ds.PatientSex, ds.BodyPartExamined) == ("067Y", "F", "HAND")
    assert ds.ImagerPixelSpacing == [0.1, 0.1] and ds.BitsStored == 12


def test_eight_bit_image_with_an_odd_pixel_count(inbox: Inbox) -> None:
    talk = _Talk(SerialSession(inbox))
    pixels = _pixels(17, 19, bits=8)
    assert talk.image(pixels, {**META, "bits": 8}).type == FrameType.ACK
    assert np.array_equal(pydicom.dcmread(_files(inbox)[0]).pixel_array, pixels)


def test_a_retransmitted_frame_is_acked_again_but_applied_once(inbox: Inbox) -> None:
    session = SerialSession(inbox)
    talk = _Talk(session)
    pixels = _pixels()
    meta = {**META, "rows": 40, "cols": 30}
    talk.send(FrameType.META, json.dumps(meta).encode())
    data = pixels.astype("<u2").tobytes()
    first = talk.send(FrameType.CHUNK, chunk_payload(0, data[:1000]))
    again = talk.send(FrameType.CHUNK, chunk_payload(0, data[:1000]), seq=talk.seq)
    assert first == again and session.duplicates == 1
    talk.send(FrameType.CHUNK, chunk_payload(1000, data[1000:]))
    assert talk.send(FrameType.END, end_payload(len(data), crc32(data))).type == FrameType.ACK


def test_a_resent_end_after_a_lost_ack_writes_no_second_file(inbox: Inbox) -> None:
    talk = _Talk(SerialSession(inbox))
    pixels = _pixels()
    first = talk.image(pixels, META)
    data = pixels.astype("<u2").tobytes()
    again = talk.send(FrameType.END, end_payload(len(data), crc32(data)), seq=talk.seq)
    assert first == again == Frame(FrameType.ACK, talk.seq)
    assert len(_files(inbox)) == 1


def test_chunk_without_meta_and_wrong_offset_are_protocol_naks(inbox: Inbox) -> None:
    talk = _Talk(SerialSession(inbox))
    reply = talk.send(FrameType.CHUNK, chunk_payload(0, b"\0\0"))
    assert reply.type == FrameType.NAK and parse_nak(reply.payload) == NakReason.PROTOCOL
    talk.send(FrameType.META, json.dumps({**META, "rows": 20, "cols": 20}).encode())
    reply = talk.send(FrameType.CHUNK, chunk_payload(10, b"\0\0"))
    assert parse_nak(reply.payload) == NakReason.PROTOCOL
    assert _files(inbox) == []


def test_an_end_that_does_not_match_the_pixels_is_rejected(inbox: Inbox) -> None:
    talk = _Talk(SerialSession(inbox))
    talk.send(FrameType.META, json.dumps({**META, "rows": 20, "cols": 20}).encode())
    data = bytes(800)
    talk.send(FrameType.CHUNK, chunk_payload(0, data))
    reply = talk.send(FrameType.END, end_payload(len(data), crc32(data) ^ 1))
    assert parse_nak(reply.payload) == NakReason.REJECTED
    assert _files(inbox) == []


def test_pixels_wider_than_the_declared_bits_are_rejected(inbox: Inbox) -> None:
    talk = _Talk(SerialSession(inbox))
    pixels = np.full((20, 20), 5000, np.uint16)  # > 12 bits
    assert parse_nak(talk.image(pixels, META).payload) == NakReason.REJECTED


@pytest.mark.parametrize(
    "change",
    [
        {"bogus_key": 1},
        {"rows": 10**6},
        {"body_part": "../../etc"},
        {"patient_id": "A\\B"},
        {"pixel_spacing_mm": [0, 0.1]},
        {"photometric": "RGB"},
    ],
)
def test_invalid_meta_is_rejected_and_logged_without_values(
    inbox: Inbox, caplog, change: dict
) -> None:
    caplog.set_level(logging.DEBUG, logger="firmware_bridge")
    talk = _Talk(SerialSession(inbox))
    meta = {**META, "rows": 20, "cols": 20, "patient_name": CANARY_NAME + "X", **change}
    reply = talk.send(FrameType.META, json.dumps(meta).encode())
    assert parse_nak(reply.payload) == NakReason.REJECTED
    assert "META fields invalid" in caplog.text
    assert "CANARY" not in caplog.text and "etc" not in caplog.text


def test_garbage_meta_is_rejected(inbox: Inbox) -> None:
    talk = _Talk(SerialSession(inbox))
    for payload in (b"\xff\xfe", b"[1, 2]", b"{" * 5000):
        assert parse_nak(talk.send(FrameType.META, payload).payload) == NakReason.REJECTED


def test_storage_failure_naks_end_and_the_resent_end_succeeds(inbox: Inbox, monkeypatch) -> None:
    session = SerialSession(inbox)
    talk = _Talk(session)
    pixels = _pixels()
    meta = {**META, "rows": 40, "cols": 30}
    talk.send(FrameType.META, json.dumps(meta).encode())
    data = pixels.astype("<u2").tobytes()
    talk.send(FrameType.CHUNK, chunk_payload(0, data))

    def full(size_hint: int) -> None:
        raise InboxFull("no space")

    monkeypatch.setattr(inbox, "check_space", full)
    end = end_payload(len(data), crc32(data))
    assert parse_nak(talk.send(FrameType.END, end).payload) == NakReason.STORAGE
    assert _files(inbox) == []
    monkeypatch.undo()
    assert talk.send(FrameType.END, end, seq=talk.seq).type == FrameType.ACK
    assert len(_files(inbox)) == 1


def test_a_corrupt_frame_is_naked_with_its_sequence(inbox: Inbox) -> None:
    reply = SerialSession(inbox).corrupt(PayloadCRCError("crc", int(FrameType.CHUNK), 99))
    assert reply == Frame(FrameType.NAK, 99, bytes([NakReason.CORRUPT]))


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools' dciodvfy missing")
@pytest.mark.dcmtk
def test_the_dx_object_passes_dciodvfy(inbox: Inbox) -> None:
    _Talk(SerialSession(inbox)).image(_pixels(64, 48), META)
    done = subprocess.run(
        ["dciodvfy", str(_files(inbox)[0])], capture_output=True, text=True, timeout=60
    )
    errors = [line for line in (done.stdout + done.stderr).splitlines() if "Error" in line]
    assert errors == []


# --- through a pseudo-terminal -----------------------------------------------------------


@needs_pyserial
def test_five_images_through_a_faulty_pty_arrive_intact(
    tmp_path: Path, inbox: Inbox, caplog
) -> None:
    """The acceptance test: corruption, drops, duplicates, garbage and lost ACKs on the line."""
    from edge.ingest import load_study
    from osteofy.config import IngestConfig

    caplog.set_level(logging.DEBUG, logger="firmware_bridge")
    pty = open_pty()
    rx = SerialReceiver(SerialOptions(device=pty.slave_name, idle_flush_s=0.2), inbox)
    rx.start()
    faults = Faults(flip=0.04, drop=0.04, duplicate=0.04, garbage=0.04, lose_ack=0.04, seed=11)
    device = Digitizer(FdLink(pty.master_fd), faults, ack_timeout_s=0.25, chunk_size=8192)
    rng = np.random.default_rng(5)
    images = [synthetic_image(rng, 320, 256, 12) for _ in range(5)]
    t0 = time.monotonic()
    try:
        device.hello()
        for pixels in images:
            device.send_image(pixels, META)
    finally:
        rx.stop()
        pty.close()
    elapsed = time.monotonic() - t0
    files = _files(inbox)
    assert len(files) == 5
    for path, pixels in zip(files, images, strict=True):
        ds = pydicom.dcmread(path)
        assert np.array_equal(ds.pixel_array, pixels)
        study = load_study(path, IngestConfig(), sites_available={"hand"})
        assert study.site == "hand" and study.facts["age_years"] == 67
    injected = faults.injected
    assert injected.get("flip", 0) + injected.get("drop", 0) > 0
    assert rx.session.naks > 0  # corrupt frames were NAKed ...
    assert device.retransmissions > 0  # ... and resent
    assert rx.decoder.discarded > 0  # the decoder skipped damaged bytes and resynchronised
    assert "CANARY" not in caplog.text
    assert elapsed < 60


class _FdPort:
    """The pyserial calls SerialReceiver makes, over a pty master fd (for --port tests)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @property
    def in_waiting(self) -> int:
        buf = fcntl.ioctl(self.fd, termios.FIONREAD, b"\0\0\0\0")
        return int(struct.unpack("i", buf)[0])

    def read(self, n: int) -> bytes:
        ready, _, _ = select.select([self.fd], [], [], 0.05)
        return os.read(self.fd, n) if ready else b""

    def write(self, data: bytes) -> None:
        os.write(self.fd, data)

    def close(self) -> None:
        pass


@needs_pyserial
def test_simulator_command_sends_files_over_a_serial_port(
    tmp_path: Path, inbox: Inbox, capsys
) -> None:
    """``simulate-digitizer --port DEV FILE...`` (pyserial on the device side)."""
    from firmware_bridge.simulator import main

    talk_box = Inbox(tmp_path / "made")
    talk_box.create()
    _Talk(SerialSession(talk_box)).image(_pixels(64, 48), META)
    (source,) = _files(talk_box)
    pty = open_pty()
    rx = SerialReceiver(
        SerialOptions(device="(pty master)"), inbox, opener=lambda o: _FdPort(pty.master_fd)
    )
    rx.start()
    try:
        code = main(
            [
                str(source),
                "--port",
                pty.slave_name,
                "--drop",
                "0.1",
                "--seed",
                "3",
                "--ack-timeout",
                "0.2",
                "--chunk",
                "512",
                "--wait",
                "10",
            ]
        )
    finally:
        rx.stop()
        pty.close()
    assert code == 0
    assert "image 1/1 acknowledged" in capsys.readouterr().out
    (got,) = _files(inbox)
    assert np.array_equal(pydicom.dcmread(got).pixel_array, pydicom.dcmread(source).pixel_array)


def test_simulator_without_a_bridge_gives_up_with_exit_code_4(capsys) -> None:
    from firmware_bridge.simulator import main

    assert main(["--count", "1", "--wait", "0.5", "--ack-timeout", "0.1"]) == 4
    captured = capsys.readouterr()
    assert "set bridge.serial to it" in captured.out
    assert "no acknowledgement of HELLO" in captured.err


def test_the_simulated_device_does_not_hang_when_nobody_reads() -> None:
    pty = open_pty()
    try:
        t0 = time.monotonic()
        FdLink(pty.master_fd, write_timeout_s=0.2).write(bytes(200_000))  # >> the pty buffer
        assert time.monotonic() - t0 < 2
    finally:
        pty.close()


@needs_pyserial
def test_simulator_reports_a_missing_port_with_exit_code_4(tmp_path: Path, capsys) -> None:
    from firmware_bridge.simulator import main

    assert main(["--port", str(tmp_path / "ttyUSB7"), "--count", "1"]) == 4
    assert "cannot open" in capsys.readouterr().err


@needs_pyserial
def test_a_missing_serial_device_is_retried_not_fatal(tmp_path: Path, inbox: Inbox, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="firmware_bridge")
    missing = str(tmp_path / "ttyUSB9")
    rx = SerialReceiver(SerialOptions(device=missing, reopen_s=0.05), inbox)
    rx.start()
    try:
        time.sleep(0.3)
        assert rx.healthy()
    finally:
        rx.stop()
    assert caplog.text.count("not available") == 1  # warned once, not every retry


@needs_pyserial
def test_receiver_thread_stops_promptly(inbox: Inbox) -> None:
    pty = open_pty()
    rx = SerialReceiver(SerialOptions(device=pty.slave_name), inbox)
    rx.start()
    t0 = time.monotonic()
    rx.stop()
    pty.close()
    assert time.monotonic() - t0 < 2 and not rx.healthy()
    assert threading.active_count() < 50
