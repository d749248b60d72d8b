"""Helpers shared by the storage-policy tests (test_policy, test_placement, test_moves): a three-OSD Ceph cluster
in two datacentres, small synthetic CT instances, STOW-RS and storescu senders, monitor commands."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from archive.config import RadosSettings
from archive.rados_store import RadosConnection
from tests.conftest import CEPH_CLUSTER_SCRIPT, DCMTK, rados_settings, run_tool
from tests.digests import blake3_text

# scripts/ceph-cluster --osds 3: dc-a = h1 (osd.0), h2 (osd.1); dc-b = h3 (osd.2)
DC_A_OSDS = {0, 1}
DC_B_OSDS = {2}

# the acceptance policy of the Ceph issue: North Hospital one copy per datacentre, South Clinic in dc-a only
POLICY = """\
default_class: default
classes:
  default: {pool: vna}
  all-dc:
    pool: vna-all-dc
    description: one copy in each datacentre
  regional: {pool: vna-dc-a}
rules:
  - name: north
    match: {institution_name: North Hospital}
    class: all-dc
  - name: south
    match: {institution_name: South Clinic}
    class: regional
"""


@contextlib.contextmanager
def cluster3() -> Iterator[dict[str, Any]]:
    """A throwaway three-OSD cluster (scripts/ceph-cluster --osds 3): its cluster.json plus "dir"."""
    with tempfile.TemporaryDirectory(prefix="vna-test-ceph3-") as parent:
        d = Path(parent) / "cluster"
        subprocess.run([CEPH_CLUSTER_SCRIPT, "start", d, "--osds", "3", "--osd-bytes", str(768 << 20)], check=True,
                       stdout=subprocess.DEVNULL, timeout=180)
        try:
            yield {**json.loads((d / "cluster.json").read_text()), "dir": str(d)}
        finally:
            subprocess.run([CEPH_CLUSTER_SCRIPT, "stop", d], check=True, timeout=60)


def storage_for(cluster: dict[str, Any], policy_file: Path | None = None, **rados: Any) -> dict[str, Any]:
    """`storage` settings of a vna on `cluster` with a policy file."""
    out: dict[str, Any] = {"backend": "rados", "rados": rados_settings(cluster, **rados)}
    if policy_file is not None:
        out["policy_file"] = policy_file
    return out


def cli_env(cluster: dict[str, Any], database_url: str, data_dir: Path) -> dict[str, str]:
    """The environment a `python -m gateway.cli ...` subprocess needs to use `cluster` and the test's database."""
    r = rados_settings(cluster)
    return {"VNA__STORAGE__BACKEND": "rados", "VNA__STORAGE__RADOS__CONFFILE": str(r["conffile"]),
            "VNA__STORAGE__RADOS__KEYRING": str(r["keyring"]), "VNA__STORAGE__RADOS__CLIENT_NAME": r["client_name"],
            "VNA__STORAGE__RADOS__OP_TIMEOUT": "10", "VNA__DATABASE__URL": database_url,
            "VNA__DATA_DIR": str(data_dir), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


@contextlib.asynccontextmanager
async def monitor(cluster: dict[str, Any]) -> AsyncIterator[RadosConnection]:
    """A librados connection for monitor commands and pool listings."""
    conn = RadosConnection(RadosSettings(**rados_settings(cluster)))
    await conn.connect()
    try:
        yield conn
    finally:
        await conn.close()


async def pool_objects(conn: RadosConnection, pool: str) -> set[str]:
    io = await conn.ioctx(pool)
    return set(await asyncio.to_thread(lambda: [o.key for o in io.list_objects()]))


async def purge(cluster: dict[str, Any], pools: tuple[str, ...] = ("vna", "vna-dc-a", "vna-all-dc")) -> None:
    """Remove every object from `pools` (tests of one module share a cluster, each with its own database)."""
    async with monitor(cluster) as conn:
        for pool in pools:
            io = await conn.ioctx(pool)
            await asyncio.to_thread(lambda: [io.remove_object(o.key) for o in io.list_objects()])


async def acting_sets(conn: RadosConnection, pool: str, names: list[str]) -> dict[str, list[int]]:
    """`ceph osd map POOL OBJECT` of each object: its acting set (the OSDs holding its copies), 32 at a time."""
    gate = asyncio.Semaphore(32)

    async def one(name: str) -> tuple[str, list[int]]:
        async with gate:
            out = await conn.mon_command({"prefix": "osd map", "pool": pool, "object": name})
            return name, list(out["acting"])

    return dict(await asyncio.gather(*(one(n) for n in names)))


# -- instances --------------------------------------------------------------------------------------------------

def make_ct(institution: str, *, study: str, series: str, n: int, size: int = 64, modality: str = "CT",
            patient_id: str = "POLICY-1") -> Dataset:
    """A small CT Image (PS3.3 A.3) from `institution` (InstitutionName, General Equipment Module C.7.5.1)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = patient_id, "Policy^Test", "19700101", "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20240301", "101500", "ACC-POL", "1"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1, n
    ds.InstitutionName = institution
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.Rows, ds.Columns = 1, "MONOCHROME2", size, size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.random.default_rng(n).integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
    return ds


def part10(ds: Dataset) -> bytes:
    out = BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def object_digest(data: bytes) -> str:
    """The digest the index records for `data` under the default `storage.digest` (BLAKE3)."""
    return blake3_text(data)


async def stow(http: aiohttp.ClientSession, http_port: int, files: list[bytes], *, per_request: int = 50) -> None:
    """STOW-RS (PS3.18 10.5) of `files`, `per_request` parts per request; every part must be stored (200)."""
    for start in range(0, len(files), per_request):
        boundary = "policy-boundary-7d3f"
        body = BytesIO()
        for data in files[start:start + per_request]:
            body.write(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n")
        body.write(b"--" + boundary.encode() + b"--\r\n")
        async with http.post(f"http://127.0.0.1:{http_port}/dicomweb/studies", data=body.getvalue(),
                             headers={"Content-Type": f'multipart/related; type="application/dicom"; '
                                                      f"boundary={boundary}",
                                      "Accept": "application/dicom+json"}) as r:
            assert r.status == 200, (r.status, await r.text())


async def storescu(dicom_port: int, files: list[Path], calling_ae: str = "POLICYSCU") -> None:
    """C-STORE (PS3.4 B.2) of `files` over one association (dcmtk storescu)."""
    await run_tool(DCMTK / "storescu", "-aet", calling_ae, "-aec", "VNA", "127.0.0.1", str(dicom_port), *files,
                   timeout=300)
