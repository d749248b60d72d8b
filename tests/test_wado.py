"""WADO-RS (PS3.18 10.4) against a live server: instances, metadata, bulk data and frames, read back
with dicomweb-client (the reference Python client) and with raw HTTP for what it does not send.

The test data are pydicom's sample files (native, big endian, multi-frame, JPEG baseline, JPEG 2000,
JPEG-LS, RLE), each given fresh UIDs so one study holds them all; they are stored over DIMSE by
pynetdicom from the file (STORE_SEND_CHUNKED_DATASET: the data set bytes go on the wire unchanged),
so "as stored" must come back byte for byte. Every test runs on both object stores (filesystem, RADOS).
"""

from __future__ import annotations

import asyncio
import io
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, encapsulate_extended, generate_frames
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config

from archive.instance import split_part10
from archive.objectstore import FileSystemStore
from archive.rados_store import RadosStore
from gateway.runtime import Runtime
from gateway.web import wado
from tests.conftest import BOTH_BACKENDS

pytestmark = BOTH_BACKENDS

ELE = "1.2.840.10008.1.2.1"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
RLE = "1.2.840.10008.1.2.5"
JPEG_LS_NEAR = "1.2.840.10008.1.2.4.81"

# (file, series, instance number)
SAMPLES = [
    ("CT_small.dcm", "native", 1),
    ("MR_small.dcm", "native", 2),
    ("MR_small_bigendian.dcm", "native", 3),
    ("emri_small.dcm", "multiframe", 1),
    ("emri_small_jpeg_2k_lossless.dcm", "multiframe", 2),
    ("emri_small_RLE.dcm", "multiframe", 3),
    ("SC_rgb_jpeg_dcmtk.dcm", "compressed", 1),
    ("JPEG2000.dcm", "compressed", 2),
    ("MR_small_RLE.dcm", "compressed", 3),
    ("JPEGLSNearLossless_16.dcm", "compressed", 4),
]
OVERLAY = bytes(range(256)) * 8  # (6000,3000) added to CT_small: 2048 bytes, over the bulk data threshold


@dataclass(frozen=True)
class Sample:
    name: str
    path: Path
    data: bytes            # the whole PS3.10 file
    dataset: bytes         # its data set bytes (after the File Meta Information)
    ds: pydicom.Dataset
    study: str
    series: str
    sop: str
    ts: str
    frames: int


def _prepare(out_dir: Path, samples: list[tuple[str, str, int]]) -> dict[str, Sample]:
    """Copies of pydicom's files in one new study, one series per key, with new SOP Instance UIDs."""
    study = generate_uid()
    series = {key: generate_uid() for _, key, _ in samples}
    out = {}
    for name, key, number in samples:
        ds = pydicom.dcmread(get_testdata_file(name))
        sop = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series[key], sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.InstanceNumber = number
        if name == "CT_small.dcm":
            # PS3.3 C.9.2 Overlay Plane: a 128x128 one-bit overlay
            for tag, vr, value in ((0x60000010, "US", 128), (0x60000011, "US", 128), (0x60000040, "CS", "G"),
                                   (0x60000050, "SS", [1, 1]), (0x60000100, "US", 1), (0x60000102, "US", 0),
                                   (0x60003000, "OW", OVERLAY)):
                ds.add_new(tag, vr, value)
        path = out_dir / name
        ds.save_as(path, enforce_file_format=True)
        data = path.read_bytes()
        ts, offset = split_part10(data)
        out[name] = Sample(name, path, data, data[offset:], pydicom.dcmread(path), study, series[key], sop, ts,
                           int(ds.get("NumberOfFrames") or 1))
    return out


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Sample]:
    return _prepare(tmp_path_factory.mktemp("wado"), SAMPLES)


def _send(port: int, files: list[Sample]) -> None:
    """C-STORE each file's data set bytes unchanged (PS3.4 B.2), in its own transfer syntax."""
    ae = AE(ae_title="WADOTEST")
    for sop_class, ts in sorted({(str(s.ds.SOPClassUID), s.ts) for s in files}):
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title="VNA")
    assert assoc.is_established
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        for s in files:
            rsp = assoc.send_c_store(str(s.path))
            assert rsp.Status == 0, f"{s.name}: C-STORE status {rsp.Status:#06x}"
    finally:
        assoc.release()


