"""Tests for cohort.dicom_out: valid, faithful, reproducible DICOM for simulated radiographs.

Each case is written to a small (64x80) file and read back with pydicom (without force); the
`dcmtk`-marked tests also run dciodvfy (dicom3tools), which must report no errors.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_voi_lut
from pydicom.sr.codedict import codes
from pydicom.uid import JPEG2000, ExplicitVRLittleEndian, JPEG2000Lossless

from cohort.dicom_out import (
    CR_IMAGE_STORAGE,
    DX_IMAGE_STORAGE_FOR_PRESENTATION,
    RadiographMeta,
    write_radiograph,
)

ROWS, COLS = 64, 80
BODY_PARTS = ("HAND", "HIP", "PELVIS", "KNEE")

# (modality, photometric, windowing, bits_stored, compression): a representative subset of
# the full product, covering every value of each factor and every pairing that matters
# (CR-only "none" windowing, VOI LUT at 16 bits, every compression for both SOP classes).
REPRESENTATIVE = [
    ("CR", "MONOCHROME1", "none", 10, "none"),
    ("CR", "MONOCHROME1", "window", 12, "j2k_lossless"),
    ("CR", "MONOCHROME2", "voilut", 14, "none"),
    ("CR", "MONOCHROME2", "window", 16, "j2k_lossy"),
    ("CR", "MONOCHROME1", "voilut", 16, "j2k_lossless"),
    ("CR", "MONOCHROME2", "none", 12, "j2k_lossy"),
    ("DX", "MONOCHROME2", "window", 12, "none"),
    ("DX", "MONOCHROME1", "window", 10, "j2k_lossy"),
    ("DX", "MONOCHROME2", "voilut", 16, "none"),
    ("DX", "MONOCHROME1", "voilut", 14, "j2k_lossless"),
    ("DX", "MONOCHROME2", "window", 16, "j2k_lossless"),
    ("DX", "MONOCHROME1", "voilut", 12, "j2k_lossy"),
]
# One full pass over the bit depths, for both SOP classes.
BITS_PASS = [
    (modality, "MONOCHROME2", "window", bits, "none")
    for modality in ("CR", "DX")
    for bits in (10, 12, 14, 16)
]
CASES = REPRESENTATIVE + BITS_PASS


def _case_id(case: tuple[str, str, str, int, str]) -> str:
    modality, photometric, windowing, bits, compression = case
    return f"{modality}-{photometric[-1]}-{windowing}-{bits}b-{compression}"


def make_meta(**overrides: Any) -> RadiographMeta:
    """A plausible synthetic hand DX; tests override what they vary."""
    fields: dict[str, Any] = {
        "modality": "DX",
        "photometric": "MONOCHROME2",
        "bits_stored": 12,
        "pitch_mm": 0.143,
        "magnification": 1.05,
        "sid_mm": 1000.0,
        "kvp": 55.0,
        "exposure_uas": 2500.0,
        "exposure_index": 400.0,
        "target_exposure_index": 500.0,
        "grid": False,
        "detector": "DR",
        "body_part": "HAND",
        "laterality": "L",
        "view_position": "PA",
        "burned_in_annotation": True,
        "windowing": "window",
        "window": (2048.0, 3000.0),
        "patient_name": "SYNTHETIC^CASE-000123",
        "patient_id": "SYN-S42-000123",
        "age_years": 65,
        "sex": "F",
        "weight_kg": 68.3,
        "height_m": 1.634,
        "study_date": "20240115",
        "study_time": "093000",
        "uid_seed": "S42-000123",
        "institution": "SYNTHETIC CLINIC 07",
    }
    fields.update(overrides)
    return RadiographMeta(**fields)


def make_image(bits: int, seed: int = 0) -> np.ndarray:
    """A smooth ramp with a bright block and noise, spanning the full stored range."""
    rng = np.random.default_rng(seed)
    top = (1 << bits) - 1
    y, x = np.mgrid[0:ROWS, 0:COLS]
    base = (x / (COLS - 1) * 0.6 + y / (ROWS - 1) * 0.3) * top
    base[20:40, 30:50] += 0.1 * top
    noisy = base + rng.normal(0.0, 0.01 * top, size=base.shape)
    image = np.clip(np.rint(noisy), 0, top).astype(np.uint16)
    image[0, 0], image[-1, -1] = 0, top
    return image


def meta_for_case(case: tuple[str, str, str, int, str], index: int) -> RadiographMeta:
    modality, photometric, windowing, bits, compression = case
    body_part = BODY_PARTS[index % len(BODY_PARTS)]
    top = (1 << bits) - 1
    return make_meta(
        modality=modality,
        photometric=photometric,
        windowing=windowing,
        bits_stored=bits,
        compression=compression,
        body_part=body_part,
        view_position="PA" if body_part == "HAND" else "AP",
        detector="CR" if modality == "CR" else "DR",
        laterality="LR"[index % 2],
        grid=body_part != "HAND",
        burned_in_annotation=index % 3 != 0,
        window=(top / 2.0, top * 0.8),
        uid_seed=f"test-{index}",
    )


@pytest.fixture(params=list(enumerate(CASES)), ids=[_case_id(c) for c in CASES])
def written(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, np.ndarray, Any]:
    """Write one case and return (path, pixels, meta)."""
    index, case = request.param
    meta = meta_for_case(case, index)
    pixels = make_image(meta.bits_stored, seed=index)
    path = tmp_path / f"case{index}.dcm"
    write_radiograph(path, pixels, meta)
    return path, pixels, meta


def test_reads_back_with_correct_attributes(written: tuple[Path, np.ndarray, Any]) -> None:
    path, pixels, meta = written
    ds = pydicom.dcmread(path)  # no force: needs preamble, DICM prefix and file meta

    expected_class = (
        CR_IMAGE_STORAGE if meta.modality == "CR" else DX_IMAGE_STORAGE_FOR_PRESENTATION
    )
    assert ds.SOPClassUID == expected_class
    assert ds.file_meta.MediaStorageSOPClassUID == expected_class
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.Modality == meta.modality
    assert ds.PhotometricInterpretation == meta.photometric
    assert (ds.SamplesPerPixel, ds.BitsAllocated, ds.PixelRepresentation) == (1, 16, 0)
    assert (ds.BitsStored, ds.HighBit) == (meta.bits_stored, meta.bits_stored - 1)
    assert (ds.Rows, ds.Columns) == (ROWS, COLS)
    assert ds.SpecificCharacterSet == "ISO_IR 100"

    assert re.fullmatch(r"\d{3}Y", ds.PatientAge) and ds.PatientAge == "065Y"
    assert ds.PatientSex == "F"
    assert str(ds.PatientWeight) == "68.3" and str(ds.PatientSize) == "1.63"
    assert "not a real person" in ds.PatientComments
    assert ds.ImageComments == "SYNTHETIC IMAGE - virtual cohort, not for clinical use"
    assert ds.Manufacturer == "SYNTHETIC"
    assert ds.InstanceCreationDate == ds.StudyDate == meta.study_date

    assert [float(v) for v in ds.ImagerPixelSpacing] == pytest.approx([meta.pitch_mm] * 2)
    expected_spacing = meta.pitch_mm / meta.magnification
    assert [float(v) for v in ds.PixelSpacing] == pytest.approx([expected_spacing] * 2, rel=1e-5)
    assert float(ds.DistanceSourceToDetector) == pytest.approx(meta.sid_mm)
    assert float(ds.KVP) == pytest.approx(meta.kvp)
    assert int(ds.ExposureInuAs) == round(meta.exposure_uas)
    deviation = 10 * math.log10(meta.exposure_index / meta.target_exposure_index)
    assert float(ds.DeviationIndex) == pytest.approx(deviation, abs=0.005)
    assert ds.BurnedInAnnotation == ("YES" if meta.burned_in_annotation else "NO")
    assert ds.BodyPartExamined == meta.body_part
    assert ds.ViewPosition == meta.view_position
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept), ds.RescaleType) == (1, 0, "US")

    if meta.modality == "DX":
        assert ds.PresentationIntentType == "FOR PRESENTATION"
        assert ds.PixelIntensityRelationship == "LOG"
        sign = 1 if meta.photometric == "MONOCHROME1" else -1
        assert ds.PixelIntensityRelationshipSign == sign
        shape = "INVERSE" if meta.photometric == "MONOCHROME1" else "IDENTITY"
        assert ds.PresentationLUTShape == shape
        assert ds.DetectorType == "SCINTILLATOR"
        assert ds.Grid == ("FOCUSED" if meta.grid else "NONE")
        assert float(ds.EstimatedRadiographicMagnificationFactor) == pytest.approx(1.05)
        assert ds.ImageLaterality == (meta.laterality if meta.body_part != "PELVIS" else "U")
        assert len(ds.AcquisitionContextSequence) == 0
        (region,) = ds.AnatomicRegionSequence
        reference = getattr(codes.SCT, meta.body_part.title())  # PS3.16 tables in pydicom
        assert (region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning) == (
            reference.value,
            "SCT",
            reference.meaning,
        )
        (view,) = ds.ViewCodeSequence
        view_ref = (
            codes.SCT.PosteroAnterior if meta.view_position == "PA" else codes.SCT.AnteroPosterior
        )
        assert (view.CodeValue, view.CodeMeaning) == (view_ref.value, view_ref.meaning)
    else:
        assert "PresentationIntentType" not in ds
        assert ds.PlateType == "STORAGE"
        assert ds.CollimatorGridName == ("GRID" if meta.grid else "NONE")
        if meta.body_part == "PELVIS":
            assert "Laterality" not in ds
        else:
            assert ds.Laterality == meta.laterality

    syntax = {
        "none": ExplicitVRLittleEndian,
        "j2k_lossless": JPEG2000Lossless,
        "j2k_lossy": JPEG2000,
    }[meta.compression]
    assert ds.file_meta.TransferSyntaxUID == syntax

    decoded = ds.pixel_array
    assert decoded.shape == pixels.shape and decoded.dtype == np.uint16
    if meta.compression == "j2k_lossy":
        assert ds.LossyImageCompression == "01"
        assert ds.LossyImageCompressionMethod == "ISO_15444_1"
        assert float(ds.LossyImageCompressionRatio) > 1.0
        assert ds.ImageType[0] == "DERIVED"
        assert int(decoded.max()) < 1 << meta.bits_stored
        error = np.abs(decoded.astype(np.int64) - pixels.astype(np.int64)).mean()
        assert error < 0.05 * ((1 << meta.bits_stored) - 1)
    else:
        assert ds.LossyImageCompression == "00"
        assert "LossyImageCompressionRatio" not in ds
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY"]
        np.testing.assert_array_equal(decoded, pixels)


def test_voi_attributes(written: tuple[Path, np.ndarray, Any]) -> None:
    path, pixels, meta = written
    ds = pydicom.dcmread(path)
    if meta.windowing == "window":
        assert float(ds.WindowCenter) == pytest.approx(meta.window[0], rel=1e-5)
        assert float(ds.WindowWidth) == pytest.approx(meta.window[1], rel=1e-5)
        assert "VOILUTSequence" not in ds
    elif meta.windowing == "voilut":
        assert "WindowCenter" not in ds
        (item,) = ds.VOILUTSequence
        n_entries = 1 << meta.bits_stored
        assert list(item.LUTDescriptor) == [n_entries % 65536, 0, 16]
        assert item["LUTData"].VR == "OW"
        lut = np.frombuffer(item.LUTData, dtype="<u2")
        assert lut.size == n_entries
        # The SIGMOID VOI function of PS3.3 C.11.2.1.3.1, sampled at every stored value.
        center, width = meta.window
        x = np.arange(n_entries, dtype=np.float64)
        expected = 65535.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
        np.testing.assert_allclose(lut, expected, atol=0.51)
        assert np.all(np.diff(lut.astype(np.int64)) >= 0)
        shown = apply_voi_lut(ds.pixel_array, ds)
        assert shown.shape == pixels.shape
    else:
        assert "WindowCenter" not in ds and "VOILUTSequence" not in ds


dciodvfy = shutil.which("dciodvfy")


@pytest.mark.dcmtk
@pytest.mark.skipif(
    dciodvfy is None, reason="dciodvfy (Debian package dicom3tools) is not installed"
)
def test_dciodvfy_reports_no_errors(written: tuple[Path, np.ndarray, Any]) -> None:
    path, _, _ = written
    assert dciodvfy is not None
    result = subprocess.run(
        [dciodvfy, str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    report = result.stdout + result.stderr
    errors = [line for line in report.splitlines() if "Error" in line]
    assert not errors, report


@pytest.mark.parametrize("compression", ["none", "j2k_lossless", "j2k_lossy"])
def test_same_inputs_give_identical_bytes(tmp_path: Path, compression: str) -> None:
    meta = make_meta(compression=compression, windowing="voilut")
    pixels = make_image(12, seed=7)
    first, second = tmp_path / "a.dcm", tmp_path / "b.dcm"
    write_radiograph(first, pixels, meta)
    write_radiograph(second, pixels.copy(), meta)
    assert first.read_bytes() == second.read_bytes()


def test_uid_seed_drives_uids(tmp_path: Path) -> None:
    pixels = make_image(12)
    uids = []
    for seed in ("seed-a", "seed-b"):
        path = tmp_path / f"{seed}.dcm"
        write_radiograph(path, pixels, make_meta(uid_seed=seed))
        ds = pydicom.dcmread(path)
        uids.append(
            (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.FrameOfReferenceUID)
        )
    assert len(set(uids[0])) == 4  # the four roles get distinct UIDs
    assert not set(uids[0]) & set(uids[1])
    assert all(len(uid) <= 64 for uid in uids[0])


def test_overwrites_atomically_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "image.dcm"
    path.write_bytes(b"stale")
    write_radiograph(path, make_image(12), make_meta())
    assert pydicom.dcmread(path).Modality == "DX"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.dcm"]


@pytest.mark.parametrize("compression", ["none", "j2k_lossless"])
def test_non_contiguous_views_are_written_as_seen(tmp_path: Path, compression: str) -> None:
    pixels = make_image(12)[::-1, ::-1]  # a flipped view, as a simulator's flip gives
    path = tmp_path / "view.dcm"
    write_radiograph(path, pixels, make_meta(compression=compression))
    np.testing.assert_array_equal(pydicom.dcmread(path).pixel_array, pixels)


def test_orientation_override(tmp_path: Path) -> None:
    path = tmp_path / "flipped.dcm"
    write_radiograph(path, make_image(12), make_meta(patient_orientation=("R", "H")))
    assert list(pydicom.dcmread(path).PatientOrientation) == ["R", "H"]


@pytest.mark.parametrize(
    ("pixels", "overrides", "message"),
    [
        (make_image(12), {"windowing": "none"}, "only allowed for CR"),
        (make_image(12) | np.uint16(0x1000), {"bits_stored": 12}, "does not fit bits_stored"),
        (np.full((ROWS, COLS), 1024, dtype=np.uint16), {"bits_stored": 10}, "bits_stored=10"),
        (make_image(12).astype(np.int32), {}, "uint16"),
        (make_image(12).astype(np.float32), {}, "uint16"),
        (make_image(8).astype(np.uint8), {}, "uint16"),
        (np.zeros((2, ROWS, COLS), dtype=np.uint16), {}, "2-D"),
        (make_image(12), {"bits_stored": 8}, "bits_stored"),
        (make_image(12), {"modality": "MG"}, "modality"),
        (make_image(12), {"photometric": "RGB"}, "photometric"),
        (make_image(12), {"windowing": "window", "window": None}, "window=(center, width)"),
        (make_image(12), {"compression": "jpeg"}, "compression"),
        (make_image(12), {"laterality": "B"}, "laterality"),
        (make_image(12), {"body_part": "CHEST"}, "body_part"),
        (make_image(12), {"study_date": "2024-01-15"}, "study_date"),
        (make_image(12), {"magnification": 0.0}, "magnification"),
        (make_image(12), {"patient_id": "SYN\\1"}, "patient_id"),
        (make_image(12), {"institution": "X" * 65}, "institution"),
    ],
    ids=[
        "dx-without-voi",
        "value-above-bits",
        "value-equals-2**bits",
        "int32",
        "float32",
        "uint8",
        "3-d",
        "bits-8",
        "modality",
        "photometric",
        "window-missing",
        "compression",
        "laterality",
        "body-part",
        "date-format",
        "magnification",
        "backslash-in-id",
        "institution-too-long",
    ],
)
def test_invalid_inputs_raise_value_error(
    tmp_path: Path, pixels: np.ndarray, overrides: dict[str, Any], message: str
) -> None:
    path = tmp_path / "never.dcm"
    with pytest.raises(ValueError, match=re.escape(message)):
        write_radiograph(path, pixels, make_meta(**overrides))
    assert not any(tmp_path.iterdir())  # validation happens before any file is touched


def test_cr_allows_no_windowing(tmp_path: Path) -> None:
    meta = dataclasses.replace(make_meta(), modality="CR", windowing="none", window=None)
    path = tmp_path / "cr.dcm"
    write_radiograph(path, make_image(12), meta)
    ds = pydicom.dcmread(path)
    assert "WindowCenter" not in ds and "VOILUTSequence" not in ds
