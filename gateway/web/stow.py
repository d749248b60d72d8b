"""STOW-RS (PS3.18 10.5): `POST {root}/studies[/{study}]` with a multipart/related body of PS3.10 files.

The body is streamed (gateway/web/multipart_reader.py): each part is collected as it arrives, in
memory up to `stow_spill_bytes` and in an anonymous temporary file beyond, and goes through the one
ingest path (`Ingestor.ingest_part10`) as soon as it is complete, while the next parts are received
and stored: up to `stow_parallel_parts` parts of a request, `stow_parallel_bytes` of them, are stored at
once (each held whole in memory meanwhile), so their fsyncs overlap, and the parts written meanwhile share
one index transaction (archive/index.py `submit_instance`). The whole body is never
held in memory; more than `max_stow_bytes` of it is refused with 413. The response lists the parts in
the order of the body.

Every part gets its own outcome (PS3.18 I, Store Instances Response Module): stored instances in the
Referenced SOP Sequence (0008,1199), refused ones in the Failed SOP Sequence (0008,1198) with a Failure
Reason (0008,1197, PS3.18 I.2.2). A bad part never stops the good parts of the same request, and
nothing of a bad part is stored. The textual reason of each failure is sent in a `Warning: 299`
header (the module has no attribute for it) and the first one in the status line.

Status (PS3.18 10.5.3.1): 200 all stored; 202 some stored, some failed; 409 none stored for DICOM
reasons (SOP class, study mismatch, unreadable data set, conflicting duplicate); 400 none stored
because the multipart body itself is malformed; 415 not multipart/related of application/dicom;
406 the response cannot be DICOM JSON; 413 too large; 503 none stored because the archive failed.
A stored duplicate (same SOP Instance UID, same content) is a success: STOW is idempotent.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from io import BytesIO
from typing import IO, Any

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from pydicom.filereader import read_partial

from archive.config import DicomwebSettings
from archive.errors import InvalidInstance, RemoteError, VnaError
from archive.instance import ParsedInstance
from gateway.dimse.negotiation import STORAGE_SOP_CLASSES
from gateway.web.dicomweb import SERVICES_KEY, SETTINGS_KEY, base_url, json_response
from gateway.web.media import content_type_params, parse_accept
from gateway.web.multipart_reader import BodyParser, MultipartError, PartData, PartEnd, PartStart

log = logging.getLogger(__name__)

_DICOM = "application/dicom"
_DICOM_JSON = "application/dicom+json"

# PS3.18 Table I.2-2 Failure Reason values
OUT_OF_RESOURCES = 0xA700
DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122

_SPILL_WRITE = 1 << 20  # gather this much before each write to the spill file (fewer thread hops)
_SOP_CLASS, _SOP_INSTANCE, _STUDY = 0x00080016, 0x00080018, 0x0020000D


@dataclass(frozen=True, slots=True)
class Stored:
    part: int
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str


@dataclass(frozen=True, slots=True)
class Failed:
    part: int
    sop_class_uid: str | None
    sop_instance_uid: str | None
    reason: int          # PS3.18 I.2.2
    text: str
    kind: str = "dicom"  # 'syntax' (the multipart framing) | 'dicom' | 'remote' (the archive failed)


class PartBuffer:
    """The content of one part: in memory up to `spill_bytes`, then in an anonymous temporary file."""

    def __init__(self, spill_bytes: int) -> None:
        self._spill_bytes = spill_bytes
        self._chunks: list[bytes] = []
        self._pending = 0     # bytes in _chunks
        self.size = 0
        self._file: IO[bytes] | None = None

    async def add(self, data: bytes) -> None:
        self._chunks.append(data)
        self._pending += len(data)
        self.size += len(data)
        if self._file is None and self.size > self._spill_bytes:
            self._file = await asyncio.to_thread(tempfile.TemporaryFile, prefix="vna-stow-")
        if self._file is not None and self._pending >= _SPILL_WRITE:
            await self._flush()

    async def _flush(self) -> None:
        chunks, self._chunks, self._pending = self._chunks, [], 0
        assert self._file is not None
        await asyncio.to_thread(self._file.writelines, chunks)

    async def read(self) -> bytes:
        """Everything received (read back from the spill file if there is one), and release the buffer."""
        if self._file is None:
            data, self._chunks = b"".join(self._chunks), []
            return data
        await self._flush()
        f = self._file

        def read_back() -> bytes:
            f.seek(0)
            return f.read()
        try:
            return await asyncio.to_thread(read_back)
        finally:
            await self.close()

    async def close(self) -> None:
        self._chunks = []
        if self._file is not None:
            f, self._file = self._file, None
            await asyncio.to_thread(f.close)


def identify(data: bytes) -> tuple[str | None, str | None, str | None]:
    """(SOP Class, SOP Instance, Study Instance UID) from the head of a PS3.10 file, None where they cannot
    be read. Reads only the first elements of the data set. Blocking: call it in a thread."""
    try:
        ds = read_partial(BytesIO(data), stop_when=lambda tag, vr, length: tag > _STUDY, defer_size=1024,
                          specific_tags=[_SOP_CLASS, _SOP_INSTANCE, _STUDY])
        elements = [ds.get(tag) for tag in (_SOP_CLASS, _SOP_INSTANCE, _STUDY)]
    except Exception:  # noqa: BLE001 -- pydicom raises many kinds on malformed input; the ingest parse says which
        return None, None, None
    values = [str(e.value).strip("\0 ") if e is not None and e.value else "" for e in elements]
    return values[0] or None, values[1] or None, values[2] or None


def _media_error(reason: str) -> web.HTTPUnsupportedMediaType:
    return web.HTTPUnsupportedMediaType(reason=reason, text=reason + "\n")


def request_boundary(request: web.Request) -> str:
    """The boundary of a `multipart/related; type="application/dicom"` request, or 415 / 400 with a reason."""
    header = request.headers.get("Content-Type")
    media = content_type_params(header)
    if media is None or media.type != "multipart/related":
        raise _media_error('STOW-RS takes multipart/related; type="application/dicom", '
                           f"not {header or 'no Content-Type'}")
    part_type = media.params.get("type", _DICOM)
    if part_type != _DICOM:
        raise _media_error(f"STOW-RS here takes parts of type application/dicom, not {part_type} (PS3.18 10.5.1.2)")
    boundary = media.params.get("boundary")
    if not boundary:
        raise web.HTTPBadRequest(reason="multipart/related without a boundary parameter",
                                 text="the Content-Type has no boundary parameter (RFC 2046 5.1.1)\n")
    return boundary


def _ui(value: str | None) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


def _quoted(text: str) -> str:
    # an HTTP quoted-string of printable Latin-1 (RFC 9110 5.6.4)
    text = "".join(ch if ch.isprintable() and ord(ch) < 256 else "?" for ch in text)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class PartBudget:
    """How many parts of one request, and how many of their bytes, are being stored at once. A part that does
    not fit waits until enough are done; a part larger than the whole budget is stored alone."""

    def __init__(self, parts: int, nbytes: int) -> None:
        self._max_parts, self._max_bytes = parts, nbytes
        self.parts = 0
        self.bytes = 0
        self._waiter: asyncio.Future[None] | None = None  # the request's body is read by one task

    def _fits(self, size: int) -> bool:
        return self.parts == 0 or (self.parts < self._max_parts and self.bytes + size <= self._max_bytes)

    async def acquire(self, size: int) -> None:
        while not self._fits(size):
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        self.parts += 1
        self.bytes += size

    def release(self, size: int) -> None:
        self.parts -= 1
        self.bytes -= size
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class StoreTransaction:
    """The outcome of one STOW-RS request, part by part."""

    def __init__(self, request: web.Request, study: str | None) -> None:
        self.services = request.app[SERVICES_KEY]
        self.base = base_url(request)
        self.study = study
        self.stored: list[Stored] = []
        self.failed: list[Failed] = []
        self._running: set[asyncio.Task[None]] = set()
        settings = request.app[SETTINGS_KEY]
        self._budget = PartBudget(settings.stow_parallel_parts, settings.stow_parallel_bytes)
        # set once the latest submitted part is queued for indexing or has failed: the next part queues after it
        self._last_queued: asyncio.Event | None = None
        self._cancelled = False

    async def submit(self, part: int, buffer: PartBuffer) -> None:
        """Store one complete part; it runs while the next parts are received. At most `stow_parallel_parts`
        parts and `stow_parallel_bytes` at once: a part is read into memory only when it fits."""
        size = buffer.size
        await self._budget.acquire(size)
        try:
            data = await buffer.read()
        except BaseException:
            self._budget.release(size)
            raise
        previous, done = self._last_queued, asyncio.Event()
        self._last_queued = done
        task = asyncio.create_task(self._store_in_slot(part, data, size, previous, done))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _store_in_slot(self, part: int, data: bytes, size: int, previous: asyncio.Event | None,
                             done: asyncio.Event) -> None:
        try:
            # objects are written at once, index rows queued in body order (the index keeps its queue's order):
            # a search lists them as they were sent
            await self._store(part, data, previous.wait if previous is not None else None, done.set)
        finally:
            self._budget.release(size)
            # this part is settled; the next one may queue once every earlier part is queued or settled too
            if previous is None or previous.is_set() or self._cancelled:
                done.set()
            else:
                chain = asyncio.ensure_future(self._settle_after(previous, done))
                self._running.add(chain)
                chain.add_done_callback(self._running.discard)

    @staticmethod
    async def _settle_after(previous: asyncio.Event, done: asyncio.Event) -> None:
        await previous.wait()
        done.set()

    def cancel(self) -> None:
        """Abandon the stores still running (the handler itself is being cancelled); ingest is atomic."""
        self._cancelled = True
        for task in list(self._running):
            task.cancel()

    async def drain(self) -> None:
        while self._running:
            await asyncio.gather(*self._running)

    def fail(self, part: int, text: str, *, kind: str = "syntax", reason: int = CANNOT_UNDERSTAND) -> None:
        self.failed.append(Failed(part, None, None, reason, text, kind))

    def _admit(self, parsed: ParsedInstance) -> None:
        """STOW-RS's own checks of a parsed instance, before anything is written."""
        # PS3.18 I.2.2 0122: only Storage SOP Classes are stored, as over DIMSE (PS3.4 B.5)
        if parsed.sop_class_uid not in STORAGE_SOP_CLASSES:
            raise InvalidInstance(f"SOP Class {parsed.sop_class_uid} is not a Storage SOP Class stored here",
                                  status=SOP_CLASS_NOT_SUPPORTED, code="sop-class")
        # PS3.18 10.5.1: with a study in the target, every instance must belong to that study
        if self.study is not None and parsed.study_instance_uid != self.study:
            raise InvalidInstance(f"Study Instance UID {parsed.study_instance_uid} differs from the target study "
                                  f"{self.study}", status=DATA_SET_DOES_NOT_MATCH_SOP_CLASS, code="study-mismatch")

    async def _store(self, part: int, data: bytes, before_index: Callable[[], Awaitable[object]] | None,
                     queued: Callable[[], None]) -> None:
        # one parse, the ingest path's; the quick header read below only names a refused part
        try:
            result = await self.services.ingestor.ingest_part10(data, protocol="dicomweb", source="dicomweb",
                                                                admit=self._admit, before_index=before_index,
                                                                queued=queued)
        except InvalidInstance as exc:
            # exc.status is the PS3.4 C-STORE status: the same ranges as PS3.18 I.2.2 (A7xx, A9xx, Cxxx)
            failure = (exc.status, exc.reason, "dicom")
        except RemoteError as exc:
            log.warning("STOW-RS part %d not stored: %s", part, exc)
            failure = (PROCESSING_FAILURE, str(exc), "remote")
        except VnaError as exc:
            log.error("STOW-RS part %d not stored: %s", part, exc)
            failure = (PROCESSING_FAILURE, str(exc), "dicom")
        else:
            p = result.parsed
            self.stored.append(Stored(part, p.sop_class_uid, p.sop_instance_uid, p.study_instance_uid,
                                      p.series_instance_uid))
            return
        # PS3.18 I.2.2: the Failed SOP Sequence names the instance when its header can be read
        sop_class, sop_instance, _study = await asyncio.to_thread(identify, data)
        self.failed.append(Failed(part, sop_class, sop_instance, *failure))

    # -- the response ------------------------------------------------------------------------------
    def status(self) -> int:
        if self.stored:
            return 202 if self.failed else 200
        if self.failed and all(f.kind == "remote" for f in self.failed):
            return 503
        if not self.failed or all(f.kind == "syntax" for f in self.failed):
            return 400
        return 409

    def _failures(self) -> list[Failed]:
        # a malformed part is known at once, a refused instance once stored: report in body order
        return sorted(self.failed, key=lambda f: f.part)

    def payload(self) -> dict[str, Any]:
        studies = {self.study} if self.study else {s.study_instance_uid for s in self.stored}
        body: dict[str, Any] = {"00081190": {"vr": "UR", "Value": [f"{self.base}/studies/{studies.pop()}"]}
                                if len(studies) == 1 else {"vr": "UR"}}
        if self.failed:
            body["00081198"] = {"vr": "SQ", "Value": [
                {"00081150": _ui(f.sop_class_uid), "00081155": _ui(f.sop_instance_uid),
                 "00081197": {"vr": "US", "Value": [f.reason]}} for f in self._failures()]}
        if self.stored:
            body["00081199"] = {"vr": "SQ", "Value": [
                {"00081150": _ui(s.sop_class_uid), "00081155": _ui(s.sop_instance_uid),
                 "00081190": {"vr": "UR", "Value": [(f"{self.base}/studies/{s.study_instance_uid}/series/"
                                                     f"{s.series_instance_uid}/instances/{s.sop_instance_uid}")]}}
                for s in sorted(self.stored, key=lambda s: s.part)]}
        return body

    def describe(self, f: Failed) -> str:
        what = f"part {f.part}" + (f" ({f.sop_instance_uid})" if f.sop_instance_uid else "")
        return f"{what}: {f.text} [0x{f.reason:04X}]"

    def response(self, status: int | None = None, reason: str | None = None) -> web.Response:
        status = status or self.status()
        response = json_response(self.payload())
        response.set_status(status, _status_line(reason or self._reason(status)))
        if self.failed:
            # PS3.18 8.3.5.1 (Warning 299): why each part was refused, in the order of the body
            warnings = ", ".join(f"299 vna {_quoted(self.describe(f))}" for f in self._failures())
            response.headers["Warning"] = warnings[:8000]
        return response

    def _reason(self, status: int) -> str:
        if status == 200:
            return "OK"
        first = self.describe(self._failures()[0]) if self.failed else "the multipart body has no parts"
        if status == 202:
            return f"{len(self.stored)} stored, {len(self.failed)} failed; first failure: {first}"
        return f"no instance stored: {first}"