async def _loaded(rt: Runtime, samples: dict[str, Sample], monkeypatch: pytest.MonkeyPatch,
                  names: list[str] | None = None) -> str:
    """Store the samples (or those named) in `rt`; return its DICOMweb root."""
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    files = [samples[n] for n in names] if names else list(samples.values())
    await asyncio.to_thread(_send, rt.ports.dicom, files)
    return f"http://127.0.0.1:{rt.ports.http}/dicomweb"


@pytest.fixture
async def url(vna: Runtime, samples: dict[str, Sample], monkeypatch: pytest.MonkeyPatch) -> str:
    """The DICOMweb root of a server holding every sample."""
    return await _loaded(vna, samples, monkeypatch)


def _client(url: str) -> DICOMwebClient:
    return DICOMwebClient(url=url)


def _instance_url(url: str, s: Sample) -> str:
    return f"{url}/studies/{s.study}/series/{s.series}/instances/{s.sop}"


def parse_multipart(content_type: str, body: bytes) -> list[tuple[dict[str, str], bytes]]:
    """RFC 2046 5.1.1, strictly: parts between delimiters, the close delimiter last."""
    assert content_type.startswith("multipart/related"), content_type
    boundary = re.search(r'boundary="?([^";]+)"?', content_type).group(1).encode()  # type: ignore[union-attr]
    delimiter = b"--" + boundary
    assert body.startswith(delimiter + b"\r\n")
    assert body.endswith(b"\r\n" + delimiter + b"--\r\n")
    inner = body[len(delimiter) + 2:-(len(delimiter) + 6)]
    parts = []
    for raw in inner.split(b"\r\n" + delimiter + b"\r\n"):
        head, _, content = raw.partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        parts.append(({k.lower(): v for k, v in headers.items()}, content))
    return parts


async def _get(url: str, accept: str | None = None, **headers: str) -> tuple[int, dict[str, str], bytes]:
    if accept is not None:
        headers["Accept"] = accept
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as rsp:
        return rsp.status, dict(rsp.headers), await rsp.read()


def _native_frames(s: Sample) -> list[bytes]:
    """Each frame of the original's native pixel data, little endian (PS3.5 8.2)."""
    arr = s.ds.pixel_array
    if s.frames == 1:
        arr = arr[np.newaxis]
    return [a.astype(a.dtype.newbyteorder("<")).tobytes() for a in arr]


def _encapsulated_frames(s: Sample) -> list[bytes]:
    return list(generate_frames(s.ds.PixelData, number_of_frames=s.frames))


# -- Retrieve study / series / instance (PS3.18 10.4.1.1.1) ------------------------------------------

