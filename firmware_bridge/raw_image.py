"""Raw frames + acquisition metadata from a serial digitizer -> a DX For Presentation object.

The serial digitizer sends pixels and a small JSON description (META), not DICOM; the bridge
makes the DICOM object so that the pipeline sees one kind of input whatever the road. The
metadata is input from a device we do not control, so it is validated by a strict model
(unknown keys refused, every value bounded) before any pixel is accepted.

``cohort.dicom_out.write_radiograph`` is not reused: it brands every file as synthetic
("SYNTHETIC" manufacturer, "not a real person") and derives UIDs from a seed, both right for
the virtual cohort and wrong for a patient's radiograph. What is shared is the module list of
the DX For Presentation IOD, written here for a real acquisition: UIDs are generated fresh,
the equipment is the digitizer's own (from HELLO), and nothing claims more than we know.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from firmware_bridge.errors import ImageRejected

__all__ = [
    "DX_FOR_PRESENTATION",
    "AcquisitionMeta",
    "DeviceInfo",
    "build_dataset",
    "decode_pixels",
]

DX_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")

# Latin-1 printable text without the DICOM value separator (ISO_IR 100).
_LATIN1 = r"^[ -\[\]-~\xa0-\xff]+$"
_Text = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=_LATIN1)]
_Orientation = Annotated[str, StringConstraints(min_length=1, max_length=3, pattern=r"^[LRAPHF]+$")]
_Code = Annotated[str, StringConstraints(min_length=1, max_length=16, pattern=r"^[A-Z0-9_ ]+$")]

# PS3.16 CID 4031 codes for the body parts this device screens (as in cohort.dicom_out).
_ANATOMY: dict[str, tuple[str, str]] = {
    "HAND": ("85562004", "Hand"),
    "WRIST": ("74670003", "Wrist"),
    "HIP": ("29836001", "Hip"),
    "PELVIS": ("816092008", "Pelvis"),
    "KNEE": ("72696002", "Knee"),
}
# PS3.16 CID 4010 "DX View".
_VIEW: dict[str, tuple[str, str]] = {
    "PA": ("272479007", "postero-anterior"),
    "AP": ("399348003", "antero-posterior"),
}
# Patient Orientation (rows, columns) of the conventional display, used when the device does
# not send one: hands fingers up seen from the dorsum, hips/pelvis/knees facing the patient.
_DEFAULT_ORIENTATION: dict[str, tuple[str, str]] = {
    "HAND": ("L", "H"),
    "WRIST": ("L", "H"),
    "HIP": ("L", "F"),
    "PELVIS": ("L", "F"),
    "KNEE": ("L", "F"),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class DeviceInfo(_Strict):
    """HELLO: who is speaking. Becomes the General Equipment module."""

    protocol: Literal[1] = 1
    vendor: _Text = "UNKNOWN"
    model: _Text = "UNKNOWN"
    serial: _Text | None = None
    firmware: _Text | None = None


class AcquisitionMeta(_Strict):
    """META: what the next image is. Pixels follow as little-endian unsigned integers."""

    rows: int = Field(ge=16, le=65535)
    cols: int = Field(ge=16, le=65535)
    bits: int = Field(ge=8, le=16)  # Bits Stored; 8 -> 1 byte per pixel, else 2
    pixel_spacing_mm: tuple[float, float]  # (row spacing, column spacing) at the detector
    body_part: _Code
    photometric: Literal["MONOCHROME1", "MONOCHROME2"]
    laterality: Literal["L", "R", "U", "B"] | None = None
    view_position: _Code | None = None
    patient_orientation: tuple[_Orientation, _Orientation] | None = None  # e.g. ("L", "H")
    window: tuple[float, float] | None = None  # (center, width); else the pixel range
    acquired_at: datetime | None = None  # the device's clock; else the bridge's
    patient_id: _Text | None = None
    patient_name: _Text | None = None
    patient_age_years: int | None = Field(None, ge=0, le=150)
    patient_sex: Literal["M", "F", "O"] | None = None
    patient_weight_kg: float | None = Field(None, gt=0, le=500)
    patient_height_m: float | None = Field(None, gt=0, le=3)

    @field_validator("pixel_spacing_mm")
    @classmethod
    def _spacing(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(math.isfinite(x) and 0.01 <= x <= 5.0 for x in v):
            raise ValueError("pixel spacing must be 0.01-5 mm")
        return v

    @field_validator("window")
    @classmethod
    def _window(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not (all(math.isfinite(x) for x in v) and v[1] >= 1):
            raise ValueError("window must be finite with width >= 1")
        return v

    @property
    def bytes_per_pixel(self) -> int:
        return 1 if self.bits <= 8 else 2

    @property
    def image_bytes(self) -> int:
        return self.rows * self.cols * self.bytes_per_pixel


def decode_pixels(data: bytes | bytearray, meta: AcquisitionMeta) -> np.ndarray:
    """The pixel array of an image's bytes; ImageRejected when they cannot be that image."""
    if len(data) != meta.image_bytes:
        raise ImageRejected(f"image has {len(data)} bytes, META says {meta.image_bytes}")
    dtype = np.uint8 if meta.bytes_per_pixel == 1 else np.dtype("<u2")
    pixels = np.frombuffer(bytes(data), dtype=dtype).reshape(meta.rows, meta.cols)
    top = int(pixels.max()) if pixels.size else 0
    if top >= 1 << meta.bits:
        raise ImageRejected(f"a pixel value does not fit the {meta.bits} bits META declares")
    return pixels


