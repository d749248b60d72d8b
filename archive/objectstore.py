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
                  timeout: float) -> StoredObject: ...

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
    Blocking calls run in the default thread pool, never on the event loop.
    """

    name = "filesystem"

    def __init__(self, root: Path, *, fsync: bool = True, digest: DigestAlgorithm = DigestAlgorithm.blake3) -> None:
        self.root = Path(root).resolve()
        self.digest = digest
        self.root.mkdir(parents=True, exist_ok=True)
        self._root_text = str(self.root)
        self._root_prefix = self._root_text.rstrip("/") + "/"
        self._fsync = fsync
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
                  timeout: float = 60.0) -> StoredObject:
        """Write `parts` as one object under `key`; `digest` if the caller already computed it."""
        if digest is not None:
            digests.algorithm_of(digest)  # StorageError for a digest nobody could verify later
        return await self._in_thread(self._put_sync, key, parts, digest, timeout=timeout)

    def _get_sync(self, location: str, offset: int) -> bytes:
        with open(self._path(location), "rb") as f:
            f.seek(offset)
            return f.read()

    async def get(self, location: str, *, offset: int = 0, timeout: float = 60.0) -> bytes:
        return await self._in_thread(self._get_sync, location, offset, timeout=timeout)

    async def stream(self, location: str, *, offset: int = 0, chunk_size: int = _CHUNK) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
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

    def _delete_sync(self, location: str) -> None:
        self._path(location).unlink(missing_ok=True)

    async def delete(self, location: str, *, timeout: float = 60.0) -> None:
        await self._in_thread(self._delete_sync, location, timeout=timeout)

    async def stat(self, location: str, *, timeout: float = 60.0) -> int:
        return await self._in_thread(lambda: self._path(location).stat().st_size, timeout=timeout)

    def _scan_sync(self, age_seconds: float) -> list[str]:
        cutoff = time.time() - age_seconds
        found = []
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                p = Path(dirpath) / name
                try:
                    if p.stat().st_mtime <= cutoff:
                        found.append(str(p.relative_to(self.root)))
                except FileNotFoundError:
                    continue
        return found

    async def list_older_than(self, age_seconds: float) -> AsyncIterator[str]:
        """Every object (and stale temp file) last modified more than `age_seconds` ago."""
        loop = asyncio.get_running_loop()
        for location in await loop.run_in_executor(None, self._scan_sync, age_seconds):
            yield location


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


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
