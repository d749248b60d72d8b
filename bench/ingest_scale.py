"""Does ingest slow down as the index grows? C-STORE rate on an empty index vs with N instances indexed.

Two vna servers run side by side: one whose index is filled to N instances (default 200,000) with
SQL (patients, studies, series and instance rows cloned from a stored instance, each with the full
metadata text, as C-STORE would leave them but without objects: only the index's size matters here),
one left (almost) empty. In each round storescu sends 1000 x 512 KiB CT instances (bench/data.py,
with new UIDs every time) on one association to the empty one, then to the full one. Alternating
rounds cancel drifts in the machine's load; the medians are compared.

    python bench/ingest_scale.py [--indexed 200000] [--rounds 3] [--workdir DIR]

Prints the rates and the ratio full/empty (target >= 0.9).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from archive.embedded_pg import EmbeddedPostgres  # noqa: E402
from data import generate  # noqa: E402
from dimse import store  # noqa: E402
from peers import vna  # noqa: E402

_FILL = """
INSERT INTO patient (patient_id, issuer_of_patient_id, patient_name, patient_birth_date, patient_sex, attrs)
SELECT 'FILL' || g, '', 'fill^patient' || g, '19700101', 'O', (SELECT attrs FROM patient LIMIT 1)
FROM generate_series(1, $1::int / 100) g;

INSERT INTO study (patient_fk, study_instance_uid, study_date, study_time, accession_number, study_id,
                   referring_physician_name, study_description, attrs)
SELECT p.pk, '2.25.' || (1000000 + g), to_char(date '2015-01-01' + g % 3000, 'YYYYMMDD'), '120000.000000',
       'ACC' || g, g::text, 'ref^doctor', 'fill study', (SELECT attrs FROM study LIMIT 1)
FROM generate_series(1, $1::int / 100) g JOIN patient p ON p.patient_id = 'FILL' || g;

INSERT INTO series (study_fk, series_instance_uid, modality, series_number, series_description, attrs)
SELECT st.pk, '2.25.' || (2000000 + st.pk * 4 + s), 'CT', s, 'fill series', (SELECT attrs FROM series LIMIT 1)
FROM study st CROSS JOIN generate_series(1, 4) s WHERE st.study_instance_uid LIKE '2.25.1%';

INSERT INTO instance (series_fk, sop_instance_uid, sop_class_uid, instance_number, transfer_syntax_uid, store,
                      location, size, digest, dataset_offset, attrs, metadata, source)
SELECT se.pk, '2.25.' || (3000000 + se.pk * 25 + i), t.sop_class_uid, i, t.transfer_syntax_uid, t.store,
       'fill/' || se.pk || '/' || i, t.size, t.digest, t.dataset_offset, t.attrs, t.metadata, 'fill'
FROM series se CROSS JOIN generate_series(1, 25) i CROSS JOIN (SELECT * FROM instance LIMIT 1) t
WHERE se.series_instance_uid LIKE '2.25.2%';
VACUUM ANALYZE;
CHECKPOINT
"""


def _renumber(files: list[str], outdir: Path) -> list[str]:
    """The same instances with new Study/Series/SOP Instance UIDs (a second, disjoint batch)."""
    outdir.mkdir(parents=True, exist_ok=True)
    mapping: dict[str, str] = {}
    out = []
    for f in files:
        ds = pydicom.dcmread(f)
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
            old = str(getattr(ds, kw))
            setattr(ds, kw, mapping.setdefault(old, pydicom.uid.generate_uid()))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        target = outdir / Path(f).name
        ds.save_as(target, enforce_file_format=True)
        out.append(str(target))
    return out


async def _fill(dsn: str, total: int) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SET statement_timeout = 0")
        for statement in filter(str.strip, _FILL.split(";")):
            if "$1" in statement:
                await conn.execute(statement, total)
            else:
                await conn.execute(statement)
        return await conn.fetchval("SELECT count(*) FROM instance")
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--indexed", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workdir", type=Path)
    args = p.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vna-scale-"))
    studies = generate(work / "data", 10, 5, 20)
    template = [f for s in studies for f in s.files]
    batches = [_renumber(template, work / f"batch-{n}") for n in range(2 * args.rounds + 1)]
    rates: dict[str, list[float]] = {"empty": [], "full": []}
    with vna(work / "empty", {}) as empty, vna(work / "full", {}) as full:
        store(full, batches[-1], 1)  # the rows the fill clones
        dsn = EmbeddedPostgres(work / "full" / "data").ensure_running()
        started = time.perf_counter()
        count = asyncio.run(_fill(dsn, args.indexed))
        print(f"index filled to {count} instances in {time.perf_counter() - started:.0f} s")
        for n in range(args.rounds):
            rates["empty"].append(store(empty, batches[2 * n], 1))
            rates["full"].append(store(full, batches[2 * n + 1], 1))
            print(f"round {n + 1}: empty {rates['empty'][-1]:.0f} inst/s, full {rates['full'][-1]:.0f} inst/s")
    empty_rate, full_rate = statistics.median(rates["empty"]), statistics.median(rates["full"])
    result = {"empty_index_inst_per_s": round(empty_rate, 1), "indexed": count,
              "full_index_inst_per_s": round(full_rate, 1), "ratio": round(full_rate / empty_rate, 3),
              "rounds": rates, "load_average": os.getloadavg()}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