async def test_retrieve_as_stored_is_byte_identical(url: str, samples: dict[str, Sample]) -> None:
    s0 = next(iter(samples.values()))
    by_sop = {s.sop: s for s in samples.values()}

    # PS3.18 8.7.3.5.2: transfer-syntax=* lets the origin server send each instance as it has it
    status, headers, body = await _get(f"{url}/studies/{s0.study}",
                                       'multipart/related; type="application/dicom"; transfer-syntax=*',
                                       Origin="http://viewer.example")
    assert status == 200
    assert headers["Access-Control-Allow-Origin"] == "*"  # a streamed answer still carries CORS headers
    assert re.match(r'multipart/related; ?type="application/dicom"; ?boundary=', headers["Content-Type"])
    parts = parse_multipart(headers["Content-Type"], body)
    assert len(parts) == len(samples)
    for part_headers, content in parts:
        ts, offset = split_part10(content)
        sop = str(pydicom.dcmread(io.BytesIO(content)).SOPInstanceUID)
        assert content[offset:] == by_sop[sop].dataset, by_sop[sop].name
        assert ts == by_sop[sop].ts
        assert part_headers["content-type"] == f"application/dicom; transfer-syntax={ts}"
    # series in instance-number order (what a viewer stacks)
    multiframe = [s.sop for s in samples.values() if s.series == samples["emri_small.dcm"].series]
    got = [str(pydicom.dcmread(io.BytesIO(c)).SOPInstanceUID) for _, c in parts]
    assert [g for g in got if g in multiframe] == multiframe

    client = _client(url)
    any_syntax = (("application/dicom", "*"),)
    study = await asyncio.to_thread(client.retrieve_study, s0.study, media_types=any_syntax)
    assert sorted(str(d.SOPInstanceUID) for d in study) == sorted(by_sop)
    for d in study:
        assert d == by_sop[str(d.SOPInstanceUID)].ds
    s = samples["emri_small_RLE.dcm"]
    series = await asyncio.to_thread(client.retrieve_series, s.study, s.series, media_types=any_syntax)
    assert [int(d.InstanceNumber) for d in series] == [1, 2, 3]
    for name in ("JPEG2000.dcm", "MR_small_bigendian.dcm", "CT_small.dcm"):
        s = samples[name]
        d = await asyncio.to_thread(client.retrieve_instance, s.study, s.series, s.sop, media_types=any_syntax)
        assert d == s.ds
        assert d.file_meta.TransferSyntaxUID == s.ts
    # dicomweb-client's default Accept for a series names no transfer syntax: sent as stored too
    s = samples["JPEG2000.dcm"]
    series = await asyncio.to_thread(client.retrieve_series, s.study, s.series)
    compressed = [x for x in samples.values() if x.series == s.series]
    assert [d.file_meta.TransferSyntaxUID for d in series] == [x.ts for x in compressed]
    # PS3.18 10.4.4: an Instance Resource may be asked for as a single part application/dicom body
    s = samples["SC_rgb_jpeg_dcmtk.dcm"]
    status, headers, body = await _get(_instance_url(url, s), "application/dicom; transfer-syntax=*")
    assert status == 200 and headers["Content-Type"].startswith("application/dicom")
    assert body[split_part10(body)[1]:] == s.dataset


async def test_retrieve_transcodes_to_explicit_vr_little_endian(url: str, samples: dict[str, Sample]) -> None:
    client = _client(url)
    # PS3.18 8.7.3.5.2: an explicit transfer syntax is honoured; compressed and big endian instances are
    # decoded to Explicit VR Little Endian (pixel values unchanged for lossless syntaxes)
    for name in ("emri_small_jpeg_2k_lossless.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm",
                 "SC_rgb_jpeg_dcmtk.dcm", "JPEGLSNearLossless_16.dcm"):
        s = samples[name]
        d = await asyncio.to_thread(client.retrieve_instance, s.study, s.series, s.sop,
                                    media_types=(("application/dicom", ELE),))
        assert d.file_meta.TransferSyntaxUID == ELE, name
        assert d.SOPInstanceUID == s.sop
        assert np.array_equal(d.pixel_array, s.ds.pixel_array), name
        assert d.PatientName == s.ds.PatientName if "PatientName" in s.ds else True
    # a whole series, some instances stored compressed, all in Explicit VR Little Endian
    s = samples["emri_small.dcm"]
    series = await asyncio.to_thread(client.retrieve_series, s.study, s.series,
                                     media_types=(("application/dicom", ELE),))
    assert [d.file_meta.TransferSyntaxUID for d in series] == [ELE] * 3
    for d in series:
        assert np.array_equal(d.pixel_array, s.ds.pixel_array)  # the same ten frames, three encodings
    # asking for the stored syntax by name sends the stored bytes
    s = samples["emri_small_jpeg_2k_lossless.dcm"]
    status, headers, body = await _get(_instance_url(url, s),
                                       f'multipart/related; type="application/dicom"; transfer-syntax={J2K_LOSSLESS}')
    assert status == 200
    [(_, content)] = parse_multipart(headers["Content-Type"], body)
    assert content[split_part10(content)[1]:] == s.dataset


