"""QIDO-RS answers equal C-FIND answers for the same query (PS3.18 10.6 and PS3.4 C.6 share one
query model in vna: archive/query.py).

The data set and the C-FIND cases are test_cfind.py's (5 patients, 6 studies, 9 series, 14 instances,
`CASES` with the PS3.4 clause of each). Every case of the STUDY, SERIES and IMAGE levels is translated
into the QIDO-RS request that asks the same thing (PS3.18 8.3.4 and 10.6.1):
- the level is the resource: `/studies`, `/series`, `/instances`; a single Study (and Series) Instance
  UID becomes the path form `/studies/{study}[/series/{series}]/...` (PS3.18 Table 10.6.1-2);
- a key with a value is `keyword=value` (PS3.18 8.3.4.1), a UID list comma-separated (8.3.4.1
  "value-list"), a sequence key `Sequence.SubKey=value` (8.3.4.1 sequence matching);
- a zero-length key (universal matching, PS3.4 C.2.2.2.3) is `includefield=keyword` (8.3.4.3); a
  zero-length sub-key of a sequence item is `Sequence.SubKey=` (the same zero-length value);
and both answers must name the same entities and, for every key the identifier requested, hold the same
DICOM JSON value (the C-FIND identifiers as pydicom decodes them, PS3.18 F.2 through `to_json_dict`).

Not expressible in QIDO-RS: the 23 Patient Root cases at the PATIENT level. QIDO-RS searches studies,
series and instances only (PS3.18 10.6.1, Table 10.6.1-2); there is no patient resource. Every other
case, Patient Root ones at the lower levels included, has its QIDO-RS twin below.

Further tests: `fuzzymatching=true` (PS3.18 8.3.4.1: PN components matched by prefix), `limit` /
`offset` pages (PS3.18 8.3.4.4), and unknown keys ignored with a `Warning: 299` (PS3.18 8.3.4.1, 8.4.5).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from pydicom.datadict import tag_for_keyword

from gateway.runtime import Runtime
from tests import test_cfind
from tests.test_cfind import (
    CASES,
    INSTANCES,
    LABEL,
    MODEL,
    PENDING,
    SERIES,
    STUDIES,
    STUDY_ROOT,
    UID,
    UNIQUE_KEY,
    Case,
    build_identifier,
    c_find,
)

# the fixture: a server of this module's own holding test_cfind's data set (module scope)
archive = test_cfind.archive

RESOURCE = {"STUDY": "studies", "SERIES": "series", "IMAGE": "instances"}
DICOM_JSON = "application/dicom+json"

PARITY_CASES = [c for c in CASES if c.level != "PATIENT"]
NOT_EXPRESSIBLE = [c for c in CASES if c.level == "PATIENT"]


def _single_uid(value: Any) -> str | None:
    """A UID key's value when it is one UID (usable in the path), else None."""
    return value if isinstance(value, str) and value and "*" not in value and "?" not in value else None


def qido_request(level: str, keys: dict[str, Any]) -> tuple[str, list[tuple[str, str]]]:
    """The QIDO-RS path (under the DICOMweb root) and query parameters that ask what `keys` asks at `level`."""
    keys = dict(keys)
    path = ""
    study = _single_uid(keys.get("StudyInstanceUID"))
    if level in ("SERIES", "IMAGE") and study is not None:
        # PS3.18 Table 10.6.1-2: {/studies/{study}}/series, {/studies/{study}[/series/{series}]}/instances
        path = f"/studies/{study}"
        del keys["StudyInstanceUID"]
        series = _single_uid(keys.get("SeriesInstanceUID"))
        if level == "IMAGE" and series is not None:
            path += f"/series/{series}"
            del keys["SeriesInstanceUID"]
    path += "/" + RESOURCE[level]
    params: list[tuple[str, str]] = []
    include: list[str] = []
    for keyword, value in keys.items():
        if isinstance(value, list) and all(isinstance(v, dict) for v in value):
            if not value:
                include.append(keyword)   # the whole sequence, all items (C.2.2.2.6 zero-length sequence)
            for item in value:
                for sub, sub_value in item.items():
                    params.append((f"{keyword}.{sub}", str(sub_value)))
        elif isinstance(value, list):
            params.append((keyword, ",".join(value)))   # PS3.18 8.3.4.1: a comma-separated value list
        elif value == "" or value is None:
            include.append(keyword)
        else:
            params.append((keyword, str(value)))
    if include:
        params.append(("includefield", ",".join(include)))
    return path, params


