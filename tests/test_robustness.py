"""Bad input at the DIMSE port: malformed and oversize PDUs, stalled peers, unknown SOP classes,
invalid UIDs, AE title checks and association limits.

Every hostile peer is a raw socket; while it misbehaves a well-behaved pynetdicom SCU keeps opening
associations, echoing and storing in a thread (`GoodTraffic`), and must be served throughout.
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from gateway.dimse import commands as C
from gateway.dimse.association import Association, AssociationAccepted, MessageReceived
from gateway.dimse.pdu import (PDV, AAssociateRQ, PDataTF, PresentationContextRQ, UserInformation, encode)

HOST = "127.0.0.1"
VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


# -- test data ---------------------------------------------------------------------------------------

def make_ct(**attrs: Any) -> Dataset:
    """A small but complete CT image (8x8, 16 bit) with fresh UIDs; `attrs` override or (None) delete."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # pynetdicom picks the context by it
    ds.SOPClassUID = CT_IMAGE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "ROBUST"
    ds.PatientName = "Robust^Test"
    ds.Modality = "CT"
    ds.StudyDate = "20240102"
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(range(128))
    for keyword, value in attrs.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def encoded(ds: Dataset, transfer_syntax: str = EXPLICIT) -> bytes:
    fp = DicomBytesIO()
    fp.is_implicit_VR = transfer_syntax == IMPLICIT
    fp.is_little_endian = True
    write_dataset(fp, ds)
    return fp.getvalue()


def associate_rq(calling_ae: str = "RAW", called_ae: str = "VNA",
                 contexts: tuple[PresentationContextRQ, ...] | None = None) -> bytes:
    """A valid A-ASSOCIATE-RQ PDU (PS3.8 9.3.2) proposing Verification and CT Image Storage."""
    contexts = contexts or (PresentationContextRQ(1, VERIFICATION, (IMPLICIT,)),
                            PresentationContextRQ(3, CT_IMAGE, (EXPLICIT, IMPLICIT)))
    return encode(AAssociateRQ(called_ae=called_ae, calling_ae=calling_ae, contexts=contexts,
                               user_info=UserInformation(max_pdu_length=16384,
                                                         implementation_class_uid="1.2.826.0.1.3680043.9.1")))


# -- raw peers ---------------------------------------------------------------------------------------

async def read_pdu(reader: asyncio.StreamReader, timeout: float = 5) -> tuple[int, bytes] | None:
    """(PDU type, body) of the next PDU, or None if the server closed the connection first."""
    try:
        header = await asyncio.wait_for(reader.readexactly(6), timeout)
    except asyncio.IncompleteReadError as exc:
        assert not exc.partial, f"connection closed inside a PDU header: {exc.partial!r}"
        return None
    except ConnectionResetError:
        return None
    pdu_type, length = struct.unpack(">BxL", header)
    return pdu_type, await asyncio.wait_for(reader.readexactly(length), timeout)


async def expect_closed(reader: asyncio.StreamReader, timeout: float = 5) -> None:
    try:
        rest = await asyncio.wait_for(reader.read(), timeout)
    except ConnectionResetError:
        return
    assert rest == b"", f"expected the server to close the connection, got {rest[:32]!r}"


async def expect_abort_then_close(reader: asyncio.StreamReader, timeout: float = 5) -> tuple[int, int]:
    """The A-ABORT PDU (type 07h, PS3.8 9.3.8) the server answers with, then EOF: (source, reason)."""
    pdu = await read_pdu(reader, timeout)
    assert pdu is not None, "connection closed without an A-ABORT"
    pdu_type, body = pdu
    assert pdu_type == 0x07 and len(body) == 4, (pdu_type, body)
    await expect_closed(reader, timeout)
    return body[2], body[3]


async def raw_associated(port: int, *, calling_ae: str = "RAW") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw connection on which the association is already established (A-ASSOCIATE-AC read)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(associate_rq(calling_ae))
    pdu = await read_pdu(reader)
    assert pdu is not None and pdu[0] == 0x02, pdu
    return reader, writer


