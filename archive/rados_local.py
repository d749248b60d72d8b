"""RADOS reads through librados' C API: the manifest and the head of an object in one round trip, and,
when asked, each read served by the copy nearest to this client in the CRUSH tree.

One round trip: python3-rados 16.2 has no read step in its ReadOp and no asynchronous getxattr, so reading
an object took two round trips (the manifest xattr through a worker thread, then aio_read). Here one read
operation carries both steps (rados_read_op_getxattrs + rados_read_op_read of the first `length` bytes),
which is the whole object for most DICOM instances.

Localized reads: librados sends a read to the object's primary OSD unless the operation carries
LIBRADOS_OPERATION_LOCALIZE_READS: then the client picks, among the OSDs holding the object, the one that
shares the deepest CRUSH bucket with its own `crush_location` (e.g. "datacenter=dc-b host=h3"), so a vna in
dc-b reads the dc-b copy of a pool with one copy per datacentre. A copy that cannot serve the read yet (the
last write to the object not yet known to be committed everywhere) sends it back to the primary: reads stay
consistent. (storage.rados.crush_location, storage.rados.localize_reads.)

This module drives librados' C API through ctypes: a client of its own (rados_t) configured as
RadosConnection's (plus `crush_location`), one I/O context per pool, and one read operation per call,
completed asynchronously (the completion callback, on a librados thread, resolves an asyncio future with
call_soon_threadsafe). Only reads go through it; writes, deletes and listings keep using RadosConnection.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import threading
import time
from typing import Any

import numpy as np

from archive.config import RadosSettings
from archive.errors import ConfigError, StorageError

LOCALIZE_READS = 2  # LIBRADOS_OPERATION_LOCALIZE_READS (librados.h)
_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)


class ReadError(StorageError):
    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.errno = code


def _error(code: int, what: str) -> ReadError:
    return ReadError(f"RADOS {what}: {errno.errorcode.get(code, str(code))} ({os.strerror(code)})", code)


def _load() -> Any:
    try:
        lib = ctypes.CDLL("librados.so.2")
    except OSError as exc:
        raise ConfigError(f"storage.backend rados needs librados.so.2 (apt-get install librados2): {exc}") from exc
    lib.rados_create_read_op.restype = ctypes.c_void_p
    lib.rados_create2.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint64]
    lib.rados_conf_read_file.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.rados_conf_set.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]
    lib.rados_connect.argtypes = [ctypes.c_void_p]
    lib.rados_shutdown.argtypes = [ctypes.c_void_p]
    lib.rados_ioctx_create.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
    lib.rados_ioctx_destroy.argtypes = [ctypes.c_void_p]
    lib.rados_release_read_op.argtypes = [ctypes.c_void_p]
    lib.rados_read_op_read.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p,
                                       ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_int)]
    lib.rados_read_op_getxattrs.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                                            ctypes.POINTER(ctypes.c_int)]
    lib.rados_getxattrs_next.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_char_p),
                                         ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t)]
    lib.rados_getxattrs_end.argtypes = [ctypes.c_void_p]
    lib.rados_aio_create_completion2.argtypes = [ctypes.c_void_p, _CALLBACK, ctypes.POINTER(ctypes.c_void_p)]
    lib.rados_aio_read_op_operate.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p,
                                              ctypes.c_int]
    lib.rados_aio_get_return_value.argtypes = [ctypes.c_void_p]
    lib.rados_aio_release.argtypes = [ctypes.c_void_p]
    return lib


class RadosReader:
    """A second librados client for reads (see the module docstring); with `localize`, every read carries
    LIBRADOS_OPERATION_LOCALIZE_READS."""

    def __init__(self, settings: RadosSettings, *, localize: bool = False) -> None:
        self.settings = settings
        self._flags = LOCALIZE_READS if localize else 0
        self._lib = _load()
        self._cluster = ctypes.c_void_p()
        self._ioctxs: dict[str, ctypes.c_void_p] = {}
        self._pending: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[int]]] = {}
        self._lock = threading.Lock()
        self._callback = _CALLBACK(self._complete)  # kept alive as long as librados may call it
        self._closed = False
        lib = self._lib
        name = settings.client_name.encode()
        if lib.rados_create2(ctypes.byref(self._cluster), b"ceph", name, 0) != 0:
            raise ConfigError("storage.rados: cannot create a librados client")
        conffile = str(settings.conffile) if settings.conffile else os.environ.get("CEPH_CONF", "")
        if conffile and lib.rados_conf_read_file(self._cluster, conffile.encode()) != 0:
            raise ConfigError(f"cannot use the Ceph configuration {conffile}")
        t = str(settings.op_timeout).encode()
        conf = {b"rados_osd_op_timeout": t, b"rados_mon_op_timeout": t, b"client_mount_timeout": t}
        if settings.keyring is not None:
            conf[b"keyring"] = str(settings.keyring).encode()
        if settings.crush_location:
            conf[b"crush_location"] = settings.crush_location.encode()
        for key, value in conf.items():
            if lib.rados_conf_set(self._cluster, key, value) != 0:
                raise ConfigError(f"storage.rados: librados refuses {key.decode()} = {value.decode()!r}")

    async def connect(self) -> None:
        rv = await asyncio.to_thread(self._lib.rados_connect, self._cluster)
        if rv != 0:
            raise _error(-rv, f"connect as {self.settings.client_name} (reads)")

    async def _ioctx(self, pool: str) -> ctypes.c_void_p:
        if (io := self._ioctxs.get(pool)) is not None:
            return io
        io = ctypes.c_void_p()
        rv = await asyncio.to_thread(self._lib.rados_ioctx_create, self._cluster, pool.encode(), ctypes.byref(io))
        if rv != 0:
            raise _error(-rv, f"open pool {pool!r}")
        return self._ioctxs.setdefault(pool, io)

    def _complete(self, completion: int | None, _arg: int | None) -> None:
        # on a librados thread: never raise
        with self._lock:
            entry = self._pending.pop(completion or 0, None)
        if entry is None:
            return
        loop, fut = entry
        rv = self._lib.rados_aio_get_return_value(completion)
        try:
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(rv))
        except RuntimeError:
            pass  # the loop has closed

    async def _operate(self, pool: str, name: str, build: Any, what: str) -> Any:
        """Run one read operation that `build(op)` fills in; return build's result after it ran."""
        if self._closed:
            raise StorageError("RADOS connection closed")
        lib = self._lib
        io = await self._ioctx(pool)
        op = lib.rados_create_read_op()
        completion = ctypes.c_void_p()
        try:
            finish = build(op)
            if lib.rados_aio_create_completion2(None, self._callback, ctypes.byref(completion)) != 0:
                raise StorageError(f"RADOS {what}: cannot create a completion")
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[int] = loop.create_future()
            with self._lock:
                self._pending[completion.value or 0] = (loop, fut)
            rv = lib.rados_aio_read_op_operate(op, io, completion, name.encode(), self._flags)
            if rv != 0:
                with self._lock:
                    self._pending.pop(completion.value or 0, None)
                raise _error(-rv, what)
            try:
                # the op ends within rados_osd_op_timeout; wait for it even if our caller gives up, as librados
                # writes into the buffers until then
                rv = await asyncio.shield(fut)
            except asyncio.CancelledError:
                await asyncio.wait_for(asyncio.shield(fut), self.settings.op_timeout + 5)
                raise
            if rv < 0:
                raise _error(-rv, what)
            return finish()
        finally:
            if completion.value:
                lib.rados_aio_release(completion)
            lib.rados_release_read_op(op)

    async def read(self, pool: str, name: str, length: int, offset: int = 0) -> bytes:
        """Up to `length` bytes of object `name` from `offset`."""
        return (await self._read_op(pool, name, length, offset, None))[1]

    async def read_head(self, pool: str, name: str, xattr: str, length: int) -> tuple[bytes | None, bytes]:
        """The extended attribute `xattr` (None if absent) and up to `length` bytes from the start of object
        `name`, in one read operation (one round trip to the primary OSD, or the nearest one)."""
        return await self._read_op(pool, name, length, 0, xattr)

    async def _read_op(self, pool: str, name: str, length: int, offset: int,
                       xattr: str | None) -> tuple[bytes | None, bytes]:
        lib = self._lib
        # uninitialised memory: librados writes the bytes, only the `got` first ones are copied out
        buf = np.empty(max(length, 1), dtype=np.uint8)
        got, read_rv = ctypes.c_size_t(), ctypes.c_int()
        it, xattrs_rv = ctypes.c_void_p(), ctypes.c_int()
        what = f"read {pool}/{name}"

        def build(op: int) -> Any:
            if xattr is not None:
                lib.rados_read_op_getxattrs(op, ctypes.byref(it), ctypes.byref(xattrs_rv))
            if length:
                lib.rados_read_op_read(op, offset, length, buf.ctypes.data, ctypes.byref(got), ctypes.byref(read_rv))

            def finish() -> tuple[bytes | None, bytes]:
                found = None
                if xattr is not None:
                    try:
                        if xattrs_rv.value < 0:
                            raise _error(-xattrs_rv.value, f"read the attributes of {pool}/{name}")
                        while True:
                            key, val, size = ctypes.c_char_p(), ctypes.c_void_p(), ctypes.c_size_t()
                            if lib.rados_getxattrs_next(it, ctypes.byref(key), ctypes.byref(val), ctypes.byref(size)):
                                break
                            if key.value is None:
                                break
                            if key.value.decode() == xattr:
                                found = ctypes.string_at(val, size.value) if size.value else b""
                    finally:
                        if it.value:
                            lib.rados_getxattrs_end(it)
                if not length:
                    return found, b""
                if read_rv.value < 0:
                    raise _error(-read_rv.value, what)
                return found, buf[:got.value].tobytes()
            return finish

        return await self._operate(pool, name, build, what)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + self.settings.op_timeout + 5
        while self._pending and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        ioctxs, self._ioctxs = list(self._ioctxs.values()), {}

        def shutdown() -> None:
            for io in ioctxs:
                self._lib.rados_ioctx_destroy(io)
            self._lib.rados_shutdown(self._cluster)

        await asyncio.to_thread(shutdown)
