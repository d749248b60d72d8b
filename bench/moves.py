"""Lifecycle move throughput: `vna policy apply` (archive/moves.py) between two pools of one memstore OSD.

The issue's target: a lifecycle move sustains >= 100 MB/s. Setup: ``scripts/ceph-cluster start DIR --osds 1``
(one monitor, one memstore OSD, data in RAM), two pools of size 1 (``vna-hot``, ``vna-cold``, 8 PGs each), an
embedded PostgreSQL; ``--count`` CT instances of ``--size`` bytes (512 KiB by default, bench/data.py's
``dimse`` preset size) ingested through the one ingest path into class ``hot``, then aged by ``lifecycle``
(``hot`` -> ``cold`` after 0 days) and moved by a Mover with ``--concurrency`` objects at once: read the
object, write it to the other pool, read it back and check its SHA-256 against the index, switch the index
row, delete the old copy (``--grace 0``: at once). Runs alternate direction (hot -> cold, cold -> hot), each
moving every instance; the figure is the median of ``--runs``.

Usage::

    python bench/moves.py [--count 1000] [--size 524288] [--runs 3] [--concurrency 8] [--osd-bytes N]

Prints a table and writes ``bench/out/moves-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# the repository, not bench/, first: bench/rados.py would shadow librados' `rados` module
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]

import numpy as np  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from archive.config import IngestSettings, Settings  # noqa: E402
from archive.database import create_pool, migrate  # noqa: E402
from archive.embedded_pg import EmbeddedPostgres  # noqa: E402
from archive.index import Index  # noqa: E402
from archive.ingest import Ingestor  # noqa: E402
from archive.moves import Mover  # noqa: E402
from archive.policy import parse_policy  # noqa: E402
from archive.rados_store import RadosConnection  # noqa: E402
from archive.stores import open_stores  # noqa: E402
from metrics.registry import Metrics  # noqa: E402
from tests.ceph_policy import make_ct, part10  # noqa: E402

OUT = REPO / "bench" / "out"
TARGET_MB_S = 100.0


def policy(src: str, dst: str) -> Any:
    """Everything is stored in `src` and belongs in `dst` at once (a lifecycle step after 0 days)."""
    return parse_policy({"default_class": src,
                         "classes": {src: {"pool": f"vna-{src}", "lifecycle": [{"after_days": 0, "move_to": dst}]},
                                     dst: {"pool": f"vna-{dst}"}}})


def instances(count: int, size: int) -> list[bytes]:
    """`count` CT instances whose pixel data makes each about `size` bytes (random: nothing compresses)."""
    side = max(8, int((size / 2) ** 0.5))
    study, series = generate_uid(), generate_uid()
    pixels = np.random.default_rng(7).integers(0, 4096, (side, side), dtype=np.uint16)
    out = []
    for n in range(count):
        ds = make_ct("Bench Hospital", study=study, series=series, n=n, size=8)
        ds.Rows = ds.Columns = side
        ds.PixelData = np.roll(pixels, n).tobytes()
        out.append(part10(ds))
    return out


async def bench(args: argparse.Namespace, cluster: dict[str, Any], dsn: str) -> dict[str, Any]:
    settings = Settings.load({"storage": {"backend": "rados", "rados": {
        "conffile": cluster["conf"], "keyring": cluster["keyring"], "client_name": cluster["client_name"],
        "pool": "vna-hot", "op_timeout": 30}}})
    pool = await create_pool(dsn, min_size=2, max_size=args.concurrency + 4, command_timeout=60)
    async with pool.acquire() as conn:
        await migrate(conn)
    index = Index(pool)
    runs: list[dict[str, Any]] = []
    mon = RadosConnection(settings.storage.rados)
    await mon.connect()
    try:
        for pool_name in ("vna-hot", "vna-cold"):
            await mon.mon_command({"prefix": "osd pool create", "pool": pool_name, "pg_num": 8, "pgp_num": 8})
            await mon.mon_command({"prefix": "osd pool application enable", "pool": pool_name, "app": "vna"})
    finally:
        await mon.close()
    try:
        async with open_stores(settings, policy("hot", "cold")) as stores:
            ingestor = Ingestor(index, stores.default.store, IngestSettings(), Metrics(), stores=stores)
            data = instances(args.count, args.size)
            started = time.monotonic()
            gate = asyncio.Semaphore(8)

            async def ingest(blob: bytes) -> None:
                async with gate:
                    await ingestor.ingest_part10(blob, protocol="dicomweb", source="dicomweb")

            await asyncio.gather(*(ingest(b) for b in data))
            total = sum(map(len, data))
            del data
            print(f"ingested {args.count} instances ({total / 1e6:.0f} MB) in {time.monotonic() - started:.1f} s",
                  flush=True)
            direction = ("hot", "cold")
            for run in range(args.runs):
                await stores.reload(policy(*direction))
                mover = Mover(pool, stores, Metrics(), grace_seconds=0, concurrency=args.concurrency)
                load = os.getloadavg()[0]
                report = await mover.run()
                assert (report.moved, report.failed) == (args.count, 0), report.summary()
                runs.append({"run": run, "from": direction[0], "to": direction[1], "moved": report.moved,
                             "bytes": report.bytes, "seconds": round(report.seconds, 3),
                             "mb_per_s": round(report.mb_per_s, 1), "load_before": round(load, 2)})
                print(f"run {run}: {direction[0]} -> {direction[1]}: {report.summary()}", flush=True)
                direction = (direction[1], direction[0])
    finally:
        await pool.close()
    median = statistics.median(r["mb_per_s"] for r in runs)
    return {"count": args.count, "size": args.size, "concurrency": args.concurrency, "runs": runs,
            "median_mb_per_s": median, "target_mb_per_s": TARGET_MB_S, "meets_target": median >= TARGET_MB_S,
            "cpus": os.cpu_count(), "machine": platform.platform()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--size", type=int, default=512 * 1024)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--osd-bytes", type=int, help="memstore size (RAM); default: 3x the data, at least 2 GiB")
    args = p.parse_args()
    # memstore hangs writes once full (and librados waits on a full pool): room for both copies and overhead
    args.osd_bytes = args.osd_bytes or max(2 << 30, 3 * args.count * args.size)
    with tempfile.TemporaryDirectory(prefix="vna-bench-moves-") as work:
        d = Path(work) / "ceph"
        subprocess.run([str(REPO / "scripts" / "ceph-cluster"), "start", str(d), "--osds", "1",
                        "--osd-bytes", str(args.osd_bytes)], check=True, stdout=subprocess.DEVNULL, timeout=180)
        pg = EmbeddedPostgres(Path(work) / "pg")
        try:
            dsn = pg.ensure_running()
            result = asyncio.run(bench(args, json.loads((d / "cluster.json").read_text()), dsn))
        finally:
            pg.stop()
            subprocess.run([str(REPO / "scripts" / "ceph-cluster"), "stop", str(d)], check=True, timeout=60)
    print(f"\nlifecycle move, {args.count} x {args.size // 1024} KiB, concurrency {args.concurrency}, 1 memstore OSD:")
    for r in result["runs"]:
        print(f"  {r['from']:>4} -> {r['to']:<4} {r['mb_per_s']:8.1f} MB/s  ({r['seconds']} s, load {r['load_before']})")
    verdict = "meets" if result["meets_target"] else "MISSES"
    print(f"  median {result['median_mb_per_s']:.1f} MB/s: {verdict} the target of {TARGET_MB_S:.0f} MB/s")
    OUT.mkdir(exist_ok=True)
    path = OUT / f"moves-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
