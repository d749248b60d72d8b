"""Moves between storage classes (archive/moves.py, `vna policy apply`) on a real three-OSD Ceph cluster, and on the
filesystem store for the cases that need no cluster.

- A lifecycle step (regional -> all-dc after 30 days) moves 1000 instances: every index row switched to the
  new pool, every copy's SHA-256 equal to the digest recorded at ingest, the old pool empty afterwards, the
  moves counted in the process's metrics; WADO-RS readers polling the instances (PS3.18 10.4) throughout the
  move never get an error and always get the stored bytes.
- `vna policy apply` killed with SIGKILL halfway and run again finishes the job: no instance lost (each
  readable at every moment, each in the target pool once) and none duplicated (one row, one object).
- A reader that located the old copy just before the switch still reads it during the grace; the orphan
  sweeper leaves it alone; it is deleted after the grace.
- An instance deleted during its move is not resurrected (the move is abandoned, the copy removed); a
  copy that reads back with another digest is not switched (the instance stays where it was).
- One mover at a time.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from pydicom.uid import generate_uid

from archive.config import IngestSettings, Settings
from archive.errors import MisuseError
from archive.index import Index
from archive.instance import split_part10
from archive.ingest import Ingestor, sweep_orphans
from archive.moves import Mover, pending_counts
from archive.policy import parse_policy
from archive.stores import StoreRegistry, open_stores
from gateway.runtime import Runtime
from metrics.registry import Metrics
from tests.stored_objects import StoredObjects
from tests.ceph_policy import (cli_env, cluster3, make_ct, monitor, part10, pool_objects, purge, object_digest, stow,
                               storage_for, storescu)

N = 1000

# South Clinic's instances stay in dc-a for 30 days, then get a copy in each datacentre (PS3.3 C.7.5.1
# InstitutionName chooses the class)
LIFECYCLE = """\
classes:
  default: {pool: vna}
  regional:
    pool: vna-dc-a
    lifecycle:
      - {after_days: 30, move_to: all-dc}
  all-dc: {pool: vna-all-dc}
rules:
  - match: {institution_name: South Clinic}
    class: regional
"""


@pytest.fixture(scope="module")
def ceph3_cluster() -> Iterator[dict[str, Any]]:
    with cluster3() as cluster:
        yield cluster


@pytest.fixture
async def ceph3(ceph3_cluster: dict[str, Any]) -> dict[str, Any]:
    """The module's cluster with empty pools."""
    await purge(ceph3_cluster)
    return ceph3_cluster


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def south_clinic(n: int, *, size: int = 64) -> list[tuple[str, str, str, bytes]]:
    """`n` instances from South Clinic in 10 series: (study, series, sop, PS3.10 bytes)."""
    study = generate_uid()
    series = [generate_uid() for _ in range(10)]
    out = []
    for i in range(n):
        ds = make_ct("South Clinic", study=study, series=series[i % 10], n=i, size=size)
        out.append((study, ds.SeriesInstanceUID, ds.SOPInstanceUID, part10(ds)))
    return out


async def age_everything(index: Index, days: int) -> None:
    await index.pool.execute("UPDATE instance SET created_at = created_at - make_interval(days => $1)", days)


async def rows(index: Index) -> dict[str, asyncpg.Record]:
    return {r["sop_instance_uid"]: r for r in await index.pool.fetch(
        "SELECT sop_instance_uid, storage_class, store, location, digest, size FROM instance")}


async def check_all_moved(cluster: dict[str, Any], index: Index, sent: list[tuple[str, str, str, bytes]]) -> None:
    """Every instance once, in all-dc, its object in vna-all-dc with the recorded digest; vna-dc-a empty."""
    found = await rows(index)
    assert set(found) == {s[2] for s in sent}
    assert {r["storage_class"] for r in found.values()} == {"all-dc"}
    keys = {r["location"].removeprefix("vna-all-dc/") for r in found.values()}
    assert all(r["location"].startswith("vna-all-dc/") for r in found.values())
    async with monitor(cluster) as mon:
        assert await pool_objects(mon, "vna-all-dc") == keys  # nothing lost, nothing twice
        assert await pool_objects(mon, "vna-dc-a") == set()    # old copies gone
        io = await mon.ioctx("vna-all-dc")
        for r in found.values():  # read each object raw from RADOS: the digest recorded at ingest
            key = r["location"].removeprefix("vna-all-dc/")
            data = await asyncio.to_thread(io.read, key, r["size"] + 1)
            assert object_digest(data) == r["digest"]
    assert (await pending_counts(index.pool)).keys() <= {"done"}


