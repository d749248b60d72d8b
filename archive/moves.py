"""Moves between storage classes: lifecycle steps and changed rules (`vna policy apply`).

An instance belongs in `policy.desired_class(attributes, age)` (archive/policy.py): the class its rules give
it, then its lifecycle steps by the time since it was stored. `Mover.run` moves every instance whose
recorded class differs, each through a row of `storage_move` (migration 0002), so that a crash at any point
loses nothing and a rerun finishes the job:

1. plan: a 'pending' row naming the old (store, location), the digest, the target class and the target
   location (a new key: a move never writes over anything another write uses);
2. copy: read the old copy, write it under the target location, read it back and compare its SHA-256 with
   the digest the index records; a mismatch leaves the row pending (and the instance where it was);
3. switch, in one statement: the instance row takes the new (store, location, class) only if it still names
   the old location and digest (else the instance was deleted or replaced meanwhile: the row is 'abandoned'
   and the copy removed), and the move row becomes 'switched';
4. after `grace_seconds`, delete the old copy and mark the row 'done'.

A reader always finds the object through the index row: the old copy until the switch commits, the new one
after. A reader that located the old copy just before the switch still finds it for `grace_seconds` (the
orphan sweeper leaves a switched move's old copy alone, Index.has_object). A crash before the switch leaves a
copy no row names: a rerun copies again (same location), else the sweeper removes it once old enough.
Pending rows of an earlier run are resumed first. One mover at a time (a PostgreSQL advisory lock held for
the run): two would race on the same rows.

Throttled by a token bucket on the bytes copied (MB/s); counted in vna_storage_moves_total{outcome} and
vna_storage_move_bytes_total. Objects are held whole in memory while copied (`concurrency` at once).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from archive import digest as digests
from archive.errors import DatabaseError, InternalError, MisuseError, StorageError, VnaError
from archive.ingest import object_key
from archive.policy import Attributes, Policy
from archive.stores import StoreRegistry
from metrics.registry import Metrics

log = logging.getLogger(__name__)

_MOVER_LOCK = 0x766E61_6D76  # "vna" "mv": one mover at a time in a database
_PLAN_BATCH = 500
_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)

# What the rules of the policy see of a stored instance: its own InstitutionName and Modality (as at ingest,
# from its DICOM JSON) and the protocol and calling AE title its `source` recorded ('dimse:AE' or 'dicomweb').
_CANDIDATES_SQL = """
SELECT i.pk, i.sop_instance_uid, i.storage_class, i.store, i.location, i.size, i.digest, i.source,
       st.study_instance_uid, se.series_instance_uid,
       (i.metadata::json -> '00080080' -> 'Value') ->> 0 AS institution_name,
       (i.metadata::json -> '00080060' -> 'Value') ->> 0 AS modality,
       extract(epoch FROM now() - i.created_at) / 86400.0 AS age_days
FROM instance i JOIN series se ON se.pk = i.series_fk JOIN study st ON st.pk = se.study_fk
WHERE i.pk > $1
  AND NOT EXISTS (SELECT 1 FROM storage_move m WHERE m.instance_fk = i.pk AND m.state = 'pending')
ORDER BY i.pk LIMIT $2
"""

_PLAN_SQL = """
INSERT INTO storage_move (instance_fk, sop_instance_uid, from_class, from_store, from_location, to_class, to_store,
                          to_location, size, digest)
SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                     $8::text[], $9::bigint[], $10::text[])
ON CONFLICT (instance_fk) WHERE state = 'pending' DO NOTHING
"""

_PENDING_SQL = """
SELECT pk, instance_fk, sop_instance_uid, from_class, from_store, from_location, to_class, to_store, to_location,
       size, digest
FROM storage_move WHERE state = 'pending' AND pk > $1 ORDER BY pk LIMIT $2
"""

# the switch: the instance takes the new location only if it still names the old one (one statement, atomic)
_SWITCH_SQL = """
WITH moved AS (
    UPDATE instance SET store = $2, location = $3, storage_class = $4
    WHERE pk = $5 AND store = $6 AND location = $7 AND digest = $8
    RETURNING pk)
UPDATE storage_move
SET state = CASE WHEN EXISTS (SELECT 1 FROM moved) THEN 'switched' ELSE 'abandoned' END,
    switched_at = CASE WHEN EXISTS (SELECT 1 FROM moved) THEN now() END,
    finished_at = CASE WHEN EXISTS (SELECT 1 FROM moved) THEN NULL ELSE now() END,
    reason = CASE WHEN EXISTS (SELECT 1 FROM moved) THEN NULL
                  ELSE 'the instance was deleted or replaced during the move' END
