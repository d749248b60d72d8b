"""The test-data corpus through the archive: every file of pydicom's test data and of the PyPI package
pydicom-data that is a storable instance goes in, and what was stored comes back bit for bit.

Selection rule (`_select`): a regular file from `pydicom.data.get_testdata_files()` that pydicom reads
as a PS3.10 file (``dcmread`` without ``force``), whose File Meta Information (group 0002) holds a
Transfer Syntax UID (0002,0010), and whose data set holds a SOP Instance UID (0008,0018). What this
leaves out is not an instance one could send: DICOMDIRs and the private-sequence samples have no
SOP Instance UID; files without File Meta Information (``no_meta.dcm``, ``*NoMeta.dcm``, ``rtstruct.dcm``,
``OT-PAL-8-face.dcm``), or without a Transfer Syntax UID in it (``meta_missing_tsyntax.dcm``), give
no transfer syntax to send them in; and text, JSON, ICC and gzip files are not DICOM at all.

Many files are one instance in several transfer syntaxes and share a SOP Instance UID. vna's default
duplicate policy is ``reject``, so the corpus is split into groups in which each SOP Instance UID (the
data set's and the File Meta's Media Storage one) occurs once, and each group runs against its own
server and database: every file is checked, none is shadowed by a sibling.

Two ways in, each followed by a C-GET and a C-MOVE of everything stored:
- ``dcmsend`` (dcmtk) proposes each file's own transfer syntax (``-dn``: never decompress). It parses
  the file and writes the data set again (group lengths, padding and lengths of sequences can change),
  so what must come back is what it put on the wire: a dcmtk ``storescp`` in bit-preserving mode
  (``+B``) receiving the same ``dcmsend`` run records exactly those bytes.
- the file's own bytes: pynetdicom sending from the file path (``STORE_SEND_CHUNKED_DATASET``) puts the
  data set bytes that follow the File Meta Information on the wire unchanged (deflated ones still
  deflated); exactly those must come back.

Files the client or the server refuses are listed below with the reason; a refused instance must
leave no index row and no object behind.

Every round trip runs on both object stores (the filesystem, and RADOS on the session's Ceph cluster).
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pydicom.data
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, build_role, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.dsutils import split_dataset
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import register_uid, uid_to_service_class
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as STUDY_ROOT_GET
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as STUDY_ROOT_MOVE

from archive.index import ApplicationEntity, Index
from gateway.dimse.negotiation import STORAGE_SOP_CLASSES
from gateway.runtime import Runtime
from tests.conftest import BOTH_BACKENDS, DCMTK, run_tool
from tests.stored_objects import StoredObjects

# PS3.4 B.2.3 C-STORE statuses
SUCCESS = 0x0000
DOES_NOT_MATCH_SOP_CLASS = 0xA900   # Error: Data Set does not match SOP Class
CANNOT_UNDERSTAND = 0xC000          # Error: Cannot understand
UNREADABLE = "unreadable"           # dcmsend could not parse the file and did not send it
# vna also stores retired storage SOP classes (e.g. Ultrasound Image Storage (Retired), color-pl.dcm);
# pynetdicom, the test's Storage SCP, aborts on a C-STORE of a class it has no service for: teach it.
for _uid in sorted(STORAGE_SOP_CLASSES):
    if uid_to_service_class(_uid) is not StorageServiceClass:
        register_uid(_uid, "VnaTestStorage_" + _uid.replace(".", "_"), StorageServiceClass)

NO_CONTEXT = "no context"           # PS3.8 9.3.3.2: the presentation context was not accepted

PYDICOM_DATA_ROOT = "data_store"    # where the pydicom-data package keeps its files


@dataclass(frozen=True, slots=True)
class CorpusFile:
    path: Path
    transfer_syntax: str
    sop_class: str          # (0002,0002) Media Storage SOP Class UID: what a sender proposes
    meta_instance: str      # (0002,0003) Media Storage SOP Instance UID: what pynetdicom's C-STORE-RQ names
    sop_instance: str       # (0008,0018) in the data set: what the archive indexes
    study: str

    @property
    def name(self) -> str:
        return self.path.name

    def dataset_bytes(self) -> bytes:
        """The data set as stored in the file: every byte after the File Meta Information."""
        _meta, offset = split_dataset(self.path)
        return self.path.read_bytes()[offset:]


def _select() -> list[CorpusFile]:
    selected = []
    for name in sorted(pydicom.data.get_testdata_files()):
        path = Path(name)
        if not path.is_file():
            continue
        try:
            with warnings.catch_warnings():
                # pydicom warns about the off-standard encodings some files exist to exercise
                warnings.simplefilter("ignore", UserWarning)
                ds = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:
            continue  # no 'DICM' prefix and File Meta Information: not a PS3.10 file
        meta = ds.file_meta
        if not meta or "TransferSyntaxUID" not in meta or "SOPInstanceUID" not in ds:
            continue
        selected.append(CorpusFile(
            path=path, transfer_syntax=str(meta.TransferSyntaxUID),
            sop_class=str(meta.get("MediaStorageSOPClassUID", "")),
            meta_instance=str(meta.get("MediaStorageSOPInstanceUID", "")),
            sop_instance=str(ds.SOPInstanceUID), study=str(ds.get("StudyInstanceUID", ""))))
    return selected


def _partition(files: Iterable[CorpusFile]) -> list[list[CorpusFile]]:
    """First fit: each file goes to the first group where neither of its SOP Instance UIDs occurs yet."""
    groups: list[tuple[list[CorpusFile], set[str]]] = []
    for f in files:
        uids = {f.sop_instance, f.meta_instance}
        for members, used in groups:
            if not uids & used:
                members.append(f)
                used |= uids
                break
        else:
            groups.append(([f], set(uids)))
    return [members for members, _ in groups]


CORPUS = _select()
GROUPS = _partition(CORPUS)
BY_NAME = {f.name: f for f in CORPUS}

# -- what is refused, and why ---------------------------------------------------------------------
# Data sets the archive refuses whoever sends them (value: status, and a fragment of the ErrorComment,
# which PS3.7 C.4 limits to 64 characters).
_INVALID_DATA_SETS: dict[str, tuple[int | str, str]] = {
    # PS3.5 9.1: a UID is digits and dots; this one's are hex digests (an anonymiser's output)
    "bad_sequence.dcm": (DOES_NOT_MATCH_SOP_CLASS, "SOPInstanceUID"),
    # Study Instance UID is Type 1 in the General Study Module (PS3.3 C.7.2.1): these minimal
    # JPEG-LS samples have none, so the instance would belong to no study
    "JPEGLSNearLossless_08.dcm": (DOES_NOT_MATCH_SOP_CLASS, "StudyInstanceUID is missing"),
    "JPEGLSNearLossless_16.dcm": (DOES_NOT_MATCH_SOP_CLASS, "StudyInstanceUID is missing"),
    "SC_rgb_jls_lossy_line.dcm": (DOES_NOT_MATCH_SOP_CLASS, "StudyInstanceUID is missing"),
    "SC_rgb_jls_lossy_sample.dcm": (DOES_NOT_MATCH_SOP_CLASS, "StudyInstanceUID is missing"),
}

# PS3.10 7.1: the Media Storage SOP Instance UID must equal the data set's SOP Instance UID. In these
# it does not; pynetdicom puts the former in the C-STORE-RQ, so the request names another instance than
# the one it carries (PS3.7 9.3.1.1). dcmsend notices and sends the data set's UID: those are stored.
_META_MISMATCH = ("badVR.dcm", "rtdose.dcm", "rtdose_1frame.dcm", "rtdose_expb.dcm", "rtdose_expb_1frame.dcm",
                  "rtplan.dcm")

# Deliberately broken files: their bytes are not a complete data set (PS3.5 7.1: each value holds
# exactly its length; PS3.5 A.4: encapsulated Pixel Data ends with a Sequence Delimitation Item).
# Value: a fragment of the ErrorComment.
BROKEN: dict[str, str] = {
    "MR_truncated.dcm": "claims",                                 # Pixel Data cut short
    "rtplan_truncated.dcm": "claims",                             # cut inside a sequence
    "emri_small_jpeg_2k_lossless_too_short.dcm": "Delimitation",  # no Sequence Delimitation Item
}

# Sent as the file's own bytes by pynetdicom (command UIDs from the File Meta Information).
RAW_EXPECTED: dict[str, tuple[int | str, str]] = {
    **_INVALID_DATA_SETS,
    **{name: (DOES_NOT_MATCH_SOP_CLASS, "differs") for name in _META_MISMATCH},
    **{name: (CANNOT_UNDERSTAND, reason) for name, reason in BROKEN.items()},
}

# Sent by dcmsend, which parses each file and writes the data set again:
# - it cannot parse the broken files, nor SC_rgb_jpeg.dcm, whose data set is in Implicit VR under an
#   explicit-VR JPEG transfer syntax (pydicom and vna detect that; dcmtk takes values for VRs);
# - it reads SOP Class and Instance UIDs encoded with VR UN as bytes and names '31' (the first byte, in
#   hex) as both Affected UIDs of its C-STORE-RQ: the data set does not match the request.
DCMSEND_EXPECTED: dict[str, int | str] = {
    **{name: status for name, (status, _) in _INVALID_DATA_SETS.items()},
    **{name: UNREADABLE for name in (*BROKEN, "SC_rgb_jpeg.dcm")},
    **{name: DOES_NOT_MATCH_SOP_CLASS for name in ("explicit_VR-UN.dcm", "rtdose_rle.dcm", "rtdose_rle_1frame.dcm")},
}


# -- clients and peers ------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@asynccontextmanager
async def storescp(out_dir: Path, ae_title: str = "STORESCP") -> AsyncIterator[int]:
    """dcmtk's storescp writing every received data set exactly as read (+B), any syntax (+xa)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        str(DCMTK / "storescp"), "+B", "+xa", "-aet", ae_title, "-od", str(out_dir), str(port),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "TCP_NODELAY": "1"})
    try:
        for _ in range(200):
            try:
                _r, w = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.025)
                continue
            w.close()
            break
        else:
            raise AssertionError("storescp did not start listening")
        yield port
    finally:
        proc.terminate()
        await proc.wait()


