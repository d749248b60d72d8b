"""Placement by storage policy on a real three-OSD Ceph cluster in two datacentres (scripts/ceph-cluster --osds 3:
dc-a = h1/osd.0 + h2/osd.1, dc-b = h3/osd.2; pools vna (default rule), vna-dc-a (rule dc-a-only), vna-all-dc
(rule all-dc: one copy per datacentre), each of size 2).

500 instances from "North Hospital" and 500 from "South Clinic", half sent by C-STORE (PS3.4 B.2, storescu)
and half by STOW-RS (PS3.18 10.5), must land in the class their InstitutionName (0008,0080) selects: the
index row records the class and a location in its pool, the object is in that pool and nowhere else, and
`ceph osd map` of every object shows an acting set that obeys the pool's CRUSH rule (all-dc: one OSD in each
datacentre; dc-a-only: osd.0 and osd.1). Instances from elsewhere go to the default class. What was stored is
read back bit for bit by WADO-RS (PS3.18 10.4) from whichever pool holds it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydicom.uid import generate_uid

from archive.index import Index
from archive.instance import split_part10
from gateway.runtime import Runtime
from tests.conftest import run_tool
from tests.ceph_policy import (DC_A_OSDS, DC_B_OSDS, POLICY, acting_sets, cluster3, make_ct, monitor, part10,
                               pool_objects, purge, object_digest, stow, storage_for, storescu)

N_PER_SITE = 500
POOL_OF = {"all-dc": "vna-all-dc", "regional": "vna-dc-a", "default": "vna"}


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


async def test_institutions_land_in_their_pools_and_crush_obeys_the_rules(
        ceph3: dict[str, Any], vna_factory: Callable[..., Any], index: Index, tmp_path: Path,
        http: aiohttp.ClientSession) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(POLICY)
    rt: Runtime = await vna_factory(storage=storage_for(ceph3, policy_file))
    assert rt.ports is not None

    # 500 + 500 instances, and 20 from an institution no rule names; half of each by C-STORE, half by STOW-RS
    sent: dict[str, tuple[str, bytes]] = {}  # SOP Instance UID -> (expected class, PS3.10 bytes)
    by_dimse: list[Path] = []
    by_stow: list[bytes] = []
    files = tmp_path / "files"
    files.mkdir()
    for institution, cls, count in (("North Hospital", "all-dc", N_PER_SITE), ("South Clinic", "regional", N_PER_SITE),
                                    ("Elsewhere Imaging", "default", 20)):
        study = generate_uid()
        for half in (0, 1):
            series = generate_uid()
            for n in range(count // 2):
                ds = make_ct(institution, study=study, series=series, n=half * count + n)
                data = part10(ds)
                sent[ds.SOPInstanceUID] = (cls, data)
                if half == 0:
                    path = files / f"{ds.SOPInstanceUID}.dcm"
                    path.write_bytes(data)
                    by_dimse.append(path)
                else:
                    by_stow.append(data)
    started = time.monotonic()
    await asyncio.gather(storescu(rt.ports.dicom, by_dimse), stow(http, rt.ports.http, by_stow))
    ingest_seconds = time.monotonic() - started

    # the index: every instance once, in its class, located in that class's pool
    rows = await index.pool.fetch("SELECT sop_instance_uid, storage_class, store, location, digest, source "
                                  "FROM instance")
    assert len(rows) == len(sent) == 2 * N_PER_SITE + 20
    by_pool: dict[str, list[str]] = {p: [] for p in POOL_OF.values()}
    for r in rows:
        cls, data = sent[r["sop_instance_uid"]]
        assert r["storage_class"] == cls, (r["sop_instance_uid"], r["source"])
        assert r["store"] == "rados"
        pool, _, key = r["location"].partition("/")
        assert pool == POOL_OF[cls]
        by_pool[pool].append(key)
        if r["source"] == "dicomweb":  # stored exactly as received (PS3.18 10.5: the PS3.10 file)
            assert r["digest"] == object_digest(data)
    assert {s for s in (r["source"] for r in rows)} == {"dicomweb", "dimse:POLICYSCU"}

    async with monitor(ceph3) as mon:
        # each object is in its pool and in no other (objects of this size are stored whole, no parts)
        for pool, keys in by_pool.items():
            assert await pool_objects(mon, pool) == set(keys), pool

        # CRUSH: the acting set of every object obeys its pool's rule
        started = time.monotonic()
        all_dc = await acting_sets(mon, "vna-all-dc", by_pool["vna-all-dc"])
        dc_a = await acting_sets(mon, "vna-dc-a", by_pool["vna-dc-a"])
        osd_map_seconds = time.monotonic() - started
    assert len(all_dc) == len(dc_a) == N_PER_SITE
    for name, acting in all_dc.items():
        # all-dc: choose firstn 0 type datacenter, chooseleaf firstn 1 type host: one copy in dc-a, one in dc-b
        assert len(acting) == 2 and len(set(acting) & DC_A_OSDS) == 1 and len(set(acting) & DC_B_OSDS) == 1, \
            (name, acting)
    for name, acting in dc_a.items():
        # dc-a-only: take dc-a, chooseleaf firstn 0 type host: both copies in dc-a, on its two hosts
        assert sorted(acting) == sorted(DC_A_OSDS), (name, acting)
    print(f"\ningest of {len(sent)} instances: {ingest_seconds:.1f} s; osd map of {2 * N_PER_SITE} objects: "
          f"{osd_map_seconds:.1f} s")

    # read back by WADO-RS from each pool, bit for bit (PS3.18 10.4.1: the instance as stored)
    sample = [next(u for u, (c, _) in sent.items() if c == cls) for cls in POOL_OF]
    for sop in sample:
        row = await index.pool.fetchrow("SELECT st.study_instance_uid, se.series_instance_uid FROM instance i "
                                        "JOIN series se ON se.pk = i.series_fk JOIN study st ON st.pk = se.study_fk "
                                        "WHERE i.sop_instance_uid = $1", sop)
        url = (f"http://127.0.0.1:{rt.ports.http}/dicomweb/studies/{row[0]}/series/{row[1]}/instances/{sop}")
        async with http.get(url, headers={"Accept": 'multipart/related; type="application/dicom"'}) as r:
            assert r.status == 200
            # a C-STOREd instance gets the archive's File Meta Information (PS3.10 7.1); the data set is as sent
            data = sent[sop][1]
            assert data[split_part10(data)[1]:] in await r.read()


async def test_rules_on_calling_ae_protocol_and_modality(ceph3: dict[str, Any], vna_factory: Callable[..., Any],
                                                         index: Index, tmp_path: Path,
                                                         http: aiohttp.ClientSession) -> None:
    """The other match keys: calling AE title (only DIMSE has one), protocol, Modality (0008,0060)."""
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text("""\
classes:
  default: {pool: vna}
  regional: {pool: vna-dc-a}
  all-dc: {pool: vna-all-dc}
