"""The reference Python client, dicomweb-client 0.61.2, against a live vna: every public method of
`DICOMwebClient` and the `dicomweb_client` command-line tool.

`EXERCISED` maps each public method to the test that calls it; `test_every_public_method_is_exercised`
enumerates the class with `inspect` and fails when a method is neither mapped nor in `NOT_DICOMWEB`
(so a client upgrade that adds a transaction fails here until it is tested), and each live test checks
at its end that it really called the methods mapped to it.

The objects are pydicom's sample files given new UIDs and two made-up patients, stored by the client
itself (STOW-RS). Every answer is compared with pydicom's reading of the files that were sent:
- study A (Doe^Jane, 2024-01-05): an Enhanced MR of 10 native frames (emri_small) and a CT (CT_small)
  with a private OB element and an overlay added, both above the bulk data threshold;
- study B (Roe^Richard, 2024-03-20): a JPEG baseline secondary capture and a native RGB one in one
  series, an MR (MR_small) in another.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dicomweb_client
import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_frames
from pydicom.pixels import apply_modality_lut
from pydicom.uid import generate_uid

from gateway.runtime import Runtime
from tests.conftest import run_tool

# -- which test exercises which public method ---------------------------------------------------------

EXERCISED: dict[str, str] = {
    "store_instances": "test_store_and_search",
    "search_for_studies": "test_store_and_search",
    "search_for_series": "test_store_and_search",
    "search_for_instances": "test_store_and_search",
    "retrieve_study": "test_retrieve_instances_and_metadata",
    "iter_study": "test_retrieve_instances_and_metadata",
    "retrieve_series": "test_retrieve_instances_and_metadata",
    "iter_series": "test_retrieve_instances_and_metadata",
    "retrieve_instance": "test_retrieve_instances_and_metadata",
    "retrieve_study_metadata": "test_retrieve_instances_and_metadata",
    "retrieve_series_metadata": "test_retrieve_instances_and_metadata",
    "retrieve_instance_metadata": "test_retrieve_instances_and_metadata",
    "set_chunk_size": "test_retrieve_instances_and_metadata",
    "retrieve_instance_frames": "test_frames_and_bulkdata",
    "iter_instance_frames": "test_frames_and_bulkdata",
    "retrieve_bulkdata": "test_frames_and_bulkdata",
    "iter_bulkdata": "test_frames_and_bulkdata",
    "retrieve_instance_rendered": "test_rendered",
    "retrieve_instance_frames_rendered": "test_rendered",
    "retrieve_series_rendered": "test_rendered",
    "delete_instance": "test_delete",
    "delete_series": "test_delete",
    "delete_study": "test_delete",
}

# Public methods that send no DICOMweb request, with the reason they are not exercised here.
NOT_DICOMWEB: dict[str, str] = {
    "set_http_retry_params": "configures the client's retry of 408/429/503/504 answers; no request of its own",
    "lookup_keyword": "static data dictionary lookup (tag -> keyword); no request",
    "lookup_tag": "static data dictionary lookup (keyword -> tag); no request",
}


def _public_methods() -> set[str]:
    return {name for name, member in inspect.getmembers(DICOMwebClient, callable) if not name.startswith("_")}


def test_every_public_method_is_exercised() -> None:
    assert dicomweb_client.__version__ == "0.61.2"  # the version pinned in pyproject.toml
    public = _public_methods()
    assert public - EXERCISED.keys() - NOT_DICOMWEB.keys() == set(), "public methods no test exercises"
    assert (EXERCISED.keys() | NOT_DICOMWEB.keys()) - public == set(), "mapped methods the client lacks"
    assert EXERCISED.keys() & NOT_DICOMWEB.keys() == set()
    for method, test in EXERCISED.items():
        assert inspect.iscoroutinefunction(globals().get(test)), (method, test)


class Client:
    """A DICOMwebClient whose methods run in a worker thread (they block, and the server runs on this
    event loop) and are recorded once they return; `iter_*` generators are consumed in the thread."""

    def __init__(self, url: str) -> None:
        self.sync = DICOMwebClient(url=url)
        self.called: set[str] = set()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.sync, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            def run() -> Any:
                result = method(*args, **kwargs)
                if name.startswith("iter_"):
                    assert isinstance(result, Iterator), name   # a lazy iterator, not a list
                    return list(result)
                return result

            result = await asyncio.to_thread(run)
            self.called.add(name)
            return result

        return call

    def assert_exercised(self, test: str) -> None:
        mine = {m for m, t in EXERCISED.items() if t == test}
        assert mine and mine - self.called == set(), f"{test} did not call {sorted(mine - self.called)}"


# -- test data ----------------------------------------------------------------------------------------

OVERLAY = bytes(range(256)) * 8     # (6000,3000) OW, 2048 bytes: a 128x128 one-bit overlay plane
PRIVATE_BULK = 0x00431029           # CT_small's own private OB element, 2068 bytes

PATIENTS = {
    "A": {"PatientID": "DWC-A", "PatientName": "Doe^Jane", "PatientBirthDate": "19700101", "PatientSex": "F",
          "StudyDate": "20240105", "StudyTime": "101500", "AccessionNumber": "ACC-A", "StudyID": "A1",
          "StudyDescription": "DWC study A", "ReferringPhysicianName": "Who^Doctor"},
    "B": {"PatientID": "DWC-B", "PatientName": "Roe^Richard", "PatientBirthDate": "19800202", "PatientSex": "M",
          "StudyDate": "20240320", "StudyTime": "083000", "AccessionNumber": "ACC-B", "StudyID": "B1",
          "StudyDescription": "DWC study B", "ReferringPhysicianName": "Who^Doctor"},
}
# key: (file, study, series key, series number, instance number)
LAYOUT = {
    "emri": ("emri_small.dcm", "A", "A-mr", 1, 1),
    "ct": ("CT_small.dcm", "A", "A-ct", 2, 1),
    "jpeg": ("SC_rgb_jpeg_dcmtk.dcm", "B", "B-sc", 1, 1),
    "rgb": ("SC_rgb.dcm", "B", "B-sc", 1, 2),
    "mr": ("MR_small.dcm", "B", "B-mr", 2, 1),
}


@dataclass(frozen=True)
class Sample:
    key: str
    path: Path
    ds: pydicom.Dataset     # pydicom's reading of the file sent
    study: str
    series: str
    sop: str
    frames: int


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Sample]:
    out_dir = tmp_path_factory.mktemp("dicomweb-client")
    studies = {name: generate_uid() for name in PATIENTS}
    series = {key: generate_uid() for _, _, key, _, _ in LAYOUT.values()}
    out = {}
    for key, (name, study, series_key, series_number, number) in LAYOUT.items():
        ds = pydicom.dcmread(get_testdata_file(name))
        for keyword, value in PATIENTS[study].items():
            setattr(ds, keyword, value)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = studies[study], series[series_key]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesNumber, ds.InstanceNumber = series_number, number
        ds.SeriesDescription = f"DWC series {series_key}"
        if key == "ct":
            # PS3.3 C.9.2 Overlay Plane, its data (6000,3000) above the bulk data threshold
            for tag, vr, value in ((0x60000010, "US", 128), (0x60000011, "US", 128), (0x60000040, "CS", "G"),
                                   (0x60000050, "SS", [1, 1]), (0x60000100, "US", 1), (0x60000102, "US", 0),
                                   (0x60003000, "OW", OVERLAY)):
                ds.add_new(tag, vr, value)
        path = out_dir / f"{key}.dcm"
        ds.save_as(path, enforce_file_format=True)
        read = pydicom.dcmread(path)
        out[key] = Sample(key, path, read, studies[study], series[series_key], str(read.SOPInstanceUID),
                          int(read.get("NumberOfFrames") or 1))
    return out


def _url(rt: Runtime) -> str:
    return f"http://127.0.0.1:{rt.ports.http}/dicomweb"


def _instance_url(url: str, s: Sample) -> str:
    return f"{url}/studies/{s.study}/series/{s.series}/instances/{s.sop}"


async def _store(client: Client, samples: dict[str, Sample], url: str) -> None:
    """STOW-RS every sample: study A to /studies, study B to /studies/{B} (PS3.18 10.5.1)."""
    a = [s for s in samples.values() if s.study == samples["emri"].study]
    b = [s for s in samples.values() if s.study == samples["jpeg"].study]
    for batch, study in ((a, None), (b, b[0].study)):
        response = await client.store_instances([pydicom.dcmread(s.path) for s in batch], study_instance_uid=study)
        # PS3.18 10.5.3 / Annex I: every instance in the Referenced SOP Sequence with its Retrieve URL
        assert "FailedSOPSequence" not in response
        refs = {str(r.ReferencedSOPInstanceUID): r for r in response.ReferencedSOPSequence}
        assert refs.keys() == {s.sop for s in batch}
        for s in batch:
            assert refs[s.sop].ReferencedSOPClassUID == s.ds.SOPClassUID
            assert refs[s.sop].RetrieveURL == _instance_url(url, s)
        assert response.RetrieveURL == f"{url}/studies/{batch[0].study}"


def _json(s: Sample) -> dict[str, Any]:
    """The original's DICOM JSON (PS3.18 F.2), to compare answers with."""
    return s.ds.to_json_dict(1024, lambda element: "bulk")


