"""C-FIND against a live vna, with answers derived from PS3.4 C.2.2.2 and C.6, not from the server.

One server and one deliberately designed data set serve the whole module: 5 patients (ASCII, Latin-1,
ISO 2022 IR 87 and UTF-8 names), 6 studies, 9 series and 14 instances whose dates, times, numbers,
modalities and sequences are chosen so that each matching type separates a known subset. The table
`CASES` holds one query per row with the PS3.4 clause that decides its answer; every row also checks
that a response carries exactly the requested keys (PS3.4 C.4.1.1.3.2). Further tests cover computed
attributes, Specific Character Set, C-CANCEL, invalid identifiers, and dcmtk's findscu in both models.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pydicom
import pytest
from pydicom.data import get_charset_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import PersonName
from pynetdicom import AE
from pynetdicom.sop_class import (CTImageStorage, MRImageStorage, PatientRootQueryRetrieveInformationModelFind,
                                  SecondaryCaptureImageStorage, StudyRootQueryRetrieveInformationModelFind)

from archive.database import migrate
from archive.index import Index
from archive.objectstore import FileSystemStore
from gateway.runtime import Runtime
from tests.conftest import DCMTK, make_ingestor, run_tool, settings_for

PATIENT_ROOT = str(PatientRootQueryRetrieveInformationModelFind)
STUDY_ROOT = str(StudyRootQueryRetrieveInformationModelFind)
CT, MR, SC = str(CTImageStorage), str(MRImageStorage), str(SecondaryCaptureImageStorage)
PENDING = (0xFF00, 0xFF01)

# The Japanese name and its character sets, as pydicom's charset test file chrH31.dcm has them (PS3.5 H.3.1).
_H31 = pydicom.dcmread(get_charset_files("chrH31.dcm")[0])
JAPANESE_NAME = str(_H31.PatientName)   # 'Yamada^Tarou=山田^太郎=やまだ^たろう'
JAPANESE_CHARSET = list(_H31.SpecificCharacterSet)  # ['', 'ISO 2022 IR 87']

# -- the data set ---------------------------------------------------------------------------------

PATIENTS: dict[str, tuple[str, Any, str, str]] = {
    # Patient ID: (name, Specific Character Set, birth date, sex)
    "PID1": ("Doe^John", None, "19700101", "M"),
    "PID2": ("Müller^Jürgen", "ISO_IR 100", "19801231", "M"),
    "PID3": (JAPANESE_NAME, JAPANESE_CHARSET, "19600101", "M"),
    "PID4": ("Gonçalves^Inês", "ISO_IR 192", "19900615", "F"),
    "PID5": ("Doering^Max", None, "", "O"),
}
STUDIES: dict[str, tuple[str, str, str, str, str, str, str, list[tuple[str, str]]]] = {
    # label: (patient, date, time, accession, study ID, description, referring physician, procedure codes)
    "ST1": ("PID1", "20200115", "093000", "ACC001", "1", "CT Chest", "Smith^Anna", [("CTCHEST", "LOCAL")]),
    "ST2": ("PID1", "20210610", "141500", "ACC002", "2", "MR Knee", "Jones^Bob",
            [("MRKNEE", "LOCAL"), ("ZZ99", "OTHER")]),
    "ST3": ("PID2", "20211231", "235959", "ACC003", "3", "CT/MR Head", "smith^anna",
            [("CTHEAD", "LOCAL"), ("MRHEAD", "LOCAL")]),
    "ST4": ("PID3", "20190301", "080000", "ACC010", "4", "", "", []),
    "ST5": ("PID4", "20220101", "000000", "ACC011", "5", "CT Abdomen", "SMITH^ANNA", [("CTABD", "LOCAL")]),
    "ST6": ("PID5", "20200116", "120000", "ACC100", "6", "CT Chest follow-up", "", [("CTCHEST", "LOCAL")]),
}
SERIES: dict[str, tuple[str, str, int, str, str, str, str, str, list[tuple[str, str]]]] = {
    # label: (study, modality, number, date, time, description, body part, manufacturer,
    #         request attributes (Requested Procedure ID, Scheduled Procedure Step ID))
    "SE1a": ("ST1", "CT", 1, "20200115", "093500", "Axial", "CHEST", "ACME Medical", [("RP1", "SPS1")]),
    "SE1b": ("ST1", "OT", 2, "20200115", "094000", "Report capture", "", "Scanner Corp", []),
    "SE2a": ("ST2", "MR", 1, "20210610", "141600", "T1 sag", "KNEE", "ACME Medical",
             [("RP2", "SPS2"), ("RP3", "SPS3")]),
    "SE2b": ("ST2", "MR", 2, "20210610", "142000", "T2 cor", "KNEE", "ACME Medical", []),
    "SE3a": ("ST3", "CT", 1, "20211231", "235959", "Head axial", "HEAD", "Other Inc", []),
    "SE3b": ("ST3", "MR", 2, "20220101", "001000", "Head T1", "HEAD", "ACME Medical", [("RP4", "XSPS4")]),
    "SE4a": ("ST4", "OT", 1, "", "", "", "", "", []),
    "SE5a": ("ST5", "CT", 1, "20220101", "000100", "Abdomen", "ABDOMEN", "acme medical", []),
    "SE6a": ("ST6", "CT", 3, "20200116", "120500", "Axial", "CHEST", "ACME Medical", []),
}
INSTANCES: dict[str, tuple[str, str, int, str, str, str, str, str]] = {
    # label: (series, SOP class, number, content date, content time, acquisition date-time,
    #         acquisition time, image comments)
    "I1a1": ("SE1a", CT, 1, "20200115", "093501", "20200115093501", "093501.5", "with contrast"),
    "I1a2": ("SE1a", CT, 2, "20200115", "093502", "20200115093502", "093502", "with contrast"),
    "I1a3": ("SE1a", CT, 3, "20200115", "093503", "20200115093503", "093503", ""),
    "I1b1": ("SE1b", SC, 1, "20200115", "094000", "", "", "scanned report"),
    "I2a1": ("SE2a", MR, 1, "20210610", "141601", "20210610141601.25", "141601", ""),
    "I2a2": ("SE2a", MR, 2, "20210610", "141602", "20210610141602", "141602", ""),
    "I2b1": ("SE2b", MR, 1, "20210610", "142001", "", "", ""),
    "I3a1": ("SE3a", CT, 1, "20220101", "000001", "20220101000001", "000001", "without contrast"),
    "I3a2": ("SE3a", CT, 2, "20220101", "000002", "20220101000002", "000002", ""),
    "I3b1": ("SE3b", MR, 1, "20220101", "001001", "", "", ""),
    "I4a1": ("SE4a", SC, 1, "20190301", "080001", "", "", ""),
    "I5a1": ("SE5a", CT, 1, "20220101", "000101", "20220101000101", "000101", ""),
    "I5a2": ("SE5a", CT, 2, "20220101", "000102", "20220101000102", "000102", ""),
    "I6a1": ("SE6a", CT, 7, "20200116", "120501", "20200116120501", "120501", ""),
}

ROOT = "1.2.826.0.1.3680043.8.498.1464.77"
UID = {label: f"{ROOT}.{kind}.{n}"
       for kind, table in ((1, STUDIES), (2, SERIES), (3, INSTANCES))
       for n, label in enumerate(table, start=1)}
LABEL = {uid: label for label, uid in UID.items()}


def _items(pairs: list[tuple[str, str]], first: str, second: str) -> Sequence:
    out = []
    for a, b in pairs:
        item = Dataset()
        setattr(item, first, a)
        setattr(item, second, b)
        out.append(item)
    return Sequence(out)


def instance_dataset(label: str) -> Dataset:
    series, sop_class, number, cdate, ctime, acq_dt, acq_time, comments = INSTANCES[label]
    study, modality, se_number, se_date, se_time, se_desc, body_part, manufacturer, requests = SERIES[series]
    patient, date, time, accession, study_id, description, referring, codes = STUDIES[study]
    name, charset, birth, sex = PATIENTS[patient]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, UID[label]
    ds.StudyInstanceUID, ds.SeriesInstanceUID = UID[study], UID[series]
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = name, patient, birth, sex
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = date, time, accession, study_id
    ds.StudyDescription, ds.ReferringPhysicianName = description, referring
    if codes:
        seq = _items(codes, "CodeValue", "CodingSchemeDesignator")
        for item in seq:
            item.CodeMeaning = f"meaning of {item.CodeValue}"
        ds.ProcedureCodeSequence = seq
    ds.Modality, ds.SeriesNumber, ds.SeriesDate, ds.SeriesTime = modality, se_number, se_date, se_time
    ds.SeriesDescription, ds.Manufacturer = se_desc, manufacturer
    if body_part:
        ds.BodyPartExamined = body_part
    if requests:
        ds.RequestAttributesSequence = _items(requests, "RequestedProcedureID", "ScheduledProcedureStepID")
    ds.InstanceNumber, ds.ContentDate, ds.ContentTime = number, cdate, ctime
    if acq_dt:
        ds.AcquisitionDateTime = acq_dt
    if acq_time:
        ds.AcquisitionDate, ds.AcquisitionTime = cdate, acq_time
    if comments:
        ds.ImageComments = comments
    return ds


def store_all(port: int, datasets: list[Dataset]) -> list[int]:
    """C-STORE every data set over one pynetdicom association (blocking: run it in a thread)."""
    ae = AE(ae_title="STORESCU")
    for sop_class in {str(ds.SOPClassUID) for ds in datasets}:
        ae.add_requested_context(sop_class, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    assoc = ae.associate("127.0.0.1", port, ae_title="VNA")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


# -- one server and one data set for the module -----------------------------------------------------

_dbs = itertools.count()


@pytest.fixture(scope="module")
async def archive(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Runtime]:
    """A running vna holding the data set above (module scope: built once, queried by every test)."""
    name = f"t_cfind_{os.getpid()}_{next(_dbs)}"
    admin = await asyncpg.connect(pg_dsn)
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        url = pg_dsn.rsplit("/", 1)[0] + "/" + name
        conn = await asyncpg.connect(url)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        async with Runtime(settings_for(tmp_path_factory.mktemp("cfind"), url, storage={"fsync": False})) as rt:
            assert rt.ports is not None
            statuses = await asyncio.to_thread(store_all, rt.ports.dicom,
                                               [instance_dataset(label) for label in INSTANCES])
            assert statuses == [0] * len(INSTANCES)
            yield rt
    finally:
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        await admin.close()


# -- a pynetdicom SCU ---------------------------------------------------------------------------------

@dataclass
class Answer:
    statuses: list[int]
    matches: list[Dataset]

    @property
    def final(self) -> int:
        return self.statuses[-1]


def c_find(port: int, model: str, identifier: Dataset) -> Answer:
    """One C-FIND over a fresh pynetdicom association (blocking: run it in a thread)."""
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(model, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    assoc = ae.associate("127.0.0.1", port, ae_title="VNA")
    assert assoc.is_established
    statuses, matches = [], []
    try:
        for status, ident in assoc.send_c_find(identifier, model):
            assert status is not None and "Status" in status, "no C-FIND-RSP within the DIMSE timeout"
            statuses.append(int(status.Status))
            if status.Status in PENDING:
                assert ident is not None
                matches.append(ident)
    finally:
        assoc.release()
    return Answer(statuses, matches)


def build_identifier(level: str, keys: dict[str, Any], charset: Any = None) -> Dataset:
    ds = Dataset()
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        if isinstance(value, list) and all(isinstance(v, dict) for v in value):
            items = []
            for sub in value:
                item = Dataset()
                for k, v in sub.items():
                    setattr(item, k, v)
                items.append(item)
            setattr(ds, keyword, Sequence(items))
        else:
            setattr(ds, keyword, value)
    return ds


UNIQUE_KEY = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
              "IMAGE": "SOPInstanceUID"}


def label_of(level: str, ident: Dataset) -> str:
    value = str(ident[UNIQUE_KEY[level]].value)
    return value if level == "PATIENT" else LABEL.get(value, value)


def plain(value: Any) -> Any:
    """A returned value in plain Python: str, list of str, or list of dicts for a sequence."""
    if isinstance(value, Sequence):
        return [{e.keyword: plain(e.value) for e in item} for item in value]
    if isinstance(value, (MultiValue, list)):
        return [str(v) for v in value]
    return "" if value is None else str(value)


def _has_non_ascii(ds: Dataset) -> bool:
    for elem in ds.iterall():
        if isinstance(elem.value, (str, PersonName)) and not str(elem.value).isascii():
            return True
    return False


def check_response_keys(request: Dataset, ident: Dataset) -> None:
    """PS3.4 C.4.1.1.3.2: a response holds the requested keys, the Query/Retrieve Level and, when a
    value needs it, Specific Character Set; nothing else (returned sequences hold requested sub-keys)."""
    wanted = {e.tag for e in request} | {Tag(0x00080052)}
    got = {e.tag for e in ident}
    assert got - {Tag(0x00080005)} == wanted - {Tag(0x00080005)}, (
        f"response keys {sorted(map(str, got))} differ from requested {sorted(map(str, wanted))}")
    assert ident.QueryRetrieveLevel == request.QueryRetrieveLevel
    if _has_non_ascii(ident):
        assert "SpecificCharacterSet" in ident, "non-ASCII values need Specific Character Set (PS3.5 6.1.2.3)"
    for elem in request:
        if elem.VR == "SQ" and len(elem.value):
            asked = {e.tag for e in elem.value[0]}
            for item in ident[elem.tag].value:
                assert {e.tag for e in item} <= asked, "a returned item holds only the requested sub-keys"


# -- the table --------------------------------------------------------------------------------------

P, S = "patient-root", "study-root"
MODEL = {P: PATIENT_ROOT, S: STUDY_ROOT}
ALL_PATIENTS = {"PID1", "PID2", "PID3", "PID4", "PID5"}
ALL_STUDIES = set(STUDIES)


@dataclass(frozen=True)
class Case:
    id: str
    model: str
    level: str
    keys: dict[str, Any]
    expected: set[str]
    cite: str
    returned: dict[str, dict[str, Any]] | None = None  # label -> keyword -> expected returned value
    charset: Any = None


def uids(*labels: str) -> list[str]:
    return [UID[label] for label in labels]


CASES: list[Case] = [
    # ---- Patient Root, PATIENT level ----
    Case("P-patient-single-id", P, "PATIENT", {"PatientID": "PID2", "PatientName": ""}, {"PID2"},
         "C.2.2.2.1 single value", {"PID2": {"PatientName": "Müller^Jürgen"}}),
    Case("P-patient-pn-case-insensitive", P, "PATIENT", {"PatientName": "DOE^JOHN"}, {"PID1"},
         "C.2.2.2.1: PN may match insensitive to case (vna does)", {"PID1": {"PatientName": "Doe^John"}}),
    Case("P-patient-pn-trailing-delimiters", P, "PATIENT", {"PatientName": "Doe^John^^"}, {"PID1"},
         "C.2.2.2.1 with PS3.5 6.2: trailing empty PN components are insignificant"),
    Case("P-patient-pn-single-is-not-prefix", P, "PATIENT", {"PatientName": "Doe"}, set(),
         "C.2.2.2.1: single value matching is the whole value, not a prefix"),
    Case("P-patient-wildcard-star", P, "PATIENT", {"PatientName": "Doe*"}, {"PID1", "PID5"},
         "C.2.2.2.4: * matches any sequence of characters"),
    Case("P-patient-wildcard-star-component", P, "PATIENT", {"PatientName": "doe^*"}, {"PID1"},
         "C.2.2.2.4"),
    Case("P-patient-wildcard-question", P, "PATIENT", {"PatientName": "?oe^Joh?"}, {"PID1"},
         "C.2.2.2.4: ? matches exactly one character"),
    Case("P-patient-wildcard-question-no-match", P, "PATIENT", {"PatientName": "?Doe^John"}, set(),
         "C.2.2.2.4: ? needs one character"),
    Case("P-patient-lone-star-universal", P, "PATIENT", {"PatientName": "*"}, ALL_PATIENTS,
         "C.2.2.2.4: a lone * is universal matching"),
    Case("P-patient-universal", P, "PATIENT", {"PatientID": "", "PatientBirthDate": ""}, ALL_PATIENTS,
         "C.2.2.2.3: zero-length key matches every entity and is returned",
         {"PID5": {"PatientBirthDate": ""}, "PID3": {"PatientBirthDate": "19600101"}}),
    Case("P-patient-birth-date-single", P, "PATIENT", {"PatientBirthDate": "19801231"}, {"PID2"},
         "C.2.2.2.1 on DA"),
    Case("P-patient-birth-date-closed-range", P, "PATIENT", {"PatientBirthDate": "19650101-19801231"},
         {"PID1", "PID2"}, "C.2.2.2.5: <date1>-<date2> inclusive"),
    Case("P-patient-birth-date-open-start", P, "PATIENT", {"PatientBirthDate": "-19700101"}, {"PID3", "PID1"},
         "C.2.2.2.5: -<date> is on or before"),
    Case("P-patient-birth-date-open-end", P, "PATIENT", {"PatientBirthDate": "19850101-"}, {"PID4"},
         "C.2.2.2.5: <date>- is on or after; an entity without a value does not match"),
    Case("P-patient-and", P, "PATIENT", {"PatientName": "Doe*", "PatientSex": "M"}, {"PID1"},
         "C.2.2.2: an entity matches only if every key matches"),
    Case("P-patient-no-match", P, "PATIENT", {"PatientID": "NOPE", "PatientName": ""}, set(), "C.2.2.2.1"),
    Case("P-patient-latin1-upper", P, "PATIENT", {"PatientName": "MÜLLER^JÜRGEN"}, {"PID2"},
         "C.2.2.2.1 PN case-insensitive beyond ASCII", charset="ISO_IR 100"),
    Case("P-patient-latin1-wildcard", P, "PATIENT", {"PatientName": "Mü*"}, {"PID2"}, "C.2.2.2.4",
         charset="ISO_IR 100"),
    Case("P-patient-latin1-question", P, "PATIENT", {"PatientName": "M?ller^J?rgen"}, {"PID2"},
         "C.2.2.2.4: ? is one character, also a non-ASCII one", charset="ISO_IR 100"),
    Case("P-patient-iso2022-request", P, "PATIENT", {"PatientName": "Yamada^Tarou=山田^太郎=やまだ^たろう"},
         {"PID3"}, "C.2.2.2.1 with a request in ISO 2022 IR 87 (PS3.5 6.1.2.5)", charset=JAPANESE_CHARSET),
    Case("P-patient-utf8", P, "PATIENT", {"PatientName": "gonçalves^inês"}, {"PID4"}, "C.2.2.2.1",
         {"PID4": {"PatientName": "Gonçalves^Inês"}}, charset="ISO_IR 192"),
    Case("P-patient-japanese", P, "PATIENT", {"PatientName": "Yamada^Tarou"}, {"PID3"},
         "C.2.2.2.1 on the alphabetic group; all groups returned", {"PID3": {"PatientName": JAPANESE_NAME}}),
    Case("P-patient-number-of-studies", P, "PATIENT",
         {"PatientID": "PID*", "NumberOfPatientRelatedStudies": ""}, ALL_PATIENTS,
         "C.6.1.1.2 Table C.6-1 Number of Patient Related Studies",
         {"PID1": {"NumberOfPatientRelatedStudies": "2"}, "PID2": {"NumberOfPatientRelatedStudies": "1"}}),
    # ---- Patient Root, STUDY level ----
    Case("P-study-of-patient", P, "STUDY", {"PatientID": "PID1", "StudyInstanceUID": ""}, {"ST1", "ST2"},
         "C.4.1.3.1 hierarchical: unique key of the level above"),
    Case("P-study-uid-list", P, "STUDY", {"PatientID": "", "StudyInstanceUID": uids("ST1", "ST3", "ST5")},
         {"ST1", "ST3", "ST5"}, "C.2.2.2.2 list of UID matching"),
    Case("P-study-date-single", P, "STUDY", {"StudyDate": "20210610"}, {"ST2"}, "C.2.2.2.1 on DA"),
    Case("P-study-date-closed", P, "STUDY", {"StudyDate": "20200101-20201231"}, {"ST1", "ST6"}, "C.2.2.2.5"),
    Case("P-study-date-open-start", P, "STUDY", {"StudyDate": "-20200115"}, {"ST4", "ST1"}, "C.2.2.2.5"),
    Case("P-study-date-open-end", P, "STUDY", {"StudyDate": "20211231-"}, {"ST3", "ST5"}, "C.2.2.2.5"),
    Case("P-study-time-single", P, "STUDY", {"StudyTime": "141500"}, {"ST2"}, "C.2.2.2.1 on TM"),
    Case("P-study-time-closed", P, "STUDY", {"StudyTime": "090000-120000"}, {"ST1", "ST6"},
         "C.2.2.2.5 on TM, inclusive"),
    Case("P-study-time-open-start", P, "STUDY", {"StudyTime": "-090000"}, {"ST4", "ST5"}, "C.2.2.2.5 on TM"),
    Case("P-study-time-open-end", P, "STUDY", {"StudyTime": "140000-"}, {"ST2", "ST3"}, "C.2.2.2.5 on TM"),
    Case("P-study-accession-question", P, "STUDY", {"AccessionNumber": "ACC00?"}, {"ST1", "ST2", "ST3"},
         "C.2.2.2.4"),
    Case("P-study-accession-star", P, "STUDY", {"AccessionNumber": "ACC01*"}, {"ST4", "ST5"}, "C.2.2.2.4"),
    Case("P-study-description-wildcard", P, "STUDY", {"StudyDescription": "*Chest*"}, {"ST1", "ST6"},
         "C.2.2.2.4: * also at the start"),
    Case("P-study-description-case-sensitive", P, "STUDY", {"StudyDescription": "*chest*"}, set(),
         "C.2.2.2.4: only PN may ignore case; LO matches case-sensitively"),
    Case("P-study-description-lone-star", P, "STUDY", {"StudyDescription": "*"}, ALL_STUDIES,
         "C.2.2.2.4: lone * is universal, so ST4 without a description matches", {"ST4": {"StudyDescription": ""}}),
    Case("P-study-referring-pn", P, "STUDY", {"ReferringPhysicianName": "Smith^Anna"}, {"ST1", "ST3", "ST5"},
         "C.2.2.2.1 PN case-insensitive", {"ST3": {"ReferringPhysicianName": "smith^anna"}}),
    Case("P-study-id", P, "STUDY", {"StudyID": "3"}, {"ST3"}, "C.2.2.2.1"),
    Case("P-study-higher-level-key", P, "STUDY", {"PatientName": "Müller*", "StudyInstanceUID": ""}, {"ST3"},
         "C.4.1.3.2 relational: a patient key at the study level", charset="ISO_IR 100"),
    Case("P-study-sequence", P, "STUDY", {"ProcedureCodeSequence": [{"CodeValue": "CTHEAD",
                                                                     "CodingSchemeDesignator": ""}]},
         {"ST3"}, "C.2.2.2.6: only matching items, only requested sub-keys, are returned",
         {"ST3": {"ProcedureCodeSequence": [{"CodeValue": "CTHEAD", "CodingSchemeDesignator": "LOCAL"}]}}),
    Case("P-study-sequence-two-subkeys", P, "STUDY",
         {"ProcedureCodeSequence": [{"CodeValue": "MR*", "CodingSchemeDesignator": "LOCAL"}]}, {"ST2", "ST3"},
         "C.2.2.2.6 with C.2.2.2.4 inside the item",
         {"ST2": {"ProcedureCodeSequence": [{"CodeValue": "MRKNEE", "CodingSchemeDesignator": "LOCAL"}]}}),
    Case("P-study-sequence-same-item", P, "STUDY",
         {"ProcedureCodeSequence": [{"CodeValue": "ZZ99", "CodingSchemeDesignator": "LOCAL"}]}, set(),
         "C.2.2.2.6: all item keys must match in one item (ST2 has ZZ99 only with OTHER)"),
    Case("P-study-sequence-universal", P, "STUDY", {"PatientID": "PID1", "ProcedureCodeSequence": []},
         {"ST1", "ST2"}, "C.2.2.2.6: a zero-length sequence key returns the whole sequence",
         {"ST2": {"ProcedureCodeSequence": [
             {"CodeValue": "MRKNEE", "CodingSchemeDesignator": "LOCAL", "CodeMeaning": "meaning of MRKNEE"},
             {"CodeValue": "ZZ99", "CodingSchemeDesignator": "OTHER", "CodeMeaning": "meaning of ZZ99"}]}}),
    Case("P-study-modalities-ct", P, "STUDY", {"ModalitiesInStudy": "CT"}, {"ST1", "ST3", "ST5", "ST6"},
         "C.6.1.1.3 Modalities in Study: a study with any CT series matches; all its modalities returned",
         {"ST1": {"ModalitiesInStudy": ["CT", "OT"]}, "ST3": {"ModalitiesInStudy": ["CT", "MR"]},
          "ST5": {"ModalitiesInStudy": "CT"}}),
    Case("P-study-modalities-mr", P, "STUDY", {"ModalitiesInStudy": "MR"}, {"ST2", "ST3"}, "C.6.1.1.3"),
    Case("P-study-and", P, "STUDY", {"PatientName": "Doe*", "StudyDate": "20200101-20201231",
                                     "ModalitiesInStudy": "CT"}, {"ST1", "ST6"}, "C.2.2.2: AND of keys"),
    Case("P-study-no-match", P, "STUDY", {"StudyDate": "20300101-"}, set(), "C.2.2.2.5"),
    # ---- Patient Root, SERIES level ----
    Case("P-series-of-study", P, "SERIES", {"PatientID": "PID1", "StudyInstanceUID": UID["ST1"],
                                            "SeriesInstanceUID": ""}, {"SE1a", "SE1b"}, "C.4.1.3.1"),
    Case("P-series-uid-list", P, "SERIES", {"SeriesInstanceUID": uids("SE2b", "SE6a")}, {"SE2b", "SE6a"},
         "C.2.2.2.2"),
    Case("P-series-modality", P, "SERIES", {"Modality": "CT"}, {"SE1a", "SE3a", "SE5a", "SE6a"}, "C.2.2.2.1"),
    Case("P-series-modality-question", P, "SERIES", {"Modality": "?T"},
         {"SE1a", "SE1b", "SE3a", "SE4a", "SE5a", "SE6a"}, "C.2.2.2.4"),
    Case("P-series-number", P, "SERIES", {"SeriesNumber": "2"}, {"SE1b", "SE2b", "SE3b"}, "C.2.2.2.1 on IS"),
    Case("P-series-date-closed", P, "SERIES", {"SeriesDate": "20211231-20220101"}, {"SE3a", "SE3b", "SE5a"},
         "C.2.2.2.5"),
    Case("P-series-time-open-start", P, "SERIES", {"SeriesTime": "-000100"}, {"SE5a"}, "C.2.2.2.5 on TM"),
    Case("P-series-description", P, "SERIES", {"SeriesDescription": "Axial"}, {"SE1a", "SE6a"},
         "C.2.2.2.1: exact, so 'Head axial' does not match"),
    Case("P-series-body-part", P, "SERIES", {"BodyPartExamined": "KNEE"}, {"SE2a", "SE2b"}, "C.2.2.2.1"),
    Case("P-series-stored-json-wildcard", P, "SERIES", {"Manufacturer": "ACME*"},
         {"SE1a", "SE2a", "SE2b", "SE3b", "SE6a"}, "C.2.2.2.4 on a key without an index column"),
    Case("P-series-universal-empty-value", P, "SERIES", {"StudyInstanceUID": UID["ST4"], "SeriesDate": "",
                                                         "Modality": ""}, {"SE4a"}, "C.2.2.2.3",
         {"SE4a": {"SeriesDate": "", "Modality": "OT"}}),
    Case("P-series-sequence", P, "SERIES", {"RequestAttributesSequence": [{"RequestedProcedureID": "RP3"}]},
         {"SE2a"}, "C.2.2.2.6", {"SE2a": {"RequestAttributesSequence": [{"RequestedProcedureID": "RP3"}]}}),
    Case("P-series-sequence-wildcard", P, "SERIES",
         {"RequestAttributesSequence": [{"ScheduledProcedureStepID": "SPS*", "RequestedProcedureID": ""}]},
         {"SE1a", "SE2a"}, "C.2.2.2.6 with C.2.2.2.4; universal sub-key returned",
         {"SE2a": {"RequestAttributesSequence": [
             {"RequestedProcedureID": "RP2", "ScheduledProcedureStepID": "SPS2"},
             {"RequestedProcedureID": "RP3", "ScheduledProcedureStepID": "SPS3"}]}}),
    Case("P-series-number-of-instances", P, "SERIES", {"StudyInstanceUID": UID["ST1"],
                                                       "NumberOfSeriesRelatedInstances": ""}, {"SE1a", "SE1b"},
         "C.6.1.1.4 Number of Series Related Instances",
         {"SE1a": {"NumberOfSeriesRelatedInstances": "3"}, "SE1b": {"NumberOfSeriesRelatedInstances": "1"}}),
    Case("P-series-higher-level-keys", P, "SERIES", {"PatientName": "yamada*", "StudyDate": ""}, {"SE4a"},
         "C.4.1.3.2 relational", {"SE4a": {"PatientName": JAPANESE_NAME, "StudyDate": "20190301"}}),
    Case("P-series-and", P, "SERIES", {"Modality": "CT", "SeriesDate": "-20200131"}, {"SE1a", "SE6a"},
         "C.2.2.2"),
    Case("P-series-no-match", P, "SERIES", {"Modality": "US"}, set(), "C.2.2.2.1"),
    # ---- Patient Root, IMAGE level ----
    Case("P-image-of-series", P, "IMAGE", {"PatientID": "PID1", "StudyInstanceUID": UID["ST1"],
                                           "SeriesInstanceUID": UID["SE1a"], "SOPInstanceUID": ""},
         {"I1a1", "I1a2", "I1a3"}, "C.4.1.3.1"),
    Case("P-image-uid-list", P, "IMAGE", {"SOPInstanceUID": uids("I1b1", "I4a1", "I6a1")},
         {"I1b1", "I4a1", "I6a1"}, "C.2.2.2.2"),
    Case("P-image-sop-class", P, "IMAGE", {"SOPClassUID": SC}, {"I1b1", "I4a1"}, "C.2.2.2.1 on UI"),
    Case("P-image-number", P, "IMAGE", {"InstanceNumber": "2"}, {"I1a2", "I2a2", "I3a2", "I5a2"}, "C.2.2.2.1"),
    Case("P-image-content-date", P, "IMAGE", {"ContentDate": "20220101"},
         {"I3a1", "I3a2", "I3b1", "I5a1", "I5a2"}, "C.2.2.2.1 on DA"),
    Case("P-image-content-time-range", P, "IMAGE", {"ContentTime": "000000-000102"},
         {"I3a1", "I3a2", "I5a1", "I5a2"}, "C.2.2.2.5 on TM, inclusive upper bound"),
    Case("P-image-datetime-closed", P, "IMAGE", {"AcquisitionDateTime": "20200115093501-20200115093502"},
         {"I1a1", "I1a2"}, "C.2.2.2.5 on DT"),
    Case("P-image-datetime-open-start", P, "IMAGE", {"AcquisitionDateTime": "-20200115235959"},
         {"I1a1", "I1a2", "I1a3"}, "C.2.2.2.5 on DT; instances without a value do not match"),
    Case("P-image-datetime-open-end", P, "IMAGE", {"AcquisitionDateTime": "20220101000102-"}, {"I5a2"},
         "C.2.2.2.5 on DT"),
    Case("P-image-datetime-single", P, "IMAGE", {"AcquisitionDateTime": "20210610141601.250000"}, {"I2a1"},
         "C.2.2.2.1 on DT"),
    Case("P-image-stored-json-time-range", P, "IMAGE", {"AcquisitionTime": "093501-093502"},
         {"I1a1", "I1a2"}, "C.2.2.2.5 on TM without an index column (093501.5 is inside)"),
    Case("P-image-stored-json-wildcard", P, "IMAGE", {"ImageComments": "*contrast"},
         {"I1a1", "I1a2", "I3a1"}, "C.2.2.2.4 on LT from the instance's stored metadata",
         {"I3a1": {"ImageComments": "without contrast"}}),
    Case("P-image-higher-level-key", P, "IMAGE", {"Modality": "MR", "InstanceNumber": "1"},
         {"I2a1", "I2b1", "I3b1"}, "C.4.1.3.2 relational"),
    Case("P-image-universal", P, "IMAGE", {"SeriesInstanceUID": UID["SE1b"], "AcquisitionDateTime": "",
                                           "InstanceNumber": ""}, {"I1b1"}, "C.2.2.2.3",
         {"I1b1": {"AcquisitionDateTime": "", "InstanceNumber": "1"}}),
    Case("P-image-no-match", P, "IMAGE", {"ContentDate": "19990101"}, set(), "C.2.2.2.1"),
    # ---- Study Root, STUDY level ----
    Case("S-study-patient-name", S, "STUDY", {"PatientName": "Doe^John", "PatientID": ""}, {"ST1", "ST2"},
         "C.6.2.1.2: patient attributes are study-level keys in Study Root"),
    Case("S-study-universal", S, "STUDY", {"StudyInstanceUID": "", "PatientID": ""}, ALL_STUDIES,
         "C.2.2.2.3", {"ST4": {"PatientID": "PID3"}}),
    Case("S-study-accession", S, "STUDY", {"AccessionNumber": "ACC003"}, {"ST3"}, "C.2.2.2.1"),
    Case("S-study-uid-list", S, "STUDY", {"StudyInstanceUID": uids("ST2", "ST4")}, {"ST2", "ST4"},
         "C.2.2.2.2"),
    Case("S-study-date-and-time", S, "STUDY", {"StudyDate": "20200115", "StudyTime": "090000-100000"}, {"ST1"},
         "C.2.2.2.5: date and time keys matched independently"),
    Case("S-study-birth-date-range", S, "STUDY", {"PatientBirthDate": "-19751231"}, {"ST1", "ST2", "ST4"},
         "C.2.2.2.5 on a patient attribute at the study level"),
    Case("S-study-modalities-ot", S, "STUDY", {"ModalitiesInStudy": "OT"}, {"ST1", "ST4"}, "C.6.2.1.2"),
    Case("S-study-counts", S, "STUDY", {"StudyInstanceUID": uids("ST1", "ST3"),
                                        "NumberOfStudyRelatedSeries": "", "NumberOfStudyRelatedInstances": "",
                                        "ModalitiesInStudy": ""}, {"ST1", "ST3"},
         "C.6.2.1.2 Table C.6-5 computed attributes",
         {"ST1": {"NumberOfStudyRelatedSeries": "2", "NumberOfStudyRelatedInstances": "4",
                  "ModalitiesInStudy": ["CT", "OT"]},
          "ST3": {"NumberOfStudyRelatedSeries": "2", "NumberOfStudyRelatedInstances": "3",
                  "ModalitiesInStudy": ["CT", "MR"]}}),
    Case("S-study-patient-counts", S, "STUDY", {"PatientID": "PID1", "NumberOfPatientRelatedStudies": ""},
         {"ST1", "ST2"}, "C.6.2.1.2 Table C.6-5",
         {"ST1": {"NumberOfPatientRelatedStudies": "2"}}),
    Case("S-study-sequence", S, "STUDY", {"ProcedureCodeSequence": [{"CodeValue": "CTCHEST"}]}, {"ST1", "ST6"},
         "C.2.2.2.6"),
    Case("S-study-and", S, "STUDY", {"ReferringPhysicianName": "smith*", "ModalitiesInStudy": "MR"}, {"ST3"},
         "C.2.2.2"),
    Case("S-study-no-match", S, "STUDY", {"PatientName": "Nobody*"}, set(), "C.2.2.2.4"),
    # ---- Study Root, SERIES level ----
    Case("S-series-of-study", S, "SERIES", {"StudyInstanceUID": UID["ST3"], "SeriesInstanceUID": "",
                                            "Modality": ""}, {"SE3a", "SE3b"}, "C.4.1.3.1",
         {"SE3b": {"Modality": "MR"}}),
    Case("S-series-patient-name", S, "SERIES", {"PatientName": "Doe*", "Modality": "MR"}, {"SE2a", "SE2b"},
         "C.4.1.3.2 relational: a study-level (patient) key at the series level"),
    Case("S-series-study-date", S, "SERIES", {"StudyDate": "20220101-"}, {"SE5a"}, "C.2.2.2.5"),
    Case("S-series-time-closed", S, "SERIES", {"SeriesTime": "093500-141600"}, {"SE1a", "SE1b", "SE2a", "SE6a"},
         "C.2.2.2.5 on TM"),
    Case("S-series-uid-list", S, "SERIES", {"SeriesInstanceUID": uids("SE1a", "SE3b", "SE5a")},
         {"SE1a", "SE3b", "SE5a"}, "C.2.2.2.2"),
    Case("S-series-latin1", S, "SERIES", {"PatientName": "müller^jürgen", "SeriesNumber": "2"}, {"SE3b"},
         "C.2.2.2.1", charset="ISO_IR 100"),
    Case("S-series-no-match", S, "SERIES", {"StudyInstanceUID": UID["ST1"], "Modality": "MR"}, set(),
         "C.2.2.2"),
    # ---- Study Root, IMAGE level ----
    Case("S-image-of-series", S, "IMAGE", {"StudyInstanceUID": UID["ST2"], "SeriesInstanceUID": UID["SE2a"],
                                           "SOPInstanceUID": ""}, {"I2a1", "I2a2"}, "C.4.1.3.1"),
    Case("S-image-patient-name", S, "IMAGE", {"PatientName": "Gonçalves*", "InstanceNumber": "2"}, {"I5a2"},
         "C.4.1.3.2 relational", charset="ISO_IR 192"),
    Case("S-image-time-open-start", S, "IMAGE", {"ContentTime": "-000001"}, {"I3a1"}, "C.2.2.2.5 on TM"),
    Case("S-image-datetime-closed", S, "IMAGE", {"AcquisitionDateTime": "20200116000000-20211231235959"},
         {"I2a1", "I2a2", "I6a1"}, "C.2.2.2.5 on DT"),
    Case("S-image-number-of-series-instances", S, "IMAGE",
         {"SOPInstanceUID": UID["I3b1"], "NumberOfSeriesRelatedInstances": "", "ModalitiesInStudy": ""},
         {"I3b1"}, "C.6.2.1.2-4: computed keys of the levels above",
         {"I3b1": {"NumberOfSeriesRelatedInstances": "1", "ModalitiesInStudy": ["CT", "MR"]}}),
    Case("S-image-no-match", S, "IMAGE", {"StudyInstanceUID": UID["ST4"], "SOPClassUID": CT}, set(), "C.2.2.2"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_matching(archive: Runtime, case: Case) -> None:
    assert archive.ports is not None
    keys = dict(case.keys)
    keys.setdefault(UNIQUE_KEY[case.level], "")
    request = build_identifier(case.level, keys, case.charset)
    answer = await asyncio.to_thread(c_find, archive.ports.dicom, MODEL[case.model], request)
    # PS3.4 C.4.1.1.4: one Pending per match, then Success
    assert answer.final == 0x0000, f"final status {answer.final:04X}"
    assert all(s in PENDING for s in answer.statuses[:-1])
    got = [label_of(case.level, ident) for ident in answer.matches]
    assert sorted(got) == sorted(case.expected), f"{case.cite}: got {sorted(got)}, want {sorted(case.expected)}"
    for ident in answer.matches:
        check_response_keys(request, ident)
    by_label = dict(zip(got, answer.matches))
    for label, values in (case.returned or {}).items():
        for keyword, want in values.items():
            assert plain(by_label[label][keyword].value) == want, f"{label} {keyword}"


# -- Specific Character Set -------------------------------------------------------------------------

async def test_specific_character_set_latin1_query(archive: Runtime) -> None:
    """PS3.4 C.4.1.1.3.1/3.2 and PS3.5 6.1.2.3: a query in ISO_IR 100 matches the name stored in
    ISO_IR 100, and the response declares a character set in which its bytes decode to that name."""
    assert archive.ports is not None
    request = build_identifier("PATIENT", {"PatientName": "Müller^Jürgen", "PatientID": ""}, "ISO_IR 100")
    answer = await asyncio.to_thread(c_find, archive.ports.dicom, PATIENT_ROOT, request)
    assert answer.final == 0x0000
    [match] = answer.matches
    assert match.PatientID == "PID2"
    assert str(match.PatientName) == "Müller^Jürgen"
    charset = match.SpecificCharacterSet
    assert charset in ("ISO_IR 100", "ISO_IR 192")
    raw = match.PatientName.original_string
    assert raw.decode("latin-1" if charset == "ISO_IR 100" else "utf-8") == "Müller^Jürgen"


async def test_specific_character_set_japanese_answer(archive: Runtime) -> None:
    """A name stored in ISO 2022 IR 87 (PS3.5 H.3.1) found by an ASCII query comes back with all
    three component groups and a Specific Character Set that covers the ideographic ones."""
    assert archive.ports is not None
    request = build_identifier("STUDY", {"PatientName": "YAMADA^*", "StudyInstanceUID": ""})
    answer = await asyncio.to_thread(c_find, archive.ports.dicom, STUDY_ROOT, request)
    [match] = answer.matches
    assert str(match.PatientName) == JAPANESE_NAME
    assert match.PatientName.ideographic == "山田^太郎"
    charsets = match.SpecificCharacterSet
    charsets = [charsets] if isinstance(charsets, str) else list(charsets)
    assert "ISO_IR 192" in charsets or "ISO 2022 IR 87" in charsets


async def test_ascii_answer_to_latin1_request(archive: Runtime) -> None:
    """An all-ASCII answer needs no Specific Character Set; if one is sent it must still decode it."""
    assert archive.ports is not None
    request = build_identifier("PATIENT", {"PatientID": "PID1", "PatientName": ""}, "ISO_IR 100")
    answer = await asyncio.to_thread(c_find, archive.ports.dicom, PATIENT_ROOT, request)
    [match] = answer.matches
    assert str(match.PatientName) == "Doe^John"
    check_response_keys(request, match)


# -- invalid identifiers --------------------------------------------------------------------------

@pytest.mark.parametrize("model,level", [(PATIENT_ROOT, "FOO"), (STUDY_ROOT, "PATIENT"), (PATIENT_ROOT, None),
                                         (STUDY_ROOT, "")],
                         ids=["unknown-level", "patient-level-in-study-root", "no-level", "empty-level"])
async def test_invalid_query_retrieve_level(archive: Runtime, model: str, level: str | None) -> None:
    """PS3.4 C.4.1.1.4 / C.4.1.2.1: an Identifier without a valid Query/Retrieve Level of the model
    (Study Root has no PATIENT level, C.6.2) fails: A900 (does not match SOP Class) or Cxxx, no match."""
    assert archive.ports is not None
    request = build_identifier("STUDY" if level is None else level, {"StudyInstanceUID": ""})
    if level is None:
        del request.QueryRetrieveLevel
    answer = await asyncio.to_thread(c_find, archive.ports.dicom, model, request)
    assert answer.matches == []
    assert len(answer.statuses) == 1
    assert answer.final == 0xA900 or answer.final & 0xF000 == 0xC000, f"{answer.final:04X}"


async def test_malformed_range_fails(archive: Runtime) -> None:
    """A date that is not PS3.5 DA cannot be range matched (C.2.2.2.5): a failure status, no match."""
    assert archive.ports is not None
    request = build_identifier("STUDY", {"StudyDate": "2020-01-15x", "StudyInstanceUID": ""})
    answer = await asyncio.to_thread(c_find, archive.ports.dicom, STUDY_ROOT, request)
    assert answer.matches == [] and len(answer.statuses) == 1
    assert answer.final == 0xA900 or answer.final & 0xF000 == 0xC000, f"{answer.final:04X}"


# -- C-CANCEL -------------------------------------------------------------------------------------

CANCEL_MATCHES = 600


def bulk_instances(n: int) -> list[Dataset]:
    """n CT instances of one series of one study (a C-FIND at IMAGE level with n matches)."""
    out = []
    for k in range(1, n + 1):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CT, f"{ROOT}.9.3.{k}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = f"{ROOT}.9.1", f"{ROOT}.9.2"
        ds.PatientName, ds.PatientID, ds.Modality, ds.InstanceNumber = "Many^Images", "PIDMANY", "CT", k
        out.append(ds)
    return out


def encoded(ds: Dataset) -> bytes:
    """The data set as a C-STORE carries it in Explicit VR Little Endian."""
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = False, True
    write_dataset(fp, ds)
    return fp.getvalue()


def find_then_cancel(port: int, identifier: Dataset) -> Answer:
    """C-FIND, and a C-CANCEL-RQ for it as soon as the first Pending response arrives."""
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(STUDY_ROOT, ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", port, ae_title="VNA")
    assert assoc.is_established
    context_id = assoc.accepted_contexts[0].context_id
    statuses, matches = [], []
    try:
        for status, ident in assoc.send_c_find(identifier, STUDY_ROOT, msg_id=41):
            assert status is not None and "Status" in status
            statuses.append(int(status.Status))
            if status.Status in PENDING:
                matches.append(ident)
                if len(matches) == 1:
                    assoc.send_c_cancel(41, context_id)
    finally:
        assoc.release()
    return Answer(statuses, matches)


async def test_c_cancel(vna: Runtime, index: Index, tmp_path: Path) -> None:
    """PS3.4 C.4.1.2.3 / PS3.7 9.3.2.3: a C-CANCEL-RQ stops a running C-FIND; its final response is
    Cancel (FE00), after fewer Pending responses than there are matches."""
    assert vna.ports is not None
    # Stored through the one ingest path in-process (the same database as `vna`): pynetdicom does not
    # set TCP_NODELAY, so 600 C-STOREs would each wait ~40 ms on a delayed ACK.
    ingestor = make_ingestor(index, FileSystemStore(tmp_path / "bulk", fsync=False))
    for ds in bulk_instances(CANCEL_MATCHES):
        await ingestor.ingest_dataset(encoded(ds), transfer_syntax_uid=ExplicitVRLittleEndian, protocol="dimse",
                                      source="test")
    request = build_identifier("IMAGE", {"StudyInstanceUID": f"{ROOT}.9.1", "SOPInstanceUID": ""})
    answer = await asyncio.to_thread(find_then_cancel, vna.ports.dicom, request)
    assert answer.final == 0xFE00, f"final status {answer.final:04X}"
    assert all(s in PENDING for s in answer.statuses[:-1])
    assert 1 <= len(answer.matches) < CANCEL_MATCHES
    # the same query, not cancelled, finds every instance: the cancel did not come from a short answer
    full = await asyncio.to_thread(c_find, vna.ports.dicom, STUDY_ROOT, request)
    assert full.final == 0x0000 and len(full.matches) == CANCEL_MATCHES


# -- dcmtk's findscu ------------------------------------------------------------------------------

FINDSCU_CASES = [
    # (id, findscu model flag, -k arguments, unique key, expected labels, returned values)
    ("P-patient-wildcard", "-P", ["QueryRetrieveLevel=PATIENT", "PatientName=doe*", "PatientID"], "PatientID",
     {"PID1", "PID5"}, {"PID5": {"PatientName": "Doering^Max"}}),
    ("P-image-datetime-range", "-P", ["QueryRetrieveLevel=IMAGE", "PatientID=PID1", f"StudyInstanceUID={UID['ST1']}",
                                      f"SeriesInstanceUID={UID['SE1a']}", "SOPInstanceUID",
                                      "AcquisitionDateTime=20200115093501-20200115093502"],
     "SOPInstanceUID", {"I1a1", "I1a2"}, {"I1a2": {"AcquisitionDateTime": "20200115093502"}}),
    ("S-study-modalities", "-S", ["QueryRetrieveLevel=STUDY", "ModalitiesInStudy=CT", "StudyInstanceUID",
                                  "NumberOfStudyRelatedInstances"], "StudyInstanceUID",
     {"ST1", "ST3", "ST5", "ST6"}, {"ST1": {"NumberOfStudyRelatedInstances": "4", "ModalitiesInStudy": ["CT", "OT"]},
                                    "ST6": {"NumberOfStudyRelatedInstances": "1"}}),
    # the name in ISO 8859-1 bytes (0xFC for ü) straight from the command line (surrogateescape -> raw byte)
    ("S-series-latin1", "-S", ["QueryRetrieveLevel=SERIES", "SpecificCharacterSet=ISO_IR 100",
                               "PatientName=M\udcfcller*", "SeriesInstanceUID", "Modality"], "SeriesInstanceUID",
     {"SE3a", "SE3b"}, {"SE3a": {"PatientName": "Müller^Jürgen", "Modality": "CT"}}),
]


@pytest.mark.parametrize("case", FINDSCU_CASES, ids=[c[0] for c in FINDSCU_CASES])
async def test_dcmtk_findscu(archive: Runtime, tmp_path: Path, case: tuple[Any, ...]) -> None:
    """dcmtk's findscu (-P Patient Root, -S Study Root) gets the answers PS3.4 C.2.2.2 prescribes;
    `-X -od` writes each response identifier to a file, read back here with pydicom."""
    assert archive.ports is not None
    _, model_flag, keys, unique, expected, returned = case
    out = tmp_path / "rsp"
    out.mkdir()
    args: list[str] = []
    for key in keys:
        args += ["-k", key]
    await run_tool(DCMTK / "findscu", model_flag, "-aet", "FINDSCU", "-aec", "VNA", "-X", "-od", out, *args,
                   "127.0.0.1", str(archive.ports.dicom))
    responses = [pydicom.dcmread(f, force=True) for f in sorted(out.glob("rsp*.dcm"))]
    level = next(k.split("=", 1)[1] for k in keys if k.startswith("QueryRetrieveLevel="))
    assert all(unique in ds for ds in responses)
    got = {label_of(level, ds) for ds in responses}
    assert got == expected and len(responses) == len(expected)
    requested = {pydicom.datadict.tag_for_keyword(k.split("=", 1)[0]) for k in keys}
    for ds in responses:
        assert {e.tag for e in ds} - {0x00080005} == requested - {0x00080005}, "only the requested keys"
    by_label = {label_of(level, ds): ds for ds in responses}
    for label, values in returned.items():
        for keyword, want in values.items():
            assert plain(by_label[label][keyword].value) == want, f"{label} {keyword}"
