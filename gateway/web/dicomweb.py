"""DICOMweb routes (PS3.18) under the configured root, and what every handler shares."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from archive.attributes import Level
from archive.config import DicomwebSettings
from archive.errors import RemoteError
from archive.jsontext import ascii_json, dumps_bytes
from archive.services import ArchiveServices
from gateway.web.media import parse_accept
from gateway.web.qido import QidoError, build_search

SERVICES_KEY = web.AppKey("services", ArchiveServices)
SETTINGS_KEY = web.AppKey("dicomweb_settings", DicomwebSettings)
DB_TIMEOUT = 30.0

STUDY_UID, SERIES_UID, SOP_UID = 0x0020000D, 0x0020000E, 0x00080018
_DICOM_JSON = "application/dicom+json"


def bad_request(reason: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(reason=reason.replace("\n", " ")[:200], text=reason + "\n")


def base_url(request: web.Request) -> str:
    """Where clients reach the DICOMweb root: the configured public URL, else this request's origin."""
    settings = request.app[SETTINGS_KEY]
    if settings.public_base_url:
        return settings.public_base_url.rstrip("/")
    return f"{request.scheme}://{_host_with_port(request)}{settings.root}"


def _host_with_port(request: web.Request) -> str:
    """The Host header, with the port the client connected to when it left it out.

    dicomweb-client (0.61.2) sends `Host: 127.0.0.1` for `http://127.0.0.1:8080/...` (RFC 9110 7.2 wants
    the port), so URIs built from the header would point at port 80. A client that names this socket's
    own address (or localhost) connected to us directly, not through a proxy, on this socket's port.
    """
    host = request.host
    try:
        has_port = urlsplit(f"//{host}").port is not None
    except ValueError:
        return host
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if has_port or not isinstance(sockname, tuple) or len(sockname) < 2:
        return host
    local_ip, local_port = sockname[0], sockname[1]
    default_port = 443 if request.scheme == "https" else 80
    if host.strip("[]") in (local_ip, "localhost") and local_port != default_port:
        return f"{host}:{local_port}"
    return host


def json_response(payload: Any, *, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=dumps_bytes(payload), content_type=_DICOM_JSON,
                        headers=headers)


def _accepts_json(request: web.Request) -> bool:
    return any(r.matches(_DICOM_JSON) or r.matches("application/json") for r in parse_accept(
        request.headers.get("Accept")))


async def search(request: web.Request, level: Level) -> web.Response:
    """QIDO-RS at `level`, restricted by the UIDs in the path (PS3.18 10.6.1)."""
    if not _accepts_json(request):
        raise web.HTTPNotAcceptable(reason="QIDO-RS answers application/dicom+json")
    path_uids = {}
    if "study" in request.match_info:
        path_uids[STUDY_UID] = request.match_info["study"]
    if "series" in request.match_info:
        path_uids[SERIES_UID] = request.match_info["series"]
    try:
        found = build_search(level, request.query.items(), path_uids)
    except QidoError as exc:
        raise bad_request(str(exc)) from exc
    services = request.app[SERVICES_KEY]
    try:
        # the JSON array text as PostgreSQL built it: no row is decoded and re-encoded here
        answer = await services.index.find_json(found.query, timeout=DB_TIMEOUT)
    except RemoteError as exc:
        raise web.HTTPServiceUnavailable(reason="index unavailable", text=str(exc)) from exc
    headers = {}
    if found.warnings:
        # PS3.18 8.3.4.4: Warning 299 names what was ignored
        headers["Warning"] = ", ".join(f'299 vna "{w}"' for w in found.warnings)[:4000]
    return web.Response(body=ascii_json(answer).encode(), content_type=_DICOM_JSON, headers=headers)


def _searcher(level: Level):  # type: ignore[no-untyped-def]
    async def handler(request: web.Request) -> web.Response:
        return await search(request, level)
    return handler


def add_routes(app: web.Application, settings: DicomwebSettings) -> None:
    root = settings.root
    r = app.router
    r.add_get(f"{root}/studies", _searcher(Level.STUDY))
    r.add_get(f"{root}/series", _searcher(Level.SERIES))
    r.add_get(f"{root}/instances", _searcher(Level.IMAGE))
    r.add_get(f"{root}/studies/{{study}}/series", _searcher(Level.SERIES))
    r.add_get(f"{root}/studies/{{study}}/instances", _searcher(Level.IMAGE))
    r.add_get(f"{root}/studies/{{study}}/series/{{series}}/instances", _searcher(Level.IMAGE))
    from gateway.web import wado  # imported here: wado uses this module's keys and helpers
    wado.add_routes(app, settings)
    from gateway.web import delete, stow  # here: both use this module's keys
    stow.add_routes(app, settings)
    delete.add_routes(app, settings)
    from gateway.web import rendered  # here: rendered resources and WADO-URI use this module's keys
    rendered.add_routes(app, settings)
