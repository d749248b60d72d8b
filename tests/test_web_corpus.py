"""The test-data corpus through DICOMweb: every file of pydicom's test data and of pydicom-data that
tests/test_corpus.py selects is stored with STOW-RS and comes back bit for bit with WADO-RS, every frame
of every multi-frame instance included; and what one protocol stores, the other finds.

The selection and its grouping are test_corpus.py's (`GROUPS`: each SOP Instance UID once per group);
each group runs against a fresh server and database.

- STOW-RS (PS3.18 10.5): the group's files, a few per multipart/related request, each part the whole
  PS3.10 file (PS3.18 10.5.1.2: application/dicom). The refusals are test_corpus.py's for the same data
  sets: an invalid UID, a missing Study Instance UID (0xA900), a broken data set (0xC000), each named in
  the Failed SOP Sequence with its Failure Reason (PS3.18 I.2.2) and in a `Warning: 299` with the reason.
  One difference, by design: the files whose Media Storage SOP Instance UID (0002,0003) differs from the
  data set's SOP Instance UID are stored. Over DIMSE, pynetdicom names the File Meta's UID in the
  C-STORE-RQ, which then contradicts the data set it carries (PS3.7 9.3.1.1: 0xA900). STOW-RS has no
  command: the instance is what the data set says (PS3.18 10.5.3, the Referenced SOP Instance UID is
  the data set's), and the File Meta Information only describes the file's encoding (PS3.10 7.1).
  dcmsend, which also takes the data set's UID, gets them stored over DIMSE too.
- WADO-RS (PS3.18 10.4.1.1.1) with `transfer-syntax=*`: each stored instance comes back as the very
  file that was sent, File Meta Information included: STOW-RS stores the file as received.
- Frames (PS3.18 10.4.1.1.3): all Number of Frames of every instance with Pixel Data (frame 1 of those
  without the attribute), in one request per instance, as `application/octet-stream; transfer-syntax=*`
  (what OHIF asks for); each must be what pydicom finds in
  the file: for encapsulated pixel data the frame's fragments (pydicom.encaps.generate_frames, PS3.5
  A.4); for native pixel data the frame's slice of Pixel Data (PS3.5 8.2), bit-exact for Bits Allocated
  1 (PS3.5 8.1.1), in little endian (PS3.18 8.7.3.3.2: native frames are sent in Explicit VR Little
  Endian), so OW of a big endian data set is byte-swapped as pydicom reads it (PS3.5 7.3).
- Across protocols (PS3.4 C.4.1 and PS3.18 10.6 share one index): an instance stored with dcmtk's
  storescu is found by QIDO-RS with the file's attributes; one stored with STOW-RS is found by findscu.
"""

from __future__ import annotations

import re
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pydicom
import pytest
from pydicom.encaps import generate_frames

from gateway.runtime import Runtime
from tests.conftest import DCMTK, run_tool
from tests.test_corpus import _INVALID_DATA_SETS, _META_MISMATCH, BROKEN, BY_NAME, CORPUS, GROUPS, CorpusFile

DICOM_JSON = "application/dicom+json"
CANNOT_UNDERSTAND = 0xC000

# PS3.18 I.2.2 Failure Reasons (the C-STORE status values of PS3.4 B.2.3), with a fragment of the reason
STOW_REFUSED: dict[str, tuple[int, str]] = {
    **{name: (int(status), text) for name, (status, text) in _INVALID_DATA_SETS.items()},
    **{name: (CANNOT_UNDERSTAND, text) for name, text in BROKEN.items()},
}
BATCH_FILES = 8                 # files per STOW-RS request
BATCH_BYTES = 8 << 20           # and at most about this many bytes

RETRIEVE_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
FRAMES_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'


def root(rt: Runtime) -> str:
    return f"http://127.0.0.1:{rt.ports.http}/dicomweb"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def _read(path: Path, **kwargs: Any) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the off-standard encodings some files exist to exercise
        return pydicom.dcmread(path, **kwargs)