WHERE pk = $1 AND state = 'pending'
RETURNING state
"""

_SWITCHED_SQL = """
SELECT pk, from_store, from_location, extract(epoch FROM now() - switched_at) AS waited
FROM storage_move WHERE state = 'switched' ORDER BY switched_at LIMIT $1
"""


@dataclass(frozen=True, slots=True)
class MoveRow:
    pk: int
    instance_fk: int
    sop_instance_uid: str
    from_class: str
    from_store: str
    from_location: str
    to_class: str
    to_store: str
    to_location: str
    size: int
    digest: str


@dataclass(slots=True)
class MoveReport:
    resumed: int = 0      # pending rows of an earlier run taken up
    planned: int = 0      # new moves planned by this run
    moved: int = 0        # switched to their new class
    abandoned: int = 0    # instance deleted or replaced meanwhile: nothing switched
    failed: int = 0       # left pending (store error, digest mismatch): a rerun retries them
    deleted: int = 0      # old copies deleted after the grace
    bytes: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return (f"{self.moved} moved ({self.bytes / 1e6:.1f} MB in {self.seconds:.1f} s, {self.mb_per_s:.1f} MB/s), "
                f"{self.abandoned} abandoned, {self.failed} failed, {self.deleted} old copies deleted; "
                f"{self.planned} planned, {self.resumed} resumed")


def source_attributes(source: str, institution_name: str | None, modality: str | None) -> Attributes:
    """The rules' view of a stored instance from its recorded `source` ('dimse:AE', 'dicomweb', ...)."""
    protocol, _, calling_ae = source.partition(":")
    return Attributes(institution_name=institution_name, calling_ae=calling_ae or None, protocol=protocol,
                      modality=modality)


