"""PS3.8 9.3 PDU codec against annotated byte literals (in the manner of pynetdicom's encoded_pdu_items.py)."""

from __future__ import annotations

import pytest

from gateway.dimse.pdu import (
    PDV,
    AAbort,
    AAssociateAC,
    AAssociateRJ,
    AAssociateRQ,
    AReleaseRP,
    AReleaseRQ,
    AsyncOperationsWindow,
    PDataTF,
    PduReader,
    PresentationContextAC,
    PresentationContextRQ,
    ProtocolError,
    RoleSelection,
    SOPClassCommonExtendedNegotiation,
    SOPClassExtendedNegotiation,
    UserIdentityAC,
    UserIdentityRQ,
    UserInformation,
    encode,
)

# A-ASSOCIATE-RQ exactly as dcmtk 3.6.7 `echoscu -aet SCU -aec VNA` sends it (captured off the wire).
DCMTK_ECHOSCU_RQ = (
    b"\x01\x00\x00\x00\x00\xcd"  # PDU type 01h, reserved, PDU length 205
    b"\x00\x01\x00\x00"  # protocol version 1, reserved
    b"VNA             "  # called AE title, 16 bytes space padded
    b"SCU             "  # calling AE title
    + b"\x00" * 32  # reserved
    + b"\x10\x00\x00\x15"  # application context item, length 21 (odd: UIDs are not padded here)
    b"1.2.840.10008.3.1.1.1"
    b"\x20\x00\x00\x2e"  # presentation context item (RQ), length 46
    b"\x01\x00\xff\x00"  # context ID 1, reserved (dcmtk puts FFh in one: must be ignored)
    b"\x30\x00\x00\x11" b"1.2.840.10008.1.1"  # abstract syntax sub-item: Verification SOP Class
    b"\x40\x00\x00\x11" b"1.2.840.10008.1.2"  # transfer syntax sub-item: Implicit VR Little Endian
    b"\x50\x00\x00\x3a"  # user information item, length 58
    b"\x51\x00\x00\x04" b"\x00\x00\x40\x00"  # maximum length 16384
    b"\x52\x00\x00\x1b" b"1.2.276.0.7230010.3.0.3.6.7"  # implementation class UID
    b"\x55\x00\x00\x0f" b"OFFIS_DCMTK_367"  # implementation version name
)

DCMTK_ECHOSCU_RQ_DECODED = AAssociateRQ(
    called_ae="VNA", calling_ae="SCU",
    contexts=(PresentationContextRQ(1, "1.2.840.10008.1.1", ("1.2.840.10008.1.2",)),),
    user_info=UserInformation(max_pdu_length=16384, implementation_class_uid="1.2.276.0.7230010.3.0.3.6.7",
                              implementation_version_name="OFFIS_DCMTK_367"),
)

# A-ASSOCIATE-AC with every user information sub-item an acceptor may send.
FULL_AC = (
    b"\x02\x00\x00\x00\x00\xc3"  # PDU type 02h, length 195
    b"\x00\x01\x00\x00"  # protocol version 1
    b"VNA             " b"SCU             " + b"\x00" * 32
    + b"\x10\x00\x00\x15" b"1.2.840.10008.3.1.1.1"
    b"\x21\x00\x00\x19"  # presentation context item (AC), length 25
    b"\x01\x00\x00\x00"  # context ID 1, reserved, result 0 acceptance, reserved
    b"\x40\x00\x00\x11" b"1.2.840.10008.1.2"
    b"\x21\x00\x00\x08"  # presentation context item (AC), length 8
    b"\x03\x00\x03\x00"  # context ID 3, result 3 abstract syntax not supported
    b"\x40\x00\x00\x00"  # empty transfer syntax sub-item (not significant when rejected)
    b"\x50\x00\x00\x39"  # user information item, length 57
    b"\x51\x00\x00\x04" b"\x00\x04\x00\x00"  # maximum length 262144
    b"\x52\x00\x00\x05" b"1.2.3"  # implementation class UID
    b"\x53\x00\x00\x04" b"\x00\x01\x00\x01"  # asynchronous operations window 1/1
    b"\x54\x00\x00\x0b" b"\x00\x07" b"1.2.3.4" b"\x00\x01"  # role selection: SCU no, SCP yes
    b"\x55\x00\x00\x03" b"VNA"  # implementation version name
    b"\x59\x00\x00\x06" b"\x00\x04" b"tokn"  # user identity (AC): server response
)

FULL_AC_DECODED = AAssociateAC(
    called_ae="VNA", calling_ae="SCU",
    contexts=(PresentationContextAC(1, 0, "1.2.840.10008.1.2"), PresentationContextAC(3, 3, "")),
    user_info=UserInformation(max_pdu_length=262144, implementation_class_uid="1.2.3",
                              implementation_version_name="VNA", async_ops_window=AsyncOperationsWindow(1, 1),
                              role_selections=(RoleSelection("1.2.3.4", False, True),),
                              user_identity=UserIdentityAC(b"tokn")),
)

