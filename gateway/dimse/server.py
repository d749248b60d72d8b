"""The asyncio DIMSE SCP: one event loop serves every association (the I/O layer around association.py).

Per association, one reader loop feeds bytes to the sans-I/O `Association` and acts on its events.
C-ECHO and C-STORE are answered inline, so while an instance is being stored nothing more is read
from that socket (TCP backpressure when storage is slow). C-FIND, C-MOVE and C-GET run as tasks so the
reader keeps receiving C-CANCEL and, for C-GET, the C-STORE responses of its sub-operations.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import Counter as Tally
from typing import Any

from archive.config import Settings
from archive.errors import InvalidInstance, PeerError, RemoteError, VnaError
from archive.index import LocatedInstance
from archive.instance import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, parse_instance
from archive.services import ArchiveServices
from gateway.dimse import commands as C
from gateway.dimse.association import (Aborted, Association, AssociationRequested, MessageReceived,
                                       ProtocolFailure, ReleaseRequested)
from gateway.dimse.identifier import (IdentifierError, decode_identifier, encode_failed_list, encode_response,
                                      query_from_identifier)
from gateway.dimse.negotiation import (RJ_LOCAL_LIMIT_EXCEEDED, RJ_SOURCE_PRESENTATION, RJ_TRANSIENT,
                                       STORAGE_SOP_CLASSES, AcceptancePolicy, check_association, negotiate)
from gateway.dimse.pdu import AAssociateRJ
from gateway.dimse.retrieve import (MOVE_DESTINATION_UNKNOWN, PENDING, REFUSED_SUBOPS, SubOperations,
                                    contexts_for, run_suboperations)

from gateway.dimse.scu import Requestor
from metrics.registry import Metrics

log = logging.getLogger(__name__)

_READ_SIZE = 1 << 18
_SERVICE = {C.C_ECHO_RQ: "C-ECHO", C.C_STORE_RQ: "C-STORE", C.C_FIND_RQ: "C-FIND", C.C_MOVE_RQ: "C-MOVE",
            C.C_GET_RQ: "C-GET"}
_RESPONSE = {C.C_ECHO_RQ: C.C_ECHO_RSP, C.C_STORE_RQ: C.C_STORE_RSP, C.C_FIND_RQ: C.C_FIND_RSP,
             C.C_MOVE_RQ: C.C_MOVE_RSP, C.C_GET_RQ: C.C_GET_RSP}


def _status_class(status: int) -> str:
    if status == 0:
        return "success"
    if status in (0xFF00, 0xFF01):
        return "pending"
    if status == 0xFE00:
        return "cancel"
    if (status & 0xF000) == 0xB000:
        return "warning"
    return "failure"


class DimseServer:
    """Listens for associations; `close` drains them (bounded) before returning."""

    def __init__(self, settings: Settings, services: ArchiveServices, metrics: Metrics) -> None:
        self.settings = settings
        self.services = services
        self.metrics = metrics
        self.policy = AcceptancePolicy(ae_title=settings.ae_title, max_pdu_length=settings.dicom.max_pdu_length,
                                       check_called_ae=settings.dicom.check_called_ae,
                                       calling_ae_allowlist=settings.dicom.calling_ae_allowlist)
        self._server: asyncio.base_events.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._per_ae: Tally[str] = Tally()
        self.port: int | None = None

    async def start(self) -> int:
        d = self.settings.dicom
        self._server = await asyncio.start_server(self._on_connection, d.host, d.port, limit=_READ_SIZE * 4,
                                                  reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def adopt(self, sock: socket.socket) -> None:
        """Serve an association on a connection accepted elsewhere (gateway/workers.py), as `start`'s
        server would."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_READ_SIZE * 4, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, self._on_connection, loop=loop)
        await loop.connect_accepted_socket(lambda: protocol, sock)

    @property
    def active_associations(self) -> int:
        return len(self._handlers)

    async def close(self, *, drain_timeout: float) -> None:
        """Stop accepting, let open associations finish for up to `drain_timeout`, then abort them."""
        if self._server is not None:
            self._server.close()
        if self._handlers:
            done, pending = await asyncio.wait(self._handlers, timeout=drain_timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        if self._server is not None:
            await self._server.wait_closed()

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.metrics.associations_active.inc()
        handler = _AssociationHandler(self, reader, writer)
        try:
            await handler.run()
        except asyncio.CancelledError:
            # `close` ran out of drain time: end the association with an A-ABORT (PS3.8 7.3.1), so the
            # peer learns it was aborted rather than seeing the transport vanish
            abort = handler.assoc.abort(0, 0)
            if abort and not writer.is_closing():
                writer.write(abort)
        except PeerError as exc:
            # the peer does not read what we write (network timeout): reset the connection, or the
            # transport would go on trying to flush into its full socket for as long as the peer lives
            log.warning("dropping the association with %r: %s", handler.calling_ae, exc)
            self.metrics.associations_total.labels("timeout").inc()
            writer.transport.abort()
        finally:
            self._handlers.discard(task)
            self.metrics.associations_active.dec()
            writer.close()


class _AssociationHandler:
    def __init__(self, server: DimseServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.settings = server.settings.dicom
        self.services = server.services
        self.metrics = server.metrics
        self.reader = reader
        self.writer = writer
        self.assoc = Association("acceptor", max_pdu_length=self.settings.max_pdu_length,
                                 max_pdu_accept=max(self.settings.max_pdu_accept, self.settings.max_pdu_length))
        self.calling_ae = ""
        self._counted_ae: str | None = None
        self._tasks: dict[int, tuple[asyncio.Task[None], asyncio.Event]] = {}
        self._store_waiters: dict[int, asyncio.Future[int]] = {}
        self._next_message_id = 1
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # dcmtk waits on delayed ACKs without it (~50 ms per instance)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # -- the reader loop -----------------------------------------------------------------------
    async def run(self) -> None:
        # PS3.8 9.2.3 AE-5/AE-6: the ARTIM timer runs from the transport connection until the whole
        # A-ASSOCIATE-RQ is in, so a peer trickling bytes cannot hold the connection open.
        artim_deadline = time.monotonic() + self.settings.acse_timeout
        try:
            while True:
                if self.assoc.is_established:
                    timeout = self.settings.network_timeout
                else:
                    timeout = max(0.0, artim_deadline - time.monotonic())
                try:
                    data = await asyncio.wait_for(self.reader.read(_READ_SIZE), timeout)
                except TimeoutError:
                    log.info("association with %r timed out after %ss without data", self.calling_ae, timeout)
                    self.metrics.associations_total.labels("timeout").inc()
                    await self._write([self.assoc.abort(2, 0)])
                    return
                except (ConnectionError, OSError):
                    return
                if not data:
                    self.assoc.connection_lost()
                    return
                for event in self.assoc.receive_data(data):
                    await self._on_event(event)
                if self.assoc.is_closing:
                    return
        finally:
            for task, cancel in self._tasks.values():
                cancel.set()
                task.cancel()
            for fut in self._store_waiters.values():
                fut.cancel()
            if self._counted_ae is not None:
                self.server._per_ae[self._counted_ae] -= 1

    async def _write(self, pdus: list[bytes]) -> None:
        if not pdus or self.writer.is_closing():
            return
        for pdu in pdus:
            if pdu:
                self.writer.write(pdu)
        try:
            await asyncio.wait_for(self.writer.drain(), self.settings.network_timeout)
        except (ConnectionError, OSError, TimeoutError) as exc:
            raise PeerError(f"cannot write to {self.calling_ae}: {exc}") from exc

    async def _on_event(self, event: Any) -> None:
        if isinstance(event, MessageReceived):
            await self._on_message(event)
        elif isinstance(event, AssociationRequested):
            await self._on_request(event)
        elif isinstance(event, ReleaseRequested):
            if self._tasks:
                await asyncio.wait([t for t, _ in self._tasks.values()], timeout=self.settings.dimse_timeout)
            await self._write([self.assoc.release_response()])
        elif isinstance(event, ProtocolFailure):
            log.warning("protocol failure from %r: %s", self.calling_ae, event.reason)
            self.metrics.associations_total.labels("protocol-failure").inc()
            await self._write([self.assoc.abort()])
        elif isinstance(event, Aborted):
            self.metrics.associations_total.labels("aborted").inc()

    async def _on_request(self, event: AssociationRequested) -> None:
        rq = event.rq
        self.calling_ae = rq.calling_ae.strip()
        rj = check_association(rq, self.server.policy)
        per_ae = self.server._per_ae
        if rj is None and (self.server.active_associations > self.settings.max_associations
                           or per_ae[self.calling_ae] >= self.settings.max_associations_per_ae):
            rj = AAssociateRJ(RJ_TRANSIENT, RJ_SOURCE_PRESENTATION, RJ_LOCAL_LIMIT_EXCEEDED)
        if rj is not None:
            self.metrics.associations_total.labels("rejected").inc()
            await self._write([self.assoc.reject(rj)])
            return
        per_ae[self.calling_ae] += 1
        self._counted_ae = self.calling_ae
        ac = negotiate(rq, self.server.policy, implementation_class_uid=IMPLEMENTATION_CLASS_UID,
                       implementation_version_name=IMPLEMENTATION_VERSION_NAME)
        self.metrics.associations_total.labels("accepted").inc()
        await self._write([self.assoc.accept(ac)])

    # -- DIMSE messages ------------------------------------------------------------------------
    async def _on_message(self, msg: MessageReceived) -> None:
        cmd = msg.command
        field = cmd.get("CommandField")
        if field == C.C_STORE_RSP:
            waiter = self._store_waiters.pop(cmd.get("MessageIDBeingRespondedTo", -1), None)
            if waiter is not None and not waiter.done():
                waiter.set_result(cmd.get("Status", 0xC000))
            return
        if field == C.C_CANCEL_RQ:
            running = self._tasks.get(cmd.get("MessageIDBeingRespondedTo", -1))
            if running is not None:
                running[1].set()
            return
        if field == C.C_ECHO_RQ:
            await self._respond(msg, 0x0000)
            self.metrics.dimse_requests.labels("C-ECHO", "success").inc()
        elif field == C.C_STORE_RQ:
            await self._c_store(msg)
        elif field in (C.C_FIND_RQ, C.C_MOVE_RQ, C.C_GET_RQ):
            message_id = cmd.get("MessageID", 0)
            cancel = asyncio.Event()
            handler = {C.C_FIND_RQ: self._c_find, C.C_MOVE_RQ: self._c_move, C.C_GET_RQ: self._c_get}[field]
            task = asyncio.create_task(self._guarded(handler, msg, cancel))
            self._tasks[message_id] = (task, cancel)
            task.add_done_callback(lambda _t, m=message_id: self._tasks.pop(m, None))
        else:
            # PS3.7 C.5.3: unrecognised operation
            await self._respond(msg, 0x0211, command_field=field | 0x8000 if field is not None else 0x8FFF)

    async def _respond(self, msg: MessageReceived, status: int, *, dataset: bytes | None = None,
                       command_field: int | None = None, **fields: Any) -> None:
        cmd = msg.command
        rsp: dict[str, Any] = {
            "CommandField": command_field or _RESPONSE[cmd["CommandField"]],
            "MessageIDBeingRespondedTo": cmd.get("MessageID", 0),
            "Status": status,
        }
        if "AffectedSOPClassUID" in cmd:
            rsp["AffectedSOPClassUID"] = cmd["AffectedSOPClassUID"]
        rsp.update({k: v for k, v in fields.items() if v is not None})
        await self._write(self.assoc.send_message(msg.context_id, rsp, dataset))

    async def _guarded(self, handler: Any, msg: MessageReceived, cancel: asyncio.Event) -> None:
        service = _SERVICE[msg.command["CommandField"]]
        started = time.perf_counter()
        status = 0xC000
        try:
            status = await handler(msg, cancel)
        except IdentifierError as exc:
            status = exc.status
            await self._respond(msg, status, ErrorComment=str(exc)[:64])
        except VnaError as exc:
            log.warning("%s from %r failed: %s", service, self.calling_ae, exc)
            status = 0xA700 if isinstance(exc, RemoteError) else 0xC000
            try:
                await self._respond(msg, status, ErrorComment=str(exc)[:64])
            except VnaError:
                pass  # the peer is gone; nothing else to tell it
        finally:
            self.metrics.dimse_requests.labels(service, _status_class(status)).inc()
            self.metrics.dimse_latency.labels(service).observe(time.perf_counter() - started)

    async def _c_store(self, msg: MessageReceived) -> None:
        started = time.perf_counter()
        cmd = msg.command
        ctx = self.assoc.contexts[msg.context_id]
        comment = None
        sop_class = cmd.get("AffectedSOPClassUID")
        if msg.dataset is None:
            status, comment = 0xC000, "C-STORE-RQ without a data set"
        elif sop_class != ctx.abstract_syntax or sop_class not in STORAGE_SOP_CLASSES:
            status, comment = self._not_negotiated(msg, sop_class)
        else:
            try:
                await self.services.ingestor.ingest_dataset(
                    msg.dataset, transfer_syntax_uid=ctx.transfer_syntax, protocol="dimse",
                    source=f"dimse:{self.calling_ae}", source_ae=self.calling_ae,
                    affected_sop_class_uid=cmd.get("AffectedSOPClassUID"),
                    affected_sop_instance_uid=cmd.get("AffectedSOPInstanceUID"))
                status = 0x0000
            except InvalidInstance as exc:
                status, comment = exc.status, exc.reason
            except VnaError as exc:
                # PS3.4 B.2.3: A7xx Refused: Out of Resources; the instance was not stored
                log.error("C-STORE of %s failed: %s", cmd.get("AffectedSOPInstanceUID"), exc)
                status, comment = 0xA700, str(exc)
        await self._respond(msg, status, AffectedSOPInstanceUID=cmd.get("AffectedSOPInstanceUID"),
                            ErrorComment=comment[:64] if comment else None)
        self.metrics.dimse_requests.labels("C-STORE", _status_class(status)).inc()
        self.metrics.dimse_latency.labels("C-STORE").observe(time.perf_counter() - started)

    def _not_negotiated(self, msg: MessageReceived, sop_class: str | None) -> tuple[int, str]:
        """The refusal of a C-STORE outside the SOP class of its presentation context: 0122H "SOP Class
        Not Supported" (PS3.7 C.5; PS3.8 9.3.2.2: a context carries the SOP class it was negotiated
        for, and no related general SOP classes are agreed, PS3.7 D.3.3.6). A request that its own
        data set contradicts is reported as that first (PS3.4 B.2.3 A900)."""
        ctx = self.assoc.contexts[msg.context_id]
        assert msg.dataset is not None
        if ctx.abstract_syntax in STORAGE_SOP_CLASSES:
            try:
                parse_instance(msg.dataset, ctx.transfer_syntax, affected_sop_class_uid=sop_class,
                               affected_sop_instance_uid=msg.command.get("AffectedSOPInstanceUID"))
            except InvalidInstance as exc:
                return exc.status, exc.reason
        return 0x0122, f"SOP Class {sop_class} not negotiated on context {msg.context_id}"

    async def _c_find(self, msg: MessageReceived, cancel: asyncio.Event) -> int:
        ctx = self.assoc.contexts[msg.context_id]
        if msg.dataset is None:
            raise IdentifierError("C-FIND-RQ without an Identifier")
        ds = decode_identifier(msg.dataset, ctx.transfer_syntax)
        query = query_from_identifier(ds, ctx.abstract_syntax)
        charset = ds.get("SpecificCharacterSet")
        pending = {"CommandField": C.C_FIND_RSP, "MessageIDBeingRespondedTo": msg.command.get("MessageID", 0),
                   "Status": PENDING, "AffectedSOPClassUID": ctx.abstract_syntax}
        async for page in self.services.index.find_pages(query, timeout=self.settings.dimse_timeout):
            if cancel.is_set():
                break
            # one write per page: the pending responses of a page leave in as few segments as possible
            pdus: list[bytes] = []
            for match in page:
                data = encode_response(match, query.level, ctx.transfer_syntax, charset)
                pdus += self.assoc.send_message(msg.context_id, pending, data)
            await self._write(pdus)
        status = 0xFE00 if cancel.is_set() else 0x0000
        await self._respond(msg, status)
        return status

    async def _locate(self, msg: MessageReceived) -> list[LocatedInstance]:
        ctx = self.assoc.contexts[msg.context_id]
        if msg.dataset is None:
            raise IdentifierError("request without an Identifier")
        query = query_from_identifier(decode_identifier(msg.dataset, ctx.transfer_syntax), ctx.abstract_syntax)
        return await self.services.index.locate(query, timeout=self.settings.dimse_timeout)

    async def _finish_retrieve(self, msg: MessageReceived, ops: SubOperations, cancelled: bool) -> int:
        status = ops.final_status(cancelled)
        ctx = self.assoc.contexts[msg.context_id]
        data = encode_failed_list(ops.failed_uids, ctx.transfer_syntax) if ops.failed_uids else None
        await self._respond(msg, status, dataset=data, **ops.counts(final=not cancelled))
        return status

    def _progress(self, msg: MessageReceived):  # type: ignore[no-untyped-def]
        async def report(ops: SubOperations) -> None:
            if ops.remaining:
                await self._respond(msg, PENDING, **ops.counts(final=False))
        return report

    async def _c_move(self, msg: MessageReceived, cancel: asyncio.Event) -> int:
        destination = str(msg.command.get("MoveDestination", "")).strip()
        ae = await self.services.index.ae_get(destination, timeout=self.settings.dimse_timeout)
        if ae is None:
            await self._respond(msg, MOVE_DESTINATION_UNKNOWN, ErrorComment=f"unknown AE {destination}"[:64])
            return MOVE_DESTINATION_UNKNOWN
        instances = await self._locate(msg)
        ops = SubOperations(remaining=len(instances))
        timeout = self.settings.dimse_timeout
        for group in contexts_for(instances):
            wanted = {(pc.abstract_syntax, pc.transfer_syntaxes[0]) for pc in group}
            batch = [i for i in instances if (i.sop_class_uid, i.transfer_syntax_uid) in wanted]
            try:
                async with Requestor.connect(ae.host, ae.port, calling_ae=self.server.settings.ae_title,
                                             called_ae=ae.ae_title, contexts=group,
                                             max_pdu_length=self.settings.max_pdu_length, timeout=timeout) as scu:
                    async def send(inst: LocatedInstance, data: bytes) -> int | None:
                        ctx_id = scu.accepted_context(inst.sop_class_uid, inst.transfer_syntax_uid)
                        if ctx_id is None:
                            return None
                        status = await scu.c_store(ctx_id, inst.sop_class_uid, inst.sop_instance_uid, data,
                                                   move_originator_ae=self.calling_ae,
                                                   move_originator_message_id=msg.command.get("MessageID"),
                                                   timeout=timeout)
                        self.metrics.sent_instances.labels("C-MOVE", _status_class(status)).inc()
                        return status

                    part = await run_suboperations(batch, self.services.stores, send, self._progress_offset(msg, ops),
                                                   cancel, timeout=timeout)
            except PeerError as exc:
                log.warning("C-MOVE to %s failed: %s", ae.ae_title, exc)
                if not ops.completed and not ops.failed:
                    await self._respond(msg, REFUSED_SUBOPS, ErrorComment=str(exc)[:64],
                                        **SubOperations(remaining=0, failed=len(instances)).counts(final=True))
                    return REFUSED_SUBOPS
                part = SubOperations(remaining=0, failed=len(batch),
                                     failed_uids=[i.sop_instance_uid for i in batch])
            ops.completed += part.completed
            ops.failed += part.failed
            ops.warning += part.warning
            ops.failed_uids += part.failed_uids
            ops.remaining = len(instances) - ops.completed - ops.failed - ops.warning
            if cancel.is_set():
                break
        return await self._finish_retrieve(msg, ops, cancel.is_set())

    def _progress_offset(self, msg: MessageReceived, total: SubOperations):  # type: ignore[no-untyped-def]
        """Progress of one batch reported as progress of the whole move."""
        async def report(part: SubOperations) -> None:
            merged = SubOperations(remaining=total.remaining - (part.completed + part.failed + part.warning),
                                   completed=total.completed + part.completed, failed=total.failed + part.failed,
                                   warning=total.warning + part.warning)
            if merged.remaining:
                await self._respond(msg, PENDING, **merged.counts(final=False))
        return report

    async def _c_get(self, msg: MessageReceived, cancel: asyncio.Event) -> int:
        instances = await self._locate(msg)
        timeout = self.settings.dimse_timeout

        async def send(inst: LocatedInstance, data: bytes) -> int | None:
            ctx_id = self._storage_context(inst.sop_class_uid, inst.transfer_syntax_uid)
            if ctx_id is None:
                return None
            message_id = self._next_message_id
            self._next_message_id = (self._next_message_id % 0xFFFF) + 1
            waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            self._store_waiters[message_id] = waiter
            rq = {"CommandField": C.C_STORE_RQ, "MessageID": message_id, "Priority": 0,
                  "AffectedSOPClassUID": inst.sop_class_uid, "AffectedSOPInstanceUID": inst.sop_instance_uid}
            await self._write(self.assoc.send_message(ctx_id, rq, data))
            try:
                status = await asyncio.wait_for(waiter, timeout)
            except TimeoutError as exc:
                raise PeerError(f"no C-STORE-RSP from {self.calling_ae} within {timeout}s") from exc
            finally:
                self._store_waiters.pop(message_id, None)
            self.metrics.sent_instances.labels("C-GET", _status_class(status)).inc()
            return status

        ops = await run_suboperations(instances, self.services.stores, send, self._progress(msg), cancel,
                                      timeout=timeout)
        return await self._finish_retrieve(msg, ops, cancel.is_set())

    def _storage_context(self, sop_class_uid: str, transfer_syntax_uid: str) -> int | None:
        """An accepted context on which the requestor acts as Storage SCP (PS3.4 C.4.3.1.1)."""
        for ctx_id, ctx in self.assoc.contexts.items():
            if ctx.abstract_syntax == sop_class_uid and ctx.transfer_syntax == transfer_syntax_uid and ctx.scp_role:
                return ctx_id
        return None
