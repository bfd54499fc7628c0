"""Write one simulated radiograph as a standard DICOM file (docs/cohort.md §3.9).

The cohort's images must travel the same road as real ones: PACS import, the device's DICOM
reader, `dciodvfy`. So every file is a complete CR Image Storage or DX Image Storage - For
Presentation object whose mandatory modules are all present, and which dciodvfy (dicom3tools)
reports without errors.

Two properties matter beyond validity:

* The patient and the image are unmistakably synthetic (names, comments, "SYNTHETIC"
  manufacturer), so that no file can be mistaken for a real person's radiograph.
* The output is a pure function of its inputs: UIDs come from ``RadiographMeta.uid_seed``,
  dates from the study date, never from the clock, so that regenerating a cohort gives
  byte-identical files and a cohort's checksum identifies it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import get_frame
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)

from osteofy.fsutil import atomic_write

__all__ = [
    "CR_IMAGE_STORAGE",
    "DX_IMAGE_STORAGE_FOR_PRESENTATION",
    "RadiographMeta",
    "write_radiograph",
]

CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
DX_IMAGE_STORAGE_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")

_SOP_CLASS = {"CR": CR_IMAGE_STORAGE, "DX": DX_IMAGE_STORAGE_FOR_PRESENTATION}
_TRANSFER_SYNTAX = {
    "none": ExplicitVRLittleEndian,
    "j2k_lossless": JPEG2000Lossless,
    "j2k_lossy": JPEG2000,
}

# PS3.16 CID 4031 "Common Anatomic Region" (which CID 4009 "DX Anatomy Imaged" includes).
# Pelvis is 816092008: the current table replaced the older SCT 12921003 for this concept.
_ANATOMY: dict[str, tuple[str, str]] = {
    "HAND": ("85562004", "Hand"),
    "HIP": ("29836001", "Hip"),
    "PELVIS": ("816092008", "Pelvis"),
    "KNEE": ("72696002", "Knee"),
}
# Paired structures carry L/R; the pelvis is one unpaired structure (Image Laterality "U").
_PAIRED = frozenset({"HAND", "HIP", "KNEE"})

# PS3.16 CID 4010 "DX View".
_VIEW: dict[str, tuple[str, str]] = {
    "PA": ("272479007", "postero-anterior"),
    "AP": ("399348003", "antero-posterior"),
}

# Patient Orientation (row direction, column direction) in the conventional display: hands
# fingers up seen from the dorsum, hips/pelvis/knees as if facing the patient. Both put the
# patient's left on the viewer's right; fingers up means the columns run towards the head.
_DEFAULT_ORIENTATION: dict[str, tuple[str, str]] = {
    "HAND": ("L", "H"),
    "HIP": ("L", "F"),
    "PELVIS": ("L", "F"),
    "KNEE": ("L", "F"),
}

_DETECTOR_TYPE = {"CR": "STORAGE", "DR": "SCINTILLATOR"}
_BITS_STORED = frozenset({10, 12, 14, 16})
_WINDOWING = frozenset({"window", "voilut", "none"})
_ORIENTATION_LETTERS = frozenset("LRAPHF")

_MANUFACTURER = "SYNTHETIC"
_MODEL_NAME = "Osteofy virtual cohort"
_SOFTWARE_VERSION = "cohort.dicom_out 1"
_PATIENT_COMMENT = "Synthetic patient from the Osteofy virtual cohort; not a real person"
_IMAGE_COMMENT = "SYNTHETIC IMAGE - virtual cohort, not for clinical use"
_LOSSY_METHOD = "ISO_15444_1"


@dataclass(frozen=True)
class RadiographMeta:
    """Everything about one simulated radiograph except its pixels.

    The fields mirror the nuisance factors of docs/cohort.md §3.8 that a real archive would record
    in the header, so a model trained on the cohort sees the same header variety (detector,
    pitch, photometric, windowing, compression) as in the field.
    """

    modality: str  # "CR" (CR Image Storage) or "DX" (DX Image Storage - For Presentation)
    photometric: str  # "MONOCHROME1" | "MONOCHROME2"
    bits_stored: int  # 10, 12, 14 or 16; always 16 bits allocated
    pitch_mm: float  # detector pitch -> ImagerPixelSpacing
    magnification: float  # EstimatedRadiographicMagnificationFactor; PixelSpacing = pitch/mag
    sid_mm: float  # DistanceSourceToDetector
    kvp: float
    exposure_uas: float  # ExposureInuAs (IS, rounded)
    exposure_index: float
    target_exposure_index: float  # DeviationIndex = 10*log10(EI/target)
    grid: bool  # DX Grid "FOCUSED" / "NONE"; CR Collimator/grid Name "GRID" / "NONE"
    detector: str  # "CR" -> STORAGE, "DR" -> SCINTILLATOR (DX Detector Type; CR Plate Type)
    body_part: str  # "HAND", "HIP", "PELVIS" or "KNEE"
    laterality: str  # "L" | "R"; the pelvis is unpaired, so there it is not written
    view_position: str  # "PA" | "AP"
    burned_in_annotation: bool
    windowing: str  # "window" | "voilut" | "none" (CR only)
    window: tuple[float, float] | None  # (center, width) for "window" and "voilut"
    patient_name: str
    patient_id: str
    age_years: int
    sex: str  # "M" | "F"
    weight_kg: float
    height_m: float
    study_date: str  # "YYYYMMDD"
    study_time: str  # "HHMMSS"
    uid_seed: str  # entropy for all UIDs: the same seed gives the same file
    institution: str
    compression: str = "none"  # "none" | "j2k_lossless" | "j2k_lossy"
    j2k_ratio: float = 20.0  # target compression ratio for "j2k_lossy"
    # (row, column) directions such as ("L", "F"); None takes the conventional display
    # orientation of the body part. Set it when the simulator flipped or rotated the image.
    patient_orientation: tuple[str, str] | None = None


def _validate(pixels: np.ndarray, meta: RadiographMeta) -> None:
    """Reject inputs that would give an invalid or misleading DICOM file, before any I/O."""
    if not isinstance(pixels, np.ndarray):
        raise ValueError(f"pixels must be a numpy array, got {type(pixels).__name__}")
    if pixels.ndim != 2:
        raise ValueError(f"pixels must be 2-D (rows, columns), got shape {pixels.shape}")
    if pixels.dtype != np.uint16:
        raise ValueError(f"pixels must be uint16 stored values, got dtype {pixels.dtype}")
    rows, cols = pixels.shape
    if not (1 <= rows <= 0xFFFF and 1 <= cols <= 0xFFFF):
        raise ValueError(f"image size {rows}x{cols} is outside 1..65535 rows/columns")

    def one_of(name: str, value: object, allowed: Collection[str]) -> None:
        if value not in allowed:
            raise ValueError(f"{name} must be one of {sorted(allowed)}, got {value!r}")

    one_of("modality", meta.modality, _SOP_CLASS)
    one_of("photometric", meta.photometric, frozenset({"MONOCHROME1", "MONOCHROME2"}))
    one_of("detector", meta.detector, _DETECTOR_TYPE)
    one_of("body_part", meta.body_part, _ANATOMY)
    one_of("laterality", meta.laterality, frozenset({"L", "R"}))
    one_of("view_position", meta.view_position, _VIEW)
    one_of("windowing", meta.windowing, _WINDOWING)
    one_of("sex", meta.sex, frozenset({"M", "F"}))
    one_of("compression", meta.compression, _TRANSFER_SYNTAX)
    if meta.bits_stored not in _BITS_STORED:
        raise ValueError(
            f"bits_stored must be one of {sorted(_BITS_STORED)}, got {meta.bits_stored}"
        )

    maximum = int(pixels.max())
    if maximum >= 1 << meta.bits_stored:
        raise ValueError(
            f"pixel value {maximum} does not fit bits_stored={meta.bits_stored} "
            f"(maximum {(1 << meta.bits_stored) - 1})"
        )

    if meta.windowing == "none" and meta.modality == "DX":
        # DX For Presentation needs a VOI transform: Window Center/Width or a VOI LUT (PS3.3
        # C.8.11.3), otherwise the display has no defined rendering.
        raise ValueError("windowing 'none' is only allowed for CR; DX For Presentation needs a VOI")
    if meta.windowing in ("window", "voilut"):
        if meta.window is None:
            raise ValueError(f"windowing {meta.windowing!r} needs window=(center, width)")
        center, width = meta.window
        if not (math.isfinite(center) and math.isfinite(width) and width >= 1.0):
            raise ValueError(f"window must be finite with width >= 1, got {meta.window}")

    positive = {
        "pitch_mm": meta.pitch_mm,
        "magnification": meta.magnification,
        "sid_mm": meta.sid_mm,
        "kvp": meta.kvp,
        "exposure_index": meta.exposure_index,
        "target_exposure_index": meta.target_exposure_index,
        "weight_kg": meta.weight_kg,
        "height_m": meta.height_m,
    }
    for name, value in positive.items():
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive finite number, got {value}")
    if not (math.isfinite(meta.exposure_uas) and 0 <= meta.exposure_uas < 2**31 - 1):
        raise ValueError(f"exposure_uas must be in 0..2**31-2 (IS), got {meta.exposure_uas}")
    if not 0 <= meta.age_years <= 999:
        raise ValueError(f"age_years must be 0..999 for the AS format, got {meta.age_years}")
    if not (len(meta.study_date) == 8 and meta.study_date.isdigit()):
        raise ValueError(f"study_date must be YYYYMMDD, got {meta.study_date!r}")
    if not (len(meta.study_time) == 6 and meta.study_time.isdigit()):
        raise ValueError(f"study_time must be HHMMSS, got {meta.study_time!r}")
    if not meta.uid_seed:
        raise ValueError("uid_seed must be a non-empty string")
    # PN, LO: at most 64 characters, encodable in ISO_IR 100, no backslash (the value
    # separator) and no control characters; otherwise dciodvfy rejects the file.
    for field, text in (
        ("patient_name", meta.patient_name),
        ("patient_id", meta.patient_id),
        ("institution", meta.institution),
    ):
        if not (
            0 < len(text) <= 64
            and text.isprintable()
            and "\\" not in text
            and all(ord(char) < 256 for char in text)
        ):
            raise ValueError(
                f"{field} must be 1..64 printable Latin-1 characters without '\\', got {text!r}"
            )
    if meta.compression == "j2k_lossy" and not (
        math.isfinite(meta.j2k_ratio) and meta.j2k_ratio > 1
    ):
        raise ValueError(f"j2k_ratio must be > 1 for lossy JPEG 2000, got {meta.j2k_ratio}")
    if meta.patient_orientation is not None and (
        len(meta.patient_orientation) != 2
        or not all(
            value and set(value) <= _ORIENTATION_LETTERS for value in meta.patient_orientation
        )
    ):
        raise ValueError(
            f"patient_orientation must be two direction strings of {sorted(_ORIENTATION_LETTERS)}"
            f", got {meta.patient_orientation!r}"
        )


def _ds(value: float, significant: int = 6) -> str:
    """Format a DS value with bounded precision, so the text is short and reproducible."""
    text = f"{value:.{significant}g}"
    if len(text) > 16:  # pragma: no cover - 6 significant digits never reach 16 characters
        raise ValueError(f"DS value {value} does not fit 16 characters")
    return text


def _code_item(value: str, scheme: str, meaning: str) -> Dataset:
    """One Code Sequence item (PS3.3 Table 8.8-1)."""
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _uid(meta: RadiographMeta, role: str) -> UID:
    """A UID that depends only on the seed and its role, so reruns reproduce it."""
    return generate_uid(entropy_srcs=["osteofy-cohort", meta.uid_seed, role])


def _sigmoid_voi_lut(meta: RadiographMeta) -> Dataset:
    """A VOI LUT item mapping every stored value through a sigmoid centred on the window.

    It covers the whole stored range (first mapped value 0, 2**bits_stored entries; the LUT
    Descriptor writes 65536 entries as 0, PS3.3 C.11.2) with 16-bit output. The curve is the
    one the standard's SIGMOID VOI LUT Function defines, so a viewer that ignores the table
    and one that applies it agree on what the window means. LUT Data is OW because with
    65536 entries it exceeds the 64 KiB an explicit-VR US element can hold.
    """
    if meta.window is None:  # _validate rejects this; kept explicit for the type checker
        raise ValueError("a VOI LUT needs a window")
    center, width = meta.window
    n_entries = 1 << meta.bits_stored
    x = np.arange(n_entries, dtype=np.float64)
    curve = 65535.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    lut = np.rint(curve).astype("<u2")

    item = Dataset()
    item.add_new(0x00283002, "US", [n_entries & 0xFFFF, 0, 16])  # LUT Descriptor
    item.LUTExplanation = f"SIGMOID C{_ds(center)} W{_ds(width)}"[:64]
    item.add_new(0x00283006, "OW", lut.tobytes())  # LUT Data
    return item


def _build_dataset(pixels: np.ndarray, meta: RadiographMeta) -> Dataset:
    """All attributes of the CR or DX For-Presentation object, with uncompressed pixel data."""
    is_dx = meta.modality == "DX"
    lossy = meta.compression == "j2k_lossy"
    sop_class = _SOP_CLASS[meta.modality]
    sop_instance = _uid(meta, "sop-instance")
    rows, cols = pixels.shape

    ds = Dataset()

    # SOP Common
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.InstanceCreationDate = meta.study_date
    ds.InstanceCreationTime = meta.study_time
    ds.InstanceNumber = "1"

    # Patient; Patient Study. The identity is synthetic and says so.
    ds.PatientName = meta.patient_name
    ds.PatientID = meta.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = meta.sex
    ds.PatientComments = _PATIENT_COMMENT
    ds.PatientAge = f"{meta.age_years:03d}Y"
    ds.PatientSize = f"{meta.height_m:.2f}"
    ds.PatientWeight = f"{meta.weight_kg:.1f}"

    # General Study
    ds.StudyInstanceUID = _uid(meta, "study")
    ds.StudyDate = meta.study_date
    ds.StudyTime = meta.study_time
    ds.ReferringPhysicianName = ""
    ds.StudyID = "SYN" + hashlib.sha256(meta.uid_seed.encode()).hexdigest()[:8].upper()
    ds.AccessionNumber = ""
    ds.StudyDescription = f"SYNTHETIC {meta.body_part} {meta.view_position}"

    # General Series; CR Series or DX Series
    ds.Modality = meta.modality
    ds.SeriesInstanceUID = _uid(meta, "series")
    ds.SeriesNumber = "1"
    ds.SeriesDate = meta.study_date
    ds.SeriesTime = meta.study_time
    ds.SeriesDescription = f"SYNTHETIC {meta.body_part} {meta.view_position}"
    ds.BodyPartExamined = meta.body_part
    if is_dx:
        ds.PresentationIntentType = "FOR PRESENTATION"
    else:
        ds.ViewPosition = meta.view_position
        if meta.body_part in _PAIRED:
            # CR has no Image Laterality; General Series Laterality carries it (type 2C).
            ds.Laterality = meta.laterality

    # Frame of Reference (DX only; the CR IOD has no such module)
    if is_dx:
        ds.FrameOfReferenceUID = _uid(meta, "frame-of-reference")
        ds.PositionReferenceIndicator = ""

    # General Equipment
    ds.Manufacturer = _MANUFACTURER
    ds.InstitutionName = meta.institution
    ds.ManufacturerModelName = _MODEL_NAME
    ds.SoftwareVersions = _SOFTWARE_VERSION

    # General Acquisition; General Image
    ds.AcquisitionNumber = "1"
    ds.AcquisitionDate = meta.study_date
    ds.AcquisitionTime = meta.study_time
    ds.ContentDate = meta.study_date
    ds.ContentTime = meta.study_time
    if lossy:
        # Lossy compression changes pixel values, so the image is derived, and the derivation
        # says how (General Image module, Lossy Image Compression).
        ds.ImageType = ["DERIVED", "PRIMARY"]
        ds.DerivationDescription = f"Lossy JPEG 2000 compression ({_LOSSY_METHOD})"
        ds.DerivationCodeSequence = Sequence([_code_item("113040", "DCM", "Lossy Compression")])
    else:
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
    orientation = meta.patient_orientation or _DEFAULT_ORIENTATION[meta.body_part]
    ds.PatientOrientation = list(orientation)
    ds.BurnedInAnnotation = "YES" if meta.burned_in_annotation else "NO"
    ds.ImageComments = _IMAGE_COMMENT
    ds.LossyImageCompression = "01" if lossy else "00"
    # Ratio and method are set after encoding, from the actual codestream size.

    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = meta.photometric
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = meta.bits_stored
    ds.HighBit = meta.bits_stored - 1
    ds.PixelRepresentation = 0

    # Acquisition: CR Image, or DX Image / DX Detector / DX Positioning / X-Ray Grid.
    ds.KVP = _ds(meta.kvp)
    ds.ExposureInuAs = str(round(meta.exposure_uas))
    ds.DistanceSourceToDetector = _ds(meta.sid_mm)
    ds.ImagerPixelSpacing = [_ds(meta.pitch_mm), _ds(meta.pitch_mm)]
    patient_spacing = _ds(meta.pitch_mm / meta.magnification)
    ds.PixelSpacing = [patient_spacing, patient_spacing]
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.PixelSpacingCalibrationDescription = "Imager Pixel Spacing / estimated magnification"
    # CR has no Estimated Radiographic Magnification Factor (DX Positioning only); there the
    # magnification stays recoverable as SID / SOD and as ImagerPixelSpacing / PixelSpacing.
    ds.DistanceSourceToPatient = _ds(meta.sid_mm / meta.magnification)
    ds.ExposureIndex = _ds(meta.exposure_index)
    ds.TargetExposureIndex = _ds(meta.target_exposure_index)
    ds.DeviationIndex = f"{10.0 * math.log10(meta.exposure_index / meta.target_exposure_index):.2f}"
    ds.AcquisitionDeviceProcessingDescription = "SIMULATED RADIOGRAPH"
    if is_dx:
        ds.ImageLaterality = meta.laterality if meta.body_part in _PAIRED else "U"
        code, meaning = _ANATOMY[meta.body_part]
        ds.AnatomicRegionSequence = Sequence([_code_item(code, "SCT", meaning)])
        ds.EstimatedRadiographicMagnificationFactor = _ds(meta.magnification)
        ds.PositionerType = ""  # type 2; a simulated exposure has no positioner to name
        ds.ViewPosition = meta.view_position
        ds.ViewCodeSequence = Sequence(
            [_code_item(_VIEW[meta.view_position][0], "SCT", _VIEW[meta.view_position][1])]
        )
        ds.DetectorType = _DETECTOR_TYPE[meta.detector]
        # "IN" is no defined term of Grid (X-Ray Grid module; dciodvfy warns); a radiographic
        # grid is focused, so present means "FOCUSED" and absent "NONE".
        ds.Grid = "FOCUSED" if meta.grid else "NONE"
        ds.PixelIntensityRelationship = "LOG"
        # +1: lower values mean less beam intensity. Bone (less intensity) is bright in
        # MONOCHROME2, so high values mean less intensity there (-1); MONOCHROME1 stores
        # the inverse (+1).
        ds.PixelIntensityRelationshipSign = 1 if meta.photometric == "MONOCHROME1" else -1
        ds.PresentationLUTShape = "INVERSE" if meta.photometric == "MONOCHROME1" else "IDENTITY"
        ds.CalibrationImage = "NO"
        ds.AcquisitionContextSequence = Sequence()
    else:
        # The CR IOD has neither Detector Type nor Grid (those are DX modules); its CR Series
        # module has Plate Type and Collimator/grid Name, which carry the same facts.
        ds.PlateType = _DETECTOR_TYPE[meta.detector]
        ds.CollimatorGridName = "GRID" if meta.grid else "NONE"

    # Modality LUT: identity rescale, as DX requires and CR permits.
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"

    # VOI LUT
    if meta.windowing == "window":
        if meta.window is None:
            raise ValueError("windowing 'window' needs a window")
        center, width = meta.window
        ds.WindowCenter = _ds(center)
        ds.WindowWidth = _ds(width)
        ds.WindowCenterWidthExplanation = "SIMULATED DEFAULT"
        ds.VOILUTFunction = "LINEAR"
    elif meta.windowing == "voilut":
        ds.VOILUTSequence = Sequence([_sigmoid_voi_lut(meta)])

    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    ds["PixelData"].VR = "OW"

    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _compress(ds: Dataset, pixels: np.ndarray, meta: RadiographMeta) -> None:
    """Encode Pixel Data as JPEG 2000 in place and record lossy provenance if it applies."""
    syntax = _TRANSFER_SYNTAX[meta.compression]
    pixels = np.ascontiguousarray(pixels)  # views (flips, crops) reach the encoder in order
    if meta.compression == "j2k_lossy":
        ds.compress(
            syntax,
            pixels,
            encoding_plugin="pylibjpeg",
            generate_instance_uid=False,
            j2k_cr=[float(meta.j2k_ratio)],
        )
        # The achieved ratio, relative to the uncompressed Pixel Data (Bits Allocated), as
        # PS3.3 C.7.6.1.1.5.1 asks; it is usually not exactly the requested one.
        codestream = get_frame(ds.PixelData, 0, number_of_frames=1)
        uncompressed = int(ds.Rows) * int(ds.Columns) * 2
        ds.LossyImageCompressionRatio = f"{uncompressed / len(codestream):.2f}"
        ds.LossyImageCompressionMethod = _LOSSY_METHOD
    else:
        ds.compress(syntax, pixels, encoding_plugin="pylibjpeg", generate_instance_uid=False)


def write_radiograph(path: Path, pixels: np.ndarray, meta: RadiographMeta) -> None:
    """Write ``pixels`` (stored values, already inverted for MONOCHROME1) as a DICOM file.

    The file is written to a temporary name in the same directory, fsynced and renamed over
    ``path``, so a crash or a concurrent reader never sees a half-written file.

    Raises:
        ValueError: if the pixels or the metadata are not a valid combination (see
            :class:`RadiographMeta`); nothing is written then.
    """
    path = Path(path)
    _validate(pixels, meta)
    ds = _build_dataset(pixels, meta)
    if meta.compression != "none":
        _compress(ds, pixels, meta)

    atomic_write(path, lambda handle: ds.save_as(handle, enforce_file_format=True))