# User information with the extended negotiation and user identity (RQ) sub-items.
EXTENDED_USER_INFO_RQ = (
    b"\x01\x00\x00\x00\x00\xc0"  # PDU type 01h, length 192
    b"\x00\x01\x00\x00" b"VNA             " b"SCU             " + b"\x00" * 32
    + b"\x10\x00\x00\x15" b"1.2.840.10008.3.1.1.1"
    b"\x20\x00\x00\x16" b"\x01\x00\x00\x00"  # presentation context 1
    b"\x30\x00\x00\x05" b"1.2.3"
    b"\x40\x00\x00\x05" b"1.2.4"
    b"\x50\x00\x00\x45"  # user information item, length 69
    b"\x51\x00\x00\x04" b"\x00\x00\x00\x00"  # maximum length 0: unlimited
    b"\x56\x00\x00\x09" b"\x00\x05" b"1.2.3" b"\x01\x00"  # SOP class extended negotiation, 2 info bytes
    b"\x57\x00\x00\x16"  # SOP class common extended negotiation, length 22
    b"\x00\x05" b"1.2.3" b"\x00\x03" b"1.5" b"\x00\x08" b"\x00\x01" b"7" b"\x00\x03" b"7.8"
    b"\x58\x00\x00\x0c" b"\x02\x01" b"\x00\x03" b"bob" b"\x00\x03" b"pwd"  # user identity: username+passcode
    b"\x5f\x00\x00\x02" b"zz"  # unknown sub-item: kept raw
)

EXTENDED_USER_INFO_RQ_DECODED = AAssociateRQ(
    called_ae="VNA", calling_ae="SCU", contexts=(PresentationContextRQ(1, "1.2.3", ("1.2.4",)),),
    user_info=UserInformation(
        max_pdu_length=0,
        extended_negotiation=(SOPClassExtendedNegotiation("1.2.3", b"\x01\x00"),),
        common_extended_negotiation=(SOPClassCommonExtendedNegotiation("1.2.3", "1.5", ("7", "7.8")),),
        user_identity=UserIdentityRQ(2, True, b"bob", b"pwd"),
        unknown_items=((0x5F, b"zz"),),
    ),
)

ASSOCIATE_RJ = b"\x03\x00\x00\x00\x00\x04" b"\x00\x01\x01\x07"  # permanent, service-user, called AE unknown
P_DATA_TF = (
    b"\x04\x00\x00\x00\x00\x12"  # PDU type 04h, length 18
    b"\x00\x00\x00\x06" b"\x01" b"\x03" b"\x01\x02\x03\x04"  # PDV: length 6, context 1, command + last
    b"\x00\x00\x00\x04" b"\x01" b"\x00" b"\xaa\xbb"  # PDV: context 1, data set, not last
)
RELEASE_RQ = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
RELEASE_RP = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"
ABORT = b"\x07\x00\x00\x00\x00\x04" b"\x00\x00" b"\x02\x06"  # service provider, invalid parameter value

ROUND_TRIPS = [
    (DCMTK_ECHOSCU_RQ, DCMTK_ECHOSCU_RQ_DECODED, False),  # dcmtk's FFh reserved byte is not re-encoded
    (FULL_AC, FULL_AC_DECODED, True),
    (EXTENDED_USER_INFO_RQ, EXTENDED_USER_INFO_RQ_DECODED, True),
    (ASSOCIATE_RJ, AAssociateRJ(1, 1, 7), True),
    (P_DATA_TF, PDataTF((PDV(1, True, True, b"\x01\x02\x03\x04"), PDV(1, False, False, b"\xaa\xbb"))), True),
    (RELEASE_RQ, AReleaseRQ(), True),
    (RELEASE_RP, AReleaseRP(), True),
    (ABORT, AAbort(2, 6), True),
]


@pytest.mark.parametrize("raw, pdu, byte_exact", ROUND_TRIPS)
def test_decode_and_encode(raw, pdu, byte_exact):
    (decoded,) = PduReader(0).feed(raw)
    assert decoded == pdu
    encoded = encode(pdu)
    if byte_exact:
        assert encoded == raw
    else:
        assert encoded == raw.replace(b"\x01\x00\xff\x00", b"\x01\x00\x00\x00")
    assert PduReader(0).feed(encoded) == [pdu]


def test_reader_reassembles_byte_by_byte_and_splits_concatenated_pdus():
    stream = DCMTK_ECHOSCU_RQ + P_DATA_TF + RELEASE_RQ + ABORT
    reader = PduReader(1024)
    out = []
    for i in range(len(stream)):
        out += reader.feed(stream[i:i + 1])
    assert [type(p) for p in out] == [AAssociateRQ, PDataTF, AReleaseRQ, AAbort]
    assert PduReader(1024).feed(stream) == out


