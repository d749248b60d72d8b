"""What a vna server's object store holds, seen from outside vna, on either backend.

Tests that check the objects themselves (nothing left behind, the bytes stored as received, an object
removed) use `StoredObjects.of(rt.settings)`: on the filesystem the files under the store's root (a
location is the path relative to it) and the objects packed in segment files, found by their headers
(layout in archive/segments.py: a location `<segment>@<offset>+<size>`), on RADOS the objects of the server's pool read with librados
directly (a location is `<pool>/<key>`), not through vna's own RadosStore. For RADOS it follows the
layout documented in archive/rados_store.py: an object `key` whose extended attribute `vna.manifest`
gives its size and SHA-256, holding the bytes itself ("inline") or, for larger ones, the JSON manifest
of its parts `key.part-NNNN`.

`locations()` lists what an orphan sweep would see: every object, plus parts whose manifest object does
not exist (an interrupted put); parts of a whole object are part of it, not listed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import crc32c

from archive.config import RadosSettings, Settings, StorageBackend
from archive.objectstore import FileSystemStore, ObjectStore
from tests.digests import digest_text

MANIFEST_XATTR = "vna.manifest"
PART_SUFFIX = re.compile(r"\.part-\d{4,}$")

T = TypeVar("T")


class StoredObjects:
    """The objects of one store: `await view.locations()`, `await view.read(location)`, ..."""

    def __init__(self, *, root: Path | None = None, rados: RadosSettings | None = None) -> None:
        assert (root is None) != (rados is None)
        self.root = root
        self.rados = rados

    @classmethod
    def of(cls, settings: Settings) -> StoredObjects:
        """The store a server with these settings writes to (`rt.settings`): its root, or its RADOS pool
        (storage.rados.pool: the default storage class's; a policy file's other classes are not seen)."""
        if settings.storage.backend is StorageBackend.rados:
            return cls(rados=settings.storage.rados)
        return cls(root=settings.object_root)

    @property
    def backend(self) -> str:
        return "rados" if self.rados is not None else "filesystem"

    # -- reading -----------------------------------------------------------------------------------------

    async def locations(self) -> set[str]:
        """Every object in the store, by the location the index would name it."""
        if self.root is not None:
            return await asyncio.to_thread(_filesystem_locations, self.root)

        def listing(io: Any) -> set[str]:
            names = {o.key for o in io.list_objects()}
            return {f"{self.pool}/{n}" for n in names
                    if not PART_SUFFIX.search(n) or PART_SUFFIX.sub("", n) not in names}
        return await self._with_ioctx(listing)

    async def read(self, location: str) -> bytes:
        """The whole object; on RADOS its size and SHA-256 are checked against its manifest."""
        if self.root is not None:
            return await asyncio.to_thread(_read_file, self.root, location)
        return await self._with_ioctx(lambda io: self._read_rados(io, self._key(location)))

    async def contents(self) -> dict[str, bytes]:
        """location -> bytes of every object (for tests that store a few small ones)."""
        if self.root is not None:
            return {loc: await self.read(loc) for loc in sorted(await self.locations())}
        locations = await self.locations()
        return await self._with_ioctx(
            lambda io: {loc: self._read_rados(io, self._key(loc)) for loc in sorted(locations)})

    async def part_sizes(self, location: str) -> list[int]:
        """The sizes of the pieces the object is stored in: one file; one RADOS object, or its parts."""
        if self.root is not None:
            packed = PACKED.match(location)
            if packed:
                return [int(packed["size"])]
            return [(await asyncio.to_thread((self.root / location).stat)).st_size]

        def sizes(io: Any) -> list[int]:
            key = self._key(location)
            head = json.loads(io.get_xattr(key, MANIFEST_XATTR))
            if head["layout"] == "inline":
                return [int(head["size"])]
            return [int(p["size"]) for p in json.loads(io.read(key, int(head["manifest_bytes"])))["parts"]]
        return await self._with_ioctx(sizes)

    async def exists(self, location: str) -> bool:
        return location in await self.locations()

    # -- changing it behind vna's back -------------------------------------------------------------------

    async def remove(self, location: str) -> None:
        """Remove an object (and its parts) as an operator's mistake or a lost disk would."""
        if self.root is not None:
            await asyncio.to_thread(_remove_file, self.root, location)
            return

        def remove(io: Any) -> None:
            key = self._key(location)
            names = {o.key for o in io.list_objects()}
            for name in sorted(n for n in names if n == key or PART_SUFFIX.sub("", n) == key):
                io.remove_object(name)
        await self._with_ioctx(remove)

    async def rewrite(self, location: str, data: bytes) -> None:
        """Overwrite a filesystem object's bytes in place with as many others (bit rot, or its repair)."""
        assert self.root is not None
        await asyncio.to_thread(_rewrite_file, self.root, location, data)

    async def write_raw(self, location: str, data: bytes) -> None:
        """A file, or a RADOS object without manifest (what an interrupted write leaves)."""
        if self.root is not None:
            path = self.root / location
            path.parent.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(path.write_bytes, data)
            return
        await self._with_ioctx(lambda io: io.write_full(self._key(location), data))

    @contextlib.asynccontextmanager
    async def store(self) -> AsyncIterator[ObjectStore]:
        """vna's own store on the same place (to plant objects as vna writes them, or to sweep)."""
        if self.root is not None:
            yield FileSystemStore(self.root)
            return
        from archive.rados_store import RadosStore
        store = await RadosStore.open(self.rados)  # type: ignore[arg-type]
        try:
            yield store
        finally:
            await store.close()

    # -- RADOS -------------------------------------------------------------------------------------------

    @property
    def pool(self) -> str:
        assert self.rados is not None
        return self.rados.pool

    def _key(self, location: str) -> str:
        pool, _, key = location.partition("/")
        assert pool == self.pool and key, f"{location!r} is not a location in pool {self.pool!r}"
        return key

    async def _with_ioctx(self, work: Callable[[Any], T]) -> T:
        return await asyncio.to_thread(self._run, work)

    def _run(self, work: Callable[[Any], T]) -> T:
        with _ioctx(self.rados, self.pool) as io:  # type: ignore[arg-type]
            return work(io)

    @staticmethod
    def _read_rados(io: Any, key: str) -> bytes:
        head = json.loads(io.get_xattr(key, MANIFEST_XATTR))
        size = int(head["size"])
        if head["layout"] == "inline":
            data = io.read(key, size) if size else b""
        else:
            manifest = json.loads(io.read(key, int(head["manifest_bytes"])))
            assert (manifest["size"], manifest["digest"]) == (size, head["digest"])
            pieces = []
            for n, part in enumerate(manifest["parts"]):
                piece = io.read(f"{key}.part-{n:04d}", int(part["size"]))
                if "crc32c" in part:  # manifest version 2
                    assert f"{crc32c.crc32c(piece):08x}" == part["crc32c"], f"{key} part {n} is corrupt"
                else:
                    assert hashlib.sha256(piece).hexdigest() == part["sha256"], f"{key} part {n} is corrupt"
                pieces.append(piece)
            data = b"".join(pieces)
        assert len(data) == size, f"{key}: {len(data)} bytes, its manifest says {size}"
        assert digest_text(data, head["digest"]) == head["digest"], f"{key} does not match its digest"
        return data