def _value(item: dict[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value", [])
    return values[0] if len(values) == 1 else values


def _uids(items: list[dict[str, Any]], tag: str) -> list[str]:
    return [item[tag]["Value"][0] for item in items]


# -- STOW-RS and QIDO-RS (PS3.18 10.5, 10.6) ------------------------------------------------------------

async def test_store_and_search(vna: Runtime, samples: dict[str, Sample]) -> None:
    url = _url(vna)
    client = Client(url)
    await _store(client, samples, url)
    emri, ct, jpeg, rgb, mr = (samples[k] for k in ("emri", "ct", "jpeg", "rgb", "mr"))
    study_a, study_b = emri.study, jpeg.study

    # PS3.18 10.5.1: an instance of another study than the one in the path is refused (409, none stored)
    stray = pydicom.dcmread(ct.path)
    stray.SOPInstanceUID = stray.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    with pytest.raises(requests.HTTPError) as refused:
        await client.store_instances([stray], study_instance_uid=study_b)
    assert refused.value.response.status_code == 409

    # -- studies (PS3.18 10.6.1, Table 10.6.3-3 attributes) --
    studies = await client.search_for_studies()
    assert sorted(_uids(studies, "0020000D")) == sorted([study_a, study_b])
    by_uid = {s["0020000D"]["Value"][0]: s for s in studies}
    for study, members in ((study_a, [emri, ct]), (study_b, [jpeg, rgb, mr])):
        original = _json(members[0])
        for tag in ("00100010", "00100020", "00100030", "00100040", "00080020", "00080030", "00080050",
                    "00200010", "00081030", "00080090"):
            assert by_uid[study][tag] == original[tag], (study, tag)
        # PS3.4 C.6.2.1.2 (and K.6.1.1): computed study attributes
        assert _value(by_uid[study], "00201206") == len({s.series for s in members})
        assert _value(by_uid[study], "00201208") == len(members)
        assert by_uid[study]["00080061"]["Value"] == sorted({s.ds.Modality for s in members})

    async def study_uids(**kwargs: Any) -> list[str]:
        return _uids(await client.search_for_studies(**kwargs), "0020000D")

    assert await study_uids(search_filters={"PatientID": "DWC-A"}) == [study_a]
    # PS3.4 C.2.2.2.5: date range matching, closed and open-ended
    assert await study_uids(search_filters={"StudyDate": "20240101-20240131"}) == [study_a]
    assert await study_uids(search_filters={"StudyDate": "20240301-"}) == [study_b]
    assert await study_uids(search_filters={"StudyDate": "-20231231"}) == []
    assert await study_uids(search_filters={"PatientName": "Roe*"}) == [study_b]   # C.2.2.2.4 wildcard
    assert await study_uids(search_filters={"ModalitiesInStudy": "CT"}) == [study_a]
    # PS3.18 8.3.4.1 fuzzymatching: "jan" is not the name, but fuzzily matches the given name Jane
    assert await study_uids(search_filters={"PatientName": "jan"}) == []
    assert await study_uids(search_filters={"PatientName": "jan"}, fuzzymatching=True) == [study_a]
    assert await study_uids(search_filters={"PatientName": "ROE"}, fuzzymatching=True) == [study_b]
    # PS3.18 8.3.4.3 limit/offset pages in a stable order; get_remaining pages until an empty answer
    first, second = await study_uids(limit=1), await study_uids(limit=1, offset=1)
    assert len(first) == len(second) == 1 and sorted(first + second) == sorted([study_a, study_b])
    assert await study_uids(limit=1, offset=2) == []
    assert sorted(await study_uids(limit=1, get_remaining=True)) == sorted([study_a, study_b])
    # PS3.18 8.3.4.2 includefield: an attribute beyond the defaults is returned
    [with_weight] = await client.search_for_studies(search_filters={"PatientID": "DWC-A"},
                                                    fields=["PatientWeight", "00081080"])
    assert with_weight["00101030"] == _json(emri)["00101030"]
    assert with_weight["00081080"] == _json(emri)["00081080"]
    assert "00101030" not in studies[0]

    # -- series (Table 10.6.3-4) --
    series = await client.search_for_series()
    assert sorted(_uids(series, "0020000E")) == sorted({s.series for s in samples.values()})
    series_by_uid = {s["0020000E"]["Value"][0]: s for s in series}
    for s in (emri, ct, jpeg, mr):
        found, original = series_by_uid[s.series], _json(s)
        for tag in ("00080060", "00200011", "0008103E", "0020000D"):
            assert found[tag] == original[tag], (s.key, tag)
        assert _value(found, "00201209") == sum(x.series == s.series for x in samples.values())
    assert sorted(_uids(await client.search_for_series(study_a), "0020000E")) == sorted([emri.series, ct.series])
    assert _uids(await client.search_for_series(search_filters={"Modality": "CT"}), "0020000E") == [ct.series]
    assert _uids(await client.search_for_series(study_b, search_filters={"Modality": "MR"}),
                 "0020000E") == [mr.series]
    # a study-level key on a series search (PS3.18 10.6.1.2: attributes of the levels above)
    assert sorted(_uids(await client.search_for_series(search_filters={"PatientID": "DWC-B"}), "0020000E")) \
        == sorted([jpeg.series, mr.series])
    assert _uids(await client.search_for_series(search_filters={"SeriesDescription": "DWC series A-*"},
                                                fuzzymatching=False, limit=1, offset=1), "0020000E") \
        == [ct.series]  # stored order: the MR series was stored first
    [station] = await client.search_for_series(study_a, search_filters={"Modality": "MR"},
                                               fields=["StationName", "OperatorsName"])
    assert station["00081010"] == _json(emri)["00081010"] and station["00081070"] == _json(emri)["00081070"]

    # -- instances (Table 10.6.3-5) --
    instances = await client.search_for_instances()
    assert sorted(_uids(instances, "00080018")) == sorted(s.sop for s in samples.values())
    instance_by_uid = {i["00080018"]["Value"][0]: i for i in instances}
    for s in samples.values():
        found, original = instance_by_uid[s.sop], _json(s)
        for tag in ("00080016", "00200013", "00280010", "00280011", "00280100", "0020000D", "0020000E"):
            assert found[tag] == original[tag], (s.key, tag)
    assert _value(instance_by_uid[emri.sop], "00280008") == 10
    assert sorted(_uids(await client.search_for_instances(study_a), "00080018")) == sorted([emri.sop, ct.sop])
    assert _uids(await client.search_for_instances(study_b, jpeg.series), "00080018") == [jpeg.sop, rgb.sop]
    assert _uids(await client.search_for_instances(study_b, jpeg.series, search_filters={"InstanceNumber": 2}),
                 "00080018") == [rgb.sop]
    assert _uids(await client.search_for_instances(search_filters={"SOPClassUID": str(ct.ds.SOPClassUID)}),
                 "00080018") == [ct.sop]
    assert sorted(_uids(await client.search_for_instances(search_filters={"Modality": "MR",
                                                                          "StudyDate": "20240101-20241231"}),
                        "00080018")) == sorted([emri.sop, mr.sop])
    assert _uids(await client.search_for_instances(study_b, jpeg.series, limit=1, offset=1), "00080018") \
        == [rgb.sop]
    assert sorted(_uids(await client.search_for_instances(search_filters={"PatientName": "doe"},
                                                          fuzzymatching=True), "00080018")) \
        == sorted([emri.sop, ct.sop])
    [typed] = await client.search_for_instances(study_b, mr.series, fields=["ImageType", "00280004"])
    assert typed["00080008"] == _json(mr)["00080008"] and typed["00280004"] == _json(mr)["00280004"]
    client.assert_exercised("test_store_and_search")


# -- WADO-RS instances and metadata (PS3.18 10.4.1.1.1, 10.4.1.1.2) -----------------------------------

ANY_SYNTAX = (("application/dicom", "*"),)


def _assert_same_except_pixels_encoding(got: pydicom.Dataset, s: Sample) -> None:
    """Every attribute equal; the pixel data equal once decoded (a server may transcode to its
    default transfer syntax when the client names none, PS3.18 8.7.3.5.2)."""
    if got.file_meta.TransferSyntaxUID == s.ds.file_meta.TransferSyntaxUID:
        assert got == s.ds, s.key
        return
    for element in s.ds:
        if element.tag != 0x7FE00010:
            assert got[element.tag] == element, (s.key, element.tag)
    assert np.array_equal(got.pixel_array, s.ds.pixel_array), s.key


async def test_retrieve_instances_and_metadata(vna: Runtime, samples: dict[str, Sample]) -> None:
    url = _url(vna)
    client = Client(url)
    await _store(client, samples, url)
    emri, ct, jpeg, rgb = (samples[k] for k in ("emri", "ct", "jpeg", "rgb"))
    study_a = [emri, ct]

    # transfer-syntax=*: each instance as stored, equal to the file sent, in its own transfer syntax
    got = await client.retrieve_study(emri.study, media_types=ANY_SYNTAX)
    assert sorted(str(d.SOPInstanceUID) for d in got) == sorted(s.sop for s in study_a)
    for d in got:
        s = samples["emri" if d.SOPInstanceUID == emri.sop else "ct"]
        assert d == s.ds and d.file_meta.TransferSyntaxUID == s.ds.file_meta.TransferSyntaxUID
    got = await client.retrieve_series(jpeg.study, jpeg.series, media_types=ANY_SYNTAX)
    assert [str(d.SOPInstanceUID) for d in got] == [jpeg.sop, rgb.sop]   # instance number order
    assert got[0] == jpeg.ds and got[1] == rgb.ds
    assert got[0].file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"  # JPEG baseline, not transcoded
    for s in samples.values():
        d = await client.retrieve_instance(s.study, s.series, s.sop, media_types=ANY_SYNTAX)
        assert d == s.ds, s.key
        assert d.file_meta.TransferSyntaxUID == s.ds.file_meta.TransferSyntaxUID
        assert d.file_meta.MediaStorageSOPInstanceUID == s.sop
    # the client's default Accept names no transfer syntax
    d = await client.retrieve_instance(jpeg.study, jpeg.series, jpeg.sop)
    _assert_same_except_pixels_encoding(d, jpeg)
    for d in await client.retrieve_series(jpeg.study, jpeg.series):
        _assert_same_except_pixels_encoding(d, samples["jpeg" if d.SOPInstanceUID == jpeg.sop else "rgb"])

    # the iter_* twins stream the same multipart answers; small chunks make the client's multipart
    # reader see delimiters split across reads
    await client.set_chunk_size(997)
    assert client.sync._chunk_size == 997
    got = await client.iter_study(jpeg.study, media_types=ANY_SYNTAX)
    assert sorted(str(d.SOPInstanceUID) for d in got) == sorted([jpeg.sop, rgb.sop, samples["mr"].sop])
    for d in got:
        assert d == next(s.ds for s in samples.values() if s.sop == d.SOPInstanceUID)
    got = await client.iter_series(emri.study, emri.series, media_types=ANY_SYNTAX)
    assert len(got) == 1 and got[0] == emri.ds
    assert np.array_equal(got[0].pixel_array, emri.ds.pixel_array)

    # metadata: DICOM JSON of every instance (PS3.18 F.2), bulk data by BulkDataURI
    meta = await client.retrieve_study_metadata(emri.study)
    assert sorted(_uids(meta, "00080018")) == sorted(s.sop for s in study_a)
    series_meta = await client.retrieve_series_metadata(jpeg.study, jpeg.series)
    assert _uids(series_meta, "00080018") == [jpeg.sop, rgb.sop]
    instance_meta = [await client.retrieve_instance_metadata(s.study, s.series, s.sop) for s in samples.values()]
    assert instance_meta[0]["00080018"]["Value"] == [emri.sop]
    for item in meta + series_meta + instance_meta:
        s = next(x for x in samples.values() if x.sop == item["00080018"]["Value"][0])
        original = _json(s)
        # CT_small ends in Data Set Trailing Padding, which has no meaning (PS3.10 7.2) and is not metadata
        original.pop("FFFCFFFC", None)
        assert item.keys() == original.keys(), s.key
        for tag, element in original.items():
            if "BulkDataURI" in element:
                # PS3.18 F.2.6: bulk data by an absolute URI under the instance's resource
                assert item[tag]["BulkDataURI"] == f"{_instance_url(url, s)}/bulk/{tag}", (s.key, tag)
                assert item[tag]["vr"] == element["vr"]
            else:
                assert item[tag] == element, (s.key, tag)
        # and the client turns the JSON back into the original's attributes
        restored = pydicom.Dataset.from_json(item, lambda tag, vr, uri: b"")
        assert restored.SOPInstanceUID == s.sop and restored.PatientName == s.ds.PatientName
    client.assert_exercised("test_retrieve_instances_and_metadata")


# -- frames and bulk data (PS3.18 10.4.1.1.3, 10.4.1.1.5, 8.7.3.3) ----------------------------------

def _native_frames(s: Sample) -> list[bytes]:
    """The stored little endian pixel data cut into frames (PS3.5 8.2)."""
    data = s.ds.PixelData
    size = len(data) // s.frames
    return [data[i * size:(i + 1) * size] for i in range(s.frames)]


def _bulk_uris(item: dict[str, Any]) -> dict[str, str]:
    """Tag -> BulkDataURI of the top-level bulk elements of one instance's metadata."""
    return {tag: element["BulkDataURI"] for tag, element in item.items() if "BulkDataURI" in element}


async def test_frames_and_bulkdata(vna: Runtime, samples: dict[str, Sample]) -> None:
    url = _url(vna)
    client = Client(url)
    await _store(client, samples, url)
    emri, ct, jpeg = samples["emri"], samples["ct"], samples["jpeg"]

    # every frame of the multi-frame MR: the client's default Accept (type="*/*") gets them as stored,
    # application/octet-stream in Explicit VR Little Endian, which is how they are stored
    frames = await client.retrieve_instance_frames(emri.study, emri.series, emri.sop, list(range(1, 11)))
    assert frames == _native_frames(emri)
    for number, frame in enumerate(frames):
        pixels = np.frombuffer(frame, "<u2").reshape(64, 64)
        assert np.array_equal(pixels, emri.ds.pixel_array[number])
    frames = await client.iter_instance_frames(emri.study, emri.series, emri.sop, [10, 3, 1],
                                               media_types=("application/octet-stream",))
    assert frames == [_native_frames(emri)[i] for i in (9, 2, 0)]
    # a JPEG frame: the bitstream as stored (PS3.18 Table 8.7.3-5, image/jpeg)
    [bitstream] = list(generate_frames(jpeg.ds.PixelData, number_of_frames=1))
    assert await client.retrieve_instance_frames(jpeg.study, jpeg.series, jpeg.sop, [1],
                                                 media_types=("image/jpeg",)) == [bitstream]
    assert await client.retrieve_instance_frames(ct.study, ct.series, ct.sop, [1]) == [ct.ds.PixelData]
    with pytest.raises(requests.HTTPError) as missing:
        await client.retrieve_instance_frames(emri.study, emri.series, emri.sop, [11])
    assert missing.value.response.status_code == 404

    # bulk data: the BulkDataURIs of the metadata followed exactly as written (PS3.18 F.2.6, 10.4.1.1.5)
    followed = 0
    for item in await client.retrieve_study_metadata(emri.study) + \
            await client.retrieve_series_metadata(jpeg.study, jpeg.series):
        s = next(x for x in samples.values() if x.sop == item["00080018"]["Value"][0])
        uris = _bulk_uris(item)
        expected_tags = {"7FE00010"} | ({"60003000", f"{PRIVATE_BULK:08X}"} if s is ct else set())
        assert uris.keys() == expected_tags, s.key
        for tag, uri in uris.items():
            got = await client.retrieve_bulkdata(uri)
            if tag != "7FE00010":
                assert got == [s.ds[int(tag, 16)].value], (s.key, tag)
            elif s.ds.file_meta.TransferSyntaxUID.is_encapsulated:
                assert got == list(generate_frames(s.ds.PixelData, number_of_frames=s.frames)), s.key
            else:
                assert got == [s.ds.PixelData], s.key   # the whole value, little endian (8.7.3.3.1)
            followed += 1
    assert followed == 6   # emri, ct (pixel data, overlay, private), jpeg, rgb
    overlay = f"{_instance_url(url, ct)}/bulk/60003000"
    assert await client.retrieve_bulkdata(overlay) == [OVERLAY]
    assert await client.iter_bulkdata(overlay) == [OVERLAY]
    # RFC 9110 14.1.2 byte ranges are inclusive
    assert await client.retrieve_bulkdata(overlay, byte_range=(100, 199)) == [OVERLAY[100:200]]
    assert await client.iter_bulkdata(f"{_instance_url(url, emri)}/bulk/7FE00010",
                                      media_types=("application/octet-stream",)) == [emri.ds.PixelData]
    client.assert_exercised("test_frames_and_bulkdata")


# -- rendered resources (PS3.18 10.4.1.1.3-4, 8.3.5.1) -------------------------------------------------

def _linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1, the LINEAR VOI function onto 0..255, unrounded."""
    y = ((values - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    y = np.where(values <= center - 0.5 - (width - 1) / 2, 0.0, y)
    return np.where(values > center - 0.5 + (width - 1) / 2, 255.0, y)


def _image(body: bytes, fmt: str) -> np.ndarray:
    image = Image.open(io.BytesIO(body))
    assert image.format == fmt
    return np.asarray(image)


def _assert_rounds_to(actual: np.ndarray, expected: np.ndarray) -> None:
    """PNG is lossless: every 8-bit pixel is the expected value rounded."""
    assert actual.shape == expected.shape and actual.dtype == np.uint8
    assert np.abs(actual.astype(np.float64) - expected).max() <= 0.5 + 1e-6


def _multipart_parts(body: bytes) -> list[tuple[str, bytes]]:
    """(Content-Type, content) of each part of a multipart/related body (RFC 2046 5.1.1); the client
    returns the body alone, so the boundary is read from its first delimiter line."""
    first, _, _ = body.partition(b"\r\n")
    assert first.startswith(b"--"), body[:80]
    delimiter = first
    assert body.endswith(b"\r\n" + delimiter + b"--\r\n")
    inner = body[len(delimiter) + 2:-(len(delimiter) + 6)]
    parts = []
    for raw in inner.split(b"\r\n" + delimiter + b"\r\n"):
        head, _, content = raw.partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        parts.append(({k.lower(): v for k, v in headers.items()}["content-type"], content))
    return parts


async def test_rendered(vna: Runtime, samples: dict[str, Sample]) -> None:
    url = _url(vna)
    client = Client(url)
    await _store(client, samples, url)
    emri, ct, jpeg = samples["emri"], samples["ct"], samples["jpeg"]
    hu = apply_modality_lut(ct.ds.pixel_array, ct.ds).astype(np.float64)
    ct_window = _linear_window(hu, 40, 400)

    # an instance, PNG, with a window in Hounsfield units (PS3.18 8.3.5.1.4)
    body = await client.retrieve_instance_rendered(ct.study, ct.series, ct.sop, media_types=("image/png",),
                                                   params={"window": "40,400,linear"})
    _assert_rounds_to(_image(body, "PNG"), ct_window)
    # JPEG (the default rendered type), a colour one: close to the decoded original
    body = await client.retrieve_instance_rendered(jpeg.study, jpeg.series, jpeg.sop, media_types=("image/jpeg",),
                                                   params={"quality": 95})
    rendered = _image(body, "JPEG")
    assert rendered.shape == (100, 100, 3)
    assert np.abs(rendered.astype(int) - jpeg.ds.pixel_array.astype(int)).mean() < 4
    body = await client.retrieve_instance_rendered(ct.study, ct.series, ct.sop)   # Accept */*: image/jpeg
    assert _image(body, "JPEG").shape == (128, 128)

    # frames of the multi-frame MR: one frame as PNG, several as multipart/related image/jpeg
    body = await client.retrieve_instance_frames_rendered(emri.study, emri.series, emri.sop, [7],
                                                          media_types=("image/png",), params={"window": "200,300"})
    _assert_rounds_to(_image(body, "PNG"), _linear_window(emri.ds.pixel_array[6].astype(np.float64), 200, 300))
    body = await client.retrieve_instance_frames_rendered(emri.study, emri.series, emri.sop, [2, 9],
                                                          params={"window": "200,300", "quality": 95})
    parts = _multipart_parts(body)
    assert [t for t, _ in parts] == ["image/jpeg", "image/jpeg"]
    for (_, content), index in zip(parts, (1, 8)):
        expected = _linear_window(emri.ds.pixel_array[index].astype(np.float64), 200, 300)
        assert np.abs(_image(content, "JPEG").astype(float) - expected).mean() < 3, index

    # a series: its representative image, here the CT series' only instance
    body = await client.retrieve_series_rendered(ct.study, ct.series, media_types=("image/png",),
                                                 params={"window": "40,400"})
    _assert_rounds_to(_image(body, "PNG"), ct_window)
    body = await client.retrieve_series_rendered(ct.study, ct.series, params={"viewport": "64,64"})
    assert _image(body, "JPEG").shape == (64, 64)   # PS3.18 8.3.5.1.3: scaled into the viewport
    with pytest.raises(requests.HTTPError) as missing:
        await client.retrieve_series_rendered(ct.study, generate_uid(), media_types=("image/png",))
    assert missing.value.response.status_code == 404
    client.assert_exercised("test_rendered")


# -- DELETE -------------------------------------------------------------------------------------------

async def test_delete(vna: Runtime, samples: dict[str, Sample]) -> None:
    url = _url(vna)
    client = Client(url)
    await _store(client, samples, url)
    emri, jpeg, rgb, mr = (samples[k] for k in ("emri", "jpeg", "rgb", "mr"))

    async def instances(study: str | None = None, series: str | None = None) -> list[str]:
        return sorted(_uids(await client.search_for_instances(study, series), "00080018"))

    assert await client.delete_instance(rgb.study, rgb.series, rgb.sop) is None
    assert await instances(jpeg.study, jpeg.series) == [jpeg.sop]
    [study_b] = await client.search_for_studies(search_filters={"PatientID": "DWC-B"})
    assert _value(study_b, "00201208") == 2     # the counts follow (PS3.4 C.6.2.1.2)
    with pytest.raises(requests.HTTPError) as gone:
        await client.retrieve_instance(rgb.study, rgb.series, rgb.sop)
    assert gone.value.response.status_code == 404
    with pytest.raises(requests.HTTPError) as again:
        await client.delete_instance(rgb.study, rgb.series, rgb.sop)
    assert again.value.response.status_code == 404

    assert await client.delete_series(mr.study, mr.series) is None
    assert _uids(await client.search_for_series(mr.study), "0020000E") == [jpeg.series]
    with pytest.raises(requests.HTTPError) as gone:
        await client.retrieve_series_metadata(mr.study, mr.series)
    assert gone.value.response.status_code == 404

    assert await client.delete_study(emri.study) is None
    assert _uids(await client.search_for_studies(), "0020000D") == [jpeg.study]
    assert await instances() == [jpeg.sop]
    with pytest.raises(requests.HTTPError) as gone:
        await client.retrieve_study(emri.study)
    assert gone.value.response.status_code == 404
    assert await client.delete_study(jpeg.study) is None
    assert await client.search_for_studies() == []
    assert await instances() == []
    # what is left of the archive is nothing: a study can be stored again after its deletion
    await _store(client, samples, url)
    assert len(await instances()) == len(samples)
    client.assert_exercised("test_delete")


# -- the command-line tool ----------------------------------------------------------------------------

def _cli() -> Path:
    """`dicomweb_client`, the console script installed next to this interpreter."""
    path = Path(sys.executable).parent / "dicomweb_client"
    assert path.is_file(), path
    return path


async def test_cli_store_and_search(vna: Runtime, samples: dict[str, Sample]) -> None:
    url = _url(vna)
    cli = _cli()
    emri, ct, mr = samples["emri"], samples["ct"], samples["mr"]

    result = await run_tool(cli, "--url", url, "store", "instances", emri.path, ct.path, mr.path)
    assert result.stdout == ""

    async def search(*args: str) -> list[dict[str, Any]]:
        out = await run_tool(cli, "--url", url, "search", *args)
        return json.loads(out.stdout)

    studies = await search("studies", "--filter", "PatientID=DWC-A")
    assert _uids(studies, "0020000D") == [emri.study]
    assert studies[0]["00100010"] == _json(emri)["00100010"]
    assert _value(studies[0], "00201208") == 2
    studies = await search("studies", "--filter", "PatientName=roe", "--fuzzy", "--field", "PatientWeight")
    assert _uids(studies, "0020000D") == [mr.study]
    assert studies[0]["00101030"] == _json(mr)["00101030"]
    assert sorted(_uids(await search("studies"), "0020000D")) == sorted([emri.study, mr.study])
    assert len(await search("studies", "--limit", "1", "--offset", "1")) == 1

    series = await search("series", "--study", emri.study)
    assert sorted(_uids(series, "0020000E")) == sorted([emri.series, ct.series])
    series = await search("series", "--filter", "Modality=CT")
    assert _uids(series, "0020000E") == [ct.series] and series[0]["00080060"] == _json(ct)["00080060"]

    instances = await search("instances", "--study", emri.study, "--series", emri.series)
    assert _uids(instances, "00080018") == [emri.sop]
    assert instances[0]["00080016"] == _json(emri)["00080016"] and _value(instances[0], "00280008") == 10
    instances = await search("instances", "--filter", "StudyDate=20240101-20240131", "--field", "ImageType")
    assert sorted(_uids(instances, "00080018")) == sorted([emri.sop, ct.sop])
    assert {i["00080018"]["Value"][0]: i["00080008"] for i in instances} == \
        {emri.sop: _json(emri)["00080008"], ct.sop: _json(ct)["00080008"]}
    # --dicomize prints pydicom's rendering of each answer
    out = await run_tool(cli, "--url", url, "search", "instances", "--filter", f"SOPInstanceUID={mr.sop}",
                         "--dicomize")
    assert re.search(rf"\(0008,0018\) SOP Instance UID\s+UI: {re.escape(mr.sop)}", out.stdout), out.stdout

    # a failure is reported by the exit status (here: 404 for a resource the server does not have)
    failed = await run_tool(cli, "--url", f"{url}/nowhere", "search", "studies", check=False)
    assert failed.returncode == 1