def test_uids_decode_with_trailing_nul_and_encode_unpadded():
    padded = DCMTK_ECHOSCU_RQ.replace(b"\x30\x00\x00\x11" b"1.2.840.10008.1.1",
                                      b"\x30\x00\x00\x12" b"1.2.840.10008.1.1\x00")
    padded = padded[:5] + bytes([padded[5] + 1]) + padded[6:]
    padded = padded.replace(b"\x20\x00\x00\x2e", b"\x20\x00\x00\x2f")
    (rq,) = PduReader(0).feed(padded)
    assert rq.contexts[0].abstract_syntax == "1.2.840.10008.1.1"


def test_ae_titles_are_space_padded_and_checked():
    rq = AAssociateRQ("A", "B", (PresentationContextRQ(1, "1.2", ("1.3",)),))
    assert encode(rq)[10:42] == b"A" + b" " * 15 + b"B" + b" " * 15
    with pytest.raises(ProtocolError):
        encode(AAssociateRQ("X" * 17, "B", rq.contexts))
    with pytest.raises(ProtocolError):
        encode(AAssociateRQ("", "B", rq.contexts))


def test_oversize_pdata_is_refused_from_the_header_alone():
    reader = PduReader(16384)
    with pytest.raises(ProtocolError, match="exceeds"):
        reader.feed(b"\x04\x00\x00\x00\x40\x01")  # 16385 > 16384, no body sent at all
    with pytest.raises(ProtocolError):
        reader.feed(RELEASE_RQ)  # the reader stays failed


def test_oversize_associate_rq_is_refused_from_the_header():
    with pytest.raises(ProtocolError, match="exceeds"):
        PduReader(16384, max_control_length=4096).feed(b"\x01\x00\x00\x01\x00\x00")


@pytest.mark.parametrize("raw, match", [
    (b"\x08\x00\x00\x00\x00\x04\x00\x00\x00\x00", "unrecognized PDU type"),
    (b"\x05\x00\x00\x00\x00\x05\x00\x00\x00\x00\x00", "length 4"),
    (b"\x07\x00\x00\x00\x00\x02\x00\x00", "length 4"),
    (b"\x04\x00\x00\x00\x00\x06\x00\x00\x00\x09\x01\x03", "overruns"),  # PDV says 9 bytes, 2 present
    (b"\x04\x00\x00\x00\x00\x05\x00\x00\x00\x01\x01", "truncated"),
    (b"\x04\x00\x00\x00\x00\x06\x00\x00\x00\x01\x01\x03", "invalid"),  # PDV length 1 < 2
    (b"\x04\x00\x00\x00\x00\x00", "without PDV"),
    (b"\x01\x00\x00\x00\x00\x44" + DCMTK_ECHOSCU_RQ[6:74], "lacks"),  # fixed fields, no items
    (b"\x01\x00\x00\x00\x00\x10" + b"\x00" * 16, "shorter"),
    # the application context item claims 0x15+0x100 bytes: overruns the PDU
    (DCMTK_ECHOSCU_RQ.replace(b"\x10\x00\x00\x15", b"\x10\x00\x01\x15"), "overruns"),
    # the maximum length sub-item with 3 bytes
    (DCMTK_ECHOSCU_RQ.replace(b"\x50\x00\x00\x3a\x51\x00\x00\x04\x00\x00\x40\x00",
                              b"\x50\x00\x00\x3a\x51\x00\x00\x03\x00\x40\x00\x55"), "bad|4 bytes|overruns"),
    # a presentation context without a transfer syntax
    (DCMTK_ECHOSCU_RQ.replace(b"\x40\x00\x00\x11" b"1.2.840.10008.1.2", b"\x31\x00\x00\x11" b"1.2.840.10008.1.2"),
     "unexpected sub-item"),
    (DCMTK_ECHOSCU_RQ.replace(b"SCU ", b"SC\xc9 "), "not ASCII"),
])
def test_malformed_pdus_raise_protocol_error(raw, match):
    with pytest.raises(ProtocolError, match=match):
        PduReader(0).feed(raw)


def test_protocol_error_carries_the_abort_reason():
    with pytest.raises(ProtocolError) as info:
        PduReader(0).feed(b"\x08\x00\x00\x00\x00\x04\x00\x00\x00\x00")
    assert info.value.abort_reason == 1  # PS3.8 Table 9-26: unrecognized PDU


def test_pdv_data_is_a_view_not_a_copy():
    (pdu,) = PduReader(0).feed(P_DATA_TF)
    assert isinstance(pdu.pdvs[0].data, memoryview) and bytes(pdu.pdvs[0].data) == b"\x01\x02\x03\x04"
