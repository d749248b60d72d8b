"""QIDO-RS answers built by PostgreSQL (`Index.find_json`) hold what the Python-built answers (`Index.find`,
`row_to_json` over decoded jsonb, still C-FIND's path) hold: for the same `Query`, the same entities in the same
order, each with the same keys, VRs and values (compared as parsed JSON), the top-level keys in ascending tag
order as PS3.18 F.2 lays them out.

The data: test_cfind.py's data set (sequences, PN with several character sets, computed attributes) and the
largest group of test_corpus.py's corpus (pydicom's test files: real-world attributes, DS numbers, nested
sequences, bulk data in the instance metadata), stored over DIMSE and STOW-RS into one server. The queries:
every Study Root C-FIND case of test_cfind.py as QIDO-RS translates it (test_qido_cfind_parity.py), the
defaults and `includefield=all` at each level, per study and per series, includefield of attributes kept
only in an instance's whole metadata, every computed attribute, sequence matching, fuzzy matching and pages.
Over HTTP: the body is that array text, and the `Warning: 299` header is what it was.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from archive.attributes import Level
from archive.index import Index
from archive.jsontext import ascii_json
from gateway.runtime import Runtime, open_index
from gateway.web.qido import build_search
from tests import test_cfind
from tests.test_corpus import GROUPS
from tests.test_qido_cfind_parity import PARITY_CASES, qido_request, url_of
from tests.test_web_corpus import stow

STUDY_UID, SERIES_UID = 0x0020000D, 0x0020000E
DICOM_JSON = "application/dicom+json"
LEVEL = {"studies": Level.STUDY, "series": Level.SERIES, "instances": Level.IMAGE}

_cfind_archive = test_cfind.archive


@pytest.fixture(scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture(scope="module")
async def archive(_cfind_archive: Runtime, http: aiohttp.ClientSession) -> Runtime:
    """test_cfind's server and data set, with the corpus's largest group stored over STOW-RS as well."""
    files = GROUPS[0]
    for start in range(0, len(files), 8):
        await stow(http, _cfind_archive, files[start:start + 8])
    return _cfind_archive


@pytest.fixture(scope="module")
async def index(archive: Runtime) -> AsyncIterator[Index]:
    async with open_index(archive.settings) as idx:
        yield idx


def _request(path: str) -> tuple[Level, dict[int, str]]:
    """The level and path UIDs of a QIDO-RS path such as /studies/{study}/series."""
    parts = path.strip("/").split("/")
    uids: dict[int, str] = {}
    if len(parts) >= 3:
        uids[STUDY_UID] = parts[1]
    if len(parts) >= 5:
        uids[SERIES_UID] = parts[3]
    return LEVEL[parts[-1]], uids


async def both(index: Index, path: str, params: list[tuple[str, str]]) -> tuple[list[Any], str]:
    """(the Python-built answer as its JSON decodes, the SQL-built answer's text) for one request."""
    level, uids = _request(path)
    query = build_search(level, params, uids).query
    old = json.loads(json.dumps(await index.find(query, timeout=30)))
    return old, await index.find_json(query, timeout=30)


def check_same(old: list[Any], text: str, what: str) -> None:
    new = json.loads(text)
    assert new == old, what
    for obj in json.loads(text, object_pairs_hook=lambda pairs: pairs):
        tags = [tag for tag, _ in obj]
        assert tags == sorted(tags), f"{what}: keys not in ascending tag order"


async def _uids(index: Index, path: str, params: list[tuple[str, str]], tag: str) -> list[str]:
    old, _ = await both(index, path, params)
    return [obj[tag]["Value"][0] for obj in old]


async def test_parity_cases(index: Index) -> None:
    """Every Study Root C-FIND case of test_cfind.py, as its QIDO-RS request."""
    for case in PARITY_CASES:
        path, params = qido_request(case.level, case.keys)
        old, text = await both(index, path, params)
        assert old or case.expected == set(), f"{case.id}: no match"
        check_same(old, text, f"{case.id}: {path} {params}")


INSTANCE_EXTRAS = ("ImageType,WindowCenter,WindowWidth,PixelSpacing,ImagePositionPatient,ImageComments,"
                   "ReferencedImageSequence,Manufacturer,SliceThickness,AcquisitionDate,00431028")
COMPUTED = ("NumberOfPatientRelatedStudies,NumberOfPatientRelatedSeries,NumberOfPatientRelatedInstances,"
            "NumberOfStudyRelatedSeries,NumberOfStudyRelatedInstances,ModalitiesInStudy,SOPClassesInStudy")
SEARCHES: list[tuple[str, list[tuple[str, str]]]] = [
    ("/studies", []),
    ("/studies", [("includefield", "all")]),
    ("/studies", [("includefield", COMPUTED)]),
    ("/studies", [("includefield", "ProcedureCodeSequence,PatientAge,PatientWeight,OtherPatientIDsSequence")]),
    ("/studies", [("ProcedureCodeSequence.CodeValue", "MR*")]),
    ("/studies", [("ProcedureCodeSequence.CodeValue", "")]),
    ("/studies", [("ProcedureCodeSequence.CodingSchemeDesignator", "LOCAL"), ("includefield", "all")]),
    ("/studies", [("PatientName", "doe"), ("fuzzymatching", "true")]),
    ("/studies", [("ModalitiesInStudy", "CT,MR")]),
    ("/studies", [("limit", "3"), ("offset", "2")]),
    ("/studies", [("limit", "0")]),
    ("/studies", [("offset", "100000")]),
    ("/studies", [("StudyDate", "20200101-")]),
    ("/series", []),
    ("/series", [("includefield", "all")]),
    ("/series", [("includefield", COMPUTED + ",Manufacturer,RequestAttributesSequence")]),
    ("/series", [("RequestAttributesSequence.RequestedProcedureID", "*"),
                 ("RequestAttributesSequence.ScheduledProcedureStepID", "")]),
    ("/series", [("Modality", "CT"), ("limit", "2")]),
    ("/instances", []),
    ("/instances", [("includefield", "all")]),
    ("/instances", [("includefield", INSTANCE_EXTRAS)]),
    ("/instances", [("includefield", COMPUTED)]),
    ("/instances", [("ImageComments", "*")]),
    ("/instances", [("Rows", "512"), ("includefield", "Columns")]),
    ("/instances", [("limit", "10"), ("offset", "5"), ("includefield", "all")]),
]


async def test_searches(index: Index) -> None:
    for path, params in SEARCHES:
        old, text = await both(index, path, params)
        check_same(old, text, f"{path} {params}")
    # the corpus answers at all: the comparison is not between two empty arrays
    assert len(json.loads((await both(index, "/instances", []))[1])) > 100


async def test_every_study_and_series(index: Index) -> None:
    """Series and instances of each stored study, and instances of each series, with defaults and with all."""
    for study in await _uids(index, "/studies", [], "0020000D"):
        for params in ([], [("includefield", "all")], [("includefield", INSTANCE_EXTRAS + "," + COMPUTED)]):
            old, text = await both(index, f"/studies/{study}/series", params)
            check_same(old, text, f"series of {study} {params}")
            old, text = await both(index, f"/studies/{study}/instances", params)
            check_same(old, text, f"instances of {study} {params}")
        for series in await _uids(index, f"/studies/{study}/series", [], "0020000E"):
            old, text = await both(index, f"/studies/{study}/series/{series}/instances",
                                   [("includefield", "all")])
            check_same(old, text, f"instances of {series}")


async def test_http_answer_and_warning(archive: Runtime, index: Index, http: aiohttp.ClientSession) -> None:
    """The response body is the SQL-built array; ignored keys are named in `Warning: 299` as before."""
    params = [("Modality", "CT"), ("NoSuchKeyword", "x"), ("includefield", "SOPClassUID"),
              ("includefield", "ModalitiesInStudy")]
    async with http.get(url_of(archive, "/studies", params), headers={"Accept": DICOM_JSON}) as r:
        assert r.status == 200 and r.content_type == DICOM_JSON
        body = await r.read()
        warning = r.headers.get("Warning")
    old, text = await both(index, "/studies", params)
    assert body == ascii_json(text).encode()
    check_same(old, body.decode(), "over HTTP")
    assert warning == ('299 vna "Modality is not an attribute of the study level and was ignored", '
                       '299 vna "\'NoSuchKeyword\' is neither a DICOM keyword nor a tag: ignored", '
                       '299 vna "includefield SOPClassUID is below the study level and was ignored"')
    async with http.get(url_of(archive, "/studies", [("StudyInstanceUID", "9.9.9")]),
                        headers={"Accept": DICOM_JSON}) as r:
        assert r.status == 200 and await r.read() == b"[]" and "Warning" not in r.headers


async def test_http_answer_is_ascii(archive: Runtime, index: Index, http: aiohttp.ClientSession) -> None:
    """Names in other character sets (test_cfind's Japanese and Latin-1 patients) come as \\u escapes, as
    json.dumps wrote them: the body is ASCII and parses to the Python-built answer."""
    async with http.get(url_of(archive, "/studies", [("includefield", "all")]), headers={"Accept": DICOM_JSON}) as r:
        assert r.status == 200
        body = await r.read()
    old, text = await both(index, "/studies", [("includefield", "all")])
    assert not text.isascii() and body.isascii()
    check_same(old, body.decode("ascii"), "over HTTP, all attributes")