class RawSCU:
    """A requestor driving the sans-I/O Association by hand, to send what pynetdicom refuses to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, assoc: Association) -> None:
        self.reader, self.writer, self.assoc = reader, writer, assoc
        self._events: list[Any] = []
        self._next_id = 1

    @classmethod
    async def connect(cls, port: int, *, calling_ae: str = "RAW") -> "RawSCU":
        reader, writer = await asyncio.open_connection(HOST, port)
        assoc = Association("requestor", max_pdu_length=16384, max_pdu_accept=1 << 20)
        scu = cls(reader, writer, assoc)
        writer.write(assoc.request(AAssociateRQ(
            called_ae="VNA", calling_ae=calling_ae,
            contexts=(PresentationContextRQ(1, VERIFICATION, (IMPLICIT,)),
                      PresentationContextRQ(3, CT_IMAGE, (EXPLICIT,)),
                      PresentationContextRQ(5, MR_IMAGE, (EXPLICIT,))))))
        event = await scu.next_event()
        assert isinstance(event, AssociationAccepted), event
        return scu

    async def next_event(self, timeout: float = 10) -> Any:
        while not self._events:
            data = await asyncio.wait_for(self.reader.read(1 << 16), timeout)
            assert data, "server closed the connection"
            self._events += self.assoc.receive_data(data)
        return self._events.pop(0)

    async def store(self, context_id: int, sop_class_uid: str, sop_instance_uid: str, dataset: bytes) -> dict[str, Any]:
        message_id, self._next_id = self._next_id, self._next_id + 1
        for pdu in self.assoc.send_message(context_id, {
                "CommandField": C.C_STORE_RQ, "MessageID": message_id, "Priority": C.PRIORITY_MEDIUM,
                "AffectedSOPClassUID": sop_class_uid, "AffectedSOPInstanceUID": sop_instance_uid}, dataset):
            self.writer.write(pdu)
        await self.writer.drain()
        event = await self.next_event()
        assert isinstance(event, MessageReceived) and event.command["CommandField"] == C.C_STORE_RSP, event
        assert event.command["MessageIDBeingRespondedTo"] == message_id
        return event.command

    async def release(self) -> None:
        self.writer.write(self.assoc.release_request())
        await self.next_event()
        self.writer.close()


# -- the well-behaved client -------------------------------------------------------------------------

class GoodTraffic:
    """A pynetdicom SCU in a thread: associate, C-ECHO, C-STORE, release, again and again until stopped.

    `await good.served(n)` waits until n more rounds completed; leaving the block asserts that every
    round of the whole run succeeded.
    """

    def __init__(self, port: int, calling_ae: str = "GOOD") -> None:
        self.port = port
        self.calling_ae = calling_ae
        self.rounds: list[tuple[Any, Any, Any]] = []  # (established, echo status, store status)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="good-scu", daemon=True)

    def _run(self) -> None:
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_requested_context(Verification)
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        while not self._stop.is_set():
            assoc = ae.associate(HOST, self.port, ae_title="VNA")
            if not assoc.is_established:
                self.rounds.append((False, None, None))
                time.sleep(0.05)
                continue
            try:
                echo = assoc.send_c_echo()
                store = assoc.send_c_store(make_ct())
            except Exception as exc:  # recorded, and reported when the block ends
                assoc.abort()
                self.rounds.append((True, exc, None))
                continue
            assoc.release()
            self.rounds.append((True, getattr(echo, "Status", None), getattr(store, "Status", None)))

    async def served(self, n: int = 2, timeout: float = 30) -> None:
        target = len(self.rounds) + n
        deadline = time.monotonic() + timeout
        while len(self.rounds) < target:
            assert time.monotonic() < deadline, f"good client not served: {self.rounds[-5:]}"
            await asyncio.sleep(0.02)

    async def __aenter__(self) -> "GoodTraffic":
        self._thread.start()
        await self.served(1)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.to_thread(self._thread.join, 30)
        assert not self._thread.is_alive()
        bad = [r for r in self.rounds if r != (True, 0x0000, 0x0000)]
        assert not bad, f"{len(bad)} of {len(self.rounds)} good rounds failed: {bad[:5]}"


async def instance_count(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval("SELECT count(*) FROM instance")
    finally:
        await conn.close()


def stored_files(data_dir: Path) -> list[Path]:
    return [p for p in (data_dir / "objects").rglob("*") if p.is_file()]


# -- malformed PDUs ----------------------------------------------------------------------------------

def _truncated_rq() -> bytes:
    # Cut 20 bytes off the variable items and fix the PDU length: the User Information item now
    # claims more bytes than the PDU holds (PS3.8 9.3.2.3), an invalid PDU parameter.
    full = associate_rq()
    body = full[6:-20]
    return struct.pack(">BxL", 0x01, len(body)) + body


MALFORMED: dict[str, bytes] = {
    # An HTTP request sent to the DICOM port: 'G' (47h) is no PDU type of PS3.8 9.3.1.
    "http-garbage": b"GET / HTTP/1.1\r\nHost: vna\r\n\r\n",
    # PDU type 09h does not exist (PS3.8 9.3.1); length 4 like a well-formed small PDU.
    "unknown-pdu-type": b"\x09\x00\x00\x00\x00\x04\x00\x00\x00\x00",
    # P-DATA-TF before any association: Evt10 in Sta2 (PS3.8 Table 9-10).
    "p-data-before-association": encode(PDataTF((PDV(1, True, True, b"\x00" * 12),))),
    "truncated-associate-rq": _truncated_rq(),
    # A-RELEASE-RQ must have length 4 (PS3.8 9.3.6).
    "release-rq-wrong-length": b"\x05\x00\x00\x00\x00\x06" + b"\x00" * 6,
}


@pytest.mark.parametrize("name", list(MALFORMED))
async def test_malformed_pdu_is_aborted_while_others_are_served(vna, name):
    async with GoodTraffic(vna.ports.dicom) as good:
        reader, writer = await asyncio.open_connection(HOST, vna.ports.dicom)
        writer.write(MALFORMED[name])
        # PS3.8 Table 9-10: an invalid (Evt19) or unexpected PDU in Sta2 is AA-1, "send A-ABORT PDU";
        # AA-1 is the service-user source (0).
        source, _reason = await expect_abort_then_close(reader)
        assert source == 0
        writer.close()
        await good.served(2)


async def test_oversize_pdu_header_aborts_without_reading_the_body(vna_factory):
    rt = await vna_factory(dicom={"max_pdu_accept": 65536, "max_pdu_length": 16384})
    async with GoodTraffic(rt.ports.dicom) as good:
        reader, writer = await raw_associated(rt.ports.dicom)
        # A P-DATA-TF header announcing 64 MiB, and none of the body: the server must judge the PDU
        # on its header alone (PS3.8 9.3.1), so the A-ABORT arrives although no body bytes were sent.
        writer.write(struct.pack(">BxL", 0x04, 64 << 20))
        started = time.monotonic()
        source, reason = await expect_abort_then_close(reader, timeout=5)
        assert time.monotonic() - started < 3  # not a timeout: the network timeout is 60 s here
        # PS3.8 Table 9-26: service-provider source (2), invalid PDU parameter value (6)
        assert (source, reason) == (2, 6)
        writer.close()

        # the same before association: an A-ASSOCIATE-RQ announcing 64 MiB
        reader, writer = await asyncio.open_connection(HOST, rt.ports.dicom)
        writer.write(struct.pack(">BxL", 0x01, 64 << 20) + b"\x00\x01")
        await expect_abort_then_close(reader, timeout=3)
        writer.close()
        await good.served(2)


async def test_pdu_within_the_accept_limit_is_served(vna_factory):
    """The accept limit protects memory; a P-DATA-TF below it is still processed (C-ECHO answered)."""
    rt = await vna_factory(dicom={"max_pdu_accept": 65536, "max_pdu_length": 16384})
    scu = await RawSCU.connect(rt.ports.dicom)
    raw_cmd = C.encode({"CommandField": C.C_ECHO_RQ, "MessageID": 7, "AffectedSOPClassUID": VERIFICATION,
                        "CommandDataSetType": C.NO_DATASET})
    scu.writer.write(encode(PDataTF((PDV(1, True, True, raw_cmd),))))
    event = await scu.next_event()
    assert isinstance(event, MessageReceived)
    assert event.command["CommandField"] == C.C_ECHO_RSP and event.command["Status"] == 0x0000
    await scu.release()


# -- peers that stall --------------------------------------------------------------------------------

async def _closed_after(reader: asyncio.StreamReader, started: float, limit: float) -> float:
    try:
        await expect_closed(reader, timeout=limit)
    except TimeoutError:
        raise AssertionError(f"connection still open after {limit}s") from None
    return time.monotonic() - started


async def test_peer_stalling_inside_associate_rq_is_dropped(vna_factory):
    rt = await vna_factory(dicom={"network_timeout": 1, "acse_timeout": 1})
    async with GoodTraffic(rt.ports.dicom) as good:
        reader, writer = await asyncio.open_connection(HOST, rt.ports.dicom)
        rq = associate_rq()
        writer.write(rq[: len(rq) // 2])
        started = time.monotonic()
        await good.served(2)  # served while the stalled connection is open
        # PS3.8 9.1.5 / Table 9-10: the ARTIM timer expires in Sta2 (Evt18, AA-2): close the transport
        elapsed = await _closed_after(reader, started, 6)
        assert 0.5 < elapsed < 4, elapsed
        writer.close()


async def test_trickled_associate_rq_does_not_extend_the_artim_timer(vna_factory):
    """The ARTIM timer starts at transport connection and stops only when the whole A-ASSOCIATE-RQ is in
    (PS3.8 9.2.3 AE-5/AE-6): a peer sending one byte at a time cannot hold the connection open."""
    rt = await vna_factory(dicom={"network_timeout": 1, "acse_timeout": 1})
    reader, writer = await asyncio.open_connection(HOST, rt.ports.dicom)
    rq = associate_rq()
    started = time.monotonic()

    async def trickle() -> None:
        for i in range(len(rq) - 1):  # never the last byte
            if writer.is_closing():
                return
            writer.write(rq[i:i + 1])
            try:
                await writer.drain()
            except ConnectionError:
                return
            await asyncio.sleep(0.25)

    sender = asyncio.create_task(trickle())
    try:
        elapsed = await _closed_after(reader, started, 8)
    finally:
        sender.cancel()
        writer.close()
    assert elapsed < 3, f"connection held open {elapsed:.1f}s by a trickling peer (acse_timeout 1 s)"


async def test_peer_stalling_mid_pdu_is_aborted(vna_factory):
    rt = await vna_factory(dicom={"network_timeout": 1, "acse_timeout": 1})
    async with GoodTraffic(rt.ports.dicom) as good:
        reader, writer = await raw_associated(rt.ports.dicom)
        # A P-DATA-TF header announcing 1000 bytes, then 10 of them, then nothing
        writer.write(struct.pack(">BxL", 0x04, 1000) + b"\x00" * 10)
        started = time.monotonic()
        await good.served(2)
        # an established association: the server aborts (A-ABORT, PS3.8 9.3.8) and closes
        pdu = await read_pdu(reader, timeout=6)
        elapsed = time.monotonic() - started
        assert pdu is not None and pdu[0] == 0x07, pdu
        assert 0.5 < elapsed < 4, elapsed
        await expect_closed(reader)
        writer.close()


async def test_peer_that_stops_reading_is_dropped(vna_factory, caplog):
    """A peer that sends requests but never reads the responses: once the server cannot write for the
    network timeout, it drops the connection (the socket is reset, not left flushing forever)."""
    rt = await vna_factory(dicom={"network_timeout": 1, "acse_timeout": 1})
    reader, writer = await raw_associated(rt.ports.dicom)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    echo = encode(PDataTF((PDV(1, True, True, C.encode({
        "CommandField": C.C_ECHO_RQ, "MessageID": 1, "AffectedSOPClassUID": VERIFICATION,
        "CommandDataSetType": C.NO_DATASET})),)))
    for _ in range(100_000):  # 8 MB of C-ECHO-RQs: their responses overflow every socket buffer
        writer.write(echo)
    started = time.monotonic()
    async with GoodTraffic(rt.ports.dicom) as good:
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        # the bound only tells "dropped" from "kept": reaching a full socket buffer means answering up to
        # 100,000 echoes first, which took 4-8 s on a loaded 2-CPU machine (8 s failed a full run)
        while not poller.poll(0):
            assert time.monotonic() - started < 30, "the server keeps the connection of a peer that never reads"
            await asyncio.sleep(0.1)
        await good.served(2)
    writer.transport.abort()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "unhandled error in the server"


# -- presentation contexts and SOP classes -----------------------------------------------------------
# -- presentation contexts and SOP classes -----------------------------------------------------------

async def test_unknown_abstract_syntax_rejected_verification_accepted(vna):
    made_up = "1.2.826.0.1.3680043.9.9999.1.2.3"  # no SOP class of PS3.4

    def run() -> tuple[dict[str, int], Any]:
        ae = AE(ae_title="PCTX")
        ae.add_requested_context(made_up, ImplicitVRLittleEndian)
        ae.add_requested_context(Verification)
        assoc = ae.associate(HOST, vna.ports.dicom, ae_title="VNA")
        try:
            assert assoc.is_established
            results = {str(cx.abstract_syntax): cx.result for cx in assoc.accepted_contexts + assoc.rejected_contexts}
            return results, assoc.send_c_echo()
        finally:
            assoc.release()

    results, echo = await asyncio.to_thread(run)
    # PS3.8 9.3.3.2 Table 9-18: result 3 "abstract-syntax-not-supported (provider rejection)"
    assert results == {made_up: 3, VERIFICATION: 0}
    assert echo.Status == 0x0000


async def test_transfer_syntax_not_supported_is_result_4(vna):
    reader, writer = await asyncio.open_connection(HOST, vna.ports.dicom)
    writer.write(associate_rq(contexts=(PresentationContextRQ(1, VERIFICATION, ("1.2.3.4.5.6.7",)),
                                        PresentationContextRQ(3, VERIFICATION, (IMPLICIT,)))))
    pdu = await read_pdu(reader)
    assert pdu is not None and pdu[0] == 0x02
    # Presentation Context items (21h) after the 68-byte fixed part: id, reserved, result (PS3.8 9.3.3.2)
    body, pos, results = pdu[1], 68, {}
    while pos < len(body):
        item_type, length = struct.unpack_from(">BxH", body, pos)
        if item_type == 0x21:
            results[body[pos + 4]] = body[pos + 6]
        pos += 4 + length
    assert results == {1: 4, 3: 0}  # 4: transfer-syntaxes-not-supported
    writer.close()


async def test_c_store_outside_its_negotiated_sop_class_is_refused(vna, database_url):
    """A C-STORE belongs to the SOP class its presentation context was negotiated for (PS3.8 9.3.2.2,
    PS3.7 9.1.1.1); a made-up SOP class, or an image on the Verification context, is not stored:
    0122H "Refused: SOP Class Not Supported" (PS3.7 Annex C)."""
    made_up = "1.2.826.0.1.3680043.9.9999.1.2.3"
    scu = await RawSCU.connect(vna.ports.dicom)
    ds = make_ct(SOPClassUID=made_up)
    rsp = await scu.store(3, made_up, ds.SOPInstanceUID, encoded(ds))  # on the CT Image Storage context
    assert rsp["Status"] == 0x0122, hex(rsp["Status"])
    ds = make_ct()
    rsp = await scu.store(1, CT_IMAGE, ds.SOPInstanceUID, encoded(ds, IMPLICIT))  # on the Verification context
    assert rsp["Status"] == 0x0122, hex(rsp["Status"])
    ds = make_ct(SOPClassUID=MR_IMAGE)
    rsp = await scu.store(3, MR_IMAGE, ds.SOPInstanceUID, encoded(ds))  # MR on the CT context
    assert rsp["Status"] == 0x0122, hex(rsp["Status"])
    ds = make_ct(SOPClassUID=MR_IMAGE)
    rsp = await scu.store(5, MR_IMAGE, ds.SOPInstanceUID, encoded(ds))  # MR on the MR context: fine
    assert rsp["Status"] == 0x0000
    await scu.release()
    assert await instance_count(database_url) == 1


# -- invalid instances -------------------------------------------------------------------------------

INVALID_UIDS = {
    "non-digit component": "1.2.03.abc",
    "leading zero": "1.2.03.4",
    "longer than 64": "1.2." + "1234567890" * 7,
    "empty component": "1.2..3",
}


@pytest.mark.parametrize("case", list(INVALID_UIDS))
async def test_invalid_sop_instance_uid_is_refused_and_not_stored(vna, database_url, case):
    uid = INVALID_UIDS[case]
    scu = await RawSCU.connect(vna.ports.dicom)
    rsp = await scu.store(3, CT_IMAGE, uid, encoded(make_ct(SOPInstanceUID=uid)))
    await scu.release()
    # PS3.5 9.1: UIDs are digits and dots, no leading zeros in a component, at most 64 characters.
    # PS3.4 B.2.3: A9xx "Data Set does not match SOP Class" is the failure for such a data set.
    assert rsp["Status"] & 0xFF00 == 0xA900, hex(rsp["Status"])
    assert await instance_count(database_url) == 0
    assert stored_files(vna.settings.data_dir) == []


@pytest.mark.parametrize("attribute", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
async def test_missing_hierarchy_uid_is_refused(vna, database_url, attribute):
    ds = make_ct(**{attribute: None})
    command_uid = generate_uid() if attribute == "SOPInstanceUID" else ds.SOPInstanceUID
    scu = await RawSCU.connect(vna.ports.dicom)
    rsp = await scu.store(3, CT_IMAGE, command_uid, encoded(ds))
    await scu.release()
    # PS3.4 B.2.3 / C.6.1: an instance without its hierarchy (Type 1) UIDs cannot be stored
    assert rsp["Status"] & 0xF000 in (0xA000, 0xC000), hex(rsp["Status"])
    assert rsp["Status"] & 0xFF00 == 0xA900
    assert "ErrorComment" in rsp
    assert await instance_count(database_url) == 0


async def test_sop_class_differing_from_the_command_is_a900(vna, database_url):
    ds = make_ct(SOPClassUID=MR_IMAGE)  # an MR data set ...
    scu = await RawSCU.connect(vna.ports.dicom)
    rsp = await scu.store(3, CT_IMAGE, ds.SOPInstanceUID, encoded(ds))  # ... sent as CT
    # PS3.4 B.2.3: A900 "Data Set does not match SOP Class"
    assert rsp["Status"] == 0xA900
    assert rsp["AffectedSOPInstanceUID"] == ds.SOPInstanceUID
    # the same association still stores a good instance afterwards
    good = make_ct()
    rsp = await scu.store(3, CT_IMAGE, good.SOPInstanceUID, encoded(good))
    assert rsp["Status"] == 0x0000
    await scu.release()
    assert await instance_count(database_url) == 1


async def test_sop_instance_differing_from_the_command_is_refused(vna, database_url):
    ds = make_ct()
    scu = await RawSCU.connect(vna.ports.dicom)
    rsp = await scu.store(3, CT_IMAGE, generate_uid(), encoded(ds))
    await scu.release()
    # PS3.7 9.1.1.1: the Affected SOP Instance UID names the instance in the data set
    assert rsp["Status"] & 0xFF00 == 0xA900, hex(rsp["Status"])
    assert await instance_count(database_url) == 0


async def test_truncated_data_set_is_refused(vna, database_url):
    ds = make_ct()
    data = encoded(ds)
    scu = await RawSCU.connect(vna.ports.dicom)
    rsp = await scu.store(3, CT_IMAGE, ds.SOPInstanceUID, data[:-40])  # cut inside the pixel data
    await scu.release()
    assert rsp["Status"] & 0xF000 in (0xA000, 0xC000), hex(rsp["Status"])  # PS3.4 B.2.3 failure
    assert await instance_count(database_url) == 0


# -- AE titles and association limits ----------------------------------------------------------------

async def _rq_answer(port: int, calling_ae: str = "RAW", called_ae: str = "VNA") -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(associate_rq(calling_ae, called_ae))
    pdu = await read_pdu(reader)
    assert pdu is not None
    if pdu[0] == 0x03:
        await expect_closed(reader)  # PS3.8 AE-8: close after the A-ASSOCIATE-RJ
    writer.close()
    return pdu


def rj_fields(pdu: tuple[int, bytes]) -> tuple[int, int, int]:
    pdu_type, body = pdu
    assert pdu_type == 0x03, f"expected A-ASSOCIATE-RJ, got PDU type {pdu_type:02X}h"
    return body[1], body[2], body[3]  # result, source, reason (PS3.8 9.3.4)


async def test_wrong_called_ae_is_rejected(vna):
    # PS3.8 Table 9-21: rejected-permanent (1), service-user (1), called-AE-title-not-recognized (7)
    assert rj_fields(await _rq_answer(vna.ports.dicom, called_ae="NOT_VNA")) == (1, 1, 7)
    assert (await _rq_answer(vna.ports.dicom))[0] == 0x02


async def test_calling_ae_not_in_allowlist_is_rejected(vna_factory):
    rt = await vna_factory(dicom={"calling_ae_allowlist": ["GOOD"]})
    # PS3.8 Table 9-21: rejected-permanent (1), service-user (1), calling-AE-title-not-recognized (3)
    assert rj_fields(await _rq_answer(rt.ports.dicom, calling_ae="INTRUDER")) == (1, 1, 3)
    async with GoodTraffic(rt.ports.dicom, calling_ae="GOOD") as good:
        await good.served(1)


async def test_per_ae_association_limit(vna_factory):
    rt = await vna_factory(dicom={"max_associations_per_ae": 1})
    port = rt.ports.dicom
    reader, writer = await raw_associated(port, calling_ae="MODALITY")
    # PS3.8 Table 9-21: rejected-transient (2), service-provider presentation (3), local-limit-exceeded (2)
    assert rj_fields(await _rq_answer(port, calling_ae="MODALITY")) == (2, 3, 2)
    # another AE is not limited by MODALITY's association
    async with GoodTraffic(port, calling_ae="OTHER") as good:
        await good.served(1)
    # the first association ends (A-RELEASE, PS3.8 9.3.6): MODALITY may associate again
    writer.write(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")
    assert (await read_pdu(reader))[0] == 0x06
    await expect_closed(reader)
    writer.close()
    assert (await _rq_answer(port, calling_ae="MODALITY"))[0] == 0x02
    # an aborted association frees its slot too
    reader, writer = await raw_associated(port, calling_ae="MODALITY")
    writer.write(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")
    await expect_closed(reader)
    writer.close()
    await asyncio.sleep(0.05)
    assert (await _rq_answer(port, calling_ae="MODALITY"))[0] == 0x02


async def test_total_association_limit(vna_factory):
    rt = await vna_factory(dicom={"max_associations": 2})
    port = rt.ports.dicom
    held = [await raw_associated(port, calling_ae=f"AE{i}") for i in range(2)]
    assert rj_fields(await _rq_answer(port, calling_ae="THIRD")) == (2, 3, 2)
    for reader, writer in held:
        writer.write(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")
        await expect_closed(reader)
        writer.close()
    await asyncio.sleep(0.05)
    assert (await _rq_answer(port, calling_ae="THIRD"))[0] == 0x02
