"""The OSD stops in the middle of ingest (SIGSTOP of the session cluster's only ceph-osd), then comes back.

While it is stopped, C-STORE (dcmtk storescu, two pynetdicom associations) and STOW-RS (two clients) keep
sending. What must hold:
- an instance is acknowledged (C-STORE status 0000, PS3.4 B.2.3; listed in the Referenced SOP Sequence of
  the STOW-RS response, PS3.18 I.1) only if it was stored: everything acknowledged is indexed and
  comes back bit for bit afterwards; what was not stored gets a failure (A700 Out of Resources over
  DIMSE; 0110 Processing Failure in the Failed SOP Sequence, 503 when nothing of a request was stored,
  PS3.18 10.5.3.1) and is not indexed;
- no index row names an object that is missing or differs from its digest (read with librados);
  an object without a row may remain (a write that reached the OSD after vna gave up): only of a
  failed instance, for the orphan sweep;
- the server stays up: C-ECHO, C-FIND and QIDO-RS answer while the OSD is stopped (they need only the
  index);
- after SIGCONT new stores succeed.
The store's op_timeout is 2 s and parts are 256 KiB, so every fifth instance (~1 MiB) is written in parts.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config

from archive.database import create_pool
from gateway.runtime import Runtime
from tests.conftest import DCMTK, run_tool
from tests.stored_objects import PART_SUFFIX, StoredObjects
from tests.test_rados_store import c_get as c_get_study  # PS3.4 C.4.3 with pynetdicom

SUCCESS, OUT_OF_RESOURCES, PROCESSING_FAILURE = 0x0000, 0xA700, 0x0110
STOPPED_FOR = 5.0      # seconds the OSD stays stopped
OP_TIMEOUT = 2         # storage.rados.op_timeout
STOW_BOUNDARY = "vna-faults"


# -- test data ---------------------------------------------------------------------------------------------

def write_ct(directory: Path, study: str, series: str, n: int) -> tuple[str, Path]:
    """A CT image of 64x64 (8 KiB), every fifth one 724x724 (~1 MiB: 5 parts of 256 KiB on RADOS)."""
    size = 724 if n % 5 == 0 else 64
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "FAULT-1", "Fault^Osd", "19700101", "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20240301", "101500", "ACC-FAULT", "1"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, n
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.Rows, ds.Columns = 1, "MONOCHROME2", size, size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.random.default_rng(n).integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
    path = directory / f"{n:04d}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID), path


def dataset_bytes_of(part10: bytes) -> bytes:
    # PS3.10 7.1: 128-byte preamble, 'DICM', then (0002,0000) UL: the File Meta Information's length
    assert part10[128:132] == b"DICM" and part10[132:138] == b"\x02\x00\x00\x00UL"
    return part10[144 + int.from_bytes(part10[140:144], "little"):]


def dataset_bytes(path: Path) -> bytes:
    return dataset_bytes_of(path.read_bytes())


# -- clients -----------------------------------------------------------------------------------------------

def paced_c_store(port: int, files: list[tuple[str, Path]], calling_ae: str, pause: float,
                  outcomes: dict[str, int | None]) -> None:
    """C-STORE each file's own bytes on one association, `pause` s apart; SOP Instance UID -> status
    (None: no response)."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="VNA")
    assert assoc.is_established
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        for sop, path in files:
            rsp = assoc.send_c_store(str(path))
            outcomes[sop] = int(rsp.Status) if "Status" in rsp else None
            time.sleep(pause)
    finally:
        assoc.release()


