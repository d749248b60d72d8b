"""DICOM Upper Layer PDUs (PS3.8 section 9.3): frozen dataclasses, `encode`, and an incremental `PduReader`.

Pure codec, no I/O and no state machine (that is `association.py`). Every multi-byte field of a PDU
is big endian (PS3.8 9.3.1); the DIMSE messages carried inside P-DATA-TF are not this module's business.

    >>> reader = PduReader(max_pdu_length=16384)
    >>> reader.feed(encode(AReleaseRQ()))
    [AReleaseRQ()]

UIDs inside A-ASSOCIATE items are written without padding: PS3.5 9.1 exempts "network negotiation"
from the even-length NUL padding rule, and dcmtk and pynetdicom both send them unpadded. On decode
a trailing NUL (some implementations pad anyway) and spaces are stripped.

Errors: `ProtocolError` for anything a peer sent that we cannot accept (it carries the A-ABORT reason
of PS3.8 Table 9-26 the association should send), `StateError` for a local call that the PS3.8 9.2
state machine does not allow. Both are `MisuseError`s (archive.errors).
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Union

from archive.errors import MisuseError

__all__ = [
    "APPLICATION_CONTEXT_NAME",
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION_NAME",
    "ProtocolError",
    "StateError",
    "PresentationContextRQ",
    "PresentationContextAC",
    "RoleSelection",
    "AsyncOperationsWindow",
    "SOPClassExtendedNegotiation",
    "SOPClassCommonExtendedNegotiation",
    "UserIdentityRQ",
    "UserIdentityAC",
    "UserInformation",
    "AAssociateRQ",
    "AAssociateAC",
    "AAssociateRJ",
    "PDV",
    "PDataTF",
    "AReleaseRQ",
    "AReleaseRP",
    "AAbort",
    "PDU",
    "encode",
    "encode_pdata_header",
    "decode",
    "PduReader",
]

# PS3.7 Annex A.2.1: the only DICOM application context name.
APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"
# Generated once under the pydicom root (generate_uid(entropy_srcs=["vna", "implementation-class"])).
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.78992970838100942481347457255179191339"
IMPLEMENTATION_VERSION_NAME = "VNA_010"

# PS3.8 9.3.1 PDU types
A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07

# PS3.8 Table 9-26: A-ABORT reason/diag values when the source is the service provider (2)
ABORT_REASON_NOT_SPECIFIED = 0
ABORT_UNRECOGNIZED_PDU = 1
ABORT_UNEXPECTED_PDU = 2
ABORT_UNRECOGNIZED_PDU_PARAMETER = 4
ABORT_UNEXPECTED_PDU_PARAMETER = 5
ABORT_INVALID_PDU_PARAMETER_VALUE = 6

_HEADER = struct.Struct(">BxL")  # PDU type, reserved, PDU length
_ITEM = struct.Struct(">BxH")  # item type, reserved, item length (PS3.8 9.3.2.x)
_PDV_HEADER = struct.Struct(">LBB")  # PDV item length, presentation context ID, message control header
_PDATA_PDV_HEADER = struct.Struct(">BxLLBB")  # P-DATA-TF header with one PDV header right after it
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">L")
_RQAC_FIXED = struct.Struct(">Hxx16s16s32x")  # protocol version, reserved, called AE, calling AE, reserved
_FOUR = struct.Struct(">xxBB")  # reserved, reserved, source/result..., used by A-ABORT
_RJ = struct.Struct(">xBBB")  # reserved, result, source, reason/diag


class ProtocolError(MisuseError):
    """A peer sent bytes that violate PS3.8 (or a value cannot be encoded as a PDU).

    `abort_reason` is the A-ABORT reason (PS3.8 Table 9-26, service-provider source) to send back.
    """

    def __init__(self, message: str, *, abort_reason: int = ABORT_INVALID_PDU_PARAMETER_VALUE) -> None:
        super().__init__(message)
        self.abort_reason = abort_reason


class StateError(MisuseError):
    """A local primitive (accept, send_message, release...) not allowed in the current PS3.8 9.2 state."""


# ---------------------------------------------------------------------------------------------------
# Items and PDUs


def _tuple(obj: object, name: str) -> None:
    value = getattr(obj, name)
    if not isinstance(value, tuple):
        object.__setattr__(obj, name, tuple(value))


@dataclass(frozen=True, slots=True)
class PresentationContextRQ:
    """PS3.8 9.3.2.2: one proposed presentation context (odd `id` 1..255)."""

    id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]

    def __post_init__(self) -> None:
        _tuple(self, "transfer_syntaxes")


@dataclass(frozen=True, slots=True)
class PresentationContextAC:
    """PS3.8 9.3.3.2: the answer to one proposed context.

    `result`: 0 acceptance, 1 user rejection, 2 no reason (provider rejection), 3 abstract syntax not
    supported, 4 transfer syntaxes not supported. `transfer_syntax` is only significant on acceptance.
    """

    id: int
    result: int
    transfer_syntax: str = ""

    ACCEPTANCE = 0
    USER_REJECTION = 1
    NO_REASON = 2
    ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
    TRANSFER_SYNTAXES_NOT_SUPPORTED = 4


@dataclass(frozen=True, slots=True)
class RoleSelection:
    """PS3.7 D.3.3.4 SCP/SCU Role Selection (54h), always from the association requestor's view:
    `scu_role` the requestor may act as SCU, `scp_role` the requestor may act as SCP."""

    sop_class_uid: str
    scu_role: bool
    scp_role: bool


@dataclass(frozen=True, slots=True)
class AsyncOperationsWindow:
    """PS3.7 D.3.3.3 Asynchronous Operations Window (53h); 0 means unlimited."""

    max_operations_invoked: int
    max_operations_performed: int


@dataclass(frozen=True, slots=True)
class SOPClassExtendedNegotiation:
    """PS3.7 D.3.3.5 (56h): the service-class application information is kept raw."""

    sop_class_uid: str
    service_class_application_information: bytes


@dataclass(frozen=True, slots=True)
class SOPClassCommonExtendedNegotiation:
    """PS3.7 D.3.3.6 (57h)."""

    sop_class_uid: str
    service_class_uid: str
    related_general_sop_class_uids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _tuple(self, "related_general_sop_class_uids")


@dataclass(frozen=True, slots=True)
class UserIdentityRQ:
    """PS3.7 D.3.3.7.1 (58h). `identity_type`: 1 username, 2 username+passcode, 3 Kerberos, 4 SAML, 5 JWT."""

    identity_type: int
    positive_response_requested: bool
    primary_field: bytes
    secondary_field: bytes = b""


@dataclass(frozen=True, slots=True)
class UserIdentityAC:
    """PS3.7 D.3.3.7.2 (59h)."""

    server_response: bytes


@dataclass(frozen=True, slots=True)
class UserInformation:
    """PS3.8 9.3.2.3 / PS3.7 Annex D.3.3 User Information item (50h) and its sub-items.

    `max_pdu_length` None means the sub-item is absent, 0 means "no limit" (PS3.8 D.1).
    Unknown sub-items are kept as (item type, raw value) so they survive a round trip.
    """

    max_pdu_length: int | None = None
    implementation_class_uid: str | None = None
    implementation_version_name: str | None = None
    async_ops_window: AsyncOperationsWindow | None = None
    role_selections: tuple[RoleSelection, ...] = ()
    extended_negotiation: tuple[SOPClassExtendedNegotiation, ...] = ()
    common_extended_negotiation: tuple[SOPClassCommonExtendedNegotiation, ...] = ()
    user_identity: UserIdentityRQ | UserIdentityAC | None = None
    unknown_items: tuple[tuple[int, bytes], ...] = ()

    def __post_init__(self) -> None:
        for name in ("role_selections", "extended_negotiation", "common_extended_negotiation", "unknown_items"):
            _tuple(self, name)


@dataclass(frozen=True, slots=True)
class AAssociateRQ:
    """PS3.8 9.3.2 A-ASSOCIATE-RQ (01h)."""

    called_ae: str
    calling_ae: str
    contexts: tuple[PresentationContextRQ, ...]
    user_info: UserInformation = field(default_factory=UserInformation)
    application_context: str = APPLICATION_CONTEXT_NAME
    protocol_version: int = 1

    def __post_init__(self) -> None:
        _tuple(self, "contexts")


@dataclass(frozen=True, slots=True)
class AAssociateAC:
    """PS3.8 9.3.3 A-ASSOCIATE-AC (02h). The AE fields echo the RQ (PS3.8 Table 9-17: not tested)."""

    called_ae: str
    calling_ae: str
    contexts: tuple[PresentationContextAC, ...]
    user_info: UserInformation = field(default_factory=UserInformation)
    application_context: str = APPLICATION_CONTEXT_NAME
    protocol_version: int = 1

    def __post_init__(self) -> None:
        _tuple(self, "contexts")


@dataclass(frozen=True, slots=True)
class AAssociateRJ:
    """PS3.8 9.3.4 A-ASSOCIATE-RJ (03h), values of Table 9-21.

    `result` 1 rejected-permanent, 2 rejected-transient. `source` 1 service-user (reason 1 no reason,
    2 application context not supported, 3 calling AE not recognized, 7 called AE not recognized),
    2 service-provider ACSE (1 no reason, 2 protocol version not supported), 3 service-provider
    presentation (1 temporary congestion, 2 local limit exceeded).
    """

    result: int
    source: int
    reason: int


@dataclass(frozen=True, slots=True)
class PDV:
    """PS3.8 9.3.5.1 Presentation Data Value item; E.2 message control header as two flags.

    `data` is a memoryview into the received PDU when decoded (no copy); bytes when built locally.
    """

    context_id: int
    is_command: bool
    is_last: bool
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class PDataTF:
    """PS3.8 9.3.5 P-DATA-TF (04h)."""

    pdvs: tuple[PDV, ...]

    def __post_init__(self) -> None:
        _tuple(self, "pdvs")


@dataclass(frozen=True, slots=True)
class AReleaseRQ:
    """PS3.8 9.3.6 A-RELEASE-RQ (05h)."""


@dataclass(frozen=True, slots=True)
class AReleaseRP:
    """PS3.8 9.3.7 A-RELEASE-RP (06h)."""


@dataclass(frozen=True, slots=True)
class AAbort:
    """PS3.8 9.3.8 A-ABORT (07h). `source` 0 service-user, 2 service-provider; `reason` per Table 9-26."""

    source: int = 0
    reason: int = 0


PDU = Union[AAssociateRQ, AAssociateAC, AAssociateRJ, PDataTF, AReleaseRQ, AReleaseRP, AAbort]


# ---------------------------------------------------------------------------------------------------
# Encoding


def _ae(title: str) -> bytes:
    # PS3.8 9.3.2: 16 characters, space padded; leading/trailing spaces are not significant.
    try:
        raw = title.strip(" ").encode("ascii")
    except UnicodeEncodeError as exc:
        raise ProtocolError(f"AE title {title!r} is not ASCII") from exc
    if not 0 < len(raw) <= 16:
        raise ProtocolError(f"AE title {title!r} must have 1 to 16 significant characters")
    return raw.ljust(16, b" ")


def _ascii(value: str, what: str) -> bytes:
    try:
        return value.encode("ascii")
    except UnicodeEncodeError as exc:
        raise ProtocolError(f"{what} {value!r} is not ASCII") from exc


def _item(item_type: int, value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ProtocolError(f"item {item_type:02X}h value of {len(value)} bytes does not fit a 2-byte length")
    return _ITEM.pack(item_type, len(value)) + value


def _u16_prefixed(value: bytes) -> bytes:
    return _U16.pack(len(value)) + value


def _encode_user_info(ui: UserInformation) -> bytes:
    parts = []
    if ui.max_pdu_length is not None:
        parts.append(_item(0x51, _U32.pack(ui.max_pdu_length)))
    if ui.implementation_class_uid is not None:
        parts.append(_item(0x52, _ascii(ui.implementation_class_uid, "UID")))
    if ui.async_ops_window is not None:
        w = ui.async_ops_window
        parts.append(_item(0x53, struct.pack(">HH", w.max_operations_invoked, w.max_operations_performed)))
    for rs in ui.role_selections:
        parts.append(_item(0x54, _u16_prefixed(_ascii(rs.sop_class_uid, "UID"))
                           + bytes((int(rs.scu_role), int(rs.scp_role)))))
    if ui.implementation_version_name is not None:
        parts.append(_item(0x55, _ascii(ui.implementation_version_name, "implementation version name")))
    for ext in ui.extended_negotiation:
        parts.append(_item(0x56, _u16_prefixed(_ascii(ext.sop_class_uid, "UID"))
                           + bytes(ext.service_class_application_information)))
    for cext in ui.common_extended_negotiation:
        related = b"".join(_u16_prefixed(_ascii(u, "UID")) for u in cext.related_general_sop_class_uids)
        parts.append(_item(0x57, _u16_prefixed(_ascii(cext.sop_class_uid, "UID"))
                           + _u16_prefixed(_ascii(cext.service_class_uid, "UID"))
                           + _u16_prefixed(related)))
    uid_ = ui.user_identity
    if isinstance(uid_, UserIdentityRQ):
        parts.append(_item(0x58, bytes((uid_.identity_type, int(uid_.positive_response_requested)))
                           + _u16_prefixed(bytes(uid_.primary_field)) + _u16_prefixed(bytes(uid_.secondary_field))))
    elif isinstance(uid_, UserIdentityAC):
        parts.append(_item(0x59, _u16_prefixed(bytes(uid_.server_response))))
    for item_type, raw in ui.unknown_items:
        parts.append(_item(item_type, bytes(raw)))
    return _item(0x50, b"".join(parts))


def _encode_associate(pdu_type: int, pdu: AAssociateRQ | AAssociateAC) -> bytes:
    items = [_item(0x10, _ascii(pdu.application_context, "application context name"))]
    if pdu_type == A_ASSOCIATE_RQ:
        for pc in pdu.contexts:
            sub = [_item(0x30, _ascii(pc.abstract_syntax, "abstract syntax"))]
            sub += [_item(0x40, _ascii(ts, "transfer syntax")) for ts in pc.transfer_syntaxes]
            items.append(_item(0x20, bytes((pc.id, 0, 0, 0)) + b"".join(sub)))
    else:
        for pc in pdu.contexts:
            items.append(_item(0x21, bytes((pc.id, 0, pc.result, 0))
                               + _item(0x40, _ascii(pc.transfer_syntax, "transfer syntax"))))
    items.append(_encode_user_info(pdu.user_info))
    body = _RQAC_FIXED.pack(pdu.protocol_version, _ae(pdu.called_ae), _ae(pdu.calling_ae)) + b"".join(items)
    return _HEADER.pack(pdu_type, len(body)) + body


def encode(pdu: PDU) -> bytes:
    """Return the PS3.8 9.3 encoding of `pdu` (header included). Raises ProtocolError on unencodable values."""
    if isinstance(pdu, PDataTF):
        parts = []
        for pdv in pdu.pdvs:
            mch = (1 if pdv.is_command else 0) | (2 if pdv.is_last else 0)
            parts.append(_PDV_HEADER.pack(len(pdv.data) + 2, pdv.context_id, mch))
            parts.append(pdv.data)
        body = b"".join(parts)
        return _HEADER.pack(P_DATA_TF, len(body)) + body
    if isinstance(pdu, AAssociateRQ):
        return _encode_associate(A_ASSOCIATE_RQ, pdu)
    if isinstance(pdu, AAssociateAC):
        return _encode_associate(A_ASSOCIATE_AC, pdu)
    if isinstance(pdu, AAssociateRJ):
        return _HEADER.pack(A_ASSOCIATE_RJ, 4) + _RJ.pack(pdu.result, pdu.source, pdu.reason)
    if isinstance(pdu, AReleaseRQ):
        return b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
    if isinstance(pdu, AReleaseRP):
        return b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"
    if isinstance(pdu, AAbort):
        return _HEADER.pack(A_ABORT, 4) + _FOUR.pack(pdu.source, pdu.reason)
    raise TypeError(f"not a PDU: {pdu!r}")


def encode_pdata_header(context_id: int, is_command: bool, is_last: bool, data_length: int) -> bytes:
    """Header of a P-DATA-TF PDU carrying exactly one PDV of `data_length` bytes (PS3.8 9.3.5, E.2).

    Lets a sender write header + data slice without copying the data into a new PDU object.
    """
    mch = (1 if is_command else 0) | (2 if is_last else 0)
    return _PDATA_PDV_HEADER.pack(P_DATA_TF, data_length + 6, data_length + 2, context_id, mch)


# ---------------------------------------------------------------------------------------------------
# Decoding


def _str(raw: memoryview | bytes, what: str) -> str:
    try:
        return bytes(raw).decode("ascii")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{what} is not ASCII", abort_reason=ABORT_INVALID_PDU_PARAMETER_VALUE) from exc


def _uid(raw: memoryview | bytes) -> str:
    return _str(raw, "UID").rstrip("\x00 ")


def _items(buf: memoryview, start: int, end: int, where: str) -> list[tuple[int, memoryview]]:
    """Split buf[start:end] into (item type, value) per PS3.8 9.3.2.x item headers, checking overruns."""
    out = []
    off = start
    while off < end:
        if off + 4 > end:
            raise ProtocolError(f"truncated item header in {where}")
        item_type, length = _ITEM.unpack_from(buf, off)
        off += 4
        if off + length > end:
            raise ProtocolError(f"item {item_type:02X}h of {length} bytes overruns {where}")
        out.append((item_type, buf[off:off + length]))
        off += length
    return out


def _prefixed(raw: memoryview, off: int, what: str) -> tuple[memoryview, int]:
    """A 2-byte length followed by that many bytes (PS3.7 D.3.3.4-D.3.3.7 sub-item fields)."""
    if off + 2 > len(raw):
        raise ProtocolError(f"truncated length field in {what}")
    (n,) = _U16.unpack_from(raw, off)
    off += 2
    if off + n > len(raw):
        raise ProtocolError(f"field of {n} bytes overruns {what}")
    return raw[off:off + n], off + n


def _decode_user_info(buf: memoryview) -> UserInformation:
    kw: dict[str, object] = {}
    roles, ext, cext, unknown = [], [], [], []
    for item_type, raw in _items(buf, 0, len(buf), "user information item"):
        if item_type == 0x51:
            if len(raw) != 4:
                raise ProtocolError("maximum length sub-item must be 4 bytes")
            kw["max_pdu_length"] = _U32.unpack(raw)[0]
        elif item_type == 0x52:
            kw["implementation_class_uid"] = _uid(raw)
        elif item_type == 0x53:
            if len(raw) != 4:
                raise ProtocolError("asynchronous operations window sub-item must be 4 bytes")
            kw["async_ops_window"] = AsyncOperationsWindow(*struct.unpack(">HH", raw))
        elif item_type == 0x54:
            uid, off = _prefixed(raw, 0, "role selection sub-item")
            if off + 2 != len(raw):
                raise ProtocolError("role selection sub-item has a bad length")
            roles.append(RoleSelection(_uid(uid), bool(raw[off]), bool(raw[off + 1])))
        elif item_type == 0x55:
            kw["implementation_version_name"] = _str(raw, "implementation version name").strip(" \x00")
        elif item_type == 0x56:
            uid, off = _prefixed(raw, 0, "SOP class extended negotiation sub-item")
            ext.append(SOPClassExtendedNegotiation(_uid(uid), bytes(raw[off:])))
        elif item_type == 0x57:
            what = "SOP class common extended negotiation sub-item"
            sop, off = _prefixed(raw, 0, what)
            service, off = _prefixed(raw, off, what)
            related_raw, off = _prefixed(raw, off, what)
            related, roff = [], 0
            while roff < len(related_raw):
                uid, roff = _prefixed(related_raw, roff, what)
                related.append(_uid(uid))
            cext.append(SOPClassCommonExtendedNegotiation(_uid(sop), _uid(service), tuple(related)))
        elif item_type == 0x58:
            what = "user identity sub-item"
            if len(raw) < 2:
                raise ProtocolError(f"truncated {what}")
            primary, off = _prefixed(raw, 2, what)
            secondary, off = _prefixed(raw, off, what) if off < len(raw) else (b"", off)
            kw["user_identity"] = UserIdentityRQ(raw[0], bool(raw[1]), bytes(primary), bytes(secondary))
        elif item_type == 0x59:
            response, _ = _prefixed(raw, 0, "user identity sub-item")
            kw["user_identity"] = UserIdentityAC(bytes(response))
        else:
            unknown.append((item_type, bytes(raw)))
    return UserInformation(role_selections=tuple(roles), extended_negotiation=tuple(ext),
                           common_extended_negotiation=tuple(cext), unknown_items=tuple(unknown), **kw)


def _decode_associate(pdu_type: int, body: memoryview) -> AAssociateRQ | AAssociateAC:
    name = "A-ASSOCIATE-RQ" if pdu_type == A_ASSOCIATE_RQ else "A-ASSOCIATE-AC"
    if len(body) < _RQAC_FIXED.size:
        raise ProtocolError(f"{name} shorter than its fixed fields")
    version, called, calling = _RQAC_FIXED.unpack_from(body, 0)
    app_ctx = None
    user_info = None
    contexts: list = []
    for item_type, raw in _items(body, _RQAC_FIXED.size, len(body), name):
        if item_type == 0x10:
            app_ctx = _uid(raw)
        elif item_type == 0x20 and pdu_type == A_ASSOCIATE_RQ:
            if len(raw) < 4:
                raise ProtocolError("truncated presentation context item")
            abstract, transfers = None, []
            for sub_type, sub in _items(raw, 4, len(raw), "presentation context item"):
                if sub_type == 0x30:
                    abstract = _uid(sub)
                elif sub_type == 0x40:
                    transfers.append(_uid(sub))
                else:
                    raise ProtocolError(f"unexpected sub-item {sub_type:02X}h in presentation context",
                                        abort_reason=ABORT_UNRECOGNIZED_PDU_PARAMETER)
            if abstract is None or not transfers:
                raise ProtocolError(f"presentation context {raw[0]} lacks abstract or transfer syntax")
            contexts.append(PresentationContextRQ(raw[0], abstract, tuple(transfers)))
        elif item_type == 0x21 and pdu_type == A_ASSOCIATE_AC:
            if len(raw) < 4:
                raise ProtocolError("truncated presentation context item")
            ts = ""
            for sub_type, sub in _items(raw, 4, len(raw), "presentation context item"):
                if sub_type == 0x40:
                    ts = _uid(sub)
            contexts.append(PresentationContextAC(raw[0], raw[2], ts))
        elif item_type == 0x50:
            user_info = _decode_user_info(raw)
        elif item_type in (0x20, 0x21):
            raise ProtocolError(f"item {item_type:02X}h not allowed in {name}",
                                abort_reason=ABORT_UNEXPECTED_PDU_PARAMETER)
        # PS3.8 9.3.1: items of unrecognized types are ignored
    if app_ctx is None:
        raise ProtocolError(f"{name} lacks the application context item")
    if user_info is None:
        raise ProtocolError(f"{name} lacks the user information item")
    cls = AAssociateRQ if pdu_type == A_ASSOCIATE_RQ else AAssociateAC
    return cls(called_ae=_str(called, "called AE title").strip(" \x00"),
               calling_ae=_str(calling, "calling AE title").strip(" \x00"),
               contexts=tuple(contexts), user_info=user_info, application_context=app_ctx,
               protocol_version=version)


def _decode_pdata(body: memoryview) -> PDataTF:
    pdvs = []
    off, end = 0, len(body)
    while off < end:
        if off + 6 > end:
            raise ProtocolError("truncated PDV item header in P-DATA-TF")
        length, ctx, mch = _PDV_HEADER.unpack_from(body, off)
        if length < 2 or off + 4 + length > end:
            raise ProtocolError(f"PDV item length {length} is invalid or overruns the P-DATA-TF")
        pdvs.append(PDV(ctx, bool(mch & 1), bool(mch & 2), body[off + 6:off + 4 + length]))
        off += 4 + length
    if not pdvs:
        raise ProtocolError("P-DATA-TF without PDV items")
    return PDataTF(tuple(pdvs))


def decode(pdu_type: int, body: memoryview | bytes) -> PDU:
    """Decode one PDU from its type and its body (the bytes after the 6-byte header)."""
    body = memoryview(body)
    if pdu_type == P_DATA_TF:
        return _decode_pdata(body)
    if pdu_type in (A_ASSOCIATE_RQ, A_ASSOCIATE_AC):
        return _decode_associate(pdu_type, body)
    if pdu_type in (A_ASSOCIATE_RJ, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT):
        if len(body) != 4:
            raise ProtocolError(f"PDU type {pdu_type:02X}h must have length 4, not {len(body)}")
        if pdu_type == A_ASSOCIATE_RJ:
            return AAssociateRJ(*_RJ.unpack(body))
        if pdu_type == A_ABORT:
            return AAbort(*_FOUR.unpack(body))
        return AReleaseRQ() if pdu_type == A_RELEASE_RQ else AReleaseRP()
    raise ProtocolError(f"unrecognized PDU type {pdu_type:02X}h", abort_reason=ABORT_UNRECOGNIZED_PDU)


_FIXED_LENGTH = {A_ASSOCIATE_RJ: 4, A_RELEASE_RQ: 4, A_RELEASE_RP: 4, A_ABORT: 4}


class PduReader:
    """Incremental PDU decoder: `feed(bytes)` returns the PDUs completed so far.

    `max_pdu_length` bounds the length field of P-DATA-TF PDUs (0 = unlimited); `max_control_length`
    bounds A-ASSOCIATE-RQ/AC. Both are checked on the 6-byte header, before any body is buffered, so a
    peer cannot make us allocate more than the limit. Bodies are kept as the received chunks and only
    joined when a PDU spans chunks; PDV data are memoryviews into them, so a dataset is copied once,
    when the association joins its fragments.

    After a ProtocolError the reader is poisoned: the association must be aborted.
    """

    __slots__ = ("max_pdu_length", "max_control_length", "_chunks", "_buffered", "_pending", "_failed")

    def __init__(self, max_pdu_length: int, *, max_control_length: int = 1 << 20) -> None:
        self.max_pdu_length = max_pdu_length
        self.max_control_length = max_control_length
        self._chunks: deque[memoryview] = deque()
        self._buffered = 0
        self._pending: tuple[int, int] | None = None  # (type, length) of a PDU whose header was read
        self._failed: ProtocolError | None = None

    def _take(self, n: int) -> memoryview:
        """Remove and return the next n buffered bytes; zero-copy when they sit in one chunk."""
        self._buffered -= n
        first = self._chunks[0]
        if len(first) >= n:
            if len(first) == n:
                self._chunks.popleft()
            else:
                self._chunks[0] = first[n:]
            return first[:n]
        parts = []
        while n:
            chunk = self._chunks[0]
            if len(chunk) <= n:
                parts.append(self._chunks.popleft())
                n -= len(chunk)
            else:
                parts.append(chunk[:n])
                self._chunks[0] = chunk[n:]
                n = 0
        return memoryview(b"".join(parts))

    def feed(self, data: bytes | bytearray | memoryview) -> list[PDU]:
        if self._failed is not None:
            raise self._failed
        if data:
            # bytearray/memoryview callers may reuse their buffer: keep an immutable copy of those
            self._chunks.append(memoryview(data if isinstance(data, bytes) else bytes(data)))
            self._buffered += len(data)
        out: list[PDU] = []
        try:
            while True:
                if self._pending is None:
                    if self._buffered < 6:
                        break
                    pdu_type, length = _HEADER.unpack(self._take(6))
                    self._check_header(pdu_type, length)
                    self._pending = (pdu_type, length)
                pdu_type, length = self._pending
                if self._buffered < length:
                    break
                self._pending = None
                out.append(decode(pdu_type, self._take(length) if length else b""))
        except ProtocolError as exc:
            self._failed = exc
            self._chunks.clear()
            raise
        return out

    def _check_header(self, pdu_type: int, length: int) -> None:
        if pdu_type == P_DATA_TF:
            if self.max_pdu_length and length > self.max_pdu_length:
                raise ProtocolError(f"P-DATA-TF of {length} bytes exceeds the limit of {self.max_pdu_length}",
                                    abort_reason=ABORT_INVALID_PDU_PARAMETER_VALUE)
        elif pdu_type in (A_ASSOCIATE_RQ, A_ASSOCIATE_AC):
            if length > self.max_control_length:
                raise ProtocolError(f"A-ASSOCIATE PDU of {length} bytes exceeds the limit of "
                                    f"{self.max_control_length}")
        elif pdu_type in _FIXED_LENGTH:
            if length != 4:
                raise ProtocolError(f"PDU type {pdu_type:02X}h must have length 4, not {length}")
        else:
            raise ProtocolError(f"unrecognized PDU type {pdu_type:02X}h", abort_reason=ABORT_UNRECOGNIZED_PDU)
