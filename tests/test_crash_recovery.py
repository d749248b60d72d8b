"""kill -9 of a vna process in the middle of a storescu run, then restart on the same data.

What must hold (the ingest order of archive/ingest.py): every instance that got a success status is
indexed and retrievable with the bytes that were sent; every index row names an object whose
digest (BLAKE3 by default) is the indexed one; objects the crash left without a row are removed by the orphan sweep.
On both object stores: the filesystem, and RADOS (the child gets the test pool's settings in its
environment, and the objects are read with librados).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

from archive.config import Settings
from archive.database import create_pool
from archive.index import Index
from archive.ingest import sweep_orphans
from metrics.registry import Metrics
from tests.conftest import BOTH_BACKENDS, DCMTK, run_tool, storage_env
from tests.digests import blake3_text
from tests.stored_objects import StoredObjects

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


class VnaProcess:
    """`python -m gateway.cli serve` as a child process on ephemeral ports (found in ports.json)."""

    def __init__(self, data_dir: Path, database_url: str, *, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = ()) -> None:
        self.data_dir = data_dir
        self.database_url = database_url
        self.env = env or {}
        self.args = args
        self.proc: asyncio.subprocess.Process | None = None
        self.dicom_port = self.http_port = 0
        self.log_path = data_dir.parent / f"{data_dir.name}-vna.log"

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "gateway.cli", "serve", "--data-dir", str(self.data_dir),
                "--database-url", self.database_url, "--dicom-port", "0", "--http-port", "0", *self.args]

    async def start(self, timeout: float = 60) -> "VnaProcess":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ports_file = self.data_dir / "ports.json"
        ports_file.unlink(missing_ok=True)  # a previous run's file names dead ports
        env = {**os.environ, "PYTHONPATH": str(REPO), "VNA__DICOM__HOST": HOST, "VNA__HTTP__HOST": HOST,
               **self.env}
        with open(self.log_path, "ab") as log:
            self.proc = await asyncio.create_subprocess_exec(*self.command, cwd=REPO, env=env,
                                                             stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not ports_file.exists():
            if self.proc.returncode is not None:
                raise AssertionError(f"vna exited {self.proc.returncode} at start:\n{self.log()}")
            assert time.monotonic() < deadline, f"no ports.json after {timeout}s:\n{self.log()}"
            await asyncio.sleep(0.05)
        ports = json.loads(ports_file.read_text())
        self.dicom_port, self.http_port = ports["dicom"], ports["http"]
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def stop(self) -> None:
        """Make sure the child is gone (used on every exit path of a test)."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@contextlib.asynccontextmanager
async def vna_process(data_dir: Path, database_url: str, **kwargs: object) -> AsyncIterator[VnaProcess]:
    vna = VnaProcess(data_dir, database_url, **kwargs)  # type: ignore[arg-type]
    try:
        yield await vna.start()
    finally:
        await vna.stop()


# -- test data ---------------------------------------------------------------------------------------

