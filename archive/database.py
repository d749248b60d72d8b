"""PostgreSQL connection pool and versioned schema migrations."""

from __future__ import annotations

import json
import re
from importlib import resources

import asyncpg

from archive import jsontext
from archive.errors import DatabaseError

# Any fixed number: every replica takes the same advisory lock so only one migrates at a time.
_MIGRATION_LOCK = 0x766E61  # "vna"


def _migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every archive/migrations/NNNN_name.sql, in order."""
    found = []
    for entry in resources.files("archive.migrations").iterdir():
        m = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if m:
            found.append((int(m.group(1)), m.group(2), entry.read_text()))
    return sorted(found)


async def migrate(conn: asyncpg.Connection, *, timeout: float = 60.0) -> list[int]:
    """Apply the migrations this database lacks, each in its own transaction; return those applied."""
    applied = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK, timeout=timeout)
        try:
            await conn.execute("CREATE TABLE IF NOT EXISTS schema_migration (version integer PRIMARY KEY,"
                               " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migration")}
            for version, name, sql in _migrations():
                if version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(sql, timeout=timeout)
                    await conn.execute("INSERT INTO schema_migration (version, name) VALUES ($1, $2)",
                                       version, name)
                applied.append(version)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
    except (asyncpg.PostgresError, OSError) as exc:
        raise DatabaseError(f"migration failed: {exc}") from exc
    return applied


# Every statement vna sends is prepared once per connection (asyncpg's statement cache) and takes its values
# as parameters. With PostgreSQL's default plan_cache_mode (auto) a prepared statement whose generic plan is
# estimated dearer than the custom plans of its first five runs is planned again at every run; after
# autovacuum had analyzed a freshly loaded index, QIDO-RS study searches (about 0.4 ms of planning for 0.3 ms
# of execution) fell into that state and lost a third of their rate (docs/performance.md). Generic plans
# are planned once; vna's statements are key lookups and ranges whose best plan does not depend on the
# values, and LIKE prefixes are given as ranges the generic plan can use (archive/query.py `_prefix_range`).
# plan_cache_mode needs PostgreSQL 12 or later.
SESSION_SETTINGS = {"plan_cache_mode": "force_generic_plan"}


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=jsontext.dumps, decoder=json.loads, schema="pg_catalog")


async def _reset_connection(conn: asyncpg.Connection) -> None:
    # asyncpg's default reset is one more round trip on every release (pg_advisory_unlock_all, CLOSE ALL,
    # UNLISTEN *, RESET ALL) for session state vna never leaves behind: no SET, LISTEN or cursors, and the
    # two advisory locks (migrations, the mover) are released explicitly in a `finally`. A transaction left
    # open (its block cancelled) is still rolled back.
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


async def create_pool(dsn: str, *, min_size: int, max_size: int, command_timeout: float,
                      timeout: float = 30.0) -> asyncpg.Pool:
    """A pool whose connections decode jsonb to Python objects and plan each statement once."""
    try:
        return await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size, timeout=timeout,
                                         command_timeout=command_timeout, init=_init_connection,
                                         reset=_reset_connection, server_settings=SESSION_SETTINGS)
    except (asyncpg.PostgresError, OSError) as exc:
        raise DatabaseError(f"cannot connect to PostgreSQL: {exc}") from exc
