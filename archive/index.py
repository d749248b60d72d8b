"""The index in PostgreSQL: what is stored, where, and what queries match on."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg

from archive import jsontext
from archive.attributes import Level
from archive.config import DuplicatePolicy
from archive.errors import DatabaseError, MisuseError
from archive.instance import ParsedInstance
from archive.objectstore import StoredObject
from archive.query import Query, build_json_sql, build_sql, row_to_json


@dataclass(frozen=True, slots=True)
class StoreOutcome:
    outcome: str  # 'stored' | 'duplicate' | 'conflict' | 'replaced'
    obsolete_store: str | None  # an object the caller must delete now (replaced or unneeded copy)
    obsolete_location: str | None


@dataclass(frozen=True, slots=True)
class LocatedInstance:
    """Everything a retrieve needs to send one instance."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    store: str
    location: str
    dataset_offset: int
    size: int
    digest: str


@dataclass(frozen=True, slots=True)
class ApplicationEntity:
    ae_title: str
    host: str
    port: int


# what a failed or unreachable PostgreSQL raises through asyncpg
_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


def _translate(exc: Exception) -> DatabaseError:
    return DatabaseError(f"index: {exc}")


@dataclass(slots=True)
class _Queued:
    """An instance waiting in `Index.submit_instance`'s queue."""

    args: tuple[Any, ...]
    future: asyncio.Future[StoreOutcome]
    timeout: float


def _settle(queued: _Queued, outcome: StoreOutcome | Exception) -> None:
    if queued.future.done():  # the caller gave up waiting; what was indexed stays (its object is durable)
        return
    if isinstance(outcome, StoreOutcome):
        queued.future.set_result(outcome)
    else:
        error = _translate(outcome)
        error.__cause__ = outcome
        queued.future.set_exception(error)


_STORE_SQL = "SELECT outcome, old_store, old_location FROM vna_store_instance(" + ", ".join(
    f"${n}" for n in range(1, 43)) + ")"


