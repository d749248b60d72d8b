"""A 300 MiB multi-frame instance through the archive, on both object stores: in by C-STORE (dcmtk storescu)
and by STOW-RS (PS3.18 10.5, streamed from the file), out by C-GET (dcmtk getscu, PS3.4 C.4.3) and WADO-RS
(PS3.18 10.4), bit for bit. On RADOS (part_size 32 MiB by default) each object is stored as 10 parts.

The instances are written once per module into temporary files (300 frames of 1024 x 512 16-bit pixels,
frame by frame: never the whole pixel data in memory) and checked by their SHA-256, computed while writing;
what comes back is hashed as it streams in. The server runs in this process: the peak resident memory of
the process is measured and bounded, and on RADOS the OSD's too (memstore keeps the data in RAM).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import struct
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from archive.attributes import Level
from archive.database import create_pool
from archive.index import Index
from archive.query import Query, QueryKey
from tests.conftest import BOTH_BACKENDS, DCMTK, run_tool
from tests.stored_objects import StoredObjects

MiB = 1 << 20
FRAMES, ROWS, COLUMNS = 300, 1024, 512
FRAME_BYTES = ROWS * COLUMNS * 2          # 16 bits allocated, one sample per pixel: 1 MiB a frame
PIXEL_BYTES = FRAMES * FRAME_BYTES        # 300 MiB
MF_GRAYSCALE_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word SC Image Storage
PART_SIZE = 32 * MiB                      # storage.rados.part_size default


@dataclass(frozen=True, slots=True)
class LargeFile:
    path: Path
    study: str
    series: str
    sop: str
    size: int               # of the whole PS3.10 file
    dataset_offset: int     # where the data set starts, after the File Meta Information
    file_sha256: str
    dataset_sha256: str


def _header(study: str, series: str, sop: str, number: int) -> bytes:
    """The PS3.10 file up to and including the Pixel Data element's header (its value follows)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = MF_GRAYSCALE_WORD_SC
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "LARGE-1", "Large^Object", "19700101", "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20240301", "101500", "ACC-LARGE", "1"
    ds.Modality, ds.ConversionType, ds.SeriesNumber, ds.InstanceNumber = "OT", "WSD", 1, number
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns, ds.NumberOfFrames = ROWS, COLUMNS, FRAMES
    ds.FrameIncrementPointer = 0x00181063  # Frame Time (PS3.3 C.7.6.6)
    ds.FrameTime = 40.0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    # PS3.5 7.1.2: Explicit VR OW: tag, VR, 2 reserved bytes, 32-bit length; Pixel Data is the last element
    return buffer.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, PIXEL_BYTES)


def write_large_files(directory: Path) -> list[LargeFile]:
    """Two instances of one study with the same 300 MiB of pixels, written frame by frame."""
    study, series = generate_uid(), generate_uid()
    sops = [generate_uid(), generate_uid()]
    heads = [_header(study, series, sop, n + 1) for n, sop in enumerate(sops)]
    offsets = [144 + int.from_bytes(h[140:144], "little") for h in heads]  # PS3.10 7.1: after (0002,0000)'s group
    whole = [hashlib.sha256(h) for h in heads]
    dataset = [hashlib.sha256(h[o:]) for h, o in zip(heads, offsets, strict=True)]
    paths = [directory / f"large-{n}.dcm" for n in range(len(sops))]
    rng = np.random.default_rng(300)
    files = [p.open("wb") for p in paths]
    try:
        for f, h in zip(files, heads, strict=True):
            f.write(h)
        for _ in range(FRAMES):
            frame = rng.bytes(FRAME_BYTES)
            for f, w, d in zip(files, whole, dataset, strict=True):
                f.write(frame)
                w.update(frame)
                d.update(frame)
    finally:
        for f in files:
            f.close()
    return [LargeFile(p, study, series, sop, len(h) + PIXEL_BYTES, o, "sha256:" + w.hexdigest(),
                      "sha256:" + d.hexdigest())
            for p, sop, h, o, w, d in zip(paths, sops, heads, offsets, whole, dataset, strict=True)]


@pytest.fixture(scope="module")
def large_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[LargeFile]]:
    files = write_large_files(tmp_path_factory.mktemp("large"))
    yield files
    for f in files:  # 600 MiB: not left for pytest's retention of temporary directories
        f.path.unlink()