def write_ct_series(directory: Path, count: int, *, rows: int = 64, columns: int = 64) -> tuple[str, dict[str, Path]]:
    """`count` CT images of one study and series as PS3.10 files named <SOP Instance UID>.dcm."""
    directory.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    rng = np.random.default_rng(1)
    files = {}
    for n in range(1, count + 1):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "CRASH-1", "Crash^Test", "19700101", "O"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20240301", "101500", "ACC-CRASH", "1"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, n
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SliceThickness, ds.ImagePositionPatient = 1.0, [0.0, 0.0, float(n)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [0.7, 0.7]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = rows, columns
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = rng.integers(0, 4096, (rows, columns), dtype=np.uint16).tobytes()
        path = directory / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files[ds.SOPInstanceUID] = path
    return study, files


def dataset_bytes(path: Path) -> bytes:
    """The data set of a PS3.10 file as it travels in a C-STORE (without preamble and File Meta)."""
    data = path.read_bytes()
    # PS3.10 7.1: 128-byte preamble, 'DICM', then (0002,0000) UL: tag, VR, length, 4-byte value
    assert data[128:132] == b"DICM" and data[132:138] == b"\x02\x00\x00\x00UL"
    group_length = int.from_bytes(data[140:144], "little")
    return data[144 + group_length:]


def c_get_study(port: int, study_uid: str) -> tuple[int, dict[str, bytes]]:
    """C-GET one study with pynetdicom; (final status, SOP Instance UID -> received data set bytes)."""
    received: dict[str, bytes] = {}
    lock = threading.Lock()

    def on_store(event: evt.Event) -> int:
        with lock:
            received[event.request.AffectedSOPInstanceUID] = event.request.DataSet.getvalue()
        return 0x0000

    ae = AE(ae_title="GETSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(HOST, port, ae_title="VNA", ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    final = None
    for status, _identifier in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
        final = status.Status
    assoc.release()
    assert final is not None
    return final, received


def object_digest(data: bytes) -> str:
    return blake3_text(data)


# -- the test ----------------------------------------------------------------------------------------

KILL_AFTER = 200  # acknowledged instances before SIGKILL
TOTAL = 500
KILL_DELAYS = (0.0, 0.001, 0.002, 0.003)  # seconds after a request is sent (varied across runs)


@BOTH_BACKENDS
async def test_kill_9_during_storescu_run(tmp_path: Path, database_url: str, store_settings: dict[str, object]) -> None:
    data_dir = tmp_path / "vna"
    study_uid, files = await asyncio.to_thread(write_ct_series, tmp_path / "in", TOTAL)
    by_path = {str(p): uid for uid, p in files.items()}
    env = storage_env(store_settings)
    stored = StoredObjects.of(Settings.load({"data_dir": data_dir, "storage": store_settings}))

    async with vna_process(data_dir, database_url, env=env) as vna:
        storescu = await asyncio.create_subprocess_exec(
            str(DCMTK / "storescu"), "-v", "-aet", "CRASHSCU", "-aec", "VNA", HOST, str(vna.dicom_port),
            *map(str, files.values()),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "TCP_NODELAY": "1"})
        assert storescu.stdout is not None
        # storescu -v names the file before each request and reports each response:
        #   I: Sending file: /path/<uid>.dcm ... I: Received Store Response (Success)
        acknowledged: list[str] = []
        current: str | None = None
        output: list[str] = []
        killed = False
        try:
            async for raw in storescu.stdout:
                line = raw.decode(errors="replace").rstrip()
                output.append(line)
                if m := re.match(r"I: Sending file: (.+)$", line):
                    current = by_path[m.group(1)]
                elif line.startswith("I: Received Store Response"):
                    assert current is not None
                    if "(Success)" in line:
                        acknowledged.append(current)
                    current = None
                elif line.startswith("I: Sending Store Request") and len(acknowledged) >= KILL_AFTER and not killed:
                    # the server is now receiving or storing the next instance: kill it in the middle
                    await asyncio.sleep(KILL_DELAYS[len(output) % len(KILL_DELAYS)])
                    vna.signal(signal.SIGKILL)
                    killed = True
            await asyncio.wait_for(storescu.wait(), 60)
        finally:
            if storescu.returncode is None:
                storescu.kill()
                await storescu.wait()
        assert killed, "storescu finished before the kill:\n" + "\n".join(output[-20:])
        assert await vna.wait() == -signal.SIGKILL
    assert storescu.returncode != 0  # the association died under it
    assert KILL_AFTER <= len(acknowledged) < TOTAL

    # Before restarting: the index and the object store as the crash left them.
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT sop_instance_uid, location, digest, size FROM instance")
    finally:
        await conn.close()
    indexed = {r["sop_instance_uid"]: r for r in rows}
    missing = set(acknowledged) - set(indexed)
    assert not missing, f"{len(missing)} acknowledged instances are not indexed"
    on_store = await stored.locations()
    for r in rows:
        assert r["location"] in on_store, f"index row {r['sop_instance_uid']} names missing object {r['location']}"
        data = await stored.read(r["location"])
        assert len(data) == r["size"]
        assert object_digest(data) == r["digest"], f"object {r['location']} does not match its digest"

    # An object the index does not name is what a crash between "write object" and "index it"
    # leaves (plus .tmp- files from a write cut short). The kill may or may not have landed in that
    # window, so add one such object ourselves: a copy stored under the key scheme, never indexed
    # (on RADOS also the parts, without manifest, of a multi-part put cut short).
    key = f"{study_uid}/orphan-series/1.2.3.4.5.6.7.8.9.0000000000000000.dcm"
    async with stored.store() as store:
        planted = {(await store.put(key, [b"\0" * 128 + b"DICM"], timeout=10)).location}
    if stored.backend == "rados":
        for n in range(2):
            await stored.write_raw(f"{stored.pool}/{key}-cut.part-{n:04d}", b"\0" * 1000)
            planted.add(f"{stored.pool}/{key}-cut.part-{n:04d}")
    orphans = await stored.locations() - {r["location"] for r in rows}
    assert planted <= orphans

    pool = await create_pool(database_url, min_size=1, max_size=2, command_timeout=30)
    try:
        async with stored.store() as store:
            removed = await sweep_orphans(Index(pool), store, grace_seconds=0, metrics=Metrics())
    finally:
        await pool.close()
    assert removed == len(orphans)
    assert await stored.locations() == {r["location"] for r in rows}

    # Restart on the same data directory and database: everything acknowledged comes back, byte for byte.
    async with vna_process(data_dir, database_url, env=env) as vna:
        status, received = await asyncio.to_thread(c_get_study, vna.dicom_port, study_uid)
        assert status == 0x0000  # PS3.4 C.4.3.3: every sub-operation completed
        assert set(received) == set(indexed)
        for uid in acknowledged:
            assert received[uid] == dataset_bytes(files[uid]), f"instance {uid} differs from what was sent"

        # The sender retries what was not acknowledged. An instance that was indexed but whose
        # response was lost in the crash comes again with identical content: still a success.
        rest = [str(files[uid]) for uid in files if uid not in set(acknowledged)]
        await run_tool(DCMTK / "storescu", "-aet", "CRASHSCU", "-aec", "VNA", HOST, str(vna.dicom_port), *rest)
        status, received = await asyncio.to_thread(c_get_study, vna.dicom_port, study_uid)
    assert status == 0x0000
    assert set(received) == set(files)
    for uid, path in files.items():
        assert received[uid] == dataset_bytes(path), f"instance {uid} differs from what was sent"
