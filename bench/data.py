"""Deterministic synthetic CT data set for the benchmarks.

Each instance is a CT Image Storage object, Explicit VR Little Endian, 512x512 16-bit pixels
(~512 KiB), with realistic patient/study/series attributes. UIDs are derived from the layout
(study, series, instance index), so the same command always writes the same files. One pixel buffer
is shared by all instances, which keeps generation I/O-bound (1000 files in a few seconds).

Files are written flat as ``OUTDIR/sSSS_eEE_iIII.dcm`` with ``OUTDIR/manifest.json`` describing the
studies; an existing directory whose manifest matches the requested layout is reused as is.

Presets: ``dimse`` = 10 studies x 5 series x 20 instances (1000), ``web`` = 20 studies x 4 series x
25 instances (2000, 100 per study).

Usage::

    python bench/data.py OUTDIR --studies 10 --series 5 --instances 20
    python bench/data.py OUTDIR --preset web
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

PRESETS = {"dimse": (10, 5, 20), "web": (20, 4, 25)}
ROWS = COLS = 512
_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's UID root; suffixes are hashes of the layout
_SMITHS = ["SMITH^JOHN", "SMITH^MARY"]
_OTHERS = ["JONES^ROBERT", "GARCIA^MARIA", "MUELLER^HANS", "NGUYEN^THI", "OKAFOR^CHIDI",
           "ROSSI^GIULIA", "TANAKA^HIROSHI", "DUBOIS^CLAIRE", "KOWALSKI^PIOTR", "SILVA^ANA"]
_BODY_PARTS = ["CHEST", "ABDOMEN", "HEAD", "PELVIS", "NECK"]


@dataclass
class Study:
    """One generated study, as recorded in the manifest."""

    uid: str
    patient_name: str
    patient_id: str
    study_date: str
    instances: int
    files: list[str]


def _uid(*parts: object) -> str:
    # generate_uid hashes its entropy sources concatenated: without a separator, instance (1, 0, 15)
    # and (10, 1, 5) would get the same UID
    return generate_uid(prefix=_ROOT, entropy_srcs=["vna-bench", "/".join(map(str, parts))])


def patient_for(study: int) -> tuple[str, str]:
    """(PatientName, PatientID) of study number ``study``: every third study is a SMITH."""
    if study % 3 == 0:
        name = _SMITHS[(study // 3) % len(_SMITHS)]
    else:
        name = _OTHERS[(study - study // 3 - 1) % len(_OTHERS)]
    return name, f"PID{sum(map(ord, name)) * 7919 % 1_000_000:06d}"


def _pixels() -> bytes:
    """A 12-bit CT-like slice (disc of soft tissue in air, with noise), fixed seed."""
    y, x = np.mgrid[:ROWS, :COLS]
    disc = ((x - COLS / 2) ** 2 + (y - ROWS / 2) ** 2) < (0.42 * COLS) ** 2
    noise = np.random.default_rng(1234).normal(0, 20, (ROWS, COLS))
    hu = np.where(disc, 40, -1000) + noise  # Hounsfield units
    return np.clip(hu + 1024, 0, 4095).astype("<u2").tobytes()


def _template() -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = "VNA_BENCH"
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.Manufacturer = "VNA Bench"
    ds.ManufacturerModelName = "Synthetic CT"
    ds.InstitutionName = "General Hospital"
    ds.ReferringPhysicianName = "HOUSE^GREGORY"
    ds.PatientSex = "O"
    ds.KVP = "120"
    ds.SliceThickness = "1.25"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = ROWS, COLS
    ds.PixelSpacing = [0.7, 0.7]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.PixelData = _pixels()
    return ds


def generate(outdir: Path, studies: int, series: int, instances: int) -> list[Study]:
    """Write (or reuse) the data set in ``outdir``; return the studies with their file paths."""
    outdir = Path(outdir)
    manifest = outdir / "manifest.json"
    layout = {"studies": studies, "series": series, "instances": instances, "uids": 2}
    if manifest.exists():
        saved = json.loads(manifest.read_text())
        if saved["layout"] == layout:
            return [Study(**s) for s in saved["studies"]]
    outdir.mkdir(parents=True, exist_ok=True)
    ds = _template()
    base_date = dt.date(2023, 1, 2)
    result = []
    for st in range(studies):
        name, pid = patient_for(st)
        date = (base_date + dt.timedelta(days=17 * st)).strftime("%Y%m%d")
        study_uid = _uid("study", st)
        ds.PatientName, ds.PatientID = name, pid
        ds.PatientBirthDate = f"{1940 + (st * 7) % 60}0{1 + st % 9}15"
        ds.StudyInstanceUID, ds.StudyID = study_uid, str(st + 1)
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = date
        ds.StudyTime = f"{8 + st % 10:02d}{(st * 7) % 60:02d}00"
        ds.AccessionNumber = f"ACC{20230000 + st:08d}"
        ds.StudyDescription = f"CT {_BODY_PARTS[st % len(_BODY_PARTS)]}"
        ds.BodyPartExamined = _BODY_PARTS[st % len(_BODY_PARTS)]
        files = []
        for se in range(series):
            ds.SeriesInstanceUID = _uid("series", st, se)
            ds.FrameOfReferenceUID = _uid("for", st, se)
            ds.SeriesNumber = se + 1
            ds.SeriesDescription = f"Axial {1.25 * (se + 1):g}mm"
            ds.SeriesTime = ds.StudyTime
            for i in range(instances):
                sop_uid = _uid("instance", st, se, i)
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
                ds.InstanceNumber = ds.AcquisitionNumber = i + 1
                z = -1.25 * i + 0.0  # + 0.0 turns -0.0 into 0.0
                ds.ImagePositionPatient = [-179.2, -179.2, z]
                ds.SliceLocation = z
                ds.ContentTime = f"{ds.StudyTime[:4]}{i % 60:02d}"
                path = outdir / f"s{st:03d}_e{se:02d}_i{i:03d}.dcm"
                ds.save_as(path, enforce_file_format=True)
                files.append(str(path))
        result.append(Study(study_uid, name, pid, date, series * instances, files))
    manifest.write_text(json.dumps({"layout": layout, "studies": [asdict(s) for s in result]}, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("outdir", type=Path)
    p.add_argument("--preset", choices=sorted(PRESETS), help="layout preset (overrides the counts)")
    p.add_argument("--studies", type=int, default=10)
    p.add_argument("--series", type=int, default=5)
    p.add_argument("--instances", type=int, default=20, help="instances per series")
    a = p.parse_args(argv)
    layout = PRESETS[a.preset] if a.preset else (a.studies, a.series, a.instances)
    t0 = time.perf_counter()
    studies = generate(a.outdir, *layout)
    n = sum(s.instances for s in studies)
    print(f"{n} instances in {len(studies)} studies under {a.outdir} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