# -- streaming digests -------------------------------------------------------------------------------------

class Part10Digest:
    """SHA-256 of a PS3.10 file fed in pieces, and of its data set (after the File Meta Information)."""

    def __init__(self) -> None:
        self.whole = hashlib.sha256()
        self.dataset = hashlib.sha256()
        self.size = 0
        self._head = bytearray()
        self._offset: int | None = None

    def update(self, data: bytes | memoryview) -> None:
        self.whole.update(data)
        start = self.size
        self.size += len(data)
        if self._offset is None:
            self._head += data
            if len(self._head) < 144:
                return
            assert self._head[128:132] == b"DICM" and self._head[132:138] == b"\x02\x00\x00\x00UL"
            self._offset = 144 + int.from_bytes(self._head[140:144], "little")
            data, start = bytes(self._head), 0
            self._head = bytearray()
        if start + len(data) > self._offset:
            self.dataset.update(memoryview(data)[max(self._offset - start, 0):])

    def digests(self) -> tuple[str, str]:
        return "sha256:" + self.whole.hexdigest(), "sha256:" + self.dataset.hexdigest()


def sha256_of_dataset(path: Path) -> str:
    digest = Part10Digest()
    with path.open("rb") as f:
        while chunk := f.read(8 * MiB):
            digest.update(chunk)
    return digest.digests()[1]


async def wado_instance(session: aiohttp.ClientSession, url: str) -> Part10Digest:
    """GET a WADO-RS instance resource as multipart/related; type="application/dicom" (PS3.18 10.4.1.1.1)
    and hash its one part while it streams in."""
    async with session.get(url, headers={"Accept": 'multipart/related; type="application/dicom"'}) as r:
        assert r.status == 200, await r.text()
        m = re.search(r'boundary="?([^";]+)"?', r.headers["Content-Type"])
        assert r.content_type == "multipart/related" and m
        close = b"\r\n--" + m.group(1).encode() + b"--"
        digest = Part10Digest()
        head = bytearray()
        pending = bytearray()
        async for chunk in r.content.iter_chunked(4 * MiB):
            if head is not None:
                head += chunk
                end = head.find(b"\r\n\r\n")
                if end < 0:
                    continue
                # RFC 2046 5.1.1: the first delimiter line, the part's headers, an empty line, the content
                assert head.startswith(b"--" + m.group(1).encode() + b"\r\n")
                assert b"content-type: application/dicom" in bytes(head[:end]).lower()
                chunk, head = bytes(head[end + 4:]), None
            pending += chunk
            keep = len(close) + 2  # the close-delimiter (and a CRLF after it) is not content
            if len(pending) > keep:
                digest.update(bytes(pending[:-keep]))
                del pending[:-keep]
        body_end = pending.rfind(close)
        assert body_end >= 0, "no close-delimiter"
        digest.update(bytes(pending[:body_end]))
        return digest


async def stow_from_file(session: aiohttp.ClientSession, url: str, path: Path) -> dict[str, Any]:
    boundary = "vna-large-object"

    async def body() -> AsyncIterator[bytes]:
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        f = await asyncio.to_thread(path.open, "rb")
        try:
            while chunk := await asyncio.to_thread(f.read, 4 * MiB):
                yield chunk
        finally:
            f.close()
        yield f"\r\n--{boundary}--\r\n".encode()

    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
               "Accept": "application/dicom+json"}
    async with session.post(url, data=body(), headers=headers) as r:
        assert r.status == 200, (r.status, r.reason, await r.text())
        return await r.json(content_type=None)


# -- peak memory -----------------------------------------------------------------------------------------

