"""The HTTP side: health, readiness and Prometheus metrics (DICOMweb mounts here too)."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from metrics.registry import Metrics

READY_KEY = web.AppKey("ready", Callable[[], bool])
METRICS_KEY = web.AppKey("metrics", Metrics)


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


def build_app(metrics_: Metrics, ready: Callable[[], bool]) -> web.Application:
    app = web.Application()
    app[READY_KEY] = ready
    app[METRICS_KEY] = metrics_
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
