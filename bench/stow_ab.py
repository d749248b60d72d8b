"""STOW-RS A/B: vna under several settings, and Orthanc, run by run in turn on the same data and client.

    python bench/stow_ab.py --vna-ref HEAD --variant VNA__WORKERS=1 --variant VNA__WORKERS=2 --orthanc
    python bench/stow_ab.py --vna-ref HEAD --ref 6c2007c --orthanc     # against vna at an older commit

Each variant is a vna started with those VNA__ settings on a fresh archive; one run STOWs the 2000
instances of the web data set (bench/data.py --preset web) with 4 clients and BATCH instances per request
(the client of bench/web.py: bodies built before the clock starts). Runs alternate between the variants,
so the machine's drift over minutes falls on all of them alike; medians and the per-run ratios to the first
variant are printed, and the machine's CPU time per stored instance (all processes: client, server,
PostgreSQL; from /proc/stat), which drifts less than the rate and shows a CPU saving even when the rate is
bound by latency. For comparisons of vna's own settings; bench/web.py gives the figures against the
issue's targets.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import dimse, peers  # noqa: E402
from bench.web import prepare, stow  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", action="append", default=[], metavar="VNA__KEY=V[,VNA__KEY=V]",
                   help="vna with these settings ('' for the defaults); repeatable")
    p.add_argument("--ref", action="append", default=[], metavar="REV",
                   help="one more variant: vna at commit REV with its defaults; repeatable")
    p.add_argument("--orthanc", action="store_true", help="Orthanc as one more variant")
    p.add_argument("--batch", default="1,10", help="instances per request, comma-separated")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--vna-ref", metavar="REV", help="run vna from a snapshot of commit REV")
    p.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "vna-bench-data")
    a = p.parse_args(argv)
    variants = a.variant or [""]
    for v in variants:
        for item in filter(None, v.split(",")):
            if not item.startswith("VNA__") or "=" not in item:
                p.error(f"--variant takes VNA__KEY=VALUE items, not {item!r}")
    ds = prepare(a.data)
    work = Path(tempfile.mkdtemp(prefix="vna-bench-ab-"))
    try:
        source, version = dimse.vna_snapshot(a.vna_ref, work / "vna-src")
        print(f"vna {version}; {len(ds.files)} instances; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
        # (name, VNA__ settings or None for Orthanc, vna source)
        runs_of: list[tuple[str, str | None, Path]] = [(v or "vna defaults", v, source) for v in variants]
        for i, ref in enumerate(a.ref):
            ref_source, ref_version = dimse.vna_snapshot(ref, work / f"vna-ref-{i}")
            runs_of.append((f"vna at {ref_version}", "", ref_source))
        if a.orthanc:
            runs_of.append(("orthanc", None, source))
        names = [name for name, _, _ in runs_of]
        for batch in [int(b) for b in a.batch.split(",")]:
            rates: dict[str, list[float]] = {n: [] for n in names}
            cpu: dict[str, list[float]] = {n: [] for n in names}
            for run in range(a.runs):
                for name, variant, src in runs_of:
                    rate, cpu_ms = _one(work / f"{batch}-{run}-{names.index(name)}", ds.files, batch, variant, src)
                    rates[name].append(rate)
                    cpu[name].append(cpu_ms)
                    print(f"  b{batch} run {run + 1} {name:30} {rate:7.1f} inst/s, CPU {cpu_ms:.2f} ms/inst "
                          f"load {os.getloadavg()[0]:.2f}", flush=True)
            base = rates[names[0]]
            for name in names:
                paired = statistics.median(r / b for r, b in zip(rates[name], base, strict=True))
                print(f"b{batch} {name:30} median {statistics.median(rates[name]):7.1f} inst/s, "
                      f"paired ratio to {names[0]!r} {paired:.2f}  runs {[round(r) for r in rates[name]]}; "
                      f"CPU median {statistics.median(cpu[name]):.2f} ms/inst")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _busy_seconds() -> float:
    """CPU time the whole machine has spent busy since boot (/proc/stat: all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _one(workdir: Path, files: list[str], batch: int, variant: str | None, source: Path) -> tuple[float, float]:
    """(instances/s, machine CPU ms per instance) of one STOW-RS run on a fresh archive."""
    workdir.mkdir(parents=True)
    saved = {k: v for k, v in os.environ.items() if k.startswith("VNA__")}
    try:
        for k in saved:
            del os.environ[k]
        if variant is None:
            factory, root = peers.orthanc, "/dicom-web"
        else:
            os.environ.update(item.split("=", 1) for item in filter(None, variant.split(",")))
            factory, root = functools.partial(peers.vna, source=source), "/dicomweb"
        with factory(workdir, {}) as peer:
            busy = _busy_seconds()
            rate = stow(f"http://{peer.host}:{peer.http_port}{root}", files, 4, batch)
            return rate, (_busy_seconds() - busy) * 1000 / len(files)
    finally:
        for k in [k for k in os.environ if k.startswith("VNA__")]:
            del os.environ[k]
        os.environ.update(saved)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
