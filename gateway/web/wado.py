"""WADO-RS (PS3.18 10.4): studies, series and instances as PS3.10 files, their metadata, bulk data
and frames. Rendered resources, thumbnails and WADO-URI are elsewhere.

- Instances are streamed part by part from the object store, as stored (byte for byte what was
  received) unless the Accept header asks for a transfer syntax they are not stored in; then they are
  re-encoded in Explicit (or Implicit) VR Little Endian with decompressed pixel data, in a worker
  thread. A syntax that cannot be produced is a 406 naming the instance.
- Metadata is the index's stored DICOM JSON, concatenated by PostgreSQL with absolute BulkDataURIs:
  no object is read and no JSON is parsed per instance.
- Frames and pixel data bulk data are slices of the stored object (archive/frames.py): compressed
  bitstreams with their image media type (PS3.18 Table 8.7.3-5), native frames as
  application/octet-stream, or decoded to Explicit VR Little Endian when only that is accepted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from aiohttp import web
from pydicom.uid import UID

from archive import frames as px
from archive.errors import InternalError, MisuseError, RemoteError, StorageError
from archive.index import LocatedInstance
from archive.instance import parse_bulk_path
from gateway.web.dicomweb import (
    DB_TIMEOUT,
    SERVICES_KEY,
    bad_request,
    base_url,
)
from gateway.web.media import MediaRange, parse_accept
from gateway.web.multipart import MultipartRelated

log = logging.getLogger(__name__)

POOL_KEY = web.AppKey("wado_pool", ThreadPoolExecutor)
STORE_TIMEOUT = 60.0
# the first read of an object for its header; grown fourfold while the pixel data is not reached
HEADER_READ = 64 * 1024
# objects up to this many header reads (1 MiB) are read in one go: a header read then a frame read
# would cost two store round trips for about as many bytes
WHOLE_READ_HEADERS = 16

ELE, ILE = px.EXPLICIT_VR_LITTLE_ENDIAN, px.IMPLICIT_VR_LITTLE_ENDIAN
DICOM, OCTET = "application/dicom", "application/octet-stream"
DICOM_JSON = "application/dicom+json"

# PS3.18 Table 8.7.3-5: the media type of a compressed frame's bitstream, by transfer syntax
FRAME_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg", "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg", "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls", "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2", "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx", "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.110": "image/jxl", "1.2.840.10008.1.2.4.111": "image/jxl",
    "1.2.840.10008.1.2.4.112": "image/jxl",
    "1.2.840.10008.1.2.4.201": "image/jphc", "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
    "1.2.840.10008.1.2.4.100": "video/mpeg2", "1.2.840.10008.1.2.4.101": "video/mpeg2",
    "1.2.840.10008.1.2.4.102": "video/mp4", "1.2.840.10008.1.2.4.103": "video/mp4",
    "1.2.840.10008.1.2.4.104": "video/mp4", "1.2.840.10008.1.2.4.105": "video/mp4",
    "1.2.840.10008.1.2.4.106": "video/mp4",
    "1.2.840.10008.1.2.4.107": "video/H265", "1.2.840.10008.1.2.4.108": "video/H265",
}
# names older editions of PS3.18 and some clients use
_MEDIA_ALIASES = {"image/x-dicom-rle": "image/dicom-rle", "image/x-jls": "image/jls"}
_NATIVE_LE = frozenset((ELE, ILE, "1.2.840.10008.1.2.1.99"))

T = TypeVar("T")


# -- errors at the HTTP edge ---------------------------------------------------------------------

def not_found(reason: str) -> web.HTTPNotFound:
    return web.HTTPNotFound(reason=reason[:200], text=reason + "\n")


def not_acceptable(reason: str) -> web.HTTPNotAcceptable:
    return web.HTTPNotAcceptable(reason=reason[:200], text=reason + "\n")


async def _guarded(awaitable: Awaitable[T]) -> T:
    """Translate archive errors into HTTP answers (PS3.18 8.5: status codes with a reason)."""
    try:
        return await awaitable
    except px.FrameNotFound as exc:
        raise not_found(str(exc)) from exc
    except px.NotProducible as exc:
        raise not_acceptable(str(exc)) from exc
    except px.Truncated:
        raise  # a prefix read too short: the caller reads more
    except RemoteError as exc:
        raise web.HTTPServiceUnavailable(reason="archive unavailable", text=str(exc) + "\n") from exc
    except (InternalError, MisuseError) as exc:
        log.error("WADO-RS: %s", exc)
        raise web.HTTPInternalServerError(reason=str(exc)[:200], text=str(exc) + "\n") from exc


async def _in_pool(request: web.Request, fn: Callable[..., T], *args: Any) -> T:
    """CPU work (parsing, decoding, re-encoding) off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(request.app[POOL_KEY], fn, *args)


