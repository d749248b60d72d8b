"""A sans-I/O DICOM association: the PS3.8 9.2 state machine plus PS3.7 message reassembly.

Feed it received bytes, get events; call a primitive, get bytes to write. It never touches a socket,
a clock or a task, so the same object serves the asyncio server, the SCU and in-memory tests:

    assoc = Association("acceptor", max_pdu_length=262144, max_pdu_accept=1 << 20)
    for event in assoc.receive_data(data):
        if isinstance(event, AssociationRequested):
            transport.write(assoc.accept(build_ac(event.rq)))
        elif isinstance(event, MessageReceived):
            ...
        elif isinstance(event, ProtocolFailure):
            transport.write(assoc.abort()); transport.close()

Transport setup and the ARTIM timer (PS3.8 9.1.5) belong to the I/O layer: an acceptor starts in
Sta2 (transport connection open), a requestor in Sta1 and goes to Sta5 when `request()` returns the
A-ASSOCIATE-RQ. Sta13 means "close the transport once written" (after AR-4, AA-1, AA-8, AE-8);
Sta1 after AR-3, AE-4 or AA-3 means "close now". `is_closing` tells both apart from a live association.

Transitions follow PS3.8 Table 9-10 (`TRANSITIONS`), one method per action, as pynetdicom's fsm.py.
An event the table does not list for the current state is a local `StateError` for primitives,
and for received PDUs the table itself maps it to AA-1/AA-8 (abort) - surfaced as `ProtocolFailure`.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, replace
from typing import Any, Iterator, Literal, NamedTuple

from archive.errors import MisuseError
from gateway.dimse import commands
from gateway.dimse.pdu import (
    ABORT_INVALID_PDU_PARAMETER_VALUE,
    ABORT_UNEXPECTED_PDU,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    PDU,
    AAbort,
    AAssociateAC,
    AAssociateRJ,
    AAssociateRQ,
    AReleaseRP,
    AReleaseRQ,
    PDataTF,
    PduReader,
    ProtocolError,
    StateError,
    encode,
    encode_pdata_header,
)

__all__ = [
    "Association",
    "AcceptedContext",
    "State",
    "Event",
    "AssociationRequested",
    "AssociationAccepted",
    "AssociationRejected",
    "MessageReceived",
    "ReleaseRequested",
    "ReleaseConfirmed",
    "Aborted",
    "ProtocolFailure",
    "TRANSITIONS",
]


class State(enum.IntEnum):
    """PS3.8 Table 9-9 states."""

    STA1 = 1  # Idle
    STA2 = 2  # Transport connection open (awaiting A-ASSOCIATE-RQ PDU)
    STA3 = 3  # Awaiting local A-ASSOCIATE response primitive
    STA4 = 4  # Awaiting transport connection opening to complete (handled outside)
    STA5 = 5  # Awaiting A-ASSOCIATE-AC or A-ASSOCIATE-RJ PDU
    STA6 = 6  # Association established and ready for data transfer
    STA7 = 7  # Awaiting A-RELEASE-RP PDU
    STA8 = 8  # Awaiting local A-RELEASE response primitive
    STA9 = 9  # Release collision requestor side; awaiting A-RELEASE response primitive
    STA10 = 10  # Release collision acceptor side; awaiting A-RELEASE-RP PDU
    STA11 = 11  # Release collision requestor side; awaiting A-RELEASE-RP PDU
    STA12 = 12  # Release collision acceptor side; awaiting A-RELEASE response primitive
    STA13 = 13  # Awaiting transport connection close


class _Evt(enum.IntEnum):
    """PS3.8 Table 9-10 events (transport ones are driven by the I/O layer)."""

    EVT1 = 1  # A-ASSOCIATE request (local user)
    EVT3 = 3  # A-ASSOCIATE-AC PDU received
    EVT4 = 4  # A-ASSOCIATE-RJ PDU received
    EVT6 = 6  # A-ASSOCIATE-RQ PDU received
    EVT7 = 7  # A-ASSOCIATE response primitive (accept)
    EVT8 = 8  # A-ASSOCIATE response primitive (reject)
    EVT9 = 9  # P-DATA request primitive
    EVT10 = 10  # P-DATA-TF PDU received
    EVT11 = 11  # A-RELEASE request primitive
    EVT12 = 12  # A-RELEASE-RQ PDU received
    EVT13 = 13  # A-RELEASE-RP PDU received
    EVT14 = 14  # A-RELEASE response primitive
    EVT15 = 15  # A-ABORT request primitive
    EVT16 = 16  # A-ABORT PDU received
    EVT17 = 17  # Transport connection closed indication
    EVT19 = 19  # Unrecognized or invalid PDU received


# --- events returned by receive_data ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AssociationRequested:
    """A-ASSOCIATE indication (AE-6): answer with `accept()` or `reject()`."""

    rq: AAssociateRQ


@dataclass(frozen=True, slots=True)
class AssociationAccepted:
    """A-ASSOCIATE confirmation, accepted (AE-3)."""

    ac: AAssociateAC


@dataclass(frozen=True, slots=True)
class AssociationRejected:
    """A-ASSOCIATE confirmation, rejected (AE-4); the association is idle, close the transport."""

    rj: AAssociateRJ


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """One complete DIMSE message (PS3.7 section 8): command set decoded, data set joined once."""

    context_id: int
    command: dict[str, Any]
    dataset: bytes | None


@dataclass(frozen=True, slots=True)
class ReleaseRequested:
    """A-RELEASE indication (AR-2, or AR-8 in a collision): answer with `release_response()`."""


@dataclass(frozen=True, slots=True)
class ReleaseConfirmed:
    """A-RELEASE confirmation (AR-3, or AR-10 in a collision)."""


@dataclass(frozen=True, slots=True)
class Aborted:
    """A-ABORT / A-P-ABORT indication (AA-3, AA-2, AA-4): close the transport.

    `source` 0 service-user, 2 service-provider (PS3.8 Table 9-26). A transport closed while the
    association was live is reported as source 2, reason 0.
    """

    source: int
    reason: int


@dataclass(frozen=True, slots=True)
class ProtocolFailure:
    """The peer broke PS3.8/PS3.7 (AA-1/AA-8): write `abort()` and close the transport."""

    reason: str
    abort_source: int = 2
    abort_reason: int = 0


Event = (AssociationRequested | AssociationAccepted | AssociationRejected | MessageReceived
         | ReleaseRequested | ReleaseConfirmed | Aborted | ProtocolFailure)


class AcceptedContext(NamedTuple):
    """An accepted presentation context. Roles are the requestor's (PS3.7 D.3.3.4):
    `scu_role` the requestor may invoke operations, `scp_role` the requestor may perform them."""

    abstract_syntax: str
    transfer_syntax: str
    scu_role: bool
    scp_role: bool


_S = State
_E = _Evt
_LIVE = (_S.STA6, _S.STA7, _S.STA8, _S.STA9, _S.STA10, _S.STA11, _S.STA12)
_ALL_BUT_1_4 = (_S.STA2, _S.STA3, _S.STA5) + _LIVE + (_S.STA13,)


def _row(evt: _Evt, cells: dict[State, str], default_states: tuple[State, ...] = (), default: str = "") -> dict:
    row = {(evt, s): default for s in default_states}
    row.update({(evt, s): a for s, a in cells.items()})
    return row


def _pdu_row(evt: _Evt, cells: dict[State, str]) -> dict:
    # PS3.8 Table 9-10: an unexpected PDU is AA-1 in Sta2, AA-8 in Sta3..Sta12, AA-6 (ignore) in Sta13
    base = {_S.STA2: "AA_1", _S.STA13: "AA_6"}
    base.update(cells)
    return _row(evt, base, (_S.STA3, _S.STA5) + _LIVE, "AA_8")


# PS3.8 Table 9-10, restricted to the states reachable when transport is handled outside (no Sta4).
TRANSITIONS: dict[tuple[_Evt, State], str] = {
    **_row(_E.EVT1, {_S.STA1: "AE_1"}),
    **_pdu_row(_E.EVT3, {_S.STA5: "AE_3"}),
    **_pdu_row(_E.EVT4, {_S.STA5: "AE_4"}),
    **_pdu_row(_E.EVT6, {_S.STA2: "AE_6", _S.STA13: "AA_7"}),
    **_row(_E.EVT7, {_S.STA3: "AE_7"}),
    **_row(_E.EVT8, {_S.STA3: "AE_8"}),
    **_row(_E.EVT9, {_S.STA6: "DT_1", _S.STA8: "AR_7"}),
    **_pdu_row(_E.EVT10, {_S.STA6: "DT_2", _S.STA7: "AR_6"}),
    **_row(_E.EVT11, {_S.STA6: "AR_1"}),
    **_pdu_row(_E.EVT12, {_S.STA6: "AR_2", _S.STA7: "AR_8"}),
    **_pdu_row(_E.EVT13, {_S.STA7: "AR_3", _S.STA10: "AR_10", _S.STA11: "AR_3"}),
    **_row(_E.EVT14, {_S.STA8: "AR_4", _S.STA9: "AR_9", _S.STA12: "AR_4"}),
    **_row(_E.EVT15, {}, (_S.STA3, _S.STA5) + _LIVE, "AA_1"),
    **_row(_E.EVT16, {_S.STA2: "AA_2", _S.STA13: "AA_2"}, (_S.STA3, _S.STA5) + _LIVE, "AA_3"),
    **_row(_E.EVT17, {_S.STA2: "AA_5", _S.STA13: "AR_5"}, (_S.STA3, _S.STA5) + _LIVE, "AA_4"),
    **_row(_E.EVT19, {_S.STA2: "AA_1", _S.STA13: "AA_7"}, (_S.STA3, _S.STA5) + _LIVE, "AA_8"),
}

_PDU_EVENT: dict[type, _Evt] = {
    AAssociateAC: _E.EVT3, AAssociateRJ: _E.EVT4, AAssociateRQ: _E.EVT6, PDataTF: _E.EVT10,
    AReleaseRQ: _E.EVT12, AReleaseRP: _E.EVT13, AAbort: _E.EVT16,
}

_PDATA_PDV_HEADER = struct.Struct(">BxLLBB")  # PS3.8 9.3.5: PDU header + first PDV header
_PDV_HEADER = struct.Struct(">LBB")  # PDV item length, presentation context ID, message control header

# P-DATA fragment size when the peer announced no limit (0): any size is legal, this bounds memory.
_UNLIMITED_FRAGMENT = 1 << 20


class Association:
    """One DICOM association, either side, without I/O.

    `max_pdu_length` is announced to the peer in our A-ASSOCIATE-RQ/AC (0 = unlimited);
    `max_pdu_accept` is the largest P-DATA-TF we take from the peer whatever we announced
    (tolerates peers that overshoot a little, refuses the rest from the 6-byte header);
    `max_message_length` caps one reassembled data set (0 = unlimited).

    Attributes after association: `contexts` {id: AcceptedContext}, `peer_max_pdu`, `calling_ae`,
    `called_ae`, `rq`, `ac`, `state`.
    """

    def __init__(self, role: Literal["acceptor", "requestor"], *, max_pdu_length: int, max_pdu_accept: int,
                 max_message_length: int = 0, max_control_length: int = 1 << 20) -> None:
        if role not in ("acceptor", "requestor"):
            raise MisuseError(f"role must be 'acceptor' or 'requestor', not {role!r}")
        if max_pdu_length < 0 or max_pdu_accept < 0 or (max_pdu_accept and max_pdu_length
                                                         and max_pdu_accept < max_pdu_length):
            raise MisuseError("need 0 <= max_pdu_length <= max_pdu_accept (0 = unlimited)")
        if max_pdu_length and max_pdu_length < 8:
            raise MisuseError("max_pdu_length must leave room for a PDV (>= 8)")
        self.role = role
        self.max_pdu_length = max_pdu_length
        self.max_pdu_accept = max_pdu_accept
        self.max_message_length = max_message_length
        self.state = State.STA2 if role == "acceptor" else State.STA1
        self.contexts: dict[int, AcceptedContext] = {}
        self.peer_max_pdu = 0
        self.calling_ae: str | None = None
        self.called_ae: str | None = None
        self.rq: AAssociateRQ | None = None
        self.ac: AAssociateAC | None = None
        self._reader = PduReader(max_pdu_accept, max_control_length=max_control_length)
        self._reader_failed = False
        self._pending_abort: bytes = b""  # A-ABORT owed to the peer after AA-1/AA-8 on received data
        # PS3.7 8 / PS3.8 9.3.5 reassembly of the message being received
        self._msg_context: int | None = None
        self._msg_command: dict[str, Any] | None = None
        self._fragments: list[bytes | memoryview] = []
        self._fragments_length = 0

    # --- properties ---------------------------------------------------------------------------------

    @property
    def is_established(self) -> bool:
        return self.state in _LIVE

    @property
    def is_closing(self) -> bool:
        """True once the transport should be closed (after any pending bytes are written)."""
        if self.state == State.STA13:
            return True
        return self.state == State.STA1 and (self.role == "acceptor" or self.rq is not None)

    # --- received data ------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes read from the transport; return the events they complete, in order."""
        if self.state == State.STA1 or (self.state == State.STA13 and self._reader_failed):
            return []
        events: list[Event] = []
        try:
            pdus = self._reader.feed(data)
        except ProtocolError as exc:
            self._reader_failed = True
            return self._fire(_E.EVT19, exc)
        for i, pdu in enumerate(pdus):
            events += self._fire(_PDU_EVENT[type(pdu)], pdu)
            if self.state == State.STA1 or (self.state == State.STA13 and self._pending_abort):
                break  # nothing after an abort or a rejection is meaningful
        return events

    def connection_lost(self) -> list[Event]:
        """The transport closed (Evt17): AA-4 reports an A-P-ABORT if the association was live."""
        if self.state == State.STA1:
            return []
        return self._fire(_E.EVT17, None)

    # --- local primitives ---------------------------------------------------------------------------

    def request(self, rq: AAssociateRQ) -> bytes:
        """Requestor: the A-ASSOCIATE-RQ to write (AE-1 + AE-2, now in Sta5).

        Our `max_pdu_length` replaces rq.user_info.max_pdu_length; implementation class UID and
        version name are filled in when absent.
        """
        if self.role != "requestor":
            raise StateError("only the requestor sends A-ASSOCIATE-RQ")
        return self._local(_E.EVT1, rq)

    def accept(self, ac: AAssociateAC) -> bytes:
        """Acceptor: the A-ASSOCIATE-AC to write (AE-7, now in Sta6). User info filled as in `request`."""
        return self._local(_E.EVT7, ac)

    def reject(self, rj: AAssociateRJ) -> bytes:
        """Acceptor: the A-ASSOCIATE-RJ to write (AE-8, now in Sta13: close after writing)."""
        return self._local(_E.EVT8, rj)

    def send_message(self, context_id: int, command: dict[str, Any],
                     dataset: bytes | bytearray | memoryview | None = None) -> list[bytes]:
        """P-DATA request (DT-1/AR-7): the P-DATA-TF PDUs carrying one DIMSE message.

        CommandDataSetType is set from `dataset` (0101H when None, else 0000H unless given). PDUs
        respect the peer's maximum length; each dataset byte is copied once, into its PDU.
        """
        return list(self.iter_message(context_id, command, dataset))

    def iter_message(self, context_id: int, command: dict[str, Any],
                     dataset: bytes | bytearray | memoryview | None = None) -> Iterator[bytes]:
        """Like `send_message`, but builds the PDUs lazily (bounded memory for big data sets).

        The state and arguments are checked now; the PDUs must be written in order, whole.
        """
        self._check(_E.EVT9)
        if context_id not in self.contexts:
            raise StateError(f"presentation context {context_id} was not accepted")
        command = dict(command)
        if dataset is None:
            command["CommandDataSetType"] = commands.NO_DATASET
        elif command.setdefault("CommandDataSetType", commands.DATASET_PRESENT) == commands.NO_DATASET:
            raise MisuseError("CommandDataSetType says no data set but one was given")
        raw_command = commands.encode(command)
        return self._pdata_pdus(context_id, raw_command, dataset)

    def release_request(self) -> bytes:
        """A-RELEASE request (AR-1): the A-RELEASE-RQ to write; wait for ReleaseConfirmed."""
        return self._local(_E.EVT11, None)

    def release_response(self) -> bytes:
        """A-RELEASE response (AR-4/AR-9): the A-RELEASE-RP to write after ReleaseRequested."""
        return self._local(_E.EVT14, None)

    def abort(self, source: int | None = None, reason: int | None = None) -> bytes:
        """A-ABORT (AA-1): the A-ABORT to write, then close. Always allowed.

        After a ProtocolFailure it returns the A-ABORT that PS3.8 prescribes (arguments ignored);
        returns b"" when there is nothing left to abort (idle, or already aborted/released).
        """
        if self._pending_abort:
            out, self._pending_abort = self._pending_abort, b""
            return out
        if (_E.EVT15, self.state) not in TRANSITIONS:
            return b""
        return self._local(_E.EVT15, (source or 0, reason or 0))

    # --- machinery ----------------------------------------------------------------------------------

    def _check(self, evt: _Evt) -> str:
        try:
            return TRANSITIONS[(evt, self.state)]
        except KeyError:
            raise StateError(f"{evt.name} is not allowed in {self.state.name}") from None

    def _local(self, evt: _Evt, arg: Any) -> bytes:
        action = self._check(evt)
        out, _events = getattr(self, "_" + action)(arg)
        return out

    def _fire(self, evt: _Evt, arg: Any) -> list[Event]:
        action = TRANSITIONS.get((evt, self.state))
        if action is None:  # a received event with no cell: only reachable from Sta1
            return []
        if evt == _E.EVT19 or action in ("AA_1", "AA_8"):
            # an unexpected or invalid PDU: remember the A-ABORT that the caller must write
            exc = arg if isinstance(arg, ProtocolError) else ProtocolError(
                f"{type(arg).__name__} not expected in {self.state.name}", abort_reason=ABORT_UNEXPECTED_PDU)
            return self._protocol_failure(exc, action)
        _out, events = getattr(self, "_" + action)(arg)
        return events

    def _protocol_failure(self, exc: ProtocolError, action: str) -> list[Event]:
        self._reset_message()
        if action == "AA_1":  # Sta2: A-ABORT with service-user source (PS3.8 9.2.3 AA-1)
            source, reason = 0, 0
        elif action == "AA_8":  # A-ABORT with service-provider source and the diagnostic
            source, reason = 2, exc.abort_reason
        else:  # AA-7 in Sta13: we are closing anyway
            return []
        self._pending_abort = encode(AAbort(source, reason))
        self.state = State.STA13
        return [ProtocolFailure(str(exc), source, reason)]

    def _reset_message(self) -> None:
        self._msg_context = None
        self._msg_command = None
        self._fragments = []
        self._fragments_length = 0

    # --- PS3.8 9.2.3 actions: each returns (bytes to write, events) ---------------------------------

    def _fill_user_info(self, pdu: AAssociateRQ | AAssociateAC) -> Any:
        ui = pdu.user_info
        ui = replace(ui, max_pdu_length=self.max_pdu_length,
                     implementation_class_uid=ui.implementation_class_uid or IMPLEMENTATION_CLASS_UID,
                     implementation_version_name=ui.implementation_version_name or IMPLEMENTATION_VERSION_NAME)
        return replace(pdu, user_info=ui)

    def _AE_1(self, rq: AAssociateRQ) -> tuple[bytes, list[Event]]:
        # AE-1 (issue transport connect) and AE-2 (send A-ASSOCIATE-RQ) in one: transport is outside
        rq = self._fill_user_info(rq)
        out = encode(rq)
        self.rq, self.calling_ae, self.called_ae = rq, rq.calling_ae, rq.called_ae
        self.state = State.STA5
        return out, []

    def _AE_3(self, ac: AAssociateAC) -> tuple[bytes, list[Event]]:
        self._established(ac)
        return b"", [AssociationAccepted(ac)]

    def _AE_4(self, rj: AAssociateRJ) -> tuple[bytes, list[Event]]:
        self.state = State.STA1
        return b"", [AssociationRejected(rj)]

    def _AE_6(self, rq: AAssociateRQ) -> tuple[bytes, list[Event]]:
        # Whether the RQ is acceptable is the A-ASSOCIATE response primitive's business (accept/reject)
        self.rq, self.calling_ae, self.called_ae = rq, rq.calling_ae, rq.called_ae
        self.peer_max_pdu = rq.user_info.max_pdu_length or 0
        self.state = State.STA3
        return b"", [AssociationRequested(rq)]

    def _AE_7(self, ac: AAssociateAC) -> tuple[bytes, list[Event]]:
        assert self.rq is not None
        proposed = {pc.id for pc in self.rq.contexts}
        unknown = [pc.id for pc in ac.contexts if pc.id not in proposed]
        if unknown:
            raise MisuseError(f"A-ASSOCIATE-AC answers presentation contexts never proposed: {unknown}")
        ac = self._fill_user_info(ac)
        out = encode(ac)
        self._established(ac)
        return out, []

    def _AE_8(self, rj: AAssociateRJ) -> tuple[bytes, list[Event]]:
        out = encode(rj)
        self.state = State.STA13
        return out, []

    def _established(self, ac: AAssociateAC) -> None:
        assert self.rq is not None
        self.ac = ac
        if self.role == "requestor":
            self.peer_max_pdu = ac.user_info.max_pdu_length or 0
        proposed = {pc.id: pc.abstract_syntax for pc in self.rq.contexts}
        rq_roles = {rs.sop_class_uid: rs for rs in self.rq.user_info.role_selections}
        ac_roles = {rs.sop_class_uid: rs for rs in ac.user_info.role_selections}
        contexts = {}
        for pc in ac.contexts:
            if pc.result != 0 or pc.id not in proposed:
                continue
            abstract = proposed[pc.id]
            scu, scp = True, False  # PS3.7 D.3.3.4: default roles
            if abstract in rq_roles and abstract in ac_roles:
                scu = rq_roles[abstract].scu_role and ac_roles[abstract].scu_role
                scp = rq_roles[abstract].scp_role and ac_roles[abstract].scp_role
            contexts[pc.id] = AcceptedContext(abstract, pc.transfer_syntax, scu, scp)
        self.contexts = contexts
        self.state = State.STA6

    def _DT_1(self, _arg: None) -> tuple[bytes, list[Event]]:
        return b"", []  # the PDUs are built by iter_message; the state stays Sta6

    _AR_7 = _DT_1  # P-DATA while awaiting our release response: stays Sta8

    def _DT_2(self, pdu: PDataTF) -> tuple[bytes, list[Event]]:
        return b"", self._reassemble(pdu)

    _AR_6 = _DT_2  # P-DATA after our A-RELEASE-RQ: still delivered, stays Sta7

    def _AR_1(self, _arg: None) -> tuple[bytes, list[Event]]:
        self.state = State.STA7
        return encode(AReleaseRQ()), []

    def _AR_2(self, _pdu: AReleaseRQ) -> tuple[bytes, list[Event]]:
        self._reset_message()
        self.state = State.STA8
        return b"", [ReleaseRequested()]

    def _AR_3(self, _pdu: AReleaseRP) -> tuple[bytes, list[Event]]:
        self.state = State.STA1
        return b"", [ReleaseConfirmed()]

    def _AR_4(self, _arg: None) -> tuple[bytes, list[Event]]:
        self.state = State.STA13
        return encode(AReleaseRP()), []

    def _AR_5(self, _arg: None) -> tuple[bytes, list[Event]]:
        self.state = State.STA1
        return b"", []

    def _AR_8(self, _pdu: AReleaseRQ) -> tuple[bytes, list[Event]]:
        # PS3.8 9.2.2 release collision: the requestor answers first (Sta9), the acceptor waits (Sta10)
        self.state = State.STA9 if self.role == "requestor" else State.STA10
        return b"", [ReleaseRequested()]

    def _AR_9(self, _arg: None) -> tuple[bytes, list[Event]]:
        self.state = State.STA11
        return encode(AReleaseRP()), []

    def _AR_10(self, _pdu: AReleaseRP) -> tuple[bytes, list[Event]]:
        self.state = State.STA12
        return b"", [ReleaseConfirmed()]

    def _AA_1(self, arg: tuple[int, int]) -> tuple[bytes, list[Event]]:
        # local A-ABORT request (Evt15)
        self._reset_message()
        self.state = State.STA13
        return encode(AAbort(*arg)), []

    def _AA_8(self, exc: ProtocolError) -> tuple[bytes, list[Event]]:
        # received PDU unexpected/invalid in Sta3..Sta12: A-ABORT (provider source) owed, A-P-ABORT up
        return b"", self._protocol_failure(exc, "AA_8")

    def _AA_2(self, pdu: AAbort | None) -> tuple[bytes, list[Event]]:
        self.state = State.STA1
        return b"", [Aborted(pdu.source, pdu.reason)] if pdu is not None else []

    def _AA_3(self, pdu: AAbort) -> tuple[bytes, list[Event]]:
        self._reset_message()
        self.state = State.STA1
        return b"", [Aborted(pdu.source, pdu.reason)]

    def _AA_4(self, _arg: None) -> tuple[bytes, list[Event]]:
        self._reset_message()
        self.state = State.STA1
        return b"", [Aborted(2, 0)]

    def _AA_5(self, _arg: None) -> tuple[bytes, list[Event]]:
        self.state = State.STA1
        return b"", []

    def _AA_6(self, _pdu: PDU) -> tuple[bytes, list[Event]]:
        return b"", []  # Sta13: ignore the PDU

    def _AA_7(self, _pdu: PDU) -> tuple[bytes, list[Event]]:
        # Sta13: PS3.8 would send another A-ABORT; the transport is closing anyway, so stay quiet
        return b"", []

    # --- PS3.7 section 8 / PS3.8 9.3.5 message assembly ---------------------------------------------

    def _reassemble(self, pdu: PDataTF) -> list[Event]:
        events: list[Event] = []
        for pdv in pdu.pdvs:
            if self._msg_context is None:
                if pdv.context_id not in self.contexts:
                    return events + self._dimse_failure(
                        f"PDV on presentation context {pdv.context_id}, which is not accepted")
                if not pdv.is_command:
                    return events + self._dimse_failure("data set fragment before any command fragment")
                self._msg_context = pdv.context_id
            elif pdv.context_id != self._msg_context:
                # PS3.8 9.3.5 / Annex E: fragments of one message share its presentation context
                return events + self._dimse_failure(
                    f"PDV on context {pdv.context_id} interleaved with a message on {self._msg_context}")
            self._fragments.append(pdv.data)
            self._fragments_length += len(pdv.data)
            if self._msg_command is None:
                if not pdv.is_command:
                    return events + self._dimse_failure("data set fragment before the last command fragment")
                if not pdv.is_last:
                    continue
                try:
                    command = commands.decode(b"".join(self._fragments))
                except ProtocolError as exc:
                    return events + self._dimse_failure(f"bad command set: {exc}")
                if "CommandDataSetType" not in command:
                    return events + self._dimse_failure("command set without CommandDataSetType")
                self._fragments, self._fragments_length = [], 0
                if command["CommandDataSetType"] == commands.NO_DATASET:
                    events.append(MessageReceived(self._msg_context, command, None))
                    self._reset_message()
                else:
                    self._msg_command = command
            else:
                if pdv.is_command:
                    return events + self._dimse_failure("command fragment inside a data set")
                if self.max_message_length and self._fragments_length > self.max_message_length:
                    return events + self._dimse_failure(
                        f"data set larger than {self.max_message_length} bytes")
                if pdv.is_last:
                    dataset = b"".join(self._fragments)  # the one copy of the data set
                    events.append(MessageReceived(self._msg_context, self._msg_command, dataset))
                    self._reset_message()
        return events

    def _dimse_failure(self, reason: str) -> list[Event]:
        # Invalid PDU parameter (PS3.8 Table 9-26 reason 6), handled as Evt19 in the current state
        return self._fire(_E.EVT19, ProtocolError(reason, abort_reason=ABORT_INVALID_PDU_PARAMETER_VALUE))

    def _pdata_pdus(self, context_id: int, raw_command: bytes,
                    dataset: bytes | bytearray | memoryview | None) -> Iterator[bytes]:
        limit = self.peer_max_pdu or _UNLIMITED_FRAGMENT
        room = limit - 6  # P-DATA-TF variable field holds a 4-byte PDV length, context ID and control
        data = memoryview(dataset).cast("B") if dataset is not None else None
        # Small messages: command and data set as two PDVs of one PDU (PS3.8 9.3.5 allows several)
        if data is not None and len(raw_command) + len(data) + 12 <= limit:
            yield _pdata_two(context_id, raw_command, data)
            return
        yield from _fragments(context_id, True, raw_command, room)
        if data is not None:
            yield from _fragments(context_id, False, data, room)


def _fragments(context_id: int, is_command: bool, data: bytes | memoryview, room: int) -> Iterator[bytes]:
    total = len(data)
    if total == 0:
        yield encode_pdata_header(context_id, is_command, True, 0)
        return
    for start in range(0, total, room):
        chunk = data[start:start + room]
        yield encode_pdata_header(context_id, is_command, start + room >= total, len(chunk)) + chunk


def _pdata_two(context_id: int, raw_command: bytes, data: memoryview) -> bytes:
    body_length = 6 + len(raw_command) + 6 + len(data)
    return b"".join((
        _PDATA_PDV_HEADER.pack(0x04, body_length, len(raw_command) + 2, context_id, 0x03), raw_command,
        _PDV_HEADER.pack(len(data) + 2, context_id, 0x02), data,
    ))
