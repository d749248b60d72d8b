"""Which DICOM attributes the index keeps, at which level, and how each is matched.

One table serves C-FIND (PS3.4 C.6) and QIDO-RS (PS3.18 10.6): a key listed here is matched on an
indexed column; any other key of a known level is matched on that level's stored DICOM JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Level(str, Enum):
    """Query/Retrieve levels (PS3.4 C.3)."""

    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"

    @property
    def depth(self) -> int:
        return _DEPTH[self]

    @property
    def alias(self) -> str:
        """SQL alias of the level's table."""
        return _ALIAS[self]


_DEPTH = {Level.PATIENT: 0, Level.STUDY: 1, Level.SERIES: 2, Level.IMAGE: 3}
_ALIAS = {Level.PATIENT: "p", Level.STUDY: "st", Level.SERIES: "se", Level.IMAGE: "i"}


class Match(str, Enum):
    """How a key's value is compared (PS3.4 C.2.2.2), chosen by its VR."""

    UID = "uid"            # single value or list of UIDs
    STRING = "string"      # single value, wildcard
    PN = "pn"              # like STRING, case-insensitive (PS3.4 C.2.2.2.1 allows it for PN)
    DATE = "date"          # single value, range
    TIME = "time"
    DATETIME = "datetime"
    NUMBER = "number"      # IS/US: single value only
    SEQUENCE = "sequence"  # PS3.4 C.2.2.2.6
    COMPUTED = "computed"  # derived from the index, not stored in any instance


@dataclass(frozen=True, slots=True)
class Key:
    keyword: str
    tag: int
    vr: str
    level: Level
    match: Match
    column: str | None = None  # indexed column on the level's table; None: match on stored JSON

    @property
    def hex(self) -> str:
        """The tag as DICOM JSON writes it (PS3.18 F.2.1.1)."""
        return f"{self.tag:08X}"


def _k(keyword: str, tag: int, vr: str, level: Level, column: str | None = None) -> Key:
    match = {"UI": Match.UID, "PN": Match.PN, "DA": Match.DATE, "TM": Match.TIME, "DT": Match.DATETIME,
             "IS": Match.NUMBER, "US": Match.NUMBER, "SQ": Match.SEQUENCE}.get(vr, Match.STRING)
    return Key(keyword, tag, vr, level, match, column)


P, ST, SE, IM = Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE

INDEXED_KEYS: tuple[Key, ...] = (
    _k("PatientName", 0x00100010, "PN", P, "patient_name"),
    _k("PatientID", 0x00100020, "LO", P, "patient_id"),
    _k("IssuerOfPatientID", 0x00100021, "LO", P, "issuer_of_patient_id"),
    _k("PatientBirthDate", 0x00100030, "DA", P, "patient_birth_date"),
    _k("PatientSex", 0x00100040, "CS", P, "patient_sex"),
    _k("StudyInstanceUID", 0x0020000D, "UI", ST, "study_instance_uid"),
    _k("StudyDate", 0x00080020, "DA", ST, "study_date"),
    _k("StudyTime", 0x00080030, "TM", ST, "study_time"),
    _k("AccessionNumber", 0x00080050, "SH", ST, "accession_number"),
    _k("StudyID", 0x00200010, "SH", ST, "study_id"),
    _k("ReferringPhysicianName", 0x00080090, "PN", ST, "referring_physician_name"),
    _k("StudyDescription", 0x00081030, "LO", ST, "study_description"),
    _k("SeriesInstanceUID", 0x0020000E, "UI", SE, "series_instance_uid"),
    _k("Modality", 0x00080060, "CS", SE, "modality"),
    _k("SeriesNumber", 0x00200011, "IS", SE, "series_number"),
    _k("SeriesDescription", 0x0008103E, "LO", SE, "series_description"),
    _k("SeriesDate", 0x00080021, "DA", SE, "series_date"),
    _k("SeriesTime", 0x00080031, "TM", SE, "series_time"),
    _k("BodyPartExamined", 0x00180015, "CS", SE, "body_part_examined"),
    _k("InstitutionName", 0x00080080, "LO", SE, "institution_name"),
    _k("PerformedProcedureStepStartDate", 0x00400244, "DA", SE, "pps_start_date"),
    _k("PerformedProcedureStepStartTime", 0x00400245, "TM", SE, "pps_start_time"),
    _k("SOPInstanceUID", 0x00080018, "UI", IM, "sop_instance_uid"),
    _k("SOPClassUID", 0x00080016, "UI", IM, "sop_class_uid"),
    _k("InstanceNumber", 0x00200013, "IS", IM, "instance_number"),
    _k("ContentDate", 0x00080023, "DA", IM, "content_date"),
    _k("ContentTime", 0x00080033, "TM", IM, "content_time"),
    _k("AcquisitionDateTime", 0x0008002A, "DT", IM, "acquisition_datetime"),
)

