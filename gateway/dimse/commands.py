"""DIMSE command sets (PS3.7 section 6.3, 9.3, 10.3 and Annex E): group 0000 in Implicit VR Little Endian.

A command is a plain dict keyword -> value with the PS3.7 Annex E keywords:

    >>> raw = encode({"CommandField": C_ECHO_RQ, "MessageID": 1,
    ...               "AffectedSOPClassUID": "1.2.840.10008.1.1", "CommandDataSetType": NO_DATASET})
    >>> decode(raw)["MessageID"]
    1

Value types: UI/AE/LO/SH/LT/CS/IS -> str; US/UL -> int (`Overlays`, US 1-n, -> list[int]);
AT (OffendingElement, AttributeIdentifierList) -> list[int] of 0xGGGGEEEE tags (encode also takes
one int, one (group, element) tuple, or a list of either). A zero-length element decodes to None (US/UL), "" (text) or [] (AT);
None encodes as a zero-length element. CommandGroupLength is always computed on encode, and returned
by decode. Elements of group 0000 unknown to PS3.7 are skipped on decode; unknown keywords on encode
are a MisuseError (ProtocolError).
"""

from __future__ import annotations

import struct
from typing import Any, Callable

from gateway.dimse.pdu import ProtocolError

__all__ = [
    "C_STORE_RQ", "C_STORE_RSP", "C_GET_RQ", "C_GET_RSP", "C_FIND_RQ", "C_FIND_RSP", "C_MOVE_RQ",
    "C_MOVE_RSP", "C_ECHO_RQ", "C_ECHO_RSP", "C_CANCEL_RQ",
    "N_EVENT_REPORT_RQ", "N_EVENT_REPORT_RSP", "N_GET_RQ", "N_GET_RSP", "N_SET_RQ", "N_SET_RSP",
    "N_ACTION_RQ", "N_ACTION_RSP", "N_CREATE_RQ", "N_CREATE_RSP", "N_DELETE_RQ", "N_DELETE_RSP",
    "NO_DATASET", "DATASET_PRESENT",
    "PRIORITY_MEDIUM", "PRIORITY_HIGH", "PRIORITY_LOW",
    "ELEMENTS", "encode", "decode", "has_dataset", "is_response",
]

# PS3.7 E.1 Command Field values
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_GET_RQ = 0x0010
C_GET_RSP = 0x8010
C_FIND_RQ = 0x0020
C_FIND_RSP = 0x8020
C_MOVE_RQ = 0x0021
C_MOVE_RSP = 0x8021
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
N_EVENT_REPORT_RQ = 0x0100
N_EVENT_REPORT_RSP = 0x8100
N_GET_RQ = 0x0110
N_GET_RSP = 0x8110
N_SET_RQ = 0x0120
N_SET_RSP = 0x8120
N_ACTION_RQ = 0x0130
N_ACTION_RSP = 0x8130
N_CREATE_RQ = 0x0140
N_CREATE_RSP = 0x8140
N_DELETE_RQ = 0x0150
N_DELETE_RSP = 0x8150
C_CANCEL_RQ = 0x0FFF

# PS3.7 E.1 Command Data Set Type: 0101H means "no data set"; any other value means one follows.
NO_DATASET = 0x0101
DATASET_PRESENT = 0x0000  # the value dcmtk and pynetdicom send; PS3.7 only requires "not 0101H"

PRIORITY_MEDIUM = 0x0000
PRIORITY_HIGH = 0x0001
PRIORITY_LOW = 0x0002

