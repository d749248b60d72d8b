"""WADO-RS rendered and thumbnail resources (PS3.18 10.4.1.1.3-10.4.1.1.4, 8.3.5.1; Supplement 203).

Routes under the DICOMweb root:

    /studies/{study}/series/{series}/instances/{sop}/rendered            frame 1 as a still image
    /studies/{study}/series/{series}/instances/{sop}/frames/{n,...}/rendered
    /studies/{study}/series/{series}/instances/{sop}/thumbnail
    /studies/{study}/series/{series}/instances/{sop}/frames/{n,...}/thumbnail
    /studies/{study}/series/{series}/rendered | thumbnail               the series' representative image
    /studies/{study}/rendered | thumbnail                               the study's representative image

Media types: image/jpeg (the default for `*/*` and `image/*`), image/png, image/gif; anything else is
406. One frame answers a still image. Several frames (`frames/1,3/rendered`) answer
`multipart/related; type="image/jpeg"` (or image/png, image/gif), one part per frame in the order
asked, when the Accept header admits multipart/related (or is `*/*`); otherwise 406.
The study and series `rendered` resources answer the representative image, like their thumbnails
(a still image; the standard also allows a multipart of every instance, which this server does not
produce). The representative instance is the middle one (by Instance Number) of the first series (by
Series Number) that has pixel data.

Query parameters (PS3.18 8.3.5.1): `window=center,width[,function]` (linear, linear-exact, sigmoid),
`viewport=vw,vh[,sx,sy,sw,sh]`, `quality=1..100`; `annotation` and `iccprofile` are accepted and
ignored. A thumbnail without a viewport fits in 128x128. A bad parameter is 400 with the reason.

Decoding and rendering run in a thread pool (pydicom, the pylibjpeg codecs, numpy and Pillow release
the GIL for the heavy parts), never on the event loop. Native MONOCHROME1/2 and RGB images skip
pydicom: the index gives the data set's offset and transfer syntax, and archive.rendering reads the
few attributes it needs and windows through a lookup table (`native_image`).
"""

from __future__ import annotations

import asyncio
import functools
import os
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from typing import Any, TypeVar

from aiohttp import web

from archive.attributes import Level
from archive.config import DicomwebSettings
from archive.errors import RemoteError
from archive.index import LocatedInstance
from archive.query import Query, QueryKey
from archive.rendering import (JPEG, RENDERED_MEDIA_TYPES, NotAnImage, Rendering,
                               RenderError, UndecodablePixelData, Viewport, Window, render)
from gateway.web import dicomweb
from gateway.web.media import parse_accept

RENDER_POOL_KEY = web.AppKey("render_pool", ThreadPoolExecutor)
STORE_TIMEOUT = 60.0
RENDER_TIMEOUT = 120.0
THUMBNAIL_SIDE = 128
MAX_REPRESENTATIVE_TRIES = 8           # instances tried before a study/series is declared imageless
RENDERED_HEADERS = {"Cross-Origin-Resource-Policy": "cross-origin"}

STUDY_UID, SERIES_UID, SOP_UID = 0x0020000D, 0x0020000E, 0x00080018
SERIES_NUMBER, INSTANCE_NUMBER = 0x00200011, 0x00200013

_WINDOW_FUNCTIONS = {"linear": "LINEAR", "linear-exact": "LINEAR_EXACT", "linear_exact": "LINEAR_EXACT",
                     "sigmoid": "SIGMOID"}

T = TypeVar("T")


# -- parameters (PS3.18 8.3.5.1) ---------------------------------------------------------------------

def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise dicomweb.bad_request(f"{what}: {text!r} is not a number") from None
    return value


