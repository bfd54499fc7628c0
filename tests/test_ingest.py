"""Tests for edge.ingest and edge.quarantine: the variety devices send, and hostile input.

Accepted files span the header variety of CR and DX devices (MONOCHROME1/2, 10-16 bits, window,
VOI LUT or none, uncompressed, JPEG 2000, JPEG lossless and JPEG-LS, odd sizes). Rejected files
check the failing rule's name and a phrase of its reason. Every reason must be one line and
free of the patient's data, which carries the marker ``ZZSECRET`` here. Images are small
synthetic arrays written by cohort.dicom_out, then edited with pydicom or by hand (bytes) to
make what a writer would refuse to. The ``dcmtk`` tests make JPEG files with dcmcjpeg and
dcmcjpls and are skipped without them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import tracemalloc
import warnings
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import config as dicom_config
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import MPEG2MPML, UID, ImplicitVRLittleEndian, SecondaryCaptureImageStorage

from cohort.dicom_out import RadiographMeta, write_radiograph
from edge.clinical import complete_facts
from edge.facts import (
    dicom_age_years,
    facts_from_dicom,
    merge_facts,
    parse_facts_json,
    sidecar_path,
)
from edge.ingest import (
    IngestRejected,
    check_header,
    failed_rule,
    inspect_header,
    load_study,
)
from edge.preprocess import PreprocessConfig, preprocess
from edge.quarantine import quarantine, reason_path
from osteofy.config import IngestConfig
from osteofy.errors import InputRejected

CFG = IngestConfig()
SITES = {"hand", "hip"}
SECRET = "ZZSECRET"  # in every patient name and ID: must never reach a reason, a log or a path
ROWS, COLS = 300, 280

BASE = RadiographMeta(
    modality="CR",
    photometric="MONOCHROME2",
    bits_stored=12,
    pitch_mm=0.1,
    magnification=1.1,
    sid_mm=1000.0,
    kvp=55.0,
    exposure_uas=2000.0,
    exposure_index=400.0,
    target_exposure_index=400.0,
    grid=False,
    detector="CR",
    body_part="HAND",
    laterality="L",
    view_position="PA",
    burned_in_annotation=False,
    windowing="none",
    window=None,
    patient_name=f"{SECRET}^NAME",
    patient_id=f"{SECRET}ID42",
    age_years=67,
    sex="F",
    weight_kg=58.5,
    height_m=1.61,
    study_date="20240301",
    study_time="101500",
    uid_seed="test-ingest",
    institution="TEST CLINIC",
)


def _pixels(rows: int, cols: int, bits: int) -> np.ndarray:
    """A bright blob on a ramp, everything below 2**bits: contrast for the robust window."""
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float64)
    blob = np.exp(-(((yy - rows / 2) / (rows / 4)) ** 2 + ((xx - cols / 2) / (cols / 4)) ** 2))
    top = (1 << bits) - 1
    return np.clip(0.1 * top + 0.8 * top * blob + 0.05 * top * xx / cols, 0, top).astype(np.uint16)


def _edit(path: Path, change: Callable[[Dataset], None]) -> None:
    """Rewrite a file after ``change``; pydicom's value validation off, as a bad writer's is."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = dicom_config.settings.writing_validation_mode
        dicom_config.settings.writing_validation_mode = dicom_config.IGNORE
        try:
            ds = pydicom.dcmread(path)
            change(ds)
            ds.save_as(path, enforce_file_format=True)
        finally:
            dicom_config.settings.writing_validation_mode = old


def _write(
    path: Path,
    rows: int = ROWS,
    cols: int = COLS,
    *,
    bits: int | None = None,
    edit: Callable[[Dataset], None] | None = None,
    **meta: object,
) -> tuple[Path, np.ndarray]:
    """A radiograph file; ``bits`` 11, 13 or 15 are written as 12/14/16 and relabelled."""
    m = dataclasses.replace(BASE, **meta)  # type: ignore[arg-type]
    stored = bits or m.bits_stored
    written = stored + stored % 2
    m = dataclasses.replace(m, bits_stored=written)
    if m.windowing != "none" and m.window is None:
        top = 1 << stored
        m = dataclasses.replace(m, window=(top * 0.5, top * 0.8))
    px = _pixels(rows, cols, stored)
    write_radiograph(path, px, m)

    def relabel(ds: Dataset) -> None:
        if stored != written:
            ds.BitsStored, ds.HighBit = stored, stored - 1
        if edit is not None:
            edit(ds)

    if stored != written or edit is not None:
        _edit(path, relabel)
    return path, px