async def test_lifecycle_move_of_1000_instances_while_wado_readers_poll(
        ceph3: dict[str, Any], vna_factory: Callable[..., Any], index: Index, tmp_path: Path,
        http: aiohttp.ClientSession) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(LIFECYCLE)
    rt: Runtime = await vna_factory(storage=storage_for(ceph3, policy_file))
    assert rt.ports is not None and rt.stores is not None
    sent = south_clinic(N)
    await stow(http, rt.ports.http, [s[3] for s in sent])
    assert {r["storage_class"] for r in (await rows(index)).values()} == {"regional"}

    mover = Mover(index.pool, rt.stores, rt.metrics, grace_seconds=1.0, concurrency=8)
    # stored today: the 30-day step does not apply yet
    report = await mover.run()
    assert (report.planned, report.moved) == (0, 0)

    await age_everything(index, 31)
    errors: list[str] = []
    reads = 0
    moving = True

    async def reader(offset: int) -> None:
        # PS3.18 10.4.1.1.1 Retrieve Instance, the instances in turn, the whole time the move runs
        nonlocal reads
        i = offset
        while moving:
            study, series, sop, data = sent[i % N]
            url = f"http://127.0.0.1:{rt.ports.http}/dicomweb/studies/{study}/series/{series}/instances/{sop}"
            async with http.get(url, headers={"Accept": 'multipart/related; type="application/dicom"'}) as r:
                body = await r.read()
                if r.status != 200 or data not in body:
                    errors.append(f"{sop}: {r.status} {body[:200]!r}")
            reads += 1
            i += 7

    readers = [asyncio.create_task(reader(k * 131)) for k in range(4)]
    started = time.monotonic()
    try:
        report = await mover.run()
    finally:
        moving = False
        await asyncio.gather(*readers)
    seconds = time.monotonic() - started
    print(f"\nmoved {report.moved} instances ({report.bytes / 1e6:.1f} MB) in {seconds:.1f} s with 4 WADO-RS readers "
          f"({reads} reads); {report.summary()}")

    assert errors == []
    assert reads > 50
    assert (report.planned, report.moved, report.failed, report.abandoned, report.deleted) == (N, N, 0, 0, N)
    await check_all_moved(ceph3, index, sent)
    metrics = rt.metrics.registry
    assert metrics.get_sample_value("vna_storage_moves_total", {"outcome": "moved"}) == N
    total = sum(r["size"] for r in (await rows(index)).values())
    assert metrics.get_sample_value("vna_storage_move_bytes_total") == total == report.bytes

    # nothing left to do: a second run plans nothing
    again = await mover.run()
    assert (again.planned, again.moved, again.resumed) == (0, 0, 0)