def received_files(out_dir: Path) -> dict[str, tuple[str, bytes]]:
    """Media Storage SOP Instance UID -> (transfer syntax, data set bytes) of each file in out_dir."""
    found = {}
    for p in out_dir.iterdir():
        meta, offset = split_dataset(p)
        found[str(meta.MediaStorageSOPInstanceUID)] = (str(meta.TransferSyntaxUID), p.read_bytes()[offset:])
    return found


async def dcmsend(port: int, paths: Iterable[Path], report: Path, called_ae: str) -> dict[str, int | str]:
    """Send with dcmsend; the outcome of each file from its transfer report (status, UNREADABLE or NO_CONTEXT).

    A file dcmsend does not take for a DICOM file at all is missing from the report.
    """
    await run_tool(DCMTK / "dcmsend", "--no-halt", "--no-uid-checks", "--decompress-never", "-aet", "DCMSEND",
                   "-aec", called_ae, "+crf", report, "127.0.0.1", str(port), *paths, check=False)
    outcomes: dict[str, int | str] = {}
    for block in report.read_text().split("\n\n"):
        fields = dict(re.findall(r"^(\w[\w. ]*?)\s*: (.*)$", block, re.MULTILINE))
        if "Filename" not in fields:
            continue
        status = fields["DIMSE Status"]
        if m := re.match(r"0x([0-9a-fA-F]{4})", status):
            outcomes[Path(fields["Filename"]).name] = int(m.group(1), 16)
        elif fields["Dataset Size"].startswith("0 "):
            outcomes[Path(fields["Filename"]).name] = UNREADABLE
        else:  # read, but not sent on the association: its presentation context was not accepted
            outcomes[Path(fields["Filename"]).name] = NO_CONTEXT
    return outcomes


