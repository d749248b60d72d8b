"""DELETE of a study, a series or an instance under the DICOMweb root.

Not a PS3.18 transaction: the resource paths are the Studies Service's (PS3.18 10.4.1), the method is
HTTP's (RFC 9110 9.3.5), as dcm4chee, Orthanc and dicomweb-client's `delete_*` use them.

Order, so that nothing is visible half-deleted: the index rows go first, in one transaction with the
series, studies and patients left empty; then the objects. A crash or a store error in between leaves
objects no index row names, which the orphan sweeper removes (archive/ingest.py `sweep_orphans`).

204 No Content when something was deleted; 404 when nothing matches the path (an unknown UID, or an
instance that is not in that series of that study); 405 with an Allow header when deleting is disabled
(`dicomweb.allow_delete`); 503 when the index cannot be reached.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from archive.config import DicomwebSettings
from archive.errors import RemoteError, VnaError
from archive.stores import StoreRegistry
from gateway.web.dicomweb import DB_TIMEOUT, SERVICES_KEY, SETTINGS_KEY

log = logging.getLogger(__name__)

STORE_TIMEOUT = 60.0
_PARALLEL_DELETES = 16


def _target(request: web.Request) -> str:
    info = request.match_info
    return "/".join(f"{level} {info[key]}" for level, key in (("study", "study"), ("series", "series"),
                                                              ("instance", "sop")) if key in info)


async def delete_resource(request: web.Request) -> web.Response:
    """Delete what the path names: `studies/{study}[/series/{series}[/instances/{sop}]]`."""
    if not request.app[SETTINGS_KEY].allow_delete:
        allowed = ["GET", "HEAD"] + (["POST"] if set(request.match_info) == {"study"} else [])
        reason = "deleting is disabled on this archive (dicomweb.allow_delete is false)"
        raise web.HTTPMethodNotAllowed("DELETE", allowed, reason=reason, text=reason + "\n")
    services = request.app[SERVICES_KEY]
    info = request.match_info
    try:
        objects = await services.index.delete_instances(info["study"], info.get("series"), info.get("sop"),
                                                        timeout=DB_TIMEOUT)
    except RemoteError as exc:
        raise web.HTTPServiceUnavailable(reason="index unavailable", text=f"{exc}\n") from exc
    if not objects:
        reason = f"no stored instance matches {_target(request)}"
        raise web.HTTPNotFound(reason=reason[:200], text=reason + "\n")
    await _delete_objects(services.stores, objects)
    return web.Response(status=204)


async def _delete_objects(stores: StoreRegistry, objects: list[tuple[str, str]]) -> None:
    """Delete the objects the index no longer names; a failure is logged and left to the orphan sweeper."""
    gate = asyncio.Semaphore(_PARALLEL_DELETES)

    async def delete_one(store_name: str, location: str) -> None:
        async with gate:
            try:
                await stores.for_location(store_name, location).delete(location, timeout=STORE_TIMEOUT)
            except VnaError as exc:
                log.warning("could not delete object %s (the orphan sweeper will): %s", location, exc)

    await asyncio.gather(*(delete_one(s, loc) for s, loc in objects))


def add_routes(app: web.Application, settings: DicomwebSettings) -> None:
    root = settings.root
    app.router.add_delete(f"{root}/studies/{{study}}", delete_resource)
    app.router.add_delete(f"{root}/studies/{{study}}/series/{{series}}", delete_resource)
    app.router.add_delete(f"{root}/studies/{{study}}/series/{{series}}/instances/{{sop}}", delete_resource)