def requested_tags(keys: dict[str, Any]) -> list[str]:
    return [f"{tag_for_keyword(k):08X}" for k in keys]


def url_of(rt: Runtime, path: str, params: list[tuple[str, str]] | None = None) -> str:
    """The request URL with the query percent-encoded by hand (aiohttp's own encoding keeps ',' and '^')."""
    query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in params or [])
    return f"http://127.0.0.1:{rt.ports.http}/dicomweb{path}" + (f"?{query}" if query else "")


@pytest.fixture(scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def qido(http: aiohttp.ClientSession, rt: Runtime, path: str,
               params: list[tuple[str, str]] | None = None) -> tuple[list[dict[str, Any]], aiohttp.ClientResponse]:
    async with http.get(url_of(rt, path, params), headers={"Accept": DICOM_JSON}) as r:
        body = await r.read()
        assert r.status == 200, f"{path} {params}: {r.status} {r.reason} {body[:300]!r}"
        assert r.content_type == DICOM_JSON
        return await r.json(content_type=None), r


def uid_of(answer: dict[str, Any], tag: str) -> str:
    return answer[tag]["Value"][0]


# -- parity ---------------------------------------------------------------------------------------

def test_every_case_is_covered_or_explained() -> None:
    """Only the PATIENT-level cases stay out (QIDO-RS has no patient resource); every Study Root case is in."""
    assert {c.model for c in NOT_EXPRESSIBLE} == {"patient-root"} and len(NOT_EXPRESSIBLE) == 23
    study_root = [c for c in CASES if c.model == "study-root"]
    assert study_root and all(c in PARITY_CASES for c in study_root)
    assert {c.level for c in PARITY_CASES} == {"STUDY", "SERIES", "IMAGE"}


def test_translation() -> None:
    """The translation itself, on three shapes of identifier."""
    assert qido_request("IMAGE", {"StudyInstanceUID": "1.2", "SeriesInstanceUID": "1.3", "SOPInstanceUID": ""}) == (
        "/studies/1.2/series/1.3/instances", [("includefield", "SOPInstanceUID")])
    assert qido_request("SERIES", {"SeriesInstanceUID": ["1.4", "1.5"], "Modality": "CT"}) == (
        "/series", [("SeriesInstanceUID", "1.4,1.5"), ("Modality", "CT")])
    assert qido_request("STUDY", {"ProcedureCodeSequence": [{"CodeValue": "X", "CodingSchemeDesignator": ""}],
                                  "ReferencedStudySequence": []}) == (
        "/studies", [("ProcedureCodeSequence.CodeValue", "X"), ("ProcedureCodeSequence.CodingSchemeDesignator", ""),
                     ("includefield", "ReferencedStudySequence")])


@pytest.mark.parametrize("case", PARITY_CASES, ids=[c.id for c in PARITY_CASES])
async def test_qido_equals_cfind(archive: Runtime, http: aiohttp.ClientSession, case: Case) -> None:
    assert archive.ports is not None
    keys = dict(case.keys)
    keys.setdefault(UNIQUE_KEY[case.level], "")
    identifier = build_identifier(case.level, keys, case.charset)
    answer = await asyncio.to_thread(c_find, archive.ports.dicom, MODEL[case.model], identifier)
    assert answer.final == 0x0000 and all(s in PENDING for s in answer.statuses[:-1])

    path, params = qido_request(case.level, keys)
    found, response = await qido(http, archive, path, params)
    assert "Warning" not in response.headers, f"QIDO-RS ignored part of the request: {response.headers['Warning']}"

    unique = f"{tag_for_keyword(UNIQUE_KEY[case.level]):08X}"
    cfind = {str(ds[UNIQUE_KEY[case.level]].value): ds.to_json_dict() for ds in answer.matches}
    web = {uid_of(item, unique): item for item in found}
    assert len(web) == len(found), "QIDO-RS answered an entity twice"
    assert {LABEL[u] for u in web} == {LABEL[u] for u in cfind} == case.expected, case.cite
    for uid, want in cfind.items():
        for tag in requested_tags(keys):
            assert tag in want, f"C-FIND returns every requested key (PS3.4 C.4.1.1.3.2), not {tag}"
            # PS3.18 F.2: the same attribute in the same DICOM JSON form (an empty one without "Value")
            assert web[uid].get(tag) == want.get(tag), f"{LABEL[uid]} {tag}: QIDO {web[uid].get(tag)} vs " \
                                                       f"C-FIND {want.get(tag)}"


# -- fuzzy matching -------------------------------------------------------------------------------

FUZZY = [
    # (resource, key, value, labels with fuzzymatching=true, labels without)
    ("/studies", "PatientName", "jürg", {"ST3"}, set()),                  # a given name's prefix
    ("/studies", "PatientName", "DOE", {"ST1", "ST2", "ST6"}, set()),     # Doe^John and Doering^Max
    ("/studies", "PatientName", "tar", {"ST4"}, set()),                   # in the alphabetic group of an IR 87 name
    ("/studies", "ReferringPhysicianName", "ann", {"ST1", "ST3", "ST5"}, set()),
    ("/series", "PatientName", "inê", {"SE5a"}, set()),
    ("/studies", "PatientName", "Doe^John", {"ST1", "ST2"}, {"ST1", "ST2"}),  # an exact name still matches
    ("/studies", "PatientName", "ohn", set(), set()),                     # a prefix, not any substring
]


@pytest.mark.parametrize("resource,key,value,fuzzy,exact", FUZZY, ids=[f"{k}={v}" for _, k, v, _, _ in FUZZY])
async def test_fuzzymatching(archive: Runtime, http: aiohttp.ClientSession, resource: str, key: str, value: str,
                             fuzzy: set[str], exact: set[str]) -> None:
    """PS3.18 8.3.4.1: with fuzzymatching=true PN keys may match more loosely; vna matches any name
    component by prefix, case-insensitively. Without it, matching is C-FIND's (the whole component group)."""
    unique = "0020000D" if resource == "/studies" else "0020000E"
    found, _ = await qido(http, archive, resource, [(key, value), ("fuzzymatching", "true")])
    assert {LABEL[uid_of(x, unique)] for x in found} == fuzzy
    found, _ = await qido(http, archive, resource, [(key, value), ("fuzzymatching", "false")])
    assert {LABEL[uid_of(x, unique)] for x in found} == exact


# -- paging ---------------------------------------------------------------------------------------

PAGED = [
    ("/instances", [], "00080018", set(INSTANCES)),
    ("/studies", [], "0020000D", set(STUDIES)),
    ("/series", [("StudyInstanceUID", f"{UID['ST1']},{UID['ST2']},{UID['ST3']}")], "0020000E",
     {s for s, v in SERIES.items() if v[0] in ("ST1", "ST2", "ST3")}),
    ("/studies/" + UID["ST1"] + "/instances", [], "00080018", {"I1a1", "I1a2", "I1a3", "I1b1"}),
]


@pytest.mark.parametrize("resource,params,unique,everything", PAGED, ids=[p[0].split("/")[-1] + str(len(p[1]))
                                                                          for p in PAGED])
@pytest.mark.parametrize("size", [1, 3, 4])
async def test_limit_offset_pages(archive: Runtime, http: aiohttp.ClientSession, resource: str,
                                  params: list[tuple[str, str]], unique: str, everything: set[str], size: int) -> None:
    """PS3.18 8.3.4.4: `limit` results from `offset` on. Pages of one size, requested one after the other,
    cover every match exactly once, in the order of the unpaged answer, which does not change between
    requests; a page past the end is empty."""
    whole, _ = await qido(http, archive, resource, params)
    order = [uid_of(x, unique) for x in whole]
    assert {LABEL[u] for u in order} == everything and len(order) == len(everything)
    again, _ = await qido(http, archive, resource, params)
    assert [uid_of(x, unique) for x in again] == order, "the order is stable"
    paged: list[str] = []
    offset = 0
    while True:
        page, _ = await qido(http, archive, resource, [*params, ("limit", str(size)), ("offset", str(offset))])
        assert len(page) <= size
        paged += [uid_of(x, unique) for x in page]
        if len(page) < size:
            break
        offset += size
    assert paged == order, "pages concatenate to the whole answer: no duplicate, no gap"
    past, _ = await qido(http, archive, resource, [*params, ("limit", str(size)), ("offset", str(len(order) + 1))])
    assert past == []


async def test_limit_zero_and_bad_values(archive: Runtime, http: aiohttp.ClientSession) -> None:
    """PS3.18 8.3.4.4: limit and offset are non-negative integers; anything else is a 400 (10.6.3.1)."""
    for bad in (("limit", "-1"), ("offset", "x"), ("limit", "1.5")):
        async with http.get(url_of(archive, "/studies", [bad]), headers={"Accept": DICOM_JSON}) as r:
            assert r.status == 400, bad


# -- unknown and misplaced keys --------------------------------------------------------------------

async def test_unknown_keys_are_ignored_with_a_warning(archive: Runtime, http: aiohttp.ClientSession) -> None:
    """PS3.18 8.3.4.1 / 8.4.5: an attribute the origin server does not know is ignored (the search runs
    on the others) and named in a `Warning: 299` header."""
    found, response = await qido(http, archive, "/studies", [("PatientID", "PID1"), ("NoSuchKeyword", "x")])
    assert {LABEL[uid_of(x, "0020000D")] for x in found} == {"ST1", "ST2"}
    warning = response.headers.get("Warning", "")
    assert warning.startswith("299 ") and "NoSuchKeyword" in warning
    # a key of a lower level on a higher resource cannot be matched there (10.6.1.2): ignored, with a warning
    found, response = await qido(http, archive, "/studies", [("PatientID", "PID1"), ("SOPClassUID", "1.2.3")])
    assert {LABEL[uid_of(x, "0020000D")] for x in found} == {"ST1", "ST2"}
    assert response.headers.get("Warning", "").startswith("299 ") and "SOPClassUID" in response.headers["Warning"]
    # a known key answers without any warning
    _, response = await qido(http, archive, "/studies", [("PatientID", "PID1")])
    assert "Warning" not in response.headers


async def test_unknown_includefield_is_ignored_with_a_warning(archive: Runtime, http: aiohttp.ClientSession) -> None:
    """PS3.18 8.3.4.3: includefield names attributes to return; one the server does not know cannot be
    returned and is ignored like an unknown matching key (8.3.4.1), with a `Warning: 299`."""
    found, response = await qido(http, archive, "/studies", [("PatientID", "PID2"),
                                                             ("includefield", "NoSuchKeyword,StudyID")])
    [study] = found
    assert study["00200010"]["Value"] == ["3"]
    assert response.headers.get("Warning", "").startswith("299 ") and "NoSuchKeyword" in response.headers["Warning"]


async def test_study_root_patient_level_is_not_a_qido_resource(archive: Runtime, http: aiohttp.ClientSession) -> None:
    """Why the PATIENT-level cases stay out: Study Root C-FIND has no PATIENT level (PS3.4 C.6.2) and
    neither has QIDO-RS a patient resource (PS3.18 Table 10.6.1-2)."""
    answer = await asyncio.to_thread(c_find, archive.ports.dicom, STUDY_ROOT,
                                     build_identifier("PATIENT", {"PatientID": ""}))
    assert answer.matches == []
    async with http.get(url_of(archive, "/patients"), headers={"Accept": DICOM_JSON}) as r:
        assert r.status == 404
