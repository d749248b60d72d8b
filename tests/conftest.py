"""Shared fixtures: one real PostgreSQL for the session (the embedded one vna itself uses), a fresh
database per test, and the archive objects built on it."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from pathlib import Path

import asyncpg
import pydicom.config
import pytest

from archive.config import DuplicatePolicy, IngestSettings, Settings
from archive.database import create_pool, migrate
from archive.embedded_pg import EmbeddedPostgres
from archive.index import Index
from archive.ingest import Ingestor
from archive.objectstore import FileSystemStore
from gateway.runtime import Runtime
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


# -- a live server in the test's event loop ----------------------------------------------------------

DCMTK = Path("/usr/bin")


def settings_for(tmp_path: Path, database_url: str, **overrides: Any) -> Settings:
    """Settings for a test server: loopback, ephemeral ports, the test's own database and data dir."""
    base: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "database": {"url": database_url},
        "dicom": {"host": "127.0.0.1", "port": 0},
        "http": {"host": "127.0.0.1", "port": 0, "drain_timeout": 5},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return Settings.load(base)


@pytest.fixture
async def vna_factory(tmp_path: Path, database_url: str,
                      store_settings: dict[str, Any]) -> AsyncIterator[Callable[..., Any]]:
    """Start servers with extra settings: `rt = await vna_factory(ingest={"duplicate_policy": "keep-newest"})`.

    Their object store is `store_settings` (the filesystem unless the test is parametrized with
    `BOTH_BACKENDS`), with any `storage={...}` given here laid over it."""
    runtimes: list[Runtime] = []

    async def start(**overrides: Any) -> Runtime:
        storage = {**store_settings, **overrides.pop("storage", {})}
        rt = Runtime(settings_for(tmp_path, database_url, storage=storage, **overrides))
        await rt.__aenter__()
        runtimes.append(rt)
        return rt

    yield start
    for rt in reversed(runtimes):
        await rt.__aexit__(None, None, None)


@pytest.fixture
async def vna(vna_factory: Callable[..., Any]) -> Runtime:
    """A running vna (AE title VNA) with default settings."""
    return await vna_factory()


async def run_tool(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 120,
                   check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command-line client (dcmtk etc.) without blocking the event loop."""
    full_env = {**os.environ, "TCP_NODELAY": "1", **(env or {})}
    proc = await asyncio.create_subprocess_exec(*map(str, args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                env=full_env)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    result = subprocess.CompletedProcess([str(a) for a in args], proc.returncode or 0, out.decode(errors="replace"),
                                         err.decode(errors="replace"))
    if check and result.returncode != 0:
        raise AssertionError(f"{args[0]} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


# -- a throwaway Ceph cluster (scripts/ceph-cluster), started once per session by the first test that asks --

CEPH_CLUSTER_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ceph-cluster"


@pytest.fixture(scope="session")
def ceph_cluster() -> Iterator[dict[str, Any]]:
    """A 1-OSD memstore cluster: scripts/ceph-cluster's cluster.json (conf, keyring, client_name, pools,
    osds with their pid files) plus "dir"."""
    with tempfile.TemporaryDirectory(prefix="vna-test-ceph-") as parent:
        d = Path(parent) / "cluster"
        subprocess.run([CEPH_CLUSTER_SCRIPT, "start", d], check=True, stdout=subprocess.DEVNULL, timeout=180)
        try:
            yield {**json.loads((d / "cluster.json").read_text()), "dir": str(d)}
        finally:
            subprocess.run([CEPH_CLUSTER_SCRIPT, "stop", d], check=True, timeout=60)


def rados_settings(cluster: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """`storage.rados` settings for a cluster from `ceph_cluster`, e.g. `rados_settings(c, part_size=2**20)`."""
    return {"conffile": cluster["conf"], "keyring": cluster["keyring"], "client_name": cluster["client_name"],
            "pool": "vna", "op_timeout": 10, **overrides}


@contextlib.contextmanager
def rados_pool(cluster: dict[str, Any], *, pg_num: int = 8) -> Iterator[str]:
    """A new pool for one test, removed with everything in it afterwards (~0.1 s each way).

    What the test's servers store is then all the pool holds, as the filesystem store's directory of a test
    holds only its own objects; the orphan sweeper of one test's server never sees another test's objects;
    and the OSD's memory (memstore) is given back when the pool goes."""
    import rados  # Debian's python3-rados, only when a test asks for RADOS

    name = f"t-{os.getpid()}-{next(_counter)}"
    client = rados.Rados(conffile=cluster["conf"], name=cluster["client_name"],
                         conf={"keyring": cluster["keyring"], "rados_mon_op_timeout": "30",
                               "rados_osd_op_timeout": "30"})
    client.connect()
    try:
        def mon(prefix: str, **args: Any) -> None:
            ret, _out, err = client.mon_command(json.dumps({"prefix": prefix, **args}), b"", timeout=30)
            if ret != 0:
                raise RuntimeError(f"{prefix} {args}: {err} ({ret})")

        mon("osd pool create", pool=name, pg_num=pg_num, pgp_num=pg_num, pool_type="replicated")
        mon("osd pool application enable", pool=name, app="vna")
        with client.open_ioctx(name) as io:  # returns once the pool's placement groups are active
            io.write_full("probe", b"")
            io.remove_object("probe")
        try:
            yield name
        finally:
            mon("osd pool rm", pool=name, pool2=name, yes_i_really_really_mean_it=True)
    finally:
        client.shutdown()


@pytest.fixture
def store_settings(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """The `storage` settings of a test server (`vna_factory` uses them): filesystem by default;
    `@BOTH_BACKENDS` (`@pytest.mark.parametrize("store_settings", ["filesystem", "rados"], indirect=True)`)
    runs a test on both. On RADOS each test gets a pool of its own (`rados_pool`)."""
    backend = getattr(request, "param", "filesystem")
    if backend == "filesystem":
        yield {"backend": "filesystem"}
        return
    assert backend == "rados", backend
    cluster = request.getfixturevalue("ceph_cluster")
    with rados_pool(cluster) as pool:
        yield {"backend": "rados", "rados": rados_settings(cluster, pool=pool)}


BOTH_BACKENDS = pytest.mark.parametrize("store_settings", ["filesystem", "rados"], indirect=True)


def storage_env(storage: dict[str, Any], prefix: str = "VNA__STORAGE") -> dict[str, str]:
    """`storage` settings as the environment of a `vna serve` child: {"VNA__STORAGE__RADOS__POOL": ...}."""
    env: dict[str, str] = {}
    for key, value in storage.items():
        name = f"{prefix}__{key.upper()}"
        env.update(storage_env(value, name) if isinstance(value, dict) else {name: str(value)})
    return env
