"""The one ingest path. C-STORE and STOW-RS both end here.

Order of work, so that nothing acknowledged is lost and nothing half-stored is visible:
1. parse and validate (no I/O); refuse with InvalidInstance;
2. write the object durably (hashing it as it is written) under a key of its own (UIDs and a part unique
   to the write), or, on the filesystem, in a fresh region of a segment (archive/segments.py): no two
   ingests ever write the same object, so deleting one the index no longer names (a replaced version, a
   refused or unneeded copy) cannot remove what a concurrent ingest of the same bytes just indexed;
3. index it in one transaction (the duplicate policy is applied there, under a row lock);
4. only then report success. A crash between 2 and 3 leaves an object that no index row names:
   `sweep_orphans` deletes such objects once they are older than the grace period (a segment's, once the
   segment is unchanged for that long and no writer holds it).
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import time
from dataclasses import dataclass
from collections.abc import Awaitable, Callable
from typing import Any

from archive.attributes import Level
from archive.config import IngestSettings
from archive.errors import DuplicateConflict, InvalidInstance, VnaError
from archive.index import Index
from archive.instance import ParsedInstance, file_meta, parse_instance, split_part10
from archive.objectstore import FileSystemStore, ObjectStore
from archive.policy import Attributes
from archive.stores import StoreRegistry
from archive.query import Query, QueryKey
from metrics.registry import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class IngestResult:
    parsed: ParsedInstance
    outcome: str  # 'stored' | 'duplicate' | 'replaced'


class Ingestor:
    def __init__(self, index: Index, store: ObjectStore, settings: IngestSettings, metrics: Metrics, *,
                 db_timeout: float = 30.0, store_timeout: float = 60.0, stores: StoreRegistry | None = None) -> None:
        """`stores` reads recorded objects (and places new ones); None: `store` alone, one class "default"."""
        self.index = index
        self.store = store
        self.stores = stores or StoreRegistry.single(store)
        self.settings = settings
        self.metrics = metrics
        self._db_timeout = db_timeout
        self._store_timeout = store_timeout

    async def ingest_dataset(self, dataset: bytes, *, transfer_syntax_uid: str, protocol: str, source: str,
                             source_ae: str | None = None, affected_sop_class_uid: str | None = None,
                             affected_sop_instance_uid: str | None = None) -> IngestResult:
        """Store a data set received without File Meta Information (C-STORE), exactly as received."""
        parsed = self._parse(dataset, transfer_syntax_uid, affected_sop_class_uid, affected_sop_instance_uid)
        meta = file_meta(parsed.sop_class_uid, parsed.sop_instance_uid, transfer_syntax_uid, source_ae)
        return await self._commit(parsed, [meta, dataset], len(meta), protocol=protocol, source=source,
                                  calling_ae=source_ae)

    async def ingest_part10(self, data: bytes, *, protocol: str, source: str, calling_ae: str | None = None,
                            admit: Callable[[ParsedInstance], None] | None = None,
                            before_index: Callable[[], Awaitable[object]] | None = None,
                            queued: Callable[[], None] | None = None) -> IngestResult:
        """Store a PS3.10 file (STOW-RS) exactly as received, File Meta Information included.
        `calling_ae`: the sender's AE title when it has one (storage policies may match on it).
        `admit`: the caller's own checks of the parsed instance (e.g. STOW-RS's target study), run before
        anything is written; InvalidInstance from it refuses the instance like a failed parse.
        `before_index`: awaited between writing the object and queueing it for indexing; `queued`: called once it
        is queued. The index keeps the order of its queue (`Index.submit_instance`), so STOW-RS writes several
        parts at once, queues each after the one before it and has them indexed in the order of the body."""
        try:
            ts, offset = split_part10(data)
        except InvalidInstance as exc:
            self.metrics.ingest_failures.labels(exc.code).inc()
            raise
        parsed = self._parse(data, ts, None, None, start=offset)  # parsed where it lies: no copy
        if admit is not None:
            try:
                admit(parsed)
            except InvalidInstance as exc:
                self.metrics.ingest_failures.labels(exc.code).inc()
                raise
        return await self._commit(parsed, [data], offset, protocol=protocol, source=source, calling_ae=calling_ae,
                                  before_index=before_index, queued=queued)

    def _parse(self, dataset: bytes, ts: str, sop_class: str | None, sop_instance: str | None, *,
               start: int = 0) -> ParsedInstance:
        """Parse the data set in `dataset` from offset `start`."""
        try:
            if len(dataset) - start > self.settings.max_instance_bytes:
                raise InvalidInstance(f"instance of {len(dataset) - start} bytes exceeds the limit of "
                                      f"{self.settings.max_instance_bytes}", status=0xA700, code="too-large")
            return parse_instance(dataset, ts, affected_sop_class_uid=sop_class,
                                  affected_sop_instance_uid=sop_instance, start=start)
        except InvalidInstance as exc:
            self.metrics.ingest_failures.labels(exc.code).inc()
            raise

    async def _commit(self, parsed: ParsedInstance, parts: list[bytes], dataset_offset: int, *,
                      protocol: str, source: str, calling_ae: str | None,
                      before_index: Callable[[], Awaitable[object]] | None = None,
                      queued: Callable[[], None] | None = None) -> IngestResult:
        started = time.perf_counter()
        try:
            # the storage policy's rules choose the class, hence the store and pool (archive/policy.py)
            placement = self.stores.choose(Attributes(
                institution_name=_first_text(parsed.metadata, "00080080"), calling_ae=calling_ae,
                protocol=protocol, modality=_first_text(parsed.metadata, "00080060")))
            key = object_key(parsed.study_instance_uid, parsed.series_instance_uid, parsed.sop_instance_uid)
            obj = await placement.put(key, parts, timeout=self._store_timeout, pack=True)
            if before_index is not None:
                await before_index()  # a failure or cancellation here leaves an orphan for the sweeper
            indexed = self.index.submit_instance(
                parsed, obj, store=placement.store_name, dataset_offset=dataset_offset, source=source,
                policy=self.settings.duplicate_policy, timeout=self._db_timeout,
                storage_class=placement.storage_class)
            if queued is not None:
                queued()
            result = await indexed
        except VnaError as exc:
            self.metrics.ingest_failures.labels(type(exc).__name__).inc()
            raise
        if result.obsolete_location is not None:
            await self._discard(result.obsolete_store or self.store.name, result.obsolete_location)
        outcome = result.outcome
        if outcome == "conflict" and await self._same_data_set(parsed, parts, dataset_offset):
            outcome = "duplicate"
        if outcome == "conflict":
            self.metrics.ingest_failures.labels("conflict").inc()
            raise DuplicateConflict(f"SOP Instance {parsed.sop_instance_uid} is already stored with other "
                                    "content (duplicate policy: reject)")
        self.metrics.stored_instances.labels(outcome, protocol).inc()
        self.metrics.stored_bytes.labels(protocol).inc(sum(map(len, parts)))
        self.metrics.ingest_latency.labels(protocol).observe(time.perf_counter() - started)
        return IngestResult(parsed, outcome)

    async def _same_data_set(self, parsed: ParsedInstance, parts: list[bytes], dataset_offset: int) -> bool:
        """Is the instance already stored under this SOP Instance UID the same data set in the same transfer
        syntax? The digest covers the whole object, File Meta Information included, which differs when one
        instance arrives over C-STORE and STOW-RS, or from two AE titles: that is a duplicate, not a conflict."""
        query = Query(level=Level.IMAGE, keys=(QueryKey(0x00080018, "UI", parsed.sop_instance_uid),),
                      top=Level.STUDY)
        try:
            found = await self.index.locate(query, timeout=self._db_timeout)
            if len(found) != 1 or found[0].transfer_syntax_uid != parsed.transfer_syntax_uid:
                return False
            existing = await self.stores.for_location(found[0].store, found[0].location).get(
                found[0].location, offset=found[0].dataset_offset, timeout=self._store_timeout)
        except VnaError as exc:
            log.warning("could not compare %s with the stored instance: %s", parsed.sop_instance_uid, exc)
            return False
        return existing == b"".join(parts)[dataset_offset:]

    async def _discard(self, store_name: str, location: str) -> None:
        # The index no longer names this object; if the delete fails the orphan sweeper retries it.
        try:
            await self.stores.for_location(store_name, location).delete(location, timeout=self._store_timeout)
        except VnaError as exc:
            log.warning("could not delete obsolete object %s: %s", location, exc)


class _UniqueSuffix:
    """96 random bits drawn once per process, then a counter: unique like a random part per object, without
    the getrandom system call of each (1.7 % of a STOW-RS worker's samples)."""

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self._prefix = secrets.token_hex(12)
        self._count = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._count):x}"


