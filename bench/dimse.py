"""DIMSE benchmark: the same workload against vna and Orthanc (+PostgreSQL), with vna/Orthanc ratios.

Workload (synthetic CT, 10 studies x 5 series x 20 instances of ~512 KiB, see ``data.py``), all with
the dcmtk tools (TCP_NODELAY=1) as clients:

* C-STORE of all 1000 instances on 1 association (one ``storescu``) and on 4 associations (four
  ``storescu`` in parallel, a quarter of the files each), each run on a fresh, empty archive;
  median of 3 runs, the peers taking turns run by run so that background load hits both alike;
* on one more archive per peer, loaded with the 1000 instances (untimed):
  C-FIND at STUDY level (study root) over the stored studies, universal and ``PatientName=SMITH*``:
  one ``findscu`` process (and association) per query -- the headline figure, which includes process
  start-up (~10-15 ms, so it cannot exceed ~70 q/s here) -- and one ``findscu --repeat N`` sending
  N queries on one association (server throughput);
  C-MOVE of one 100-instance study to a dcmtk ``storescp`` (``movescu -aem``), median of 3.

Orthanc runs with TCP_NODELAY=1 too (its DICOM stack is dcmtk), unless ``--orthanc-delayed-ack``.
vna runs from this work tree, or with ``--vna-ref REV`` from a snapshot of that commit (immune to
edits in progress in the work tree).

Usage::

    python bench/dimse.py [--peers vna,orthanc] [--quick] [--vna-ref HEAD] [--orthanc-delayed-ack] [--keep]

Results are printed as a table and written to ``bench/out/dimse-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data  # noqa: E402
import peers  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
QUERIES = {"all": "", "smith": "SMITH*"}  # C-FIND variants: PatientName matching key
# (key, label, unit, target vna/Orthanc ratio, Orthanc figure reported earlier on this machine)
METRICS = [
    ("store_1", "C-STORE 1 assoc", "inst/s", 2, 108),
    ("store_4", "C-STORE 4 assocs", "inst/s", 2, 154),
    ("find_all_proc", "C-FIND all, findscu", "q/s", 10, 5.7),
    ("find_smith_proc", "C-FIND SMITH*, findscu", "q/s", 10, 26),
    ("find_all_assoc", "C-FIND all, 1 assoc", "q/s", 10, None),
    ("find_smith_assoc", "C-FIND SMITH*, 1 assoc", "q/s", 10, None),
    ("move_study", "C-MOVE 100 inst", "inst/s", 1, 374),
]


def _run(args: list[str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(args, env=peers.DCMTK_ENV, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{Path(args[0]).name} exited {r.returncode}: {(r.stderr or r.stdout)[-2000:]}")
    return r


def store(peer: peers.Peer, files: list[str], assocs: int) -> float:
    """Send ``files`` with ``assocs`` parallel storescu processes; return instances/s."""
    chunks = [files[i * len(files) // assocs:(i + 1) * len(files) // assocs] for i in range(assocs)]
    cmd = ["/usr/bin/storescu", "-aec", peer.aet, peer.host, str(peer.port)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(assocs) as pool:
        list(pool.map(lambda chunk: _run(cmd + chunk), chunks))
    return len(files) / (time.perf_counter() - t0)


def find(peer: peers.Peer, patient_name: str, processes: int = 1, repeat: int = 1, verbose: bool = False,
         extra_keys: tuple[str, ...] = ()) -> tuple[float, str]:
    """STUDY-level C-FIND: ``processes`` findscu runs one after another, each sending the query
    ``repeat`` times on its one association. Return (queries/s, output of the last run); the
    responses are printed only if ``verbose`` (which costs client CPU, so not when timing)."""
    cmd = ["/usr/bin/findscu", "-S", "-v" if verbose else "-q", "--repeat", str(repeat), "-aec", peer.aet,
           "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID", "-k", f"PatientName={patient_name}",
           "-k", "PatientID", "-k", "StudyDate", *[a for k in extra_keys for a in ("-k", k)],
           peer.host, str(peer.port)]
    t0 = time.perf_counter()
    for _ in range(processes):
        out = _run(cmd, timeout=300)
    return processes * repeat / (time.perf_counter() - t0), out.stdout + out.stderr


def matches(peer: peers.Peer, patient_name: str) -> int:
    """Number of studies the query matches."""
    return find(peer, patient_name, verbose=True)[1].count("(Pending)")


def stored_instances(peer: peers.Peer) -> int | None:
    """Sum of NumberOfStudyRelatedInstances over all studies (None if the peer leaves it out)."""
    out = find(peer, "", verbose=True, extra_keys=("NumberOfStudyRelatedInstances",))[1]
    counts = re.findall(r"\(0020,1208\) IS \[(\d+)", out)
    return sum(map(int, counts)) if counts and len(counts) == out.count("(Pending)") else None


def move(peer: peers.Peer, dest: peers.Peer, study: data.Study) -> float:
    """C-MOVE ``study`` to ``dest`` with movescu; check all instances arrived; return instances/s."""
    if dest.storage:
        for f in dest.storage.iterdir():
            f.unlink()
    cmd = ["/usr/bin/movescu", "-S", "-aec", peer.aet, "-aem", dest.aet, "-k", "QueryRetrieveLevel=STUDY",
           "-k", f"StudyInstanceUID={study.uid}", peer.host, str(peer.port)]
    t0 = time.perf_counter()
    _run(cmd, timeout=600)
    elapsed = time.perf_counter() - t0
    if dest.storage and (got := len(list(dest.storage.iterdir()))) != study.instances:
        raise RuntimeError(f"C-MOVE delivered {got} of {study.instances} instances")
    return study.instances / elapsed


class Bench:
    """One benchmark run: the peers' factories, the data, the results per peer."""

    def __init__(self, starters: dict[str, Callable], studies: list[data.Study], dest: peers.Peer,
                 work: Path, quick: bool, keep: bool) -> None:
        self.starters, self.studies, self.dest, self.work, self.keep = starters, studies, dest, work, keep
        self.files = [f for s in studies for f in s.files]
        self.runs = 1 if quick else 3
        self.find_processes, self.find_repeat = (10, 50) if quick else (50, 300)
        self.results: dict[str, dict] = {n: {"samples": {}, "errors": {}} for n in starters}

    @contextmanager
    def archive(self, name: str, label: str) -> Iterator[peers.Peer]:
        """A fresh, empty archive of peer kind ``name``, deleted afterwards unless ``keep``."""
        path = self.work / f"{name}-{label}"
        try:
            with self.starters[name](path, {self.dest.aet: (self.dest.host, self.dest.port)}) as peer:
                yield peer
        finally:
            if not self.keep:
                shutil.rmtree(path, ignore_errors=True)

    def measure(self, name: str, key: str, fn: Callable[[], float], note: str = "") -> float | None:
        """Run one measurement, print it; on failure record the error (the other figures survive)."""
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 - a missing peer feature must not sink the whole run
            self.results[name]["errors"][key] = f"{type(exc).__name__}: {exc}"
            print(f"  {name:8} {key:18} FAILED: {exc}", flush=True)
            return None
        self.results[name]["samples"].setdefault(key, []).append(value)
        print(f"  {name:8} {key:18} {value:8.1f}{note}", flush=True)
        return value

    def _settle(self, name: str, key: str) -> None:
        if samples := self.results[name]["samples"].get(key):
            self.results[name][key] = statistics.median(samples)

    def stores(self) -> None:
        """C-STORE runs, each on a fresh archive, alternating between the peers."""
        for assocs in (1, 4):
            key = f"store_{assocs}"
            for i in range(self.runs):
                for name in self.starters:
                    try:
                        with self.archive(name, f"{key}-{i}") as peer:
                            self.measure(name, key, lambda: store(peer, self.files, assocs), " inst/s")
                    except Exception as exc:  # noqa: BLE001 - the peer did not start or stop cleanly
                        self.results[name]["errors"][f"{key}-{i}"] = f"{type(exc).__name__}: {exc}"
                        print(f"  {name:8} {key:18} FAILED: {exc}", flush=True)
            for name in self.starters:
                self._settle(name, key)

    def queries(self, name: str) -> None:
        """C-FIND and C-MOVE against one archive of peer kind ``name`` holding all the instances."""
        res = self.results[name]
        with self.archive(name, "query") as peer:
            store(peer, self.files, 4)
            res["stored_instances"] = stored_instances(peer)
            if res["stored_instances"] not in (None, len(self.files)):
                print(f"  WARNING: {name} reports {res['stored_instances']} of {len(self.files)} instances")
            smiths = sum(s.patient_name.startswith("SMITH") for s in self.studies)
            for q, expected in (("all", len(self.studies)), ("smith", smiths)):
                pn = QUERIES[q]
                if (n := matches(peer, pn)) != expected:
                    res["errors"][f"find_{q}"] = f"{n} matches, expected {expected}"
                    print(f"  WARNING: {name} C-FIND {q}: {n} matches, expected {expected}")
                for key, procs, repeat in ((f"find_{q}_proc", self.find_processes, 1),
                                           (f"find_{q}_assoc", 1, self.find_repeat)):
                    self.measure(name, key, lambda: find(peer, pn, procs, repeat)[0],
                                 f" q/s ({procs} x {repeat} queries, {n} matches)")
                    self._settle(name, key)
            study = next(s for s in self.studies if s.instances == 100)
            for _ in range(self.runs):
                self.measure(name, "move_study", lambda: move(peer, self.dest, study), " inst/s")
            self._settle(name, "move_study")

    def run(self) -> None:
        self.stores()
        for name in self.starters:
            try:
                self.queries(name)
            except Exception as exc:  # noqa: BLE001 - e.g. the peer did not start: report the others
                self.results[name]["errors"]["queries"] = f"{type(exc).__name__}: {exc}"
                print(f"  {name:8} queries FAILED: {exc}", flush=True)


