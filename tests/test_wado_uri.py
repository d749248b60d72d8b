"""WADO-URI (PS3.18 9) against a live server, at /wado and at {root}/wado."""

from __future__ import annotations

import io
from pathlib import Path

import aiohttp
import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut
from pydicom.uid import generate_uid

from archive.attributes import Level
from archive.index import Index
from archive.query import Query, QueryKey
from tests.conftest import BOTH_BACKENDS
from tests.stored_objects import StoredObjects
from tests.test_rendered import (CT, EMRI, J2K, assert_rounds_to, decoded, instance_url, linear_window, min_max,
                                 send, uids, variant)

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"


def wado_params(path: str | Path, **extra: str) -> dict[str, str]:
    st, se, sop = uids(path)
    return {"requestType": "WADO", "studyUID": st, "seriesUID": se, "objectUID": sop, **extra}


async def get(session: aiohttp.ClientSession, url: str, params: dict[str, str],
              accept: str | None = None) -> tuple[int, dict[str, str], bytes]:
    headers = {"Accept": accept} if accept else {}
    async with session.get(url, params=params, headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def stored_file(rt, index: Index, path: str | Path) -> bytes:
    """The object as the archive stored it (read from the object store, not over HTTP)."""
    sop = uids(path)[2]
    [located] = await index.locate(Query(level=Level.IMAGE, keys=(QueryKey(0x00080018, "UI", sop),)), timeout=10)
    return await StoredObjects.of(rt.settings).read(located.location)


@BOTH_BACKENDS
async def test_application_dicom_is_the_stored_file(vna, index: Index) -> None:
    await send(vna, CT, J2K)
    ct_stored, j2k_stored = await stored_file(vna, index, CT), await stored_file(vna, index, J2K)
    async with aiohttp.ClientSession() as s:
        for root in ("", "/dicomweb"):
            url = f"http://127.0.0.1:{vna.ports.http}{root}/wado"
            # PS3.18 9.4.2.4: without transferSyntax, Explicit VR Little Endian, which CT_small is stored in
            status, headers, body = await get(s, url, wado_params(CT, contentType="application/dicom"))
            assert status == 200
            assert headers["Content-Type"] == "application/dicom"
            assert body == ct_stored
            # the data set is the one that was sent
            assert pydicom.dcmread(io.BytesIO(body)).PixelData == pydicom.dcmread(CT).PixelData

            # the stored syntax, or `*`, answers the stored JPEG 2000 file byte for byte
            for syntax in ("*", "1.2.840.10008.1.2.4.91"):
                status, _, body = await get(s, url, wado_params(J2K, contentType="application/dicom",
                                                                transferSyntax=syntax))
                assert status == 200 and body == j2k_stored, syntax

        # the default (Explicit VR Little Endian) decompresses, keeping the SOP Instance UID
        status, _, body = await get(s, url, wado_params(J2K, contentType="application/dicom"))
        assert status == 200
        ds = pydicom.dcmread(io.BytesIO(body))
        assert ds.file_meta.TransferSyntaxUID == EXPLICIT_LE
        assert ds.SOPInstanceUID == uids(J2K)[2]
        assert np.array_equal(ds.pixel_array, pydicom.dcmread(J2K).pixel_array)
        status, _, body = await get(s, url, wado_params(CT, contentType="application/dicom",
                                                        transferSyntax=IMPLICIT_LE))
        assert status == 200
        ds = pydicom.dcmread(io.BytesIO(body))
        assert ds.file_meta.TransferSyntaxUID == IMPLICIT_LE
        assert np.array_equal(ds.pixel_array, pydicom.dcmread(CT).pixel_array)

        # a valid transfer syntax this server does not produce: 406; not a UID: 400 (PS3.18 9.4.2.4)
        status, _, _ = await get(s, url, wado_params(CT, contentType="application/dicom",
                                                     transferSyntax="1.2.840.10008.1.2.4.50"))
        assert status == 406
        status, _, _ = await get(s, url, wado_params(CT, contentType="application/dicom", transferSyntax="jpeg"))
        assert status == 400
        # rendering parameters do not apply to application/dicom
        status, _, body = await get(s, url, wado_params(CT, contentType="application/dicom", rows="64"))
        assert status == 400 and b"rows" in body


async def test_rendered_media_types(vna) -> None:
    await send(vna, CT, EMRI)
    url = f"http://127.0.0.1:{vna.ports.http}/wado"
    ds = pydicom.dcmread(CT)
    hu = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    async with aiohttp.ClientSession() as s:
        status, headers, body = await get(s, url, wado_params(CT, contentType="image/jpeg"))
        assert status == 200 and headers["Content-Type"] == "image/jpeg"
        image = Image.open(io.BytesIO(body))
        assert (image.format, image.size) == ("JPEG", (128, 128))
        # no contentType: the Accept header, where */* is image/jpeg
        status, headers, body = await get(s, url, wado_params(CT), accept="*/*")
        assert status == 200 and headers["Content-Type"] == "image/jpeg"

        # windowCenter/windowWidth as the LINEAR VOI function (PS3.3 C.11.2.1.2), checked losslessly
        status, headers, body = await get(s, url, wado_params(CT, contentType="image/png", windowCenter="40",
                                                              windowWidth="400"))
        assert status == 200 and headers["Content-Type"] == "image/png"
        assert_rounds_to(decoded(body), linear_window(hu, 40, 400))

        # rows and columns are maxima; the aspect ratio is kept
        _, _, body = await get(s, url, wado_params(CT, contentType="image/jpeg", rows="64", columns="100"))
        assert Image.open(io.BytesIO(body)).size == (64, 64)
        _, _, body = await get(s, url, wado_params(CT, contentType="image/jpeg", columns="32"))
        assert Image.open(io.BytesIO(body)).size == (32, 32)
        # region: the top-left quarter, at full resolution
        _, _, full = await get(s, url, wado_params(CT, contentType="image/png"))
        _, _, body = await get(s, url, wado_params(CT, contentType="image/png", region="0,0,0.5,0.5"))
        assert np.array_equal(decoded(body), decoded(full)[:64, :64])

        # frameNumber selects the frame of a multi-frame object
        _, _, body = await get(s, url, wado_params(EMRI, contentType="image/png", frameNumber="5"))
        assert_rounds_to(decoded(body), min_max(pydicom.dcmread(EMRI).pixel_array[4]))


async def test_errors(vna) -> None:
    await send(vna, CT)
    url = f"http://127.0.0.1:{vna.ports.http}/wado"
    async with aiohttp.ClientSession() as s:
        # PS3.18 9.4.1: requestType, studyUID, seriesUID and objectUID are required
        for missing in ("requestType", "studyUID", "seriesUID", "objectUID"):
            params = wado_params(CT, contentType="image/jpeg")
            del params[missing]
            status, _, body = await get(s, url, params)
            assert status == 400, missing
            assert missing.encode() in body
        status, _, _ = await get(s, url, wado_params(CT, requestType="WADO-RS"))
        assert status == 400
        status, _, _ = await get(s, url, wado_params(CT, objectUID="not a uid"))
        assert status == 400
        # an unknown object, or one under another study: 404
        status, _, _ = await get(s, url, wado_params(CT, objectUID="1.2.3.4.5"))
        assert status == 404
        status, _, _ = await get(s, url, wado_params(CT, studyUID="1.2.3", contentType="application/dicom"))
        assert status == 404
        # windowCenter without windowWidth, bad numbers, bad frame
        for extra in ({"windowCenter": "40"}, {"windowWidth": "400"}, {"rows": "0"}, {"columns": "x"},
                      {"imageQuality": "101"}, {"region": "0.5,0.5,0.2,0.9"}, {"frameNumber": "2"},
                      {"windowCenter": "40", "windowWidth": "0"}, {"anonymize": "yes"}):
            status, _, _ = await get(s, url, wado_params(CT, contentType="image/jpeg", **extra))
            assert status == 400, extra
        # a media type WADO-URI does not produce here
        status, _, _ = await get(s, url, wado_params(CT, contentType="text/html"))
        assert status == 406


async def test_non_image_object_has_no_rendering(vna, tmp_path: Path) -> None:
    # an object without pixel data (a Comprehensive SR): application/dicom works, image/jpeg cannot
    sr = get_testdata_file("test-SR.dcm")
    await send(vna, sr)
    url = f"http://127.0.0.1:{vna.ports.http}/wado"
    async with aiohttp.ClientSession() as s:
        status, _, body = await get(s, url, wado_params(sr, contentType="application/dicom"))
        assert status == 200 and pydicom.dcmread(io.BytesIO(body)).SOPInstanceUID == uids(sr)[2]
        status, _, _ = await get(s, url, wado_params(sr, contentType="image/jpeg"))
        assert status == 406
        st, se, sop = uids(sr)
        base = f"http://127.0.0.1:{vna.ports.http}/dicomweb/studies/{st}/series/{se}"
        async with s.get(f"{base}/instances/{sop}/rendered", headers={"Accept": "image/jpeg"}) as resp:
            assert resp.status == 406
        # Supplement 203: no thumbnail for it (OHIF tolerates a 404)
        async with s.get(f"{base}/instances/{sop}/thumbnail", headers={"Accept": "image/jpeg"}) as resp:
            assert resp.status == 404
        async with s.get(f"{base}/thumbnail", headers={"Accept": "image/jpeg"}) as resp:
            assert resp.status == 404
        study_thumbnail = f"http://127.0.0.1:{vna.ports.http}/dicomweb/studies/{st}/thumbnail"
        async with s.get(study_thumbnail, headers={"Accept": "image/jpeg"}) as resp:
            assert resp.status == 404
        # once the study also holds an image (in a later series), that image represents the study
        ct = variant(CT, tmp_path, "ct_in_sr_study", StudyInstanceUID=st, SeriesInstanceUID=generate_uid(),
                     SeriesNumber=int(pydicom.dcmread(sr).get("SeriesNumber") or 0) + 1)
        await send(vna, ct)
        async with s.get(study_thumbnail, headers={"Accept": "image/png"}, params={"viewport": "64,64"}) as resp:
            assert resp.status == 200
            thumbnail = await resp.read()
        async with s.get(instance_url(vna, ct) + "/thumbnail", headers={"Accept": "image/png"},
                         params={"viewport": "64,64"}) as resp:
            assert await resp.read() == thumbnail