# -- locating what the path names ----------------------------------------------------------------

def _uids(request: web.Request) -> tuple[str, str | None, str | None]:
    m = request.match_info
    return m["study"], m.get("series"), m.get("sop")


async def _locate(request: web.Request) -> list[LocatedInstance]:
    study, series, sop = _uids(request)
    index = request.app[SERVICES_KEY].index
    found = await _guarded(index.locate_by_uids(study, series, sop, timeout=DB_TIMEOUT))
    if not found:
        what = "instance" if sop else "series" if series else "study"
        raise not_found(f"no such {what}")
    return found


async def _read(request: web.Request, inst: LocatedInstance) -> bytes:
    store = request.app[SERVICES_KEY].stores.for_location(inst.store, inst.location)
    return await _guarded(store.get(inst.location, timeout=STORE_TIMEOUT))


async def _read_range(request: web.Request, inst: LocatedInstance, offset: int, length: int) -> bytes:
    """`length` bytes of the object from `offset` (fewer at its end), without reading the rest."""
    store = request.app[SERVICES_KEY].stores.for_location(inst.store, inst.location)

    async def read() -> bytes:
        # the store's stream reads from an offset in chunks of the size asked: usually one chunk is the range
        parts: list[bytes] = []
        got = 0
        chunks = store.stream(inst.location, offset=offset, chunk_size=max(4096, min(length, 8 << 20)))
        try:
            async for chunk in chunks:
                parts.append(chunk)
                got += len(chunk)
                if got >= length:
                    break
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]
        if len(parts) == 1 and got == length:
            return parts[0]
        return b"".join(parts)[:length]

    async def read_in_time() -> bytes:
        try:
            return await asyncio.wait_for(read(), STORE_TIMEOUT)
        except TimeoutError as exc:
            raise StorageError(f"object store: no answer within {STORE_TIMEOUT}s") from exc

    return await _guarded(read_in_time())


@dataclasses.dataclass(slots=True)
class _Object:
    """One stored instance as far as it has been read: its layout, and its bytes once read whole."""

    inst: LocatedInstance
    layout: px.DataSetLayout
    data: bytes | None  # the whole PS3.10 file, when it was read whole


async def _parse(request: web.Request, data: bytes, inst: LocatedInstance, *, prefix: bool) -> px.DataSetLayout:
    return await _in_pool(request, lambda: px.parse_layout(data, inst.transfer_syntax_uid,
                                                           offset=inst.dataset_offset, stop_at_pixel_data=prefix))


async def _open(request: web.Request, inst: LocatedInstance) -> _Object:
    """The elements up to the pixel data, reading no more of the object than they take (a frame of a
    large multi-frame object is then read alone: PS3.5 8.2 gives its position)."""
    if inst.size <= WHOLE_READ_HEADERS * HEADER_READ:
        data = await _read(request, inst)
        if not UID(inst.transfer_syntax_uid).is_deflated:
            try:
                # parsed here, on the loop: a walk bounded by one header read costs less than the hop
                # to a worker thread; the layout's data is the whole object, its elements end at the pixels
                layout = await _guarded(_sync(functools.partial(
                    px.parse_layout, data[:HEADER_READ], inst.transfer_syntax_uid, offset=inst.dataset_offset,
                    stop_at_pixel_data=True)))
                return _Object(inst, dataclasses.replace(layout, data=data), None)
            except px.Truncated:
                pass
        return await _parsed_whole(request, inst, data)
    size = HEADER_READ
    while size < inst.size and not UID(inst.transfer_syntax_uid).is_deflated:
        prefix = await _read_range(request, inst, 0, size)
        try:
            return _Object(inst, await _guarded(_parse(request, prefix, inst, prefix=True)), None)
        except px.Truncated:
            size *= 4
    return await _read_whole(request, inst)


