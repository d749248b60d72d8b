"""`vna serve` with several worker processes (the `workers` setting).

One Python process runs its event loop, and all the Python code of its requests, on about one core. With
`workers` > 1 the serving process becomes a primary that:
- starts the embedded PostgreSQL when no database.url is given (the workers apply the migrations, under the
  advisory lock that makes that safe for any number of replicas);
- binds the DICOM and HTTP ports and writes ports.json;
- starts the workers, each a whole vna (`Runtime(listen=False)`: its own event loop, pool, stores, GIL)
  without listening sockets of its own, and restarts one that dies;
- accepts every connection and hands it to the next worker in turn, as a file descriptor over a Unix
  socket (SCM_RIGHTS), as Node's cluster module does. With SO_REUSEPORT the kernel would hash connections
  onto workers, and a few long-lived connections (a PACS's associations, a load tester's keep-alive
  clients) would often all land on one;
- forwards SIGTERM and SIGHUP (policy reload) to the workers. On SIGTERM it closes the DICOM port first and
  keeps handing over HTTP connections until the workers have drained, so that /readyz answers 503 meanwhile
  as a single process's does (`Primary.stop`).

A worker dies with its primary (PR_SET_PDEATHSIG): a kill -9 of `vna serve` takes the whole server down at
once, as the end of a container's main process does, and nothing acknowledged is lost either way.
The orphan sweeper and the policy mover run in worker 0 only. Prometheus metrics are summed over the
workers (metrics/registry.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import multiprocess

from archive.config import Settings
from gateway.process import configure_process, run_loop, settle_gc
from gateway.runtime import Ports, Runtime, database_url, write_ports
from metrics.registry import MULTIPROCESS_DIR

log = logging.getLogger("vna.workers")

# the one byte sent with each handed-over connection, and a worker's "ready"
SERVICES = {b"h": "http", b"d": "dicom"}
_READY = b"R"
_SETTINGS_ENV = "VNA_WORKER_SETTINGS"
_START_TIMEOUT = 120.0
_PR_SET_PDEATHSIG = 1


def available_cpus() -> int:
    """CPUs this process may run on: its affinity, bounded by a cgroup v2 CPU quota (a container's limit)."""
    count = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    return count


# `workers: 0` starts at most this many: each worker has its own pool (database.pool_max connections), and
# the embedded PostgreSQL allows 200 connections
AUTO_WORKERS_MAX = 8


def worker_count(settings: Settings) -> int:
    return settings.workers or min(available_cpus(), AUTO_WORKERS_MAX)


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket as aiohttp and asyncio would bind it (SO_REUSEADDR; "::" is dual-stack)."""
    if ":" in host:
        sock = socket.create_server((host, port), family=socket.AF_INET6, backlog=1024,
                                    dualstack_ipv6=host == "::" and socket.has_dualstack_ipv6())
    else:
        sock = socket.create_server((host, port), backlog=1024)
    sock.setblocking(False)
    return sock


class RoundRobin:
    """The order in which workers get connections: the next one after the last, skipping those that cannot
    take one now."""

    def __init__(self) -> None:
        self._next = 0

    def order(self, count: int) -> list[int]:
        start = self._next % count if count else 0
        self._next = start + 1
        return [(start + i) % count for i in range(count)]


@dataclass(eq=False)
class _Worker:
    index: int
    process: asyncio.subprocess.Process
    channel: socket.socket
    watcher: asyncio.Task[None] | None = None


class Primary:
    """The listening sockets, the workers and the hand-over of connections between them."""

    def __init__(self, settings: Settings, count: int, metrics_dir: Path) -> None:
        self.settings = settings
        self.count = count
        self.metrics_dir = metrics_dir
        self.workers: list[_Worker | None] = [None] * count
        self._rr = RoundRobin()
        self._stopping = False
        self._listeners: dict[bytes, tuple[socket.socket, asyncio.Task[None]]] = {}

    async def start_worker(self, index: int) -> _Worker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {**os.environ, MULTIPROCESS_DIR: str(self.metrics_dir),
               _SETTINGS_ENV: self.settings.model_dump_json()}
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway.workers", str(theirs.fileno()), str(index), str(os.getpid()),
                pass_fds=[theirs.fileno()], env=env, stdin=asyncio.subprocess.DEVNULL)
        finally:
            theirs.close()
        ours.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(_START_TIMEOUT):
                hello = await loop.sock_recv(ours, 16)
        except BaseException:
            ours.close()
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise
        if hello != _READY:
            ours.close()
            code = await process.wait()
            raise RuntimeError(f"worker {index} did not start (exit status {code})")
        worker = _Worker(index, process, ours)
        worker.watcher = loop.create_task(self._watch(worker))
        self.workers[index] = worker
        return worker

    async def _watch(self, worker: _Worker) -> None:
        """A worker that dies while we are not stopping is replaced."""
        code = await worker.process.wait()
        worker.channel.close()
        multiprocess.mark_process_dead(worker.process.pid, str(self.metrics_dir))
        if self.workers[worker.index] is worker:
            self.workers[worker.index] = None
        if self._stopping:
            return
        log.error("worker %d (pid %d) exited with status %s; starting another", worker.index, worker.process.pid,
                  code)
        while not self._stopping:
            try:
                await self.start_worker(worker.index)
                return
            except (OSError, RuntimeError, TimeoutError) as exc:
                log.error("worker %d did not start again: %s; retrying in 5 s", worker.index, exc)
                await asyncio.sleep(5)

    def listen(self, sock: socket.socket, service: bytes) -> None:
        task = asyncio.get_running_loop().create_task(self._accept_forever(sock, service))
        self._listeners[service] = (sock, task)

    def close_listener(self, service: bytes) -> None:
        if service in self._listeners:
            sock, task = self._listeners.pop(service)
            task.cancel()
            sock.close()

    async def _accept_forever(self, sock: socket.socket, service: bytes) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:  # e.g. EMFILE: wait a little rather than spin
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            with conn:
                self.hand_over(conn, service)

    def hand_over(self, conn: socket.socket, service: bytes) -> bool:
        """Pass `conn` to the next worker that takes it; the caller closes our copy either way."""
        for i in self._rr.order(self.count):
            worker = self.workers[i]
            if worker is None:
                continue
            try:
                socket.send_fds(worker.channel, [service], [conn.fileno()])
                return True
            except OSError as exc:  # its channel is full or closed (it is exiting)
                log.warning("worker %d could not take a connection: %s", i, exc)
        log.error("no worker could take a connection: closing it")
        return False

    def signal_workers(self, signum: int) -> None:
        for worker in self.workers:
            if worker is not None and worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signum)

    async def stop(self, *, timeout: float) -> None:
        """Stop accepting associations, let every worker drain (bounded), then end them. HTTP connections are
        still handed over meanwhile: the workers answer /readyz with 503 while they drain, as one process
        does, so that a load balancer sees the replica going rather than a closed port."""
        self._stopping = True
        self.close_listener(b"d")
        self.signal_workers(signal.SIGTERM)
        processes = [w.process for w in self.workers if w is not None]
        if processes:
            _, pending = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in processes], timeout=timeout)
            if pending:
                log.warning("%d workers still running after %.0f s: killing them", len(pending), timeout)
                self.signal_workers(signal.SIGKILL)
                await asyncio.wait(pending)
        for service in list(self._listeners):
            self.close_listener(service)
        watchers = [w.watcher for w in self.workers if w is not None and w.watcher is not None]
        if watchers:
            await asyncio.wait(watchers, timeout=5)


async def serve_with_workers(settings: Settings, count: int) -> None:
    """The primary process of `vna serve` with `count` workers, until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    async with database_url(settings) as url:
        # the workers use this database (the embedded one started here), whatever the configuration said
        worker_settings = settings.model_copy(update={"database": settings.database.model_copy(update={"url": url})})
        http = listen_socket(settings.http.host, settings.http.port)
        dicom = listen_socket(settings.dicom.host, settings.dicom.port)
        metrics_dir = Path(tempfile.mkdtemp(prefix="vna-metrics-"))
        primary = Primary(worker_settings, count, metrics_dir)
        stop = asyncio.Event()
        try:
            await asyncio.gather(*(primary.start_worker(i) for i in range(count)))
            primary.listen(http, b"h")
            primary.listen(dicom, b"d")
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            loop.add_signal_handler(signal.SIGHUP, primary.signal_workers, signal.SIGHUP)
            http_port, dicom_port = http.getsockname()[1], dicom.getsockname()[1]
            write_ports(settings.data_dir, Ports(dicom=dicom_port, http=http_port))
            log.info("vna %s listening: DICOM port %d, HTTP port %d, data in %s, %d workers, event loop %s.%s",
                     settings.ae_title, dicom_port, http_port, settings.data_dir, count, type(loop).__module__,
                     type(loop).__qualname__)
            await stop.wait()
            log.info("stopping: draining associations and requests in the workers")
        finally:
            await primary.stop(timeout=settings.http.drain_timeout + 15)
            http.close()
            dicom.close()
            shutil.rmtree(metrics_dir, ignore_errors=True)


# -- the worker side ------------------------------------------------------------------------------

def _die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL when the primary ends, however it ends (prctl PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the primary ended before the prctl
        os._exit(1)


async def serve_worker(settings: Settings, channel: socket.socket, index: int) -> None:
    """One worker: a Runtime without listening sockets, serving the connections the primary sends."""
    loop = asyncio.get_running_loop()
    async with Runtime(settings, listen=False, background=index == 0) as runtime:
        def receive() -> None:
            while True:
                try:
                    message, fds, _flags, _addr = socket.recv_fds(channel, 16, 16)
                except BlockingIOError:
                    return
                except OSError:
                    message, fds = b"", []
                if not message and not fds:  # the primary is gone
                    loop.remove_reader(channel)
                    runtime.request_stop()
                    return
                for kind, fd in zip(message, fds, strict=False):
                    runtime.adopt(SERVICES.get(bytes([kind]), "http"), socket.socket(fileno=fd))

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, runtime.request_stop)
        loop.add_signal_handler(signal.SIGHUP, runtime.request_policy_reload)
        channel.setblocking(False)
        loop.add_reader(channel, receive)
        settle_gc()
        log.info("worker %d (pid %d, CPUs %s) serving, event loop %s.%s", index, os.getpid(),
                 ",".join(map(str, sorted(os.sched_getaffinity(0)))), type(loop).__module__,
                 type(loop).__qualname__)
        channel.send(_READY)
        await runtime.wait_for_stop()
        # leaving this block drains; connections handed over meanwhile are still taken (HTTP answered,
        # associations closed), so the channel is read until the end
    with contextlib.suppress(ValueError, OSError):
        loop.remove_reader(channel)


def worker_cpu(settings: Settings, index: int) -> int | None:
    """The CPU worker `index` runs on (`worker_cpu_affinity`), or None: unpinned. A worker on a CPU of its own
    keeps its caches, and the thread it wakes for a file write starts on that CPU instead of another's, where
    the wake-up costs an inter-processor interrupt; the 2-CPU VM this was measured on stored 10 % more
    instances per second (STOW-RS, docs/performance.md)."""
    cpus = sorted(os.sched_getaffinity(0))
    if not settings.worker_cpu_affinity or worker_count(settings) != len(cpus):
        return None
    return cpus[index % len(cpus)]


def main(argv: list[str]) -> int:
    fd, index, parent = int(argv[0]), int(argv[1]), int(argv[2])
    _die_with_parent(parent)
    settings = Settings.model_validate_json(os.environ.pop(_SETTINGS_ENV))
    cpu = worker_cpu(settings, index)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})  # before any thread starts: they inherit it
    configure_process(settings, name=f"worker-{index}")
    channel = socket.socket(fileno=fd)
    try:
        run_loop(settings, serve_worker(settings, channel, index))
    except KeyboardInterrupt:
        return 130
    finally:
        channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