async def paced_stow(http: aiohttp.ClientSession, url: str, batches: list[list[tuple[str, Path]]], pause: float,
                     outcomes: dict[str, int], http_statuses: list[int]) -> None:
    """STOW-RS each batch as one request; SOP Instance UID -> 0 (Referenced SOP Sequence) or its Failure
    Reason (Failed SOP Sequence)."""
    for batch in batches:
        body = b"".join(f"--{STOW_BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                        + path.read_bytes() + b"\r\n" for _, path in batch) + f"--{STOW_BOUNDARY}--\r\n".encode()
        headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={STOW_BOUNDARY}',
                   "Accept": "application/dicom+json"}
        async with http.post(url, data=body, headers=headers) as r:
            http_statuses.append(r.status)
            payload = await r.json(content_type=None)
        for item in payload.get("00081199", {}).get("Value", []):
            outcomes[item["00081155"]["Value"][0]] = SUCCESS
        for item in payload.get("00081198", {}).get("Value", []):
            outcomes[item["00081155"]["Value"][0]] = item["00081197"]["Value"][0]
        assert {sop for sop, _ in batch} <= outcomes.keys(), "an instance of the request has no outcome"
        await asyncio.sleep(pause)


async def wado_instance(http: aiohttp.ClientSession, url: str) -> bytes:
    """The one part of a WADO-RS instance retrieve (PS3.18 10.4.1.1.1), as multipart/related."""
    async with http.get(url, headers={"Accept": 'multipart/related; type="application/dicom"'}) as r:
        assert r.status == 200
        m = re.search(r'boundary="?([^";]+)"?', r.headers["Content-Type"])
        assert m is not None
        body = await r.read()
    start = body.index(b"\r\n\r\n") + 4  # RFC 2046 5.1.1: delimiter, the part's headers, an empty line
    return body[start:body.rindex(b"\r\n--" + m.group(1).encode() + b"--")]


def sop_of(location: str) -> str:
    """The SOP Instance UID in an object's key: <pool>/<study>/<series>/<sop>.<random>.dcm[.part-NNNN]."""
    name = PART_SUFFIX.sub("", location).rsplit("/", 1)[1]
    return name.removesuffix(".dcm").rsplit(".", 1)[0]


# -- the test ----------------------------------------------------------------------------------------------

@pytest.fixture
def chunked_send(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)


