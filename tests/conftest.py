"""Shared fixtures: one real PostgreSQL for the session (the embedded one vna itself uses), a fresh
database per test, and the archive objects built on it."""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pydicom.config
import pytest

from archive.config import DuplicatePolicy, IngestSettings
from archive.database import create_pool, migrate
from archive.embedded_pg import EmbeddedPostgres
from archive.index import Index
from archive.ingest import Ingestor
from archive.objectstore import FileSystemStore
from metrics.registry import Metrics

# Test data and invalid input produce pydicom validation warnings; vna reads with validation off too.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

_counter = itertools.count()


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """DSN of the session's PostgreSQL (database 'vna'); $VNA_TEST_DATABASE_URL overrides."""
    if url := os.environ.get("VNA_TEST_DATABASE_URL"):
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="vna-test-pg-") as d:
        pg = EmbeddedPostgres(Path(d))
        dsn = pg.ensure_running()
        try:
            yield dsn
        finally:
            pg.stop()


@pytest.fixture
async def database_url(pg_dsn: str) -> AsyncIterator[str]:
    """A fresh, migrated database for one test, dropped afterwards."""
    name = f"t_{os.getpid()}_{next(_counter)}"
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        url = pg_dsn.rsplit("/", 1)[0] + "/" + name
        conn = await asyncpg.connect(url)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        yield url
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
    finally:
        await admin.close()


@pytest.fixture
async def index(database_url: str) -> AsyncIterator[Index]:
    pool = await create_pool(database_url, min_size=1, max_size=4, command_timeout=30)
    try:
        yield Index(pool)
    finally:
        await pool.close()


@pytest.fixture
def store(tmp_path: Path) -> FileSystemStore:
    return FileSystemStore(tmp_path / "objects")


def make_ingestor(index: Index, store: FileSystemStore, policy: DuplicatePolicy = DuplicatePolicy.reject) -> Ingestor:
    return Ingestor(index, store, IngestSettings(duplicate_policy=policy), Metrics())


@pytest.fixture
def ingestor(index: Index, store: FileSystemStore) -> Ingestor:
    return make_ingestor(index, store)