async def test_retrieve_not_acceptable_and_not_found(url: str, samples: dict[str, Sample]) -> None:
    s = samples["CT_small.dcm"]
    # PS3.18 8.7.3.5.2 / 10.4.1.1.1: a syntax the server cannot produce is 406 Not Acceptable
    status, _, body = await _get(_instance_url(url, s),
                                 f'multipart/related; type="application/dicom"; transfer-syntax={JPEG_BASELINE}')
    assert status == 406 and s.sop.encode() in body
    status, _, _ = await _get(f"{url}/studies/{s.study}",
                              f'multipart/related; type="application/dicom"; transfer-syntax={RLE}')
    assert status == 406  # the native instances cannot be RLE-encoded here
    status, _, _ = await _get(_instance_url(url, s), "application/dicom+json")
    assert status == 406
    status, _, _ = await _get(f"{url}/studies/{s.study}", "application/dicom")
    assert status == 406  # PS3.18 10.4.4: single part only for an Instance Resource
    # PS3.18 10.4.1.1.1: nothing matches: 404 (a series under another study does not match)
    accept = 'multipart/related; type="application/dicom"'
    for path in (f"/studies/{generate_uid()}", f"/studies/{s.study}/series/{generate_uid()}",
                 f"/studies/{generate_uid()}/series/{s.series}",
                 f"/studies/{s.study}/series/{s.series}/instances/{generate_uid()}",
                 f"/studies/{s.study}/series/{samples['emri_small.dcm'].series}/instances/{s.sop}"):
        status, _, _ = await _get(url + path, accept)
        assert status == 404, path


# -- Metadata (PS3.18 10.4.1.1.2, F.2) --------------------------------------------------------------

async def test_metadata_and_bulk_data_uris(url: str, samples: dict[str, Sample]) -> None:
    client = _client(url)
    s0 = samples["CT_small.dcm"]
    study = await asyncio.to_thread(client.retrieve_study_metadata, s0.study)
    assert len(study) == len(samples)
    by_sop = {s.sop: s for s in samples.values()}
    for meta in study:
        s = by_sop[meta["00080018"]["Value"][0]]
        original = s.ds.to_json_dict(1024, lambda e: "bulk")
        for tag in ("00080016", "0020000D", "0020000E", "00200013", "00280010", "00280011", "00280100",
                    "00100010", "00100020", "00280004"):
            assert meta.get(tag) == original.get(tag), (s.name, tag)
        # PS3.18 F.2.6: bulk data by an absolute URI under the instance's WADO-RS resource
        assert meta["7FE00010"]["BulkDataURI"] == f"{_instance_url(url, s)}/bulk/7FE00010"
        assert "InlineBinary" not in meta["7FE00010"]
    series = await asyncio.to_thread(client.retrieve_series_metadata, s0.study, s0.series)
    assert [m["00200013"]["Value"][0] for m in series] == [1, 2, 3]
    instance = await asyncio.to_thread(client.retrieve_instance_metadata, s0.study, s0.series, s0.sop)
    assert instance["60003000"]["BulkDataURI"] == f"{_instance_url(url, s0)}/bulk/60003000"

    # dicomweb-client follows each BulkDataURI exactly as written
    assert await asyncio.to_thread(client.retrieve_bulkdata, instance["60003000"]["BulkDataURI"]) == [OVERLAY]
    for meta in study:
        s = by_sop[meta["00080018"]["Value"][0]]
        got = await asyncio.to_thread(client.retrieve_bulkdata, meta["7FE00010"]["BulkDataURI"])
        if s.ds.file_meta.TransferSyntaxUID.is_encapsulated:
            assert got == _encapsulated_frames(s), s.name  # the frames' bitstreams, one part each
        else:
            assert got == [b"".join(_native_frames(s))], s.name  # the value, little endian

    status, _, _ = await _get(f"{url}/studies/{generate_uid()}/metadata", "application/dicom+json")
    assert status == 404
    status, _, _ = await _get(f"{_instance_url(url, s0)}/metadata", 'multipart/related; type="application/dicom"')
    assert status == 406


