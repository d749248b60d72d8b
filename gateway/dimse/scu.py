"""asyncio association requestor (SCU) over the sans-I/O `Association`: C-ECHO and C-STORE.

    contexts = [PresentationContextRQ(1, CT_IMAGE_STORAGE, (EXPLICIT_VR_LITTLE_ENDIAN,))]
    async with Requestor.connect("pacs", 11112, calling_ae="VNA", called_ae="PACS",
                                 contexts=contexts, timeout=10) as scu:
        context_id = scu.accepted_context(CT_IMAGE_STORAGE, EXPLICIT_VR_LITTLE_ENDIAN)
        status = await scu.c_store(context_id, CT_IMAGE_STORAGE, sop_instance_uid, dataset, timeout=30)

The block releases the association on a normal exit and aborts it on an exception. Failures are
`PeerError`s (archive.errors): unreachable, rejected, aborted, timed out, or a protocol violation.
Operations are serialized (no asynchronous operations window is negotiated, PS3.7 D.3.3.3), so
concurrent calls on one Requestor queue up instead of interleaving.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any, AsyncIterator, Iterable, Sequence

from archive.errors import PeerError
from gateway.dimse import commands
from gateway.dimse.association import (
    Aborted,
    Association,
    AssociationAccepted,
    AssociationRejected,
    MessageReceived,
    ProtocolFailure,
    ReleaseConfirmed,
    ReleaseRequested,
    State,
)
from gateway.dimse.pdu import AAssociateRJ, AAssociateRQ, PresentationContextRQ, RoleSelection, UserInformation

__all__ = [
    "Requestor",
    "PeerUnreachable",
    "AssociationRejectedError",
    "AssociationAbortedError",
    "PeerTimeout",
    "PeerProtocolError",
    "VERIFICATION_SOP_CLASS",
]

VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
_READ_SIZE = 256 * 1024


class PeerUnreachable(PeerError):
    """The TCP connection to the peer could not be opened."""


class AssociationRejectedError(PeerError):
    """The peer answered A-ASSOCIATE-RJ (PS3.8 Table 9-21 values in `rj`)."""

    def __init__(self, rj: AAssociateRJ) -> None:
        super().__init__(f"association rejected: result {rj.result}, source {rj.source}, reason {rj.reason}")
        self.rj = rj


class AssociationAbortedError(PeerError):
    """The association ended abnormally: A-ABORT from the peer, or the connection dropped."""


class PeerTimeout(PeerError):
    """The peer did not answer in time; the association was aborted."""


class PeerProtocolError(PeerError):
    """The peer violated PS3.8/PS3.7; the association was aborted."""


class Requestor:
    """An established association as requestor. Build it with `Requestor.connect` (or `open`)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, assoc: Association) -> None:
        self._reader = reader
        self._writer = writer
        self.association = assoc
        self._established: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._released: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending: dict[int, asyncio.Future[MessageReceived]] = {}
        self._failure: PeerError | None = None
        self._op_lock = asyncio.Lock()
        self._write_lock = asyncio.Lock()
        self._message_id = 0
        self._reader_task: asyncio.Task[None] | None = None

    # --- setup and teardown -------------------------------------------------------------------------

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, host: str, port: int, *, calling_ae: str, called_ae: str,
                      contexts: Sequence[PresentationContextRQ], role_selections: Iterable[RoleSelection] = (),
                      max_pdu_length: int = 262144, max_pdu_accept: int | None = None,
                      timeout: float) -> AsyncIterator["Requestor"]:
        """Open an association for the duration of an `async with` block.

        `timeout` bounds connecting and negotiating, and the release on exit. Raises PeerUnreachable,
        AssociationRejectedError, AssociationAbortedError, PeerTimeout or PeerProtocolError.
        """
        scu = await cls.open(host, port, calling_ae=calling_ae, called_ae=called_ae, contexts=contexts,
                             role_selections=role_selections, max_pdu_length=max_pdu_length,
                             max_pdu_accept=max_pdu_accept, timeout=timeout)
        try:
            yield scu
        except BaseException:
            await scu.abort()
            raise
        await scu.release(timeout=timeout)

    @classmethod
    async def open(cls, host: str, port: int, *, calling_ae: str, called_ae: str,
                   contexts: Sequence[PresentationContextRQ], role_selections: Iterable[RoleSelection] = (),
                   max_pdu_length: int = 262144, max_pdu_accept: int | None = None,
                   timeout: float) -> "Requestor":
        """Connect and negotiate; the caller must `release()` or `abort()` the result."""
        rq = AAssociateRQ(called_ae=called_ae, calling_ae=calling_ae, contexts=tuple(contexts),
                          user_info=UserInformation(role_selections=tuple(role_selections)))
        assoc = Association("requestor", max_pdu_length=max_pdu_length,
                            max_pdu_accept=max_pdu_accept if max_pdu_accept is not None else max(max_pdu_length, 1 << 20))
        request = assoc.request(rq)  # encoding errors (bad AE title...) surface before connecting
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, port)
        except (OSError, TimeoutError) as exc:
            raise PeerUnreachable(f"cannot connect to {host}:{port}: {str(exc) or 'timeout'}") from exc
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        scu = cls(reader, writer, assoc)
        scu._reader_task = asyncio.create_task(scu._read_loop(), name=f"dimse-scu {host}:{port}")
        try:
            async with asyncio.timeout(timeout):
                await scu._write([request])
                await asyncio.shield(scu._established)
        except TimeoutError as exc:
            await scu.abort()
            raise PeerTimeout(f"{host}:{port} did not answer the A-ASSOCIATE-RQ within {timeout} s") from exc
        except BaseException:
            await scu.abort()
            raise
        return scu

    async def release(self, *, timeout: float) -> None:
        """A-RELEASE (PS3.8 7.2) and close; aborts instead when the peer does not confirm in time."""
        try:
            if self.association.is_established and self._failure is None:
                async with self._op_lock:
                    async with asyncio.timeout(timeout):
                        await self._write([self.association.release_request()])
                        await asyncio.shield(self._released)
        except TimeoutError as exc:
            await self.abort()
            raise PeerTimeout(f"A-RELEASE not confirmed within {timeout} s") from exc
        except PeerError:
            await self.abort()
            raise
        await self._close()

    async def abort(self) -> None:
        """A-ABORT (service-user) if anything is left to abort, then close. Never raises."""
        raw = self.association.abort()
        if raw and not self._writer.is_closing():
            with contextlib.suppress(OSError):
                self._writer.write(raw)
        self._fail(AssociationAbortedError("association aborted locally"))
        await self._close()

    async def _close(self) -> None:
        if self._reader_task is not None and self._reader_task is not asyncio.current_task():
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    # --- negotiated parameters ----------------------------------------------------------------------

    @property
    def contexts(self) -> dict:
        """{context id: AcceptedContext(abstract_syntax, transfer_syntax, scu_role, scp_role)}."""
        return self.association.contexts

    def accepted_context(self, abstract_syntax: str, transfer_syntax: str | None = None) -> int | None:
        """The ID of an accepted context for `abstract_syntax` (and `transfer_syntax` if given), or None."""
        for context_id, ctx in self.association.contexts.items():
            if ctx.abstract_syntax == abstract_syntax and transfer_syntax in (None, ctx.transfer_syntax):
                return context_id
        return None

    # --- DIMSE operations ---------------------------------------------------------------------------

    async def c_echo(self, *, context_id: int | None = None, timeout: float) -> int:
        """C-ECHO (PS3.7 9.1.5) on the Verification context; returns the Status."""
        if context_id is None:
            context_id = self.accepted_context(VERIFICATION_SOP_CLASS)
            if context_id is None:
                raise PeerError("the peer did not accept the Verification SOP Class")
        rsp = await self.send_request(context_id, {"CommandField": commands.C_ECHO_RQ,
                                                   "AffectedSOPClassUID": VERIFICATION_SOP_CLASS}, timeout=timeout)
        return rsp.command["Status"]

    async def c_store(self, context_id: int, sop_class_uid: str, sop_instance_uid: str,
                      dataset: bytes | memoryview, *, priority: int = commands.PRIORITY_MEDIUM,
                      move_originator_ae: str | None = None, move_originator_message_id: int | None = None,
                      timeout: float) -> int:
        """C-STORE (PS3.7 9.1.1): send `dataset`, already encoded in the context's transfer syntax.

        Returns the Status of the C-STORE-RSP (0000H success, Bxxxx warning, others failure).
        The move originator pair is set for C-STORE sub-operations of a C-MOVE (PS3.7 9.3.1.1).
        """
        command: dict[str, Any] = {"CommandField": commands.C_STORE_RQ, "AffectedSOPClassUID": sop_class_uid,
                                   "AffectedSOPInstanceUID": sop_instance_uid, "Priority": priority}
        if move_originator_ae is not None:
            command["MoveOriginatorApplicationEntityTitle"] = move_originator_ae
        if move_originator_message_id is not None:
            command["MoveOriginatorMessageID"] = move_originator_message_id
        rsp = await self.send_request(context_id, command, dataset, timeout=timeout)
        return rsp.command["Status"]

    async def send_request(self, context_id: int, command: dict[str, Any],
                           dataset: bytes | memoryview | None = None, *, timeout: float) -> MessageReceived:
        """Send one request message and wait for its single response (MessageID is assigned here).

        On timeout the association is aborted (its state is unknown) and PeerTimeout is raised.
        """
        async with self._op_lock:
            if self._failure is not None:
                raise self._failure
            self._message_id = self._message_id % 0xFFFF + 1  # 1..65535, PS3.7 E.1 MessageID is US
            message_id = self._message_id
            future: asyncio.Future[MessageReceived] = asyncio.get_running_loop().create_future()
            self._pending[message_id] = future
            try:
                async with asyncio.timeout(timeout):
                    await self._write(self.association.iter_message(
                        context_id, {**command, "MessageID": message_id}, dataset))
                    return await future
            except TimeoutError as exc:
                await self.abort()
                raise PeerTimeout(f"no response to message {message_id} within {timeout} s") from exc
            finally:
                self._pending.pop(message_id, None)

    # --- I/O ----------------------------------------------------------------------------------------

    async def _write(self, pdus: Iterable[bytes]) -> None:
        async with self._write_lock:
            if self._failure is not None:
                raise self._failure
            try:
                for pdu in pdus:
                    if self._failure is not None:  # aborted while we were sending (the reader saw it)
                        raise self._failure
                    self._writer.write(pdu)
                    await self._writer.drain()  # backpressure: waits only above the high-water mark
            except OSError as exc:
                self._fail(AssociationAbortedError(f"connection lost while sending: {exc}"))
                assert self._failure is not None
                raise self._failure from exc

    async def _read_loop(self) -> None:
        assoc = self.association
        try:
            while True:
                try:
                    data = await self._reader.read(_READ_SIZE)
                except OSError as exc:
                    self._fail(AssociationAbortedError(f"connection lost: {exc}"))
                    assoc.connection_lost()
                    return
                events = assoc.receive_data(data) if data else assoc.connection_lost()
                for event in events:
                    self._dispatch(event)
                if not data or assoc.is_closing:
                    if self._failure is None and not self._released.done():
                        self._fail(AssociationAbortedError("connection closed by the peer"))
                    return
        finally:
            self._fail(AssociationAbortedError("association closed"))

    def _dispatch(self, event: object) -> None:
        assoc = self.association
        if isinstance(event, MessageReceived):
            future = self._pending.get(event.command.get("MessageIDBeingRespondedTo", -1))
            if commands.is_response(event.command) and future is not None and not future.done():
                future.set_result(event)
            elif not commands.is_response(event.command):
                # a request to us (e.g. C-STORE of a C-GET): this requestor only invokes operations
                self._writer.write(assoc.abort(2, 0))
                self._fail(PeerProtocolError(
                    f"peer sent request {event.command['CommandField']:#06x}, which this SCU does not serve"))
        elif isinstance(event, AssociationAccepted):
            if not self._established.done():
                self._established.set_result(None)
        elif isinstance(event, AssociationRejected):
            self._fail(AssociationRejectedError(event.rj))
        elif isinstance(event, ReleaseRequested):
            # peer-initiated release (AR-2) or a collision (AR-8, Sta9): answer it
            self._writer.write(assoc.release_response())
            if not self._released.done() and assoc.state != State.STA11:
                self._fail(AssociationAbortedError("the peer released the association"))
        elif isinstance(event, ReleaseConfirmed):
            if not self._released.done():
                self._released.set_result(None)
        elif isinstance(event, Aborted):
            self._fail(AssociationAbortedError(f"A-ABORT from the peer: source {event.source}, reason {event.reason}"))
        elif isinstance(event, ProtocolFailure):
            self._writer.write(assoc.abort())
            self._fail(PeerProtocolError(event.reason))

    def _fail(self, error: PeerError) -> None:
        """Record the first failure and wake every waiter with it."""
        if self._failure is None:
            self._failure = error
        for future in (self._established, self._released, *self._pending.values()):
            if not future.done():
                future.set_exception(self._failure)
                future.exception()  # mark retrieved: a waiter may already be gone