def table(results: dict[str, dict]) -> str:
    """Text table: a row per metric, a column per peer, the vna/Orthanc ratio against its target and
    the Orthanc figure reported earlier."""
    names = list(results)
    both = "vna" in results and "orthanc" in results
    head = f"{'metric':<24}{'unit':>7}" + "".join(f"{n:>10}" for n in names)
    head += (f"{'vna/orth':>10}{'target':>9}" if both else "") + f"{'ref orth':>10}"
    lines = [head, "-" * len(head)]
    nan = float("nan")
    for key, label, unit, target, ref in METRICS:
        row = f"{label:<24}{unit:>7}" + "".join(f"{results[n].get(key, nan):>10.1f}" for n in names)
        if both:
            ratio = results["vna"].get(key, nan) / results["orthanc"].get(key, nan)
            row += f"{ratio:>9.2f}x{'>=' + str(target) + 'x':>7} {'ok' if ratio >= target else '--'}"
        lines.append(row + (f"{ref:>10}" if ref else ""))
    return "\n".join(lines)


def vna_snapshot(ref: str | None, dest: Path) -> tuple[Path, str]:
    """(source directory, version) of the vna to run: the work tree, or commit ``ref`` exported to
    ``dest``."""
    git = ["git", "-C", str(peers.REPO)]
    if ref is None:
        head = _git(git + ["rev-parse", "--short", "HEAD"])
        dirty = _git(git + ["status", "--porcelain", "--untracked-files=no"])
        return peers.REPO, head + ("+dirty" if dirty else "")
    dest.mkdir(parents=True)
    archive = subprocess.run(git + ["archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest, _git(git + ["rev-parse", "--short", ref])


def _git(args: list[str]) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", default="vna,orthanc", help="comma-separated: vna, orthanc")
    p.add_argument("--quick", action="store_true", help="1 run of each C-STORE and C-MOVE, fewer C-FINDs")
    p.add_argument("--orthanc-delayed-ack", action="store_true",
                   help="run Orthanc without TCP_NODELAY=1 (its responses then wait for delayed ACKs)")
    p.add_argument("--vna-ref", metavar="REV", help="run vna from a snapshot of commit REV (e.g. HEAD)")
    p.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "vna-bench-data" / "dimse",
                   help="data set directory (generated once, then reused)")
    p.add_argument("--keep", action="store_true", help="keep the peers' working directories")
    a = p.parse_args(argv)
    names = [n.strip() for n in a.peers.split(",") if n.strip()]
    if unknown := set(names) - {"vna", "orthanc"}:
        p.error(f"unknown peers: {', '.join(sorted(unknown))}")
    studies = data.generate(a.data, *data.PRESETS["dimse"])
    print(f"data: {sum(s.instances for s in studies)} instances in {len(studies)} studies ({a.data})")
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="vna-bench-dimse-"))
    try:
        vna_source, vna_version = vna_snapshot(a.vna_ref, work / "vna-src")
        print(f"vna: {vna_version} ({vna_source})")
        factories = {"orthanc": functools.partial(peers.orthanc, tcp_nodelay=not a.orthanc_delayed_ack),
                     "vna": functools.partial(peers.vna, source=vna_source)}
        with peers.storescp(work / "storescp") as dest:
            bench = Bench({n: factories[n] for n in names}, studies, dest, work, a.quick, a.keep)
            bench.run()
    finally:
        if a.keep:
            print(f"working directories kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()
    print(f"\nload average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} on {os.cpu_count()} CPUs\n")
    print(table(bench.results))
    OUT.mkdir(exist_ok=True)
    out = OUT / f"dimse-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"host": platform.node(), "cpus": os.cpu_count(), "quick": a.quick,
                               "orthanc_tcp_nodelay": not a.orthanc_delayed_ack, "vna_version": vna_version,
                               "loadavg_before": load_before, "loadavg_after": load_after,
                               "instances": len(bench.files), "studies": len(studies),
                               "results": bench.results}, indent=1))
    print(f"\nresults written to {out}")
    return 1 if any(r["errors"] for r in bench.results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
