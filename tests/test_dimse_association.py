"""The sans-I/O association: an acceptor and a requestor wired to each other in memory."""

from __future__ import annotations

import os

import pytest

from gateway.dimse import commands
from gateway.dimse.association import (
    TRANSITIONS,
    Aborted,
    AcceptedContext,
    Association,
    AssociationAccepted,
    AssociationRejected,
    AssociationRequested,
    MessageReceived,
    ProtocolFailure,
    ReleaseConfirmed,
    ReleaseRequested,
    State,
)
from gateway.dimse.pdu import (
    PDV,
    AAbort,
    AAssociateAC,
    AAssociateRJ,
    AAssociateRQ,
    AReleaseRQ,
    PDataTF,
    PduReader,
    PresentationContextAC,
    PresentationContextRQ,
    RoleSelection,
    StateError,
    UserInformation,
    encode,
)

VERIFICATION = "1.2.840.10008.1.1"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


def make_rq() -> AAssociateRQ:
    return AAssociateRQ(
        called_ae="VNA", calling_ae="SCU",
        contexts=(PresentationContextRQ(1, VERIFICATION, (IMPLICIT,)),
                  PresentationContextRQ(3, CT_STORAGE, (EXPLICIT, IMPLICIT)),
                  PresentationContextRQ(5, "1.2.3.4", (IMPLICIT,))),
        user_info=UserInformation(role_selections=(RoleSelection(CT_STORAGE, True, True),)),
    )


def make_ac(rq: AAssociateRQ) -> AAssociateAC:
    return AAssociateAC(
        called_ae=rq.called_ae, calling_ae=rq.calling_ae,
        contexts=(PresentationContextAC(1, 0, IMPLICIT), PresentationContextAC(3, 0, EXPLICIT),
                  PresentationContextAC(5, 3, IMPLICIT)),
        user_info=UserInformation(role_selections=(RoleSelection(CT_STORAGE, False, True),)),
    )


def associate(acceptor_pdu: int = 16384, requestor_pdu: int = 16384) -> tuple[Association, Association]:
    scu = Association("requestor", max_pdu_length=requestor_pdu, max_pdu_accept=requestor_pdu)
    scp = Association("acceptor", max_pdu_length=acceptor_pdu, max_pdu_accept=acceptor_pdu)
    events = scp.receive_data(scu.request(make_rq()))
    assert len(events) == 1 and isinstance(events[0], AssociationRequested)
    assert scp.state == State.STA3
    events = scu.receive_data(scp.accept(make_ac(events[0].rq)))
    assert [type(e) for e in events] == [AssociationAccepted]
    return scu, scp


def deliver(pdus: list[bytes], to: Association, chunk: int | None = None) -> list:
    """Feed PDUs, optionally re-cut into chunks of `chunk` bytes as a TCP stream might deliver them."""
    data = b"".join(pdus)
    if chunk is None:
        return to.receive_data(data)
    events = []
    for i in range(0, len(data), chunk):
        events += to.receive_data(data[i:i + chunk])
    return events


def test_associate_negotiates_contexts_roles_and_pdu_lengths():
    scu, scp = associate(acceptor_pdu=32768, requestor_pdu=16384)
    assert scu.state == scp.state == State.STA6
    assert scp.calling_ae == "SCU" and scp.called_ae == "VNA"
    assert scp.peer_max_pdu == 16384 and scu.peer_max_pdu == 32768
    # PS3.7 D.3.3.4: roles are the AND of proposal and answer; context 5 was rejected
    expected = {1: AcceptedContext(VERIFICATION, IMPLICIT, True, False),
                3: AcceptedContext(CT_STORAGE, EXPLICIT, False, True)}
    assert scu.contexts == scp.contexts == expected
    assert scp.rq.user_info.implementation_class_uid and scu.ac.user_info.implementation_version_name


def test_c_echo_round_trip():
    scu, scp = associate()
    rq = {"CommandField": commands.C_ECHO_RQ, "MessageID": 1, "AffectedSOPClassUID": VERIFICATION}
    events = deliver(scu.send_message(1, rq), scp)
    assert len(events) == 1 and events[0].context_id == 1 and events[0].dataset is None
    assert events[0].command["CommandField"] == commands.C_ECHO_RQ
    assert events[0].command["CommandDataSetType"] == commands.NO_DATASET
    rsp = {"CommandField": commands.C_ECHO_RSP, "MessageIDBeingRespondedTo": 1,
           "AffectedSOPClassUID": VERIFICATION, "Status": 0}
    (reply,) = deliver(scp.send_message(1, rsp), scu)
    assert reply.command["Status"] == 0 and reply.command["MessageIDBeingRespondedTo"] == 1


