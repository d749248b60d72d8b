"""The index's statements are planned once per connection (archive/database.py SESSION_SETTINGS), and a
wildcard search still reaches its index then (archive/query.py `_prefix_range`). Against a real PostgreSQL.

With plan_cache_mode left at `auto`, PostgreSQL plans a prepared statement again at every run whenever its
generic plan looks dearer than the custom plans of its first runs: QIDO-RS study searches fell into that
after autovacuum analyzed a freshly loaded index and lost a third of their rate (docs/performance.md).
"""

from __future__ import annotations

from archive.attributes import Level
from archive.index import Index
from archive.query import Query, QueryKey, build_json_sql, build_sql
from gateway.web.qido import build_search

PATIENT_NAME = 0x00100010


async def _fill_patients(index: Index, count: int) -> None:
    await index.pool.execute(
        "INSERT INTO patient (patient_id, patient_name, attrs) "
        "SELECT 'PID' || n, 'name' || lpad(n::text, 6, '0') || '^given', "
        "jsonb_build_object('00100020', jsonb_build_object('vr', 'LO', 'Value', jsonb_build_array('PID' || n))) "
        "FROM generate_series(1, $1) AS n", count)
    await index.pool.execute("INSERT INTO patient (patient_id, patient_name, attrs) VALUES "
                             "('DOE1', 'doe^jane', '{}'), ('DOE2', 'doe^john', '{}'), ('X', 'dodd^x', '{}')")
    await index.pool.execute("ANALYZE patient")


async def test_statements_run_on_generic_plans(index: Index):
    """A QIDO-RS study search run again and again on one connection is never planned for its values."""
    await _fill_patients(index, 2000)
    sql, args = build_json_sql(build_search(Level.STUDY, [("PatientID", "PID7")], {}).query)
    async with index.pool.acquire() as conn:
        assert await conn.fetchval("SHOW plan_cache_mode") == "force_generic_plan"
        for n in range(1, 9):
            await conn.fetchval(sql, f"PID{n}")
        generic, custom = await conn.fetchrow(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement = $1", sql)
    assert (generic, custom) == (8, 0)
    assert args == ["PID7"]


async def test_a_wildcard_prefix_uses_the_name_index_in_a_generic_plan(index: Index):
    """`DOE*` becomes a byte-wise range on patient_name besides the LIKE: the generic plan scans
    patient_name_idx (text_pattern_ops) instead of reading every patient, and matches what LIKE alone does."""
    await _fill_patients(index, 20000)
    sql, args = build_sql(Query(level=Level.PATIENT, keys=(QueryKey(PATIENT_NAME, "PN", "Doe*"),)))
    assert args == ["doe", "dof", "doe%"]
    async with index.pool.acquire() as conn:
        await conn.execute(f"PREPARE by_name AS {sql}")
        plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN EXECUTE by_name('doe', 'dof', 'doe%')"))
        found = await conn.fetch(sql, *args)
        by_like = await conn.fetchval("SELECT count(*) FROM patient WHERE patient_name LIKE 'doe%'")
    assert "patient_name_idx" in plan and "$1" in plan, plan  # a generic plan ($n unresolved), on the index
    assert "Seq Scan" not in plan, plan
    assert len(found) == by_like == 2
