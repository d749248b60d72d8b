"""Group commit in the index (archive/index.py `Index.submit_instance`), against the real PostgreSQL:
instances queued while a transaction is in flight are indexed together, in queue order, and a batch that
fails is retried one instance per transaction so that only the bad instance is refused."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from pydicom.uid import generate_uid

from archive.config import DuplicatePolicy
from archive.errors import DatabaseError
from archive.index import Index, StoreOutcome
from archive.instance import ParsedInstance, parse_instance, split_part10
from archive.objectstore import StoredObject
from tests.test_stow import make_instance


_SERIES: dict[str, str] = {}


def parsed_instance(study: str, *, description: str = "batch") -> ParsedInstance:
    """A new instance of `study`, in one series per study."""
    data = make_instance(study=study, series=_SERIES.setdefault(study, generate_uid()), description=description)
    ts, offset = split_part10(data)
    return parse_instance(data, ts, start=offset)


def submit(index: Index, parsed: ParsedInstance) -> asyncio.Future[StoreOutcome]:
    obj = StoredObject(location=f"{parsed.sop_instance_uid}.dcm", size=1, digest="sha256:" + "0" * 64)
    return index.submit_instance(parsed, obj, store="default", dataset_offset=0, source="test",
                                 policy=DuplicatePolicy.reject, timeout=10)


async def rows_of(index: Index, study: str) -> list[tuple[str, object]]:
    """(SOP Instance UID, its transaction), in the order rows were inserted. The transaction is told by
    created_at, now(): the start of the inserting transaction."""
    rows = await index.pool.fetch(
        "SELECT i.sop_instance_uid, i.created_at AS tx FROM instance i JOIN series s ON s.pk = i.series_fk "
        "JOIN study st ON st.pk = s.study_fk WHERE st.study_instance_uid = $1 ORDER BY i.pk", study)
    return [(r["sop_instance_uid"], r["tx"]) for r in rows]


async def test_instances_queued_together_share_one_transaction_in_queue_order(index: Index) -> None:
    study = generate_uid()
    parsed = [parsed_instance(study) for _ in range(12)]
    futures = [submit(index, p) for p in parsed]  # all queued before the writer runs
    outcomes = await asyncio.gather(*futures)
    assert [o.outcome for o in outcomes] == ["stored"] * 12
    rows = await rows_of(index, study)
    assert [uid for uid, _ in rows] == [p.sop_instance_uid for p in parsed]
    assert len({tx for _, tx in rows}) == 1  # one transaction: one commit for all twelve


async def test_a_batch_is_one_transaction_without_subtransactions(index: Index) -> None:
    """vna_store_instance inserts without a BEGIN ... EXCEPTION block (migration 0003): every row of a batch
    carries the batch transaction's own ID, as the study and series rows it created do, instead of one
    subtransaction ID per instance (which brought anti-wraparound vacuums twice as soon)."""
    study = generate_uid()
    outcomes = await asyncio.gather(*(submit(index, parsed_instance(study)) for _ in range(12)))
    assert [o.outcome for o in outcomes] == ["stored"] * 12
    xmins = await index.pool.fetch(
        "SELECT DISTINCT x FROM (SELECT i.xmin::text AS x FROM instance i JOIN series s ON s.pk = i.series_fk "
        "JOIN study st ON st.pk = s.study_fk WHERE st.study_instance_uid = $1 "
        "UNION ALL SELECT st.xmin::text FROM study st WHERE st.study_instance_uid = $1) AS t", study)
    assert len(xmins) == 1


async def test_batches_are_bounded_and_keep_the_queue_order(database_url: str, index: Index) -> None:
    small = Index(index.pool, batch_max=5)
    study = generate_uid()
    parsed = [parsed_instance(study) for _ in range(12)]
    outcomes = await asyncio.gather(*(submit(small, p) for p in parsed))
    assert {o.outcome for o in outcomes} == {"stored"}
    rows = await rows_of(index, study)
    assert [uid for uid, _ in rows] == [p.sop_instance_uid for p in parsed]
    transactions = [tx for _, tx in rows]
    # 5 + 5 + 2, one transaction after the other
    assert [transactions.count(tx) for tx in dict.fromkeys(transactions)] == [5, 5, 2]


async def test_a_row_the_database_refuses_fails_alone(index: Index) -> None:
    study = generate_uid()
    good = [parsed_instance(study) for _ in range(4)]
    # text with a NUL character is refused by PostgreSQL: the whole batch's transaction fails
    bad = dataclasses.replace(good[2], sop_instance_uid=generate_uid(),
                              columns={**good[2].columns, "study_description": "bad\x00text"})
    futures = [submit(index, p) for p in (*good[:2], bad, *good[2:])]
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert isinstance(results[2], DatabaseError)
    assert [r.outcome for r in results if isinstance(r, StoreOutcome)] == ["stored"] * 4
    rows = await rows_of(index, study)
    # the others were retried one per transaction, still in queue order
    assert [uid for uid, _ in rows] == [p.sop_instance_uid for p in good]
    assert len({tx for _, tx in rows}) == 4


async def test_duplicates_in_one_batch_are_decided_in_order(index: Index) -> None:
    study = generate_uid()
    first = parsed_instance(study)
    futures = [submit(index, first), submit(index, first)]
    assert [(await f).outcome for f in futures] == ["stored", "duplicate"]
    assert len(await rows_of(index, study)) == 1


async def test_a_caller_that_stops_waiting_does_not_stop_the_others(index: Index) -> None:
    study = generate_uid()
    parsed = [parsed_instance(study) for _ in range(3)]
    futures = [submit(index, p) for p in parsed]
    futures[1].cancel()  # before the writer ran: that instance is not indexed (its object is an orphan)
    assert [(await f).outcome for f in (futures[0], futures[2])] == ["stored", "stored"]
    with pytest.raises(asyncio.CancelledError):
        await futures[1]
    assert [uid for uid, _ in await rows_of(index, study)] == [parsed[0].sop_instance_uid,
                                                               parsed[2].sop_instance_uid]