def test_c_store_one_mib_fragmented_at_16_kib():
    scu, scp = associate(acceptor_pdu=16384)
    dataset = os.urandom(1 << 20)
    rq = {"CommandField": commands.C_STORE_RQ, "MessageID": 2, "AffectedSOPClassUID": CT_STORAGE,
          "AffectedSOPInstanceUID": "1.2.3.4.5", "Priority": 0}
    pdus = scu.send_message(3, rq, dataset)
    assert all(len(p) <= 16384 + 6 for p in pdus)  # header + PDU length field value <= peer max
    assert len(pdus) == 1 + -(-len(dataset) // (16384 - 6))
    reader = PduReader(16384)
    decoded = [pdu for p in pdus for pdu in reader.feed(p)]
    assert decoded[0].pdvs[0].is_command and decoded[0].pdvs[0].is_last
    assert [pdu.pdvs[0].is_last for pdu in decoded[1:]] == [False] * (len(decoded) - 2) + [True]
    events = deliver(pdus, scp, chunk=7919)  # a prime so PDU boundaries fall everywhere
    assert len(events) == 1
    assert events[0].dataset == dataset and isinstance(events[0].dataset, bytes)
    assert events[0].command["AffectedSOPInstanceUID"] == "1.2.3.4.5"
    assert events[0].command["CommandDataSetType"] == commands.DATASET_PRESENT


def test_small_message_shares_one_pdu_and_several_messages_in_one_read():
    scu, scp = associate()
    rq = {"CommandField": commands.C_FIND_RQ, "MessageID": 3, "AffectedSOPClassUID": CT_STORAGE, "Priority": 0}
    first = scu.send_message(3, rq, b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY ")
    assert len(first) == 1  # command and data set as two PDVs of one P-DATA-TF
    second = scu.send_message(1, {"CommandField": commands.C_ECHO_RQ, "MessageID": 4,
                                  "AffectedSOPClassUID": VERIFICATION})
    events = deliver(first + second, scp)
    assert [e.command["MessageID"] for e in events] == [3, 4]
    assert events[0].dataset.endswith(b"STUDY ") and events[1].dataset is None


def test_release_by_requestor():
    scu, scp = associate()
    events = scp.receive_data(scu.release_request())
    assert events == [ReleaseRequested()] and scu.state == State.STA7 and scp.state == State.STA8
    assert scu.receive_data(scp.release_response()) == [ReleaseConfirmed()]
    assert scu.state == State.STA1 and scp.state == State.STA13
    assert scu.is_closing and scp.is_closing


def test_release_collision():
    """PS3.8 9.2.2: both sides send A-RELEASE-RQ; the requestor answers first."""
    scu, scp = associate()
    rq_from_scu, rq_from_scp = scu.release_request(), scp.release_request()
    assert scu.receive_data(rq_from_scp) == [ReleaseRequested()] and scu.state == State.STA9
    assert scp.receive_data(rq_from_scu) == [ReleaseRequested()] and scp.state == State.STA10
    assert scp.receive_data(scu.release_response()) == [ReleaseConfirmed()] and scp.state == State.STA12
    assert scu.state == State.STA11
    assert scu.receive_data(scp.release_response()) == [ReleaseConfirmed()]
    assert scu.state == State.STA1 and scp.state == State.STA13


def test_abort_by_either_side():
    scu, scp = associate()
    raw = scp.abort(0, 0)
    assert raw == b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00"
    assert scu.receive_data(raw) == [Aborted(0, 0)] and scu.state == State.STA1
    assert scu.abort() == b""  # nothing left to abort


def test_reject():
    scu = Association("requestor", max_pdu_length=16384, max_pdu_accept=16384)
    scp = Association("acceptor", max_pdu_length=16384, max_pdu_accept=16384)
    scp.receive_data(scu.request(make_rq()))
    raw = scp.reject(AAssociateRJ(1, 1, 7))
    assert raw == b"\x03\x00\x00\x00\x00\x04\x00\x01\x01\x07" and scp.state == State.STA13
    assert scu.receive_data(raw) == [AssociationRejected(AAssociateRJ(1, 1, 7))] and scu.is_closing


def test_transport_closed_while_established_is_a_provider_abort():
    scu, scp = associate()
    assert scp.connection_lost() == [Aborted(2, 0)] and scp.state == State.STA1
    assert scu.release_request() and scu.connection_lost() == [Aborted(2, 0)]


def test_unexpected_pdu_in_sta6_is_aa8():
    scu, scp = associate()
    (event,) = scp.receive_data(encode(make_rq()))  # a second A-ASSOCIATE-RQ
    assert isinstance(event, ProtocolFailure) and (event.abort_source, event.abort_reason) == (2, 2)
    assert scp.state == State.STA13
    assert scp.abort() == b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x02"
    assert scp.abort() == b""  # owed once
    assert scp.receive_data(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00") == []  # Sta13 ignores PDUs


def test_pdata_before_association_is_aa1():
    scp = Association("acceptor", max_pdu_length=16384, max_pdu_accept=16384)
    (event,) = scp.receive_data(encode(PDataTF((PDV(1, True, True, b"x"),))))
    assert isinstance(event, ProtocolFailure) and event.abort_source == 0
    assert scp.abort() == b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00"


def test_garbage_and_oversize_pdus_fail_the_association():
    _, scp = associate(acceptor_pdu=16384)
    (event,) = scp.receive_data(b"\x09\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # no PDU type 09h
    assert isinstance(event, ProtocolFailure) and event.abort_reason == 1
    _, scp = associate(acceptor_pdu=16384)
    # a P-DATA-TF header announcing 1 GiB: refused from the header alone
    (event,) = scp.receive_data(b"\x04\x00\x40\x00\x00\x00")
    assert isinstance(event, ProtocolFailure) and "exceeds" in event.reason


@pytest.mark.parametrize("pdvs, why", [
    ((PDV(7, True, True, b""),), "not accepted"),
    ((PDV(1, False, True, b"x"),), "before any command"),
    ((PDV(1, True, True, b"\x00\x00\x00\x00\x04\x00\x00\x00"),), "bad command set"),
    ((PDV(1, True, False, b"\x00\x00"), PDV(3, True, True, b"\x00\x00")), "interleaved"),
])
def test_dimse_violations(pdvs, why):
    _, scp = associate()
    (event,) = scp.receive_data(encode(PDataTF(pdvs)))
    assert isinstance(event, ProtocolFailure) and why in event.reason
    assert scp.abort()[8:10] == b"\x02\x06"  # service provider, invalid PDU parameter value


def test_command_fragment_inside_dataset_and_dataset_for_no_dataset_command():
    scu, scp = associate()
    raw_cmd = commands.encode({"CommandField": 1, "MessageID": 1, "CommandDataSetType": 0})
    bad = PDataTF((PDV(3, True, True, raw_cmd), PDV(3, False, False, b"ab"), PDV(3, True, True, raw_cmd)))
    (event,) = scp.receive_data(encode(bad))
    assert isinstance(event, ProtocolFailure) and "inside a data set" in event.reason


def test_max_message_length():
    scu, _ = associate()
    scp = Association("acceptor", max_pdu_length=16384, max_pdu_accept=16384, max_message_length=1000)
    scu2 = Association("requestor", max_pdu_length=16384, max_pdu_accept=16384)
    (req,) = scp.receive_data(scu2.request(make_rq()))
    scu2.receive_data(scp.accept(make_ac(req.rq)))
    events = deliver(scu2.send_message(3, {"CommandField": 1, "MessageID": 1}, bytes(20000)), scp)
    assert isinstance(events[-1], ProtocolFailure) and "larger than 1000" in events[-1].reason


def test_local_primitives_checked_against_the_table():
    scp = Association("acceptor", max_pdu_length=16384, max_pdu_accept=16384)
    with pytest.raises(StateError):
        scp.send_message(1, {"CommandField": commands.C_ECHO_RQ, "MessageID": 1})
    with pytest.raises(StateError):
        scp.release_request()
    with pytest.raises(StateError):
        scp.request(make_rq())
    scu, scp = associate()
    with pytest.raises(StateError):
        scu.send_message(5, {"CommandField": commands.C_ECHO_RQ, "MessageID": 1})  # rejected context
    with pytest.raises(StateError):
        scp.release_response()  # no release requested
    # every cell of the table names an implemented action
    assert all(hasattr(Association, "_" + action) for action in TRANSITIONS.values())


def test_data_after_release_request_is_still_delivered():
    """AR-6: P-DATA received in Sta7 (we asked to release, the peer was still answering)."""
    scu, scp = associate()
    release = scu.release_request()
    rsp = scp.send_message(1, {"CommandField": commands.C_ECHO_RSP, "MessageIDBeingRespondedTo": 1, "Status": 0})
    (event,) = deliver(rsp, scu)
    assert isinstance(event, MessageReceived) and scu.state == State.STA7
    assert scp.receive_data(release) == [ReleaseRequested()]
    assert scu.receive_data(scp.release_response()) == [ReleaseConfirmed()]


def test_peer_abort_in_the_middle_of_a_message():
    scu, scp = associate()
    pdus = scu.send_message(3, {"CommandField": 1, "MessageID": 1}, bytes(100000))
    events = deliver(pdus[:3] + [encode(AAbort(0, 0))], scp)
    assert events == [Aborted(0, 0)] and scp.state == State.STA1


def test_release_rq_is_a_pdu_even_in_sta2():
    scp = Association("acceptor", max_pdu_length=16384, max_pdu_accept=16384)
    (event,) = scp.receive_data(encode(AReleaseRQ()))
    assert isinstance(event, ProtocolFailure) and scp.state == State.STA13


# --- interoperability: dcmtk's echoscu and storescu against a minimal asyncio acceptor ---------------

async def _minimal_acceptor(reader, writer, received: list) -> None:
    """Just enough server to drive Association as the real one will: accept all, answer success."""
    assoc = Association("acceptor", max_pdu_length=16384, max_pdu_accept=16384)
    while not assoc.is_closing:
        data = await reader.read(65536)
        for event in assoc.receive_data(data) if data else assoc.connection_lost():
            if isinstance(event, AssociationRequested):
                rq = event.rq
                writer.write(assoc.accept(AAssociateAC(
                    rq.called_ae, rq.calling_ae,
                    tuple(PresentationContextAC(pc.id, 0, pc.transfer_syntaxes[0]) for pc in rq.contexts))))
            elif isinstance(event, MessageReceived):
                received.append((assoc.contexts[event.context_id], event.command, event.dataset))
                rsp = {"CommandField": event.command["CommandField"] | 0x8000,
                       "MessageIDBeingRespondedTo": event.command["MessageID"],
                       "AffectedSOPClassUID": event.command["AffectedSOPClassUID"], "Status": 0}
                if "AffectedSOPInstanceUID" in event.command:
                    rsp["AffectedSOPInstanceUID"] = event.command["AffectedSOPInstanceUID"]
                writer.writelines(assoc.send_message(event.context_id, rsp))
            elif isinstance(event, ReleaseRequested):
                writer.write(assoc.release_response())
            elif isinstance(event, ProtocolFailure):
                writer.write(assoc.abort())
        await writer.drain()
        if not data:
            break
    writer.close()


async def test_dcmtk_echoscu_and_storescu_against_association():
    import asyncio
    from io import BytesIO

    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.filereader import read_dataset

    received: list = []
    server = await asyncio.start_server(lambda r, w: _minimal_acceptor(r, w, received), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    path = get_testdata_file("CT_small.dcm")
    try:
        for argv in (["/usr/bin/echoscu", "-aet", "SCU", "-aec", "VNA", "127.0.0.1", str(port)],
                     ["/usr/bin/storescu", "-aet", "SCU", "-aec", "VNA", "127.0.0.1", str(port), path]):
            proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.STDOUT)
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 0, out.decode()
    finally:
        server.close()
        await server.wait_closed()
    (echo_ctx, echo, _), (store_ctx, store, dataset) = received
    assert echo["CommandField"] == commands.C_ECHO_RQ and echo_ctx.abstract_syntax == VERIFICATION
    original = pydicom.dcmread(path)
    assert store["AffectedSOPInstanceUID"] == original.SOPInstanceUID
    ds = read_dataset(BytesIO(dataset), store_ctx.transfer_syntax == IMPLICIT, True)
    assert ds.SOPInstanceUID == original.SOPInstanceUID and ds.PixelData == original.PixelData
