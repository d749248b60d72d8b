"""The asyncio Requestor against a real pynetdicom SCP on an ephemeral port."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import zlib

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, SecondaryCaptureImageStorage, Verification

from archive.errors import PeerError
from gateway.dimse.pdu import PresentationContextRQ
from gateway.dimse.scu import (
    AssociationRejectedError,
    PeerTimeout,
    PeerUnreachable,
    Requestor,
)

IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


def encoded(ds: pydicom.Dataset, transfer_syntax: str) -> bytes:
    """The data set (no file meta) as it travels in a P-DATA for `transfer_syntax`."""
    fp = DicomBytesIO()
    fp.is_implicit_VR = transfer_syntax == IMPLICIT
    fp.is_little_endian = transfer_syntax != BIG_ENDIAN
    write_dataset(fp, ds)
    raw = fp.getvalue()
    if transfer_syntax == DEFLATED:  # PS3.5 A.5: raw deflate of the explicit VR little endian stream
        deflater = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        raw = deflater.compress(raw) + deflater.flush()
        raw += b"\x00" * (len(raw) % 2)
    return raw


class StorageSCP:
    """pynetdicom storage SCP in its own threads, recording what it received."""

    def __init__(self, *, status: int = 0x0000, delay: float = 0.0) -> None:
        self.received: list[tuple[str, str, bytes, str | None]] = []
        self.status = status
        self.delay = delay
        self.lock = threading.Lock()
        ae = AE(ae_title="STORESCP")
        ae.require_called_aet = True
        ae.maximum_pdu_size = 16384  # our fragments must respect it
        ae.add_supported_context(Verification)
        ae.add_supported_context(CTImageStorage, [IMPLICIT, EXPLICIT, DEFLATED, BIG_ENDIAN])
        ae.add_supported_context(SecondaryCaptureImageStorage, [JPEG_BASELINE])
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self.on_store)])
        self.port = self.server.server_address[1]

    def on_store(self, event: evt.Event) -> int:
        if self.delay:
            time.sleep(self.delay)
        req = event.request
        with self.lock:
            self.received.append((event.context.transfer_syntax, req.AffectedSOPInstanceUID,
                                  req.DataSet.getvalue(), req.MoveOriginatorApplicationEntityTitle))
        return self.status

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def scp():
    server = StorageSCP()
    yield server
    server.close()


def contexts() -> list[PresentationContextRQ]:
    return [PresentationContextRQ(1, Verification, (IMPLICIT,)),
            PresentationContextRQ(3, CTImageStorage, (IMPLICIT,)),
            PresentationContextRQ(5, CTImageStorage, (EXPLICIT,)),
            PresentationContextRQ(7, CTImageStorage, (DEFLATED,)),
            PresentationContextRQ(9, CTImageStorage, (BIG_ENDIAN,)),
            PresentationContextRQ(11, SecondaryCaptureImageStorage, (JPEG_BASELINE,))]


async def test_c_echo_and_c_store_in_several_transfer_syntaxes(scp):
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    jpeg = pydicom.dcmread(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    sent = []
    async with Requestor.connect("127.0.0.1", scp.port, calling_ae="VNA", called_ae="STORESCP",
                                 contexts=contexts(), max_pdu_length=65536, timeout=10) as scu:
        assert scu.association.peer_max_pdu == 16384
        assert await scu.c_echo(timeout=10) == 0x0000
        for ts in (IMPLICIT, EXPLICIT, DEFLATED, BIG_ENDIAN):
            context_id = scu.accepted_context(CTImageStorage, ts)
            assert context_id is not None
            raw = encoded(ct, ts)
            uid = f"{ct.SOPInstanceUID}.{context_id}"
            status = await scu.c_store(context_id, CTImageStorage, uid, raw,
                                       move_originator_ae="MOVER", move_originator_message_id=3, timeout=10)
            assert status == 0x0000
            sent.append((ts, uid, raw, "MOVER"))
        context_id = scu.accepted_context(SecondaryCaptureImageStorage, JPEG_BASELINE)
        raw = encoded(jpeg, JPEG_BASELINE)  # encapsulated pixel data, sent as is
        assert await scu.c_store(context_id, SecondaryCaptureImageStorage, jpeg.SOPInstanceUID, raw,
                                 timeout=10) == 0x0000
        sent.append((JPEG_BASELINE, jpeg.SOPInstanceUID, raw, None))
        assert await scu.c_echo(timeout=10) == 0x0000
        message_ids = scu._message_id
    assert message_ids == 7  # two echoes and five stores, numbered 1..7
    assert scp.received == sent
    assert len(sent[0][2]) > 16384  # the CT really was fragmented


async def test_large_dataset_and_concurrent_calls_are_serialized(scp):
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ct.add_new(0x00091010, "OB", bytes(range(256)) * 4096)  # a 1 MiB private element
    raw = encoded(ct, EXPLICIT)
    async with Requestor.connect("127.0.0.1", scp.port, calling_ae="VNA", called_ae="STORESCP",
                                 contexts=contexts(), timeout=10) as scu:
        statuses = await asyncio.gather(*(
            scu.c_store(5, CTImageStorage, f"1.2.3.{i}", raw, timeout=30) for i in range(3)))
    assert statuses == [0, 0, 0]
    assert [r[1] for r in scp.received] == ["1.2.3.0", "1.2.3.1", "1.2.3.2"]
    assert all(r[2] == raw for r in scp.received)


async def test_failure_status_is_returned():
    server = StorageSCP(status=0xA700)
    try:
        async with Requestor.connect("127.0.0.1", server.port, calling_ae="VNA", called_ae="STORESCP",
                                     contexts=contexts(), timeout=10) as scu:
            assert await scu.c_store(3, CTImageStorage, "1.2.3", encoded(pydicom.Dataset(), IMPLICIT),
                                     timeout=10) == 0xA700
    finally:
        server.close()


async def test_rejected_association(scp):
    with pytest.raises(AssociationRejectedError) as info:
        async with Requestor.connect("127.0.0.1", scp.port, calling_ae="VNA", called_ae="SOMEONE",
                                     contexts=contexts(), timeout=10):
            pass
    assert (info.value.rj.result, info.value.rj.source, info.value.rj.reason) == (1, 1, 7)
    assert isinstance(info.value, PeerError)


async def test_unreachable_peer():
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(PeerUnreachable):
        async with Requestor.connect("127.0.0.1", port, calling_ae="VNA", called_ae="STORESCP",
                                     contexts=contexts(), timeout=5):
            pass


async def test_response_timeout_aborts():
    server = StorageSCP(delay=1.0)
    try:
        with pytest.raises(PeerTimeout):
            async with Requestor.connect("127.0.0.1", server.port, calling_ae="VNA", called_ae="STORESCP",
                                         contexts=contexts(), timeout=10) as scu:
                await scu.c_store(3, CTImageStorage, "1.2.3", b"", timeout=0.2)
        assert scu.association.is_closing
    finally:
        server.close()


async def test_error_in_block_aborts_and_propagates(scp):
    with pytest.raises(ZeroDivisionError):
        async with Requestor.connect("127.0.0.1", scp.port, calling_ae="VNA", called_ae="STORESCP",
                                     contexts=contexts(), timeout=10) as scu:
            assert await scu.c_echo(timeout=10) == 0
            1 / 0
    assert scu.association.is_closing
    with pytest.raises(PeerError):
        await scu.c_echo(timeout=1)
