"""Acceptance: the OHIF viewer v3, served same-origin by vna (`http.viewer_dir`), in headless Chromium.

Data arrive over DIMSE (a 10-slice CT series and the 10-frame Enhanced MR `emri_small.dcm`); the
browser then only speaks DICOMweb to us: QIDO-RS for the study list and series (PS3.18 10.6),
WADO-RS series metadata and frames (PS3.18 10.4). tests/e2e/ohif.mjs drives Chromium with
playwright-core and fails on a missing study row, a black viewport, or any DICOMweb request
answered >= 400 (a thumbnail 404 excepted, OHIF tolerates it).

Needs tests/e2e/node_modules (`npm ci --prefix tests/e2e`: playwright-core and OHIF's dist/) and
Debian's /usr/bin/chromium; scripts/test installs both.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import aiohttp
import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from archive.config import Settings
from archive.errors import ConfigError
from tests.conftest import DCMTK, run_tool

E2E = Path(__file__).parent / "e2e"
OHIF_DIST = E2E / "node_modules" / "@ohif" / "app" / "dist"
CHROMIUM = Path("/usr/bin/chromium")


def _require_tools() -> None:
    missing = [str(p) for p in (OHIF_DIST / "index.html", E2E / "node_modules" / "playwright-core", CHROMIUM)
               if not p.exists()]
    assert not missing, (f"missing {missing}: run scripts/test, or `npm ci --prefix tests/e2e` and "
                         "`apt-get install chromium`")


def _viewer_dir(tmp_path: Path) -> Path:
    """A copy of OHIF's dist/ with our app-config.js (DICOMweb data source: this server, same origin)."""
    viewer = tmp_path / "viewer"
    shutil.copytree(OHIF_DIST, viewer)
    shutil.copyfile(E2E / "app-config.js", viewer / "app-config.js")
    return viewer