async def _read_whole(request: web.Request, inst: LocatedInstance) -> _Object:
    return await _parsed_whole(request, inst, await _read(request, inst))


async def _parsed_whole(request: web.Request, inst: LocatedInstance, data: bytes) -> _Object:
    try:
        return _Object(inst, await _guarded(_parse(request, data, inst, prefix=False)), data)
    except px.Truncated as exc:
        log.error("WADO-RS: stored object of %s is truncated: %s", inst.sop_instance_uid, exc)
        raise web.HTTPInternalServerError(reason="the stored object is truncated") from exc


async def _whole(request: web.Request, obj: _Object) -> _Object:
    """The same object, read and parsed whole (encapsulated frames, decoding, values past the pixel data)."""
    if obj.data is not None:
        return obj
    if len(obj.layout.data) == obj.inst.size:  # read whole already, parsed up to the pixel data
        return await _parsed_whole(request, obj.inst, obj.layout.data)
    return await _read_whole(request, obj.inst)


async def _piece(request: web.Request, obj: _Object, offset: int, length: int) -> bytes | memoryview:
    """Bytes of the object at a layout offset: a view of what was read, else read now."""
    if offset + length <= len(obj.layout.data):
        return memoryview(obj.layout.data)[offset:offset + length]
    return await _read_range(request, obj.inst, offset, length)


# -- Retrieve study / series / instance (PS3.18 10.4.1.1.1) -----------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class _DicomRange:
    multipart: bool
    transfer_syntax: str | None  # None: any, i.e. as stored


def _dicom_ranges(header: str | None, single_allowed: bool) -> list[_DicomRange]:
    out = []
    for r in parse_accept(header):
        ts = r.params.get("transfer-syntax")
        ts = None if ts in (None, "*") else ts
        if r.type == "multipart/related":
            if r.params.get("type", DICOM) in (DICOM, "*/*", "application/*"):
                out.append(_DicomRange(True, ts))
        elif r.type == DICOM:
            # PS3.18 10.4.4: single part application/dicom only for an Instance Resource
            if single_allowed:
                out.append(_DicomRange(False, ts))
        elif r.type in ("*/*", "multipart/*"):
            out.append(_DicomRange(True, None))
    return out


def _producible(stored: str, wanted: str | None) -> bool:
    if wanted is None or wanted == stored:
        return True
    if wanted not in (ELE, ILE):
        return False
    return px.can_decode(stored)


def _choose_syntaxes(header: str | None, found: list[LocatedInstance],
                     instance_level: bool) -> tuple[bool, list[str]]:
    """(single part?, the transfer syntax to send each instance in) or 406.

    An absent transfer-syntax parameter, like `*`, means "as stored": what clients expect from an
    archive (dicomweb-client's retrieve_study sends none and reads any syntax), and what spares
    re-encoding; a client that needs Explicit VR Little Endian names it.
    """
    ranges = _dicom_ranges(header, instance_level and len(found) == 1)
    if not ranges:
        raise not_acceptable('this resource is sent as multipart/related; type="application/dicom"')
    first = ranges[0]
    if not first.multipart and _producible(found[0].transfer_syntax_uid, first.transfer_syntax):
        return True, [first.transfer_syntax or found[0].transfer_syntax_uid]
    multipart = [r for r in ranges if r.multipart] or [r for r in ranges if not r.multipart]
    chosen = []
    for inst in found:
        ts = next((r.transfer_syntax or inst.transfer_syntax_uid for r in multipart
                   if _producible(inst.transfer_syntax_uid, r.transfer_syntax)), None)
        if ts is None:
            wanted = ", ".join(sorted({r.transfer_syntax or "*" for r in multipart}))
            raise not_acceptable(f"instance {inst.sop_instance_uid} is stored in {inst.transfer_syntax_uid} and "
                                 f"cannot be sent in {wanted}")
        chosen.append(ts)
    return not any(r.multipart for r in ranges), chosen


async def _instance_body(request: web.Request, inst: LocatedInstance, ts: str) -> AsyncIterator[bytes]:
    store = request.app[SERVICES_KEY].stores.for_location(inst.store, inst.location)
    if ts == inst.transfer_syntax_uid:
        async for chunk in store.stream(inst.location):
            yield chunk
        return
    data = await store.get(inst.location, timeout=STORE_TIMEOUT)
    yield await _in_pool(request, px.transcode, data, ts)