async def test_apply_killed_halfway_then_rerun_finishes(ceph3: dict[str, Any], vna_factory: Callable[..., Any],
                                                        index: Index, database_url: str, tmp_path: Path,
                                                        http: aiohttp.ClientSession) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(LIFECYCLE)
    rt: Runtime = await vna_factory(storage=storage_for(ceph3, policy_file))
    assert rt.ports is not None and rt.stores is not None
    sent = south_clinic(N)
    await stow(http, rt.ports.http, [s[3] for s in sent])
    await age_everything(index, 31)
    total = sum(r["size"] for r in (await rows(index)).values())

    env = {**os.environ, **cli_env(ceph3, database_url, tmp_path / "cli")}
    # throttled so that the run lasts ~4 s: killed when about half is done
    rate = total / 1e6 / 4
    apply = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "policy", "apply", "--policy", str(policy_file), "--rate", f"{rate:.3f}",
        "--grace", "0.5", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    deadline = time.monotonic() + 60
    while True:
        counts = await pending_counts(index.pool)
        # at least half switched, and some planned and not switched yet (a kill mid-batch)
        if counts.get("switched", 0) + counts.get("done", 0) >= N // 2 and counts.get("pending", 0) > 0:
            break
        assert apply.returncode is None and time.monotonic() < deadline, (counts, await apply.stderr.read())
        await asyncio.sleep(0.05)
    apply.send_signal(signal.SIGKILL)
    await apply.wait()
    counts = await pending_counts(index.pool)
    moved_before = counts.get("switched", 0) + counts.get("done", 0)
    print(f"\nkilled with {counts}")
    assert N // 2 <= moved_before < N and counts.get("pending", 0) > 0

    # halfway: every instance still readable where its row says, through the server (no error)
    found = await rows(index)
    assert len(found) == N
    classes = {r["storage_class"] for r in found.values()}
    assert classes == {"regional", "all-dc"}
    for study, series, sop, data in sent[::10]:
        url = f"http://127.0.0.1:{rt.ports.http}/dicomweb/studies/{study}/series/{series}/instances/{sop}"
        async with http.get(url, headers={"Accept": 'multipart/related; type="application/dicom"'}) as r:
            assert r.status == 200 and data in await r.read()

    # the rerun resumes the pending moves, plans the rest, deletes the old copies
    result = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "policy", "apply", "--policy", str(policy_file), "--grace", "0.5",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(result.communicate(), 120)
    assert result.returncode == 0, err.decode()
    print(out.decode())
    await check_all_moved(ceph3, index, sent)
    assert len(await rows(index)) == N


# -- the filesystem store: pools are directories; the deterministic cases -------------------------------------------

FS_POLICY = {"classes": {"default": {"pool": "fast"},
                         "slow": {"pool": "slow"},
                         "fast": {"pool": "fast2", "lifecycle": [{"after_days": 0, "move_to": "slow"}]}},
             "rules": [{"match": {"institution_name": "South Clinic"}, "class": "fast"}]}


@pytest.fixture
async def fs_archive(tmp_path: Path, index: Index) -> AsyncIterator[tuple[StoreRegistry, Ingestor]]:
    """A filesystem archive with FS_POLICY: South Clinic written to fast2/, due in slow/ at once."""
    settings = Settings.load({"data_dir": tmp_path / "data", "storage": {"root": tmp_path / "objects"}})
    async with open_stores(settings, parse_policy(FS_POLICY)) as stores:
        yield stores, Ingestor(index, stores.default.store, IngestSettings(), Metrics(), stores=stores)


async def test_a_reader_of_the_old_copy_is_served_during_the_grace(fs_archive: tuple[StoreRegistry, Ingestor],
                                                                     index: Index, tmp_path: Path) -> None:
    stores, ingestor = fs_archive
    study, series, sop, data = south_clinic(1, size=8)[0]
    await ingestor.ingest_part10(data, protocol="dicomweb", source="dicomweb")
    before = (await rows(index))[sop]
    assert before["storage_class"] == "fast" and before["location"].startswith("fast2/")
    objects = StoredObjects(root=tmp_path / "objects")
    assert await objects.read(before["location"]) == data

    # a reader locates the instance (old location) ... the move switches the row ...
    mover = Mover(index.pool, stores, Metrics(), grace_seconds=1.5)
    report = await mover.run(wait_for_grace=False)
    assert (report.moved, report.deleted) == (1, 0)
    after = (await rows(index))[sop]
    assert after["storage_class"] == "slow" and after["location"].startswith("slow/")
    # ... and still reads the old location, as located, during the grace; the sweeper leaves it alone
    old = stores.for_location(before["store"], before["location"])
    assert await old.get(before["location"], timeout=5) == data
    assert await sweep_orphans(index, stores.default.store, grace_seconds=0, metrics=Metrics()) == 0
    assert await stores.for_location(after["store"], after["location"]).get(after["location"], timeout=5) == data

    # after the grace the next run deletes the old copy; the index row reads the new one
    await asyncio.sleep(1.6)
    report = await mover.run()
    assert (report.moved, report.deleted) == (0, 1)
    assert not await objects.exists(before["location"])
    assert await objects.read(after["location"]) == data
    assert await pending_counts(index.pool) == {"done": 1}


