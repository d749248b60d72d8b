"""Re-sending an instance the archive already holds (same SOP Instance UID), under each duplicate policy.

PS3.4 leaves what a Storage SCP does with an instance it already holds to the implementation (to be
stated in its Conformance Statement, PS3.4 B.4); vna's policy (archive/config.py `IngestSettings`):
- the same data set again (same bytes in the same transfer syntax, whatever the File Meta Information
  or the sender's AE title) is a success and still one instance;
- other content under the same UID: ``reject`` answers 0xC011 (a Cannot Understand status, PS3.4 B.2.3,
  archive/errors.py `DuplicateConflict`) and keeps the original; ``keep-newest`` stores the new content,
  and the object of the old one is deleted;
- however many associations send at once, one index row and one object remain.

Checked through the archive API (`make_ingestor`) and through DIMSE (dcmtk storescu, pynetdicom), the
DIMSE cases on both object stores (filesystem and RADOS).
"""

from __future__ import annotations

import asyncio
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as STUDY_ROOT_GET

from archive.config import DuplicatePolicy
from archive.errors import DuplicateConflict
from archive.index import Index
from archive.objectstore import FileSystemStore
from gateway.runtime import Runtime
from tests.conftest import BOTH_BACKENDS, DCMTK, make_ingestor, run_tool
from tests.stored_objects import StoredObjects

SUCCESS = 0x0000
CONFLICT = 0xC011  # vna's C-STORE status for other content under a stored SOP Instance UID

EXPLICIT_LE = "1.2.840.10008.1.2.1"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
MR_SMALL = Path(get_testdata_file("MR_small.dcm"))                   # Explicit VR Little Endian
MR_SMALL_BIG_ENDIAN = Path(get_testdata_file("MR_small_bigendian.dcm"))  # the same instance, Big Endian


def dataset_bytes(path: Path) -> bytes:
    _meta, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def variant(tmp_path: Path, comment: str) -> Path:
    """MR_small.dcm with the same UIDs and another Image Comments: other content, same instance."""
    ds = pydicom.dcmread(MR_SMALL)
    ds.ImageComments = comment
    path = tmp_path / f"{comment}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def objects(store_root: Path) -> set[str]:
    return {p.relative_to(store_root).as_posix() for p in store_root.rglob("*") if p.is_file()}


async def rows(index: Index) -> list[Any]:
    return await index.pool.fetch("SELECT sop_instance_uid, transfer_syntax_uid, location, dataset_offset, digest "
                                  "FROM instance")


async def assert_one_instance(index: Index, store: Path | StoredObjects, data: bytes, ts: str = EXPLICIT_LE) -> str:
    """Exactly one index row and one object, and that object's data set is `data`; returns its location.
    `store`: a filesystem store's root, or a server's store on either backend."""
    stored = store if isinstance(store, StoredObjects) else StoredObjects(root=store)
    found = await rows(index)
    assert len(found) == 1, found
    row = found[0]
    assert row["transfer_syntax_uid"] == ts
    assert await stored.locations() == {row["location"]}
    assert (await stored.read(row["location"]))[row["dataset_offset"]:] == data
    return row["location"]


# -- the archive API ----------------------------------------------------------------------------------
async def test_api_same_data_set_again_is_a_duplicate(index: Index, store: FileSystemStore) -> None:
    ingestor = make_ingestor(index, store)
    data = dataset_bytes(MR_SMALL)
    first = await ingestor.ingest_dataset(data, transfer_syntax_uid=EXPLICIT_LE, protocol="dimse",
                                          source="dimse:A", source_ae="A")
    assert first.outcome == "stored"
    again = await ingestor.ingest_dataset(data, transfer_syntax_uid=EXPLICIT_LE, protocol="dimse",
                                          source="dimse:A", source_ae="A")
    assert again.outcome == "duplicate"
    location = await assert_one_instance(index, store.root, data)
    # the same data set from another AE title, and as a PS3.10 file (STOW-RS): other File Meta
    # Information around the same bytes is still the same instance
    other_ae = await ingestor.ingest_dataset(data, transfer_syntax_uid=EXPLICIT_LE, protocol="dimse",
                                             source="dimse:B", source_ae="B")
    part10 = await ingestor.ingest_part10(MR_SMALL.read_bytes(), protocol="dicomweb", source="dicomweb")
    assert (other_ae.outcome, part10.outcome) == ("duplicate", "duplicate")
    assert await assert_one_instance(index, store.root, data) == location