async def retrieve(request: web.Request) -> web.StreamResponse:
    """GET {root}/studies/{study}[/series/{series}[/instances/{sop}]] (PS3.18 10.4.1.1.1)."""
    found = await _locate(request)
    single, syntaxes = _choose_syntaxes(request.headers.get("Accept"), found, "sop" in request.match_info)
    if single:
        inst = found[0]
        body = _instance_body(request, inst, syntaxes[0])
        return web.Response(body=_guarded_stream(body, inst), headers={
            "Content-Type": f"{DICOM}; transfer-syntax={syntaxes[0]}"})
    writer = MultipartRelated(DICOM)

    async def message() -> AsyncIterator[bytes]:
        for inst, ts in zip(found, syntaxes):
            yield writer.part_header(f"{DICOM}; transfer-syntax={ts}")
            async for chunk in _guarded_stream(_instance_body(request, inst, ts), inst):
                yield chunk
        yield writer.close()

    return web.Response(body=message(), headers={"Content-Type": writer.content_type})


async def _guarded_stream(body: AsyncIterator[bytes], inst: LocatedInstance) -> AsyncIterator[bytes]:
    """Once the status line is sent an error can only end the message early: log what failed."""
    try:
        async for chunk in body:
            yield chunk
    except Exception:
        log.exception("WADO-RS: sending instance %s failed; the response is cut short", inst.sop_instance_uid)
        raise


# -- Metadata (PS3.18 10.4.1.1.2) -----------------------------------------------------------------

async def metadata(request: web.Request) -> web.Response:
    """GET .../metadata: a JSON array of the instances' DICOM JSON, from the index alone."""
    if not any(r.matches(DICOM_JSON) or r.matches("application/json")
               for r in parse_accept(request.headers.get("Accept"))):
        raise not_acceptable("metadata is sent as application/dicom+json")
    study, series, sop = _uids(request)
    index = request.app[SERVICES_KEY].index
    text = await _guarded(index.metadata_json(study, series, sop, base_url=base_url(request), timeout=DB_TIMEOUT))
    if text is None:
        raise not_found(f"no such {'instance' if sop else 'series' if series else 'study'}")
    return web.Response(body=text.encode(), headers={"Content-Type": DICOM_JSON})


# -- Frames and pixel data (PS3.18 10.4.1.1.3, 10.4.1.1.5) -----------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class _PixelChoice:
    multipart: bool
    media_type: str        # of each part (or of the single-part body)
    transfer_syntax: str   # of the bytes sent
    decode: bool           # decompress the stored frames first


def _inner_type(r: MediaRange, count: int) -> tuple[str, bool] | None:
    if r.type == "multipart/related":
        return _MEDIA_ALIASES.get(r.params.get("type", "*/*"), r.params.get("type", "*/*")), True
    if r.type in ("*/*", "multipart/*"):
        return "*/*", True
    if count != 1:
        return None  # PS3.18 10.4.4: a single part media type only for a single response item
    return _MEDIA_ALIASES.get(r.type, r.type), False


def choose_pixel_media(header: str | None, stored: str, encapsulated: bool, count: int) -> _PixelChoice | None:
    """How to send `count` frames stored in `stored`, given an Accept header (PS3.18 8.7.3.3, Table 8.7.3-5)."""
    native_ok = stored in _NATIVE_LE or stored == px.EXPLICIT_VR_BIG_ENDIAN
    for r in parse_accept(header):
        inner = _inner_type(r, count)
        if inner is None:
            continue
        media, multipart = inner
        wanted = MediaRange(media)
        ts = r.params.get("transfer-syntax")
        if encapsulated:
            stored_media = FRAME_MEDIA_TYPES.get(stored)
            if stored_media and wanted.matches(stored_media) and ts in (None, "*", stored):
                # a client that names an alias (image/x-dicom-rle) gets the name it asked for
                exact = r.params.get("type") if multipart else r.type
                answer = exact if exact and _MEDIA_ALIASES.get(exact) == stored_media else stored_media
                return _PixelChoice(multipart, answer, stored, False)
            if wanted.matches(OCTET):
                if ts in ("*", stored):
                    return _PixelChoice(multipart, OCTET, stored, False)
                # PS3.18 8.7.3.3: without a transfer-syntax parameter, Explicit VR Little Endian
                if ts in (None, ELE) and px.can_decode(stored):
                    return _PixelChoice(multipart, OCTET, ELE, True)
        elif native_ok and wanted.matches(OCTET) and ts in (None, "*", ELE, stored):
            return _PixelChoice(multipart, OCTET, ELE, False)
    return None


