"""Object stores: where the bytes of each instance live. The index (PostgreSQL) records the location.

The interface is shaped for Ceph RADOS as much as for a filesystem: `put` is given a key and returns
a `StoredObject` whose `location` is opaque to everyone but the store; reads take that location.
Writes are atomic: an object is either complete under its final name or absent.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from archive.errors import StorageError

_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class StoredObject:
    location: str
    size: int
    digest: str  # "sha256:<hex>" over the whole object


class ObjectStore(Protocol):
    name: str

    async def put(self, key: str, parts: Sequence[bytes], *, digest: str | None = None,
                  timeout: float) -> StoredObject: ...

    async def get(self, location: str, *, offset: int = 0, timeout: float) -> bytes: ...

    def stream(self, location: str, *, offset: int = 0, chunk_size: int = _CHUNK) -> AsyncIterator[bytes]: ...

    async def delete(self, location: str, *, timeout: float) -> None: ...

    async def stat(self, location: str, *, timeout: float) -> int: ...

    def list_older_than(self, age_seconds: float) -> AsyncIterator[str]: ...


def digest_of(parts: Sequence[bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return "sha256:" + h.hexdigest()


class FileSystemStore:
    """Objects as files under `root`; the location is the path relative to root.

    A put writes `<final>.tmp-<random>` in the final directory, fsyncs it, renames it over the final
    name and fsyncs the directory, so after a crash a name either holds the whole object or nothing.
    Blocking calls run in the default thread pool, never on the event loop.
    """

    name = "filesystem"

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync

    def _path(self, location: str) -> Path:
        # normpath, not resolve(): a pure string operation, safe on the event loop (no stat calls)
        p = Path(os.path.normpath(self.root / location))
        if self.root not in p.parents:
            raise StorageError(f"location {location!r} escapes the store")
        return p

    async def _in_thread(self, fn, *args, timeout: float):  # type: ignore[no-untyped-def]
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(None, fn, *args), timeout)
        except OSError as exc:
            raise StorageError(f"filesystem store: {exc}") from exc
        except TimeoutError as exc:
            raise StorageError(f"filesystem store: no answer within {timeout}s") from exc

    def _put_sync(self, key: str, parts: Sequence[bytes], digest: str | None) -> StoredObject:
        final = self._path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f"{final.name}.tmp-{os.urandom(6).hex()}")
        h = hashlib.sha256()
        size = 0
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for p in parts:
                if digest is None:
                    h.update(p)
                view = memoryview(p)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                size += len(p)
            if self._fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.rename(tmp, final)
        if self._fsync:
            dfd = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        return StoredObject(location=key, size=size, digest=digest or "sha256:" + h.hexdigest())

    async def put(self, key: str, parts: Sequence[bytes], *, digest: str | None = None,
                  timeout: float = 60.0) -> StoredObject:
        """Write `parts` as one object under `key`; `digest` if the caller already computed it."""
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