_unique_suffix = _UniqueSuffix()
os.register_at_fork(after_in_child=_unique_suffix.reseed)  # a forked child must not repeat its parent's keys


def object_key(study_uid: str, series_uid: str, sop_uid: str) -> str:
    """A key no other write uses: the UIDs and a part unique to this write (see the module docstring)."""
    return f"{study_uid}/{series_uid}/{sop_uid}.{_unique_suffix()}.dcm"


def _first_text(metadata: dict[str, Any], tag_hex: str) -> str | None:
    values = (metadata.get(tag_hex) or {}).get("Value") or [None]
    return values[0] if isinstance(values[0], str) else None


async def sweep_orphans(index: Index, store: ObjectStore, *, grace_seconds: float, metrics: Metrics,
                        timeout: float = 30.0) -> int:
    """Delete objects older than `grace_seconds` that no index row names; return how many."""
    removed = 0
    async for location in store.list_older_than(grace_seconds):
        if ".tmp-" in location or not await index.has_object(store.name, location, timeout=timeout):
            await store.delete(location, timeout=timeout)
            removed += 1
    if isinstance(store, FileSystemStore):
        # a segment's objects are pruned together, when no writer holds it (archive/segments.py)
        for segment in await store.idle_segments(grace_seconds, timeout=timeout):
            keep = await index.locations_under(store.name, f"{segment}@", timeout=timeout)
            removed += await store.prune_segment(segment, keep, timeout=timeout)
    metrics.orphans_removed.inc(removed)
    return removed
