"""De-identification end to end: no patient identifier leaves the device (docs/security.md).

The result payload is built from scratch (edge/result.py), so by construction it carries only
HMAC keys and the retained patient characteristics. This test proves it on the running system:
a cohort radiograph is filled with canary values in every attribute of DICOM PS3.15 Table
E.1-1 that can occur in a CR/DX object (names, IDs, dates and times, UIDs, institution, device
and operator attributes, comments, sequences, overlays, private tags, data after the pixels),
then screened by ``EdgeService`` - accepted, and in three rejected forms - and by
``osteofy screen --json``, with every logger at DEBUG. Afterwards no canary may be found in
any log record, any row of results.sqlite (the outbox included), any file the device wrote
(overlay PNG/JPEG bytes, decompressed pixels and chunks, quarantine reason files, the audit
log, the database files themselves) or the JSON line on stdout.

Profile: Basic Application Level Confidentiality Profile with the Retain Patient
Characteristics Option declared for Patient's Age, Sex, Weight and Size only - those four are
kept (age capped at 90 in the payload), every other attribute of the table is removed; the
identifiers that the dashboard needs for grouping (Patient ID, Study Instance UID) are replaced
by keyed hashes (HMAC-SHA256 with the site secret), a consistent replacement as the profile's
``U``/``Z`` actions allow.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import sqlite3
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom import config as dicom_config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from edge import audit
from edge.result import Result, load_site_secret, pseudonym
from edge.serve import EdgeService
from osteofy.cli import main

# Table E.1-1 attributes that can occur in a CR or DX object, with the Basic Profile action:
# D dummy, Z zero/dummy, X remove, U consistent UID replacement, K keep; "(K)" = kept here by
# the Retain Patient Characteristics Option. Each tag is checked against pydicom's dictionary.
ANNEX_E: tuple[tuple[int, str, str], ...] = (
    # patient: names, IDs, dates, contact, history
    (0x00100010, "PatientName", "Z"),
    (0x00100020, "PatientID", "Z"),
    (0x00100021, "IssuerOfPatientID", "X"),
    (0x00100030, "PatientBirthDate", "Z"),
    (0x00100032, "PatientBirthTime", "X"),
    (0x00100040, "PatientSex", "Z (K)"),
    (0x00100050, "PatientInsurancePlanCodeSequence", "X"),
    (0x00100101, "PatientPrimaryLanguageCodeSequence", "X"),
    (0x00101000, "OtherPatientIDs", "X"),
    (0x00101001, "OtherPatientNames", "X"),
    (0x00101002, "OtherPatientIDsSequence", "X"),
    (0x00101005, "PatientBirthName", "X"),
    (0x00101010, "PatientAge", "X (K)"),
    (0x00101020, "PatientSize", "X (K)"),
    (0x00101030, "PatientWeight", "X (K)"),
    (0x00101040, "PatientAddress", "X"),
    (0x00101050, "InsurancePlanIdentification", "X"),
    (0x00101060, "PatientMotherBirthName", "X"),
    (0x00101080, "MilitaryRank", "X"),
    (0x00101081, "BranchOfService", "X"),
    (0x00101090, "MedicalRecordLocator", "X"),
    (0x00102000, "MedicalAlerts", "X"),
    (0x00102110, "Allergies", "X"),
    (0x00102150, "CountryOfResidence", "X"),
    (0x00102152, "RegionOfResidence", "X"),
    (0x00102154, "PatientTelephoneNumbers", "X"),
    (0x00102160, "EthnicGroup", "X"),
    (0x00102180, "Occupation", "X"),
    (0x001021A0, "SmokingStatus", "X"),
    (0x001021B0, "AdditionalPatientHistory", "X"),
    (0x001021C0, "PregnancyStatus", "X"),
    (0x001021D0, "LastMenstrualDate", "X"),
    (0x001021F0, "PatientReligiousPreference", "X"),
    (0x00102203, "PatientSexNeutered", "X/Z"),
    (0x00102297, "ResponsiblePerson", "X"),
    (0x00102299, "ResponsibleOrganization", "X"),
    (0x00104000, "PatientComments", "X"),
    (0x00380004, "ReferencedPatientAliasSequence", "X"),
    (0x00380010, "AdmissionID", "X"),
    (0x00380011, "IssuerOfAdmissionID", "X"),
    (0x00380020, "AdmittingDate", "X"),
    (0x00380021, "AdmittingTime", "X"),
    (0x00380050, "SpecialNeeds", "X"),
    (0x00380060, "ServiceEpisodeID", "X"),
    (0x00380062, "ServiceEpisodeDescription", "X"),
    (0x00380300, "CurrentPatientLocation", "X"),
    (0x00380400, "PatientInstitutionResidence", "X"),
    (0x00380500, "PatientState", "X"),
    (0x00384000, "VisitComments", "X"),
    # study, series, instance: UIDs, dates and times, descriptions
    (0x00020003, "MediaStorageSOPInstanceUID", "U"),
    (0x00080014, "InstanceCreatorUID", "U"),
    (0x00080017, "AcquisitionUID", "U"),
    (0x00080018, "SOPInstanceUID", "U"),
    (0x00080020, "StudyDate", "Z"),
    (0x00080021, "SeriesDate", "X/D"),
    (0x00080022, "AcquisitionDate", "X/Z"),
    (0x00080023, "ContentDate", "Z/D"),
    (0x0008002A, "AcquisitionDateTime", "X/D"),
    (0x00080030, "StudyTime", "Z"),
    (0x00080031, "SeriesTime", "X/D"),
    (0x00080032, "AcquisitionTime", "X/Z"),
    (0x00080033, "ContentTime", "Z/D"),
    (0x00080050, "AccessionNumber", "Z"),
    (0x00080201, "TimezoneOffsetFromUTC", "X"),
    (0x00081030, "StudyDescription", "X"),
    (0x0008103E, "SeriesDescription", "X"),
    (0x00081080, "AdmittingDiagnosesDescription", "X"),
    (0x00081084, "AdmittingDiagnosesCodeSequence", "X"),
    (0x00081110, "ReferencedStudySequence", "X/Z"),
    (0x00081111, "ReferencedPerformedProcedureStepSequence", "X/Z/D"),
    (0x00081120, "ReferencedPatientSequence", "X"),
    (0x00081140, "ReferencedImageSequence", "X/Z/U*"),
    (0x00082111, "DerivationDescription", "X"),
    (0x00082112, "SourceImageSequence", "X/Z/U*"),
    (0x00083010, "IrradiationEventUID", "U"),
    (0x00084000, "IdentifyingComments", "X"),
    (0x0020000D, "StudyInstanceUID", "U"),
    (0x0020000E, "SeriesInstanceUID", "U"),
    (0x00200010, "StudyID", "Z"),
    (0x00200052, "FrameOfReferenceUID", "U"),
    (0x00200200, "SynchronizationFrameOfReferenceUID", "U"),
    (0x00204000, "ImageComments", "X"),
    (0x00209158, "FrameComments", "X"),
    (0x00209161, "ConcatenationUID", "U"),
    (0x00209164, "DimensionOrganizationUID", "U"),
    (0x00880140, "StorageMediaFileSetUID", "U"),
    (0x0040A124, "UID", "U"),
    # institution, device, operators, physicians
    (0x00080080, "InstitutionName", "X/Z/D"),
    (0x00080081, "InstitutionAddress", "X"),
    (0x00080082, "InstitutionCodeSequence", "X/Z/D"),
    (0x00080090, "ReferringPhysicianName", "Z"),
    (0x00080092, "ReferringPhysicianAddress", "X"),
    (0x00080094, "ReferringPhysicianTelephoneNumbers", "X"),
    (0x00080096, "ReferringPhysicianIdentificationSequence", "X"),
    (0x0008009C, "ConsultingPhysicianName", "X"),
    (0x0008009D, "ConsultingPhysicianIdentificationSequence", "X"),
    (0x00081010, "StationName", "X/Z/D"),
    (0x00081040, "InstitutionalDepartmentName", "X"),
    (0x00081048, "PhysiciansOfRecord", "X"),
    (0x00081049, "PhysiciansOfRecordIdentificationSequence", "X"),
    (0x00081050, "PerformingPhysicianName", "X"),
    (0x00081052, "PerformingPhysicianIdentificationSequence", "X"),
    (0x00081060, "NameOfPhysiciansReadingStudy", "X"),
    (0x00081062, "PhysiciansReadingStudyIdentificationSequence", "X"),
    (0x00081070, "OperatorsName", "X/Z/D"),
    (0x00081072, "OperatorIdentificationSequence", "X/D"),
    (0x00180010, "ContrastBolusAgent", "Z/D"),
    (0x00181000, "DeviceSerialNumber", "X/Z/D"),
    (0x00181002, "DeviceUID", "U"),
    (0x00181004, "PlateID", "X"),
    (0x00181005, "GeneratorID", "X"),
    (0x00181007, "CassetteID", "X"),
    (0x00181008, "GantryID", "X"),
    (0x00181030, "ProtocolName", "X/D"),
    (0x00181400, "AcquisitionDeviceProcessingDescription", "X/D"),
    (0x00184000, "AcquisitionComments", "X"),
    (0x0018700A, "DetectorID", "X/D"),
    (0x00189424, "AcquisitionProtocolDescription", "X"),
    (0x00203401, "ModifyingDeviceID", "X"),
    (0x00203404, "ModifyingDeviceManufacturer", "X"),
    (0x00203406, "ModifiedImageDescription", "X"),
    (0x00700084, "ContentCreatorName", "Z"),
    (0x0040A123, "PersonName", "D"),
    # request, scheduling, performed procedure step
    (0x00321020, "ScheduledStudyLocation", "X"),
    (0x00321021, "ScheduledStudyLocationAETitle", "X"),
    (0x00320012, "StudyIDIssuer", "X"),
    (0x00321030, "ReasonForStudy", "X"),
    (0x00321032, "RequestingPhysician", "X"),
    (0x00321033, "RequestingService", "X"),
    (0x00321060, "RequestedProcedureDescription", "X/Z"),
    (0x00324000, "StudyComments", "X"),
    (0x00400007, "ScheduledProcedureStepDescription", "X"),
    (0x00400009, "ScheduledProcedureStepID", "X"),
    (0x00400012, "PreMedication", "X"),
    (0x00400241, "PerformedStationAETitle", "X"),
    (0x00400242, "PerformedStationName", "X"),
    (0x00400243, "PerformedLocation", "X"),
    (0x00400244, "PerformedProcedureStepStartDate", "X"),
    (0x00400245, "PerformedProcedureStepStartTime", "X"),
    (0x00400250, "PerformedProcedureStepEndDate", "X"),
    (0x00400251, "PerformedProcedureStepEndTime", "X"),
    (0x00400253, "PerformedProcedureStepID", "X"),
    (0x00400254, "PerformedProcedureStepDescription", "X"),
    (0x00400275, "RequestAttributesSequence", "X"),
    (0x00400280, "CommentsOnThePerformedProcedureStep", "X"),
    (0x00400555, "AcquisitionContextSequence", "X"),
    (0x00401001, "RequestedProcedureID", "X"),
    (0x00401002, "ReasonForTheRequestedProcedure", "X"),
    (0x00401004, "PatientTransportArrangements", "X"),
    (0x00401005, "RequestedProcedureLocation", "X"),
    (0x00401010, "NamesOfIntendedRecipientsOfResults", "X"),
    (0x00401400, "RequestedProcedureComments", "X"),
    (0x00402008, "OrderEnteredBy", "X"),
    (0x00402009, "OrderEntererLocation", "X"),
    (0x00402010, "OrderCallbackPhoneNumber", "X"),
    (0x00402016, "PlacerOrderNumberImagingServiceRequest", "Z"),
    (0x00402017, "FillerOrderNumberImagingServiceRequest", "Z"),
    (0x00402400, "ImagingServiceRequestComments", "X"),
    # images inside the image, modification history, signatures, free text
    (0x00880200, "IconImageSequence", "X"),
    (0x04000561, "OriginalAttributesSequence", "X"),
    (0x40004000, "TextComments", "X"),
    (0xFFFAFFFA, "DigitalSignaturesSequence", "X"),
    (0xFFFCFFFC, "DataSetTrailingPadding", "X"),
)
# Not in the data dictionary by keyword (repeating group 60xx) or not attributes at all:
# filled by _fill_overlay and _fill_private. Both are "X" in Table E.1-1.
OTHER_ROWS = (
    (0x60003000, "OverlayData (60xx,3000)", "X"),
    (0x60004000, "OverlayComments (60xx,4000)", "X"),
    (0x00090000, "private attributes: (0009,0010) creator, LO, PN, UN, private SQ", "X"),
    (0x00190000, "private attributes: (0019,0010) creator, UT", "X"),
)
RETAINED = {"PatientAge": "067Y", "PatientSex": "F", "PatientWeight": "58.5", "PatientSize": "1.61"}
NUMERIC_VRS = {"US", "SS", "UL", "SL", "FL", "FD", "DS", "IS", "AT"}
CANARY = "ZZCANARY"


class Canaries:
    """Makes one distinctive value per element and remembers it as a token to search for.

    Text VRs get ``ZZCANARYnnn``; DA/TM/DT/UI get valid values no output can contain by
    chance (year 1000+n, ``2.25.31337nnnnn``); binary VRs embed the text token in bytes.
    """

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self._n = 0

    def __call__(self, vr: str) -> object:
        self._n += 1
        n = self._n
        if vr == "DA":
            token = f"{1000 + n:04d}0307"
        elif vr == "TM":
            token = f"23{n % 60:02d}59.{700000 + n}"
        elif vr == "DT":
            token = f"{1000 + n:04d}0307235959.{700000 + n}"
        elif vr == "UI":
            token = f"2.25.31337{n:05d}"
        elif vr in NUMERIC_VRS:
            return 4  # e.g. Pregnancy Status "unknown": a number cannot be a findable canary
        else:
            token = f"{CANARY}{n:03d}"
        self.tokens.append(token)
        if vr in ("OB", "OW", "UN"):
            return (token * 4).encode("ascii")
        return f"{token}^PN" if vr == "PN" else token


def _code(c: Canaries) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = c("SH"), "99ZZ", c("LO")
    return item


def _person(c: Canaries) -> Dataset:
    item = Dataset()
    item.PersonIdentificationCodeSequence = Sequence([_code(c)])
    item.PersonAddress, item.PersonTelephoneNumbers = c("ST"), c("LO")
    item.InstitutionName, item.InstitutionAddress = c("LO"), c("ST")
    return item


def _reference(c: Canaries, sop_class: str = "1.2.840.10008.5.1.4.1.1.1") -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, c("UI")
    return item


def _request(c: Canaries) -> Dataset:
    item = Dataset()
    item.AccessionNumber, item.StudyInstanceUID = c("SH"), c("UI")
    item.RequestedProcedureID, item.RequestedProcedureDescription = c("SH"), c("LO")
    item.ScheduledProcedureStepID, item.ScheduledProcedureStepDescription = c("SH"), c("LO")
    item.ReasonForTheRequestedProcedure = c("LO")
    return item


def _other_id(c: Canaries) -> Dataset:
    item = Dataset()
    item.PatientID, item.IssuerOfPatientID, item.TypeOfPatientID = c("LO"), c("LO"), "TEXT"
    return item


def _context(c: Canaries) -> Dataset:
    item = Dataset()
    item.ValueType, item.ConceptNameCodeSequence, item.TextValue = "TEXT", [_code(c)], c("UT")
    return item


def _icon(c: Canaries) -> Dataset:
    item = Dataset()
    item.SamplesPerPixel, item.PhotometricInterpretation = 1, "MONOCHROME2"
    item.Rows = item.Columns = 8
    item.BitsAllocated, item.BitsStored, item.HighBit, item.PixelRepresentation = 8, 8, 7, 0
    token = c("OB")
    item.add_new(0x7FE00010, "OB", (token * 8)[:64])  # the icon's pixels spell the canary
    return item


def _original_attributes(c: Canaries) -> Dataset:
    item = Dataset()
    item.AttributeModificationDateTime, item.ModifyingSystem = c("DT"), c("LO")
    item.SourceOfPreviousValues, item.ReasonForTheAttributeModification = c("LO"), "COERCE"
    modified = Dataset()
    modified.PatientName, modified.PatientID = c("PN"), c("LO")
    item.ModifiedAttributesSequence = Sequence([modified])
    return item


def _signature(c: Canaries) -> Dataset:
    item = Dataset()
    item.MACIDNumber, item.DigitalSignatureUID = 1, c("UI")
    item.DigitalSignatureDateTime, item.CertificateType = c("DT"), "X509_1993_SIG"
    item.CertificateOfSigner, item.Signature = c("OB"), c("OB")
    return item


SEQUENCE_ITEMS: dict[str, Callable[[Canaries], Dataset]] = {
    "PatientInsurancePlanCodeSequence": _code,
    "PatientPrimaryLanguageCodeSequence": _code,
    "OtherPatientIDsSequence": _other_id,
    "ReferencedPatientAliasSequence": lambda c: _reference(c, "1.2.840.10008.3.1.2.1.1"),
    "AdmittingDiagnosesCodeSequence": _code,
    "ReferencedStudySequence": lambda c: _reference(c, "1.2.840.10008.3.1.2.3.1"),
    "ReferencedPerformedProcedureStepSequence": lambda c: _reference(c, "1.2.840.10008.3.1.2.3.3"),
    "ReferencedPatientSequence": lambda c: _reference(c, "1.2.840.10008.3.1.2.1.1"),
    "ReferencedImageSequence": _reference,
    "SourceImageSequence": _reference,
    "InstitutionCodeSequence": _code,
    "ReferringPhysicianIdentificationSequence": _person,
    "ConsultingPhysicianIdentificationSequence": _person,
    "PhysiciansOfRecordIdentificationSequence": _person,
    "PerformingPhysicianIdentificationSequence": _person,
    "PhysiciansReadingStudyIdentificationSequence": _person,
    "OperatorIdentificationSequence": _person,
    "RequestAttributesSequence": _request,
    "AcquisitionContextSequence": _context,
    "IconImageSequence": _icon,
    "OriginalAttributesSequence": _original_attributes,
    "DigitalSignaturesSequence": _signature,
}


def _fill_overlay(ds: Dataset, c: Canaries) -> None:
    ds.add_new(0x60000010, "US", 16)  # Overlay Rows
    ds.add_new(0x60000011, "US", 16)  # Overlay Columns
    ds.add_new(0x60000040, "CS", "G")  # Overlay Type
    ds.add_new(0x60000050, "SS", [1, 1])  # Overlay Origin
    ds.add_new(0x60000100, "US", 1)  # Overlay Bits Allocated
    ds.add_new(0x60000102, "US", 0)  # Overlay Bit Position
    ds.add_new(0x60003000, "OW", (c("OW") * 4)[:32])  # Overlay Data: 16 x 16 bits
    ds.add_new(0x60004000, "LT", c("LT"))  # Overlay Comments


def _fill_private(ds: Dataset, c: Canaries) -> None:
    first = ds.private_block(0x0009, f"{CANARY} CREATOR ONE", create=True)
    c.tokens.append(f"{CANARY} CREATOR ONE")
    first.add_new(0x01, "LO", c("LO"))
    first.add_new(0x02, "PN", c("PN"))
    first.add_new(0x03, "UN", c("UN"))
    nested = Dataset()
    nested.PatientName, nested.PatientID = c("PN"), c("LO")
    first.add_new(0x04, "SQ", Sequence([nested]))
    second = ds.private_block(0x0019, f"{CANARY} CREATOR TWO", create=True)
    c.tokens.append(f"{CANARY} CREATOR TWO")
    second.add_new(0x01, "UT", c("UT"))


def write_canary_file(src: Path, dst: Path, **overrides: object) -> tuple[list[str], Dataset]:
    """``src`` with every ANNEX_E attribute filled with a canary; returns (tokens, dataset)."""
    c = Canaries()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = dicom_config.settings.writing_validation_mode
        dicom_config.settings.writing_validation_mode = dicom_config.IGNORE
        try:
            ds = pydicom.dcmread(src)
            for tag, keyword, _action in ANNEX_E:
                if keyword in RETAINED:
                    setattr(ds, keyword, RETAINED[keyword])
                elif keyword == "MediaStorageSOPInstanceUID":
                    continue  # set with the SOP Instance UID below
                elif keyword in SEQUENCE_ITEMS:
                    ds.add_new(tag, "SQ", Sequence([SEQUENCE_ITEMS[keyword](c)]))
                else:
                    ds.add_new(tag, dictionary_VR(tag), c(dictionary_VR(tag)))
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            _fill_overlay(ds, c)
            _fill_private(ds, c)
            ds.BurnedInAnnotation = "NO"  # radiograph pixels are published: the riskier path
            for keyword, value in overrides.items():
                setattr(ds, keyword, value)
            ds.save_as(dst, enforce_file_format=True)
        finally:
            dicom_config.settings.writing_validation_mode = old
    return c.tokens, ds


# --- capture ---------------------------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record)  # message, args, traceback, stack
        self.lines.append(f"{text} | args={record.args!r}")


@contextlib.contextmanager
def every_logger_at_debug() -> Iterator[_Records]:
    """Every logger that exists now or is created later at DEBUG, records kept; warnings too."""
    handler = _Records()
    root = logging.getLogger()
    manager = logging.Logger.manager
    saved = {
        name: lg.level for name, lg in manager.loggerDict.items() if isinstance(lg, logging.Logger)
    }
    saved_root = root.level
    for name in saved:
        logging.getLogger(name).setLevel(logging.DEBUG)
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    logging.captureWarnings(True)
    try:
        yield handler
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)
        root.setLevel(saved_root)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk; the PNG signature and CRCs are checked on the way."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc
        out.append((kind, body))
        pos += 12 + length
    return out


def jpeg_segments(data: bytes) -> list[int]:
    """Markers of a JPEG file up to the start of scan (APPn, COM, DQT, ...)."""
    assert data[:2] == b"\xff\xd8"
    markers, pos = [], 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        markers.append(marker)
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            break
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        pos += 2 + length
    return markers


def find_canaries(tokens: list[str], texts: dict[str, str | bytes]) -> list[str]:
    """``"where: token"`` for every token found in any text (or bytes, as latin-1)."""
    hits = []
    for where, text in texts.items():
        hay = text.decode("latin-1") if isinstance(text, bytes) else text
        hits += [f"{where}: {t}" for t in (*tokens, CANARY) if t in hay]
    return hits


def _rows(db_path: Path) -> dict[str, str]:
    db = sqlite3.connect(db_path)
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        out = {}
        for table in tables:
            for i, row in enumerate(db.execute(f'SELECT * FROM "{table}"')):  # noqa: S608
                out[f"results.sqlite {table} row {i}"] = " | ".join(
                    bytes(v).decode("latin-1") if isinstance(v, bytes) else str(v) for v in row
                )
        return out
    finally:
        db.close()


# --- the test ----------------------------------------------------------------------------------


def test_annex_e_table_tags_match_the_dicom_dictionary() -> None:
    keywords = [k for _, k, _ in ANNEX_E]
    assert len(set(keywords)) == len(keywords)
    for tag, keyword, action in ANNEX_E:
        assert tag_for_keyword(keyword) == tag, keyword
        assert action.split(" ")[0] in {"D", "Z", "X", "U", "X/Z", "X/D", "Z/D", "X/Z/D", "X/Z/U*"}
    assert {k for _, k, a in ANNEX_E if "(K)" in a} == set(RETAINED)
    assert all(dictionary_VR(t) == "SQ" for t, k, _ in ANNEX_E if k in SEQUENCE_ITEMS)


def test_the_scanner_finds_a_planted_canary() -> None:
    """The checks below are only worth something if the scanner sees a canary when present."""
    assert find_canaries(["ZZCANARY042"], {"log": "x ZZCANARY042^PN y"}) == [
        "log: ZZCANARY042",
        "log: ZZCANARY",
    ]
    assert find_canaries(["10420307"], {"db": b"\x00104203070"}) == ["db: 10420307"]
    assert find_canaries(["ZZCANARY001"], {"log": "clean"}) == []


def test_no_canary_leaves_the_device(
    device_scans: list[Path], device_config, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    cfg = device_config
    staging = tmp_path / "staging"
    staging.mkdir()
    accepted = staging / "accepted.dcm"
    tokens, ds = write_canary_file(device_scans[0], accepted)
    chest = staging / "chest.dcm"
    write_canary_file(device_scans[0], chest, BodyPartExamined="CHEST")
    truncated = staging / "truncated.dcm"
    truncated.write_bytes(accepted.read_bytes()[: accepted.stat().st_size * 7 // 10])
    text = staging / "note.dcm"
    text.write_text(f"Patient: {tokens[0]} born {tokens[3]}\n" * 20)
    raw = accepted.read_bytes()
    missing = [t for t in tokens if t.encode() not in raw]
    assert not missing, f"canaries not written into the file: {missing}"
    inputs = {
        hashlib.sha256(p.read_bytes()).hexdigest() for p in (accepted, chest, truncated, text)
    }

    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(cfg.data_dir),
                "models_dir": str(cfg.models_dir),
                "precision": cfg.precision,
                "mqtt": {"url": ""},
            }
        )
    )
    out_dir = tmp_path / "screen-out"
    with every_logger_at_debug() as records:
        audit.configure(cfg.data_dir / "audit.jsonl")
        try:
            service = EdgeService(cfg)
            # inbox names as the bridge makes them: generated, never from DICOM values
            for i, src in enumerate((accepted, chest, truncated, text)):
                shutil.copy(src, service.folders.inbox / f"20250101T12000{i}000000Z-{i:016x}.dcm")
            assert service.run_once() == 4
            service.close()
            rc = main(
                ["-v", "screen", str(accepted), str(chest), "--json", "--config", str(config_file)]
                + ["--overlay", str(out_dir)]
            )
        finally:
            audit.configure(None)
    captured = capfd.readouterr()
    assert rc == 3  # the chest is rejected

    # What was stored and queued is what the contract says, with the identifiers keyed.
    db_rows = _rows(cfg.data_dir / "results.sqlite")
    with contextlib.closing(sqlite3.connect(cfg.data_dir / "results.sqlite")) as db:
        results = [json.loads(r[0]) for r in db.execute("SELECT payload FROM results")]
    assert len(results) == 1
    payload = Result.model_validate(results[0]).payload()
    secret = load_site_secret(cfg.data_dir / "site.secret", create=False)
    assert payload["patient_key"] == pseudonym(secret, str(ds.PatientID))
    assert payload["study_key"] == pseudonym(secret, str(ds.StudyInstanceUID))
    assert payload["age_years"] == 67.0 and payload["sex"] == "F"  # retained characteristics
    assert sum(" outbox " in k for k in db_rows) == 2  # result + overlay
    assert sum(" rejections " in k for k in db_rows) == 3
    lines = [json.loads(x) for x in captured.out.splitlines()]
    assert [("rejected" in x) for x in lines] == [False, True]
    plain_hashes = [hashlib.sha256(str(ds.PatientID).encode()).hexdigest()]

    # Every file the device wrote, except the studies themselves (kept locally by design).
    files: dict[str, str | bytes] = {}
    pngs = jpegs = reasons = 0
    for path in sorted([*cfg.data_dir.rglob("*"), *out_dir.rglob("*")]):
        if not path.is_file():
            continue
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() in inputs:
            continue
        files[str(path.relative_to(tmp_path))] = data
        if path.name.endswith(".reason.json"):
            record = json.loads(data)
            assert record["reason"] and record["rule"]
            reasons += 1
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            chunks = png_chunks(data)
            kinds = {k for k, _ in chunks}
            assert kinds <= {b"IHDR", b"PLTE", b"IDAT", b"IEND", b"sBIT", b"tRNS"}, kinds
            pixels = zlib.decompress(b"".join(b for k, b in chunks if k == b"IDAT"))
            files[f"{path.name} (decompressed pixels)"] = pixels
            pngs += 1
        elif data[:2] == b"\xff\xd8":
            assert 0xFE not in jpeg_segments(data)  # no COM segment
            assert not {m for m in jpeg_segments(data) if 0xE1 <= m <= 0xEF}  # no EXIF/XMP
            jpegs += 1
    assert reasons == 3 and pngs == 5 and jpegs == 2  # overlay, 3 heat maps, CLI; local + base
    assert audit.verify(cfg.data_dir / "audit.jsonl")[0]
    kinds = [e["kind"] for e in audit.AuditLog(cfg.data_dir / "audit.jsonl").events()]
    assert kinds.count("quarantined") == 3 and kinds.count("model_loaded") == 4

    texts: dict[str, str | bytes] = {
        **{f"log record {i}": line for i, line in enumerate(records.lines)},
        **db_rows,
        **files,
        "stdout": captured.out,
        "stderr": captured.err,
    }
    hits = find_canaries(tokens + plain_hashes, texts)
    print(
        f"\nde-identification: {len(tokens)} canaries in {len(ANNEX_E) + len(OTHER_ROWS)} "
        f"table rows; searched {len(records.lines)} log records, {len(db_rows)} database rows, "
        f"{len(files)} files ({pngs} PNG, {jpegs} JPEG, {reasons} reason files); found {len(hits)}"
    )
    assert hits == []
