"""The object stores of one process: where each storage class writes, and which store reads a recorded object.

Writes go by storage class: `registry.choose(attrs)` (the policy's rules) or `registry.placement(name)` give a
`Placement`, the store and pool new objects of that class are put in. Reads go by what the index recorded:
`registry.for_location(store_name, location)` is the store that reads it, whatever its class, so an object
stays readable when the policy changes or its class is no longer configured.

- RADOS: one `RadosConnection` per process; one `RadosStore` per pool, all sharing it. A location is
  `<pool>/<key>` and any of them reads any pool, so reads need no lookup by pool.
- Filesystem: one `FileSystemStore`; with a policy file each class's pool is a subdirectory of the root (the
  location is `<pool>/<key>`), without one objects are where they always were (no prefix).

Without a policy file there is one class, "default", on the configured backend and pool: as before policies.
`reload(policy)` opens what a new policy needs and then swaps policy and placements in one assignment, so a
concurrent ingest sees either the old pair or the new one.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from archive.config import DigestAlgorithm, Settings, StorageBackend
from archive.errors import ConfigError, StorageError
from archive.objectstore import FileSystemStore, ObjectStore, StoredObject
from archive.policy import Attributes, Policy, StorageClass


@dataclass(frozen=True, slots=True)
class Placement:
    """Where new objects of one storage class are written."""

    storage_class: str
    store: ObjectStore
    pool: str | None       # the RADOS pool, or the filesystem store's subdirectory (None: the root)
    key_prefix: str = ""   # filesystem only: "<pool>/"
    location_prefix: str = ""  # what the store puts before a key in the location: "<pool>/"

    @property
    def store_name(self) -> str:
        return self.store.name

    def location_of(self, key: str) -> str:
        """The location `put(key, ...)` returns (known before writing: a move journals it first)."""
        return self.location_prefix + key

    async def put(self, key: str, parts: Sequence[bytes], *, digest: str | None = None,
                  timeout: float, pack: bool = False) -> StoredObject:
        """Write an object; its location is `location_of(key)`, unless `pack` lets a filesystem store put it in a
        segment (archive/segments.py) at a location of its choosing (ingest does; a move, which journals the
        location first, does not)."""
        return await self.store.put(self.key_prefix + key, parts, digest=digest, timeout=timeout,
                                    pack_prefix=self.key_prefix if pack else None)


class _Backend(Protocol):
    readers: dict[str, ObjectStore]

    async def place(self, storage_class: StorageClass) -> Placement: ...

    def sweep_stores(self) -> list[ObjectStore]: ...

    async def close(self) -> None: ...


class _OneStore:
    """Any single store, every class on it (tests, and a store built outside `open_stores`)."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self.readers = {store.name: store}

    async def place(self, storage_class: StorageClass) -> Placement:
        pool = getattr(self.store, "pool", None)
        return Placement(storage_class.name, self.store, pool, "", f"{pool}/" if pool else "")

    def sweep_stores(self) -> list[ObjectStore]:
        return [self.store]

    async def close(self) -> None:
        return None


class _FileSystemBackend(_OneStore):
    async def place(self, storage_class: StorageClass) -> Placement:
        pool = storage_class.pool or None
        prefix = f"{pool}/" if pool else ""
        return Placement(storage_class.name, self.store, pool, prefix, prefix)

    async def close(self) -> None:
        if isinstance(self.store, FileSystemStore):
            self.store.close()  # the segments it writes into: descriptors and flocks let go


class _RadosBackend:
    def __init__(self, connection: Any, part_size: int, default_pool: str, digest: DigestAlgorithm) -> None:
        from archive.rados_store import RadosStore
        self._make = lambda pool: RadosStore(connection, pool=pool, part_size=part_size, digest=digest)
        self.connection = connection
        self._by_pool: dict[str, ObjectStore] = {}
        # any RadosStore reads every pool (the pool is in the location)
        self.readers = {"rados": self._store(default_pool)}

    def _store(self, pool: str) -> ObjectStore:
        if pool not in self._by_pool:
            self._by_pool[pool] = self._make(pool)
        return self._by_pool[pool]

    async def place(self, storage_class: StorageClass) -> Placement:
        try:
            await self.connection.ioctx(storage_class.pool)  # the pool must exist
        except StorageError as exc:
            raise ConfigError(f"storage class {storage_class.name!r}: {exc}") from exc
        pool = storage_class.pool
        return Placement(storage_class.name, self._store(pool), pool, "", f"{pool}/")

    def sweep_stores(self) -> list[ObjectStore]:
        return list(self._by_pool.values())

    async def close(self) -> None:
        await self.connection.close()