def _rejected(path: Path, sites: set[str] = SITES, cfg: IngestConfig = CFG) -> IngestRejected:
    with pytest.raises(IngestRejected) as info:
        load_study(path, cfg, sites)
    reason = str(info.value)
    assert reason and "\n" not in reason and SECRET not in reason
    assert isinstance(info.value, InputRejected) and info.value.exit_code == 3
    return info.value


# --- accepted variety ------------------------------------------------------------------------

ACCEPTED = [
    # id, write kwargs, expected site
    ("cr-mono1-10bit-window", {"bits": 10, "photometric": "MONOCHROME1", "windowing": "window"},
     "hand"),
    ("cr-mono1-11bit-no-window", {"bits": 11, "photometric": "MONOCHROME1",
     "edit": lambda ds: setattr(ds, "BodyPartExamined", "WRIST")}, "hand"),
    ("cr-mono2-13bit-voilut", {"bits": 13, "windowing": "voilut", "body_part": "HIP"}, "hip"),
    ("dx-mono2-15bit-window", {"bits": 15, "modality": "DX", "detector": "DR",
     "windowing": "window", "body_part": "PELVIS"}, "hip"),
    ("dx-mono1-14bit-voilut-j2k-lossless", {"bits": 14, "modality": "DX", "detector": "DR",
     "photometric": "MONOCHROME1", "windowing": "voilut", "compression": "j2k_lossless"}, "hand"),
    ("cr-mono1-12bit-window-j2k-lossless", {"photometric": "MONOCHROME1", "windowing": "window",
     "compression": "j2k_lossless", "body_part": "PELVIS"}, "hip"),
    ("cr-mono2-16bit-j2k-lossy", {"bits": 16, "compression": "j2k_lossy", "body_part": "HIP"},
     "hip"),
    ("dx-mono1-10bit-voilut-j2k-lossy", {"bits": 10, "modality": "DX", "detector": "DR",
     "photometric": "MONOCHROME1", "windowing": "voilut", "compression": "j2k_lossy"}, "hand"),
    ("dx-odd-size-1023x777", {"rows": 1023, "cols": 777, "modality": "DX", "detector": "DR",
     "windowing": "window"}, "hand"),
    ("dx-coded-anatomy-only", {"modality": "DX", "detector": "DR", "windowing": "window",
     "body_part": "HIP", "edit": lambda ds: delattr(ds, "BodyPartExamined")}, "hip"),
    ("cr-body-part-lower-case", {"edit": lambda ds: setattr(ds, "BodyPartExamined", "Hand ")},
     "hand"),
    ("cr-implicit-vr-voilut", {"windowing": "voilut", "edit": lambda ds: setattr(
        ds.file_meta, "TransferSyntaxUID", UID(ImplicitVRLittleEndian))}, "hand"),
]  # fmt: skip