def _ds(value: float) -> str:
    return f"{value:.6g}"


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "SCT", meaning
    return item


def build_dataset(
    pixels: np.ndarray, meta: AcquisitionMeta, device: DeviceInfo, now: datetime | None = None
) -> Dataset:
    """A complete DX Image Storage - For Presentation data set with fresh UIDs."""
    when = meta.acquired_at or now or datetime.now().astimezone()
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    sop_instance = generate_uid()
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = sop_instance
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.InstanceNumber = "1"
    # Patient: only what the device told us; type 2 attributes stay empty otherwise.
    ds.PatientName = meta.patient_name or ""
    ds.PatientID = meta.patient_id or ""
    ds.PatientBirthDate = ""
    ds.PatientSex = meta.patient_sex or ""
    if meta.patient_age_years is not None:
        ds.PatientAge = f"{meta.patient_age_years:03d}Y"
    if meta.patient_weight_kg is not None:
        ds.PatientWeight = _ds(meta.patient_weight_kg)
    if meta.patient_height_m is not None:
        ds.PatientSize = _ds(meta.patient_height_m)
    # General Study, DX Series, Frame of Reference
    ds.StudyInstanceUID = generate_uid()
    ds.StudyDate, ds.StudyTime = date, time
    ds.ReferringPhysicianName = ""
    ds.StudyID = ""
    ds.AccessionNumber = ""
    ds.Modality = "DX"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = "1"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BodyPartExamined = meta.body_part
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    # General Equipment: the digitizer, as it introduced itself
    ds.Manufacturer = device.vendor
    ds.ManufacturerModelName = device.model
    if device.serial:
        ds.DeviceSerialNumber = device.serial
    if device.firmware:
        ds.SoftwareVersions = device.firmware
    # General Image, Acquisition
    ds.ContentDate, ds.ContentTime = date, time
    ds.AcquisitionDate, ds.AcquisitionTime = date, time
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    orientation = meta.patient_orientation or _DEFAULT_ORIENTATION.get(meta.body_part)
    ds.PatientOrientation = list(orientation) if orientation else ""
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    # Image Pixel, DX Image
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = meta.photometric
    ds.Rows, ds.Columns = meta.rows, meta.cols
    ds.BitsAllocated = 8 * meta.bytes_per_pixel
    ds.BitsStored = meta.bits
    ds.HighBit = meta.bits - 1
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1 if meta.photometric == "MONOCHROME1" else -1
    ds.PresentationLUTShape = "INVERSE" if meta.photometric == "MONOCHROME1" else "IDENTITY"
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
    ds.CalibrationImage = "NO"
    if meta.window is not None:
        center, width = meta.window
    else:
        lo, hi = (int(pixels.min()), int(pixels.max())) if pixels.size else (0, 0)
        center, width = (lo + hi) / 2.0, float(max(hi - lo + 1, 1))
    ds.WindowCenter, ds.WindowWidth = _ds(center), _ds(width)
    ds.VOILUTFunction = "LINEAR"
    # DX Detector, DX Anatomy Imaged, DX Positioning
    ds.DetectorType = ""
    ds.ImagerPixelSpacing = [_ds(x) for x in meta.pixel_spacing_mm]
    ds.ImageLaterality = meta.laterality or "U"
    if meta.body_part in _ANATOMY:
        ds.AnatomicRegionSequence = Sequence([_code(*_ANATOMY[meta.body_part])])
    ds.PositionerType = ""
    if meta.view_position:
        ds.ViewPosition = meta.view_position
        if meta.view_position in _VIEW:
            ds.ViewCodeSequence = Sequence([_code(*_VIEW[meta.view_position])])
    ds.AcquisitionContextSequence = Sequence()
    # Pixel Data
    ds.PixelData = np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder("<")).tobytes()
    ds["PixelData"].VR = "OB" if meta.bytes_per_pixel == 1 else "OW"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds
