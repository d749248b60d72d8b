"""PS3.7 command sets: annotated byte literals, a cross-check against pydicom/pynetdicom, malformed input."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom.dataset import Dataset
from pynetdicom.dsutils import decode as pynetdicom_decode
from pynetdicom.dsutils import encode as pynetdicom_encode

from gateway.dimse import commands
from gateway.dimse.pdu import ProtocolError

C_ECHO_RQ = (
    b"\x00\x00\x00\x00" b"\x04\x00\x00\x00" b"\x38\x00\x00\x00"  # (0000,0000) UL CommandGroupLength = 56
    b"\x00\x00\x02\x00" b"\x12\x00\x00\x00" b"1.2.840.10008.1.1\x00"  # (0000,0002) UI, NUL padded to 18
    b"\x00\x00\x00\x01" b"\x02\x00\x00\x00" b"\x30\x00"  # (0000,0100) US CommandField = C-ECHO-RQ
    b"\x00\x00\x10\x01" b"\x02\x00\x00\x00" b"\x01\x00"  # (0000,0110) US MessageID = 1
    b"\x00\x00\x00\x08" b"\x02\x00\x00\x00" b"\x01\x01"  # (0000,0800) US CommandDataSetType = 0101H
)

C_MOVE_RSP_FAILED = (
    b"\x00\x00\x00\x00" b"\x04\x00\x00\x00" b"\x4e\x00\x00\x00"  # CommandGroupLength = 78
    b"\x00\x00\x00\x01" b"\x02\x00\x00\x00" b"\x21\x80"  # CommandField = C-MOVE-RSP
    b"\x00\x00\x20\x01" b"\x02\x00\x00\x00" b"\x07\x00"  # MessageIDBeingRespondedTo = 7
    b"\x00\x00\x00\x08" b"\x02\x00\x00\x00" b"\x01\x01"  # no data set
    b"\x00\x00\x00\x09" b"\x02\x00\x00\x00" b"\x01\xa8"  # Status = A801H (move destination unknown)
    b"\x00\x00\x01\x09" b"\x08\x00\x00\x00" b"\x10\x00\x10\x00" b"\x10\x00\x20\x00"  # OffendingElement AT 1-n
    b"\x00\x00\x02\x09" b"\x04\x00\x00\x00" b"who "  # ErrorComment LO, space padded
    b"\x00\x00\x22\x10" b"\x02\x00\x00\x00" b"\x00\x00"  # NumberOfFailedSuboperations = 0
)


def test_c_echo_rq_literal():
    command = {"CommandField": commands.C_ECHO_RQ, "MessageID": 1, "AffectedSOPClassUID": "1.2.840.10008.1.1",
               "CommandDataSetType": commands.NO_DATASET}
    assert commands.encode(command) == C_ECHO_RQ
    assert commands.decode(C_ECHO_RQ) == {"CommandGroupLength": 56, **command}


def test_c_move_rsp_literal_with_list_values():
    command = {"CommandField": commands.C_MOVE_RSP, "MessageIDBeingRespondedTo": 7,
               "CommandDataSetType": commands.NO_DATASET, "Status": 0xA801,
               "OffendingElement": [0x00100010, (0x0010, 0x0020)], "ErrorComment": "who",
               "NumberOfFailedSuboperations": 0}
    assert commands.encode(command) == C_MOVE_RSP_FAILED
    decoded = commands.decode(C_MOVE_RSP_FAILED)
    assert decoded["OffendingElement"] == [0x00100010, 0x00100020] and decoded["ErrorComment"] == "who"
    assert not commands.has_dataset(decoded) and commands.is_response(decoded)


def test_c_store_rq_matches_pynetdicom_both_ways():
    ours = {"CommandField": commands.C_STORE_RQ, "MessageID": 65535, "Priority": commands.PRIORITY_HIGH,
            "AffectedSOPClassUID": "1.2.840.10008.5.1.4.1.1.2", "AffectedSOPInstanceUID": "1.2.3.45",
            "CommandDataSetType": 0x0000, "MoveOriginatorApplicationEntityTitle": "ORIGIN",
            "MoveOriginatorMessageID": 9}
    ds = Dataset()
    for keyword, value in ours.items():
        setattr(ds, keyword, value)
    theirs = pynetdicom_encode(ds, True, True)
    # pynetdicom leaves CommandGroupLength to its message layer: compare after our group length element
    assert commands.encode(ours)[12:] == theirs
    back = pynetdicom_decode(BytesIO(commands.encode(ours)), True, True)
    assert back.CommandGroupLength == len(theirs) and back.MoveOriginatorApplicationEntityTitle == "ORIGIN"
    assert commands.decode(commands.encode(ours)) == {"CommandGroupLength": len(theirs), **ours}


def test_every_element_round_trips():
    samples = {"UI": "1.2.3", "US": 3, "UL": 70000, "AE": "AE1", "LO": "comment", "SH": "sh", "LT": "text",
               "CS": "CS", "IS": "2", "AT": [0x00080018], "US_N": [1, 2]}
    command = {kw: samples[vr] for kw, vr in commands.ELEMENTS.values() if kw != "CommandGroupLength"}
    decoded = commands.decode(commands.encode(command))
    decoded.pop("CommandGroupLength")
    assert decoded == command


def test_empty_values_and_unknown_group0_elements():
    raw = commands.encode({"CommandField": commands.C_FIND_RQ, "Priority": None, "ErrorComment": None})
    decoded = commands.decode(raw + b"\x00\x00\x99\x99\x02\x00\x00\x00\x01\x00")  # (0000,9999) skipped
    assert decoded == {"CommandGroupLength": 26, "CommandField": 0x20, "Priority": None, "ErrorComment": ""}


@pytest.mark.parametrize("raw, match", [
    (C_ECHO_RQ[:-1], "overruns"),
    (C_ECHO_RQ + b"\x00\x00", "truncated"),
    (C_ECHO_RQ + b"\x08\x00\x18\x00\x02\x00\x00\x00ab", "outside group 0000"),
    (C_ECHO_RQ + b"\x00\x00\x00\x07\xff\xff\xff\xff", "overruns"),  # undefined length
    (C_ECHO_RQ.replace(b"\x00\x00\x00\x01\x02\x00\x00\x00\x30\x00", b"\x00\x00\x00\x01\x03\x00\x00\x00\x30\x00\x00"),
     "US element of length 3"),
    (C_ECHO_RQ[:38] + C_ECHO_RQ[48:], "without CommandField"),
    (b"\x00\x00\x02\x00\x02\x00\x00\x00\xff\xfe", "not ASCII"),
])
def test_malformed_command_sets(raw, match):
    with pytest.raises(ProtocolError, match=match):
        commands.decode(raw)


def test_encode_refuses_unknown_keywords_and_bad_values():
    with pytest.raises(ProtocolError, match="not a PS3.7 command element"):
        commands.encode({"PatientName": "X"})
    with pytest.raises(ProtocolError, match="cannot encode"):
        commands.encode({"MessageID": 70000})