class _Throttle:
    """A token bucket of `rate` bytes per second shared by the copying tasks (None: no limit)."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self._start = time.monotonic()
        self._granted = 0.0

    async def take(self, n: int) -> None:
        if not self.rate:
            return
        self._granted += n
        delay = self._start + self._granted / self.rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -1.0:  # idle for a while: no burst of more than a second's worth
            self._start, self._granted = time.monotonic() - 1.0, self.rate * 1.0


class Mover:
    """Applies the registry's policy to what is stored; `await Mover(...).run()` (see the module docstring)."""

    def __init__(self, pool: asyncpg.Pool, stores: StoreRegistry, metrics: Metrics, *, grace_seconds: float = 60.0,
                 rate_bytes_per_s: float | None = None, concurrency: int = 8, db_timeout: float = 30.0,
                 store_timeout: float = 120.0) -> None:
        self.pool = pool
        self.stores = stores
        self.metrics = metrics
        self.grace = grace_seconds
        self.concurrency = concurrency
        self.db_timeout = db_timeout
        self.store_timeout = store_timeout
        self._throttle = _Throttle(rate_bytes_per_s)

    async def run(self, *, limit: int | None = None, wait_for_grace: bool = True) -> MoveReport:
        """Resume pending moves, plan and do new ones (at most `limit` in all), then delete old copies whose
        grace has passed (waiting for the last ones when `wait_for_grace`). MisuseError if another mover runs."""
        report = MoveReport()
        started = time.monotonic()
        try:
            lock_conn = await self.pool.acquire(timeout=self.db_timeout)
        except _DB_ERRORS as exc:
            raise DatabaseError(f"moves: {exc}") from exc
        try:
            if not await lock_conn.fetchval("SELECT pg_try_advisory_lock($1)", _MOVER_LOCK, timeout=self.db_timeout):
                raise MisuseError("another mover (vna policy apply, or a server applying the policy) is running")
            try:
                await self._delete_old_copies(report, wait=False)
                budget = limit if limit is not None else None
                budget = await self._resume(report, budget)
                policy = self.stores.policy  # one policy for the whole run, even if SIGHUP swaps it
                after = 0
                while budget is None or budget > 0:
                    batch, after = await self._plan(policy, after, budget, report)
                    if after is None:
                        break
                    if batch:
                        await self._process(batch, report)
                        if budget is not None:
                            budget -= len(batch)
                    await self._delete_old_copies(report, wait=False)
                await self._delete_old_copies(report, wait=wait_for_grace)
            finally:
                await lock_conn.execute("SELECT pg_advisory_unlock($1)", _MOVER_LOCK)
        except _DB_ERRORS as exc:
            raise DatabaseError(f"moves: {exc}") from exc
        finally:
            await self.pool.release(lock_conn)
        report.seconds = time.monotonic() - started
        return report

    # -- planning ---------------------------------------------------------------------------------------------

    async def _plan(self, policy: Policy, after: int, budget: int | None,
                    report: MoveReport) -> tuple[list[MoveRow], int | None]:
        """The next page of instances after pk `after` whose class differs from the policy's; journalled as
        pending moves. Returns (their rows, the last pk seen), (…, None) once every instance has been seen."""
        rows = await self.pool.fetch(_CANDIDATES_SQL, after, _PLAN_BATCH, timeout=self.db_timeout)
        if not rows:
            return [], None
        wanted = []
        for r in rows:
            attrs = source_attributes(r["source"], r["institution_name"], r["modality"])
            target = policy.desired_class(attrs, float(r["age_days"]))
            if target.name != r["storage_class"]:
                wanted.append((r, target.name))
            if budget is not None and len(wanted) >= budget:
                break
        last = rows[-1]["pk"] if budget is None or len(wanted) < budget else wanted[-1][0]["pk"]
        if not wanted:
            return [], last
        cols: list[list[Any]] = [[] for _ in range(10)]
        for r, target in wanted:
            placement = self.stores.placement(target)
            key = object_key(r["study_instance_uid"], r["series_instance_uid"], r["sop_instance_uid"])
            for col, value in zip(cols, (r["pk"], r["sop_instance_uid"], r["storage_class"], r["store"],
                                         r["location"], target, placement.store_name, placement.location_of(key),
                                         r["size"], r["digest"]), strict=True):
                col.append(value)
        await self.pool.execute(_PLAN_SQL, *cols, timeout=self.db_timeout)
        # what was journalled (a concurrent plan of the same instance is impossible: one mover at a time)
        planned = await self.pool.fetch(
            "SELECT pk, instance_fk, sop_instance_uid, from_class, from_store, from_location, to_class, to_store, "
            "to_location, size, digest FROM storage_move WHERE state = 'pending' AND instance_fk = ANY($1::bigint[]) "
            "ORDER BY pk", cols[0], timeout=self.db_timeout)
        report.planned += len(planned)
        return [MoveRow(*p) for p in planned], last

    async def _resume(self, report: MoveReport, budget: int | None) -> int | None:
        after = 0
        while budget is None or budget > 0:
            page = _PLAN_BATCH if budget is None else min(_PLAN_BATCH, budget)
            rows = [MoveRow(*r) for r in await self.pool.fetch(_PENDING_SQL, after, page, timeout=self.db_timeout)]
            if not rows:
                break
            after = rows[-1].pk
            report.resumed += len(rows)
            if budget is not None:
                budget -= len(rows)
            await self._process(rows, report)
        return budget

    # -- copying and switching ----------------------------------------------------------------------------------

    async def _process(self, rows: list[MoveRow], report: MoveReport) -> None:
        queue: asyncio.Queue[MoveRow] = asyncio.Queue()
        for row in rows:
            queue.put_nowait(row)

        async def worker() -> None:
            while not queue.empty():
                row = queue.get_nowait()
                outcome = await self._move_one(row, report)
                self.metrics.storage_moves.labels(outcome).inc()
                setattr(report, outcome, getattr(report, outcome) + 1)

        await asyncio.gather(*(worker() for _ in range(min(self.concurrency, len(rows)))))

    async def _move_one(self, row: MoveRow, report: MoveReport) -> str:
        """Copy, verify, switch one instance: 'moved', 'abandoned' or 'failed' (left pending)."""
        try:
            placement = self.stores.placement(row.to_class)
            if placement.store_name != row.to_store or not row.to_location.startswith(placement.location_prefix):
                # the class now names another pool (the policy changed since this was planned): plan again
                await self._abandon(row, f"class {row.to_class} now writes to {placement.pool}, not where planned")
                return "abandoned"
            key = row.to_location.removeprefix(placement.location_prefix)
            source = self.stores.for_location(row.from_store, row.from_location)
            data = await source.get(row.from_location, timeout=self.store_timeout)
            await self._throttle.take(len(data))
            written = await placement.put(key, [data], digest=row.digest, timeout=self.store_timeout)
            del data
            if written.location != row.to_location:
                raise InternalError(f"{row.sop_instance_uid}: written to {written.location}, planned {row.to_location}")
            back = await placement.store.get(written.location, timeout=self.store_timeout)
            actual = await asyncio.to_thread(digests.recompute, row.digest, back)
            if actual != row.digest or len(back) != row.size:
                await self._remove_copy(row)
                raise StorageError(f"{row.sop_instance_uid}: the copy at {row.to_location} reads back as {actual} "
                                  f"({len(back)} bytes), the index says {row.digest} ({row.size} bytes)")
            report.bytes += len(back)
            self.metrics.storage_move_bytes.inc(len(back))
            del back
            state = await self.pool.fetchval(_SWITCH_SQL, row.pk, row.to_store, row.to_location, row.to_class,
                                             row.instance_fk, row.from_store, row.from_location, row.digest,
                                             timeout=self.db_timeout)
        except (VnaError, *_DB_ERRORS) as exc:
            log.warning("move of %s to %s failed (left pending, a rerun retries it): %s", row.sop_instance_uid,
                        row.to_class, exc)
            if len(report.errors) < 20:
                report.errors.append(f"{row.sop_instance_uid}: {exc}")
            return "failed"
        if state == "switched":
            if self.grace <= 0:  # no reader to wait for: free the space now, not after the batch
                report.deleted += len(await self._delete_copies([(row.pk, row.from_store, row.from_location)]))
            return "moved"
        if state == "abandoned":
            await self._remove_copy(row)
        return "abandoned"

    async def _abandon(self, row: MoveRow, reason: str) -> None:
        await self.pool.execute("UPDATE storage_move SET state = 'abandoned', reason = $2, finished_at = now() "
                                "WHERE pk = $1 AND state = 'pending'", row.pk, reason, timeout=self.db_timeout)
        await self._remove_copy(row)

    async def _remove_copy(self, row: MoveRow) -> None:
        """Remove the target copy of a move that did not switch (never one an instance row names)."""
        try:
            if await self.pool.fetchval("SELECT EXISTS (SELECT 1 FROM instance WHERE store = $1 AND location = $2)",
                                        row.to_store, row.to_location, timeout=self.db_timeout):
                return
            await self.stores.for_location(row.to_store, row.to_location).delete(row.to_location,
                                                                                 timeout=self.store_timeout)
        except (VnaError, *_DB_ERRORS) as exc:
            log.warning("could not remove the unused copy %s (the orphan sweeper will): %s", row.to_location, exc)

    # -- old copies ---------------------------------------------------------------------------------------------

    async def _delete_old_copies(self, report: MoveReport, *, wait: bool) -> None:
        """Delete the old copies of switched moves once `grace` has passed since their switch; with `wait`,
        wait for the grace of every switched move first."""
        while True:
            rows = await self.pool.fetch(_SWITCHED_SQL, 1000, timeout=self.db_timeout)
            due = [r for r in rows if r["waited"] >= self.grace]
            if not due:
                if not wait or not rows:
                    return
                await asyncio.sleep(max(0.05, self.grace - float(rows[0]["waited"])))
                continue
            done = await self._delete_copies([(r["pk"], r["from_store"], r["from_location"]) for r in due])
            report.deleted += len(done)
            if len(done) < len(due):
                return  # a store failure: leave the rest to the next run

    async def _delete_copies(self, copies: list[tuple[int, str, str]]) -> list[int]:
        """Delete the old copies of switched moves (move pk, store, location); mark those deleted 'done'."""
        gate = asyncio.Semaphore(self.concurrency * 2)

        async def delete(pk: int, store: str, location: str) -> int | None:
            async with gate:
                try:
                    await self.stores.for_location(store, location).delete(location, timeout=self.store_timeout)
                except VnaError as exc:
                    log.warning("could not delete the old copy %s (retried next run): %s", location, exc)
                    return None
                return pk

        done = [pk for pk in await asyncio.gather(*(delete(*c) for c in copies)) if pk is not None]
        await self.pool.execute("UPDATE storage_move SET state = 'done', finished_at = now() "
                                "WHERE pk = ANY($1::bigint[]) AND state = 'switched'", done, timeout=self.db_timeout)
        return done


async def pending_counts(pool: asyncpg.Pool, *, timeout: float = 30.0) -> dict[str, int]:
    """How many moves are in each state (for `vna policy apply --status` and tests)."""
    try:
        rows = await pool.fetch("SELECT state, count(*) AS n FROM storage_move GROUP BY state", timeout=timeout)
    except _DB_ERRORS as exc:
        raise DatabaseError(f"moves: {exc}") from exc
    return {r["state"]: int(r["n"]) for r in rows}