rules:
  - match: {calling_ae: "MODALITY*", modality: MR}
    class: all-dc
  - match: {protocol: dicomweb, modality: [CT, "C?"]}
    class: regional
""")
    rt: Runtime = await vna_factory(storage=storage_for(ceph3, policy_file))
    assert rt.ports is not None
    study = generate_uid()
    mr_dimse = make_ct("Any", study=study, series=generate_uid(), n=1, modality="MR", size=8)
    ct_dimse = make_ct("Any", study=study, series=generate_uid(), n=2, size=8)
    mr_web = make_ct("Any", study=study, series=generate_uid(), n=3, modality="MR", size=8)
    ct_web = make_ct("Any", study=study, series=generate_uid(), n=4, size=8)
    paths = []
    for ds in (mr_dimse, ct_dimse):
        paths.append(tmp_path / f"{ds.SOPInstanceUID}.dcm")
        paths[-1].write_bytes(part10(ds))
    await storescu(rt.ports.dicom, paths, calling_ae="MODALITY7")
    await stow(http, rt.ports.http, [part10(mr_web), part10(ct_web)])
    classes = dict(await index.pool.fetch("SELECT sop_instance_uid, storage_class FROM instance"))
    assert classes == {mr_dimse.SOPInstanceUID: "all-dc", ct_dimse.SOPInstanceUID: "default",
                       mr_web.SOPInstanceUID: "default", ct_web.SOPInstanceUID: "regional"}


async def osd_reads(cluster: dict[str, Any]) -> dict[int, int]:
    """Read operations each OSD has served so far (its admin socket's perf counter osd.op_r)."""
    out = {}
    for osd in cluster["osds"]:
        dump = await run_tool("/usr/bin/ceph", "--admin-daemon", Path(osd["pid_file"]).with_suffix(".asok"),
                              "perf", "dump")
        out[osd["id"]] = json.loads(dump.stdout)["osd"]["op_r"]
    return out


async def test_localized_reads_come_from_the_nearest_copy(ceph3: dict[str, Any], vna_factory: Callable[..., Any],
                                                          index: Index, tmp_path: Path,
                                                          http: aiohttp.ClientSession) -> None:
    """storage.rados.crush_location + localize_reads: a vna in dc-b reads North Hospital's all-dc instances (one
    copy per datacentre) from osd.2, the dc-b copy, not from each object's primary; one in dc-a from dc-a."""
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(POLICY)
    sent = []
    writer: Runtime = await vna_factory(storage=storage_for(ceph3, policy_file))
    assert writer.ports is not None
    study = generate_uid()
    for n in range(100):
        ds = make_ct("North Hospital", study=study, series=generate_uid() if n % 10 == 0 else ds.SeriesInstanceUID,
                     n=n, size=16)
        sent.append((ds.SeriesInstanceUID, ds.SOPInstanceUID, part10(ds)))
    await stow(http, writer.ports.http, [s[2] for s in sent])

    async def read_all(rt: Runtime) -> dict[int, int]:
        assert rt.ports is not None
        before = await osd_reads(ceph3)
        for series, sop, data in sent:  # PS3.18 10.4.1.1.1 Retrieve Instance
            url = f"http://127.0.0.1:{rt.ports.http}/dicomweb/studies/{study}/series/{series}/instances/{sop}"
            async with http.get(url, headers={"Accept": 'multipart/related; type="application/dicom"'}) as r:
                assert r.status == 200 and data in await r.read()
        after = await osd_reads(ceph3)
        return {osd: after[osd] - before[osd] for osd in after}

    primaries = await read_all(writer)  # every read from the object's primary, in either datacentre
    total = sum(primaries.values())
    # one OSD read operation per instance: its manifest and its bytes in one round trip (archive/rados_local.py)
    assert 100 <= total < 130, primaries
    assert primaries[2] < 0.7 * total  # the primaries are spread over both datacentres

    # A copy other than the primary serves a read only once it knows the object's last write committed on
    # every copy (else it sends the read back to the primary); the primary tells the others with later
    # operations or its periodic lease, a few seconds after the last write at most. Then most reads are local.
    async def read_locally(crush_location: str, local: set[int]) -> tuple[dict[int, int], float]:
        rt = await vna_factory(storage=storage_for(ceph3, policy_file, crush_location=crush_location,
                                                   localize_reads=True))
        started = time.monotonic()
        while True:
            counts = await read_all(rt)
            if sum(counts[o] for o in local) >= 0.8 * total or time.monotonic() - started > 30:
                return counts, time.monotonic() - started
            await asyncio.sleep(0.5)

    in_dc_b, waited_b = await read_locally("datacenter=dc-b host=h3", DC_B_OSDS)
    in_dc_a, waited_a = await read_locally("datacenter=dc-a host=h1", DC_A_OSDS)
    print(f"\nOSD reads of 100 instances (manifest + data in one operation each): from the primaries {primaries}, "
          f"from dc-b {in_dc_b} (after {waited_b:.1f} s), from dc-a {in_dc_a} (after {waited_a:.1f} s)")
    assert in_dc_b[2] >= 0.8 * total
    assert in_dc_a[0] + in_dc_a[1] >= 0.8 * total