async def test_metadata_honours_public_base_url(vna_factory: Any, samples: dict[str, Sample],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    public = "https://pacs.example.org/prefix/dicomweb"
    rt = await vna_factory(dicomweb={"public_base_url": public})
    url = await _loaded(rt, samples, monkeypatch, ["MR_small.dcm"])
    s = samples["MR_small.dcm"]
    status, headers, body = await _get(f"{url}/studies/{s.study}/series/{s.series}/metadata")
    assert status == 200 and headers["Content-Type"] == "application/dicom+json"
    [meta] = __import__("json").loads(body)
    assert meta["7FE00010"]["BulkDataURI"] == \
        f"{public}/studies/{s.study}/series/{s.series}/instances/{s.sop}/bulk/7FE00010"


# -- Frames (PS3.18 10.4.1.1.3, 8.7.3.3) ------------------------------------------------------------

async def test_frames_with_dicomweb_client(url: str, samples: dict[str, Sample]) -> None:
    client = _client(url)
    for s in samples.values():
        numbers = list(range(1, s.frames + 1))
        # the default Accept, multipart/related; type="*/*": each frame as stored
        got = await asyncio.to_thread(client.retrieve_instance_frames, s.study, s.series, s.sop, numbers)
        expected = _encapsulated_frames(s) if s.ds.file_meta.TransferSyntaxUID.is_encapsulated \
            else _native_frames(s)
        assert got == expected, s.name
        # application/octet-stream without transfer-syntax: Explicit VR Little Endian, decoded
        # (PS3.18 8.7.3.3); color as RGB, as pydicom decodes it
        got = await asyncio.to_thread(client.retrieve_instance_frames, s.study, s.series, s.sop, numbers,
                                      media_types=("application/octet-stream",))
        assert got == _native_frames(s), s.name
    s = samples["emri_small_jpeg_2k_lossless.dcm"]
    got = await asyncio.to_thread(client.retrieve_instance_frames, s.study, s.series, s.sop, [3, 1, 10],
                                  media_types=(("image/jp2", J2K_LOSSLESS),))
    frames = _encapsulated_frames(s)
    assert got == [frames[2], frames[0], frames[9]]


async def test_frames_media_types(url: str, samples: dict[str, Sample]) -> None:
    # PS3.18 Table 8.7.3-5: each compressed bitstream with its media type and transfer-syntax
    expected_types = {
        "emri_small_jpeg_2k_lossless.dcm": f"image/jp2; transfer-syntax={J2K_LOSSLESS}",
        "JPEG2000.dcm": "image/jp2; transfer-syntax=1.2.840.10008.1.2.4.91",
        "emri_small_RLE.dcm": f"image/dicom-rle; transfer-syntax={RLE}",
        "SC_rgb_jpeg_dcmtk.dcm": f"image/jpeg; transfer-syntax={JPEG_BASELINE}",
        "JPEGLSNearLossless_16.dcm": f"image/jls; transfer-syntax={JPEG_LS_NEAR}",
        "emri_small.dcm": f"application/octet-stream; transfer-syntax={ELE}",
        "MR_small_bigendian.dcm": f"application/octet-stream; transfer-syntax={ELE}",
    }
    for name, part_type in expected_types.items():
        s = samples[name]
        status, headers, body = await _get(f"{_instance_url(url, s)}/frames/1", 'multipart/related; type="*/*"')
        assert status == 200, name
        [(part_headers, content)] = parse_multipart(headers["Content-Type"], body)
        assert part_headers["content-type"] == part_type, name
        assert f'type="{part_type.split(";")[0]}"' in headers["Content-Type"]

    s = samples["emri_small_jpeg_2k_lossless.dcm"]
    frames = _encapsulated_frames(s)
    # OHIF's form (unquoted type, transfer-syntax=*): the bitstream as stored, labelled with its syntax
    status, headers, body = await _get(f"{_instance_url(url, s)}/frames/2,5",
                                       "multipart/related; type=application/octet-stream; transfer-syntax=*")
    assert status == 200
    parts = parse_multipart(headers["Content-Type"], body)
    assert [c for _, c in parts] == [frames[1], frames[4]]
    assert parts[0][0]["content-type"] == f"application/octet-stream; transfer-syntax={J2K_LOSSLESS}"
    # a single-part body for one frame
    status, headers, body = await _get(f"{_instance_url(url, s)}/frames/7", "image/jp2")
    assert status == 200 and headers["Content-Type"].startswith("image/jp2") and body == frames[6]
    status, headers, body = await _get(f"{_instance_url(url, s)}/frames/7", "application/octet-stream")
    assert status == 200 and body == _native_frames(s)[6]
    # the older RLE media type name is accepted and echoed
    r = samples["emri_small_RLE.dcm"]
    status, headers, body = await _get(f"{_instance_url(url, r)}/frames/4",
                                       'multipart/related; type="image/x-dicom-rle"')
    assert status == 200
    [(part_headers, content)] = parse_multipart(headers["Content-Type"], body)
    assert part_headers["content-type"].startswith("image/x-dicom-rle") and content == _encapsulated_frames(r)[3]

    # 406: a JPEG bitstream from a JPEG 2000 instance, a compressed one from native data
    status, _, _ = await _get(f"{_instance_url(url, s)}/frames/1", 'multipart/related; type="image/jpeg"')
    assert status == 406
    n = samples["emri_small.dcm"]
    status, _, _ = await _get(f"{_instance_url(url, n)}/frames/1", 'multipart/related; type="image/jp2"')
    assert status == 406
    # PS3.18 10.4.1.1.3: a frame the instance does not have is 404, a malformed list 400
    status, _, body = await _get(f"{_instance_url(url, s)}/frames/3,11", 'multipart/related; type="*/*"')
    assert status == 404 and b"11" in body
    for bad in ("0", "1,x", "-1", "1;2"):
        status, _, _ = await _get(f"{_instance_url(url, s)}/frames/{bad}", 'multipart/related; type="*/*"')
        assert status == 400, bad
    status, _, _ = await _get(f"{url}/studies/{s.study}/series/{s.series}/instances/{generate_uid()}/frames/1")
    assert status == 404


# -- Bulk data with Range (PS3.18 10.4.1.1.5, RFC 9110 14) ---------------------------------------------

async def test_bulk_data_ranges(url: str, samples: dict[str, Sample]) -> None:
    s = samples["MR_small_bigendian.dcm"]
    value = b"".join(_native_frames(s))  # PS3.18 8.7.3.3.1: uncompressed bulk data is little endian
    bulk = f"{_instance_url(url, s)}/bulk/7FE00010"

    status, headers, body = await _get(bulk, "application/octet-stream")
    assert status == 200 and body == value
    # big endian words straddle the range's ends: the bytes are those of the little endian value
    status, headers, body = await _get(bulk, "application/octet-stream", Range="bytes=101-1098")
    assert status == 206 and body == value[101:1099]
    assert headers["Content-Range"] == f"bytes 101-1098/{len(value)}"
    status, headers, body = await _get(bulk, "application/octet-stream", Range="bytes=-10")
    assert status == 206 and body == value[-10:]
    status, headers, body = await _get(bulk, 'multipart/related; type="application/octet-stream"',
                                       Range=f"bytes={len(value) - 5}-")
    assert status == 206
    [(part_headers, content)] = parse_multipart(headers["Content-Type"], body)
    assert content == value[-5:]
    assert part_headers["content-range"] == f"bytes {len(value) - 5}-{len(value) - 1}/{len(value)}"
    assert part_headers["content-location"] == bulk
    status, headers, _ = await _get(bulk, "application/octet-stream", Range=f"bytes={len(value)}-")
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(value)}"
    # dicomweb-client's byte_range
    client = _client(url)
    got = await asyncio.to_thread(client.retrieve_bulkdata, bulk, byte_range=(0, 63))
    assert got == [value[:64]]

    status, _, _ = await _get(f"{_instance_url(url, s)}/bulk/00291010", "application/octet-stream")
    assert status == 404
    status, _, _ = await _get(f"{_instance_url(url, s)}/bulk/xyz", "application/octet-stream")
    assert status == 400
    status, _, _ = await _get(bulk, "image/jpeg")
    assert status == 406


