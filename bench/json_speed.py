"""Micro-benchmark: DICOM JSON metadata of one CT instance, pydicom vs ``archive.dicom_json``.

The instance is pydicom's ``CT_small.dcm`` grown to a 512x512 16-bit CT (Explicit VR Little Endian,
~512 KiB of pixel data), the shape of what vna ingests. Both sides get the data set bytes after the
File Meta Information and stop at Pixel Data:

* pydicom: ``read_dataset(..., stop_when=t >= (7FE0,0010))`` then
  ``to_json_dict(1024, handler, suppress_invalid_tags=True)``;
* vna: ``to_dicom_json(body, implicit_vr=False, little_endian=True)``.

The two results are checked equal first. Prints milliseconds per call (best of several repeats)
and the speed-up.

Usage::

    PYTHONPATH=. python bench/json_speed.py [--number N] [--repeat R]
"""

from __future__ import annotations

import argparse
import sys
import timeit
import warnings
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from archive.dicom_json import to_dicom_json  # noqa: E402


def ct_512_body() -> bytes:
    """The data set bytes (no File Meta) of CT_small.dcm with 512x512 16-bit pixels."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Rows = ds.Columns = 512
    pixels = np.arange(512 * 512, dtype=np.uint16).reshape(512, 512) % 4096
    ds.PixelData = pixels.tobytes()
    fp = DicomBytesIO()
    fp.is_implicit_VR = False
    fp.is_little_endian = True
    write_dataset(fp, ds)
    return fp.getvalue()


def with_pydicom(body: bytes) -> dict:
    ds = read_dataset(BytesIO(body), False, True, stop_when=lambda t, vr, length: t >= 0x7FE00010)
    return ds.to_json_dict(1024, lambda elem: f"bulk/{int(elem.tag):08X}",
                           suppress_invalid_tags=True)


def with_vna(body: bytes) -> dict:
    return to_dicom_json(body, implicit_vr=False, little_endian=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=200, help="calls per repeat")
    parser.add_argument("--repeat", type=int, default=5, help="repeats (the best one counts)")
    args = parser.parse_args()

    warnings.simplefilter("ignore")  # pydicom warns about CT_small's non-conformant values
    body = ct_512_body()
    if with_pydicom(body) != with_vna(body):
        sys.exit("outputs differ: fix archive/dicom_json.py before timing it")

    print(f"data set: {len(body)} bytes, {len(with_vna(body))} top-level attributes")
    results = {}
    for name, fn in (("pydicom", with_pydicom), ("vna", with_vna)):
        best = min(timeit.repeat(lambda: fn(body), number=args.number, repeat=args.repeat))
        results[name] = best / args.number * 1e3
        print(f"{name:8s} {results[name]:8.3f} ms/call")
    print(f"speed-up  {results['pydicom'] / results['vna']:7.1f}x")


if __name__ == "__main__":
    main()