def _integer(text: str, what: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise dicomweb.bad_request(f"{what}: {text!r} is not an integer") from None


def parse_window(text: str) -> Window:
    """`window=center,width[,function]` (PS3.18 8.3.5.1.4)."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise dicomweb.bad_request("window must be center,width,function")
    function = "LINEAR"
    if len(parts) == 3 and parts[2]:
        function = _WINDOW_FUNCTIONS.get(parts[2].lower(), "")
        if not function:
            raise dicomweb.bad_request(f"window function {parts[2]!r} is not linear, linear-exact or sigmoid")
    try:
        return Window(_number(parts[0], "window center"), _number(parts[1], "window width"), function)
    except RenderError as exc:
        raise dicomweb.bad_request(f"window: {exc}") from exc


def parse_viewport(text: str) -> Viewport:
    """`viewport=vw,vh[,sx,sy,sw,sh]` (PS3.18 8.3.5.1.3); empty source components take their defaults."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (2, 6):
        raise dicomweb.bad_request("viewport must be vw,vh or vw,vh,sx,sy,sw,sh")
    values = [_integer(p, "viewport") if p else None for p in parts] + [None] * (6 - len(parts))
    vw, vh, sx, sy, sw, sh = values
    try:
        return Viewport(vw, vh, sx or 0, sy or 0, sw, sh)
    except RenderError as exc:
        raise dicomweb.bad_request(f"viewport: {exc}") from exc


def parse_quality(text: str) -> int:
    quality = _integer(text, "quality")
    if not 1 <= quality <= 100:
        raise dicomweb.bad_request("quality must be an integer from 1 to 100")
    return quality


def parse_frames(text: str) -> list[int]:
    """A frame list `1,3,5` (PS3.18 10.4.1.1.3: 1-based frame numbers)."""
    frames = []
    for part in text.split(","):
        n = _integer(part, "frame number") if part.strip() else 0
        if n < 1:
            raise dicomweb.bad_request(f"frame numbers are 1-based positive integers, not {part!r}")
        frames.append(n)
    return frames


def rendering_from_query(request: web.Request, media_type: str, *, thumbnail: bool = False) -> Rendering:
    q = request.query
    window = parse_window(q["window"]) if "window" in q else None
    viewport = parse_viewport(q["viewport"]) if "viewport" in q else None
    if viewport is None and thumbnail:
        viewport = Viewport(THUMBNAIL_SIDE, THUMBNAIL_SIDE)
    quality = parse_quality(q["quality"]) if "quality" in q else 90
    return Rendering(media_type=media_type, window=window, viewport=viewport, quality=quality)


# -- content negotiation -----------------------------------------------------------------------------

def negotiate(accept: str | None, *, several: bool) -> tuple[str, bool]:
    """The rendered media type to answer with and whether as multipart/related (for several frames).

    PS3.18 8.7.4: rendered media types; `*/*` and `image/*` mean image/jpeg.
    """
    for r in parse_accept(accept):
        if r.type == "multipart/related":
            inner = r.params.get("type", "*/*")
            for media_type in RENDERED_MEDIA_TYPES:
                if inner == "*/*" or inner == media_type or inner == "image/*":
                    return media_type, True
            continue
        if several:
            if r.type == "*/*":
                return JPEG, True
            continue
        for media_type in RENDERED_MEDIA_TYPES:
            if r.matches(media_type):
                return media_type, False
    types = ", ".join(RENDERED_MEDIA_TYPES)
    if several:
        raise web.HTTPNotAcceptable(reason=f"several frames render as multipart/related; type={types}")
    raise web.HTTPNotAcceptable(reason=f"rendered resources are {types}")


# -- the archive -------------------------------------------------------------------------------------

def _uid_keys(study: str, series: str | None = None, sop: str | None = None) -> tuple[QueryKey, ...]:
    keys = [QueryKey(STUDY_UID, "UI", study)]
    if series is not None:
        keys.append(QueryKey(SERIES_UID, "UI", series))
    if sop is not None:
        keys.append(QueryKey(SOP_UID, "UI", sop))
    return tuple(keys)


async def _index_call(call: Any) -> Any:
    try:
        return await call
    except RemoteError as exc:
        raise web.HTTPServiceUnavailable(reason="index unavailable", text=str(exc)) from exc


async def locate_instance(request: web.Request, study: str, series: str, sop: str) -> LocatedInstance:
    """The stored instance with these UIDs; 404 when there is none."""
    index = request.app[dicomweb.SERVICES_KEY].index
    found = await _index_call(index.locate_by_uids(study, series, sop, timeout=dicomweb.DB_TIMEOUT))
    if not found:
        raise web.HTTPNotFound(reason="no such instance")
    return found[0]


async def fetch(request: web.Request, located: LocatedInstance) -> bytes:
    """The stored PS3.10 file of `located`."""
    store = request.app[dicomweb.SERVICES_KEY].stores.for_location(located.store, located.location)
    try:
        return await store.get(located.location, timeout=STORE_TIMEOUT)
    except RemoteError as exc:
        raise web.HTTPServiceUnavailable(reason="object store unavailable", text=str(exc)) from exc


def _value(row: dict[str, Any], tag: int) -> Any:
    values = row.get(f"{tag:08X}", {}).get("Value") or [None]
    return values[0]


def _numbered(rows: list[dict[str, Any]], tag: int) -> list[dict[str, Any]]:
    """Rows ordered by an IS attribute (absent or malformed last), ties in index order."""
    def key(row: dict[str, Any]) -> tuple[int, float]:
        try:
            return (0, float(_value(row, tag)))
        except (TypeError, ValueError):
            return (1, 0.0)
    return sorted(rows, key=key)


def _middle_first(items: Sequence[T]) -> list[T]:
    """The middle item, then the others by distance from it (the next candidates if it has no pixels)."""
    middle = (len(items) - 1) // 2
    order = sorted(range(len(items)), key=lambda i: (abs(i - middle), i))
    return [items[i] for i in order]


async def representative_candidates(request: web.Request, study: str,
                                    series: str | None) -> AsyncIterator[LocatedInstance]:
    """Instances that may represent a study or series, best first: the middle instance (by Instance
    Number) of each series, series by Series Number (Supplement 203 leaves the choice to the server)."""
    index = request.app[dicomweb.SERVICES_KEY].index
    if series is None:
        series_rows = await _index_call(index.find(Query(
            level=Level.SERIES, keys=(*_uid_keys(study), QueryKey(SERIES_UID, "UI"), QueryKey(SERIES_NUMBER, "IS")),
            top=Level.STUDY), timeout=dicomweb.DB_TIMEOUT))
        series_uids = [_value(r, SERIES_UID) for r in _numbered(series_rows, SERIES_NUMBER)]
    else:
        series_uids = [series]
    for series_uid in series_uids:
        rows = await _index_call(index.find(Query(
            level=Level.IMAGE, keys=(*_uid_keys(study, series_uid), QueryKey(SOP_UID, "UI"),
                                     QueryKey(INSTANCE_NUMBER, "IS")),
            top=Level.STUDY), timeout=dicomweb.DB_TIMEOUT))
        located = {i.sop_instance_uid: i for i in await _index_call(index.locate(
            Query(level=Level.IMAGE, keys=_uid_keys(study, series_uid), top=Level.STUDY),
            timeout=dicomweb.DB_TIMEOUT))}
        for uid in _middle_first([_value(r, SOP_UID) for r in _numbered(rows, INSTANCE_NUMBER)]):
            if uid in located:
                yield located[uid]


# -- rendering off the loop --------------------------------------------------------------------------

async def run_in_pool(request: web.Request, fn: Callable[..., T], *args: Any) -> T:
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(loop.run_in_executor(request.app[RENDER_POOL_KEY], fn, *args),
                                      RENDER_TIMEOUT)
    except TimeoutError as exc:
        raise web.HTTPServiceUnavailable(reason="rendering took too long") from exc


def _render(data: bytes, located: LocatedInstance, frames: list[int], rendering: Rendering) -> list[bytes]:
    # the index knows where the data set starts: native pixel data then skips pydicom (the fast path)
    return render(data, frames, rendering, transfer_syntax_uid=located.transfer_syntax_uid,
                  dataset_offset=located.dataset_offset)


def render_error(exc: RenderError) -> web.HTTPException:
    """A RenderError at the HTTP edge."""
    if isinstance(exc, NotAnImage):
        # PS3.18 10.4.1.1.3: no rendered image media type exists for an object without pixel data
        return web.HTTPNotAcceptable(reason=str(exc))
    if isinstance(exc, UndecodablePixelData):
        return web.HTTPInternalServerError(reason="cannot decode the stored pixel data", text=str(exc) + "\n")
    return dicomweb.bad_request(str(exc))


async def render_located(request: web.Request, located: LocatedInstance, frames: list[int],
                         rendering: Rendering) -> list[bytes]:
    data = await fetch(request, located)
    try:
        return await run_in_pool(request, _render, data, located, frames, rendering)
    except RenderError as exc:
        raise render_error(exc) from exc


def image_response(images: list[bytes], media_type: str, multipart: bool) -> web.Response:
    if not multipart:
        return web.Response(body=images[0], content_type=media_type, headers=RENDERED_HEADERS)
    boundary = secrets.token_hex(16)
    body = bytearray()
    for image in images:
        body += f"--{boundary}\r\nContent-Type: {media_type}\r\nContent-Length: {len(image)}\r\n\r\n".encode()
        body += image + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    headers = {**RENDERED_HEADERS,
               "Content-Type": f'multipart/related; type="{media_type}"; boundary={boundary}'}
    return web.Response(body=bytes(body), headers=headers)


# -- handlers ----------------------------------------------------------------------------------------

def _instance_handler(*, thumbnail: bool, with_frames: bool):  # type: ignore[no-untyped-def]
    async def handler(request: web.Request) -> web.Response:
        m = request.match_info
        frames = parse_frames(m["frames"]) if with_frames else [1]
        media_type, multipart = negotiate(request.headers.get("Accept"), several=len(frames) > 1)
        rendering = rendering_from_query(request, media_type, thumbnail=thumbnail)
        located = await locate_instance(request, m["study"], m["series"], m["sop"])
        try:
            images = await render_located(request, located, frames, rendering)
        except web.HTTPNotAcceptable:
            if thumbnail:
                # Supplement 203: a thumbnail the server cannot produce is simply not there
                raise web.HTTPNotFound(reason="no thumbnail: the instance has no pixel data") from None
            raise
        return image_response(images, media_type, multipart)
    return handler


def _representative_handler(*, thumbnail: bool):  # type: ignore[no-untyped-def]
    async def handler(request: web.Request) -> web.Response:
        m = request.match_info
        media_type, _ = negotiate(request.headers.get("Accept"), several=False)
        rendering = rendering_from_query(request, media_type, thumbnail=thumbnail)
        tried = 0
        async with aclosing(representative_candidates(request, m["study"], m.get("series"))) as candidates:
            async for located in candidates:
                data = await fetch(request, located)
                try:
                    images = await run_in_pool(request, _render, data, located, [1], rendering)
                except (NotAnImage, UndecodablePixelData):
                    tried += 1
                    if tried >= MAX_REPRESENTATIVE_TRIES:
                        break
                    continue
                except RenderError as exc:
                    raise render_error(exc) from exc
                return image_response(images, media_type, False)
        if tried:
            raise web.HTTPNotFound(reason="no instance with renderable pixel data")
        raise web.HTTPNotFound(reason="no such study or series")
    return handler


async def _render_pool(app: web.Application) -> AsyncIterator[None]:
    pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="render")
    app[RENDER_POOL_KEY] = pool
    yield
    # off the loop: a render still running finishes in its thread while the loop goes on draining
    await asyncio.get_running_loop().run_in_executor(None, functools.partial(pool.shutdown, wait=True,
                                                                             cancel_futures=True))


def add_routes(app: web.Application, settings: DicomwebSettings) -> None:
    """Rendered and thumbnail resources under the root, and WADO-URI (at /wado and {root}/wado)."""
    from gateway.web import wado_uri  # here: wado_uri builds on this module's helpers

    app.cleanup_ctx.append(_render_pool)
    instance = f"{settings.root}/studies/{{study}}/series/{{series}}/instances/{{sop}}"
    r = app.router
    r.add_get(f"{instance}/rendered", _instance_handler(thumbnail=False, with_frames=False))
    r.add_get(f"{instance}/thumbnail", _instance_handler(thumbnail=True, with_frames=False))
    r.add_get(f"{instance}/frames/{{frames}}/rendered", _instance_handler(thumbnail=False, with_frames=True))
    r.add_get(f"{instance}/frames/{{frames}}/thumbnail", _instance_handler(thumbnail=True, with_frames=True))
    for path in (f"{settings.root}/studies/{{study}}/series/{{series}}", f"{settings.root}/studies/{{study}}"):
        r.add_get(f"{path}/rendered", _representative_handler(thumbnail=False))
        r.add_get(f"{path}/thumbnail", _representative_handler(thumbnail=True))
    wado_uri.add_routes(app, settings)

