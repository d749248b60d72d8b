"""Wiring one vna process together: database, stores, index, servers; and taking it apart again.

`Runtime` pairs every setup with its teardown (the order of `AsyncExitStack`), so a failed start
and a SIGTERM both leave nothing behind: readiness false, stop listening, drain associations and
requests (bounded), close the pool, stop the embedded PostgreSQL if we started it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from archive.config import Settings, StorageBackend
from archive.database import create_pool, migrate
from archive.embedded_pg import EmbeddedPostgres
from archive.index import Index
from archive.ingest import Ingestor, sweep_orphans
from archive.objectstore import ObjectStore
from archive.moves import Mover
from archive.policy import load_policy
from archive.errors import VnaError
from archive.services import ArchiveServices
from archive.stores import StoreRegistry, filesystem_store, open_stores
from gateway.dimse.server import DimseServer
from gateway.web.app import build_app
from metrics.registry import Metrics

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def database_url(settings: Settings) -> AsyncIterator[str]:
    """The configured database URL, or the embedded PostgreSQL's (started here, stopped on exit)."""
    if settings.database.url:
        yield settings.database.url
        return
    pg = EmbeddedPostgres(settings.data_dir)
    url = await asyncio.to_thread(pg.ensure_running)
    try:
        yield url
    finally:
        await asyncio.to_thread(pg.stop)


@contextlib.asynccontextmanager
async def build_store(settings: Settings) -> AsyncIterator[ObjectStore]:
    """The configured object store; a RADOS store's connection is flushed and shut down on exit."""
    if settings.storage.backend is StorageBackend.rados:
        from archive.rados_store import RadosStore  # librados only when configured
        store = await RadosStore.open(settings.storage.rados, digest=settings.storage.digest)
        try:
            yield store
        finally:
            await store.close()
        return
    yield filesystem_store(settings)


@contextlib.asynccontextmanager
async def open_index(settings: Settings) -> AsyncIterator[Index]:
    """A migrated index on a fresh pool (used by the server and by the CLI's admin commands)."""
    async with database_url(settings) as url:
        pool = await create_pool(url, min_size=settings.database.pool_min, max_size=settings.database.pool_max,
                                 command_timeout=settings.database.command_timeout)
        try:
            async with pool.acquire() as conn:
                applied = await migrate(conn)
            if applied:
                log.info("applied migrations %s", applied)
            yield Index(pool)
        finally:
            await pool.close()


@dataclass(frozen=True, slots=True)
class Ports:
    dicom: int
    http: int


def write_ports(data_dir: Path, ports: Ports) -> None:
    """<data_dir>/ports.json, for whoever started us with port 0. Written whole, then renamed: whoever polls
    for the file never reads it empty or half written."""
    tmp = data_dir / "ports.json.tmp"
    tmp.write_text(json.dumps({"dicom": ports.dicom, "http": ports.http}))
    os.replace(tmp, data_dir / "ports.json")


