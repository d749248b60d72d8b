"""WADO-URI (PS3.18 9): `GET /wado?requestType=WADO&studyUID=..&seriesUID=..&objectUID=..`, served at
`/wado` and at `{root}/wado`.

- `contentType` (a list of media ranges; else the Accept header; `*/*` and `image/*` mean image/jpeg):
  `application/dicom` answers the stored PS3.10 file, `image/jpeg`, `image/png`, `image/gif` a
  rendered frame (archive.rendering).
- `transferSyntax` (application/dicom only, PS3.18 9.4.2.4): absent means Explicit VR Little Endian,
  the default transfer syntax of DICOM web services; `*` or the stored syntax answers the stored file
  byte for byte; Explicit or Implicit VR Little Endian is produced by decompressing if needed; another
  valid UID is 406, a malformed one 400.
- Rendering parameters (PS3.18 9.4.1): `frameNumber` (default 1), `rows`, `columns` (each a maximum;
  the aspect ratio is kept), `region=x1,y1,x2,y2` (fractions of the image), `windowCenter` with
  `windowWidth` (both or neither), `imageQuality` (1-100). They are refused with application/dicom.
  `annotation` and `charset` are accepted and ignored; `presentationUID` is ignored with a Warning;
  `anonymize=yes` is refused (400): this server does not de-identify.
"""

from __future__ import annotations

import re

from aiohttp import web

from archive.config import DicomwebSettings
from archive.rendering import (JPEG, NATIVE_TRANSFER_SYNTAXES, RENDERED_MEDIA_TYPES, Rendering, RenderError,
                               Viewport, Window, transcode_native)
from gateway.web import dicomweb, rendered
from gateway.web.media import parse_accept

DICOM = "application/dicom"
_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_RENDER_ONLY = ("annotation", "rows", "columns", "region", "windowCenter", "windowWidth", "frameNumber",
                "imageQuality", "presentationUID", "presentationSeriesUID")


def _required(request: web.Request, name: str) -> str:
    value = request.query.get(name, "").strip()
    if not value:
        raise dicomweb.bad_request(f"WADO-URI needs the {name} parameter (PS3.18 9.4.1)")
    return value


def _uid(request: web.Request, name: str) -> str:
    value = _required(request, name)
    if len(value) > 64 or not _UID.match(value):
        raise dicomweb.bad_request(f"{name} {value!r} is not a UID")
    return value


def choose_content_type(request: web.Request) -> str:
    """The media type to answer with: the first acceptable of `contentType` (else of Accept)."""
    ranges = parse_accept(request.query.get("contentType") or request.headers.get("Accept"))
    for r in ranges:
        if r.type in ("*/*", "image/*"):
            return JPEG
        if r.matches(DICOM):
            return DICOM
        for media_type in RENDERED_MEDIA_TYPES:
            if r.matches(media_type):
                return media_type
    raise web.HTTPNotAcceptable(reason=f"WADO-URI answers {DICOM}, " + ", ".join(RENDERED_MEDIA_TYPES))


def _positive(request: web.Request, name: str) -> int | None:
    text = request.query.get(name)
    if text is None or text == "":
        return None
    try:
        value = int(text)
    except ValueError:
        raise dicomweb.bad_request(f"{name} must be a positive integer") from None
    if value < 1:
        raise dicomweb.bad_request(f"{name} must be a positive integer")
    return value


def rendering_from_query(request: web.Request, media_type: str) -> tuple[int, Rendering]:
    q = request.query
    if q.get("anonymize", "").strip().lower() == "yes":
        raise dicomweb.bad_request("anonymize=yes is not supported: this server does not de-identify")
    frame = _positive(request, "frameNumber") or 1
    rows, columns = _positive(request, "rows"), _positive(request, "columns")
    window = None
    if ("windowCenter" in q) != ("windowWidth" in q):
        raise dicomweb.bad_request("windowCenter and windowWidth go together (PS3.18 9.4.1)")
    try:
        if "windowCenter" in q:
            window = Window(float(q["windowCenter"]), float(q["windowWidth"]))
        region = None
        if "region" in q:
            parts = tuple(float(p) for p in q["region"].split(","))
            if len(parts) != 4:
                raise RenderError("region must be x1,y1,x2,y2")
            region = (parts[0], parts[1], parts[2], parts[3])
        return frame, Rendering(
            media_type=media_type, window=window, region=region,
            viewport=Viewport(columns, rows) if rows or columns else None,
            quality=_positive(request, "imageQuality") or 90)
    except ValueError as exc:
        raise dicomweb.bad_request(f"not a number: {exc}") from exc
    except RenderError as exc:
        raise dicomweb.bad_request(str(exc)) from exc


async def wado(request: web.Request) -> web.Response:
    if _required(request, "requestType") != "WADO":
        raise dicomweb.bad_request("requestType must be WADO")
    study, series, sop = _uid(request, "studyUID"), _uid(request, "seriesUID"), _uid(request, "objectUID")
    media_type = choose_content_type(request)
    if media_type == DICOM:
        present = [p for p in _RENDER_ONLY if p in request.query]
        if present:
            raise dicomweb.bad_request(f"{', '.join(present)} apply to rendered media types, not {DICOM}")
        syntax = request.query.get("transferSyntax", _EXPLICIT_VR_LITTLE_ENDIAN).strip()
        if syntax != "*" and not _UID.match(syntax):
            raise dicomweb.bad_request(f"transferSyntax {syntax!r} is not a UID")
        located = await rendered.locate_instance(request, study, series, sop)
        data = await rendered.fetch(request, located)
        if syntax not in ("*", located.transfer_syntax_uid):
            if syntax not in NATIVE_TRANSFER_SYNTAXES:
                # PS3.18 9.4.2.4: a valid transfer syntax the server does not produce is 406
                raise web.HTTPNotAcceptable(
                    reason=f"transfer syntax {syntax} not available; stored as {located.transfer_syntax_uid}",
                    text=f"available: *, {located.transfer_syntax_uid}, {', '.join(NATIVE_TRANSFER_SYNTAXES)}\n")
            try:
                data = await rendered.run_in_pool(request, transcode_native, data, syntax)
            except RenderError as exc:
                raise rendered.render_error(exc) from exc
        return web.Response(body=data, content_type=DICOM, headers=rendered.RENDERED_HEADERS)
    frame, rendering = rendering_from_query(request, media_type)
    located = await rendered.locate_instance(request, study, series, sop)
    images = await rendered.render_located(request, located, [frame], rendering)
    headers = dict(rendered.RENDERED_HEADERS)
    if "presentationUID" in request.query:
        headers["Warning"] = '299 vna "presentationUID ignored: presentation states are not applied"'
    return web.Response(body=images[0], content_type=media_type, headers=headers)


def add_routes(app: web.Application, settings: DicomwebSettings) -> None:
    app.router.add_get("/wado", wado)
    if settings.root.rstrip("/"):
        app.router.add_get(f"{settings.root.rstrip('/')}/wado", wado)