@pytest.mark.parametrize("store_settings", ["rados"], indirect=True)
async def test_osd_stopped_during_ingest(store_settings: dict[str, Any], vna_factory: Callable[..., Any],
                                         ceph_cluster: dict[str, Any], database_url: str, tmp_path: Path,
                                         chunked_send: None) -> None:
    rt: Runtime = await vna_factory(storage={"rados": {**store_settings["rados"], "op_timeout": OP_TIMEOUT,
                                                        "part_size": 256 << 10}})
    port = rt.ports.dicom
    root = f"http://127.0.0.1:{rt.ports.http}/dicomweb"
    study, series = generate_uid(), (generate_uid(), generate_uid())
    files = await asyncio.to_thread(lambda: [write_ct(tmp_path, study, series[n % 2], n) for n in range(1, 311)])
    sent = dict(files)
    series_of = {sop: series[n % 2] for n, (sop, _) in enumerate(files, start=1)}
    paced = [files[0:40], files[40:80]]                                      # pynetdicom, 2 associations
    stow = [[files[n], files[n + 1]] for n in range(80, 140, 2)]             # STOW-RS, 2 clients
    stow_batches = [stow[0::2], stow[1::2]]
    by_storescu = files[140:310]                                             # storescu, one association
    osd_pid = int(Path(ceph_cluster["osds"][0]["pid_file"]).read_text())

    dimse_outcomes: dict[str, int | None] = {}
    stow_outcomes: dict[str, int] = {}
    stow_statuses: list[int] = []
    loop = asyncio.get_running_loop()
    stopped = resumed = 0.0
    # the clients block: threads of their own, not the loop's default executor that the server needs
    with ThreadPoolExecutor(max_workers=2) as threads:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            clients = [loop.run_in_executor(threads, paced_c_store, port, chunk, f"PACED{n}", 0.05, dimse_outcomes)
                       for n, chunk in enumerate(paced)]
            clients += [asyncio.ensure_future(paced_stow(http, f"{root}/studies", batches, 0.1, stow_outcomes,
                                                         stow_statuses)) for batches in stow_batches]
            await asyncio.sleep(0.5)

            # storescu -v names each file before its request and reports each response; -nh: go on after a failure
            storescu = await asyncio.create_subprocess_exec(
                str(DCMTK / "storescu"), "-v", "-nh", "-aet", "STORESCU", "-aec", "VNA", "127.0.0.1", str(port),
                *(str(p) for _, p in by_storescu), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                env={**os.environ, "TCP_NODELAY": "1"})
            assert storescu.stdout is not None
            by_path = {str(p): sop for sop, p in by_storescu}
            storescu_outcomes: dict[str, bool] = {}
            current: str | None = None
            try:
                async for raw in storescu.stdout:
                    line = raw.decode(errors="replace").rstrip()
                    if m := re.match(r"I: Sending file: (.+)$", line):
                        current = by_path[m.group(1)]
                    elif line.startswith("I: Received Store Response"):
                        assert current is not None
                        storescu_outcomes[current] = "(Success)" in line
                        current = None
                    if not stopped and sum(storescu_outcomes.values()) >= 20:
                        os.kill(osd_pid, signal.SIGSTOP)
                        stopped = time.monotonic()
                        answered = await server_answers_while_stopped(rt, http, study)
                        await asyncio.sleep(max(0.0, STOPPED_FOR - (time.monotonic() - stopped)))
                        os.kill(osd_pid, signal.SIGCONT)
                        resumed = time.monotonic()
                await asyncio.wait_for(storescu.wait(), 60)
            finally:
                os.kill(osd_pid, signal.SIGCONT)
                if storescu.returncode is None:
                    storescu.kill()
                    await storescu.wait()
            await asyncio.gather(*clients)
    assert stopped and resumed, "the OSD was never stopped"
    assert answered["seconds"] < OP_TIMEOUT, answered  # none of them waited for the store

    # every instance got an outcome; some failed (the stop hit each kind of client), with a failure status
    acknowledged = {sop for sop, ok in storescu_outcomes.items() if ok}
    acknowledged |= {sop for sop, status in dimse_outcomes.items() if status == SUCCESS}
    acknowledged |= {sop for sop, status in stow_outcomes.items() if status == SUCCESS}
    assert storescu_outcomes.keys() == {sop for sop, _ in by_storescu}
    assert dimse_outcomes.keys() == {sop for chunk in paced for sop, _ in chunk}
    assert stow_outcomes.keys() == {sop for batches in stow_batches for batch in batches for sop, _ in batch}
    assert not all(storescu_outcomes.values())
    assert {s for s in dimse_outcomes.values() if s != SUCCESS} == {OUT_OF_RESOURCES}  # PS3.4 B.2.3
    assert {s for s in stow_outcomes.values() if s != SUCCESS} == {PROCESSING_FAILURE}  # PS3.18 I.2.2
    # PS3.18 10.5.3.1: 202 when some instances of a request were stored, else 503 (the archive failed)
    assert set(stow_statuses) <= {200, 202, 503} and {202, 503} & set(stow_statuses)
    failed = set(sent) - acknowledged
    assert failed and len(acknowledged) > 100
    print(f"\nfailed while the OSD was stopped: storescu {sum(not ok for ok in storescu_outcomes.values())}"
          f"/{len(storescu_outcomes)}, pynetdicom {sum(s != SUCCESS for s in dimse_outcomes.values())}"
          f"/{len(dimse_outcomes)}, STOW-RS {sum(s != SUCCESS for s in stow_outcomes.values())}/{len(stow_outcomes)}"
          f" (HTTP {sorted(set(stow_statuses))}); queries answered in {answered['seconds']:.2f}s")

    # the index holds exactly what was acknowledged, every row's object is there and matches its digest
    pool = await create_pool(database_url, min_size=1, max_size=1, command_timeout=10)
    try:
        rows = await pool.fetch("SELECT sop_instance_uid, location, size, digest FROM instance")
    finally:
        await pool.close()
    assert {r["sop_instance_uid"] for r in rows} == acknowledged
    objects = StoredObjects.of(rt.settings)
    present = await objects.locations()
    for r in rows:
        assert r["location"] in present, f"row {r['sop_instance_uid']} names a missing object"
        data = await objects.read(r["location"])  # librados: size and digests checked against the manifest
        assert len(data) == r["size"] and dataset_bytes_of(data) == dataset_bytes(sent[r["sop_instance_uid"]])
    # A write the client gave up on (ETIMEDOUT) may still land when the OSD resumes, a manifest without
    # its parts or parts without a manifest: garbage of a failed instance, for the orphan sweeper. Such
    # objects are not read; they must only belong to instances that were reported as failed.
    orphans = present - {r["location"] for r in rows}
    assert {sop_of(loc) for loc in orphans} <= failed

    # after the OSD is back: new stores succeed, and everything acknowledged is there bit for bit
    late_dimse, late_stow = (write_ct(tmp_path, study, series[0], n) for n in (1001, 1002))
    late: dict[str, int | None] = {}
    await asyncio.to_thread(paced_c_store, port, [late_dimse], "LATE", 0, late)
    late_stow_outcomes: dict[str, int] = {}
    async with aiohttp.ClientSession() as http:
        await paced_stow(http, f"{root}/studies", [[late_stow]], 0, late_stow_outcomes, [])
        assert late == {late_dimse[0]: SUCCESS} and late_stow_outcomes == {late_stow[0]: SUCCESS}
        status, received = await asyncio.to_thread(c_get_study, port, study)
        assert status == SUCCESS  # PS3.4 C.4.3.3.1: every sub-operation completed
        assert acknowledged <= received.keys() and len(received) == len(acknowledged) + 2
        for sop in acknowledged:
            assert received[sop] == dataset_bytes(sent[sop]), f"{sop} differs from what was sent"
        # and STOW-RS's instances, stored as received, are the files that were sent (WADO-RS)
        for sop in sorted(acknowledged & stow_outcomes.keys()):
            assert await wado_instance(http, f"{root}/studies/{study}/series/{series_of[sop]}/instances/{sop}") == \
                sent[sop].read_bytes()