_FRAME_LIST = re.compile(r"^\s*\d+\s*(,\s*\d+\s*)*$")


def _frame_numbers(text: str) -> list[int]:
    """PS3.18 10.4.1.1.3: a comma-separated list of 1-based frame numbers."""
    if not _FRAME_LIST.match(text):
        raise bad_request(f"{text!r} is not a list of frame numbers")
    numbers = [int(n) for n in text.split(",")]
    if any(n < 1 for n in numbers):
        raise bad_request("frame numbers start at 1")
    return numbers


async def _send(request: web.Request, content_type: str, pieces: list[bytes | memoryview]) -> web.StreamResponse:
    """A body of known length written piece by piece: frames go out as the views they are, uncopied."""
    response = web.StreamResponse(headers={"Content-Type": content_type})
    response.content_length = sum(len(p) for p in pieces)
    await response.prepare(request)
    if pieces and len(pieces[0]) > HEADER_READ:
        # aiohttp sends the headers joined with the first write: send them alone rather than copy a frame
        await response.write(b"")
    for piece in pieces:
        await response.write(piece)
    await response.write_eof()
    return response


async def _pixel_response(request: web.Request, choice: _PixelChoice,
                          parts: list[bytes | memoryview]) -> web.StreamResponse:
    part_type = f"{choice.media_type}; transfer-syntax={choice.transfer_syntax}"
    if not choice.multipart:
        return await _send(request, part_type, parts[:1])
    writer = MultipartRelated(choice.media_type)
    pieces: list[bytes | memoryview] = []
    for part in parts:
        pieces += [writer.part_header(part_type), part]
    pieces.append(writer.close())
    return await _send(request, writer.content_type, pieces)


def _no_pixel_media(inst: LocatedInstance) -> web.HTTPNotAcceptable:
    media = FRAME_MEDIA_TYPES.get(inst.transfer_syntax_uid, OCTET)
    return not_acceptable(f"the pixel data is stored in {inst.transfer_syntax_uid}: it is sent as {media} or "
                          f"{OCTET} (transfer-syntax=* for the bitstream as stored, or "
                          f"{ELE} decoded)")


async def _pixel_parts(request: web.Request, obj: _Object, indices: list[int]) -> web.StreamResponse:
    inst = obj.inst
    choice = choose_pixel_media(request.headers.get("Accept"), inst.transfer_syntax_uid, obj.layout.encapsulated,
                                len(indices))
    if choice is None:
        raise _no_pixel_media(inst)
    if not choice.decode and obj.layout.encapsulated and obj.data is None \
            and (located := await _frames_by_offset_table(request, obj, indices)) is not None:
        parts = located
    elif choice.decode or obj.layout.encapsulated:
        obj = await _whole(request, obj)
        if choice.decode:
            parts = await _guarded(_in_pool(request, px.decoded_frames, obj.data, indices))
        else:
            parts = await _guarded(_in_pool(request, px.encapsulated_frames, obj.layout, indices))
    else:
        parts = []
        for index in indices:
            span = await _guarded(_sync(px.native_frame_span, obj.layout, index))
            raw = await _piece(request, obj, span.offset, span.length)
            parts.append(await _guarded(_sync(px.frame_from_span, raw, span)))
    return await _pixel_response(request, choice, parts)


async def _frames_by_offset_table(request: web.Request, obj: _Object,
                                  indices: list[int]) -> list[bytes | memoryview] | None:
    """Compressed frames read alone where an offset table locates them (PS3.5 A.4), so that a frame of
    a large multi-frame object costs one frame's read; None: no table, the fragments must be walked."""
    pixel = obj.layout.elements[px.PIXEL_DATA]
    bot_length = await _guarded(_sync(px.basic_offset_table_length, await _piece(request, obj, pixel.offset, 8)))
    bot = await _piece(request, obj, pixel.offset + 8, bot_length)
    ranges = await _guarded(_sync(px.frame_item_ranges, obj.layout, bot, pixel.offset + 8 + bot_length,
                                  obj.inst.size))
    if ranges is None:
        return None
    parts: list[bytes | memoryview] = []
    for index in indices:
        start, end = ranges[index]
        raw = await _piece(request, obj, start, end - start)
        parts.append(await _guarded(_sync(px.fragment_values, raw)))
    return parts