@pytest.mark.parametrize("kwargs,site", [c[1:] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_accepts_real_world_variety(tmp_path: Path, kwargs: dict, site: str) -> None:
    path, px = _write(tmp_path / "in.dcm", **kwargs)
    study = load_study(path, CFG, SITES)
    assert study.site == site
    assert study.raw.pixels.shape == px.shape
    if "lossy" not in kwargs.get("compression", ""):
        np.testing.assert_array_equal(study.raw.pixels, px)
    meta = dataclasses.replace(BASE, **{k: v for k, v in kwargs.items() if hasattr(BASE, k)})
    assert study.raw.photometric == meta.photometric
    assert (study.raw.window is not None) == (meta.windowing == "window")
    assert (study.raw.voi_lut is not None) == (meta.windowing == "voilut")
    assert study.header.burned_in_annotation == "NO"
    assert SECRET not in repr(study)  # identifiers stay out of repr, and so out of logs


def test_accepts_8_bit_image_with_odd_sized_padded_pixel_data(tmp_path: Path) -> None:
    rows, cols = 257, 259  # odd byte count: the writer pads Pixel Data to even length
    px8 = (_pixels(rows, cols, 8)).astype(np.uint8)

    def eight_bit(ds: Dataset) -> None:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = px8.tobytes()
        ds["PixelData"].VR = "OB"

    path, _ = _write(tmp_path / "in.dcm", rows, cols, edit=eight_bit)
    study = load_study(path, CFG, SITES)
    assert study.header.pixel is not None and study.header.pixel.length == rows * cols + 1
    np.testing.assert_array_equal(study.raw.pixels, px8)


def _pydicom_raw(path: Path):
    from edge.preprocess import raw_from_dataset

    return raw_from_dataset(pydicom.dcmread(path))


def _same_raw(a, b) -> None:
    assert a.pixels.dtype == b.pixels.dtype and a.pixels.shape == b.pixels.shape
    np.testing.assert_array_equal(a.pixels, b.pixels)
    assert (a.photometric, a.slope, a.intercept, a.window, a.voi_lut_bits) == (
        b.photometric,
        b.slope,
        b.intercept,
        b.window,
        b.voi_lut_bits,
    )
    assert (a.voi_lut is None) == (b.voi_lut is None)
    if a.voi_lut is not None and b.voi_lut is not None:
        assert a.voi_lut[0] == b.voi_lut[0]
        np.testing.assert_array_equal(a.voi_lut[1], b.voi_lut[1])


def _signed(ds: Dataset) -> None:
    px = ds.pixel_array.astype(np.int32) - 2048  # negative values, 12 of 16 bits used
    ds.PixelRepresentation = 1
    ds.PixelData = px.astype(np.int16).tobytes()


def _dirty_high_bits(ds: Dataset) -> None:
    px = ds.pixel_array | np.uint16(0xA000)  # bits above Bits Stored set, as some writers do
    ds.PixelData = px.astype(np.uint16).tobytes()


NATIVE_VARIANTS = [
    *[c for c in ACCEPTED if "compression" not in c[1]],
    ("signed-12-of-16", {"edit": _signed}, "hand"),
    ("unused-high-bits-set", {"edit": _dirty_high_bits}, "hand"),
]


@pytest.mark.parametrize(
    "kwargs", [c[1] for c in NATIVE_VARIANTS], ids=[c[0] for c in NATIVE_VARIANTS]
)
def test_uncompressed_pixels_read_directly_equal_pydicoms_decode(
    tmp_path: Path, kwargs: dict
) -> None:
    # Uncompressed files skip the second parse (edge.ingest._native_pass): everything
    # preprocessing sees must be exactly what pydicom's full read gives.
    path, _ = _write(tmp_path / "in.dcm", **kwargs)
    _same_raw(load_study(path, CFG, SITES).raw, _pydicom_raw(path))


def test_a_file_written_to_while_it_is_read_is_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import edge.ingest as ingest

    path, _ = _write(tmp_path / "in.dcm", windowing="window")
    header_pass = ingest._header_pass

    def then_written(fh, size, cfg):  # a writer still at work after the header was read
        out = header_pass(fh, size, cfg)
        with path.open("r+b") as f:
            f.seek(-2, os.SEEK_END)
            f.write(b"\x01\x02")
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        return out

    monkeypatch.setattr(ingest, "_header_pass", then_written)
    assert _rejected(path).rule == "pixel_data"
    assert "changed while it was being read" in str(_rejected(path))


def test_accepted_study_feeds_preprocessing_and_clinical_vector(tmp_path: Path) -> None:
    path, _ = _write(tmp_path / "in.dcm", windowing="window", photometric="MONOCHROME1")
    study = load_study(path, CFG, SITES)
    x, _geom = preprocess(study.raw, PreprocessConfig(size=64, work_side=128))
    assert x.shape == (1, 64, 64) and np.isfinite(x).all()
    assert study.facts["age_years"] == 67 and study.facts["sex_male"] == 0.0
    assert study.facts["weight_kg"] == 58.5 and study.facts["height_m"] == 1.61
    assert study.facts["smoking"] is None  # unknown stays unknown
    assert complete_facts(study.facts)["bmi"] == pytest.approx(58.5 / 1.61**2)
    assert study.header.patient_id == f"{SECRET}ID42" and study.header.study_uid


def _dcmtk(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} (dcmtk) is not installed")


@pytest.mark.dcmtk
@pytest.mark.parametrize(
    "tool,options,syntax,lossless",
    [
        ("dcmcjpeg", [], "1.2.840.10008.1.2.4.70", True),  # JPEG lossless SV1
        ("dcmcjpeg", ["+el"], "1.2.840.10008.1.2.4.57", True),  # JPEG lossless process 14
        ("dcmcjpls", [], "1.2.840.10008.1.2.4.80", True),  # JPEG-LS lossless
        ("dcmcjpls", ["+en"], "1.2.840.10008.1.2.4.81", False),  # JPEG-LS near-lossless
    ],
)
def test_accepts_dcmtk_jpeg_lossless(
    tmp_path: Path, tool: str, options: list[str], syntax: str, lossless: bool
) -> None:
    _dcmtk(tool)
    src, px = _write(tmp_path / "src.dcm", bits=14, photometric="MONOCHROME1", body_part="HIP")
    out = tmp_path / "jpeg.dcm"
    subprocess.run([tool, *options, str(src), str(out)], check=True, capture_output=True)
    study = load_study(out, CFG, SITES)
    assert study.header.transfer_syntax == syntax and study.site == "hip"
    if lossless:
        np.testing.assert_array_equal(study.raw.pixels, px)
    else:
        assert np.abs(study.raw.pixels.astype(int) - px).max() <= 2


def test_modality_and_body_parts_come_from_configuration(tmp_path: Path) -> None:
    path, _ = _write(tmp_path / "in.dcm", edit=lambda ds: setattr(ds, "Modality", "RG"))
    assert _rejected(path).rule == "modality"
    assert load_study(path, IngestConfig(modalities=["CR", "DX", "RG"]), SITES).site == "hand"
    path, _ = _write(tmp_path / "b.dcm", edit=lambda ds: setattr(ds, "BodyPartExamined", "MANO"))
    assert _rejected(path).rule == "body_part"
    cfg = IngestConfig(body_parts={"MANO": "hand"})
    assert load_study(path, cfg, SITES).site == "hand"


def test_rules_are_pure_functions_of_the_header(tmp_path: Path) -> None:
    path, _ = _write(tmp_path / "in.dcm")
    header = inspect_header(path, CFG)
    assert check_header(header, CFG, SITES) == (True, "")
    assert failed_rule(dataclasses.replace(header, modality="MR"), CFG)[0] == "modality"  # type: ignore[index]
    ok, reason = check_header(dataclasses.replace(header, rows=20000), CFG)
    assert not ok and "larger" in reason
    assert check_header(header, CFG, {"hip"})[0] is False


# --- rejections ------------------------------------------------------------------------------


def _set(**values: object) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        for key, value in values.items():
            setattr(ds, key, value)

    return change


def _sop(uid: str) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(uid)

    return change


def _rgb(ds: Dataset) -> None:
    ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.PlanarConfiguration = "RGB", 3, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = bytes(ds.Rows * ds.Columns * 3)
    del ds.WindowCenter, ds.WindowWidth


def _two_frames(ds: Dataset) -> None:
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2


def _syntax(uid: str) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = UID(uid)

    return change


REJECTED = [
    # id, write kwargs, sites, rule, phrase of the reason
    ("ct-modality", {"edit": _set(Modality="CT")}, SITES, "modality", "modality CT"),
    ("secondary-capture", {"edit": _sop(SecondaryCaptureImageStorage)}, SITES, "sop_class",
     "Secondary Capture"),
    ("dx-for-processing", {"edit": _sop("1.2.840.10008.5.1.4.1.1.1.1.1")}, SITES, "sop_class",
     "For Processing"),
    ("mpeg2-syntax", {"compression": "j2k_lossless", "edit": _syntax(MPEG2MPML)}, SITES,
     "transfer_syntax", "MPEG2"),
    ("chest", {"edit": _set(BodyPartExamined="CHEST")}, SITES, "body_part", "CHEST"),
    ("knee-not-mapped", {"body_part": "KNEE"}, SITES, "body_part", "KNEE"),
    ("body-part-missing", {"edit": lambda ds: delattr(ds, "BodyPartExamined")}, SITES,
     "body_part", "does not say"),
    ("body-part-hostile", {"edit": _set(BodyPartExamined=f"../{SECRET}")}, SITES, "body_part",
     "the body part is not"),
    ("no-hip-model", {"body_part": "HIP"}, {"hand"}, "site_available", "no model for the hip"),
    ("rgb", {"windowing": "window", "edit": _rgb}, SITES, "photometric", "colour"),
    ("multi-frame", {"edit": _two_frames}, SITES, "frames", "2 frames"),
    ("9-bit", {"edit": _set(BitsStored=9, HighBit=8)}, SITES, "bits", "9-bit"),
    ("12-bits-allocated", {"edit": _set(BitsAllocated=12)}, SITES, "bits", "not valid"),
    ("too-small", {"rows": 100, "cols": 120}, SITES, "dimensions", "too small"),
    ("claims-60000x60000", {"edit": _set(Rows=60000, Columns=60000)}, SITES, "dimensions",
     "60000 x 60000"),
    ("pixel-data-too-short", {"edit": _set(Rows=ROWS + 10)}, SITES, "pixel_data",
     "does not match"),
    ("j2k-size-differs", {"compression": "j2k_lossless", "edit": _set(Rows=ROWS - 10)}, SITES,
     "pixel_data", "compressed image size"),
]  # fmt: skip


@pytest.mark.parametrize(
    "kwargs,sites,rule,phrase", [c[1:] for c in REJECTED], ids=[c[0] for c in REJECTED]
)
def test_rejects_with_the_right_rule(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    kwargs: dict,
    sites: set[str],
    rule: str,
    phrase: str,
) -> None:
    path, _ = _write(tmp_path / "in.dcm", **kwargs)
    caplog.set_level(logging.DEBUG)
    caplog.clear()  # the writer's own complaints about the planted values do not count
    exc = _rejected(path, sites)
    assert exc.rule == rule
    assert phrase in str(exc)
    assert SECRET not in caplog.text


def _not_dicom(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / "in.dcm"
    valid, _ = _write(tmp_path / "valid.dcm")
    data = valid.read_bytes()
    payload = {
        "png": cv2.imencode(".png", np.zeros((8, 8), np.uint8))[1].tobytes(),
        "text": b"PatientName: ZZSECRET\nthis is a note, not an image\n" * 10,
        "empty": b"",
        "no-preamble": data[128:],
        "no-dicm": data[132:],
        "dicm-overwritten": data[:128] + b"XXXX" + data[132:],
    }[kind]
    path.write_bytes(payload)
    return path


@pytest.mark.parametrize(
    "kind,phrase",
    [
        ("png", "PNG"),
        ("text", "DICM"),
        ("empty", "too short"),
        ("no-preamble", "DICM"),
        ("no-dicm", "DICM"),
        ("dicm-overwritten", "DICM"),
    ],
)
def test_rejects_files_that_are_not_dicom(tmp_path: Path, kind: str, phrase: str) -> None:
    exc = _rejected(_not_dicom(tmp_path, kind))
    assert exc.rule == "dicom_file" and phrase in str(exc)


def test_rejects_a_folder_a_fifo_and_an_oversized_file(tmp_path: Path) -> None:
    (tmp_path / "folder.dcm").mkdir()
    assert "regular file" in str(_rejected(tmp_path / "folder.dcm"))
    os.mkfifo(tmp_path / "fifo.dcm")  # opening it for reading must not wait for a writer
    assert "regular file" in str(_rejected(tmp_path / "fifo.dcm"))
    path, _ = _write(tmp_path / "in.dcm")
    assert _rejected(path, cfg=IngestConfig(max_file_mb=0.05)).rule == "file_size"
    assert "could not be opened" in str(_rejected(tmp_path / "missing.dcm"))


@pytest.mark.parametrize("compression", ["none", "j2k_lossless"])
def test_rejects_truncated_files_at_every_stage(tmp_path: Path, compression: str) -> None:
    valid, _ = _write(tmp_path / "valid.dcm", compression=compression, windowing="voilut")
    data = valid.read_bytes()
    pixel = inspect_header(valid, CFG).pixel
    assert pixel is not None
    cuts = [0, 64, 131, 132, 200, 600, pixel.offset // 2, pixel.offset - 12, pixel.offset - 2]
    cuts += [pixel.offset + 10, (pixel.offset + len(data)) // 2, len(data) - 1]
    for cut in cuts:
        path = tmp_path / f"cut{cut}.dcm"
        path.write_bytes(data[:cut])
        _rejected(path)


def _peak_bytes(run: Callable[[], object]) -> int:
    tracemalloc.start()
    with contextlib.suppress(InputRejected):
        run()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_header_claiming_a_gigantic_image_is_rejected_without_allocating(tmp_path: Path) -> None:
    path, _ = _write(tmp_path / "in.dcm", edit=_set(Rows=60000, Columns=60000))
    assert _peak_bytes(lambda: load_study(path, CFG, SITES)) < 8 * 1024 * 1024


def _patch_length(data: bytes, element: bytes, length: int) -> bytes:
    """Rewrite the 4-byte length of the last explicit-VR element with this tag+VR header."""
    at = data.rindex(element) + 8
    return data[:at] + struct.pack("<I", length) + data[at + 4 :]


def test_pixel_data_claiming_4_gb_is_rejected_without_allocating(tmp_path: Path) -> None:
    valid, _ = _write(tmp_path / "valid.dcm")
    path = tmp_path / "in.dcm"
    path.write_bytes(_patch_length(valid.read_bytes(), b"\xe0\x7f\x10\x00OW\x00\x00", 0xFFFFFFFE))
    exc = _rejected(path)
    assert exc.rule == "pixel_data"
    assert _peak_bytes(lambda: load_study(path, CFG, SITES)) < 8 * 1024 * 1024


def test_header_element_claiming_4_gb_is_rejected_without_allocating(tmp_path: Path) -> None:
    valid, _ = _write(tmp_path / "valid.dcm", windowing="voilut")
    path = tmp_path / "in.dcm"
    path.write_bytes(_patch_length(valid.read_bytes(), b"\x28\x00\x10\x30SQ\x00\x00", 0xFFFFFFF0))
    _rejected(path)  # the sequence swallows the rest of the file: no image data is left
    assert _peak_bytes(lambda: load_study(path, CFG, SITES)) < 8 * 1024 * 1024


def test_nested_element_claiming_4_gb_is_bounded_by_its_sequence(tmp_path: Path) -> None:
    valid, _ = _write(tmp_path / "valid.dcm", windowing="voilut")  # LUT Data is OW
    path = tmp_path / "in.dcm"
    path.write_bytes(_patch_length(valid.read_bytes(), b"\x28\x00\x06\x30OW\x00\x00", 0xFFFFFFF0))
    # The sequence's own length bounds what is read: the LUT comes back whole, or the file is
    # refused; either way nothing near 4 GB is allocated.
    assert _peak_bytes(lambda: load_study(path, CFG, SITES)) < 8 * 1024 * 1024


def test_voi_lut_shorter_than_its_descriptor_is_rejected(tmp_path: Path) -> None:
    def short_lut(ds: Dataset) -> None:
        item = ds.VOILUTSequence[0]
        item.LUTData = item.LUTData[: len(item.LUTData) // 2]

    path, _ = _write(tmp_path / "in.dcm", windowing="voilut", edit=short_lut)
    exc = _rejected(path)
    assert exc.rule == "pixel_data" and "VOI LUT" in str(exc)


def test_corrupt_codestream_passes_header_rules_then_fails_decode(tmp_path: Path) -> None:
    valid, _ = _write(tmp_path / "valid.dcm", compression="j2k_lossless")
    data = bytearray(valid.read_bytes())
    soc = data.index(b"\xff\x4f\xff\x51")  # the codestream: SOC then SIZ
    data[soc + 100 : -40] = b"\xff" * (len(data) - 40 - soc - 100)  # markers everywhere
    path = tmp_path / "in.dcm"
    path.write_bytes(bytes(data))
    assert check_header(inspect_header(path, CFG), CFG, SITES) == (True, "")
    exc = _rejected(path)
    assert exc.rule == "pixel_data" and "could not be decoded" in str(exc)


# --- hostile bytes: a property ---------------------------------------------------------------


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[bytes, int]]:
    """Valid small files (uncompressed with a VOI LUT; JPEG 2000) and their header sizes."""
    out = tmp_path_factory.mktemp("seeds")
    found = {}
    for name, kw in {
        "native": {"rows": 256, "cols": 260, "bits": 10, "windowing": "voilut"},
        "j2k": {"rows": 256, "cols": 256, "compression": "j2k_lossless", "windowing": "window"},
    }.items():
        path, _ = _write(out / f"{name}.dcm", **kw)  # type: ignore[arg-type]
        pixel = inspect_header(path, CFG).pixel
        assert pixel is not None
        found[name] = (path.read_bytes(), pixel.offset + 64)
    return found


@settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_mutated_files_load_or_are_rejected_never_crash(
    tmp_path: Path, seeds: dict[str, tuple[bytes, int]], data: st.DataObject
) -> None:
    raw, header_end = seeds[data.draw(st.sampled_from(sorted(seeds)), label="seed")]
    buf = bytearray(raw)
    where = st.one_of(st.integers(0, header_end), st.integers(0, len(raw) - 1))
    edits = data.draw(
        st.lists(st.tuples(st.sampled_from("sid"), where, st.integers(0, 255)), max_size=8)
    )
    for op, pos, value in edits:
        pos = min(pos, len(buf) - 1)
        if op == "s":
            buf[pos] = value
        elif op == "i":
            buf.insert(pos, value)
        else:
            del buf[pos]
    if data.draw(st.booleans(), label="truncate"):
        del buf[data.draw(st.integers(0, len(buf)), label="cut") :]
    path = tmp_path / "mutant.dcm"
    path.write_bytes(bytes(buf))
    try:
        study = load_study(path, CFG, SITES)
    except InputRejected as exc:
        assert str(exc) and "\n" not in str(exc) and SECRET not in str(exc)
    else:
        assert study.raw.pixels.shape == (study.header.rows, study.header.cols)


# --- clinical facts --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,years",
    [("065Y", 65.0), ("006M", 0.5), ("010W", 70 / 365.25), ("030D", 30 / 365.25),
     ("65Y", 65.0), ("065", None), ("abcY", None), ("", None)],
)  # fmt: skip
def test_dicom_age_string_forms(text: str, years: float | None) -> None:
    got = dicom_age_years(text)
    assert got == pytest.approx(years) if years is not None else got is None


def _patient(**values: str) -> Dataset:
    """A data set as dcmread leaves it: raw, unconverted elements (values may be invalid)."""
    raw: dict[BaseTag, DataElement | RawDataElement] = {}
    for keyword, text in values.items():
        tag = Tag(keyword)
        value = text.encode("latin-1") + b" " * (len(text) % 2)
        raw[tag] = RawDataElement(tag, dictionary_VR(tag), len(value), value, 0, False, True)
    return Dataset(raw)


def test_facts_from_dicom_reads_what_is_there_and_invents_nothing() -> None:
    ds = _patient(PatientAge="070Y", PatientSex="M", PatientWeight="80.5", PatientSize="1.78")
    assert facts_from_dicom(ds) == {
        "age_years": 70.0, "sex_male": 1.0, "weight_kg": 80.5, "height_m": 1.78,
    }  # fmt: skip
    assert facts_from_dicom(Dataset()) == dict.fromkeys(facts_from_dicom(ds))
    notes: list[str] = []
    assert facts_from_dicom(_patient(PatientSex="O", PatientWeight="0"), notes)["sex_male"] is None
    assert notes == []  # "other" and a zero weight are simply unknown


@pytest.mark.parametrize(
    "values,name,note",
    [
        ({"PatientSize": "175"}, "height_m", "centimetres"),
        ({"PatientSize": "0.4"}, "height_m", "plausible"),
        ({"PatientWeight": "1000"}, "weight_kg", "plausible"),
        ({"PatientWeight": "heavy"}, "weight_kg", "not a number"),
        ({"PatientAge": "010Y"}, "age_years", "plausible"),
        ({"PatientAge": "old"}, "age_years", "065Y"),
        ({"PatientSex": "X"}, "sex_male", "M, F or O"),
    ],
)
def test_implausible_dicom_facts_become_missing_with_a_note(
    values: dict[str, str], name: str, note: str
) -> None:
    notes: list[str] = []
    assert facts_from_dicom(_patient(**values), notes)[name] is None
    assert len(notes) == 1 and note in notes[0]
    assert all(v not in notes[0] for v in values.values())  # the note never repeats the value


def test_explicit_facts_override_dicom_and_null_overrides_nothing() -> None:
    dicom = {"age_years": 70.0, "sex_male": 1.0, "weight_kg": 80.0, "height_m": 1.8}
    sidecar = {"weight_kg": 75, "smoking": True, "height_m": None, "sex": "F"}
    cli = {"weight_kg": 74.5, "prior_fracture": 0}
    facts = merge_facts(dicom, sidecar, cli)
    assert facts["weight_kg"] == 74.5 and facts["height_m"] == 1.8 and facts["sex_male"] == 0.0
    assert facts["smoking"] == 1.0 and facts["prior_fracture"] == 0.0 and facts["alcohol"] is None
    assert set(facts) == set(merge_facts({}))


@pytest.mark.parametrize(
    "sidecar,phrase",
    [
        ({"weight": 70}, "unknown clinical fact 'weight'"),
        ({"../ZZSECRET": 1}, "unknown clinical fact '?'"),
        ({"weight_kg": "70"}, "must be a number"),
        ({"weight_kg": True}, "must be a number"),
        ({"weight_kg": 400}, "outside the plausible"),
        ({"age_years": float("nan")}, "must be a number"),
        ({"smoking": 2}, "true/false or 1/0"),
        ({"sex": "ZZSECRET"}, "M, F or O"),
        ({"sex": "M", "sex_male": 0}, "disagree"),
        ([1, 2], "JSON object"),
    ],
)
def test_bad_explicit_facts_are_rejected_clearly(sidecar: object, phrase: str) -> None:
    with pytest.raises(IngestRejected) as info:
        merge_facts({}, sidecar)  # type: ignore[arg-type]
    assert info.value.rule == "clinical" and phrase in str(info.value)
    assert "400" not in str(info.value) and SECRET not in str(info.value)


def test_parse_facts_json() -> None:
    assert parse_facts_json('{"smoking": false}') == {"smoking": False}
    for bad in ("{", "[]", "nul"):
        with pytest.raises(IngestRejected, match="--clinical"):
            parse_facts_json(bad)


def test_sidecar_and_cli_facts_reach_the_study(tmp_path: Path) -> None:
    path, _ = _write(tmp_path / "in.dcm")
    assert sidecar_path(path).name == "in.dcm.json"
    sidecar_path(path).write_text(json.dumps({"weight_kg": 61.0, "glucocorticoids": True}))
    study = load_study(path, CFG, SITES, clinical={"weight_kg": 62.0, "alcohol": False})
    assert study.facts["weight_kg"] == 62.0 and study.facts["glucocorticoids"] == 1.0
    assert study.facts["alcohol"] == 0.0 and study.facts["age_years"] == 67.0
    sidecar_path(path).write_text("{not json")
    assert _rejected(path).rule == "clinical"


# --- quarantine ------------------------------------------------------------------------------

_NAME = re.compile(r"\d{8}T\d{12}Z-[0-9a-f]{16}")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_quarantine_moves_the_file_and_writes_its_reason(tmp_path: Path) -> None:
    inbox, qdir = tmp_path / "inbox", tmp_path / "var" / "quarantine"
    inbox.mkdir()
    src = inbox / "scan.dcm"
    src.write_bytes(b"not a radiograph")
    digest = _sha(src)
    dest = quarantine(src, "not a DICOM file (no DICM marker)", qdir, rule="dicom_file")
    assert not src.exists() and dest.parent == qdir and _NAME.fullmatch(dest.name)
    assert _sha(dest) == digest
    record = json.loads(reason_path(dest).read_text())
    assert record["reason"] == "not a DICOM file (no DICM marker)"
    assert record["rule"] == "dicom_file" and record["original_name"] == "scan.dcm"
    assert record["quarantined_at"].endswith("Z") and record["size_bytes"] == 16
    assert sorted(p.name for p in qdir.iterdir()) == [dest.name, reason_path(dest).name]


def test_rejected_study_is_quarantined_without_dicom_values_in_any_path(tmp_path: Path) -> None:
    inbox, qdir = tmp_path / "inbox", tmp_path / "quarantine"
    inbox.mkdir()

    def hostile(ds: Dataset) -> None:
        ds.PatientName = f"../../{SECRET}/name"
        ds.PatientID = f"../{SECRET}"
        ds.SOPInstanceUID = "1.2/../../evil"
        ds.StudyInstanceUID = "/etc/evil"
        ds.Modality = "CT"

    path, _ = _write(inbox / "0001.dcm", edit=hostile)
    digest = _sha(path)
    exc = _rejected(path)
    dest = quarantine(path, str(exc), qdir, rule=exc.rule)
    everything = [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")]
    assert sorted(everything) == sorted(
        ["inbox", "quarantine", f"quarantine/{dest.name}", f"quarantine/{dest.name}.reason.json"]
    )
    assert not any(SECRET in p or "evil" in p or ".." in p for p in everything)
    assert _sha(dest) == digest  # moved, not rewritten: nothing is lost
    record = reason_path(dest).read_text()
    assert SECRET not in record and "evil" not in record and '"rule": "modality"' in record


def test_quarantine_twice_with_the_same_name_keeps_both(tmp_path: Path) -> None:
    qdir = tmp_path / "q"
    made = []
    for i in range(3):
        folder = tmp_path / f"inbox{i}"
        folder.mkdir()
        (folder / "image.dcm").write_bytes(bytes([i]) * 10)
        made.append(quarantine(folder / "image.dcm", "reason", qdir))
    assert len(set(made)) == 3
    assert sorted(p.read_bytes()[0] for p in made) == [0, 1, 2]
    assert len(list(qdir.iterdir())) == 6


def test_quarantine_across_file_systems_copies_then_unlinks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "inbox.dcm"
    src.write_bytes(b"x" * 3000)
    real = os.replace

    def cross_device(a: object, b: object) -> None:
        if Path(str(a)) == src:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real(a, b)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", cross_device)
    dest = quarantine(src, "reason", tmp_path / "q")
    assert not src.exists() and dest.read_bytes() == b"x" * 3000
    assert not [p for p in dest.parent.iterdir() if p.name.endswith(".tmp")]


def test_quarantine_that_cannot_move_leaves_the_input_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "inbox.dcm"
    src.write_bytes(b"data")
    real = os.replace

    def denied(a: object, b: object) -> None:
        if Path(str(a)) == src:
            raise PermissionError(errno.EACCES, "Permission denied")
        real(a, b)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", denied)
    with pytest.raises(PermissionError):
        quarantine(src, "reason", tmp_path / "q")
    assert src.read_bytes() == b"data" and list((tmp_path / "q").iterdir()) == []