async def test_api_other_content_rejected(index: Index, store: FileSystemStore, tmp_path: Path) -> None:
    ingestor = make_ingestor(index, store, DuplicatePolicy.reject)
    original = dataset_bytes(MR_SMALL)
    await ingestor.ingest_dataset(original, transfer_syntax_uid=EXPLICIT_LE, protocol="dimse", source="dimse:A")
    location = await assert_one_instance(index, store.root, original)
    for data, ts in ((dataset_bytes(variant(tmp_path, "changed")), EXPLICIT_LE),
                     (dataset_bytes(MR_SMALL_BIG_ENDIAN), BIG_ENDIAN)):  # same instance, other syntax
        with pytest.raises(DuplicateConflict) as refused:
            await ingestor.ingest_dataset(data, transfer_syntax_uid=ts, protocol="dimse", source="dimse:A")
        assert refused.value.status == CONFLICT
        # the original is untouched, and the refused object was not left behind
        assert await assert_one_instance(index, store.root, original) == location


async def test_api_keep_newest_replaces(index: Index, store: FileSystemStore, tmp_path: Path) -> None:
    ingestor = make_ingestor(index, store, DuplicatePolicy.keep_newest)
    await ingestor.ingest_dataset(dataset_bytes(MR_SMALL), transfer_syntax_uid=EXPLICIT_LE, protocol="dimse",
                                  source="dimse:A")
    old = await assert_one_instance(index, store.root, dataset_bytes(MR_SMALL))
    newer = dataset_bytes(variant(tmp_path, "newer"))
    result = await ingestor.ingest_dataset(newer, transfer_syntax_uid=EXPLICIT_LE, protocol="dimse", source="dimse:A")
    assert result.outcome == "replaced"
    assert await assert_one_instance(index, store.root, newer) != old
    assert not (store.root / old).exists()
    # and again in another transfer syntax
    big = dataset_bytes(MR_SMALL_BIG_ENDIAN)
    result = await ingestor.ingest_dataset(big, transfer_syntax_uid=BIG_ENDIAN, protocol="dimse", source="dimse:A")
    assert result.outcome == "replaced"
    await assert_one_instance(index, store.root, big, BIG_ENDIAN)


@pytest.mark.parametrize("policy", list(DuplicatePolicy))
async def test_api_concurrent_same_data_set(index: Index, store: FileSystemStore,
                                            policy: DuplicatePolicy) -> None:
    """Twelve ingests of one data set at once, from three AE titles (so three different objects with
    their File Meta Information): all succeed, one row and one object remain."""
    ingestor = make_ingestor(index, store, policy)
    data = dataset_bytes(MR_SMALL)
    results = await asyncio.gather(*(
        ingestor.ingest_dataset(data, transfer_syntax_uid=EXPLICIT_LE, protocol="dimse", source=f"dimse:{ae}",
                                source_ae=ae)
        for ae in ["A", "B", "C"] * 4))
    assert sum(r.outcome == "stored" for r in results) == 1
    await assert_one_instance(index, store.root, data)


async def test_api_concurrent_versions_keep_newest(index: Index, store: FileSystemStore, tmp_path: Path) -> None:
    """Versions A, B, A, B, ... at once under keep-newest: one of them wins, whole; nothing else remains."""
    ingestor = make_ingestor(index, store, DuplicatePolicy.keep_newest)
    versions = [dataset_bytes(variant(tmp_path, name)) for name in ("A", "B")]
    await asyncio.gather(*(
        ingestor.ingest_dataset(versions[n % 2], transfer_syntax_uid=EXPLICIT_LE, protocol="dimse",
                                source="dimse:X", source_ae="X")
        for n in range(12)))
    found = await rows(index)
    assert len(found) == 1
    assert objects(store.root) == {found[0]["location"]}
    stored = (store.root / found[0]["location"]).read_bytes()[found[0]["dataset_offset"]:]
    assert stored in versions