class Runtime:
    """A running vna: `async with Runtime(settings) as rt: await rt.wait_for_stop()`."""

    def __init__(self, settings: Settings, *, listen: bool = True, background: bool = True) -> None:
        """`listen`: bind the DICOM and HTTP ports; False in a worker (gateway/workers.py), which serves the
        connections handed to `adopt`. `background`: run the orphan sweeper and the policy mover here (in
        one worker of several: they are safe to run anywhere, but once is enough)."""
        self.settings = settings
        self.metrics = Metrics()
        self._listen = listen
        self._background = background
        self._runner: web.AppRunner | None = None
        self._dimse: DimseServer | None = None
        self._adopting: set[asyncio.Task[object]] = set()
        self.ready = False
        self.ports: Ports | None = None
        self._stack = contextlib.AsyncExitStack()
        self._stop = asyncio.Event()
        self.stores: StoreRegistry | None = None
        self._reloads: set[asyncio.Task[bool]] = set()

    def request_stop(self) -> None:
        self.ready = False
        self._stop.set()

    async def wait_for_stop(self) -> None:
        await self._stop.wait()

    async def __aenter__(self) -> "Runtime":
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.ready = False
        await self._stack.aclose()

    async def _start(self) -> None:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        index = await self._stack.enter_async_context(open_index(s))
        policy = load_policy(s.storage.policy_file) if s.storage.policy_file else None
        stores = self.stores = await self._stack.enter_async_context(open_stores(s, policy))
        store = stores.default.store
        ingestor = Ingestor(index, store, s.ingest, self.metrics, db_timeout=s.database.command_timeout,
                            stores=stores)
        services = ArchiveServices(index=index, store=store, ingestor=ingestor, stores=stores)

        runner = web.AppRunner(build_app(self.metrics, lambda: self.ready, services, s.dicomweb,
                                         viewer_dir=s.http.viewer_dir), handle_signals=False,
                               shutdown_timeout=s.http.drain_timeout,
                               access_log=logging.getLogger("aiohttp.access") if s.http.access_log else None)
        await runner.setup()
        self._runner = runner
        self._stack.push_async_callback(runner.cleanup)
        dimse = self._dimse = DimseServer(s, services, self.metrics)
        self._stack.push_async_callback(dimse.close, drain_timeout=s.http.drain_timeout)

        if self._background:
            sweeper = asyncio.create_task(self._sweep_forever(index, stores))
            self._stack.callback(sweeper.cancel)
            if s.storage.moves.interval_seconds > 0:
                mover = asyncio.create_task(self._apply_policy_forever(index, stores))
                self._stack.callback(mover.cancel)
        if not self._listen:
            self.ready = True
            return

        site = web.TCPSite(runner, s.http.host, s.http.port, reuse_address=True)
        await site.start()
        http_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        dicom_port = await dimse.start()

        self.ports = Ports(dicom=dicom_port, http=http_port)
        write_ports(s.data_dir, self.ports)
        loop = type(asyncio.get_running_loop())
        log.info("vna %s listening: DICOM port %d, HTTP port %d, data in %s, event loop %s.%s", s.ae_title,
                 dicom_port, http_port, s.data_dir, loop.__module__, loop.__qualname__)
        self.ready = True

    def adopt(self, service: str, sock: socket.socket) -> None:
        """Serve a connection accepted elsewhere (the workers' primary process): `service` "http" or "dicom"."""
        if self._runner is None or self._dimse is None or self._runner.server is None or \
                (service != "http" and not self.ready):
            # not started or already stopped; and no new association while draining (a single process stops
            # listening on the DICOM port), while HTTP is answered (/readyz 503) until the end of the drain
            sock.close()
            return
        loop = asyncio.get_running_loop()
        if service == "http":
            task = loop.create_task(loop.connect_accepted_socket(self._runner.server, sock))
        else:
            task = loop.create_task(self._dimse.adopt(sock))
        self._adopting.add(task)
        task.add_done_callback(self._adopted)

    def _adopted(self, task: asyncio.Task[object]) -> None:
        self._adopting.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("could not serve a handed-over connection: %s", task.exception())

    async def reload_policy(self) -> bool:
        """Read storage.policy_file again and switch to it (SIGHUP). An invalid file, or one naming a pool that
        does not exist, is logged and the policy in force kept; True when the new one is in force."""
        path = self.settings.storage.policy_file
        if self.stores is None or path is None:
            log.warning("SIGHUP: no storage.policy_file configured, nothing to reload")
            return False
        try:
            policy = await asyncio.to_thread(load_policy, path)
            await self.stores.reload(policy)
        except VnaError as exc:
            log.error("policy %s not reloaded, the previous one stays in force: %s", path, exc)
            return False
        log.info("policy %s reloaded: classes %s, %d rules", path, ", ".join(policy.classes), len(policy.rules))
        return True

    def request_policy_reload(self) -> None:
        """For a signal handler: reload the policy in a task of its own."""
        task = asyncio.get_running_loop().create_task(self.reload_policy())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def _apply_policy_forever(self, index: Index, stores: StoreRegistry) -> None:
        """storage.moves.interval_seconds > 0: move what the policy's rules and lifecycle say (archive/moves.py)."""
        m = self.settings.storage.moves
        mover = Mover(index.pool, stores, self.metrics, grace_seconds=m.grace_seconds,
                      rate_bytes_per_s=m.rate_mb_per_s * 1e6 or None, concurrency=m.concurrency,
                      db_timeout=self.settings.database.command_timeout)
        while True:
            await asyncio.sleep(m.interval_seconds)
            try:
                report = await mover.run(wait_for_grace=False)
                if report.moved or report.failed or report.abandoned:
                    log.info("storage policy applied: %s", report.summary())
            except VnaError as exc:
                log.warning("storage policy not applied: %s", exc)

    async def _sweep_forever(self, index: Index, stores: StoreRegistry) -> None:
        grace = self.settings.ingest.orphan_grace_seconds
        while True:
            for store in stores.sweep_stores():  # every pool of every storage class
                try:
                    removed = await sweep_orphans(index, store, grace_seconds=grace, metrics=self.metrics)
                    if removed:
                        log.info("removed %d orphaned objects from %s", removed, getattr(store, "pool", store.name))
                except VnaError as exc:
                    log.warning("orphan sweep failed: %s", exc)
            await asyncio.sleep(max(grace / 2, 30.0))
