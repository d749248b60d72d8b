"""DELETE of a study, a series and an instance under the DICOMweb root, against a live server with
dicomweb-client's `delete_study`, `delete_series` and `delete_instance` (0.61.2) and raw HTTP.

What must hold: what is deleted is gone for every protocol (QIDO-RS, C-FIND) and its object file is
gone; what is not named stays; the series, study and patient left empty go too; unknown UIDs are 404;
a disabled delete is 405 with an Allow header (RFC 9110 15.5.6) and leaves everything in place.
Every test runs on both object stores (filesystem, RADOS).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import requests
from dicomweb_client import DICOMwebClient
from pydicom.uid import generate_uid

from archive.index import Index
from gateway.runtime import Runtime
from tests.conftest import BOTH_BACKENDS, DCMTK, run_tool
from tests.stored_objects import StoredObjects
from tests.test_stow import locate, make_instance, multipart, object_files, post, root, stored_sops, uids_of

pytestmark = BOTH_BACKENDS


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def stow(rt: Runtime, http: aiohttp.ClientSession, files: list[bytes]) -> None:
    status, _, payload, _ = await post(http, f"{root(rt)}/studies", multipart(*files))
    assert status == 200, payload


async def c_find_images(rt: Runtime, study: str) -> str:
    """dcmtk findscu at IMAGE level in one study (PS3.4 C.6.2): the SOP Instance UIDs in its output."""
    found = await run_tool(DCMTK / "findscu", "-S", "-aet", "SCU", "-aec", "VNA", "-k", "QueryRetrieveLevel=IMAGE",
                           "-k", f"StudyInstanceUID={study}", "-k", "SeriesInstanceUID", "-k", "SOPInstanceUID",
                           "127.0.0.1", str(rt.ports.dicom))
    return found.stderr


async def table_sizes(index: Index) -> dict[str, int]:
    async with index.pool.acquire() as conn:
        return {t: await conn.fetchval(f"SELECT count(*) FROM {t}") for t in ("patient", "study", "series", "instance")}


def _client(rt: Runtime) -> DICOMwebClient:
    return DICOMwebClient(url=root(rt))


async def test_delete_instance_series_study_with_dicomweb_client(vna: Runtime, index: Index,
                                                                 http: aiohttp.ClientSession) -> None:
    study, series_a, series_b = generate_uid(), generate_uid(), generate_uid()
    a1, a2 = (make_instance(study=study, series=series_a, patient_id="DEL1") for _ in range(2))
    b1 = make_instance(study=study, series=series_b, patient_id="DEL1")
    other = make_instance(patient_id="DEL2")  # another patient's study: never touched
    await stow(vna, http, [a1, a2, b1, other])
    files = {uids_of(f)[1]: (await locate(index, uids_of(f)[1]))[0].location for f in (a1, a2, b1, other)}
    sop_a1, sop_a2, sop_b1, sop_other = (uids_of(f)[1] for f in (a1, a2, b1, other))
    objects = StoredObjects.of(vna.settings)
    assert set(files.values()) <= await objects.locations()

    # one instance: gone from QIDO-RS, from C-FIND and from the object store; its series stays
    await asyncio.to_thread(_client(vna).delete_instance, study, series_a, sop_a1)
    assert await stored_sops(vna, http) == {sop_a2, sop_b1, sop_other}
    answer = await c_find_images(vna, study)
    assert sop_a1 not in answer and sop_a2 in answer and sop_b1 in answer
    assert not await objects.exists(files[sop_a1]) and await objects.exists(files[sop_a2])
    assert await table_sizes(index) == {"patient": 2, "study": 2, "series": 3, "instance": 3}

    # a series: its last instance goes, and the emptied series row with it
    await asyncio.to_thread(_client(vna).delete_series, study, series_a)
    assert await stored_sops(vna, http) == {sop_b1, sop_other}
    assert not await objects.exists(files[sop_a2])
    assert await table_sizes(index) == {"patient": 2, "study": 2, "series": 2, "instance": 2}
    async with http.get(f"{root(vna)}/studies/{study}/series") as r:
        assert [s["0020000E"]["Value"][0] for s in await r.json(content_type=None)] == [series_b]

    # the study: everything under it, and its patient left without studies
    await asyncio.to_thread(_client(vna).delete_study, study)
    assert await stored_sops(vna, http) == {sop_other}
    assert sop_b1 not in await c_find_images(vna, study)
    assert not await objects.exists(files[sop_b1]) and await objects.exists(files[sop_other])
    assert await table_sizes(index) == {"patient": 1, "study": 1, "series": 1, "instance": 1}
    assert await objects.locations() == {files[sop_other]}


async def test_delete_of_a_whole_study_in_one_request(vna: Runtime, index: Index, http: aiohttp.ClientSession) -> None:
    study = generate_uid()
    files = [make_instance(study=study, series=s) for s in (generate_uid(), generate_uid()) for _ in range(3)]
    await stow(vna, http, files)
    async with http.delete(f"{root(vna)}/studies/{study}") as r:
        assert r.status == 204 and await r.read() == b""
    assert await stored_sops(vna, http) == set()
    assert await object_files(vna) == []
    assert await table_sizes(index) == {"patient": 0, "study": 0, "series": 0, "instance": 0}
    # deleting again: nothing matches any more
    async with http.delete(f"{root(vna)}/studies/{study}") as r:
        assert r.status == 404


async def test_unknown_or_mismatched_uids_are_404_and_delete_nothing(vna: Runtime, index: Index,
                                                                     http: aiohttp.ClientSession) -> None:
    data = make_instance()
    _, sop, study, series = uids_of(data)
    other_study = make_instance()
    await stow(vna, http, [data, other_study])
    _, _, study2, series2 = uids_of(other_study)
    paths = [
        f"studies/{generate_uid()}",
        f"studies/{study}/series/{generate_uid()}",
        f"studies/{study}/series/{series}/instances/{generate_uid()}",
        f"studies/{study2}/series/{series}",                     # a series of another study
        f"studies/{study}/series/{series2}/instances/{sop}",     # an instance under another series
        "studies/not-a-uid",
    ]
    for path in paths:
        async with http.delete(f"{root(vna)}/{path}") as r:
            assert r.status == 404, path
            assert "no stored instance matches" in (r.reason or ""), path
    assert len(await stored_sops(vna, http)) == 2
    assert len(await object_files(vna)) == 2
    # dicomweb-client raises the HTTP error it gets
    with pytest.raises(requests.HTTPError) as raised:
        await asyncio.to_thread(_client(vna).delete_instance, study, series, generate_uid())
    assert raised.value.response.status_code == 404


async def test_delete_disabled_is_405_and_keeps_everything(vna_factory: Any, http: aiohttp.ClientSession) -> None:
    rt = await vna_factory(dicomweb={"allow_delete": False})
    data = make_instance()
    _, sop, study, series = uids_of(data)
    await stow(rt, http, [data])
    for path in (f"studies/{study}", f"studies/{study}/series/{series}",
                 f"studies/{study}/series/{series}/instances/{sop}"):
        async with http.delete(f"{root(rt)}/{path}") as r:
            # RFC 9110 15.5.6: 405 names the methods the resource does support in Allow
            assert r.status == 405, path
            assert "allow_delete" in (r.reason or "")
            assert "DELETE" not in r.headers["Allow"] and "GET" in r.headers["Allow"]
    assert await stored_sops(rt, http) == {sop}
    assert len(await object_files(rt)) == 1


async def test_an_object_already_missing_does_not_stop_the_delete(vna: Runtime, index: Index,
                                                                  http: aiohttp.ClientSession) -> None:
    # the index goes first: an object that is already gone (a crash after an earlier delete) is no error
    files = [make_instance(), make_instance()]
    await stow(vna, http, files)
    _, sop, study, _ = uids_of(files[0])
    [located] = await locate(index, sop)
    await StoredObjects.of(vna.settings).remove(located.location)
    async with http.delete(f"{root(vna)}/studies/{study}") as r:
        assert r.status == 204
    assert await stored_sops(vna, http) == {uids_of(files[1])[1]}