# -- STOW-RS ----------------------------------------------------------------------------------------

def batches(files: list[CorpusFile]) -> Iterator[list[CorpusFile]]:
    batch: list[CorpusFile] = []
    size = 0
    for f in files:
        n = f.path.stat().st_size
        if batch and (len(batch) == BATCH_FILES or size + n > BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(f)
        size += n
    if batch:
        yield batch


def multipart_body(contents: list[bytes], boundary: str) -> bytes:
    """RFC 2046 5.1.1 framing, each part a PS3.10 file (PS3.18 10.5.1.2)."""
    out = bytearray()
    for content in contents:
        out += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + content + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out)


@dataclass(frozen=True, slots=True)
class Outcome:
    stored_url: str | None = None   # RetrieveURL (0008,1190) of the Referenced SOP item
    reason: int | None = None       # Failure Reason (0008,1197)
    text: str = ""                  # from the Warning header


_WARNING_ITEM = re.compile(r'299 vna "part (\d+)(?: \([^)]*\))?: (.*?) \[0x([0-9A-F]{4})\]"')


async def stow(http: aiohttp.ClientSession, rt: Runtime, files: list[CorpusFile]) -> dict[str, Outcome]:
    """One STOW-RS request with the files' bytes; the outcome of each file."""
    boundary = uuid.uuid4().hex
    contents = [f.path.read_bytes() for f in files]
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
               "Accept": DICOM_JSON}
    async with http.post(f"{root(rt)}/studies", data=multipart_body(contents, boundary), headers=headers) as r:
        payload = await r.json(content_type=None)
        status, warning = r.status, r.headers.get("Warning", "")
    stored = {item["00081155"]["Value"][0]: item["00081190"]["Value"][0]
              for item in payload.get("00081199", {}).get("Value", [])}
    failed = payload.get("00081198", {}).get("Value", [])
    texts = {int(part): (int(code, 16), text) for part, text, code in _WARNING_ITEM.findall(warning)}
    # PS3.18 10.5.3.1: 200 all stored, 202 some, 409 none (for reasons of the instances themselves)
    assert status == (200 if not failed else 202 if stored else 409), (status, warning)
    assert len(stored) + len(failed) == len(files) and len(texts) == len(failed), warning
    assert [item["00081197"]["Value"][0] for item in failed] == [texts[p][0] for p in sorted(texts)]
    outcomes = {}
    for part, f in enumerate(files, start=1):
        if part in texts:
            outcomes[f.name] = Outcome(reason=texts[part][0], text=texts[part][1])
        else:
            outcomes[f.name] = Outcome(stored_url=stored[f.sop_instance])
    return outcomes


# -- WADO-RS ----------------------------------------------------------------------------------------

async def multipart_parts(r: aiohttp.ClientResponse) -> list[tuple[str, bytes]]:
    """(Content-Type, body) of each part of a multipart/related response (RFC 2046 5.1.1 framing)."""
    assert r.content_type == "multipart/related", r.headers.get("Content-Type")
    match = re.search(r'boundary="?([^";]+)"?', r.headers["Content-Type"])
    assert match, r.headers["Content-Type"]
    delimiter = b"\r\n--" + match.group(1).encode()
    # the CRLF before each delimiter belongs to it; the first delimiter may open the body without one
    pieces = (b"\r\n" + await r.read()).split(delimiter)
    assert pieces[0] == b"" and pieces[-1].startswith(b"--"), "preamble or close delimiter missing"
    parts = []
    for piece in pieces[1:-1]:
        head, sep, body = piece.partition(b"\r\n\r\n")
        assert sep and head.startswith(b"\r\n"), head[:100]
        headers = dict(line.split(":", 1) for line in head.decode("latin-1").split("\r\n")[1:])
        parts.append(({k.strip().lower(): v.strip() for k, v in headers.items()}.get("content-type", ""), body))
    return parts


