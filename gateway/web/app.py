"""The HTTP side: health, readiness, Prometheus metrics and the DICOMweb routes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from archive.config import DicomwebSettings
from archive.services import ArchiveServices
from gateway.web import dicomweb
from metrics.registry import Metrics

READY_KEY = web.AppKey("ready", Callable[[], bool])
METRICS_KEY = web.AppKey("metrics", Metrics)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def livez(request: web.Request) -> web.Response:
    """Liveness: the event loop answers."""
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    """Readiness: false while starting and while draining (Kubernetes stops sending traffic)."""
    if request.app[READY_KEY]():
        return web.Response(text="ready\n")
    return web.Response(status=503, text="not ready\n")


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS_KEY].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def metrics_middleware(metrics_: Metrics):  # type: ignore[no-untyped-def]
    """Count and time every request by its route pattern (bounded label values), and keep the number in
    flight: with http.access_log off (the default) these are the record of HTTP traffic."""
    inflight = metrics_.inflight.labels("http")

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        started = time.perf_counter()
        status = 500
        inflight.inc()
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away before the answer (nginx's "client closed request")
            raise
        finally:
            inflight.dec()
            metrics_.http_requests.labels(route, request.method, f"{status // 100}xx").inc()
            metrics_.http_latency.labels(route).observe(time.perf_counter() - started)

    return middleware


def cors_middleware(origins: tuple[str, ...]):  # type: ignore[no-untyped-def]
    """CORS (Fetch standard) for browser viewers served from another origin; preflights answered here."""
    allow_any = "*" in origins

    def allowed(origin: str | None) -> str | None:
        if origin is None:
            return None
        return "*" if allow_any else (origin if origin in origins else None)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = allowed(request.headers.get("Origin"))
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            headers = {}
            if origin:
                headers = {
                    "Access-Control-Allow-Origin": origin,
                    "Access-Control-Allow-Methods": "GET, HEAD, POST, DELETE, OPTIONS",
                    "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers", "*"),
                    "Access-Control-Max-Age": "86400",
                }
            return web.Response(status=204, headers=headers)
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if origin:
                exc.headers["Access-Control-Allow-Origin"] = origin
            raise
        if origin and not response.prepared:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = "Warning, Content-Location, Content-Type"
        return response

    return middleware


def add_viewer_routes(app: web.Application, viewer_dir: Path, reserved: tuple[str, ...]) -> None:
    """Serve a built single-page viewer (e.g. OHIF v3's dist/) same-origin at "/", after all other routes.

    At "/" because OHIF's published dist/ is built for the site root: index.html loads /app-config.js
    and webpack's public path is "/". Files under `viewer_dir` are served as they are; any other path
    whose last segment has no file extension gets index.html, as the viewer routes client-side
    (/viewer?StudyInstanceUIDs=...). Paths under `reserved` (DICOMweb root, /wado, health, metrics)
    never get the viewer, so an unknown DICOMweb URL is still a 404. Registered last: the routes
    added before it match first.
    """
    root = viewer_dir.resolve()
    index_html = root / "index.html"
    prefixes = tuple(p.rstrip("/") for p in reserved if p.strip("/"))

    def locate(rel: str) -> Path | None:
        target = (root / rel).resolve()
        if target.is_relative_to(root) and target.is_file():
            return target
        if "." in rel.rsplit("/", 1)[-1]:
            return None  # a missing asset: 404, not the app
        return index_html

    async def serve(request: web.Request) -> web.StreamResponse:
        path = request.path
        if any(path == p or path.startswith(p + "/") for p in prefixes):
            raise web.HTTPNotFound()
        target = await asyncio.to_thread(locate, request.match_info["path"])
        if target is None:
            raise web.HTTPNotFound()
        # index.html names the hashed bundles of this build: revalidate it, so an upgrade is picked up
        headers = {"Cache-Control": "no-cache"} if target == index_html else None
        return web.FileResponse(target, headers=headers)

    app.router.add_get("/{path:.*}", serve)


def build_app(metrics_: Metrics, ready: Callable[[], bool], services: ArchiveServices | None = None,
              settings: DicomwebSettings | None = None, *, viewer_dir: Path | None = None) -> web.Application:
    settings = settings or DicomwebSettings()
    app = web.Application(middlewares=[metrics_middleware(metrics_), cors_middleware(settings.cors_origins)],
                          client_max_size=settings.max_stow_bytes)
    app[READY_KEY] = ready
    app[METRICS_KEY] = metrics_
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    if services is not None:
        app[dicomweb.SERVICES_KEY] = services
        app[dicomweb.SETTINGS_KEY] = settings
        dicomweb.add_routes(app, settings)
    if viewer_dir is not None:
        add_viewer_routes(app, viewer_dir, reserved=(settings.root, "/wado", "/livez", "/readyz", "/metrics"))
    return app