def _scu(title: str) -> AE:
    ae = AE(title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.maximum_pdu_size = 1 << 20
    return ae


def _nodelay(assoc: Any) -> None:
    # pynetdicom leaves Nagle on: each message would then wait ~40 ms for a delayed ACK (the same
    # stall dcmtk avoids with TCP_NODELAY=1)
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def send_file_bytes(port: int, files: list[CorpusFile]) -> dict[str, tuple[int | str, str]]:
    """C-STORE each file's data set bytes unchanged over one association: name -> (status, ErrorComment).

    Needs pynetdicom's STORE_SEND_CHUNKED_DATASET (the data set is streamed from the file, never decoded).
    """
    assert pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    ae = _scu("FILESCU")
    pairs = sorted({(f.sop_class, f.transfer_syntax) for f in files})
    assert len(pairs) <= 128, "PS3.8 9.3.2.2: at most 128 presentation contexts"
    for sop_class, ts in pairs:
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title="VNA")
    assert assoc.is_established
    _nodelay(assoc)
    accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
    results: dict[str, tuple[int | str, str]] = {}
    try:
        for f in files:
            if (f.sop_class, f.transfer_syntax) not in accepted:
                results[f.name] = (NO_CONTEXT, "")
                continue
            rsp = assoc.send_c_store(f.path)
            assert "Status" in rsp, f"no C-STORE-RSP for {f.name}"
            results[f.name] = (int(rsp.Status), str(rsp.get("ErrorComment", "")))
    finally:
        assoc.release()
    return results


