"""STOW-RS (PS3.18 10.5) against a live server: dicomweb-client's API and CLI, dcmtk's findscu and
storescu around it, and raw HTTP for every malformed or refused input. Plus the multipart parser
alone, on annotated byte literals.

What must hold (PS3.18 10.5.3.1, I.2.2): 200 when every instance is stored, 202 when some are, 409
when none is for DICOM reasons, 400 when the body cannot be parsed, 415 for another media type; a
bad part never keeps the good parts of the same request from being stored, and nothing of a bad
part is stored. The tests that look at the stored objects run on both object stores (filesystem, RADOS).
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
from collections.abc import AsyncIterator
from io import BytesIO
from pathlib import Path
from typing import Any

import aiohttp
import pydicom
import pytest
from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from archive.attributes import Level
from archive.index import Index
from archive.query import Query, QueryKey
from gateway.runtime import Runtime
from gateway.web.multipart_reader import BodyParser, MultipartError, PartData, PartEnd, PartStart
from gateway.web.stow import PartBudget
from tests.conftest import BOTH_BACKENDS, DCMTK, run_tool
from tests.stored_objects import StoredObjects

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
BOUNDARY = "vna-test-boundary"
STOW_CT = f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"'


# -- test data ------------------------------------------------------------------------------------------

def make_instance(*, study: str | None = None, series: str | None = None, sop: str | None = None,
                  sop_class: str = CT_IMAGE_STORAGE, patient_id: str = "STOW1", rows: int = 8,
                  description: str = "stow") -> bytes:
    """A small, valid PS3.10 file (Explicit VR Little Endian) with the given UIDs."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop or generate_uid()
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.PatientID = patient_id
    ds.PatientName = "Stow^Test"
    ds.StudyDate = "20240102"
    ds.Modality = "CT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.StudyDescription = description
    ds.Rows = ds.Columns = rows
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(range(256)) * (rows * rows * 2 // 256) + bytes(rows * rows * 2 % 256)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def uids_of(data: bytes) -> tuple[str, str, str, str]:
    ds = pydicom.dcmread(BytesIO(data))
    return ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID


def multipart(*parts: bytes | tuple[bytes, bytes], boundary: str = BOUNDARY, close: bool = True) -> bytes:
    """A multipart/related body; a part is its content (Content-Type application/dicom) or (raw headers, content)."""
    out = BytesIO()
    for part in parts:
        headers, content = part if isinstance(part, tuple) else (b"Content-Type: application/dicom\r\n", part)
        out.write(b"--" + boundary.encode() + b"\r\n" + headers + b"\r\n" + content + b"\r\n")
    if close:
        out.write(b"--" + boundary.encode() + b"--\r\n")
    return out.getvalue()


def seq(payload: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    return payload.get(tag, {}).get("Value", [])


def value(item: dict[str, Any], tag: str) -> Any:
    return item[tag]["Value"][0] if "Value" in item.get(tag, {}) else None


# -- helpers against the live server --------------------------------------------------------------------

def root(rt: Runtime) -> str:
    return f"http://127.0.0.1:{rt.ports.http}/dicomweb"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(http: aiohttp.ClientSession, url: str, body: Any, content_type: str | None = STOW_CT,
               **headers: str) -> tuple[int, str, dict[str, Any] | str, aiohttp.ClientResponse]:
    hdrs = dict(headers)
    if content_type is not None:
        hdrs["Content-Type"] = content_type
    async with http.post(url, data=body, headers=hdrs) as r:
        text = await r.text()
        payload: dict[str, Any] | str = await r.json(content_type=None) if r.content_type == "application/dicom+json" \
            else text
        return r.status, r.reason or "", payload, r


async def stored_sops(rt: Runtime, http: aiohttp.ClientSession) -> set[str]:
    """Every SOP Instance UID QIDO-RS finds (PS3.18 10.6)."""
    async with http.get(f"{root(rt)}/instances", params={"limit": "1000"}) as r:
        assert r.status == 200
        return {value(item, "00080018") for item in await r.json(content_type=None)}


async def object_files(rt: Runtime) -> list[bytes]:
    """The bytes of every object in the server's store, in the order of their locations."""
    return list((await StoredObjects.of(rt.settings).contents()).values())


async def locate(index: Index, sop: str) -> list[Any]:
    return await index.locate(Query(level=Level.IMAGE, keys=(QueryKey(0x00080018, "UI", sop),), top=Level.STUDY),
                              timeout=10)


# -- the multipart parser alone (RFC 2046 5.1.1) ---------------------------------------------------------

def parse(body: bytes, boundary: str = "b", chunk: int | None = None) -> list[Any]:
    parser = BodyParser(boundary)
    events: list[Any] = []
    step = chunk or max(1, len(body))
    for i in range(0, len(body), step):
        events += parser.feed(body[i:i + step])
    try:
        events += parser.close()
    except MultipartError as exc:
        events.append(("error", str(exc)))
    merged: list[Any] = []
    for e in events:  # content arrives in as many slices as the chunking makes: join them
        if isinstance(e, PartData) and merged and isinstance(merged[-1], PartData):
            merged[-1] = PartData(e.number, bytes(merged[-1].data) + bytes(e.data))
        else:
            merged.append(e)
    return merged


def test_parser_framing_as_dicomweb_client_sends_it() -> None:
    body = (b"\r\n--b"                                  # dicomweb-client opens with CRLF: an empty preamble
            b"\r\nContent-Type: application/dicom\r\n\r\n"
            b"AB\r\nCD"                                 # CRLF inside content is content
            b"\r\n--b"                                  # delimiter: CRLF belongs to it, not to the content
            b"\r\nContent-Type: application/dicom\r\n\r\n"
            b""                                         # an empty part
            b"\r\n--b--")                               # close-delimiter, no CRLF after it
    expected = [PartStart(1, {"content-type": "application/dicom"}), PartData(1, b"AB\r\nCD"), PartEnd(1),
                PartStart(2, {"content-type": "application/dicom"}), PartEnd(2)]
    assert parse(body) == expected
    for chunk in (1, 2, 3, 7):  # every split of the delimiter across feeds
        assert parse(body, chunk=chunk) == expected


def test_parser_preamble_padding_epilogue_and_boundary_lookalikes() -> None:
    body = (b"preamble to ignore\r\n"
            b"--b \t\r\n"                  # transport padding after the boundary (RFC 2046 5.1.1)
            b"X-Note: a\r\n folded\r\n\r\n"  # an obsolete folded header line
            b"x\r\n--bx\r\n--b-y"          # the boundary followed by other characters is content
            b"\r\n--b--\r\nepilogue to ignore")
    assert parse(body, chunk=5) == [PartStart(1, {"x-note": "a folded"}), PartData(1, b"x\r\n--bx\r\n--b-y"),
                                    PartEnd(1)]


def test_parser_any_chunking_gives_the_same_parts() -> None:
    """Content handed out without a copy (a chunk with no delimiter in or across its edges) or through the
    buffer gives the same parts, whatever the chunking: random content full of delimiter look-alikes."""
    rng = random.Random(7)
    boundary = "vna-boundary-1234"
    lookalikes = [b"\r", b"\r\n", b"\r\n-", b"\r\n--", b"\r\n--vna-bound", b"\r\n--vna-boundary-123",
                  b"\r\n--vna-boundary-1234x", b"--vna-boundary-1234"]
    contents = []
    for n in range(6):
        pieces = []
        for _ in range(rng.randrange(0, 40)):
            pieces.append(rng.randbytes(rng.randrange(0, 3000)))
            pieces.append(rng.choice(lookalikes))
        contents.append(b"".join(pieces) + (rng.choice(lookalikes) if n % 2 else b""))
    body = multipart(*contents, boundary=boundary)
    expected = []
    for n, content in enumerate(contents, 1):
        expected += [PartStart(n, {"content-type": "application/dicom"})]
        expected += [PartData(n, content)] if content else []
        expected += [PartEnd(n)]

    def parse_chunks(sizes: list[int]) -> list[Any]:
        parser, events, at = BodyParser(boundary), [], 0
        for size in sizes:
            events += parser.feed(body[at:at + size])
            at += size
        events += parser.feed(body[at:])
        events += parser.close()
        merged: list[Any] = []
        for e in events:
            if isinstance(e, PartData) and merged and isinstance(merged[-1], PartData):
                merged[-1] = PartData(e.number, bytes(merged[-1].data) + bytes(e.data))
            else:
                merged.append(e if not isinstance(e, PartData) else PartData(e.number, bytes(e.data)))
        return merged

    assert parse_chunks([]) == expected
    for fixed in (1, 17, 18, 19, 20, 64, 4096, 65536):
        assert parse_chunks([fixed] * (len(body) // fixed)) == expected, fixed
    for _ in range(30):
        assert parse_chunks([rng.randrange(1, 5000) for _ in range(200)]) == expected


def test_parser_bad_part_headers_do_not_lose_the_next_part() -> None:
    body = (b"--b\r\nno colon here\r\n\r\nA\r\n"
            b"--b\r\nX: " + b"h" * 20_000 + b"\r\n\r\nB\r\n"   # beyond the 16 KiB header limit
            b"--b\r\nContent-Type: application/dicom\r\n"      # no empty line before the next delimiter
            b"--b\r\nContent-Type: application/dicom\r\n\r\nD\r\n--b--")
    events = parse(body, chunk=4096)
    starts = [e for e in events if isinstance(e, PartStart)]
    assert [s.number for s in starts] == [1, 2, 3, 4]
    assert "Name: value" in starts[0].error
    assert "exceed" in starts[1].error
    assert "no empty line" in starts[2].error
    assert starts[3].error is None and events[-2:] == [PartData(4, b"D"), PartEnd(4)]


def test_parser_truncated_bodies_raise() -> None:
    assert parse(b"--b\r\nContent-Type: application/dicom\r\n\r\nABC")[-1] == \
        ("error", "the body ends inside part 1, before the close-delimiter")
    assert parse(b"--b\r\nContent-Type: appl")[-1] == ("error", "the body ends inside the headers of part 1")
    assert parse(b"no delimiter at all")[-1] == ("error", "the body holds no delimiter line for its boundary")
    with pytest.raises(MultipartError):
        BodyParser("x" * 71)  # RFC 2046: at most 70 characters


# -- real clients ----------------------------------------------------------------------------------------

def _client_store(url: str, datasets: list[Dataset]) -> Dataset:
    return DICOMwebClient(url=url).store_instances(datasets)


def _client_search(url: str, study: str) -> list[dict[str, Any]]:
    return DICOMwebClient(url=url).search_for_instances(study_instance_uid=study)


@BOTH_BACKENDS
async def test_dicomweb_client_stores_and_every_protocol_finds_it(vna: Runtime, index: Index) -> None:
    study = generate_uid()
    files = [make_instance(study=study, patient_id="DWC1") for _ in range(2)]
    datasets = [pydicom.dcmread(BytesIO(f)) for f in files]
    result = await asyncio.to_thread(_client_store, root(vna), datasets)

    # PS3.18 I.1: RetrieveURL of the study, one Referenced SOP item per instance with its own RetrieveURL,
    # absolute (dicomweb-client sends `Host: 127.0.0.1` without the port: the connection's port is used)
    assert result.RetrieveURL == f"{root(vna)}/studies/{study}"
    refs = {item.ReferencedSOPInstanceUID: item for item in result.ReferencedSOPSequence}
    assert set(refs) == {ds.SOPInstanceUID for ds in datasets}
    for ds in datasets:
        item = refs[ds.SOPInstanceUID]
        assert item.ReferencedSOPClassUID == CT_IMAGE_STORAGE
        assert item.RetrieveURL == (f"{root(vna)}/studies/{study}/series/{ds.SeriesInstanceUID}/instances/"
                                    f"{ds.SOPInstanceUID}")
    assert "FailedSOPSequence" not in result

    found = await asyncio.to_thread(_client_search, root(vna), study)
    assert {value(i, "00080018") for i in found} == set(refs)
    # C-FIND (PS3.4 C.4.1) sees what STOW-RS stored: one ingest path, one index
    answer = await run_tool(DCMTK / "findscu", "-S", "-aet", "SCU", "-aec", "VNA", "-k", "QueryRetrieveLevel=IMAGE",
                            "-k", f"StudyInstanceUID={study}", "-k", "SeriesInstanceUID", "-k", "SOPInstanceUID",
                            "127.0.0.1", str(vna.ports.dicom))
    for sop in refs:
        assert sop in answer.stderr
    # stored as received: the object is the PS3.10 file byte for byte (dcmwrite by the client)
    sent = {pydicom.dcmread(BytesIO(f)).SOPInstanceUID: f for f in files}
    for sop in refs:
        [located] = await locate(index, sop)
        assert await StoredObjects.of(vna.settings).read(located.location) == sent[sop]


async def test_dicomweb_client_cli_store_instances(vna: Runtime, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    paths = []
    for n in range(2):
        p = tmp_path / f"in{n}.dcm"
        p.write_bytes(make_instance(patient_id="CLI1"))
        paths.append(p)
    await run_tool(Path(sys.executable).parent / "dicomweb_client", "--url", root(vna),
                   "store", "instances", *paths)
    assert await stored_sops(vna, http) == {uids_of(p.read_bytes())[1] for p in paths}


@BOTH_BACKENDS
async def test_cstore_then_stow_of_the_same_instance_is_a_success(vna: Runtime, tmp_path: Path,
                                                                   http: aiohttp.ClientSession) -> None:
    path = tmp_path / "dup.dcm"
    path.write_bytes(make_instance(patient_id="DUP1"))
    _, sop, study, _ = uids_of(path.read_bytes())
    await run_tool(DCMTK / "storescu", "-aet", "SCU", "-aec", "VNA", "127.0.0.1", str(vna.ports.dicom), path)
    # the same instance again via STOW-RS: a duplicate with the same content is stored already (idempotent)
    status, _, payload, _ = await post(http, f"{root(vna)}/studies", multipart(path.read_bytes()))
    assert status == 200, payload
    assert value(payload, "00081190") == f"{root(vna)}/studies/{study}"
    assert [value(i, "00081155") for i in seq(payload, "00081199")] == [sop]
    assert "00081198" not in payload
    assert await stored_sops(vna, http) == {sop}
    [kept] = await object_files(vna)  # the copy received first (over C-STORE, from AE "SCU") stays, alone
    assert pydicom.dcmread(BytesIO(kept)).file_meta.SourceApplicationEntityTitle == "SCU"


# -- raw HTTP: every refused input gets the right status and a reason ---------------------------------

async def test_response_urls_follow_host_and_public_base_url(vna_factory: Any, http: aiohttp.ClientSession) -> None:
    rt = await vna_factory()
    data = make_instance()
    _, sop, study, series = uids_of(data)
    status, reason, payload, _ = await post(http, f"{root(rt)}/studies", multipart(data))
    assert (status, reason) == (200, "OK")
    # PS3.18 I.1: absolute URLs where a Studies Retrieve finds the study and each instance (the Host header)
    assert value(payload, "00081190") == f"{root(rt)}/studies/{study}"
    [item] = seq(payload, "00081199")
    assert value(item, "00081190") == f"{root(rt)}/studies/{study}/series/{series}/instances/{sop}"
    # behind a proxy: the configured public URL
    proxied = await vna_factory(dicomweb={"public_base_url": "https://pacs.example.org/dicom-web"})
    other = make_instance(study=study)
    status, _, payload, _ = await post(http, f"{root(proxied)}/studies", multipart(other))
    assert status == 200
    assert value(payload, "00081190") == f"https://pacs.example.org/dicom-web/studies/{study}"


@pytest.mark.parametrize("content_type", [
    None,                                                          # no Content-Type at all
    "application/dicom",                                           # one bare instance: not multipart
    f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}',  # metadata + bulk data
    f'multipart/related; type="application/dicom+xml"; boundary={BOUNDARY}',
    f"multipart/form-data; boundary={BOUNDARY}",
    "text/plain",
])
async def test_other_media_types_are_refused_with_415(vna: Runtime, http: aiohttp.ClientSession,
                                                      content_type: str | None) -> None:
    # PS3.18 10.5.3.1: 415 when the media type of the request is not supported
    status, reason, _, _ = await post(http, f"{root(vna)}/studies", multipart(make_instance()), content_type)
    assert status == 415
    assert "application/dicom" in reason
    assert await stored_sops(vna, http) == set()


async def test_unquoted_parameters_and_part_parameters_are_accepted(vna: Runtime,
                                                                    http: aiohttp.ClientSession) -> None:
    data = make_instance()
    part = ((b"Content-Type: application/dicom; transfer-syntax=1.2.840.10008.1.2.1\r\n"
             b"Content-Transfer-Encoding: binary\r\n"), data)
    status, _, payload, _ = await post(http, f"{root(vna)}/studies", multipart(part),
                                       f"Multipart/Related; boundary={BOUNDARY}; type=application/dicom")
    assert status == 200, payload
    assert await stored_sops(vna, http) == {uids_of(data)[1]}


async def test_malformed_multipart_is_400_with_a_reason_and_stores_nothing(vna: Runtime,
                                                                           http: aiohttp.ClientSession) -> None:
    url, data = f"{root(vna)}/studies", make_instance()
    cases = {
        "no boundary": (multipart(data), 'multipart/related; type="application/dicom"'),
        "boundary of 71 characters": (multipart(data), f'multipart/related; type="application/dicom"; boundary={"x" * 71}'),
        "other boundary in the body": (multipart(data, boundary="something-else"), STOW_CT),
        "no parts": (f"--{BOUNDARY}--\r\n".encode(), STOW_CT),
        "empty body": (b"", STOW_CT),
        "truncated body": (multipart(data)[:len(data) // 2], STOW_CT),
        "no close-delimiter": (multipart(data, close=False), STOW_CT),
        "bad part header": (multipart((b"Content-Type application/dicom\r\n", data)), STOW_CT),
        "huge part headers": (multipart((b"X-Pad: " + b"p" * 100_000 + b"\r\n", data)), STOW_CT),
        "part of another type": (multipart((b"Content-Type: application/dicom+json\r\n", b"{}")), STOW_CT),
    }
    for name, (body, content_type) in cases.items():
        status, reason, payload, _ = await post(http, url, body, content_type)
        # PS3.18 10.5.3.1: 400 "unable to store any Instances due to bad syntax"
        assert status == 400, (name, status, payload)
        assert reason and reason != "Bad Request", name
    assert await stored_sops(vna, http) == set()
    assert await object_files(vna) == []


async def test_huge_request_headers_are_refused(vna: Runtime, http: aiohttp.ClientSession) -> None:
    status, _, text, _ = await post(http, f"{root(vna)}/studies", multipart(make_instance()), STOW_CT,
                                    **{"X-Pad": "p" * 100_000})
    # RFC 9110 15.5.1: aiohttp's HTTP parser refuses a header field beyond 8190 bytes, before any handler
    assert status == 400 and "8190 bytes" in str(text)
    assert await stored_sops(vna, http) == set()


@BOTH_BACKENDS
async def test_bad_parts_among_good_ones_202_good_stored_bad_not(vna: Runtime, index: Index,
                                                                 http: aiohttp.ClientSession) -> None:
    good = [make_instance(patient_id="MIX1") for _ in range(3)]
    whole = make_instance(rows=64)
    truncated_dicom = whole[:-1000]
    body = multipart(
        good[0],
        b"this is not a DICOM file at all" * 10,                         # 2: non-DICOM content
        (b"Content-Type: text/plain\r\n", b"hello"),                    # 3: another part type
        good[1],
        (b"Content-Type application/dicom\r\n", make_instance()),      # 5: unparsable header line
        (b"X-Pad: " + b"p" * 100_000 + b"\r\n", make_instance()),        # 6: headers beyond the limit
        truncated_dicom,                                                # 7: a data set cut short
        make_instance(sop_class="1.2.3.4.5.6"),                         # 8: not a Storage SOP Class
        good[2],
    )
    status, reason, payload, response = await post(http, f"{root(vna)}/studies", body)
    # PS3.18 10.5.3.1: 202, some stored and some failed; PS3.18 I.1 lists both
    assert status == 202, payload
    assert reason.startswith("3 stored, 6 failed")
    assert [value(i, "00081155") for i in seq(payload, "00081199")] == [uids_of(g)[1] for g in good]
    failed = seq(payload, "00081198")
    reasons = [value(i, "00081197") for i in failed]
    # PS3.18 I.2.2: Cxxx cannot understand, 0122 SOP Class not supported
    assert reasons == [0xC000] * 5 + [0x0122]
    assert value(failed[-1], "00081150") == "1.2.3.4.5.6"
    assert value(failed[-2], "00081155") == uids_of(whole)[1]  # known from its header, refused whole
    assert value(failed[0], "00081155") is None                # not DICOM: no UID to name
    warning = response.headers["Warning"]
    for text in ("part 2", "not a DICOM", "part 3: part Content-Type text/plain", "part 5", "part 6",
                 "exceed", "part 7", "part 8", "not a Storage SOP Class"):
        assert text in warning, text
    # good parts stored, nothing from the bad ones
    assert await stored_sops(vna, http) == {uids_of(g)[1] for g in good}
    assert len(await object_files(vna)) == 3
    assert await index.count_instances(timeout=10) == 3


@BOTH_BACKENDS
async def test_a_truncated_body_keeps_the_complete_parts_before_it(vna: Runtime, http: aiohttp.ClientSession) -> None:
    first, second = make_instance(), make_instance()
    body = multipart(first, second, close=False)
    body = body[:len(body) - len(second) // 2]  # the connection's data ends inside part 2
    status, reason, payload, _ = await post(http, f"{root(vna)}/studies", body)
    assert status == 202, payload
    assert "ends inside part 2" in reason
    assert [value(i, "00081155") for i in seq(payload, "00081199")] == [uids_of(first)[1]]
    assert [value(i, "00081197") for i in seq(payload, "00081198")] == [0xC000]
    assert await stored_sops(vna, http) == {uids_of(first)[1]}
    assert len(await object_files(vna)) == 1


@BOTH_BACKENDS
async def test_none_stored_for_dicom_reasons_is_409(vna: Runtime, http: aiohttp.ClientSession) -> None:
    url = f"{root(vna)}/studies"
    original = make_instance(description="first")
    sop_class, sop, study, series = uids_of(original)
    assert (await post(http, url, multipart(original)))[0] == 200
    before = await object_files(vna)

    # PS3.18 10.5.3.1: 409 "unable to store any Instances due to a conflict in the request"
    changed = make_instance(sop=sop, study=study, series=series, description="second")
    status, reason, payload, response = await post(http, url, multipart(changed))
    assert status == 409
    [item] = seq(payload, "00081198")
    assert value(item, "00081155") == sop and value(item, "00081150") == sop_class
    assert value(item, "00081197") == 0xC011  # Cxxx: refused, same SOP Instance UID with other content
    assert "already stored with other content" in response.headers["Warning"]
    assert "already stored" in reason

    status, _, payload, _ = await post(http, url, multipart(make_instance(sop_class="1.2.3.4.5.6")))
    assert status == 409 and [value(i, "00081197") for i in seq(payload, "00081198")] == [0x0122]

    status, _, payload, _ = await post(http, url, multipart(make_instance(rows=64)[:-100]))
    assert status == 409 and [value(i, "00081197") for i in seq(payload, "00081198")] == [0xC000]

    # a mixture of a malformed part and a refused instance is 409 too ("a mixture of reasons")
    status, _, payload, _ = await post(http, url, multipart((b"Content-Type: text/plain\r\n", b"x"),
                                                            make_instance(sop_class="1.2.3.4.5.6")))
    assert status == 409 and [value(i, "00081197") for i in seq(payload, "00081198")] == [0xC000, 0x0122]

    # nothing changed: the first instance, as first stored, is the only one
    assert await stored_sops(vna, http) == {sop}
    assert await object_files(vna) == before
    assert before[0] == original


async def test_store_into_a_study_checks_the_study_instance_uid(vna: Runtime, http: aiohttp.ClientSession) -> None:
    study = generate_uid()
    url = f"{root(vna)}/studies/{study}"
    inside, other = make_instance(study=study), make_instance()
    # PS3.18 10.5.1: with a study in the target resource, instances of another study are refused (A900)
    status, _, payload, response = await post(http, url, multipart(inside, other))
    assert status == 202, payload
    assert value(payload, "00081190") == url
    assert [value(i, "00081155") for i in seq(payload, "00081199")] == [uids_of(inside)[1]]
    [failed] = seq(payload, "00081198")
    assert value(failed, "00081155") == uids_of(other)[1] and value(failed, "00081197") == 0xA900
    assert f"differs from the target study {study}" in response.headers["Warning"]

    status, _, payload, _ = await post(http, f"{root(vna)}/studies/{generate_uid()}", multipart(make_instance()))
    assert status == 409 and [value(i, "00081197") for i in seq(payload, "00081198")] == [0xA900]
    assert await stored_sops(vna, http) == {uids_of(inside)[1]}


async def test_the_response_must_be_acceptable(vna: Runtime, http: aiohttp.ClientSession) -> None:
    # PS3.18 8.7.1: the response is DICOM JSON here; an Accept that excludes it gets 406 before any storing
    status, reason, _, _ = await post(http, f"{root(vna)}/studies", multipart(make_instance()),
                                      Accept="application/dicom+xml")
    assert status == 406 and "application/dicom+json" in reason
    status, _, _, _ = await post(http, f"{root(vna)}/studies", multipart(make_instance()),
                                 Accept="application/dicom+xml, application/json;q=0.5")
    assert status == 200
    assert len(await stored_sops(vna, http)) == 1


async def _chunks(body: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i:i + size]


@BOTH_BACKENDS
async def test_bodies_beyond_max_stow_bytes_are_413(vna_factory: Any, http: aiohttp.ClientSession) -> None:
    rt = await vna_factory(dicomweb={"max_stow_bytes": 64 * 1024})
    url = f"{root(rt)}/studies"
    big = make_instance(rows=256)  # ~131 KB
    status, reason, _, _ = await post(http, url, multipart(big))  # Content-Length says it at once
    assert status == 413 and "65536" in reason
    # chunked: no length announced, the server counts while reading; what was complete before is kept
    small = make_instance()
    status, reason, payload, _ = await post(http, url, _chunks(multipart(small, big), 8192))
    assert status == 413 and "65536" in reason
    assert [value(i, "00081155") for i in seq(payload, "00081199")] == [uids_of(small)[1]]
    assert [value(i, "00081197") for i in seq(payload, "00081198")] == [0xA700]
    assert await stored_sops(rt, http) == {uids_of(small)[1]}
    assert len(await object_files(rt)) == 1


@BOTH_BACKENDS
async def test_large_parts_spill_to_disk_and_are_stored_as_received(vna_factory: Any, index: Index,
                                                                    http: aiohttp.ClientSession) -> None:
    rt = await vna_factory(dicomweb={"stow_spill_bytes": 1024})
    files = [make_instance(rows=200), make_instance(rows=4), make_instance(rows=300)]
    status, _, payload, _ = await post(http, f"{root(rt)}/studies", _chunks(multipart(*files), 3000))
    assert status == 200, payload
    for data in files:
        [located] = await locate(index, uids_of(data)[1])
        assert await StoredObjects.of(rt.settings).read(located.location) == data


@BOTH_BACKENDS
async def test_a_client_gone_mid_body_leaves_only_its_complete_parts(vna: Runtime, index: Index,
                                                                     http: aiohttp.ClientSession) -> None:
    first, second = make_instance(), make_instance(rows=64)
    body = multipart(first, second)
    _, writer = await asyncio.open_connection("127.0.0.1", vna.ports.http)
    writer.write(f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {STOW_CT}\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:len(body) - len(second) // 2])
    await writer.drain()
    for _ in range(100):  # the first part is complete: it is stored while the rest is awaited
        if await index.count_instances(timeout=10) == 1:
            break
        await asyncio.sleep(0.05)
    writer.close()  # then the client disappears in the middle of part 2
    await writer.wait_closed()
    await asyncio.sleep(0.3)
    assert await stored_sops(vna, http) == {uids_of(first)[1]}
    assert len(await object_files(vna)) == 1


async def test_a_failing_object_store_is_a_processing_failure(vna_factory: Any, http: aiohttp.ClientSession) -> None:
    vna = await vna_factory(storage={"pack_max_bytes": 0})  # a file per object
    blocked_study = generate_uid()
    # a file where the store wants the study's directory: every write into that study fails
    (vna.settings.object_root / blocked_study).write_bytes(b"")
    blocked, fine = make_instance(study=blocked_study), make_instance()
    status, _, payload, response = await post(http, f"{root(vna)}/studies", multipart(blocked, fine))
    assert status == 202, payload
    [failed] = seq(payload, "00081198")
    # PS3.18 I.2.2 0110: "did not store the Instance because of a general failure in processing"
    assert value(failed, "00081197") == 0x0110 and value(failed, "00081155") == uids_of(blocked)[1]
    assert "filesystem store" in response.headers["Warning"]
    # none stored, and only because the archive failed: the service is unavailable, not the request wrong
    status, _, payload, _ = await post(http, f"{root(vna)}/studies", multipart(make_instance(study=blocked_study)))
    assert status == 503 and [value(i, "00081197") for i in seq(payload, "00081198")] == [0x0110]
    assert await stored_sops(vna, http) == {uids_of(fine)[1]}


async def test_a_failing_segment_store_is_a_processing_failure(vna: Runtime, http: aiohttp.ClientSession) -> None:
    # a file where the store wants its segments' directory (archive/segments.py): no object can be written
    (vna.settings.object_root / ".segments").write_bytes(b"")
    instance = make_instance()
    status, _, payload, response = await post(http, f"{root(vna)}/studies", multipart(instance))
    assert status == 503 and [value(i, "00081197") for i in seq(payload, "00081198")] == [0x0110]
    assert "filesystem store" in response.headers["Warning"]
    (vna.settings.object_root / ".segments").unlink()  # the disk is back: the same request succeeds
    status, _, payload, _ = await post(http, f"{root(vna)}/studies", multipart(instance))
    assert status == 200 and await stored_sops(vna, http) == {uids_of(instance)[1]}


async def test_parts_stored_at_once_are_answered_in_body_order(vna: Runtime, http: aiohttp.ClientSession,
                                                               index: Index) -> None:
    """dicomweb.stow_parallel_parts parts of one request are stored at once; the response still lists them in
    the order of the body (PS3.18 I.1), and they are indexed in that order (a search lists them as sent), a
    large first part finishing its write after the small ones behind it; the same instance twice in one
    request is stored once and acknowledged twice (STOW is idempotent)."""
    study = generate_uid()
    large = make_instance(study=study, rows=2100)  # 8.4 MiB: spilled to disk while it arrives
    small = [make_instance(study=study) for _ in range(9)]
    body = multipart(large, *small[:4], b"not DICOM", *small[4:], small[0])
    status, reason, payload, _ = await post(http, f"{root(vna)}/studies", body)
    assert status == 202 and reason.startswith("11 stored, 1 failed"), (status, reason)
    expected = [uids_of(large)[1]] + [uids_of(s)[1] for s in small] + [uids_of(small[0])[1]]
    assert [value(i, "00081155") for i in seq(payload, "00081199")] == expected
    assert [value(i, "00081197") for i in seq(payload, "00081198")] == [0xC000]
    found = await index.find(Query(level=Level.IMAGE, keys=(QueryKey(0x0020000D, "UI", study),
                                                            QueryKey(0x00080018, "UI")), top=Level.STUDY),
                             timeout=10)
    # indexed in the order of the body though written at once (the first part, the largest, finished last)
    assert [r["00080018"]["Value"][0] for r in found] == list(dict.fromkeys(expected))


async def test_part_budget_bounds_parts_and_bytes_and_lets_a_large_part_through_alone() -> None:
    """dicomweb.stow_parallel_parts / stow_parallel_bytes: how many parts of one request are held at once."""
    budget = PartBudget(parts=3, nbytes=100)

    async def admitted(size: int) -> bool:
        task = asyncio.ensure_future(budget.acquire(size))
        await asyncio.sleep(0)
        if task.done():
            return True
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return False

    assert await admitted(40) and await admitted(40)
    assert not await admitted(30)           # 110 bytes would exceed the budget
    assert await admitted(20)               # 100 fits
    assert not await admitted(1)            # a fourth part exceeds the part count
    waiting = asyncio.ensure_future(budget.acquire(50))
    await asyncio.sleep(0)
    assert not waiting.done()
    budget.release(40)
    await asyncio.sleep(0)
    assert not waiting.done()               # 60 + 50 is still too much
    budget.release(40)
    await asyncio.sleep(0)
    assert waiting.done() and (budget.parts, budget.bytes) == (2, 70)
    budget.release(20)
    budget.release(50)
    assert await admitted(10_000)           # larger than the whole budget: stored alone
    assert not await admitted(1)