async def _sync(fn: Callable[..., T], *args: Any) -> T:
    """A cheap pure call, with its archive errors translated like the others'."""
    return fn(*args)


async def retrieve_frames(request: web.Request) -> web.StreamResponse:
    """GET .../instances/{sop}/frames/{list} (PS3.18 10.4.1.1.3)."""
    numbers = _frame_numbers(request.match_info["frames"])
    inst = (await _locate(request))[0]
    obj = await _open(request, inst)
    layout = obj.layout
    if not layout.has_pixel_data:
        raise bad_request(f"instance {inst.sop_instance_uid} has no pixel data, hence no frames")
    missing = [n for n in numbers if n > layout.number_of_frames]
    if missing:
        raise not_found(f"frame {missing[0]} does not exist: the instance has {layout.number_of_frames} "
                        f"frame{'s' if layout.number_of_frames != 1 else ''}")
    return await _pixel_parts(request, obj, [n - 1 for n in numbers])


# -- Bulk data (PS3.18 10.4.1.1.5) ------------------------------------------------------------------

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) inclusive of a single RFC 9110 14.1.2 byte range; None: send everything.

    Several ranges are not served (RFC 9110 14.2 lets a server ignore Range); an unsatisfiable one is a 416.
    """
    if not header:
        return None
    m = _RANGE.match(header.strip().replace(" ", ""))
    if m is None:
        return None
    first, last = m.group(1), m.group(2)
    if not first and not last:
        return None
    if not first:  # the last N bytes
        n = int(last)
        if n == 0:
            raise _unsatisfiable(size)
        return max(0, size - n), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or (last and int(last) < start):
        raise _unsatisfiable(size)
    return start, end


def _unsatisfiable(size: int) -> web.HTTPRequestRangeNotSatisfiable:
    return web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"},
                                              text="the range lies outside the bulk data value\n")


def _octet_choice(header: str | None) -> bool | None:
    """multipart (True) or single part (False) application/octet-stream; None: not acceptable."""
    for r in parse_accept(header):
        ts = r.params.get("transfer-syntax")
        if ts not in (None, "*", ELE):
            continue
        if r.type == "multipart/related" and MediaRange(r.params.get("type", "*/*")).matches(OCTET):
            return True
        if r.type in ("*/*", "multipart/*"):
            return True
        if r.type in (OCTET, "application/*"):
            return False
    return None


async def retrieve_bulk(request: web.Request) -> web.StreamResponse:
    """GET .../instances/{sop}/bulk/{tag}: the target of the metadata's BulkDataURIs."""
    tag_text = request.match_info["tag"]
    path = parse_bulk_path(tag_text)
    if path is None:
        raise bad_request(f"{tag_text!r} is neither a tag (8 hexadecimal digits) nor a path to one inside "
                          "sequence items (tag/item/.../tag)")
    tag = path[-1]
    inst = (await _locate(request))[0]
    obj = await _open(request, inst)
    if len(path) > 1:  # inside sequence items (archive.instance.nested_bulk_path)
        obj = await _whole(request, obj)
        found = await _guarded(_in_pool(request, px.value_at_path, obj.data, path))
        if found is None:
            raise not_found(f"instance {inst.sop_instance_uid} has no bulk data at {tag_text.upper()}")
        return _bulk_response(request, tag_text, found, _octet_choice(request.headers.get("Accept")))
    el = obj.layout.elements.get(tag)
    if el is None or (tag != px.PIXEL_DATA and el.length is not None
                      and el.offset + el.length > len(obj.layout.data)):
        # not before the pixel data: after it, or inside a sequence item
        obj = await _whole(request, obj)
        el = obj.layout.elements.get(tag)
    if el is not None and el.tag == px.PIXEL_DATA and el.length is None:
        # encapsulated pixel data: its frames, one part each, as the frames resource sends them
        return await _pixel_parts(request, obj, list(range(obj.layout.number_of_frames)))
    multipart = _octet_choice(request.headers.get("Accept"))
    if multipart is None:
        raise not_acceptable(f"bulk data is sent as {OCTET} (transfer-syntax {ELE})")
    nested: bytes | None = None
    if el is None or el.length is None:
        obj = await _whole(request, obj)
        nested = await _guarded(_in_pool(request, px.nested_element_value, obj.data, tag))
        if nested is None:
            raise not_found(f"instance {inst.sop_instance_uid} has no bulk data ({tag_text.upper()})")
    if nested is not None:
        return _bulk_response(request, tag_text, nested, multipart)
    size = el.length  # type: ignore[union-attr]
    span = _byte_range(request.headers.get("Range"), size)
    first, last = span if span is not None else (0, size - 1)
    value = await _value_piece(request, obj, el, first, last + 1 - first)  # type: ignore[arg-type]
    return _bulk_piece_response(request, tag_text, value, size, span, multipart)