class _DeleteDuringCopy:
    """A throttle that deletes the instance while its object is being copied (between the read and the write)."""

    def __init__(self, index: Index, study: str) -> None:
        self.index, self.study = index, study

    async def take(self, n: int) -> None:
        await self.index.delete_instances(self.study, timeout=10)


async def test_an_instance_deleted_during_its_move_is_not_resurrected(fs_archive: tuple[StoreRegistry, Ingestor],
                                                                        index: Index, tmp_path: Path) -> None:
    stores, ingestor = fs_archive
    study, series, sop, data = south_clinic(1, size=8)[0]
    await ingestor.ingest_part10(data, protocol="dicomweb", source="dicomweb")
    mover = Mover(index.pool, stores, Metrics(), grace_seconds=0)
    mover._throttle = _DeleteDuringCopy(index, study)  # type: ignore[assignment]
    report = await mover.run()
    assert (report.moved, report.abandoned, report.failed) == (0, 1, 0)
    assert await rows(index) == {}
    # the copy made for the move is removed; only the old object (now an orphan for the sweeper) remains
    assert not list((tmp_path / "objects" / "slow").rglob("*.dcm"))
    assert await pending_counts(index.pool) == {"abandoned": 1}


async def test_a_copy_with_another_digest_is_not_switched(fs_archive: tuple[StoreRegistry, Ingestor],
                                                          index: Index, tmp_path: Path) -> None:
    stores, ingestor = fs_archive
    _study, _series, sop, data = south_clinic(1, size=8)[0]
    await ingestor.ingest_part10(data, protocol="dicomweb", source="dicomweb")
    before = (await rows(index))[sop]
    # the stored object rots: its bytes no longer have the digest the index recorded at ingest
    objects = StoredObjects(root=tmp_path / "objects")
    await objects.rewrite(before["location"], data[:-2] + b"\xff\xff")
    report = await Mover(index.pool, stores, Metrics(), grace_seconds=0).run()
    assert (report.moved, report.failed) == (0, 1)
    assert "reads back as" in report.errors[0]
    assert (await rows(index))[sop]["location"] == before["location"]  # not switched
    assert not list((tmp_path / "objects" / "slow").rglob("*.dcm"))  # the bad copy removed
    assert await pending_counts(index.pool) == {"pending": 1}         # retried by the next run

    await objects.rewrite(before["location"], data)  # repaired (e.g. from a replica): the next run resumes the pending move
    report = await Mover(index.pool, stores, Metrics(), grace_seconds=0).run()
    assert (report.resumed, report.moved, report.deleted) == (1, 1, 1)
    moved = (await rows(index))[sop]
    assert moved["storage_class"] == "slow"
    assert object_digest(await objects.read(moved["location"])) == moved["digest"]


async def test_one_mover_at_a_time(fs_archive: tuple[StoreRegistry, Ingestor], index: Index) -> None:
    stores, _ = fs_archive
    async with index.pool.acquire() as conn:
        from archive.moves import _MOVER_LOCK
        assert await conn.fetchval("SELECT pg_try_advisory_lock($1)", _MOVER_LOCK)
        try:
            with pytest.raises(MisuseError, match="another mover"):
                await Mover(index.pool, stores, Metrics()).run()
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _MOVER_LOCK)
    assert (await Mover(index.pool, stores, Metrics()).run()).planned == 0