class Index:
    """All reads and writes of the index go through here; every call takes a keyword-only timeout."""

    def __init__(self, pool: asyncpg.Pool, *, batch_max: int = 64) -> None:
        """`batch_max`: at most this many instances indexed in one transaction (`submit_instance`)."""
        self.pool = pool
        self._batch_max = batch_max
        self._queue: list[_Queued] = []
        self._writer: asyncio.Task[None] | None = None

    def submit_instance(self, parsed: ParsedInstance, obj: StoredObject, *, store: str, dataset_offset: int,
                        source: str, policy: DuplicatePolicy, timeout: float,
                        storage_class: str = "default") -> asyncio.Future[StoreOutcome]:
        """Queue one instance whose object is already durable for indexing; the future is its outcome.

        Instances queued while a transaction is in flight are indexed together in the next one (group
        commit: one round trip and one WAL flush for all of them), in the order they were queued, so what
        one caller queues in order is indexed in that order. Each instance is still all or nothing: a batch
        that fails is retried one instance per transaction, so one bad row refuses only itself.
        `storage_class` is the class (archive/policy.py) whose pool `obj` was written to."""
        c = parsed.columns
        la = parsed.level_attrs
        args = (
            c["patient_id"], c["issuer_of_patient_id"], c["patient_name"], c["patient_birth_date"],
            c["patient_sex"], la[Level.PATIENT],
            parsed.study_instance_uid, c["study_date"], c["study_time"], c["accession_number"], c["study_id"],
            c["referring_physician_name"], c["study_description"], la[Level.STUDY],
            parsed.series_instance_uid, c["modality"], c["series_number"], c["series_description"],
            c["series_date"], c["series_time"], c["body_part_examined"], c["institution_name"],
            c["pps_start_date"], c["pps_start_time"], la[Level.SERIES],
            parsed.sop_instance_uid, parsed.sop_class_uid, c["instance_number"], c["content_date"],
            c["content_time"], c["acquisition_datetime"], parsed.transfer_syntax_uid, store, obj.location,
            obj.size, obj.digest, dataset_offset, la[Level.IMAGE], jsontext.dumps(parsed.metadata), source,
            policy.value, storage_class,
        )
        loop = asyncio.get_running_loop()
        future: asyncio.Future[StoreOutcome] = loop.create_future()
        self._queue.append(_Queued(args, future, timeout))
        if self._writer is None:
            self._writer = loop.create_task(self._write_queued())
        return future

    async def _write_queued(self) -> None:
        """Index what is queued, a transaction at a time, until nothing is; then end (the next
        `submit_instance` starts another writer)."""
        try:
            while self._queue:
                batch = [q for q in self._queue[:self._batch_max] if not q.future.cancelled()]
                del self._queue[:self._batch_max]
                if not batch:
                    continue
                try:
                    await self._write_batch(batch)
                except BaseException as exc:
                    for q in batch:
                        if not q.future.done():
                            q.future.set_exception(DatabaseError(f"index: the index writer failed: {exc!r}"))
                    raise
        finally:
            self._writer = None
            for q in self._queue:  # only when this task itself was cancelled (the loop is closing)
                if not q.future.done():
                    q.future.set_exception(DatabaseError("index: the index writer stopped"))
            self._queue.clear()

    async def _write_batch(self, batch: list[_Queued]) -> None:
        timeout = min(q.timeout for q in batch)
        try:
            if len(batch) == 1:
                rows = [await self.pool.fetchrow(_STORE_SQL, *batch[0].args, timeout=timeout)]
            else:
                # one implicit transaction, pipelined: all rows or none (asyncpg executemany semantics)
                async with self.pool.acquire(timeout=timeout) as conn:
                    rows = await conn.fetchmany(_STORE_SQL, [q.args for q in batch], timeout=timeout)
        except _DB_ERRORS as exc:
            if len(batch) == 1:
                _settle(batch[0], exc)
                return
            # a deadlock with another replica's batch, one unacceptable row, a lost connection: each on its own
            for q in batch:
                if not q.future.cancelled():
                    await self._write_batch([q])
            return
        for q, row in zip(batch, rows, strict=True):
            _settle(q, StoreOutcome(row["outcome"], row["old_store"], row["old_location"]))

    async def find(self, query: Query, *, timeout: float) -> list[dict[str, Any]]:
        """DICOM JSON of every entity matching `query`, in a stable order."""
        sql, args = build_sql(query)
        try:
            rows = await self.pool.fetch(sql, *args, timeout=timeout)
        except _DB_ERRORS as exc:
            raise _translate(exc) from exc
        return [row_to_json(query, r) for r in rows]

    async def find_json(self, query: Query, *, timeout: float) -> str:
        """The DICOM JSON array text answering `query` (QIDO-RS), as `find` would encode it: built by
        PostgreSQL from the stored jsonb in one statement, so no row is decoded here."""
        sql, args = build_json_sql(query)
        try:
            return await self.pool.fetchval(sql, *args, timeout=timeout)
        except _DB_ERRORS as exc:
            raise _translate(exc) from exc

    async def find_pages(self, query: Query, *, timeout: float,
                         page_size: int = 100) -> AsyncIterator[list[dict[str, Any]]]:
        """Like `find`, a page at a time (bounded memory for large C-FIND answers, cancellable
        between pages); each page is one short statement, so no connection is held in between."""
        after = None
        while True:
            sql, args = build_sql(query, page_after=after, page_size=page_size)
            try:
                rows = await self.pool.fetch(sql, *args, timeout=timeout)
            except _DB_ERRORS as exc:
                raise _translate(exc) from exc
            if not rows:
                return
            yield [row_to_json(query, r) for r in rows]
            if len(rows) < page_size:
                return
            after = rows[-1]["pk"]

    async def locate(self, query: Query, *, timeout: float) -> list[LocatedInstance]:
        """Every instance at or under the entities `query` matches (C-MOVE, C-GET, WADO)."""
        image_query = Query(level=Level.IMAGE, keys=query.keys, top=query.top)
        sql, args = build_sql(image_query, select="i.sop_class_uid, i.sop_instance_uid, i.transfer_syntax_uid, "
                                                  "i.store, i.location, i.dataset_offset, i.size, i.digest")
        try:
            rows = await self.pool.fetch(sql, *args, timeout=timeout)
        except _DB_ERRORS as exc:
            raise _translate(exc) from exc
        return [LocatedInstance(*r) for r in rows]

    async def has_object(self, store: str, location: str, *, timeout: float) -> bool:
        """Does the index name this object: an instance's, or the old copy of a storage move awaiting its
        deletion (archive/moves.py deletes it once readers that located it before the switch are done)?"""
        try:
            return await self.pool.fetchval(
                "SELECT EXISTS (SELECT 1 FROM instance WHERE store = $1 AND location = $2) OR EXISTS "
                "(SELECT 1 FROM storage_move WHERE from_store = $1 AND from_location = $2 AND state = 'switched')",
                store, location, timeout=timeout)
        except _DB_ERRORS as exc:
            raise _translate(exc) from exc

    async def locations_under(self, store: str, prefix: str, *, timeout: float) -> set[str]:
        """Every location beginning with `prefix` that the index names (as `has_object` decides for one)."""
        try:
            rows = await self.pool.fetch(
                "SELECT location FROM instance WHERE store = $1 AND starts_with(location, $2) UNION "
                "SELECT from_location FROM storage_move WHERE from_store = $1 AND starts_with(from_location, $2) "
                "AND state = 'switched'", store, prefix, timeout=timeout)
        except _DB_ERRORS as exc:
            raise _translate(exc) from exc
        return {r[0] for r in rows}

    async def count_instances(self, *, timeout: float) -> int:
        try:
            return await self.pool.fetchval("SELECT count(*) FROM instance", timeout=timeout)
        except _DB_ERRORS as exc:
            raise _translate(exc) from exc

    # -- Application Entities (C-MOVE destinations) -----------------------------------------------
    async def ae_add(self, ae: ApplicationEntity, *, timeout: float) -> None:
        try:
            await self.pool.execute(
                "INSERT INTO application_entity (ae_title, host, port) VALUES ($1, $2, $3) "
                "ON CONFLICT (ae_title) DO UPDATE SET host = EXCLUDED.host, port = EXCLUDED.port",
                ae.ae_title, ae.host, ae.port, timeout=timeout)
        except asyncpg.CheckViolationError as exc:
            raise MisuseError(f"port {ae.port} is out of range") from exc
        except _DB_ERRORS as exc:
            raise _translate(exc) from exc

    async def ae_remove(self, ae_title: str, *, timeout: float) -> bool:
        try:
            result = await self.pool.execute("DELETE FROM application_entity WHERE ae_title = $1", ae_title,
                                             timeout=timeout)
        except _DB_ERRORS as exc:
            raise _translate(exc) from exc
        return result.endswith(" 1")

    async def ae_get(self, ae_title: str, *, timeout: float) -> ApplicationEntity | None:
        try:
            row = await self.pool.fetchrow("SELECT ae_title, host, port FROM application_entity WHERE ae_title = $1",
                                           ae_title, timeout=timeout)
        except _DB_ERRORS as exc:
            raise _translate(exc) from exc
        return ApplicationEntity(*row) if row else None

    async def ae_list(self, *, timeout: float) -> list[ApplicationEntity]:
        try:
            rows = await self.pool.fetch("SELECT ae_title, host, port FROM application_entity ORDER BY ae_title",
                                         timeout=timeout)
        except _DB_ERRORS as exc:
            raise _translate(exc) from exc
        return [ApplicationEntity(*r) for r in rows]

    async def delete_instances(self, study_instance_uid: str, series_instance_uid: str | None = None,
                               sop_instance_uid: str | None = None, *, timeout: float) -> list[tuple[str, str]]:
        """Remove a study, a series of it or one instance of that series from the index, with the series,
        studies and patients left empty, in one transaction; return the (store, location) of every object
        the removed rows named. The caller deletes those objects afterwards: a crash in between leaves
        objects no row names, which `sweep_orphans` removes."""
        try:
            async with self.pool.acquire(timeout=timeout) as conn, conn.transaction():
                rows = await conn.fetch(
                    "DELETE FROM instance i USING series s, study st "
                    "WHERE i.series_fk = s.pk AND s.study_fk = st.pk AND st.study_instance_uid = $1 "
                    "AND ($2::text IS NULL OR s.series_instance_uid = $2) "
                    "AND ($3::text IS NULL OR i.sop_instance_uid = $3) "
                    "RETURNING i.series_fk, i.store, i.location",
                    study_instance_uid, series_instance_uid, sop_instance_uid, timeout=timeout)
                if rows:
                    await conn.execute("SELECT vna_prune_series(fk) FROM unnest($1::bigint[]) AS fk",
                                       sorted({r["series_fk"] for r in rows}), timeout=timeout)
        except _DB_ERRORS as exc:
            raise _translate(exc) from exc
        return [(r["store"], r["location"]) for r in rows]

    # -- WADO-RS: one instance, series or study by its UIDs ------------------------------------------
    @staticmethod
    def _uid_filter(study_uid: str, series_uid: str | None, sop_uid: str | None) -> tuple[str, list[str]]:
        where, args = ["st.study_instance_uid = $1"], [study_uid]
        if series_uid is not None:
            args.append(series_uid)
            where.append(f"se.series_instance_uid = ${len(args)}")
        if sop_uid is not None:
            args.append(sop_uid)
            where.append(f"i.sop_instance_uid = ${len(args)}")
        return " AND ".join(where), args

    # series, then instances, in the order a viewer stacks them
    _WADO_FROM = "instance i JOIN series se ON se.pk = i.series_fk JOIN study st ON st.pk = se.study_fk"
    _WADO_ORDER = "se.series_number NULLS LAST, se.pk, i.instance_number NULLS LAST, i.pk"

    async def locate_by_uids(self, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None, *,
                             timeout: float) -> list[LocatedInstance]:
        """Every instance of a study, of one of its series, or the one instance (WADO-RS retrieve)."""
        where, args = self._uid_filter(study_uid, series_uid, sop_uid)
        sql = (f"SELECT i.sop_class_uid, i.sop_instance_uid, i.transfer_syntax_uid, i.store, i.location, "
               f"i.dataset_offset, i.size, i.digest FROM {self._WADO_FROM} WHERE {where} ORDER BY {self._WADO_ORDER}")
        try:
            rows = await self.pool.fetch(sql, *args, timeout=timeout)
        except _DB_ERRORS as exc:
            raise _translate(exc) from exc
        return [LocatedInstance(*r) for r in rows]

    async def metadata_json(self, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None, *,
                            base_url: str, timeout: float) -> str | None:
        """The stored DICOM JSON of the matching instances as one JSON array text (None: no match),
        with each relative BulkDataURI "bulk/XXXXXXXX" made absolute under
        `{base_url}/studies/{study}/series/{series}/instances/{sop}/` (PS3.18 F.2.6).

        Built in one query by text concatenation, never parsed: the metadata column holds JSON from
        json.dumps, where a `"BulkDataURI": "bulk/` can only be that key and its value.
        """
        where, args = self._uid_filter(study_uid, series_uid, sop_uid)
        # base_url comes from the request's Host header: JSON-escape it before splicing it into JSON
        prefix = json.dumps(base_url.rstrip("/") + "/studies/")[1:-1]
        args.append(prefix)
        uri = (f"${len(args)} || st.study_instance_uid || '/series/' || se.series_instance_uid || '/instances/' "
               f"|| i.sop_instance_uid || '/bulk/'")
        body = (f"replace(replace(i.metadata, '\"BulkDataURI\": \"bulk/', '\"BulkDataURI\": \"' || {uri}), "
                f"'\"BulkDataURI\":\"bulk/', '\"BulkDataURI\":\"' || {uri})")
        sql = f"SELECT string_agg({body}, ',' ORDER BY {self._WADO_ORDER}) FROM {self._WADO_FROM} WHERE {where}"
        try:
            text = await self.pool.fetchval(sql, *args, timeout=timeout)
        except _DB_ERRORS as exc:
            raise _translate(exc) from exc
        return None if text is None else f"[{text}]"
