"""DIMSE benchmark: the same workload against vna and Orthanc (+PostgreSQL), with vna/Orthanc ratios.

Workload (synthetic CT, 10 studies x 5 series x 20 instances of ~512 KiB, see ``data.py``), all with
the dcmtk tools (TCP_NODELAY=1) as clients:

* C-STORE of all 1000 instances on 1 association (one ``storescu``) and on 4 associations (four
  ``storescu`` in parallel, a quarter of the files each), each run on a fresh, empty archive,
  median of 3 runs;
* on one more archive loaded with the 1000 instances (4 associations, untimed):
  C-FIND at STUDY level (study root) over the stored studies, universal and ``PatientName=SMITH*``:
  one ``findscu`` process (and association) per query -- the headline figure, which includes process
  start-up (~10 ms) -- and one ``findscu --repeat N`` sending N queries on one association;
  C-MOVE of one 100-instance study to a dcmtk ``storescp`` (``movescu -aem``), median of 3.

Orthanc runs with TCP_NODELAY=1 too (its DICOM stack is dcmtk), unless ``--orthanc-delayed-ack``.

Usage::

    python bench/dimse.py [--peers vna,orthanc] [--quick] [--orthanc-delayed-ack] [--keep]

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


def find(peer: peers.Peer, patient_name: str, processes: int, repeat: int = 1,
         extra_keys: tuple[str, ...] = ()) -> tuple[float, str]:
    """STUDY-level C-FIND: ``processes`` findscu runs one after another, each sending the query
    ``repeat`` times on its one association. Return (queries/s, output of the last run)."""
    cmd = ["/usr/bin/findscu", "-S", "-v", "--repeat", str(repeat), "-aec", peer.aet,
           "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID", "-k", f"PatientName={patient_name}",
           "-k", "PatientID", "-k", "StudyDate", *[a for k in extra_keys for a in ("-k", k)],
           peer.host, str(peer.port)]
    t0 = time.perf_counter()
    for _ in range(processes):
        out = _run(cmd, timeout=300)
    return processes * repeat / (time.perf_counter() - t0), out.stdout + out.stderr


def matches(findscu_output: str, repeat: int = 1) -> int:
    """Matches per query in findscu -v output."""
    return findscu_output.count("(Pending)") // repeat


def stored_instances(peer: peers.Peer) -> int | None:
    """Sum of NumberOfStudyRelatedInstances over all studies (None if the peer leaves it out)."""
    _, out = find(peer, "", 1, extra_keys=("NumberOfStudyRelatedInstances",))
    counts = re.findall(r"\(0020,1208\) IS \[(\d+)", out)
    return sum(map(int, counts)) if counts and len(counts) == matches(out) else None


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


def _measure(res: dict, name: str, what: str, fn):
    """Run one measurement; on failure record the error (so the other figures survive) and go on."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a broken peer feature must not sink the whole run
        res["errors"][what] = f"{type(exc).__name__}: {exc}"
        print(f"  {name}: {what} FAILED: {exc}", flush=True)
        return None