# -- the filesystem, read without vna's code: layout as archive/segments.py documents it -------------------

PACKED = re.compile(r"^(?P<segment>(?:.*/)?\.segments/[^/@]+\.seg)@(?P<offset>\d+)\+(?P<size>\d+)$")
SEGMENT_MAGIC = b"VNASEG01"
SEGMENT_HEADER = 512
SEGMENT_ALIGN = 4096


def _segment_objects(path: Path, segment: str) -> set[str]:
    """The objects in one segment: every 4096-byte boundary that begins with a header, skipping its region."""
    found = set()
    with open(path, "rb") as f:
        end = os.fstat(f.fileno()).st_size
        offset = 0
        while offset + SEGMENT_HEADER <= end:
            head = os.pread(f.fileno(), SEGMENT_HEADER, offset)
            if not head.startswith(SEGMENT_MAGIC):
                offset += SEGMENT_ALIGN
                continue
            size = struct.unpack_from("<Q", head, len(SEGMENT_MAGIC))[0]
            found.add(f"{segment}@{offset + SEGMENT_HEADER}+{size}")
            offset += -(-(SEGMENT_HEADER + size) // SEGMENT_ALIGN) * SEGMENT_ALIGN
    return found


def _filesystem_locations(root: Path) -> set[str]:
    if not root.exists():
        return set()
    found = set()
    for p in root.rglob("*"):
        if not p.is_file():
            continue
        relative = p.relative_to(root).as_posix()
        if p.parent.name == ".segments" and p.name.endswith(".seg"):
            found |= _segment_objects(p, relative)
        else:
            found.add(relative)
    return found


def _read_file(root: Path, location: str) -> bytes:
    packed = PACKED.match(location)
    if not packed:
        return (root / location).read_bytes()
    with open(root / packed["segment"], "rb") as f:
        offset, size = int(packed["offset"]), int(packed["size"])
        head = os.pread(f.fileno(), SEGMENT_HEADER, offset - SEGMENT_HEADER)
        assert head.startswith(SEGMENT_MAGIC) and struct.unpack_from("<Q", head, 8)[0] == size, f"no object at {location}"
        data = os.pread(f.fileno(), size, offset)
    assert len(data) == size, f"{location}: {len(data)} bytes"
    return data


def _rewrite_file(root: Path, location: str, data: bytes) -> None:
    packed = PACKED.match(location)
    if not packed:
        assert (root / location).stat().st_size == len(data)
        (root / location).write_bytes(data)
        return
    assert int(packed["size"]) == len(data)
    with open(root / packed["segment"], "r+b") as f:
        os.pwrite(f.fileno(), data, int(packed["offset"]))


def _remove_file(root: Path, location: str) -> None:
    packed = PACKED.match(location)
    if not packed:
        (root / location).unlink()
        return
    # as a lost region would: its header and bytes gone (zeros where they were)
    offset, size = int(packed["offset"]), int(packed["size"])
    with open(root / packed["segment"], "r+b") as f:
        os.pwrite(f.fileno(), bytes(SEGMENT_HEADER + size), offset - SEGMENT_HEADER)


@contextlib.contextmanager
def _ioctx(settings: RadosSettings, pool: str) -> Iterator[Any]:
    """A librados client of the test's own (~20 ms to connect on loopback) and an I/O context on `pool`."""
    import rados

    conf = {"rados_osd_op_timeout": "30", "rados_mon_op_timeout": "30", "client_mount_timeout": "30"}
    if settings.keyring is not None:
        conf["keyring"] = str(settings.keyring)
    client = rados.Rados(conffile=str(settings.conffile or ""), name=settings.client_name, conf=conf)
    client.connect()
    try:
        with client.open_ioctx(pool) as io:
            yield io
    finally:
        client.shutdown()