def _ct_series(out: Path) -> str:
    """Ten 512x512 axial CT slices, 5 mm apart: a disc of water with a checker pattern and a bright
    spot that moves from slice to slice (so each slice looks different). Returns the Study UID."""
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    yy, xx = np.mgrid[0:512, 0:512]
    disc = np.hypot(xx - 256, yy - 256) < 200
    for i in range(10):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Vna^Synthetic CT", "VNA-CT", "19700101", "O"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20240102", "101500", "ACC-CT", "1"
        ds.StudyDescription, ds.SeriesDescription, ds.Modality = "vna e2e CT", "synthetic axial", "CT"
        ds.SeriesNumber, ds.InstanceNumber = 1, i + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-256, -256, -50 + 5 * i]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [1, 1], 5
        ds.Rows = ds.Columns = 512
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.WindowCenter, ds.WindowWidth = -1024, 1, 40, 400
        image = np.where(disc, 1024 + 40 + ((xx // 32 + yy // 32) % 2) * 60, 0)
        image = np.where(np.hypot(xx - 256 - 8 * i, yy - 200) < 40, 1024 + 200, image)
        ds.PixelData = image.astype(np.uint16).tobytes()
        ds.save_as(out / f"ct{i:02d}.dcm", enforce_file_format=True)
    return study


def _multiframe_mr(out: Path) -> str:
    """pydicom's emri_small.dcm (Enhanced MR, 10 frames of 64x64) with a patient and a description,
    and the functional groups it lacks (PS3.3 C.7.6.16: pixel measures, plane orientation and
    per-frame plane position), so OHIF sees a proper multi-frame volume. Returns the Study UID."""
    mr = dcmread(get_testdata_file("emri_small.dcm"))
    mr.PatientName, mr.PatientID, mr.StudyDescription = "Vna^Multiframe MR", "VNA-MR", "vna e2e multi-frame MR"
    measures, orientation, shared = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [1, 1], "1.2"
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = [measures], [orientation]
    mr.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for frame in range(int(mr.NumberOfFrames)):
        position, item = Dataset(), Dataset()
        position.ImagePositionPatient = [0, 0, f"{1.2 * frame:.1f}"]
        item.PlanePositionSequence = [position]
        per_frame.append(item)
    mr.PerFrameFunctionalGroupsSequence = per_frame
    mr.save_as(out / "mr.dcm", enforce_file_format=True)
    return str(mr.StudyInstanceUID)


async def test_viewer_dir_is_served_at_the_root_without_shadowing_the_archive(
        tmp_path: Path, vna_factory: Callable[..., Any]) -> None:
    _require_tools()
    rt = await vna_factory(http={"viewer_dir": str(_viewer_dir(tmp_path))})
    base = f"http://127.0.0.1:{rt.ports.http}"
    index_html = (OHIF_DIST / "index.html").read_bytes()
    async with aiohttp.ClientSession() as http:
        for path in ("/", "/viewer?StudyInstanceUIDs=1.2.3", "/viewer/dicomweb"):  # client-side routes
            async with http.get(base + path) as r:
                assert r.status == 200 and r.content_type == "text/html", path
                assert await r.read() == index_html, path
        async with http.get(base + "/app-config.js") as r:
            assert r.status == 200 and b"sourceName: 'vna'" in await r.read()
        # a missing asset, and unknown archive paths, stay 404: never the viewer's index.html
        for path in ("/no-such-bundle.js", "/dicomweb/no-such-resource", "/dicomweb", "/wado/x", "/metrics/x"):
            async with http.get(base + path) as r:
                assert r.status == 404, path
        async with http.get(base + "/%2e%2e/%2e%2e/etc/hostname") as r:
            assert (await r.read()) in (index_html, b"404: Not Found")
        async with http.get(base + "/livez") as r:
            assert r.status == 200 and await r.text() == "ok\n"
        # PS3.18 10.6: the DICOMweb root keeps answering QIDO-RS
        async with http.get(base + "/dicomweb/studies", headers={"Accept": "application/dicom+json"}) as r:
            assert r.status in (200, 204)
    # checked at start: a directory without index.html is a configuration error
    with pytest.raises(ConfigError, match="viewer_dir"):
        Settings.load({"http": {"viewer_dir": str(tmp_path / "data")}})


async def test_ohif_lists_and_displays_ct_and_multiframe_mr(tmp_path: Path, vna_factory: Callable[..., Any]) -> None:
    _require_tools()
    data = tmp_path / "dicom"
    data.mkdir()
    ct_study, mr_study = _ct_series(data), _multiframe_mr(data)
    rt = await vna_factory(http={"viewer_dir": str(_viewer_dir(tmp_path))})
    await run_tool(DCMTK / "storescu", "-aec", "VNA", "127.0.0.1", str(rt.ports.dicom), *sorted(data.iterdir()))

    shots = tmp_path / "screenshots"
    job = {
        "base": f"http://127.0.0.1:{rt.ports.http}",
        "out": str(shots),
        # OHIF shows the Patient's Name (PN "Family^Given") as "Family, Given"
        "studies": [
            {"uid": ct_study, "name": "ct", "texts": ["Vna, Synthetic CT", "vna e2e CT"]},
            {"uid": mr_study, "name": "mr", "texts": ["Vna, Multiframe MR", "vna e2e multi-frame MR"]},
        ],
    }
    result = await run_tool("node", E2E / "ohif.mjs", json.dumps(job), timeout=300, check=False)
    print(result.stdout, result.stderr)
    assert result.returncode == 0 and result.stdout.rstrip().endswith("OK"), result.stdout + result.stderr

    # Look at the screenshots ourselves: inside the viewport's canvas, a real image (many non-black
    # pixels, many grey levels), not a black or a flat box.
    screenshots = [json.loads(line.split(" ", 1)[1]) for line in result.stdout.splitlines()
                   if line.startswith("SCREENSHOT ")]
    assert {s["study"] for s in screenshots} == {ct_study, mr_study}
    for shot in screenshots:
        box = shot["box"]
        with Image.open(shot["path"]) as png:
            canvas = np.asarray(png.convert("L").crop(
                (int(box["x"]), int(box["y"]), int(box["x"] + box["width"]), int(box["y"] + box["height"]))))
        assert (canvas > 16).mean() > 0.1, shot
        assert len(np.unique(canvas // 16)) >= 4, shot
    print("screenshots:", *sorted(map(str, shots.iterdir())), sep="\n  ")