def bench_peer(name: str, start, studies: list[data.Study], dest: peers.Peer, work: Path,
               quick: bool, keep: bool) -> dict:
    """All measurements against one peer kind (``start`` is its context manager factory)."""
    files = [f for s in studies for f in s.files]
    dests = {dest.aet: (dest.host, dest.port)}
    res: dict = {"samples": {}, "errors": {}}
    runs = 1 if quick else 3

    @contextmanager
    def archive(label: str):
        """A fresh, empty archive, deleted afterwards unless ``keep``."""
        try:
            with start(work / f"{name}-{label}", dests) as peer:
                yield peer
        finally:
            if not keep:
                shutil.rmtree(work / f"{name}-{label}", ignore_errors=True)

    def log(key: str, unit: str, extra: str = "") -> None:
        print(f"  {name}: {key} {res[key]:.1f} {unit}{extra}", flush=True)

    for assocs in (1, 4):
        key, rates = f"store_{assocs}", []
        for i in range(runs):
            with archive(f"{key}-{i}") as peer:
                if (r := _measure(res, name, key, lambda: store(peer, files, assocs))) is not None:
                    rates.append(r)
        if rates:
            res[key], res["samples"][key] = statistics.median(rates), rates
            log(key, "inst/s", f" (runs: {', '.join(f'{r:.0f}' for r in rates)})")

    with archive("query") as peer:
        store(peer, files, 4)
        res["stored_instances"] = _measure(res, name, "count", lambda: stored_instances(peer))
        if res["stored_instances"] not in (None, len(files)):
            print(f"  WARNING: {name} reports {res['stored_instances']} of {len(files)} instances stored")
        expected = {"all": len(studies), "smith": sum(s.patient_name.startswith("SMITH") for s in studies)}
        for q, pn in QUERIES.items():
            for mode, procs, repeat in (("proc", 10 if quick else 50, 1), ("assoc", 1, 50 if quick else 300)):
                key = f"find_{q}_{mode}"
                if (r := _measure(res, name, key, functools.partial(find, peer, pn, procs, repeat))) is None:
                    continue
                res[key], n = r[0], matches(r[1], repeat)
                res["samples"][key] = {"processes": procs, "repeat": repeat, "matches": n}
                if n != expected[q]:
                    print(f"  WARNING: {name} {key}: {n} matches per query, expected {expected[q]}")
                log(key, "q/s", f" ({n} matches)")
        study = next(s for s in studies if s.instances == 100)
        moves = [m for _ in range(runs)
                 if (m := _measure(res, name, "move_study", lambda: move(peer, dest, study))) is not None]
        if moves:
            res["move_study"], res["samples"]["move_study"] = statistics.median(moves), moves
            log("move_study", "inst/s", f" (runs: {', '.join(f'{m:.0f}' for m in moves)})")
    return res


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", default="vna,orthanc", help="comma-separated: vna, orthanc")
    p.add_argument("--quick", action="store_true", help="1 run of each C-STORE and C-MOVE, fewer C-FINDs")
    p.add_argument("--orthanc-delayed-ack", action="store_true",
                   help="run Orthanc without TCP_NODELAY=1 (its responses then wait for delayed ACKs)")
    p.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "vna-bench-data" / "dimse",
                   help="data set directory (generated once, then reused)")
    p.add_argument("--keep", action="store_true", help="keep the peers' working directories")
    a = p.parse_args(argv)
    starters = {"orthanc": functools.partial(peers.orthanc, tcp_nodelay=not a.orthanc_delayed_ack),
                "vna": peers.vna}
    names = [n.strip() for n in a.peers.split(",") if n.strip()]
    if unknown := set(names) - set(starters):
        p.error(f"unknown peers: {', '.join(sorted(unknown))}")
    studies = data.generate(a.data, *data.PRESETS["dimse"])
    print(f"data: {sum(s.instances for s in studies)} instances in {len(studies)} studies ({a.data})")
    work = Path(tempfile.mkdtemp(prefix="vna-bench-dimse-"))
    results: dict[str, dict] = {}
    try:
        with peers.storescp(work / "storescp") as dest:
            for name in names:
                print(f"{name}:", flush=True)
                try:
                    results[name] = bench_peer(name, starters[name], studies, dest, work, a.quick, a.keep)
                except Exception as exc:  # noqa: BLE001 - e.g. the peer did not start: report the others
                    print(f"  {name} FAILED: {exc}", flush=True)
                    results[name] = {"samples": {}, "errors": {"peer": f"{type(exc).__name__}: {exc}"}}
    finally:
        if a.keep:
            print(f"working directories kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(results))
    OUT.mkdir(exist_ok=True)
    out = OUT / f"dimse-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"host": platform.node(), "cpus": os.cpu_count(), "quick": a.quick,
                               "orthanc_tcp_nodelay": not a.orthanc_delayed_ack,
                               "instances": len([f for s in studies for f in s.files]),
                               "studies": len(studies), "results": results}, indent=1))
    print(f"\nresults written to {out}")
    return 1 if any(r["errors"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