def _bulk_response(request: web.Request, tag_text: str, whole: bytes, multipart: bool | None) -> web.Response:
    """A bulk value held whole in memory, its Range applied."""
    if multipart is None:
        raise not_acceptable(f"bulk data is sent as {OCTET} (transfer-syntax {ELE})")
    span = _byte_range(request.headers.get("Range"), len(whole))
    first, last = span if span is not None else (0, len(whole) - 1)
    return _bulk_piece_response(request, tag_text, whole[first:last + 1], len(whole), span, multipart)


def _bulk_piece_response(request: web.Request, tag_text: str, value: bytes | memoryview, size: int,
                         span: tuple[int, int] | None, multipart: bool) -> web.Response:
    first, last = span if span is not None else (0, size - 1)
    part_type = f"{OCTET}; transfer-syntax={ELE}"
    status, part_headers = 200, []
    if span is not None:
        status = 206
        part_headers = [("Content-Range", f"bytes {first}-{last}/{size}")]
    if not multipart:
        return web.Response(status=status, body=value,
                            headers={"Content-Type": part_type, "Accept-Ranges": "bytes", **dict(part_headers)})
    writer = MultipartRelated(OCTET)
    study, series, sop = _uids(request)
    # PS3.18 B.10: the part names the BulkDataURI it answers
    location = f"{base_url(request)}/studies/{study}/series/{series}/instances/{sop}/bulk/{tag_text}"
    body = writer.part_header(part_type, [("Content-Location", location), *part_headers]) + value + writer.close()
    return web.Response(status=status, body=body, headers={"Content-Type": writer.content_type,
                                                            "Accept-Ranges": "bytes"})


async def _value_piece(request: web.Request, obj: _Object, el: px.Element, start: int,
                       length: int) -> bytes | memoryview:
    """Bytes [start, start + length) of a value, little endian, reading only the words they span."""
    width = px.swap_width(obj.layout, el)
    aligned = start - start % width if width else start
    end = start + length
    if width and end % width:
        end += width - end % width
    end = min(end, el.length or 0)
    raw = await _piece(request, obj, el.offset + aligned, end - aligned)
    return px.little_endian_value(raw, width)[start - aligned:start - aligned + length]


# -- wiring -------------------------------------------------------------------------------------------

async def _pool(app: web.Application) -> AsyncIterator[None]:
    pool = ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2)), thread_name_prefix="wado")
    app[POOL_KEY] = pool
    yield
    pool.shutdown(wait=True, cancel_futures=True)


def add_routes(app: web.Application, settings: Any) -> None:
    """Register the WADO-RS routes under the DICOMweb root and the worker pool they decode in."""
    app.cleanup_ctx.append(_pool)
    r = app.router
    study = f"{settings.root}/studies/{{study}}"
    series = f"{study}/series/{{series}}"
    instance = f"{series}/instances/{{sop}}"
    for path in (study, series, instance):
        r.add_get(path, retrieve)
        r.add_get(f"{path}/metadata", metadata)
    r.add_get(f"{instance}/frames/{{frames}}", retrieve_frames)
    r.add_get(f"{instance}/bulk/{{tag:.+}}", retrieve_bulk)  # a tag, or a path inside sequence items
