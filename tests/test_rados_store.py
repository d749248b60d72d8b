"""The RADOS object store against a real Ceph cluster (scripts/ceph-cluster: one monitor, memstore OSDs).

Covers the ObjectStore contract (put/get/stream/stat/delete, locations `<pool>/<key>`), objects split in
parts with the manifest written last, every part checked (CRC-32C; SHA-256 in version-1 manifests) on read, the orphan sweeper's view of
interrupted puts, fast failure (StorageError) when the OSD or the monitor does not answer, settings, an
end-to-end DIMSE round trip through a vna server on either backend, and the two-datacentre CRUSH rules.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import re
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import crc32c
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

from archive.config import DigestAlgorithm, RadosSettings, Settings
from archive.database import create_pool
from archive.errors import ConfigError, StorageError
from archive.index import Index
from archive.ingest import sweep_orphans
from archive.rados_store import MANIFEST_XATTR, RadosStore
from metrics.registry import Metrics
from tests.conftest import CEPH_CLUSTER_SCRIPT, DCMTK, rados_settings, run_tool
from tests.digests import blake3_text

MiB = 1 << 20


@pytest.fixture
async def rados_store(ceph_cluster: dict[str, Any]) -> AsyncIterator[RadosStore]:
    store = await RadosStore.open(RadosSettings(**rados_settings(ceph_cluster, part_size=MiB)))
    try:
        yield store
    finally:
        await store.close()


def unique_key(name: str) -> str:
    return f"test/{os.urandom(6).hex()}/{name}"


async def rados_cli(cluster: dict[str, Any], *args: str | Path, check: bool = True) -> str:
    return (await run_tool("rados", "-c", cluster["conf"], *args, check=check)).stdout


async def ceph_cli(cluster: dict[str, Any], *args: str) -> Any:
    return json.loads((await run_tool("ceph", "-c", cluster["conf"], *args, "-f", "json")).stdout)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- the ObjectStore contract --------------------------------------------------------------------------------

async def test_round_trip_of_a_small_object(rados_store: RadosStore, ceph_cluster: dict[str, Any],
                                            tmp_path: Path) -> None:
    key = unique_key("small.dcm")
    meta, body = b"\x00" * 128 + b"DICM" + b"meta", random.randbytes(300_000)
    obj = await rados_store.put(key, [meta, body], timeout=10)
    whole = meta + body
    assert (obj.location, obj.size, obj.digest) == (f"vna/{key}", len(whole), blake3_text(whole))

    assert await rados_store.get(obj.location, timeout=10) == whole
    assert await rados_store.get(obj.location, offset=len(meta), timeout=10) == body
    assert await rados_store.get(obj.location, offset=len(whole), timeout=10) == b""
    chunks = [c async for c in rados_store.stream(obj.location, offset=7, chunk_size=65536)]
    assert b"".join(chunks) == whole[7:] and max(map(len, chunks)) == 65536
    assert await rados_store.stat(obj.location, timeout=10) == len(whole)

    # one plain RADOS object holding exactly the bytes, its manifest in an extended attribute
    await rados_cli(ceph_cluster, "-p", "vna", "get", key, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == whole
    manifest = json.loads(await rados_cli(ceph_cluster, "-p", "vna", "getxattr", key, MANIFEST_XATTR))
    assert manifest["size"] == len(whole) and manifest["digest"] == obj.digest and manifest["layout"] == "inline"

    await rados_store.delete(obj.location, timeout=10)
    await rados_store.delete(obj.location, timeout=10)  # deleting what is gone is not an error
    with pytest.raises(StorageError, match="does not exist"):
        await rados_store.get(obj.location, timeout=10)
    assert key not in (await rados_cli(ceph_cluster, "-p", "vna", "ls")).split()


async def test_empty_object_and_a_digest_given_by_the_caller(rados_store: RadosStore) -> None:
    empty = await rados_store.put(unique_key("empty"), [], timeout=10)
    assert (empty.size, empty.digest) == (0, blake3_text(b""))
    assert await rados_store.get(empty.location, timeout=10) == b""
    assert [c async for c in rados_store.stream(empty.location)] == []

    data = b"known content"
    # a move copies with the digest the index has, whichever algorithm wrote it
    obj = await rados_store.put(unique_key("given"), [data], digest=sha256(data), timeout=10)
    assert obj.digest == sha256(data) and await rados_store.get(obj.location, timeout=10) == data
    with pytest.raises(StorageError, match="not a digest this archive can verify"):
        await rados_store.put(unique_key("unknown"), [data], digest="md5:00", timeout=10)
    sha_store = RadosStore(rados_store.connection, pool=rados_store.pool, digest=DigestAlgorithm.sha256)
    configured = await sha_store.put(unique_key("sha"), [data], timeout=10)
    assert configured.digest == sha256(data)
    for o in (empty, obj, configured):
        await rados_store.delete(o.location, timeout=10)


async def test_object_larger_than_a_part_is_split_and_read_back_bit_identical(
        ceph_cluster: dict[str, Any]) -> None:
    part_size = 8 * MiB
    store = await RadosStore.open(RadosSettings(**rados_settings(ceph_cluster, part_size=part_size)))
    try:
        key = unique_key("large.dcm")
        head, body = random.randbytes(1000), random.randbytes(100 * MiB + 12345)
        whole = head + body
        parts = -(-len(whole) // part_size)
        obj = await store.put(key, [head, body], timeout=60)
        assert (obj.size, obj.digest) == (len(whole), blake3_text(whole))

        names = set((await rados_cli(ceph_cluster, "-p", "vna", "ls")).split())
        assert {key, *(f"{key}.part-{i:04d}" for i in range(parts))} <= names
        assert f"{key}.part-{parts:04d}" not in names
        manifest = json.loads(await rados_cli(ceph_cluster, "-p", "vna", "get", key, "-"))
        assert manifest["layout"] == "parts" and len(manifest["parts"]) == parts
        assert [p["size"] for p in manifest["parts"]] == [part_size] * (parts - 1) + [len(whole) % part_size]

        assert await store.get(obj.location, timeout=60) == whole
        offset = 5 * part_size - 17  # across a part boundary
        assert await store.get(obj.location, offset=offset, timeout=60) == whole[offset:]
        streamed = hashlib.sha256()
        async for chunk in store.stream(obj.location, offset=offset, chunk_size=MiB):
            streamed.update(chunk)
        assert "sha256:" + streamed.hexdigest() == sha256(whole[offset:])
        assert await store.stat(obj.location, timeout=10) == len(whole)

        await store.delete(obj.location, timeout=30)
        left = set((await rados_cli(ceph_cluster, "-p", "vna", "ls")).split())
        assert not {n for n in left if n.startswith(key)}
    finally:
        await store.close()


async def test_a_corrupted_object_or_part_is_detected_on_read(rados_store: RadosStore, ceph_cluster: dict[str, Any],
                                                              tmp_path: Path) -> None:
    # one inline object: flip a byte behind the store's back (`rados put` keeps the manifest xattr)
    data = random.randbytes(4096)
    small = await rados_store.put(unique_key("small"), [data], timeout=10)
    bad = bytearray(data)
    bad[1000] ^= 0x01
    (tmp_path / "bad").write_bytes(bytes(bad))
    await rados_cli(ceph_cluster, "-p", "vna", "put", small.location.split("/", 1)[1], tmp_path / "bad")
    with pytest.raises(StorageError, match="corrupt"):
        await rados_store.get(small.location, timeout=10)
    with pytest.raises(StorageError, match="corrupt"):
        async for _ in rados_store.stream(small.location):
            pass

    # a multi-part object (1 MiB parts): corrupt part 1; reads touching it fail, the others are fine
    whole = random.randbytes(4 * MiB + 10)
    large = await rados_store.put(unique_key("large"), [whole], timeout=30)
    key = large.location.split("/", 1)[1]
    part = bytearray(whole[MiB:2 * MiB])
    part[-1] ^= 0x80
    (tmp_path / "part").write_bytes(bytes(part))
    await rados_cli(ceph_cluster, "-p", "vna", "put", f"{key}.part-0001", tmp_path / "part")
    with pytest.raises(StorageError, match=r"part-0001 is corrupt"):
        await rados_store.get(large.location, timeout=30)
    received = bytearray()
    with pytest.raises(StorageError, match=r"part-0001 is corrupt"):
        async for chunk in rados_store.stream(large.location, chunk_size=MiB):
            received += chunk
    assert received == whole[:MiB]  # nothing of the corrupt part was handed out
    assert await rados_store.get(large.location, offset=2 * MiB, timeout=30) == whole[2 * MiB:]

    # a truncated part is caught too
    await rados_cli(ceph_cluster, "-p", "vna", "truncate", f"{key}.part-0002", "100")
    with pytest.raises(StorageError, match="part-0002 holds 100 bytes"):
        await rados_store.get(large.location, offset=2 * MiB, timeout=30)
    for o in (small, large):
        await rados_store.delete(o.location, timeout=30)


async def test_orphan_sweep_sees_whole_objects_and_parts_without_manifest(ceph_cluster: dict[str, Any],
                                                                          tmp_path: Path) -> None:
    pool = f"sweep-{os.urandom(4).hex()}"  # a pool of its own: the sweep removes whatever is not indexed
    await run_tool("ceph", "-c", ceph_cluster["conf"], "osd", "pool", "create", pool, "8")
    store = await RadosStore.open(RadosSettings(**rados_settings(ceph_cluster, pool=pool, part_size=MiB)))
    try:
        indexed_inline = await store.put("a.dcm", [b"a" * 100], timeout=10)
        indexed_parts = await store.put("b.dcm", [random.randbytes(3 * MiB)], timeout=10)
        unindexed = await store.put("c.dcm", [random.randbytes(2 * MiB + 1)], timeout=10)
        # what a put interrupted before its manifest leaves behind
        (tmp_path / "p").write_bytes(random.randbytes(MiB))
        for name in ("d.dcm.part-0000", "d.dcm.part-0001"):
            await rados_cli(ceph_cluster, "-p", pool, "put", name, tmp_path / "p")

        assert [loc async for loc in store.list_older_than(3600)] == []  # all of it is new
        listed = {loc async for loc in store.list_older_than(0)}
        assert listed == {indexed_inline.location, indexed_parts.location, unindexed.location,
                          f"{pool}/d.dcm.part-0000", f"{pool}/d.dcm.part-0001"}
        with pytest.raises(StorageError):
            await store.get(f"{pool}/d.dcm", timeout=10)  # no manifest: no object

        class IndexedLocations:  # the one Index method the sweeper calls
            async def has_object(self, store_name: str, location: str, *, timeout: float) -> bool:
                return store_name == "rados" and location in {indexed_inline.location, indexed_parts.location}

        removed = await sweep_orphans(IndexedLocations(), store, grace_seconds=0,  # type: ignore[arg-type]
                                      metrics=Metrics())
        assert removed == 3
        left = set((await rados_cli(ceph_cluster, "-p", pool, "ls")).split())
        assert left == {"a.dcm", "b.dcm", "b.dcm.part-0000", "b.dcm.part-0001", "b.dcm.part-0002"}
        assert await store.get(indexed_parts.location, timeout=10) != b""
    finally:
        await store.close()
        await run_tool("ceph", "-c", ceph_cluster["conf"], "osd", "pool", "rm", pool, pool,
                       "--yes-i-really-really-mean-it")


# -- failing fast -------------------------------------------------------------------------------------------

async def test_a_stopped_osd_fails_puts_and_gets_within_the_timeout(ceph_cluster: dict[str, Any]) -> None:
    store = await RadosStore.open(RadosSettings(**rados_settings(ceph_cluster, op_timeout=2, part_size=MiB)))
    osd_pid = int(Path(ceph_cluster["osds"][0]["pid_file"]).read_text())
    large_key = unique_key("large-during")
    try:
        existing = await store.put(unique_key("before"), [b"stored before the stop"], timeout=10)
        os.kill(osd_pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            outcomes = await asyncio.gather(store.put(unique_key("during"), [b"x" * 1000], timeout=30),
                                            store.put(large_key, [random.randbytes(3 * MiB)], timeout=30),
                                            store.get(existing.location, timeout=30),
                                            store.stat(existing.location, timeout=30),
                                            store.delete(existing.location, timeout=30), return_exceptions=True)
            assert 1.5 < time.monotonic() - started < 4.5  # op_timeout (2 s), not the caller's 30 s
            for outcome in outcomes:
                assert isinstance(outcome, StorageError) and re.search("ETIMEDOUT|timed out", str(outcome))
            # the caller's own timeout, when shorter, wins
            started = time.monotonic()
            with pytest.raises(StorageError, match="no answer within 0.5s"):
                await store.put(unique_key("during"), [b"y"], timeout=0.5)
            assert time.monotonic() - started < 1.5
        finally:
            os.kill(osd_pid, signal.SIGCONT)
        after = await store.put(unique_key("after"), [b"stored after the resume"], timeout=10)
        assert await store.get(after.location, timeout=10) == b"stored after the resume"
        assert await store.get(existing.location, timeout=10) == b"stored before the stop"
        # the multi-part put failed before its manifest: whatever parts reached the OSD are not an object
        with pytest.raises(StorageError, match="does not exist"):
            await store.get(f"vna/{large_key}", timeout=10)
        for o in (existing, after):
            await store.delete(o.location, timeout=10)
    finally:
        started = time.monotonic()
        await store.close()
        assert time.monotonic() - started < 5


async def test_no_monitor_or_no_pool_is_a_storage_error(ceph_cluster: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="pool 'no-such-pool' does not exist"):
        await RadosStore.open(RadosSettings(**rados_settings(ceph_cluster, pool="no-such-pool")))

    # a configuration whose monitor does not exist: connect gives up after op_timeout
    conf = re.sub(r"mon host = .*", "mon host = [v2:127.0.0.1:9]", Path(ceph_cluster["conf"]).read_text())
    (tmp_path / "ceph.conf").write_text(conf)
    started = time.monotonic()
    with pytest.raises(StorageError, match="connect"):
        await RadosStore.open(RadosSettings(**rados_settings(ceph_cluster, conffile=tmp_path / "ceph.conf",
                                                             op_timeout=1)))
    assert time.monotonic() - started < 5

    with pytest.raises(ConfigError, match="Ceph configuration"):
        await RadosStore.open(RadosSettings(conffile=tmp_path / "missing.conf"))


def test_rados_settings_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VNA__STORAGE__BACKEND", "rados")
    monkeypatch.setenv("VNA__STORAGE__RADOS__CONFFILE", "/etc/ceph/site.conf")
    monkeypatch.setenv("VNA__STORAGE__RADOS__CLIENT_NAME", "client.vna")
    monkeypatch.setenv("VNA__STORAGE__RADOS__POOL", "images")
    monkeypatch.setenv("VNA__STORAGE__RADOS__OP_TIMEOUT", "7")
    r = Settings.load().storage.rados
    assert (str(r.conffile), r.client_name, r.pool, r.op_timeout, r.part_size) == \
        ("/etc/ceph/site.conf", "client.vna", "images", 7, 32 * MiB)
    for bad in ({"op_timeout": "2.5"}, {"op_timeout": 0}, {"pool": "a/b"}, {"pool": ""},
                {"client_name": "admin"}, {"part_size": 129 * MiB}, {"part_size": 1000}):
        with pytest.raises(ConfigError, match="storage.rados"):
            Settings.load({"storage": {"rados": bad}})


# -- through a vna server --------------------------------------------------------------------------------

def write_ct(directory: Path, study: str, series: str, n: int, size: int) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "RADOS-1", "Rados^Test", "19700101", "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20240301", "101500", "ACC-RADOS", "1"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, n
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SliceThickness, ds.ImagePositionPatient = 1.0, [0.0, 0.0, float(n)]
    ds.ImageOrientationPatient, ds.PixelSpacing = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0], [0.7, 0.7]
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.Rows, ds.Columns = 1, "MONOCHROME2", size, size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.random.default_rng(n).integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
    path = directory / f"{n}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def dataset_bytes(path: Path) -> bytes:
    """The data set of a PS3.10 file as a C-STORE carries it: after the preamble and File Meta Information."""
    data = path.read_bytes()
    # PS3.10 7.1: 128-byte preamble, 'DICM', then (0002,0000) UL group length
    assert data[128:132] == b"DICM" and data[132:138] == b"\x02\x00\x00\x00UL"
    return data[144 + int.from_bytes(data[140:144], "little"):]


def c_get(port: int, study: str) -> tuple[int, dict[str, bytes]]:
    """C-GET a study (PS3.4 C.4.3) with pynetdicom: final status and the data sets received, as encoded."""
    received: dict[str, bytes] = {}
    lock = threading.Lock()

    def on_store(event: evt.Event) -> int:
        with lock:
            received[event.request.AffectedSOPInstanceUID] = event.request.DataSet.getvalue()
        return 0x0000

    ae = AE(ae_title="GETSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    # PS3.4 C.4.3.1: the C-STORE sub-operations come back on the same association (SCP/SCU role selection)
    assoc = ae.associate("127.0.0.1", port, ae_title="VNA", ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", study
    statuses = [status.Status for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)]
    assoc.release()
    return statuses[-1], received


@pytest.mark.parametrize("store_settings", ["filesystem", "rados"], indirect=True)
async def test_storescu_then_c_get_returns_the_instances_bit_identical(
        store_settings: dict[str, Any], vna_factory: Callable[..., Any], database_url: str, tmp_path: Path) -> None:
    if store_settings["backend"] == "rados":  # parts of 256 KiB: the 2 MiB instance is stored in 9 parts
        store_settings = {**store_settings, "rados": {**store_settings["rados"], "part_size": 256 << 10}}
    rt = await vna_factory(storage=store_settings)
    study = generate_uid()
    (tmp_path / "in").mkdir()
    series = generate_uid()
    files = [write_ct(tmp_path / "in", study, series, n, size) for n, size in ((1, 64), (2, 64), (3, 1024))]
    await run_tool(DCMTK / "storescu", "-aet", "SCU", "-aec", "VNA", "127.0.0.1", str(rt.ports.dicom), *files)

    # PS3.4 C.4.3.3.1: all sub-operations succeeded -> final status Success (0x0000)
    status, received = await asyncio.to_thread(c_get, rt.ports.dicom, study)
    assert status == 0x0000
    sent = {p: dataset_bytes(p) for p in files}
    assert sorted(map(len, received.values())) == sorted(map(len, sent.values()))
    assert set(map(sha256, received.values())) == set(map(sha256, sent.values()))

    pool = await create_pool(database_url, min_size=1, max_size=1, command_timeout=10)
    try:
        located = await Index(pool).locate_by_uids(study, timeout=10)
    finally:
        await pool.close()
    assert len(located) == 3
    backend = store_settings["backend"]
    assert {i.store for i in located} == {backend}
    if backend == "rados":
        pool = store_settings["rados"]["pool"]  # the test's own (tests/conftest.py rados_pool)
        assert all(i.location.startswith(f"{pool}/") for i in located)
        names = set((await rados_cli({"conf": store_settings["rados"]["conffile"]}, "-p", pool, "ls")).split())
        big = max(located, key=lambda i: i.size)
        key = big.location.split("/", 1)[1]
        assert {f"{key}.part-{n:04d}" for n in range(9)} <= names and f"{key}.part-0009" not in names


def c_store(port: int, path: Path) -> int:
    ae = AE(ae_title="STORESCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="VNA")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()


async def test_c_store_while_the_osd_is_stopped_is_refused_out_of_resources(
        vna_factory: Callable[..., Any], ceph_cluster: dict[str, Any], tmp_path: Path) -> None:
    rt = await vna_factory(storage={"backend": "rados", "rados": rados_settings(ceph_cluster, op_timeout=2)})
    study, series = generate_uid(), generate_uid()
    first, second = (write_ct(tmp_path, study, series, n, 16) for n in (1, 2))
    osd_pid = int(Path(ceph_cluster["osds"][0]["pid_file"]).read_text())
    os.kill(osd_pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        # PS3.4 B.2.3: A7xx Refused: Out of Resources - the instance was not stored, the SCU may send it again
        assert await asyncio.to_thread(c_store, rt.ports.dicom, first) & 0xFF00 == 0xA700
        assert time.monotonic() - started < 5  # the store's op_timeout, not the DIMSE timeout
    finally:
        os.kill(osd_pid, signal.SIGCONT)
    assert await asyncio.to_thread(c_store, rt.ports.dicom, first) == 0x0000
    assert await asyncio.to_thread(c_store, rt.ports.dicom, second) == 0x0000
    status, received = await asyncio.to_thread(c_get, rt.ports.dicom, study)
    assert status == 0x0000
    assert sorted(received.values()) == sorted(dataset_bytes(p) for p in (first, second))


# -- two datacentres ---------------------------------------------------------------------------------------

async def test_three_osd_cluster_has_the_datacentre_rules(tmp_path: Path) -> None:
    d = tmp_path / "ceph3"
    started = time.monotonic()
    await run_tool(CEPH_CLUSTER_SCRIPT, "start", d, "--osds", "3", timeout=120)
    try:
        assert time.monotonic() - started < 30
        cluster = json.loads((d / "cluster.json").read_text())
        osd_dc = {o["id"]: o["datacenter"] for o in cluster["osds"]}
        assert osd_dc == {0: "dc-a", 1: "dc-a", 2: "dc-b"}
        assert {"dc-a-only", "all-dc"} <= set(await ceph_cli(cluster, "osd", "crush", "rule", "ls"))
        assert cluster["pools"]["vna-dc-a"]["rule"] == "dc-a-only"
        assert cluster["pools"]["vna-all-dc"]["rule"] == "all-dc"

        store = await RadosStore.open(RadosSettings(**rados_settings(cluster, pool="vna-all-dc")))
        try:
            objects = [await store.put(f"obj-{n}", [random.randbytes(1000)], timeout=20) for n in range(4)]
            for o in objects:
                assert len(await store.get(o.location, timeout=20)) == 1000
        finally:
            await store.close()
        for name in ("obj-0", "obj-1", "obj-2", "obj-3"):
            dc_a = (await ceph_cli(cluster, "osd", "map", "vna-dc-a", name))["acting"]
            assert len(dc_a) == 2 and {osd_dc[o] for o in dc_a} == {"dc-a"}
            everywhere = (await ceph_cli(cluster, "osd", "map", "vna-all-dc", name))["acting"]
            assert sorted(osd_dc[o] for o in everywhere) == ["dc-a", "dc-b"]
    finally:
        await run_tool(CEPH_CLUSTER_SCRIPT, "stop", d)
    assert not d.exists()


async def test_objects_with_a_version_1_manifest_are_read_and_checked(rados_store: RadosStore,
                                                                      ceph_cluster: dict[str, Any],
                                                                      tmp_path: Path) -> None:
    """Objects written before manifest version 2 (a SHA-256 per part instead of a CRC-32C) stay readable, and
    their parts are still checked."""
    def v1(size: int, digest: str, layout: str, parts: list[bytes]) -> str:
        return json.dumps({"v": 1, "size": size, "digest": digest, "time": time.time(), "layout": layout,
                           "parts": [{"size": len(p), "sha256": hashlib.sha256(p).hexdigest()} for p in parts]})

    inline = random.randbytes(300_000)
    key = unique_key("v1-inline")
    (tmp_path / "inline").write_bytes(inline)
    await rados_cli(ceph_cluster, "-p", "vna", "put", key, tmp_path / "inline")
    await rados_cli(ceph_cluster, "-p", "vna", "setxattr", key, MANIFEST_XATTR,
                    v1(len(inline), sha256(inline), "inline", [inline]))
    assert await rados_store.get(f"vna/{key}", timeout=10) == inline
    assert await rados_store.get(f"vna/{key}", offset=1000, timeout=10) == inline[1000:]

    whole = random.randbytes(2 * MiB + 5)
    pieces = [whole[:MiB], whole[MiB:2 * MiB], whole[2 * MiB:]]
    key2 = unique_key("v1-parts")
    for n, piece in enumerate(pieces):
        (tmp_path / f"p{n}").write_bytes(piece)
        await rados_cli(ceph_cluster, "-p", "vna", "put", f"{key2}.part-{n:04d}", tmp_path / f"p{n}")
    manifest = v1(len(whole), sha256(whole), "parts", pieces)
    (tmp_path / "manifest").write_text(manifest)
    await rados_cli(ceph_cluster, "-p", "vna", "put", key2, tmp_path / "manifest")
    head = json.dumps({"v": 1, "size": len(whole), "digest": sha256(whole), "time": time.time(), "layout": "parts",
                       "manifest_bytes": len(manifest)})
    await rados_cli(ceph_cluster, "-p", "vna", "setxattr", key2, MANIFEST_XATTR, head)
    assert await rados_store.get(f"vna/{key2}", timeout=10) == whole
    assert b"".join([c async for c in rados_store.stream(f"vna/{key2}", offset=MiB + 7)]) == whole[MiB + 7:]
    assert await rados_store.stat(f"vna/{key2}", timeout=10) == len(whole)

    bad = bytearray(pieces[1])
    bad[5] ^= 0x10
    (tmp_path / "bad").write_bytes(bytes(bad))
    await rados_cli(ceph_cluster, "-p", "vna", "put", f"{key2}.part-0001", tmp_path / "bad")
    with pytest.raises(StorageError, match=r"part-0001 is corrupt: sha256:"):
        await rados_store.get(f"vna/{key2}", timeout=10)
    for k in (key, key2):
        await rados_store.delete(f"vna/{k}", timeout=10)
    assert not {n for n in (await rados_cli(ceph_cluster, "-p", "vna", "ls")).split() if n.startswith((key, key2))}


async def test_inline_objects_larger_than_the_first_read(ceph_cluster: dict[str, Any]) -> None:
    """The manifest comes with the first 2 MiB of an inline object; a larger inline object (up to part_size)
    is completed by a second read, from where the first stopped, and checked whole."""
    store = await RadosStore.open(RadosSettings(**rados_settings(ceph_cluster, part_size=8 * MiB)))
    try:
        for size in (2 * MiB - 1, 2 * MiB, 2 * MiB + 1, 7 * MiB + 3):
            data = random.randbytes(size)
            obj = await store.put(unique_key(f"inline-{size}"), [data], timeout=30)
            manifest = json.loads(await rados_cli(ceph_cluster, "-p", "vna", "getxattr",
                                                  obj.location.split("/", 1)[1], MANIFEST_XATTR))
            assert manifest["v"] == 2 and manifest["layout"] == "inline"
            assert manifest["parts"] == [{"size": size, "crc32c": f"{crc32c.crc32c(data):08x}"}]
            assert await store.get(obj.location, timeout=30) == data
            assert b"".join([c async for c in store.stream(obj.location, chunk_size=MiB)]) == data
            assert await store.get(obj.location, offset=size - 10, timeout=30) == data[-10:]
            await store.delete(obj.location, timeout=30)
    finally:
        await store.close()