# PS3.7 Table E.1-1 (current) and E.2-1 (retired, decoded for old peers): tag -> (keyword, VR)
ELEMENTS: dict[int, tuple[str, str]] = {
    0x0000_0000: ("CommandGroupLength", "UL"),
    0x0000_0001: ("CommandLengthToEnd", "UL"),
    0x0000_0002: ("AffectedSOPClassUID", "UI"),
    0x0000_0003: ("RequestedSOPClassUID", "UI"),
    0x0000_0010: ("CommandRecognitionCode", "SH"),
    0x0000_0100: ("CommandField", "US"),
    0x0000_0110: ("MessageID", "US"),
    0x0000_0120: ("MessageIDBeingRespondedTo", "US"),
    0x0000_0200: ("Initiator", "AE"),
    0x0000_0300: ("Receiver", "AE"),
    0x0000_0400: ("FindLocation", "AE"),
    0x0000_0600: ("MoveDestination", "AE"),
    0x0000_0700: ("Priority", "US"),
    0x0000_0800: ("CommandDataSetType", "US"),
    0x0000_0850: ("NumberOfMatches", "US"),
    0x0000_0860: ("ResponseSequenceNumber", "US"),
    0x0000_0900: ("Status", "US"),
    0x0000_0901: ("OffendingElement", "AT"),
    0x0000_0902: ("ErrorComment", "LO"),
    0x0000_0903: ("ErrorID", "US"),
    0x0000_1000: ("AffectedSOPInstanceUID", "UI"),
    0x0000_1001: ("RequestedSOPInstanceUID", "UI"),
    0x0000_1002: ("EventTypeID", "US"),
    0x0000_1005: ("AttributeIdentifierList", "AT"),
    0x0000_1008: ("ActionTypeID", "US"),
    0x0000_1020: ("NumberOfRemainingSuboperations", "US"),
    0x0000_1021: ("NumberOfCompletedSuboperations", "US"),
    0x0000_1022: ("NumberOfFailedSuboperations", "US"),
    0x0000_1023: ("NumberOfWarningSuboperations", "US"),
    0x0000_1030: ("MoveOriginatorApplicationEntityTitle", "AE"),
    0x0000_1031: ("MoveOriginatorMessageID", "US"),
    0x0000_4000: ("DialogReceiver", "LT"),
    0x0000_4010: ("TerminalType", "LT"),
    0x0000_5010: ("MessageSetID", "SH"),
    0x0000_5020: ("EndMessageID", "SH"),
    0x0000_5110: ("DisplayFormat", "LT"),
    0x0000_5120: ("PagePositionID", "LT"),
    0x0000_5130: ("TextFormatID", "CS"),
    0x0000_5140: ("NormalReverse", "CS"),
    0x0000_5150: ("AddGrayScale", "CS"),
    0x0000_5160: ("Borders", "CS"),
    0x0000_5170: ("Copies", "IS"),
    0x0000_5180: ("CommandMagnificationType", "CS"),
    0x0000_5190: ("Erase", "CS"),
    0x0000_51A0: ("Print", "CS"),
    0x0000_51B0: ("Overlays", "US_N"),  # US 1-n
}

_ELEMENT_HEADER = struct.Struct("<HHL")  # group, element, value length (PS3.5 7.1.3 implicit VR)
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<L")
_GROUP_LENGTH = struct.Struct("<HHLL")  # the (0000,0000) UL element, value included


# --- decoders: memoryview of the value -> Python value ----------------------------------------------

def _dec_us(raw: memoryview) -> int | None:
    if len(raw) == 2:
        return raw[0] | (raw[1] << 8)
    if not raw:
        return None
    raise ProtocolError(f"US element of length {len(raw)}")


def _dec_ul(raw: memoryview) -> int | None:
    if len(raw) == 4:
        return _U32.unpack(raw)[0]
    if not raw:
        return None
    raise ProtocolError(f"UL element of length {len(raw)}")


def _dec_us_n(raw: memoryview) -> list[int]:
    if len(raw) % 2:
        raise ProtocolError(f"US element of odd length {len(raw)}")
    return list(struct.unpack(f"<{len(raw) // 2}H", raw))


def _dec_at(raw: memoryview) -> list[int]:
    if len(raw) % 4:
        raise ProtocolError(f"AT element of length {len(raw)}, not a multiple of 4")
    values = struct.unpack(f"<{len(raw) // 2}H", raw)
    return [(values[i] << 16) | values[i + 1] for i in range(0, len(values), 2)]


def _dec_text(raw: memoryview) -> str:
    try:
        return bytes(raw).decode("ascii").strip(" \x00")
    except UnicodeDecodeError as exc:
        raise ProtocolError("command text element is not ASCII") from exc


def _dec_ui(raw: memoryview) -> str:
    try:
        return bytes(raw).decode("ascii").rstrip("\x00 ")
    except UnicodeDecodeError as exc:
        raise ProtocolError("command UID element is not ASCII") from exc


_DECODERS: dict[str, Callable[[memoryview], Any]] = {
    "US": _dec_us, "UL": _dec_ul, "US_N": _dec_us_n, "AT": _dec_at, "UI": _dec_ui,
    "AE": _dec_text, "LO": _dec_text, "SH": _dec_text, "LT": _dec_text, "CS": _dec_text, "IS": _dec_text,
}
_DECODE_TABLE: dict[int, tuple[str, Callable[[memoryview], Any]]] = {
    tag: (kw, _DECODERS[vr]) for tag, (kw, vr) in ELEMENTS.items()
}