@dataclass(frozen=True, slots=True)
class Stored:
    sop_class: str
    transfer_syntax: str
    data: bytes


def _identifier(studies: list[str]) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = studies  # PS3.4 C.4.2.2.1: a list of UIDs at the retrieve level
    return ds


def c_get(port: int, expected: dict[str, Stored], studies: list[str]) -> tuple[Dataset, dict[str, list]]:
    """C-GET the studies as Storage SCP on the same association (PS3.4 C.4.3, role selection PS3.7 D.3.3.4)."""
    received: dict[str, list[tuple[str, bytes]]] = {}

    def on_store(event: Any) -> int:
        received.setdefault(event.request.AffectedSOPInstanceUID, []).append(
            (event.context.transfer_syntax, event.request.DataSet.getvalue()))
        return SUCCESS

    ae = _scu("GETSCU")
    ae.add_requested_context(STUDY_ROOT_GET)
    pairs = sorted({(s.sop_class, s.transfer_syntax) for s in expected.values()})
    assert len(pairs) <= 127
    for sop_class, ts in pairs:
        ae.add_requested_context(sop_class, ts)
    roles = [build_role(c, scp_role=True) for c in sorted({c for c, _ in pairs})]
    assoc = ae.associate("127.0.0.1", port, ae_title="VNA", ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    _nodelay(assoc)
    try:
        responses = [status for status, _ in assoc.send_c_get(_identifier(studies), STUDY_ROOT_GET)]
    finally:
        assoc.release()
    return responses[-1], received


class CaptureSCP:
    """A pynetdicom Storage SCP that records the raw data set of every C-STORE (a C-MOVE destination)."""

    def __init__(self, title: str, expected: dict[str, Stored]) -> None:
        self.title = title
        self.received: dict[str, list[tuple[str, bytes]]] = {}
        ae = AE(title)
        ae.maximum_pdu_size = 1 << 20
        syntaxes = sorted({f.transfer_syntax for f in CORPUS})
        for sop_class in sorted({s.sop_class for s in expected.values()}):
            ae.add_supported_context(sop_class, syntaxes)
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self.port = self.server.server_address[1]

    def _on_store(self, event: Any) -> int:
        self.received.setdefault(event.request.AffectedSOPInstanceUID, []).append(
            (event.context.transfer_syntax, event.request.DataSet.getvalue()))
        return SUCCESS


def c_move(port: int, destination: str, studies: list[str]) -> Dataset:
    ae = _scu("MOVESCU")
    ae.add_requested_context(STUDY_ROOT_MOVE)
    assoc = ae.associate("127.0.0.1", port, ae_title="VNA")
    assert assoc.is_established
    _nodelay(assoc)
    try:
        responses = [status for status, _ in assoc.send_c_move(_identifier(studies), destination, STUDY_ROOT_MOVE)]
    finally:
        assoc.release()
    return responses[-1]


# -- the checks -------------------------------------------------------------------------------------
async def assert_archive_holds_exactly(rt: Runtime, index: Index, expected: dict[str, Stored]) -> None:
    """The index has one row per expected instance and nothing else; the object store holds exactly
    the objects those rows name; C-GET and C-MOVE return each data set bit for bit, in its syntax."""
    rows = await index.pool.fetch("SELECT sop_instance_uid, sop_class_uid, transfer_syntax_uid, location "
                                  "FROM instance")
    assert {r["sop_instance_uid"]: (r["sop_class_uid"], r["transfer_syntax_uid"]) for r in rows} == {
        uid: (s.sop_class, s.transfer_syntax) for uid, s in expected.items()}
    stored = await StoredObjects.of(rt.settings).locations()
    assert stored == {r["location"] for r in rows}, "objects without an index row (or rows without objects)"
    if not expected:
        return
    studies = [r["study_instance_uid"] for r in await index.pool.fetch("SELECT study_instance_uid FROM study")]
    want = {uid: [(s.transfer_syntax, s.data)] for uid, s in expected.items()}

    # PS3.4 C.4.3: C-GET sends every instance of the studies back on the requesting association
    final, got = await asyncio.to_thread(c_get, rt.ports.dicom, expected, studies)
    assert (final.Status, final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (
        SUCCESS, len(expected), 0)
    assert got.keys() == want.keys()
    for uid, data in want.items():  # one by one: a failure names the instance instead of dumping megabytes
        assert got[uid] == data, f"C-GET of {uid} differs from what was stored"

    # PS3.4 C.4.2: C-MOVE sends them over a new association to a known destination
    capture = CaptureSCP("CAPTURE", expected)
    try:
        await index.ae_add(ApplicationEntity(capture.title, "127.0.0.1", capture.port), timeout=5)
        final = await asyncio.to_thread(c_move, rt.ports.dicom, capture.title, studies)
    finally:
        await asyncio.to_thread(capture.server.shutdown)
    assert (final.Status, final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (
        SUCCESS, len(expected), 0)
    assert capture.received.keys() == want.keys()
    for uid, data in want.items():
        assert capture.received[uid] == data, f"C-MOVE of {uid} differs from what was stored"


@pytest.fixture
def chunked_send(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)


def test_corpus_selection() -> None:
    """The corpus is pydicom's test files and pydicom-data's, and the groups partition it."""
    files = pydicom.data.get_testdata_files()
    assert len(files) >= 250, "pydicom-data is not installed: only pydicom's own test files were found"
    assert len(CORPUS) >= 200
    assert any(PYDICOM_DATA_ROOT in f.path.parts for f in CORPUS)
    assert len(BY_NAME) == len(CORPUS), "file names must be unique to key the expectations"
    assert sorted(f.path for g in GROUPS for f in g) == sorted(f.path for f in CORPUS)
    for g in GROUPS:
        uids = [u for f in g for u in {f.sop_instance, f.meta_instance}]
        assert len(uids) == len(set(uids))
    # the most shared instance (SC_rgb*.dcm: 19 encodings of one image) needs as many groups
    most_shared = max(Counter(f.sop_instance for f in CORPUS).values())
    assert most_shared >= 10 and len(GROUPS) >= most_shared
    assert set(RAW_EXPECTED) | set(DCMSEND_EXPECTED) <= set(BY_NAME)


@BOTH_BACKENDS
@pytest.mark.parametrize("group", range(len(GROUPS)))
async def test_file_bytes_round_trip(group: int, vna: Runtime, index: Index, chunked_send: None) -> None:
    """Each file's data set bytes in, by C-STORE; the same bytes out by C-GET and C-MOVE."""
    files = GROUPS[group]
    results = await asyncio.to_thread(send_file_bytes, vna.ports.dicom, files)
    wrong = {name: result for name, result in results.items()
             if result[0] != RAW_EXPECTED.get(name, (SUCCESS, ""))[0]
             or RAW_EXPECTED.get(name, (SUCCESS, ""))[1] not in result[1]}
    assert not wrong, f"unexpected C-STORE outcomes: {wrong}"
    expected = {f.sop_instance: Stored(f.sop_class, f.transfer_syntax, f.dataset_bytes())
                for f in files if results[f.name][0] == SUCCESS}
    await assert_archive_holds_exactly(vna, index, expected)


@BOTH_BACKENDS
@pytest.mark.parametrize("group", range(len(GROUPS)))
async def test_dcmsend_round_trip(group: int, vna: Runtime, index: Index, tmp_path: Path) -> None:
    """dcmsend in; what dcmsend put on the wire (recorded by storescp +B) out by C-GET and C-MOVE."""
    files = GROUPS[group]
    async with storescp(tmp_path / "wire") as port:
        reference = await dcmsend(port, (f.path for f in files), tmp_path / "reference.txt", "STORESCP")
    outcomes = await dcmsend(vna.ports.dicom, (f.path for f in files), tmp_path / "report.txt", "VNA")
    assert outcomes == {f.name: DCMSEND_EXPECTED.get(f.name, SUCCESS) for f in files}
    wire = received_files(tmp_path / "wire")
    expected = {}
    for f in files:
        if outcomes[f.name] == SUCCESS:
            assert reference[f.name] == SUCCESS
            ts, data = wire[f.sop_instance]
            expected[f.sop_instance] = Stored(f.sop_class, ts, data)
    await assert_archive_holds_exactly(vna, index, expected)


@BOTH_BACKENDS
async def test_broken_files_fail_and_leave_nothing(vna: Runtime, index: Index, tmp_path: Path,
                                                   chunked_send: None) -> None:
    """pydicom's deliberately broken files: dcmsend will not send them (it parses each file first); their
    bytes sent as they are get a failure status (PS3.4 B.2.3); nothing of them stays in the archive."""
    broken = [BY_NAME[name] for name in BROKEN]
    # Outside the corpus: without File Meta Information, or without a Transfer Syntax UID in it,
    # no sender can know the syntax of the data set; dcmsend does not take them for DICOM files.
    no_meta = [Path(get_testdata_file(name)) for name in ("no_meta.dcm", "meta_missing_tsyntax.dcm",
                                                          "ExplVR_LitEndNoMeta.dcm", "ExplVR_BigEndNoMeta.dcm")]
    outcomes = await dcmsend(vna.ports.dicom, [*(f.path for f in broken), *no_meta], tmp_path / "report.txt", "VNA")
    assert outcomes == {name: UNREADABLE for name in BROKEN}

    results = await asyncio.to_thread(send_file_bytes, vna.ports.dicom, broken)
    assert {name: status for name, (status, _) in results.items()} == {name: CANNOT_UNDERSTAND for name in BROKEN}
    for name, reason in BROKEN.items():
        assert reason in results[name][1], results[name]
    await assert_archive_holds_exactly(vna, index, {})


@BOTH_BACKENDS
async def test_dcmtk_getscu_and_movescu(vna: Runtime, index: Index, tmp_path: Path, chunked_send: None) -> None:
    """dcmtk's own retrieve clients get back the files' data set bytes: getscu (C-GET, written as received
    with +B) for a study of 50 CT images, movescu (C-MOVE) to storescp (+B +xa) for a JPEG 2000 study."""
    tiny = [f for f in CORPUS if "TINY_ALPHA" in f.path.parts]
    jpeg2000 = [BY_NAME["693_J2KR.dcm"], BY_NAME["693_J2KI.dcm"]]  # JPEG 2000 lossless and lossy
    assert len(tiny) == 50 and len({f.study for f in tiny}) == 1 and len({f.study for f in jpeg2000}) == 1
    results = await asyncio.to_thread(send_file_bytes, vna.ports.dicom, tiny + jpeg2000)
    assert {status for status, _ in results.values()} == {SUCCESS}
    port = str(vna.ports.dicom)

    # getscu proposes the uncompressed syntaxes, which is what these 50 are stored in
    (tmp_path / "get").mkdir()
    await run_tool(DCMTK / "getscu", "-S", "-aet", "GETSCU", "-aec", "VNA", "+B", "-od", tmp_path / "get",
                   "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={tiny[0].study}", "127.0.0.1", port)
    assert received_files(tmp_path / "get") == {f.sop_instance: (f.transfer_syntax, f.dataset_bytes()) for f in tiny}

    async with storescp(tmp_path / "moved") as scp_port:
        await index.ae_add(ApplicationEntity("STORESCP", "127.0.0.1", scp_port), timeout=5)
        await run_tool(DCMTK / "movescu", "-S", "-aet", "MOVESCU", "-aec", "VNA", "-aem", "STORESCP",
                       "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={jpeg2000[0].study}",
                       "127.0.0.1", port)
    assert received_files(tmp_path / "moved") == {
        f.sop_instance: (f.transfer_syntax, f.dataset_bytes()) for f in jpeg2000}