async def server_answers_while_stopped(rt: Runtime, http: aiohttp.ClientSession, study: str) -> dict[str, Any]:
    """C-ECHO (PS3.7 9.1.5), C-FIND (PS3.4 C.4.1) and QIDO-RS (PS3.18 10.6) with the OSD stopped."""
    started = time.monotonic()
    port = str(rt.ports.dicom)
    echo = await run_tool(DCMTK / "echoscu", "-aet", "ECHOSCU", "-aec", "VNA", "127.0.0.1", port, timeout=10)
    assert echo.returncode == 0
    found = await run_tool(DCMTK / "findscu", "-S", "-aet", "FINDSCU", "-aec", "VNA", "-k", "QueryRetrieveLevel=STUDY",
                           "-k", f"StudyInstanceUID={study}", "-k", "NumberOfStudyRelatedInstances",
                           "127.0.0.1", port, timeout=10)
    assert study in found.stderr
    async with http.get(f"{rt_root(rt)}/studies/{study}/instances", params={"limit": "1000"}) as r:
        assert r.status == 200
        instances = len(await r.json(content_type=None))
    async with http.get(f"http://127.0.0.1:{rt.ports.http}/livez") as r:
        assert r.status == 200
    return {"seconds": time.monotonic() - started, "qido_instances": instances}


def rt_root(rt: Runtime) -> str:
    return f"http://127.0.0.1:{rt.ports.http}/dicomweb"
