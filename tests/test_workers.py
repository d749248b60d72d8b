"""`vna serve` with several worker processes (gateway/workers.py): connections spread over the workers
in turn, one archive behind them (DIMSE and DICOMweb), metrics summed over the workers, a dead worker
replaced, SIGTERM draining every worker, and a kill -9 of the server taking its workers with it."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from archive.config import Settings
from gateway.workers import AUTO_WORKERS_MAX, RoundRobin, available_cpus, worker_count, worker_cpu
from tests.test_crash_recovery import HOST, vna_process
from tests.test_robustness import make_ct
from tests.test_stow import STOW_CT, make_instance, multipart

WORKERS = {"VNA__WORKERS": "2"}


# -- without processes -------------------------------------------------------------------------------

def test_round_robin_starts_after_the_last_worker_chosen() -> None:
    rr = RoundRobin()
    assert [rr.order(3) for _ in range(4)] == [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]


def test_worker_count_is_the_setting_or_the_cpus() -> None:
    assert worker_count(Settings(workers=3)) == 3
    assert worker_count(Settings(workers=0)) == min(available_cpus(), AUTO_WORKERS_MAX)
    assert worker_count(Settings(workers=12)) == 12  # set explicitly, not capped
    assert 1 <= available_cpus() <= len(os.sched_getaffinity(0))  # a cgroup quota may allow fewer


def test_workers_are_pinned_only_when_they_have_the_cpus_to_themselves() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    exact = Settings(workers=len(cpus))
    assert [worker_cpu(exact, i) for i in range(len(cpus))] == cpus  # one CPU each, every CPU used
    assert worker_cpu(Settings(workers=len(cpus), worker_cpu_affinity=False), 0) is None
    assert worker_cpu(Settings(workers=len(cpus) + 1), 0) is None  # more workers than CPUs: the kernel decides


# -- a live server --------------------------------------------------------------------------------------

def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(p) for p in (task / "children").read_text().split()]
    return found


def established_on(pid: int, port: int) -> int:
    """How many established TCP connections to local `port` process `pid` holds."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:] + \
            Path("/proc/net/tcp6").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
            inodes.add(fields[9])
    held = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            held += 1
    return held


async def metric(port: int, name: str, **labels: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(f"http://{HOST}:{port}/metrics") as r:
        text = await r.text()
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


def c_store(port: int, datasets: list) -> list[int]:
    ae = AE(ae_title="WORKERS")
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    assoc = ae.associate(HOST, port, ae_title="VNA")
    assert assoc.is_established
    try:
        return [assoc.send_c_store(ds).Status for ds in datasets]
    finally:
        assoc.release()


async def test_connections_go_to_the_workers_in_turn_and_share_one_archive(tmp_path: Path,
                                                                          database_url: str) -> None:
    async with vna_process(tmp_path / "data", database_url, env=WORKERS) as vna:
        assert vna.proc is not None
        workers = children(vna.proc.pid)
        assert len(workers) == 2, vna.log()
        assert "2 workers" in vna.log() and vna.log().count("serving, event loop") == 2
        # two keep-alive clients: one on each worker (the kernel's SO_REUSEPORT hash would not promise it)
        sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) for _ in range(2)]
        try:
            for s in sessions:
                async with s.get(f"http://{HOST}:{vna.http_port}/readyz") as r:
                    assert r.status == 200
            assert sorted(established_on(w, vna.http_port) for w in workers) == [1, 1]
            # each serves requests to the one archive: a study stored on one connection is found on the other
            study = generate_uid()
            async with sessions[0].post(f"http://{HOST}:{vna.http_port}/dicomweb/studies",
                                        data=multipart(make_instance(study=study)),
                                        headers={"Content-Type": STOW_CT}) as r:
                assert r.status == 200, await r.text()
            async with sessions[1].get(f"http://{HOST}:{vna.http_port}/dicomweb/studies",
                                       params={"StudyInstanceUID": study}) as r:
                assert r.status == 200 and len(await r.json()) == 1
            for _ in range(2):
                async with sessions[1].get(f"http://{HOST}:{vna.http_port}/readyz") as r:
                    assert r.status == 200
        finally:
            for s in sessions:
                await s.close()
        # /metrics, answered by one worker, counts what both served: 2 + 2 readiness probes
        assert await metric(vna.http_port, "vna_http_requests_total", route="/readyz") == 4
        # DIMSE associations are handed over the same way, into the same archive
        datasets = [make_ct() for _ in range(2)]
        assert await asyncio.to_thread(c_store, vna.dicom_port, datasets) == [0, 0]
        assert await metric(vna.http_port, "vna_ingest_instances_total",
                            outcome="stored") == 3
        vna.signal(signal.SIGTERM)
        assert await vna.wait(30) == 0, vna.log()
        assert not any(Path(f"/proc/{w}").exists() for w in workers)


async def test_a_worker_that_dies_is_replaced(tmp_path: Path, database_url: str) -> None:
    async with vna_process(tmp_path / "data", database_url, env=WORKERS) as vna:
        assert vna.proc is not None
        first, second = children(vna.proc.pid)
        cpus = os.sched_getaffinity(vna.proc.pid)
        pinned = len(cpus) == 2  # WORKERS is 2: each worker gets a CPU of its own where there are exactly two
        if pinned:
            assert {frozenset(os.sched_getaffinity(w)) for w in (first, second)} == {frozenset({c}) for c in cpus}
        else:
            assert os.sched_getaffinity(first) == os.sched_getaffinity(second) == cpus
        cpu_of_first = os.sched_getaffinity(first)
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            now = children(vna.proc.pid)
            if len(now) == 2 and first not in now and vna.log().count("serving, event loop") == 3:
                break
            assert time.monotonic() < deadline, vna.log()
            await asyncio.sleep(0.1)
        assert "exited with status -9; starting another" in vna.log()
        [replacement] = [w for w in now if w != second]
        assert os.sched_getaffinity(replacement) == cpu_of_first  # the same index, the same CPU
        # every new connection is served, whichever worker it goes to
        for _ in range(4):
            async with aiohttp.ClientSession() as s, s.get(f"http://{HOST}:{vna.http_port}/readyz") as r:
                assert r.status == 200
        assert await asyncio.to_thread(c_store, vna.dicom_port, [make_ct()]) == [0]


async def test_kill_9_of_the_server_takes_its_workers_with_it(tmp_path: Path, database_url: str) -> None:
    async with vna_process(tmp_path / "data", database_url, env=WORKERS) as vna:
        assert vna.proc is not None
        workers = children(vna.proc.pid)
        assert len(workers) == 2
        vna.signal(signal.SIGKILL)
        assert await vna.wait(10) == -signal.SIGKILL
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{w}").exists() and "zombie" not in _state(w) for w in workers):
            assert time.monotonic() < deadline, "workers outlived the server"
            await asyncio.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


async def test_one_worker_means_the_server_listens_itself(tmp_path: Path, database_url: str) -> None:
    async with vna_process(tmp_path / "data", database_url, env={"VNA__WORKERS": "1"}) as vna:
        assert vna.proc is not None
        assert children(vna.proc.pid) == []
        assert " workers, event loop" not in vna.log() and "serving, event loop" not in vna.log()
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://{HOST}:{vna.http_port}/readyz") as r:
                assert r.status == 200
            assert established_on(vna.proc.pid, vna.http_port) == 1  # the keep-alive connection, held here