def count_whole_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The locations of every whole-object read (`get`) from now on, on either backend."""
    whole_reads: list[str] = []
    for cls in (FileSystemStore, RadosStore):
        async def counting_get(self: Any, location: str, _original: Any = cls.get, **kwargs: Any) -> bytes:
            whole_reads.append(location)
            return await _original(self, location, **kwargs)

        monkeypatch.setattr(cls, "get", counting_get)
    return whole_reads


# -- instances without pixel data, bulk data inside sequences, implicit VR multi-frame ---------------

async def test_other_instances(vna: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    others = _prepare(tmp_path, [("waveform_ecg.dcm", "ecg", 1), ("rtdose.dcm", "dose", 1)])
    url = await _loaded(vna, others, monkeypatch)
    client = _client(url)
    ecg, dose = others["waveform_ecg.dcm"], others["rtdose.dcm"]

    # PS3.18 F.2.6: a bulk value inside a sequence item has its own BulkDataURI, and it resolves
    meta = await asyncio.to_thread(client.retrieve_instance_metadata, ecg.study, ecg.series, ecg.sop)
    item = meta["54000100"]["Value"][0]
    uri = item["54001010"]["BulkDataURI"]
    assert uri.startswith(_instance_url(url, ecg) + "/bulk/")
    assert await asyncio.to_thread(client.retrieve_bulkdata, uri) == [ecg.ds.WaveformSequence[0].WaveformData]
    # PS3.18 10.4.1.1.3: frames of an instance without pixel data cannot be had
    status, _, body = await _get(f"{_instance_url(url, ecg)}/frames/1", 'multipart/related; type="*/*"')
    assert status == 400 and b"no pixel data" in body
    status, _, _ = await _get(f"{_instance_url(url, ecg)}/bulk/7FE00010", 'multipart/related; type="*/*"')
    assert status == 404
    d = await asyncio.to_thread(client.retrieve_instance, ecg.study, ecg.series, ecg.sop,
                                media_types=(("application/dicom", "*"),))
    assert d == ecg.ds

    # Implicit VR Little Endian, 15 frames of 32 bits: frames are slices of the stored value
    frames = await asyncio.to_thread(client.retrieve_instance_frames, dose.study, dose.series, dose.sop,
                                     list(range(1, 16)))
    assert frames == _native_frames(dose)
    d = await asyncio.to_thread(client.retrieve_instance, dose.study, dose.series, dose.sop,
                                media_types=(("application/dicom", ELE),))
    assert d.file_meta.TransferSyntaxUID == ELE and np.array_equal(d.pixel_array, dose.ds.pixel_array)


async def test_large_header_and_frames_read_alone(vna: Runtime, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A multi-frame instance whose elements before the pixel data outgrow the first reads: native
    frames and ranges of the pixel data are then read alone, never the whole object."""
    monkeypatch.setattr(wado, "HEADER_READ", 4096)
    whole_reads = count_whole_reads(monkeypatch)
    others = _prepare(tmp_path, [("emri_small.dcm", "mf", 1)])
    s = others["emri_small.dcm"]
    ds = pydicom.dcmread(s.path)
    private = bytes(range(251)) * 120  # 30120 bytes of private bulk data before the pixel data
    ds.private_block(0x0009, "VNA WADO TEST", create=True).add_new(0x01, "OB", private)
    ds.save_as(s.path, enforce_file_format=True)
    data = s.path.read_bytes()
    s = Sample(s.name, s.path, data, data[split_part10(data)[1]:], pydicom.dcmread(s.path), s.study, s.series,
               s.sop, s.ts, s.frames)
    url = await _loaded(vna, {s.name: s}, monkeypatch)
    client = _client(url)
    frames = await asyncio.to_thread(client.retrieve_instance_frames, s.study, s.series, s.sop, [10, 1, 5])
    expected = _native_frames(s)
    assert frames == [expected[9], expected[0], expected[4]]
    status, _, body = await _get(f"{_instance_url(url, s)}/bulk/00091001", "application/octet-stream")
    assert status == 200 and body == private
    value = b"".join(expected)
    status, _, body = await _get(f"{_instance_url(url, s)}/bulk/7FE00010", "application/octet-stream",
                                 Range="bytes=40001-50000")
    assert status == 206 and body == value[40001:50001]
    assert whole_reads == []


