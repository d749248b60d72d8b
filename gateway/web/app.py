"""The HTTP side: health, readiness, Prometheus metrics and the DICOMweb routes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

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
    body = generate_latest(request.app[METRICS_KEY].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


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


def build_app(metrics_: Metrics, ready: Callable[[], bool], services: ArchiveServices | None = None,
              settings: DicomwebSettings | None = None) -> web.Application:
    settings = settings or DicomwebSettings()
    app = web.Application(middlewares=[cors_middleware(settings.cors_origins)],
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
    return app