class _UnknownStore:
    """Reads of a store this process does not have fail like a store failure (StorageError), when awaited."""

    def __init__(self, name: str, known: Sequence[str]) -> None:
        self.name = name
        self._why = (f"objects of store {name!r} are not reachable from this process "
                     f"(configured: {', '.join(known) or 'none'})")

    async def put(self, key: str, parts: Sequence[bytes], *, digest: str | None = None,
                  timeout: float = 60.0, pack_prefix: str | None = None) -> StoredObject:
        raise StorageError(self._why)

    async def get(self, location: str, *, offset: int = 0, timeout: float = 60.0) -> bytes:
        raise StorageError(self._why)

    async def stream(self, location: str, *, offset: int = 0, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        raise StorageError(self._why)
        yield b""  # an async generator, like every store's stream

    async def delete(self, location: str, *, timeout: float = 60.0) -> None:
        raise StorageError(self._why)

    async def stat(self, location: str, *, timeout: float = 60.0) -> int:
        raise StorageError(self._why)

    async def list_older_than(self, age_seconds: float) -> AsyncIterator[str]:
        return
        yield ""


class StoreRegistry:
    """Storage classes to placements, recorded store names to stores; see the module docstring."""

    def __init__(self, backend: _Backend, policy: Policy, placements: dict[str, Placement]) -> None:
        self._backend = backend
        self._state = (policy, placements)

    @classmethod
    async def create(cls, backend: _Backend, policy: Policy) -> StoreRegistry:
        return cls(backend, policy, await _placements(backend, policy))

    @classmethod
    def single(cls, store: ObjectStore) -> StoreRegistry:
        """One store and one class, "default" (what an Ingestor built on a bare store uses)."""
        pool = getattr(store, "pool", None)
        policy = Policy.single(pool)
        placement = Placement(policy.default_class, store, pool, "", f"{pool}/" if pool else "")
        return cls(_OneStore(store), policy, {policy.default_class: placement})

    @property
    def policy(self) -> Policy:
        return self._state[0]

    @property
    def default(self) -> Placement:
        policy, placements = self._state
        return placements[policy.default_class]

    def placement(self, storage_class: str) -> Placement:
        """Where objects of `storage_class` are written; ConfigError if the policy has no such class."""
        try:
            return self._state[1][storage_class]
        except KeyError:
            raise ConfigError(f"no storage class {storage_class!r} in the policy {self.policy.source}") from None

    def choose(self, attrs: Attributes) -> Placement:
        """The placement the policy's rules give a new instance with `attrs`."""
        policy, placements = self._state  # one read: never a new policy with old placements
        return placements[policy.rule_for(attrs)]

    def for_location(self, store_name: str, location: str) -> ObjectStore:
        """The store that reads (and deletes) the object the index records as (`store_name`, `location`).

        Never raises: a store this process lacks fails each call on it with StorageError.
        """
        store = self._backend.readers.get(store_name)
        return store if store is not None else _UnknownStore(store_name, list(self._backend.readers))

    def sweep_stores(self) -> list[ObjectStore]:
        """Each store (one per RADOS pool) whose objects the orphan sweeper must list."""
        return self._backend.sweep_stores()

    async def reload(self, policy: Policy) -> None:
        """Switch to `policy` once everything it needs is open (ConfigError, and no change, otherwise)."""
        placements = await _placements(self._backend, policy)
        self._state = (policy, placements)

    async def close(self) -> None:
        await self._backend.close()


async def _placements(backend: _Backend, policy: Policy) -> dict[str, Placement]:
    return {name: await backend.place(c) for name, c in policy.classes.items()}


def filesystem_store(settings: Settings) -> FileSystemStore:
    """The filesystem store `settings` configure."""
    s = settings.storage
    return FileSystemStore(settings.object_root, fsync=s.fsync, digest=s.digest, pack_max_bytes=s.pack_max_bytes,
                           segment_bytes=s.segment_bytes)


@contextlib.asynccontextmanager
async def open_stores(settings: Settings, policy: Policy | None = None) -> AsyncIterator[StoreRegistry]:
    """The stores `settings` configure, placed by `policy` (None: one class "default" on the configured pool);
    the RADOS connection is flushed and shut down on exit. ConfigError if a class's pool does not exist."""
    backend: _Backend
    if settings.storage.backend is StorageBackend.rados:
        from archive.rados_store import RadosConnection  # librados only when configured
        rs = settings.storage.rados
        connection = RadosConnection(rs)
        try:
            await connection.connect()
            policy = policy or Policy.single(rs.pool)
            backend = _RadosBackend(connection, rs.part_size, policy.default.pool, settings.storage.digest)
            registry = await StoreRegistry.create(backend, policy)
        except BaseException:
            await connection.close()
            raise
    else:
        backend = _FileSystemBackend(filesystem_store(settings))
        registry = await StoreRegistry.create(backend, policy or Policy.single(None))
    try:
        yield registry
    finally:
        await registry.close()
