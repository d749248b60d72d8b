"""Objects in Ceph RADOS, through librados (Debian's python3-rados), without blocking the event loop.

Layout in a pool, for an object put under `key` (its location is `<pool>/<key>`):
- up to `part_size` bytes: one RADOS object `key` holding the bytes, and its manifest in the extended
  attribute `vna.manifest`, both written by one compound operation (atomic: all or nothing);
- larger: RADOS objects `key.part-0000`, `key.part-0001`, ... (each at most `part_size`, well under the
  OSDs' `osd_max_object_size` of 128 MiB) written first, then `key` holding the manifest as JSON (its
  head, without the list of parts, in `vna.manifest`). Until that last write the object does not exist
  for readers; parts without a manifest are garbage, which `list_older_than` reports to the orphan
  sweeper once they are old enough.

The manifest records the size, the digest of the whole object (`digest`, what the index stores: BLAKE3 or
SHA-256 by `storage.digest`, archive/digest.py) and a CRC-32C of every part (manifest version 2; version 1
had a SHA-256 per part, still read). Every read checks each part it returns (a part is read whole, so a
ranged read costs at most one part beyond the range); a mismatch raises StorageError. CRC-32C (Castagnoli,
what Ceph's BlueStore checks its own blocks with) costs 20 us per 512 KiB with SSE 4.2: it catches
corruption at rest and in transit; the digest of the whole object stays the identity the index and moves
verify.

Writes go through librados aio completions, resolved on the event loop with `call_soon_threadsafe`.
Reads go through `archive.rados_local.RadosReader` (librados' C API): the manifest xattr and the first
`_HEAD_READ` bytes of the object in one read operation, so an instance up to that size is one round trip.
The calls librados has no aio form for (connect, open a pool, list a pool) and hashing of large buffers
run in worker threads. The pool should be vna's own: the orphan sweeper removes any object in it that no index
row names. `rados_osd_op_timeout`/`rados_mon_op_timeout`/`client_mount_timeout` are set to the
configured `op_timeout`, so a dead, stopped or full cluster fails every call with StorageError instead
of hanging it. One `RadosConnection` (one librados client) per process serves every store and pool.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import hashlib
import itertools
import json
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import crc32c

from archive import digest as digests
from archive.config import DigestAlgorithm, RadosSettings
from archive.errors import ConfigError, StorageError
from archive.objectstore import StoredObject
from archive.rados_local import RadosReader

MANIFEST_XATTR = "vna.manifest"
# Note: operate_aio_write_op's default mtime=0 stores an mtime of 1970 (python3-rados 16.2 passes a pointer to 0,
# not NULL), which would make every object look ancient to the orphan sweeper: pass the time explicitly.
_PART_SUFFIX = re.compile(r"\.part-\d{4,}$")
_WRITES_IN_FLIGHT = 4     # parts of one object written at once (each holds up to part_size of memory)
_STATS_IN_FLIGHT = 64     # stats at once while listing a pool
_HASH_INLINE = 64 << 10   # hash smaller buffers on the loop; larger ones in a thread (hashlib drops the GIL)
_CRC_INLINE = 2 << 20     # CRC-32C of smaller buffers on the loop (~40 us per MiB); larger ones in a thread
_HEAD_READ = 2 << 20      # bytes read with the manifest: most instances (CT, MR slices) in one round trip


def part_check(data: bytes | memoryview) -> str:
    """The check of one part as the manifest records it (version 2)."""
    return f"crc32c:{crc32c.crc32c(data):08x}"


def _actual_check(expected: str, data: bytes) -> str:
    if expected.startswith("crc32c:"):
        return part_check(data)
    return "sha256:" + hashlib.sha256(data).hexdigest()  # a version-1 manifest


def part_name(key: str, index: int) -> str:
    return f"{key}.part-{index:04d}"


def split_location(location: str) -> tuple[str, str]:
    pool, sep, key = location.partition("/")
    if not sep or not pool or not key:
        raise StorageError(f"{location!r} is not a RADOS location (<pool>/<key>)")
    return pool, key


@dataclass(frozen=True, slots=True)
class Manifest:
    size: int
    digest: str                      # "<algorithm>:<hex>" over the whole object (archive/digest.py)
    parts: tuple[tuple[int, str], ...]  # (size, "crc32c:<8 hex>" or "sha256:<hex>") of each part, in order
    inline: bool                     # True: the bytes are in `key` itself (one part)
    time: float

    def encode(self) -> bytes:
        parts = []
        for size, check in self.parts:
            algorithm, _, value = check.partition(":")
            parts.append({"size": size, algorithm: value})
        return json.dumps({"v": 2, "size": self.size, "digest": self.digest, "time": self.time,
                           "layout": "inline" if self.inline else "parts", "parts": parts},
                          separators=(",", ":")).encode()

    def head(self, manifest_bytes: int) -> bytes:
        """The xattr of a multi-part object: the manifest without its list of parts (which can be long), and
        the length of the whole manifest, the object's data."""
        return json.dumps({"v": 2, "size": self.size, "digest": self.digest, "time": self.time, "layout": "parts",
                           "manifest_bytes": manifest_bytes}, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes, where: str) -> Manifest:
        try:
            m = json.loads(raw)
            if m.get("v") not in (1, 2):
                raise ValueError(f"unknown manifest version {m.get('v')!r}")
            parts = tuple((int(p["size"]), f"crc32c:{p['crc32c']}" if "crc32c" in p else f"sha256:{p['sha256']}")
                          for p in m["parts"])
            manifest = cls(size=int(m["size"]), digest=str(m["digest"]), parts=parts,
                           inline=m["layout"] == "inline", time=float(m["time"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise StorageError(f"{where}: unreadable manifest: {exc}") from exc
        if sum(s for s, _ in parts) != manifest.size or (manifest.inline and len(parts) != 1):
            raise StorageError(f"{where}: inconsistent manifest")
        return manifest

    def spans(self, offset: int) -> list[tuple[int, int, int]]:
        """(part index, start of the part in the object, its size) of every part holding bytes at or after offset."""
        out, start = [], 0
        for i, (size, _) in enumerate(self.parts):
            if start + size > offset or (size == 0 and start >= offset):
                out.append((i, start, size))
            start += size
        return out


class RadosError(StorageError):
    """A failed librados call; `errno` says why (errno.ENOENT: no such object, ETIMEDOUT: op_timeout passed)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.errno = code


def _rados_error(exc: BaseException, what: str) -> RadosError:
    return RadosError(f"RADOS {what}: {exc}", getattr(exc, "errno", None))


def _errno_error(code: int, what: str) -> RadosError:
    return RadosError(f"RADOS {what}: {errno.errorcode.get(code, str(code))} ({os.strerror(code)})", code)


def _retrieve(fut: asyncio.Future[Any]) -> None:
    # an operation nobody awaits any more (its caller timed out or failed): its outcome is of no interest
    if not fut.cancelled():
        fut.exception()


class RadosConnection:
    """One librados client (one `rados.Rados`) and an I/O context per pool, opened once and reused.

    Every operation it starts is counted until its completion callback has run, so that `close` can wait
    for them: librados aborts the process when it shuts down with operations in flight.
    """

    def __init__(self, settings: RadosSettings) -> None:
        try:
            import rados
        except ImportError as exc:
            raise ConfigError("storage.backend rados needs librados' Python binding: apt-get install python3-rados "
                              "and expose it to the venv (scripts/bootstrap.sh link_rados)") from exc
        self.rados = rados
        self.settings = settings
        t = str(settings.op_timeout)
        conf = {"rados_osd_op_timeout": t, "rados_mon_op_timeout": t, "client_mount_timeout": t}
        if settings.keyring is not None:
            conf["keyring"] = str(settings.keyring)
        if settings.crush_location:
            conf["crush_location"] = settings.crush_location
        try:
            self._cluster = rados.Rados(conffile=str(settings.conffile) if settings.conffile else "",
                                        name=settings.client_name, conf=conf)
        except rados.Error as exc:
            where = settings.conffile or "$CEPH_CONF or /etc/ceph/ceph.conf"
            raise ConfigError(f"cannot use the Ceph configuration {where}: {exc}") from exc
        self._ioctxs: dict[str, Any] = {}
        self._opening: dict[str, asyncio.Future[Any]] = {}
        # reads go through a client of their own, on librados' C API (see archive/rados_local.py)
        self.reader = RadosReader(settings, localize=settings.localize_reads)
        self._lock = threading.Lock()
        self._in_flight = 0
        self._closed = False

    async def connect(self) -> None:
        # connect() waits at most client_mount_timeout; the asyncio timeout is a backstop
        try:
            await asyncio.wait_for(asyncio.to_thread(self._cluster.connect), self.settings.op_timeout + 5)
            await asyncio.wait_for(self.reader.connect(), self.settings.op_timeout + 5)
        except self.rados.Error as exc:
            raise _rados_error(exc, f"connect as {self.settings.client_name}") from exc
        except TimeoutError as exc:
            raise StorageError(f"RADOS connect: no answer within {self.settings.op_timeout}s") from exc

    async def ioctx(self, pool: str) -> Any:
        """The I/O context of `pool` (opened on first use)."""
        if (io := self._ioctxs.get(pool)) is not None:
            return io
        if self._closed:
            raise StorageError("RADOS connection closed")
        if pool not in self._opening:
            self._opening[pool] = asyncio.ensure_future(asyncio.to_thread(self._cluster.open_ioctx, pool))
        try:
            io = await asyncio.wait_for(asyncio.shield(self._opening[pool]), self.settings.op_timeout + 5)
        except self.rados.ObjectNotFound as exc:
            raise StorageError(f"RADOS pool {pool!r} does not exist") from exc
        except self.rados.Error as exc:
            raise _rados_error(exc, f"open pool {pool!r}") from exc
        except TimeoutError as exc:
            raise StorageError(f"RADOS open pool {pool!r}: no answer within {self.settings.op_timeout}s") from exc
        finally:
            fut = self._opening.get(pool)
            if fut is not None and fut.done():
                del self._opening[pool]
        self._ioctxs.setdefault(pool, io)
        return self._ioctxs[pool]

    def aio(self, start: Callable[[Callable[..., None]], Any], what: str, *,
            loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Future[tuple[Any, ...]]:
        """Start one librados aio call and return a future of (return value, *callback arguments).

        `start(callback)` submits the operation with `callback` as its oncomplete. It may be called from a
        worker thread (pass that thread's event loop as `loop`). A negative return value becomes StorageError.
        """
        loop = loop or asyncio.get_running_loop()
        fut: asyncio.Future[tuple[Any, ...]] = loop.create_future()
        fut.add_done_callback(_retrieve)

        def resolve(rv: int, args: tuple[Any, ...]) -> None:
            if fut.done():  # cancelled: the caller timed out
                return
            if rv < 0:
                fut.set_exception(_errno_error(-rv, what))
            else:
                fut.set_result((rv, *args))

        def oncomplete(completion: Any, *args: Any) -> None:
            # on a librados thread: never raise here, librados would only print it
            try:
                loop.call_soon_threadsafe(resolve, completion.get_return_value(), args)
            except RuntimeError:
                pass  # the loop has closed: nobody waits for this any more
            finally:
                with self._lock:
                    self._in_flight -= 1

        with self._lock:
            if self._closed:
                raise StorageError("RADOS connection closed")
            self._in_flight += 1
        try:
            start(oncomplete)
        except self.rados.Error as exc:
            with self._lock:
                self._in_flight -= 1
            raise _rados_error(exc, what) from exc
        except BaseException:
            with self._lock:
                self._in_flight -= 1
            raise
        return fut

    async def mon_command(self, command: dict[str, Any], *, timeout: float | None = None) -> Any:
        """A monitor command (`ceph` CLI's JSON form, e.g. {"prefix": "osd pool ls"}), its JSON output decoded;
        StorageError with the monitor's message when it fails (e.g. ENOENT for a pool that does not exist)."""
        if self._closed:
            raise StorageError("RADOS connection closed")
        timeout = timeout or self.settings.op_timeout
        cmd = json.dumps({**command, "format": "json"})
        try:
            ret, out, err = await asyncio.wait_for(
                asyncio.to_thread(self._cluster.mon_command, cmd, b"", timeout=int(timeout)), timeout + 5)
        except self.rados.Error as exc:
            raise _rados_error(exc, command.get("prefix", "mon command")) from exc
        except TimeoutError as exc:
            raise StorageError(f"RADOS {command.get('prefix')}: no answer within {timeout}s") from exc
        if ret != 0:
            raise RadosError(f"RADOS {command.get('prefix')}: {err or os.strerror(-ret)}", -ret)
        try:
            return json.loads(out) if out.strip() else None
        except ValueError as exc:
            raise StorageError(f"RADOS {command.get('prefix')}: unreadable answer: {exc}") from exc

    async def close(self) -> None:
        """Wait for operations in flight (each ends within op_timeout), flush writes, close, shut down."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + self.settings.op_timeout + 5
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        ioctxs, self._ioctxs = list(self._ioctxs.values()), {}
        await self.reader.close()

        def shutdown() -> None:
            for io in ioctxs:
                io.aio_flush()
                io.close()
            self._cluster.shutdown()

        # aio_flush waits for writes a full or stopped OSD may never acknowledge (they fail after
        # op_timeout, but a flush has no timeout of its own): give up waiting rather than hang the shutdown
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.ensure_future(asyncio.to_thread(shutdown))),
                                   self.settings.op_timeout + 5)
        except TimeoutError:
            pass  # the process is ending: the writes in flight were never acknowledged to anyone


class RadosStore:
    """The ObjectStore protocol on RADOS: writes to `pool`, reads any `<pool>/<key>` location of the cluster.

    Build it with `await RadosStore.open(settings.storage.rados)` and `await store.close()` at the end; or
    share one `RadosConnection` between several stores (`RadosStore(connection, pool=...)`).
    """

    name = "rados"

    def __init__(self, connection: RadosConnection, *, pool: str, part_size: int = 32 << 20,
                 owns_connection: bool = False, digest: DigestAlgorithm = DigestAlgorithm.blake3) -> None:
        self.connection = connection
        self.pool = pool
        self.part_size = part_size
        self.digest = digest
        self.op_timeout = connection.settings.op_timeout
        self._owns_connection = owns_connection

    @classmethod
    async def open(cls, settings: RadosSettings, *, digest: DigestAlgorithm = DigestAlgorithm.blake3) -> RadosStore:
        """Connect (one librados client) and check that the pool exists."""
        conn = RadosConnection(settings)
        try:
            await conn.connect()
            store = cls(conn, pool=settings.pool, part_size=settings.part_size, owns_connection=True, digest=digest)
            await conn.ioctx(settings.pool)
        except BaseException:
            await conn.close()
            raise
        return store

    async def close(self) -> None:
        if self._owns_connection:
            await self.connection.close()

    # -- writing -------------------------------------------------------------------------------------------

    async def put(self, key: str, parts: Sequence[bytes], *, digest: str | None = None,
                  timeout: float = 60.0, pack_prefix: str | None = None) -> StoredObject:
        """Write `parts` as one object under `key` (manifest last); `digest` if the caller already computed it.
        `pack_prefix` is ignored: every RADOS object is its own unit of allocation already."""
        if not key or key.startswith("/") or _PART_SUFFIX.search(key):
            raise StorageError(f"{key!r} cannot name a RADOS object")
        data = [p if isinstance(p, bytes) else bytes(p) for p in parts] or [b""]
        if digest is not None:
            digests.algorithm_of(digest)  # StorageError for a digest nobody could verify later
        size = sum(map(len, data))
        io = await self.connection.ioctx(self.pool)
        try:
            async with asyncio.timeout(timeout):
                if size <= self.part_size:
                    manifest = await self._put_inline(io, key, data, size, digest)
                else:
                    manifest = await self._put_parts(io, key, data, size, digest)
        except TimeoutError as exc:
            raise StorageError(f"RADOS put {self.pool}/{key}: no answer within {timeout}s") from exc
        return StoredObject(location=f"{self.pool}/{key}", size=manifest.size, digest=manifest.digest)

    async def _put_inline(self, io: Any, key: str, data: list[bytes], size: int, digest: str | None) -> Manifest:
        loop = asyncio.get_running_loop()
        conn = self.connection

        def hash_and_submit() -> tuple[Manifest, asyncio.Future[tuple[Any, ...]]]:
            # in a worker thread: hashing and librados' copy of the bytes stay off the loop
            whole_digest = digest if digest is not None else digests.digest_of(data, self.digest)
            # one write_full of the whole object: an erasure-coded pool (without allow_ec_overwrites) refuses
            # a write at an offset (ENOTSUP), e.g. the data set after the File Meta Information of a C-STORE
            whole = data[0] if len(data) == 1 else b"".join(data)
            manifest = Manifest(size=size, digest=whole_digest, parts=((size, part_check(whole)),),
                                inline=True, time=time.time())
            op = io.create_write_op()
            try:
                # one compound operation: the bytes and their manifest land together or not at all
                op.write_full(whole)
                op.set_xattr(MANIFEST_XATTR, manifest.encode())
                fut = conn.aio(lambda cb: io.operate_aio_write_op(op, key, oncomplete=cb, mtime=int(manifest.time)),
                               f"put {self.pool}/{key}", loop=loop)
            finally:
                io.release_write_op(op)
            return manifest, fut

        manifest, fut = await asyncio.to_thread(hash_and_submit)
        await fut
        return manifest

    async def _put_parts(self, io: Any, key: str, data: list[bytes], size: int, digest: str | None) -> Manifest:
        loop = asyncio.get_running_loop()
        conn = self.connection
        whole = digests.hasher(self.digest) if digest is None else None
        entries: list[tuple[int, str]] = []
        in_flight: collections.deque[asyncio.Future[tuple[Any, ...]]] = collections.deque()

        def hash_and_submit(index: int, pieces: list[memoryview]) -> tuple[tuple[int, str], asyncio.Future[Any]]:
            first = pieces[0]
            chunk = first.obj if len(pieces) == 1 and len(first) == len(first.obj) else b"".join(pieces)
            if whole is not None:
                whole.update(chunk)
            name = part_name(key, index)
            fut = conn.aio(lambda cb: io.aio_write_full(name, chunk, oncomplete=cb), f"put {self.pool}/{name}",
                           loop=loop)
            return (len(chunk), part_check(chunk)), fut

        try:
            for index, pieces in enumerate(_cut(data, self.part_size)):
                if len(in_flight) >= _WRITES_IN_FLIGHT:
                    await in_flight.popleft()
                entry, fut = await asyncio.to_thread(hash_and_submit, index, pieces)
                entries.append(entry)
                in_flight.append(fut)
            while in_flight:
                await in_flight.popleft()
            manifest = Manifest(size=size, digest=digest or digests.text(self.digest, whole),  # type: ignore[arg-type]
                                parts=tuple(entries), inline=False, time=time.time())
            encoded = manifest.encode()
            op = io.create_write_op()
            try:
                op.write_full(encoded)  # readable with `rados get`
                op.set_xattr(MANIFEST_XATTR, manifest.head(len(encoded)))
                fut = conn.aio(lambda cb: io.operate_aio_write_op(op, key, oncomplete=cb, mtime=int(manifest.time)),
                               f"put {self.pool}/{key}")
            finally:
                io.release_write_op(op)
            await fut
        except BaseException:
            for f in in_flight:
                f.cancel()
            # without a manifest the parts are garbage: remove what we can now, the sweeper gets the rest
            try:
                for name in (part_name(key, i) for i in range(len(entries))):
                    conn.aio(partial(io.aio_remove, name), f"remove {self.pool}/{name}")  # not awaited
            except StorageError:
                pass  # the connection is closing: the sweeper will remove them
            raise
        return manifest

    # -- reading -------------------------------------------------------------------------------------------

    async def _manifest(self, pool: str, key: str, *,
                        head_bytes: int = 0) -> tuple[Manifest | None, bytes]:
        """The object's manifest (None for a RADOS object that has none: a part, or not ours) and, for an
        inline object, up to `head_bytes` of its data, read in the same round trip."""
        reader = self.connection.reader
        try:
            # a multi-part object's data is its manifest: read enough for most manifests in the same trip
            raw, head = await reader.read_head(pool, key, MANIFEST_XATTR, max(head_bytes, 64 << 10))
        except StorageError as exc:
            if getattr(exc, "errno", None) == errno.ENOENT:
                raise RadosError(f"RADOS object {pool}/{key} does not exist", errno.ENOENT) from exc
            raise
        if raw is None:
            return None, b""
        try:
            xattr = json.loads(raw)
            length = int(xattr["manifest_bytes"]) if xattr.get("layout") == "parts" else None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StorageError(f"{pool}/{key}: unreadable manifest: {exc}") from exc
        if length is None:
            return Manifest.decode(raw, f"{pool}/{key}"), head
        # a multi-part object: the whole manifest is its data
        if len(head) < length:
            head = await reader.read(pool, key, length)
        manifest = Manifest.decode(head[:length], f"{pool}/{key}")
        if (manifest.size, manifest.digest) != (xattr.get("size"), xattr.get("digest")):
            raise StorageError(f"{pool}/{key}: the manifest does not match its extended attribute")
        return manifest, b""

    async def _read_part(self, pool: str, key: str, manifest: Manifest, index: int, head: bytes = b"") -> bytes:
        """One part, whole, checked against the manifest; `head`: its first bytes, already read (inline)."""
        size, expected = manifest.parts[index]
        name = key if manifest.inline else part_name(key, index)
        data = head
        if len(data) < size:
            rest = await self.connection.reader.read(pool, name, size - len(data), len(data))
            data = data + rest if data else rest
        if len(data) != size:
            raise StorageError(f"RADOS object {pool}/{name} holds {len(data)} bytes, its manifest says {size}")
        if len(data) > (_CRC_INLINE if expected.startswith("crc32c:") else _HASH_INLINE):
            actual = await asyncio.to_thread(_actual_check, expected, data)
        else:
            actual = _actual_check(expected, data)
        if actual != expected:
            raise StorageError(f"RADOS object {pool}/{name} is corrupt: {actual}, its manifest says {expected}")
        return data

    async def _open(self, location: str, *, offset: int = 0) -> tuple[str, str, Manifest, bytes]:
        """The manifest and, for an inline object read from its start, its first bytes (one round trip)."""
        pool, key = split_location(location)
        manifest, head = await self._manifest(pool, key, head_bytes=_HEAD_READ if offset == 0 else 0)
        if manifest is None:
            raise StorageError(f"RADOS object {location} has no manifest: not an object stored by vna")
        return pool, key, manifest, head if manifest.inline else b""

    async def get(self, location: str, *, offset: int = 0, timeout: float = 60.0) -> bytes:
        """The object's bytes from `offset` to its end, every part checked against its digest."""
        try:
            async with asyncio.timeout(timeout):
                pool, key, manifest, head = await self._open(location, offset=offset)
                spans = manifest.spans(offset)
                chunks = await asyncio.gather(*(self._read_part(pool, key, manifest, i, head if i == 0 else b"")
                                                for i, _, _ in spans))
        except TimeoutError as exc:
            raise StorageError(f"RADOS get {location}: no answer within {timeout}s") from exc
        if not spans:
            return b""
        skip = offset - spans[0][1]
        if len(chunks) == 1:
            return chunks[0][skip:] if skip else chunks[0]
        return b"".join([chunks[0][skip:], *chunks[1:]])

    async def stream(self, location: str, *, offset: int = 0, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        """The bytes from `offset` in pieces of at most `chunk_size`; reads one part ahead, checks each part."""
        try:
            pool, key, manifest, head = await asyncio.wait_for(self._open(location, offset=offset), self.op_timeout + 5)
        except TimeoutError as exc:
            raise StorageError(f"RADOS stream {location}: no answer within {self.op_timeout}s") from exc
        spans = manifest.spans(offset)

        def read(i: int) -> asyncio.Task[bytes]:
            task = asyncio.ensure_future(asyncio.wait_for(
                self._read_part(pool, key, manifest, i, head if i == 0 else b""), self.op_timeout + 5))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved if nobody awaits it
            return task

        pending = read(spans[0][0]) if spans else None
        try:
            for n, (_i, start, _size) in enumerate(spans):
                assert pending is not None
                try:
                    data = await pending
                except TimeoutError as exc:
                    raise StorageError(f"RADOS stream {location}: no answer within {self.op_timeout}s") from exc
                pending = read(spans[n + 1][0]) if n + 1 < len(spans) else None
                first = max(offset - start, 0)
                if first == 0 and 0 < len(data) <= chunk_size:
                    yield data  # a whole part in one chunk: no copy
                    continue
                view = memoryview(data)
                for pos in range(first, len(data), chunk_size):
                    yield bytes(view[pos:pos + chunk_size])
        finally:
            if pending is not None:
                pending.cancel()

    async def stat(self, location: str, *, timeout: float = 60.0) -> int:
        try:
            async with asyncio.timeout(timeout):
                pool, key = split_location(location)
                manifest, _ = await self._manifest(pool, key)
                if manifest is None:
                    raise StorageError(f"RADOS object {location} has no manifest: not an object stored by vna")
                return manifest.size
        except TimeoutError as exc:
            raise StorageError(f"RADOS stat {location}: no answer within {timeout}s") from exc

    # -- removing ------------------------------------------------------------------------------------------

    async def delete(self, location: str, *, timeout: float = 60.0) -> None:
        """Remove the object and its parts (manifest first: a crash between leaves garbage, never half an
        object); removing what does not exist is not an error. A location without manifest (a part the
        sweeper found orphaned) removes just that RADOS object."""
        pool, key = split_location(location)
        try:
            async with asyncio.timeout(timeout):
                io = await self.connection.ioctx(pool)
                try:
                    manifest, _ = await self._manifest(pool, key)
                except RadosError as exc:
                    if exc.errno == errno.ENOENT:
                        return
                    raise
                await self._remove(io, pool, key)
                if manifest is not None and not manifest.inline:
                    await asyncio.gather(*(self._remove(io, pool, part_name(key, i))
                                           for i in range(len(manifest.parts))))
        except TimeoutError as exc:
            raise StorageError(f"RADOS delete {location}: no answer within {timeout}s") from exc

    async def _remove(self, io: Any, pool: str, name: str) -> None:
        try:
            await self.connection.aio(lambda cb: io.aio_remove(name, oncomplete=cb), f"remove {pool}/{name}")
        except RadosError as exc:
            if exc.errno != errno.ENOENT:
                raise

    # -- the orphan sweeper's view -------------------------------------------------------------------------

    async def list_older_than(self, age_seconds: float) -> AsyncIterator[str]:
        """Locations last written more than `age_seconds` ago: every object with a manifest, and every part
        whose manifest does not exist (an interrupted put or delete). Parts of a whole object are not
        listed: deleting the object removes them."""
        pool = self.pool
        io = await self.connection.ioctx(pool)
        rados = self.connection.rados
        cutoff = time.time() - age_seconds
        sem = asyncio.Semaphore(_STATS_IN_FLIGHT)

        async def mtime(name: str) -> float | None:
            async with sem:
                try:
                    _rv, _size, when = await asyncio.wait_for(
                        self.connection.aio(lambda cb: io.aio_stat(name, oncomplete=cb), f"stat {pool}/{name}"),
                        self.op_timeout + 5)
                except RadosError as exc:
                    if exc.errno == errno.ENOENT:
                        return None  # removed since the listing
                    raise
                return time.mktime(when)

        async def candidate(name: str) -> float | None:
            """The mtime of an object the sweeper should consider, None to pass it over."""
            if (base := _PART_SUFFIX.sub("", name)) != name and await mtime(base) is not None:
                return None  # a part of a whole object: deleting the object removes it
            return await mtime(name)

        # the listing is read a batch at a time, so memory stays bounded whatever the pool holds
        try:
            listing = await asyncio.to_thread(lambda: iter(io.list_objects()))
        except rados.Error as exc:
            raise _rados_error(exc, f"list pool {pool!r}") from exc
        while True:
            try:
                batch = await asyncio.to_thread(lambda: [o.key for o in itertools.islice(listing, 1024)])
            except rados.Error as exc:
                raise _rados_error(exc, f"list pool {pool!r}") from exc
            if not batch:
                return
            for name, when in zip(batch, await asyncio.gather(*(candidate(n) for n in batch)), strict=True):
                if when is not None and when <= cutoff:
                    yield f"{pool}/{name}"


def _cut(data: list[bytes], part_size: int) -> Iterator[list[memoryview]]:
    """The concatenation of `data` cut into pieces of `part_size` bytes (the last one shorter), each piece a
    list of views into the buffers (no copy here)."""
    current: list[memoryview] = []
    room = part_size
    for buf in data:
        view = memoryview(buf)
        while view:
            take = view[:room]
            current.append(take)
            room -= len(take)
            view = view[len(take):]
            if room == 0:
                yield current
                current, room = [], part_size
    if current:
        yield current