async def retrieve_instance(http: aiohttp.ClientSession, url: str) -> tuple[str, bytes]:
    async with http.get(url, headers={"Accept": RETRIEVE_ACCEPT}) as r:
        assert r.status == 200, f"{url}: {r.status} {r.reason}"
        [part] = await multipart_parts(r)
    return part


async def retrieve_frames(http: aiohttp.ClientSession, url: str, count: int) -> list[tuple[str, bytes]]:
    numbers = ",".join(str(n) for n in range(1, count + 1))
    async with http.get(f"{url}/frames/{numbers}", headers={"Accept": FRAMES_ACCEPT}) as r:
        assert r.status == 200, f"{url}/frames: {r.status} {r.reason}"
        return await multipart_parts(r)


def number_of_frames(ds: pydicom.Dataset) -> int | None:
    """Number of Frames (0028,0008) as an integer; None when it is not a valid IS (PS3.5 6.2)."""
    try:
        return int(ds.get("NumberOfFrames"))
    except (TypeError, ValueError):
        return None


def _swapped(data: bytes, width: int) -> bytes:
    pad = -len(data) % width
    return np.frombuffer(data + bytes(pad), dtype=f">u{width}").astype(f"<u{width}").tobytes()[:len(data)]


def expected_frames(ds: pydicom.Dataset, count: int) -> list[bytes]:
    """The frames of `ds`'s Pixel Data as pydicom finds them, native ones in little endian byte order."""
    ts = ds.file_meta.TransferSyntaxUID
    if ts.is_encapsulated:
        offsets = None
        if "ExtendedOffsetTable" in ds:
            offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
        return list(generate_frames(ds.PixelData, number_of_frames=count, extended_offsets=offsets))
    data = ds.PixelData
    bits_allocated = ds.BitsAllocated
    if not ts.is_little_endian and ds["PixelData"].VR == "OW":
        # PS3.5 7.3: OW is a stream of 16-bit words in the transfer syntax's byte order (8-bit samples
        # two to a word); pydicom reads wider samples as words of their own size (dtype '>u4')
        data = _swapped(data, max(2, bits_allocated // 8))
    # PS3.5 8.2 (YBR_FULL_422: two samples per pixel, PS3.3 C.7.6.3.1.2)
    samples = 2 if ds.PhotometricInterpretation in ("YBR_FULL_422", "YBR_PARTIAL_422") else ds.SamplesPerPixel
    bits = ds.Rows * ds.Columns * samples * bits_allocated
    if bits % 8:
        # Bits Allocated 1, frames packed one after the other bit by bit, least significant first (PS3.5 8.1.1)
        whole = int.from_bytes(data, "little")
        return [((whole >> (n * bits)) & ((1 << bits) - 1)).to_bytes((bits + 7) // 8, "little") for n in range(count)]
    size = bits // 8
    return [data[n * size:(n + 1) * size] for n in range(count)]


async def check_frames(http: aiohttp.ClientSession, f: CorpusFile, url: str) -> int:
    """Every frame of the instance, compared with pydicom's; the number of frames checked (0: none)."""
    ds = _read(f.path)
    if "PixelData" not in ds:
        return 0
    # PS3.3 C.7.6.6: without the Multi-frame Module (no Number of Frames) the image is one frame
    count = number_of_frames(ds) if "NumberOfFrames" in ds else 1
    if count is None:
        # badVR.dcm: Number of Frames '1A' is no IS, so the frame count is unknown; vna reads the pixel
        # data as one frame, and frame 1 is the first frame's worth of Pixel Data
        assert f.name == "badVR.dcm"
        count = 1
    want = expected_frames(ds, count)
    got = await retrieve_frames(http, url, count)
    assert len(got) == count, f"{f.name}: {len(got)} parts for {count} frames"
    stored_ts = str(ds.file_meta.TransferSyntaxUID)
    # PS3.18 8.7.3.3: compressed frames as stored (transfer-syntax=*), native ones in Explicit VR LE
    ts = stored_ts if ds.file_meta.TransferSyntaxUID.is_encapsulated else "1.2.840.10008.1.2.1"
    for n, ((content_type, body), frame) in enumerate(zip(got, want), start=1):
        assert content_type.replace(" ", "") == f"application/octet-stream;transfer-syntax={ts}", content_type
        assert body == frame, f"{f.name}: frame {n} of {count} differs ({len(body)} vs {len(frame)} bytes)"
    return count


# -- the corpus, a group per server -------------------------------------------------------------------

def test_refusals_are_in_the_corpus() -> None:
    assert set(STOW_REFUSED) | set(_META_MISMATCH) <= set(BY_NAME)
    assert not set(STOW_REFUSED) & set(_META_MISMATCH)


@pytest.mark.parametrize("group", range(len(GROUPS)))
async def test_stow_then_wado_round_trip(group: int, vna: Runtime, http: aiohttp.ClientSession) -> None:
    """STOW-RS in, with the refusals listed above; WADO-RS out, byte for byte; every frame of every
    multi-frame instance; QIDO-RS finds exactly what was stored (refused parts leave nothing)."""
    files = GROUPS[group]
    outcomes: dict[str, Outcome] = {}
    for batch in batches(files):
        outcomes.update(await stow(http, vna, batch))

    refused = {name: (o.reason, o.text) for name, o in outcomes.items() if o.stored_url is None}
    assert {name: reason for name, (reason, _) in refused.items()} == {
        f.name: STOW_REFUSED[f.name][0] for f in files if f.name in STOW_REFUSED}
    for name, (_, text) in refused.items():
        assert STOW_REFUSED[name][1] in text, (name, text)
    stored = [f for f in files if outcomes[f.name].stored_url is not None]
    # File Meta Information naming another instance than the data set: stored as the data set's instance
    assert {f.name for f in files if f.name in _META_MISMATCH} <= {f.name for f in stored}
    for f in stored:
        # PS3.18 10.5.3: the Retrieve URL names the data set's study, series and instance
        url = outcomes[f.name].stored_url
        assert url is not None and url.startswith(f"{root(vna)}/studies/") and url.endswith(f"/{f.sop_instance}")

    async with http.get(f"{root(vna)}/instances", params={"limit": "1000", "includefield": "00080016"},
                        headers={"Accept": DICOM_JSON}) as r:
        found = {item["00080018"]["Value"][0]: item["00080016"]["Value"][0] for item in await r.json(content_type=None)}
    assert found == {f.sop_instance: str(_read(f.path, stop_before_pixels=True).SOPClassUID) for f in stored}

    frames = 0
    for f in stored:
        url = outcomes[f.name].stored_url
        assert url is not None
        content_type, body = await retrieve_instance(http, url)
        assert content_type.replace(" ", "") == f"application/dicom;transfer-syntax={f.transfer_syntax}"
        assert body == f.path.read_bytes(), f"{f.name}: WADO-RS returned other bytes than STOW-RS received"
        frames += await check_frames(http, f, url)
    multi = [f.name for f in stored if "NumberOfFrames" in _read(f.path, stop_before_pixels=True)]
    assert frames >= len(multi)

    # a whole study at once (PS3.18 10.4.1.1.1): one part per instance, each the file as sent
    studies: dict[str, list[bytes]] = {}
    for f in stored:
        url = outcomes[f.name].stored_url
        assert url is not None
        studies.setdefault(url.split("/series/")[0], []).append(f.path.read_bytes())
    for study_url, sent in studies.items():
        async with http.get(study_url, headers={"Accept": RETRIEVE_ACCEPT}) as r:
            assert r.status == 200
            got = [body for _, body in await multipart_parts(r)]
        assert sorted(got) == sorted(sent), study_url


def test_the_corpus_has_multi_frame_instances() -> None:
    """The frame checks are not vacuous: the corpus holds multi-frame native, big endian, 1-bit,
    RLE, JPEG, JPEG-LS and JPEG 2000 instances."""
    multi = {}
    for f in CORPUS:
        ds = _read(f.path, stop_before_pixels=True)
        if (number_of_frames(ds) or 0) > 1:
            multi[f.name] = f.transfer_syntax
    assert len(multi) >= 25
    assert {"1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50",
            "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90"} <= set(multi.values())
    assert "liver.dcm" in multi  # Bits Allocated 1


# -- across protocols -------------------------------------------------------------------------------

# attributes QIDO-RS returns by default at each level (PS3.18 Table 10.6.3-3 to -5) that the files hold
STUDY_KEYS = ("00100010", "00100020", "00100030", "00100040", "0020000D", "00080020", "00080030", "00080050",
              "00200010", "00080090")
SERIES_KEYS = ("0020000E", "00080060", "00200011")
INSTANCE_KEYS = ("00080016", "00080018", "00200013", "00280010", "00280011", "00280100")


async def test_cstore_found_by_qido_and_stow_found_by_cfind(vna: Runtime, http: aiohttp.ClientSession,
                                                            tmp_path: Path) -> None:
    """One index behind both protocols (PS3.4 C.4.1, PS3.18 10.6): storescu's instance is found by QIDO-RS
    at every level with the file's values; STOW-RS's instance is found by findscu with the file's values."""
    by_dimse, by_web = BY_NAME["CT_small.dcm"], BY_NAME["MR_small.dcm"]
    await run_tool(DCMTK / "storescu", "-aet", "STORESCU", "-aec", "VNA", "127.0.0.1", str(vna.ports.dicom),
                   by_dimse.path)
    assert (await stow(http, vna, [by_web]))[by_web.name].stored_url is not None

    ds = _read(by_dimse.path, stop_before_pixels=True)
    want = ds.to_json_dict()
    includes = [("includefield", ",".join(STUDY_KEYS + SERIES_KEYS + INSTANCE_KEYS))]

    async def qido(path: str, params: list[tuple[str, str]]) -> list[dict[str, Any]]:
        async with http.get(f"{root(vna)}{path}", params=params, headers={"Accept": DICOM_JSON}) as r:
            assert r.status == 200
            return await r.json(content_type=None)

    [study] = await qido("/studies", [("PatientID", str(ds.PatientID)), ("includefield", ",".join(STUDY_KEYS))])
    assert {t: study.get(t) for t in STUDY_KEYS} == {t: want.get(t) for t in STUDY_KEYS}
    assert study["00201208"]["Value"] == [1] and study["00080061"]["Value"] == ["CT"]
    [series] = await qido(f"/studies/{ds.StudyInstanceUID}/series", [("Modality", "CT")])
    assert {t: series.get(t) for t in SERIES_KEYS} == {t: want.get(t) for t in SERIES_KEYS}
    [instance] = await qido("/instances", [("SOPInstanceUID", str(ds.SOPInstanceUID)), *includes])
    for t in STUDY_KEYS + SERIES_KEYS + INSTANCE_KEYS:
        assert instance.get(t) == want.get(t), t

    web = _read(by_web.path, stop_before_pixels=True)
    keys = {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": str(web.StudyInstanceUID),
            "SOPInstanceUID": str(web.SOPInstanceUID), "SeriesInstanceUID": "", "SOPClassUID": "",
            "PatientName": "", "PatientID": "", "Modality": "", "InstanceNumber": "", "Rows": "", "Columns": ""}
    out = tmp_path / "rsp"
    out.mkdir()
    args = [a for k, v in keys.items() for a in ("-k", f"{k}={v}" if v else k)]
    await run_tool(DCMTK / "findscu", "-S", "-aet", "FINDSCU", "-aec", "VNA", "-X", "-od", out, *args,
                   "127.0.0.1", str(vna.ports.dicom))
    [rsp] = [pydicom.dcmread(p, force=True) for p in out.glob("rsp*.dcm")]
    for keyword in keys:
        if keyword != "QueryRetrieveLevel":
            assert rsp[keyword].value == web[keyword].value, keyword