# -- DIMSE --------------------------------------------------------------------------------------------
def _scu(title: str) -> AE:
    ae = AE(title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae


def _nodelay(assoc: Any) -> None:
    # pynetdicom leaves Nagle on: each message would wait ~40 ms for a delayed ACK
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def c_store(port: int, paths: list[Path], calling_ae: str = "PYNETDICOM") -> list[Dataset]:
    """C-STORE each file's data set bytes unchanged (streamed from the file) over one association."""
    assert pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    ae = _scu(calling_ae)
    for path in paths:
        meta, _ = split_dataset(path)
        ae.add_requested_context(str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
    assoc = ae.associate("127.0.0.1", port, ae_title="VNA")
    assert assoc.is_established
    _nodelay(assoc)
    try:
        return [assoc.send_c_store(path) for path in paths]
    finally:
        assoc.release()


def c_get_instance(port: int, sop_class: str, study: str, series: str, sop_instance: str,
                   transfer_syntaxes: list[str]) -> tuple[int, list[tuple[str, bytes]]]:
    """C-GET one instance (PS3.4 C.4.3, IMAGE level); (final status, [(syntax, data set bytes)])."""
    received: list[tuple[str, bytes]] = []

    def on_store(event: Any) -> int:
        received.append((event.context.transfer_syntax, event.request.DataSet.getvalue()))
        return SUCCESS

    ae = _scu("GETSCU")
    ae.add_requested_context(STUDY_ROOT_GET)
    for ts in transfer_syntaxes:
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title="VNA", ext_neg=[build_role(sop_class, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    _nodelay(assoc)
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "IMAGE"
    identifier.StudyInstanceUID = study
    identifier.SeriesInstanceUID = series
    identifier.SOPInstanceUID = sop_instance
    try:
        statuses = [status for status, _ in assoc.send_c_get(identifier, STUDY_ROOT_GET)]
    finally:
        assoc.release()
    return statuses[-1].Status, received


async def retrieve(rt: Runtime) -> list[tuple[str, bytes]]:
    ds = pydicom.dcmread(MR_SMALL, stop_before_pixels=True)
    status, received = await asyncio.to_thread(
        c_get_instance, rt.ports.dicom, ds.SOPClassUID, ds.StudyInstanceUID, ds.SeriesInstanceUID,
        ds.SOPInstanceUID, [EXPLICIT_LE, BIG_ENDIAN])
    assert status == SUCCESS
    return received


@pytest.fixture
def chunked_send(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)


@BOTH_BACKENDS
async def test_dimse_same_instance_again(vna: Runtime, index: Index, chunked_send: None) -> None:
    """storescu three times, from two AE titles: every C-STORE succeeds, and there is one instance."""
    port = str(vna.ports.dicom)
    for calling_ae in ("STORESCU", "STORESCU", "OTHER"):
        await run_tool(DCMTK / "storescu", "-aet", calling_ae, "-aec", "VNA", "127.0.0.1", port, MR_SMALL)
    assert len(await rows(index)) == 1
    # storescu sends dcmtk's own encoding of the data set (it parses the file and writes it again); the
    # file's own bytes differ from it, so they are other content: a conflict under the default policy
    rsp = await asyncio.to_thread(c_store, vna.ports.dicom, [MR_SMALL])
    assert rsp[0].Status == CONFLICT


@BOTH_BACKENDS
async def test_dimse_same_bytes_again(vna: Runtime, index: Index, chunked_send: None) -> None:
    data = dataset_bytes(MR_SMALL)
    for calling_ae in ("MODALITY", "MODALITY", "OTHER"):
        rsp = await asyncio.to_thread(c_store, vna.ports.dicom, [MR_SMALL, MR_SMALL], calling_ae)
        assert [r.Status for r in rsp] == [SUCCESS, SUCCESS]
    await assert_one_instance(index, StoredObjects.of(vna.settings), data)
    assert await retrieve(vna) == [(EXPLICIT_LE, data)]


@BOTH_BACKENDS
async def test_dimse_other_content_rejected(vna: Runtime, index: Index, tmp_path: Path, chunked_send: None) -> None:
    original = dataset_bytes(MR_SMALL)
    rsp = await asyncio.to_thread(c_store, vna.ports.dicom, [MR_SMALL, variant(tmp_path, "changed"),
                                                             MR_SMALL_BIG_ENDIAN, MR_SMALL])
    assert [r.Status for r in rsp] == [SUCCESS, CONFLICT, CONFLICT, SUCCESS]
    assert rsp[1].ErrorComment.startswith("SOP Instance")
    await assert_one_instance(index, StoredObjects.of(vna.settings), original)
    assert await retrieve(vna) == [(EXPLICIT_LE, original)]
    # and from dcmtk: storescu gets the failure status and exits non-zero
    failed = await run_tool(DCMTK / "storescu", "-v", "-aet", "STORESCU", "-aec", "VNA", "127.0.0.1",
                            str(vna.ports.dicom), variant(tmp_path, "by-storescu"), check=False)
    assert failed.returncode != 0
    assert "Received Store Response (Error: CannotUnderstand)" in failed.stderr  # dcmtk's name for 0xCxxx
    await assert_one_instance(index, StoredObjects.of(vna.settings), original)


@BOTH_BACKENDS
async def test_dimse_keep_newest(vna_factory: Any, index: Index, tmp_path: Path, chunked_send: None) -> None:
    rt = await vna_factory(ingest={"duplicate_policy": "keep-newest"})
    await asyncio.to_thread(c_store, rt.ports.dicom, [MR_SMALL])
    old = await assert_one_instance(index, StoredObjects.of(rt.settings), dataset_bytes(MR_SMALL))
    newer = variant(tmp_path, "newer")
    rsp = await asyncio.to_thread(c_store, rt.ports.dicom, [newer])
    assert rsp[0].Status == SUCCESS
    assert await assert_one_instance(index, StoredObjects.of(rt.settings), dataset_bytes(newer)) != old
    assert await retrieve(rt) == [(EXPLICIT_LE, dataset_bytes(newer))]
    # the same instance in another transfer syntax replaces it too, and comes back in that syntax
    rsp = await asyncio.to_thread(c_store, rt.ports.dicom, [MR_SMALL_BIG_ENDIAN])
    assert rsp[0].Status == SUCCESS
    big = dataset_bytes(MR_SMALL_BIG_ENDIAN)
    await assert_one_instance(index, StoredObjects.of(rt.settings), big, BIG_ENDIAN)
    assert await retrieve(rt) == [(BIG_ENDIAN, big)]


@BOTH_BACKENDS
@pytest.mark.parametrize("policy", [p.value for p in DuplicatePolicy])
async def test_dimse_concurrent_resends(vna_factory: Any, index: Index, chunked_send: None, policy: str) -> None:
    """Eight associations (four AE titles) send one instance three times each, all at once: every
    C-STORE succeeds; one index row and one object remain, and that is what C-GET returns."""
    rt = await vna_factory(ingest={"duplicate_policy": policy})
    loop = asyncio.get_running_loop()
    # not asyncio.to_thread: eight blocked clients would take every worker of the loop's default
    # executor, which the server in this same loop needs to write objects
    with ThreadPoolExecutor(max_workers=8) as clients:
        results = await asyncio.gather(*(loop.run_in_executor(clients, c_store, rt.ports.dicom, [MR_SMALL] * 3,
                                                              f"SCU{n % 4}") for n in range(8)))
    assert [r.Status for rsp in results for r in rsp] == [SUCCESS] * 24
    data = dataset_bytes(MR_SMALL)
    await assert_one_instance(index, StoredObjects.of(rt.settings), data)
    assert await retrieve(rt) == [(EXPLICIT_LE, data)]


@BOTH_BACKENDS
@pytest.mark.parametrize("policy", [p.value for p in DuplicatePolicy])
async def test_dimse_concurrent_storescu(vna_factory: Any, index: Index, policy: str) -> None:
    """Six storescu processes (three AE titles) send the same file at once: all succeed, one instance."""
    rt = await vna_factory(ingest={"duplicate_policy": policy})
    await asyncio.gather(*(run_tool(DCMTK / "storescu", "-aet", f"STORESCU{n % 3}", "-aec", "VNA", "127.0.0.1",
                                    str(rt.ports.dicom), MR_SMALL, MR_SMALL) for n in range(6)))
    found = await rows(index)
    assert len(found) == 1
    assert await StoredObjects.of(rt.settings).locations() == {found[0]["location"]}