async def test_compressed_frames_read_alone_by_offset_table(vna: Runtime, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """PS3.5 A.4: a Basic (or Extended) Offset Table locates each frame's fragments, so a frame of a
    compressed multi-frame object is read alone; without one the fragments are walked."""
    monkeypatch.setattr(wado, "HEADER_READ", 1024)
    whole_reads = count_whole_reads(monkeypatch)
    source = get_testdata_file("emri_small_jpeg_2k_lossless.dcm")
    bitstreams = list(generate_frames(pydicom.dcmread(source).PixelData, number_of_frames=10))
    study, series = generate_uid(), generate_uid()
    variants = {}
    for name in ("bot-3-fragments", "eot", "no-table"):
        ds = pydicom.dcmread(source)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if name == "bot-3-fragments":
            ds.PixelData = encapsulate(bitstreams, fragments_per_frame=3, has_bot=True)
        elif name == "eot":
            ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = encapsulate_extended(bitstreams)
        else:
            ds.PixelData = encapsulate(bitstreams, fragments_per_frame=2, has_bot=False)
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        data = path.read_bytes()
        variants[name] = Sample(name, path, data, data[split_part10(data)[1]:], pydicom.dcmread(path), study,
                                series, str(ds.SOPInstanceUID), J2K_LOSSLESS, 10)
    url = await _loaded(vna, variants, monkeypatch)
    for name, s in variants.items():
        whole_reads.clear()
        status, headers, body = await _get(f"{_instance_url(url, s)}/frames/10,1,4", 'multipart/related; type="*/*"')
        assert status == 200, name
        assert [c for _, c in parse_multipart(headers["Content-Type"], body)] == \
            [bitstreams[9], bitstreams[0], bitstreams[3]], name
        assert len(whole_reads) == (1 if name == "no-table" else 0), name


async def test_bulk_data_inside_sequence_items_has_a_path_of_its_own(vna: Runtime, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """An Icon Image Sequence's Pixel Data (PS3.3 F.7) and the instance's own are two values: their BulkDataURIs
    differ (`bulk/7FE00010` and `bulk/00880200/0/7FE00010`) and each returns its own bytes, ranges too."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    icons = []
    for n in range(2):
        icon = pydicom.Dataset()
        icon.Rows = icon.Columns = 64
        icon.SamplesPerPixel, icon.PhotometricInterpretation = 1, "MONOCHROME2"
        icon.BitsAllocated, icon.BitsStored, icon.HighBit, icon.PixelRepresentation = 8, 8, 7, 0
        icon.PixelData = bytes((i * (n + 3)) % 251 for i in range(64 * 64))
        icons.append(icon)
    ds.IconImageSequence = pydicom.Sequence(icons)
    path = tmp_path / "icon.dcm"
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    ts, offset = split_part10(data)
    sample = Sample("icon", path, data, data[offset:], pydicom.dcmread(path), str(ds.StudyInstanceUID),
                    str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), ts, 1)
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    await asyncio.to_thread(_send, vna.ports.dicom, [sample])
    url = f"http://127.0.0.1:{vna.ports.http}/dicomweb"
    base = _instance_url(url, sample)

    client = _client(url)
    meta = await asyncio.to_thread(client.retrieve_instance_metadata, sample.study, sample.series, sample.sop)
    own = meta["7FE00010"]["BulkDataURI"]
    nested = [item["7FE00010"]["BulkDataURI"] for item in meta["00880200"]["Value"]]
    assert own == f"{base}/bulk/7FE00010"
    assert nested == [f"{base}/bulk/00880200/0/7FE00010", f"{base}/bulk/00880200/1/7FE00010"]
    assert await asyncio.to_thread(client.retrieve_bulkdata, own) == [b"".join(_native_frames(sample))]
    for uri, icon in zip(nested, icons, strict=True):
        assert await asyncio.to_thread(client.retrieve_bulkdata, uri) == [icon.PixelData]
    status, headers, body = await _get(nested[1], "application/octet-stream", Range="bytes=100-199")
    assert status == 206 and body == icons[1].PixelData[100:200]
    assert headers["Content-Range"] == f"bytes 100-199/{64 * 64}"
    # a path that names nothing is 404; one that is not a path is 400
    for missing in ("00880200/2/7FE00010", "00880200/0/00280010", "00081140/0/7FE00010"):
        status, _, _ = await _get(f"{base}/bulk/{missing}", "application/octet-stream")
        assert status == 404, missing
    for malformed in ("00880200/7FE00010", "00880200/x/7FE00010", "0088020/0/7FE00010"):
        status, _, _ = await _get(f"{base}/bulk/{malformed}", "application/octet-stream")
        assert status == 400, malformed
    status, _, _ = await _get(f"{base}/bulk/00880200/7FE00010", "application/octet-stream")
    assert status == 400