def _status_line(text: str) -> str:
    return "".join(ch if ch.isprintable() and ord(ch) < 128 else "?" for ch in text)[:200]


def _accepts_json(request: web.Request) -> bool:
    return any(r.matches(_DICOM_JSON) or r.matches("application/json")
               for r in parse_accept(request.headers.get("Accept")))


async def store_instances(request: web.Request) -> web.StreamResponse:
    """PS3.18 10.5: store the instances of a multipart/related body, each part on its own."""
    settings = request.app[SETTINGS_KEY]
    if not _accepts_json(request):
        raise web.HTTPNotAcceptable(reason="STOW-RS answers application/dicom+json",
                                    text="the Store Instances Response is sent as application/dicom+json\n")
    boundary = request_boundary(request)
    try:
        parser = BodyParser(boundary)
    except MultipartError as exc:
        raise web.HTTPBadRequest(reason=_status_line(str(exc)), text=str(exc) + "\n") from exc
    limit = settings.max_stow_bytes
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(limit, request.content_length,
                                            reason=f"the request body exceeds the limit of {limit} bytes")
    study = request.match_info.get("study")
    tx = StoreTransaction(request, study)
    part: PartBuffer | None = None
    received = 0
    try:
        try:
            # a received chunk at a time, as it came (iter_any would join what is buffered: a copy of the body)
            async for chunk, _end_of_http_chunk in request.content.iter_chunks():
                if not chunk:
                    continue
                over = received + len(chunk) > limit
                if over:  # what is within the limit still counts: complete parts in it are stored
                    chunk = chunk[:limit - received]
                received += len(chunk)
                for event in parser.feed(chunk):
                    if isinstance(event, PartStart):
                        part = PartBuffer(settings.stow_spill_bytes) if _part_acceptable(tx, event) else None
                    elif isinstance(event, PartData) and part is not None:
                        await part.add(event.data)
                    elif isinstance(event, PartEnd) and part is not None:
                        buffer, part = part, None
                        await tx.submit(event.number, buffer)
                if over and not parser.finished:
                    tx.fail(parser.parts, f"the request body exceeds {limit} bytes: reading stopped",
                            reason=OUT_OF_RESOURCES)
                    await tx.drain()
                    return tx.response(413, f"the request body exceeds the limit of {limit} bytes")
                if parser.finished:
                    break
            parser.close()
        except MultipartError as exc:
            # what was complete has been stored; the part in progress (if any) is refused whole
            tx.fail(parser.parts, f"malformed multipart body: {exc}")
        except (HttpProcessingError, aiohttp.ClientPayloadError, ConnectionError) as exc:
            # the client went away or broke the transfer coding: the part in progress is not stored
            tx.fail(parser.parts, f"the request body could not be read: {exc}")
        await tx.drain()
    finally:
        if part is not None:
            await part.close()
        tx.cancel()
    if parser.parts == 0 and not tx.failed:
        tx.fail(0, "the multipart body has no parts")
    return tx.response()


def _part_acceptable(tx: StoreTransaction, start: PartStart) -> bool:
    """Can this part's content be a PS3.10 file? If not, record why (PS3.18 10.5.1.2: application/dicom)."""
    if start.error:
        tx.fail(start.number, start.error)
        return False
    media = content_type_params(start.headers.get("content-type"))
    if media is not None and media.type != _DICOM:
        tx.fail(start.number, f"part Content-Type {media.type} is not {_DICOM}")
        return False
    encoding = start.headers.get("content-transfer-encoding", "binary").lower()
    if encoding not in ("binary", "8bit", "7bit"):
        tx.fail(start.number, f"part Content-Transfer-Encoding {encoding} is not supported (binary expected)")
        return False
    return True


def add_routes(app: web.Application, settings: DicomwebSettings) -> None:
    app.router.add_post(f"{settings.root}/studies", store_instances)
    app.router.add_post(f"{settings.root}/studies/{{study}}", store_instances)
