"""Object stores: where the bytes of each instance live. The index (PostgreSQL) records the location.

The interface is shaped for Ceph RADOS as much as for a filesystem: `put` is given a key and returns
a `StoredObject` whose `location` is opaque to everyone but the store; reads take that location.
Once `put` returns, the object is durable. A put cut short (a crash, a failed write) may leave an
incomplete object, but only under its own new key, which no index row names: readers reach objects
through the index alone, and the orphan sweeper removes such leftovers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from archive import digest as digests
from archive import segments
from archive.config import DigestAlgorithm
from archive.errors import StorageError

_CHUNK = 1 << 20
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class StoredObject:
    location: str
    size: int
    digest: str  # "<algorithm>:<hex>" over the whole object (archive/digest.py)


class ObjectStore(Protocol):
    name: str

    async def put(self, key: str, parts: Sequence[bytes], *, digest: str | None = None,
                  timeout: float, pack_prefix: str | None = None) -> StoredObject: ...

    async def get(self, location: str, *, offset: int = 0, timeout: float) -> bytes: ...

    def stream(self, location: str, *, offset: int = 0, chunk_size: int = _CHUNK) -> AsyncIterator[bytes]: ...

    async def delete(self, location: str, *, timeout: float) -> None: ...

    async def stat(self, location: str, *, timeout: float) -> int: ...

    def list_older_than(self, age_seconds: float) -> AsyncIterator[str]: ...


class FileSystemStore:
    """Objects as files under `root`; the location is the path relative to root.

    A put creates the file under its final name (O_EXCL: keys are never reused, see
    archive/ingest.py `object_key`), writes it, fdatasyncs it and fsyncs its directory (on filesystems
    that persist a new name with the file's own fsync, only the parents of directories it had to create),
    so once `put` returns the object survives a crash. A crash during a
    put can leave a partial file, but under a key no index row names yet: the orphan sweeper removes it.
    Writing in place rather than to a temporary name renamed afterwards saves a second directory update
    and its flush on every instance. Only a put over an existing name (a retried move copying to the
    location it planned) goes through a temporary file renamed over the old one, so what was there is
    replaced whole or not at all.
    With `pack_max_bytes`, a put given a `pack_prefix` (an ingest's; archive/ingest.py) of an object up to that
    size writes it into a segment file under `<root>/<pack_prefix>.segments/` instead (archive/segments.py):
    the store then chooses the location.
    Blocking calls run in the default thread pool, never on the event loop.
    """

    name = "filesystem"

    def __init__(self, root: Path, *, fsync: bool = True, digest: DigestAlgorithm = DigestAlgorithm.blake3,
                 pack_max_bytes: int = 0, segment_bytes: int = 256 << 20) -> None:
        self.root = Path(root).resolve()
        self.digest = digest
        self.root.mkdir(parents=True, exist_ok=True)
        self._root_text = str(self.root)
        self._root_prefix = self._root_text.rstrip("/") + "/"
        self._fsync = fsync
        self.pack_max_bytes = pack_max_bytes
        self._writer = segments.SegmentWriter(self._root_text, segment_bytes=segment_bytes,
                                              fsync=fsync) if pack_max_bytes else None
        # POSIX makes a new file's name durable only with an fsync of its directory. ext4, XFS and btrfs
        # persist it with the file's own fsync (ext4: the journal commit, or ext4_sync_parent without a
        # journal; XFS: the log force covers the create; btrfs: the tree log holds the new name), and the
        # directory's fsync would cost one more device cache flush per instance.
        self._new_entry_synced = filesystem_type(self.root) in _NAME_SYNCED_WITH_FILE

    def _path(self, location: str) -> Path:
        # normpath, not resolve(): a pure string operation, safe on the event loop (no stat calls)
        path = os.path.normpath(os.path.join(self._root_text, location))
        if not path.startswith(self._root_prefix):
            raise StorageError(f"location {location!r} escapes the store")
        return Path(path)

    async def _in_thread(self, fn, *args, timeout: float):  # type: ignore[no-untyped-def]
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                return await loop.run_in_executor(None, fn, *args)
        except OSError as exc:
            raise StorageError(f"filesystem store: {exc}") from exc
        except TimeoutError as exc:
            raise StorageError(f"filesystem store: no answer within {timeout}s") from exc

    def _put_sync(self, key: str, parts: Sequence[bytes], digest: str | None) -> StoredObject:
        final = self._path(key)
        try:
            try:
                fd = os.open(final, _CREATE, 0o644)
            except FileNotFoundError:
                self._make_dirs(final.parent)
                fd = os.open(final, _CREATE, 0o644)
        except FileExistsError:
            return self._replace_sync(final, key, parts, digest)
        size, actual = self._write_sync(fd, final, parts, digest)
        if self._fsync and not self._new_entry_synced:
            _fsync_dir(final.parent)
        return StoredObject(location=key, size=size, digest=actual)

    def _replace_sync(self, final: Path, key: str, parts: Sequence[bytes], digest: str | None) -> StoredObject:
        """Put over an existing name: a temporary file renamed over it, so the old object stays whole until
        the new one is complete."""
        tmp = final.with_name(f"{final.name}.tmp-{os.urandom(6).hex()}")
        size, actual = self._write_sync(os.open(tmp, _CREATE, 0o644), tmp, parts, digest)
        os.rename(tmp, final)
        if self._fsync:
            _fsync_dir(final.parent)
        return StoredObject(location=key, size=size, digest=actual)

    def _write_sync(self, fd: int, path: Path, parts: Sequence[bytes], digest: str | None) -> tuple[int, str]:
        """Write `parts` to the new file `path` open as `fd`, sync and close it: (size, digest). On failure
        the file is closed and removed."""
        h = digests.hasher(self.digest) if digest is None else None
        size = 0
        try:
            for p in parts:
                if h is not None:
                    h.update(p)
                view = memoryview(p)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                size += len(p)
            if self._fsync:
                os.fdatasync(fd)  # the data and the size (and, on ext4/XFS/btrfs, a new file's name)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        return size, digest or digests.text(self.digest, h)  # type: ignore[arg-type]

    def _make_dirs(self, directory: Path) -> None:
        """Create `directory` and its missing parents; each new entry made durable in its parent."""
        missing = []
        while not directory.exists():
            missing.append(directory)
            directory = directory.parent
        for d in reversed(missing):
            with contextlib.suppress(FileExistsError):  # a concurrent put into the same series
                d.mkdir()
            if self._fsync:  # also when another put created it: its fsync may not have happened yet
                _fsync_dir(d.parent)

    async def put(self, key: str, parts: Sequence[bytes], *, digest: str | None = None,
                  timeout: float = 60.0, pack_prefix: str | None = None) -> StoredObject:
        """Write `parts` as one object under `key`; `digest` if the caller already computed it. With `pack_prefix`
        (and packing configured), a small object goes into a segment under that prefix, at a location of the
        store's choosing."""
        if digest is not None:
            digests.algorithm_of(digest)  # StorageError for a digest nobody could verify later
        if pack_prefix is not None and self._writer is not None:
            size = sum(map(len, parts))
            if size <= self.pack_max_bytes and segments.region_length(size) <= self._writer.segment_bytes:
                return await self._in_thread(self._put_packed_sync, pack_prefix, key, parts, size, digest,
                                             timeout=timeout)
        return await self._in_thread(self._put_sync, key, parts, digest, timeout=timeout)

    def _put_packed_sync(self, prefix: str, key: str, parts: Sequence[bytes], size: int,
                         digest: str | None) -> StoredObject:
        assert self._writer is not None
        self._path(prefix + segments.SEGMENTS_DIR)  # StorageError for a prefix outside the root
        length = segments.region_length(size)
        segment, start = self._writer.reserve(prefix, length)
        h = digests.hasher(self.digest) if digest is None else None
        try:
            try:
                segments.write_object(segment, start, key, parts, size, h, self._fsync)
            except BaseException:
                with contextlib.suppress(OSError):  # whatever reached the disk is no object any more
                    segments.punch(segment.fd, start, length)
                raise
        finally:
            self._writer.release(segment)
        location = segments.PackedLocation(segment.segment, start + segments.HEADER_BYTES, size)
        return StoredObject(location=location.text(), size=size,
                            digest=digest or digests.text(self.digest, h))  # type: ignore[arg-type]

    def _get_sync(self, location: str, offset: int) -> bytes:
        packed = segments.parse_location(location)
        if packed is None:
            with open(self._path(location), "rb") as f:
                f.seek(offset)
                return f.read()
        with segments.opened(str(self._path(packed.segment))) as fd:
            _check_region(fd, packed, location)
            want = max(0, packed.size - offset)
            data = os.pread(fd, want, packed.offset + offset) if want else b""
            _check_region(fd, packed, location)  # not deleted while read: its bytes would read as zeros
        if len(data) != want:
            raise StorageError(f"filesystem store: {location} ends after {len(data)} of {want} bytes")
        return data

    async def get(self, location: str, *, offset: int = 0, timeout: float = 60.0) -> bytes:
        return await self._in_thread(self._get_sync, location, offset, timeout=timeout)

    async def stream(self, location: str, *, offset: int = 0, chunk_size: int = _CHUNK) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        packed = segments.parse_location(location)
        if packed is not None:
            async for chunk in self._stream_packed(packed, location, offset, chunk_size):
                yield chunk
            return
        try:
            f = await loop.run_in_executor(None, open, self._path(location), "rb")
        except OSError as exc:
            raise StorageError(f"filesystem store: {exc}") from exc
        try:
            f.seek(offset)
            while chunk := await loop.run_in_executor(None, f.read, chunk_size):
                yield chunk
        finally:
            f.close()

    async def _stream_packed(self, packed: segments.PackedLocation, location: str, offset: int,
                             chunk_size: int) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        path = self._path(packed.segment)

        def open_checked() -> int:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _check_region(fd, packed, location)
            except BaseException:
                os.close(fd)
                raise
            return fd

        def read(at: int) -> bytes:
            chunk = os.pread(fd, min(chunk_size, packed.size - at), packed.offset + at)
            if at + len(chunk) >= packed.size:  # the last chunk goes out only if the object was not deleted meanwhile
                _check_region(fd, packed, location)
            return chunk
        try:
            fd = await loop.run_in_executor(None, open_checked)
        except OSError as exc:
            raise StorageError(f"filesystem store: {exc}") from exc
        try:
            at = min(offset, packed.size)
            while at < packed.size:
                chunk = await loop.run_in_executor(None, read, at)
                if not chunk:
                    raise StorageError(f"filesystem store: {location} ends after {at} of {packed.size} bytes")
                at += len(chunk)
                yield chunk
        finally:
            os.close(fd)

    def _delete_sync(self, location: str) -> None:
        packed = segments.parse_location(location)
        if packed is None:
            self._path(location).unlink(missing_ok=True)
            return
        try:
            fd = os.open(self._path(packed.segment), os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            segments.punch(fd, *packed.region)  # its blocks freed; the sweeper removes a segment left empty
        finally:
            os.close(fd)

    async def delete(self, location: str, *, timeout: float = 60.0) -> None:
        await self._in_thread(self._delete_sync, location, timeout=timeout)

    async def stat(self, location: str, *, timeout: float = 60.0) -> int:
        packed = segments.parse_location(location)
        if packed is None:
            return await self._in_thread(lambda: self._path(location).stat().st_size, timeout=timeout)
        await self._in_thread(self._path(packed.segment).stat, timeout=timeout)  # FileNotFoundError -> StorageError
        return packed.size

    def _scan_sync(self, age_seconds: float) -> list[str]:
        cutoff = time.time() - age_seconds
        found = []
        for dirpath, dirs, files in os.walk(self.root):
            if segments.SEGMENTS_DIR in dirs:  # segments are pruned whole (`prune_segment`), not listed
                dirs.remove(segments.SEGMENTS_DIR)
            for name in files:
                p = Path(dirpath) / name
                try:
                    if p.stat().st_mtime <= cutoff:
                        found.append(str(p.relative_to(self.root)))
                except FileNotFoundError:
                    continue
        return found

    async def list_older_than(self, age_seconds: float) -> AsyncIterator[str]:
        """Every object in a file of its own (and stale temp file) last modified more than `age_seconds` ago."""
        loop = asyncio.get_running_loop()
        for location in await loop.run_in_executor(None, self._scan_sync, age_seconds):
            yield location

    def _idle_segments_sync(self, age_seconds: float) -> list[str]:
        cutoff = time.time() - age_seconds
        idle = []
        for path, segment in segments.segments_under(self._root_text):
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_mtime <= cutoff:
                    idle.append(segment)
        return idle

    async def idle_segments(self, age_seconds: float, *, timeout: float = 60.0) -> list[str]:
        """The segments (archive/segments.py) last written more than `age_seconds` ago."""
        return await self._in_thread(self._idle_segments_sync, age_seconds, timeout=timeout)

    async def prune_segment(self, segment: str, keep: set[str], *, timeout: float = 60.0) -> int:
        """Free every range of a segment holding no object whose location is in `keep` (those the index names);
        remove the segment if it keeps none; leave it alone while a writer holds it. The objects removed."""
        def prune() -> int:
            try:
                return segments.prune(str(self._path(segment)), segment, keep)[0]
            except FileNotFoundError:
                return 0
        return await self._in_thread(prune, timeout=timeout)

    async def packed_objects(self, *, timeout: float = 60.0) -> list[tuple[str, str]]:
        """(location, key) of every object in a segment (for an operator's listing, and tests)."""
        def listing() -> list[tuple[str, str]]:
            found = []
            for path, segment in segments.segments_under(self._root_text):
                with contextlib.suppress(FileNotFoundError), segments.opened(path) as fd:
                    found += [(loc.text(), key) for loc, key in segments.scan(fd, segment)]
            return found
        return await self._in_thread(listing, timeout=timeout)

    def close(self) -> None:
        """Seal the segments being written (their descriptors closed once their puts are done)."""
        if self._writer is not None:
            self._writer.close()


def _check_region(fd: int, packed: segments.PackedLocation, location: str) -> None:
    """StorageError unless the region still holds its object. A packed object deleted while it is read (a
    DELETE, a replaced duplicate) reads as zeros, where a deleted file would still read whole: a reader must
    fail (as it does on RADOS) rather than send zeros."""
    if not segments.holds(fd, packed):
        raise StorageError(f"filesystem store: no object at {location} (deleted)")


_NAME_SYNCED_WITH_FILE = frozenset({"ext4", "xfs", "btrfs"})


def filesystem_type(path: Path) -> str | None:
    """The type of the filesystem holding `path` (Linux /proc/self/mounts, longest mount point), or None."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    best, kind = -1, None
    target = str(path.resolve())
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) > best:
            best, kind = len(point), fields[2]
    return kind


def _fsync_dir(directory: Path) -> None:  # a name of its own: tests count the calls
    segments.fsync_directory(directory)