async def test_an_erasure_coded_class_takes_c_store_and_lifecycle_moves(
        ceph3: dict[str, Any], vna_factory: Callable[..., Any], index: Index, tmp_path: Path) -> None:
    """The issue's `cold` class on an erasure-coded pool (k=2, m=1, one chunk per host): instances stored into it
    directly by C-STORE (PS3.4 B.2: the archive writes its File Meta Information, then the data set as
    received) and moved into it by a lifecycle step read back bit for bit."""
    async with monitor(ceph3) as mon:
        pools = {p["pool_name"] for p in await mon.mon_command({"prefix": "osd pool ls", "detail": "detail"})}
        if "vna-cold" not in pools:
            await mon.mon_command({"prefix": "osd erasure-code-profile set", "name": "vna-k2m1",
                                   "profile": ["k=2", "m=1", "crush-failure-domain=host"]})
            await mon.mon_command({"prefix": "osd pool create", "pool": "vna-cold", "pg_num": 8, "pgp_num": 8,
                                   "pool_type": "erasure", "erasure_code_profile": "vna-k2m1"})
    await purge(ceph3, ("vna-cold", "vna-dc-a"))
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text("""\
classes:
  default: {pool: vna}
  regional:
    pool: vna-dc-a
    lifecycle: [{after_days: 30, move_to: cold}]
  cold: {pool: vna-cold}
rules:
  - {match: {modality: MR}, class: cold}
  - {match: {institution_name: South Clinic}, class: regional}
""")
    rt: Runtime = await vna_factory(storage=storage_for(ceph3, policy_file))
    assert rt.ports is not None and rt.stores is not None
    study = generate_uid()
    files, datasets = [], {}
    for n, modality in enumerate(("MR", "MR", "CT", "CT")):
        ds = make_ct("South Clinic", study=study, series=generate_uid(), n=n, size=32, modality=modality)
        data = part10(ds)
        datasets[ds.SOPInstanceUID] = data[split_part10(data)[1]:]
        files.append(tmp_path / f"{n}.dcm")
        files[-1].write_bytes(data)
    await storescu(rt.ports.dicom, files)
    found = await rows(index)
    assert sorted(r["storage_class"] for r in found.values()) == ["cold", "cold", "regional", "regional"]

    await age_everything(index, 31)
    report = await Mover(index.pool, rt.stores, rt.metrics, grace_seconds=0).run()
    assert (report.moved, report.failed) == (2, 0)
    after = await rows(index)
    assert {r["storage_class"] for r in after.values()} == {"cold"}
    async with monitor(ceph3) as mon:
        assert await pool_objects(mon, "vna-cold") == {r["location"].removeprefix("vna-cold/") for r in after.values()}
        assert await pool_objects(mon, "vna-dc-a") == set()
    for sop, r in after.items():  # the stored PS3.10 file: our File Meta Information, the data set as sent
        data = await rt.stores.for_location(r["store"], r["location"]).get(r["location"], timeout=10)
        assert object_digest(data) == r["digest"] and data.endswith(datasets[sop])


async def test_limit_moves_at_most_that_many_per_run(fs_archive: tuple[StoreRegistry, Ingestor], index: Index) -> None:
    stores, ingestor = fs_archive
    for _study, _series, _sop, data in south_clinic(5, size=8):
        await ingestor.ingest_part10(data, protocol="dicomweb", source="dicomweb")
    mover = Mover(index.pool, stores, Metrics(), grace_seconds=0)
    assert [(await mover.run(limit=2)).moved for _ in range(4)] == [2, 2, 1, 0]
    assert {r["storage_class"] for r in (await rows(index)).values()} == {"slow"}


async def test_a_server_applies_the_policy_periodically(vna_factory: Callable[..., Any], index: Index,
                                                        tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """storage.moves.interval_seconds: the server moves by itself and counts the moves in its own /metrics."""
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(json.dumps(FS_POLICY))  # JSON is YAML
    rt: Runtime = await vna_factory(storage={"policy_file": policy_file,
                                             "moves": {"interval_seconds": 0.2, "grace_seconds": 0}})
    assert rt.ports is not None
    sent = south_clinic(3, size=8)
    await stow(http, rt.ports.http, [s[3] for s in sent])
    for _ in range(100):
        if {r["storage_class"] for r in (await rows(index)).values()} == {"slow"}:
            break
        await asyncio.sleep(0.1)
    found = await rows(index)
    assert {r["storage_class"] for r in found.values()} == {"slow"}
    assert all(r["location"].startswith("slow/") for r in found.values())
    async with http.get(f"http://127.0.0.1:{rt.ports.http}/metrics") as r:
        text = await r.text()
    assert 'vna_storage_moves_total{outcome="moved"} 3.0' in text
    assert f"vna_storage_move_bytes_total {float(sum(r['size'] for r in found.values()))}" in text