def _rss(pid: int | str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@contextmanager
def peak_rss(pids: dict[str, int | str]) -> Iterator[dict[str, int]]:
    """Sample the resident memory of each process every 20 ms; yields {name: peak growth in bytes}."""
    base = {name: _rss(pid) for name, pid in pids.items()}
    peaks = dict(base)
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            for name, pid in pids.items():
                peaks[name] = max(peaks[name], _rss(pid))

    growth: dict[str, int] = {}
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield growth
    finally:
        stop.set()
        thread.join()
        growth.update({name: peaks[name] - base[name] for name in pids})


# -- the test ----------------------------------------------------------------------------------------------

@BOTH_BACKENDS
async def test_300_mib_instance_round_trips_bit_identical(store_settings: dict[str, Any], vna_factory: Any,
                                                          database_url: str, large_files: list[LargeFile],
                                                          tmp_path: Path, request: pytest.FixtureRequest) -> None:
    rt = await vna_factory()
    dimse, dicomweb = large_files
    assert dimse.size > 300 * MiB and dimse.file_sha256 != dicomweb.file_sha256
    pids: dict[str, int | str] = {"vna": "self"}
    if store_settings["backend"] == "rados":
        osd = request.getfixturevalue("ceph_cluster")["osds"][0]["pid_file"]
        pids["osd"] = int(Path(osd).read_text())
    root = f"http://127.0.0.1:{rt.ports.http}/dicomweb"
    timings: dict[str, float] = {}

    with peak_rss(pids) as growth:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
            # in: one by C-STORE (PS3.4 B.2), one by STOW-RS (PS3.18 10.5)
            started = time.monotonic()
            await run_tool(DCMTK / "storescu", "-aet", "LARGESCU", "-aec", "VNA", "127.0.0.1", str(rt.ports.dicom),
                           dimse.path, timeout=120)
            timings["c-store"] = time.monotonic() - started
            started = time.monotonic()
            payload = await stow_from_file(http, f"{root}/studies", dicomweb.path)
            timings["stow-rs"] = time.monotonic() - started
            assert "00081198" not in payload  # no Failed SOP Sequence (PS3.18 I.1)

            # out by WADO-RS: the STOW-RS instance is the file that was sent (stored as received); the C-STORE
            # one is vna's File Meta Information around the data set that was sent
            started = time.monotonic()
            for f in (dimse, dicomweb):
                got = await wado_instance(http, f"{root}/studies/{f.study}/series/{f.series}/instances/{f.sop}")
                whole, dataset = got.digests()
                assert dataset == f.dataset_sha256, f"WADO-RS of {f.path.name}: another data set"
                if f is dicomweb:
                    assert (whole, got.size) == (f.file_sha256, f.size)
            timings["wado-rs x2"] = time.monotonic() - started

        # out by C-GET of the study: both instances on the requesting association, written as received (+B)
        started = time.monotonic()
        out = tmp_path / "get"
        out.mkdir()
        await run_tool(DCMTK / "getscu", "-S", "-aet", "GETSCU", "-aec", "VNA", "--max-pdu", "131072", "+B",
                       "-od", out, "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={dimse.study}",
                       "127.0.0.1", str(rt.ports.dicom), timeout=120)
        timings["c-get x2"] = time.monotonic() - started
        received = sorted(out.iterdir())
        assert len(received) == 2
        assert sorted(await asyncio.gather(*(asyncio.to_thread(sha256_of_dataset, p) for p in received))) == \
            sorted(f.dataset_sha256 for f in (dimse, dicomweb))
        for p in received:
            p.unlink()

    # the index and the store: two objects, each of the size indexed; on RADOS in parts of 32 MiB
    pool = await create_pool(database_url, min_size=1, max_size=1, command_timeout=10)
    try:
        located = await Index(pool).locate(
            Query(level=Level.SERIES, keys=(QueryKey(0x0020000D, "UI", dimse.study),), top=Level.STUDY), timeout=10)
    finally:
        await pool.close()
    assert len(located) == 2
    objects = StoredObjects.of(rt.settings)
    assert await objects.locations() == {i.location for i in located}
    for inst in located:
        sizes = await objects.part_sizes(inst.location)
        assert sum(sizes) == inst.size
        if objects.backend == "rados":
            assert len(sizes) == -(-inst.size // PART_SIZE) == 10
            assert set(sizes[:-1]) == {PART_SIZE}

    # memory (shown with -s): the server holds a data set whole while it ingests it (measured: ~850 MiB more
    # during the C-STORE of 300 MiB), and a C-GET holds the object it sends and the next one, read ahead
    # (~1.2 GiB for these two); bounded here so that another whole copy per layer would show
    print(f"\n{store_settings['backend']}: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
          + "; peak RSS growth " + ", ".join(f"{k} {v / MiB:.0f} MiB" for k, v in growth.items()))
    assert growth["vna"] < 6 * PIXEL_BYTES, growth
    if "osd" in growth:  # memstore: both objects (~2x their size in RSS), and its own overhead
        assert growth["osd"] < 6 * PIXEL_BYTES, growth