# Attributes kept in each level's stored JSON besides the indexed ones: what C-FIND and QIDO-RS
# return at that level (PS3.4 C.6.1.1 / C.6.2.1 and PS3.18 Table 10.6.3-3..5), plus sequences that
# sequence matching (PS3.4 C.2.2.2.6) applies to.
_STUDY_EXTRA = (
    (0x00080051, "SQ"),  # IssuerOfAccessionNumberSequence
    (0x00081032, "SQ"),  # ProcedureCodeSequence
    (0x00081060, "PN"),  # NameOfPhysiciansReadingStudy
    (0x00081080, "LO"),  # AdmittingDiagnosesDescription
    (0x00081110, "SQ"),  # ReferencedStudySequence
    (0x00101010, "AS"),  # PatientAge
    (0x00101020, "DS"),  # PatientSize
    (0x00101030, "DS"),  # PatientWeight
    (0x00102180, "SH"),  # Occupation
    (0x001021B0, "LT"),  # AdditionalPatientHistory
    (0x00201070, "IS"),  # OtherStudyNumbers (retired, still sent)
    (0x00321032, "PN"),  # RequestingPhysician
    (0x00321060, "LO"),  # RequestedProcedureDescription
    (0x00080005, "CS"),  # SpecificCharacterSet (kept so names decode as stored)
    (0x00080201, "SH"),  # TimezoneOffsetFromUTC
)
_SERIES_EXTRA = (
    (0x00080070, "LO"),  # Manufacturer
    (0x00081010, "SH"),  # StationName
    (0x00081040, "LO"),  # InstitutionalDepartmentName
    (0x00081050, "PN"),  # PerformingPhysicianName
    (0x00081070, "PN"),  # OperatorsName
    (0x00081090, "LO"),  # ManufacturerModelName
    (0x00081111, "SQ"),  # ReferencedPerformedProcedureStepSequence
    (0x00180015, "CS"),  # BodyPartExamined
    (0x00181030, "LO"),  # ProtocolName
    (0x00185100, "CS"),  # PatientPosition
    (0x00200060, "CS"),  # Laterality
    (0x00400253, "SH"),  # PerformedProcedureStepID
    (0x00400254, "LO"),  # PerformedProcedureStepDescription
    (0x00400275, "SQ"),  # RequestAttributesSequence
    (0x00080005, "CS"),
    (0x00080201, "SH"),
)
_INSTANCE_EXTRA = (
    (0x00080008, "CS"),  # ImageType
    (0x00280010, "US"),  # Rows
    (0x00280011, "US"),  # Columns
    (0x00280100, "US"),  # BitsAllocated
    (0x00280008, "IS"),  # NumberOfFrames
    (0x00080005, "CS"),
)

LEVEL_TAGS: dict[Level, frozenset[int]] = {
    P: frozenset(k.tag for k in INDEXED_KEYS if k.level is P),
    ST: frozenset([k.tag for k in INDEXED_KEYS if k.level is ST] + [t for t, _ in _STUDY_EXTRA]),
    SE: frozenset([k.tag for k in INDEXED_KEYS if k.level is SE] + [t for t, _ in _SERIES_EXTRA]),
    IM: frozenset([k.tag for k in INDEXED_KEYS if k.level is IM] + [t for t, _ in _INSTANCE_EXTRA]),
}

COMPUTED_KEYS: tuple[Key, ...] = (
    Key("NumberOfPatientRelatedStudies", 0x00201200, "IS", P, Match.COMPUTED),
    Key("NumberOfPatientRelatedSeries", 0x00201202, "IS", P, Match.COMPUTED),
    Key("NumberOfPatientRelatedInstances", 0x00201204, "IS", P, Match.COMPUTED),
    Key("NumberOfStudyRelatedSeries", 0x00201206, "IS", ST, Match.COMPUTED),
    Key("NumberOfStudyRelatedInstances", 0x00201208, "IS", ST, Match.COMPUTED),
    Key("NumberOfSeriesRelatedInstances", 0x00201209, "IS", SE, Match.COMPUTED),
    Key("ModalitiesInStudy", 0x00080061, "CS", ST, Match.COMPUTED),
    Key("SOPClassesInStudy", 0x00080062, "UI", ST, Match.COMPUTED),
)

BY_TAG: dict[int, Key] = {k.tag: k for k in INDEXED_KEYS + COMPUTED_KEYS}


def level_of(tag: int) -> Level | None:
    """The level whose stored JSON holds `tag`; patient attributes are group 0010 (PS3.3 C.7.1)."""
    if (key := BY_TAG.get(tag)) is not None:
        return key.level
    for level in (P, ST, SE, IM):
        if tag in LEVEL_TAGS[level]:
            return level
    if tag >> 16 == 0x0010:
        return P
    return None