# --- encoders: Python value -> value bytes (even length) --------------------------------------------

def _enc_us(v: int) -> bytes:
    return _U16.pack(v)


def _enc_ul(v: int) -> bytes:
    return _U32.pack(v)


def _enc_us_n(v: Any) -> bytes:
    values = [v] if isinstance(v, int) else list(v)
    return struct.pack(f"<{len(values)}H", *values)


def _enc_at(v: Any) -> bytes:
    # an int or a (group, element) tuple is one tag; a list holds several of either
    if isinstance(v, (int, tuple)):
        v = [v]
    out = []
    for tag in v:
        group, element = tag if isinstance(tag, tuple) else (tag >> 16, tag & 0xFFFF)
        out.append(struct.pack("<HH", group, element))
    return b"".join(out)


def _enc_ui(v: str) -> bytes:
    raw = v.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw  # PS3.5 9.1: UI padded with NUL


def _enc_text(v: Any) -> bytes:
    raw = str(v).encode("ascii")
    return raw + b" " if len(raw) % 2 else raw  # PS3.5 6.2: text VRs padded with space


_ENCODERS: dict[str, Callable[[Any], bytes]] = {
    "US": _enc_us, "UL": _enc_ul, "US_N": _enc_us_n, "AT": _enc_at, "UI": _enc_ui,
    "AE": _enc_text, "LO": _enc_text, "SH": _enc_text, "LT": _enc_text, "CS": _enc_text, "IS": _enc_text,
}
_ENCODE_TABLE: dict[str, tuple[int, Callable[[Any], bytes]]] = {
    kw: (tag, _ENCODERS[vr]) for tag, (kw, vr) in ELEMENTS.items()
}


def encode(command: dict[str, Any]) -> bytes:
    """Encode `command` as a PS3.7 6.3.1 command set, elements in tag order, CommandGroupLength first.

    Raises ProtocolError for unknown keywords or values that do not fit their VR.
    """
    elements = []
    for keyword, value in command.items():
        if keyword == "CommandGroupLength":
            continue
        try:
            tag, enc = _ENCODE_TABLE[keyword]
        except KeyError:
            raise ProtocolError(f"{keyword!r} is not a PS3.7 command element") from None
        try:
            raw = b"" if value is None else enc(value)
        except (struct.error, UnicodeEncodeError, TypeError, ValueError) as exc:
            raise ProtocolError(f"cannot encode {keyword}={value!r}") from exc
        elements.append((tag, raw))
    elements.sort()
    body = b"".join(_ELEMENT_HEADER.pack(0, tag & 0xFFFF, len(raw)) + raw for tag, raw in elements)
    return _GROUP_LENGTH.pack(0, 0, 4, len(body)) + body


def decode(data: bytes | memoryview) -> dict[str, Any]:
    """Decode a command set (Implicit VR Little Endian, group 0000 only) into a keyword dict.

    Raises ProtocolError on truncation, element overrun, elements outside group 0000, or a value
    length that does not fit its VR.
    """
    buf = memoryview(data)
    end = len(buf)
    off = 0
    out: dict[str, Any] = {}
    unpack = _ELEMENT_HEADER.unpack_from
    table = _DECODE_TABLE
    while off < end:
        if off + 8 > end:
            raise ProtocolError("truncated element header in command set")
        group, element, length = unpack(buf, off)
        off += 8
        if group != 0:
            raise ProtocolError(f"element ({group:04X},{element:04X}) outside group 0000 in command set")
        if length > end - off:  # also catches 0xFFFFFFFF undefined length
            raise ProtocolError(f"element (0000,{element:04X}) of length {length} overruns the command set")
        entry = table.get(element)
        if entry is not None:
            out[entry[0]] = entry[1](buf[off:off + length])
        off += length
    if "CommandField" not in out:
        raise ProtocolError("command set without CommandField (0000,0100)")
    return out


def has_dataset(command: dict[str, Any]) -> bool:
    """PS3.7 E.1: a data set follows unless CommandDataSetType is 0101H."""
    return command.get("CommandDataSetType", NO_DATASET) != NO_DATASET


def is_response(command: dict[str, Any]) -> bool:
    """Responses have bit 15 of CommandField set (PS3.7 E.1); C-CANCEL-RQ (0FFFH) does not."""
    return bool(command["CommandField"] & 0x8000)
