"""WADO-RS rendered and thumbnail resources against a live server (PS3.18 10.4.1.1.3-4, 8.3.5.1;
Supplement 203). Objects are stored with dcmtk's dcmsend (each file in its own transfer syntax); the
expected pixels are computed here with numpy from pydicom's decoding, independently of
archive.rendering. Every test runs on both object stores (filesystem, RADOS)."""

from __future__ import annotations

import asyncio
import io
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path

import aiohttp
import numpy as np
import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_color_lut, apply_modality_lut
from pydicom.uid import generate_uid

from archive.attributes import Level
from archive.index import Index
from archive.query import Query, QueryKey
from tests.conftest import BOTH_BACKENDS, DCMTK, run_tool

pytestmark = BOTH_BACKENDS

CT = get_testdata_file("CT_small.dcm")
MR = get_testdata_file("MR_small.dcm")                       # WindowCenter 600, WindowWidth 1600
EMRI = get_testdata_file("emri_small.dcm")                   # 10 frames, 64x64
RGB = get_testdata_file("SC_rgb.dcm")
RGB_JPEG = get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")        # YBR_FULL_422 JPEG baseline
PALETTE = get_testdata_file("OBXXXX1A.dcm")
J2K = get_testdata_file("JPEG2000.dcm")                      # 1024 rows x 256 columns
RLE = get_testdata_file("MR_small_RLE.dcm")
JLS = get_testdata_file("MR_small_jpeg_ls_lossless.dcm")
CORP = "Cross-Origin-Resource-Policy"


async def send(rt, *paths: str | Path) -> None:
    """C-STORE each file in its own transfer syntax (dcmsend proposes it)."""
    await run_tool(DCMTK / "dcmsend", "-aet", "TEST", "-aec", "VNA", "127.0.0.1", str(rt.ports.dicom),
                   *map(str, paths))


def uids(path: str | Path) -> tuple[str, str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID


def instance_url(rt, path: str | Path) -> str:
    st, se, sop = uids(path)
    return f"http://127.0.0.1:{rt.ports.http}/dicomweb/studies/{st}/series/{se}/instances/{sop}"


async def get(session: aiohttp.ClientSession, url: str, accept: str | None = "image/png",
              **params: str) -> tuple[int, dict[str, str], bytes]:
    headers = {"Accept": accept} if accept is not None else {}
    async with session.get(url, headers=headers, params=params) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def decoded(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)))


def linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1, the LINEAR VOI function onto 0..255, unrounded."""
    y = ((values - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    y = np.where(values <= center - 0.5 - (width - 1) / 2, 0.0, y)
    return np.where(values > center - 0.5 + (width - 1) / 2, 255.0, y)


def min_max(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    return (values - values.min()) * (255.0 / (values.max() - values.min()))


def assert_rounds_to(actual: np.ndarray, expected: np.ndarray) -> None:
    """Every 8-bit pixel is the expected value rounded (PNG is lossless: no other tolerance)."""
    assert actual.shape == expected.shape
    assert actual.dtype == np.uint8
    assert np.abs(actual.astype(np.float64) - expected).max() <= 0.5 + 1e-6


def variant(path: str | Path, tmp_path: Path, name: str, **changes: object) -> Path:
    """A copy of a test file as a new instance, with some attributes changed."""
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    out = tmp_path / f"{name}.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out


async def test_ct_rendered_as_jpeg_and_png_with_windows(vna) -> None:
    await send(vna, CT)
    url = instance_url(vna, CT) + "/rendered"
    ds = pydicom.dcmread(CT)
    hu = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)   # RescaleSlope 1, Intercept -1024
    async with aiohttp.ClientSession() as s:
        # PS3.18 8.7.4: image/jpeg is a rendered media type; `*/*` gets the default, JPEG
        for accept in ("image/jpeg", "*/*", "image/*", None):
            status, headers, body = await get(s, url, accept)
            assert status == 200, (accept, body)
            assert headers["Content-Type"] == "image/jpeg"
            assert headers[CORP] == "cross-origin"
            image = Image.open(io.BytesIO(body))
            assert (image.format, image.size, image.mode) == ("JPEG", (128, 128), "L")

        # window=center,width,function (PS3.18 8.3.5.1.4), in Hounsfield units after the Modality LUT
        status, headers, body = await get(s, url, "image/png", window="40,400,linear")
        assert status == 200 and headers["Content-Type"] == "image/png"
        png = decoded(body)
        expected = linear_window(hu, 40, 400)
        assert_rounds_to(png, expected)
        # a known pixel inside the window: 65 HU -> ((65 - 39.5) / 399 + 0.5) * 255 = 143.8
        assert hu[100, 30] == 65
        assert png[100, 30] == 144

        # a narrower window saturates more pixels: bone window vs lung window differ
        _, _, lung = await get(s, url, "image/png", window="-600,1500")
        assert_rounds_to(decoded(lung), linear_window(hu, -600, 1500))

        # no window given and none in the object: the frame's own min..max
        _, _, body = await get(s, url, "image/png")
        assert_rounds_to(decoded(body), min_max(hu))

        # LINEAR_EXACT (PS3.3 C.11.2.1.3.2)
        _, _, body = await get(s, url, "image/png", window="40,400,linear-exact")
        exact = np.clip(((hu - 40) / 400 + 0.5) * 255.0, 0, 255)
        assert_rounds_to(decoded(body), exact)

        # image/gif, the third rendered image media type, is lossless for 8-bit grayscale too
        status, headers, body = await get(s, url, "image/gif", window="40,400")
        assert status == 200 and headers["Content-Type"] == "image/gif"
        gif = Image.open(io.BytesIO(body))
        assert gif.format == "GIF"
        assert np.array_equal(np.asarray(gif.convert("L")), png)

        # JPEG is lossy but close to the PNG rendering
        _, _, body = await get(s, url, "image/jpeg", window="40,400", quality="95")
        assert np.abs(decoded(body).astype(int) - png.astype(int)).mean() < 3


async def test_stored_window_and_bad_parameters(vna) -> None:
    await send(vna, MR, CT)
    url = instance_url(vna, MR)
    ds = pydicom.dcmread(MR)
    async with aiohttp.ClientSession() as s:
        # the object's own Window Center/Width when no window is asked (PS3.3 C.11.2.1.2)
        status, _, body = await get(s, url + "/rendered")
        assert status == 200
        assert_rounds_to(decoded(body), linear_window(ds.pixel_array.astype(np.float64), 600, 1600))

        for params, reason in ((dict(window="40"), "window"), (dict(window="a,b"), "not a number"),
                               (dict(window="40,0"), "width"), (dict(window="40,400,cubic"), "function"),
                               (dict(viewport="0,10"), "viewport"), (dict(viewport="10"), "viewport"),
                               (dict(viewport="64,64,500,500,10,10"), "outside"),
                               (dict(quality="0"), "quality"), (dict(quality="x"), "quality")):
            status, _, body = await get(s, url + "/rendered", "image/jpeg", **params)
            assert status == 400, (params, status)
            assert reason in body.decode(), (params, body)
        # PS3.18 10.4.1.1.3: frames are 1-based and must exist
        assert (await get(s, url + "/frames/2/rendered"))[0] == 400
        assert (await get(s, url + "/frames/0/rendered"))[0] == 400
        assert (await get(s, url + "/frames/x/rendered"))[0] == 400
        # media types that are not rendered media types: 406
        assert (await get(s, url + "/rendered", "application/dicom"))[0] == 406
        assert (await get(s, url + "/rendered", "text/html"))[0] == 406
        # unknown UIDs: 404, also when the SOP exists under another study or series
        st, se, sop = uids(MR)
        base = f"http://127.0.0.1:{vna.ports.http}/dicomweb"
        assert (await get(s, f"{base}/studies/{st}/series/{se}/instances/1.2.3.4/rendered"))[0] == 404
        assert (await get(s, f"{base}/studies/1.2.3/series/{se}/instances/{sop}/rendered"))[0] == 404
        assert (await get(s, f"{base}/studies/{st}/series/1.2.3/instances/{sop}/thumbnail"))[0] == 404
        assert (await get(s, f"{base}/studies/1.2.3/thumbnail"))[0] == 404
        assert (await get(s, f"{base}/studies/{st}/series/1.2.3/rendered"))[0] == 404


async def test_viewport_scales_keeping_aspect_ratio_and_crops(vna) -> None:
    await send(vna, CT, J2K)
    ct, j2k = instance_url(vna, CT) + "/rendered", instance_url(vna, J2K) + "/rendered"
    async with aiohttp.ClientSession() as s:
        full = decoded((await get(s, ct, "image/png"))[2])
        # PS3.18 8.3.5.1.3: the image is scaled to fit the viewport, its aspect ratio preserved
        for viewport, size in (("64,32", (32, 32)), ("256,256", (256, 256)), ("100,300", (100, 100))):
            status, _, body = await get(s, ct, "image/png", viewport=viewport)
            assert status == 200
            assert Image.open(io.BytesIO(body)).size == size, viewport
        # 256 columns x 1024 rows into 256x256: 64x256 (width x height)
        status, _, body = await get(s, j2k, "image/jpeg", viewport="256,256")
        assert status == 200 and Image.open(io.BytesIO(body)).size == (64, 256)
        status, _, body = await get(s, j2k, "image/jpeg", viewport="128,1024")
        assert Image.open(io.BytesIO(body)).size == (128, 512)
        # a source region at scale 1 is an exact crop; a negative sw flips it horizontally
        _, _, body = await get(s, ct, "image/png", viewport="32,16,10,20,32,16")
        assert np.array_equal(decoded(body), full[20:36, 10:42])
        _, _, body = await get(s, ct, "image/png", viewport="128,128,128,0,-128,128")
        assert np.array_equal(decoded(body), full[:, ::-1])
        _, _, body = await get(s, ct, "image/png", viewport="128,128,0,128,128,-128")
        assert np.array_equal(decoded(body), full[::-1, :])


async def test_monochrome1_is_inverted(vna, tmp_path: Path) -> None:
    # PS3.3 C.7.6.3.1.2: MONOCHROME1 shows the minimum value as white
    mono1 = variant(CT, tmp_path, "mono1", PhotometricInterpretation="MONOCHROME1")
    await send(vna, CT, mono1)
    async with aiohttp.ClientSession() as s:
        _, _, m2 = await get(s, instance_url(vna, CT) + "/rendered", "image/png", window="40,400")
        status, _, m1 = await get(s, instance_url(vna, mono1) + "/rendered", "image/png", window="40,400")
    assert status == 200
    assert np.array_equal(decoded(m1), 255 - decoded(m2))
    assert not np.array_equal(decoded(m1), decoded(m2))


async def test_colour_images_render_in_colour(vna) -> None:
    await send(vna, RGB, RGB_JPEG, PALETTE)
    async with aiohttp.ClientSession() as s:
        # RGB: the samples as stored (no VOI for colour)
        status, _, body = await get(s, instance_url(vna, RGB) + "/rendered", "image/png")
        assert status == 200
        rgb = decoded(body)
        assert rgb.shape == (100, 100, 3)
        assert np.array_equal(rgb, pydicom.dcmread(RGB).pixel_array)

        # YBR_FULL_422 JPEG: converted to RGB, then re-encoded as JPEG (lossy both ways)
        status, _, body = await get(s, instance_url(vna, RGB_JPEG) + "/rendered", "image/jpeg", quality="100")
        assert status == 200
        image = Image.open(io.BytesIO(body))
        assert image.mode == "RGB" and image.size == (100, 100)
        expected = pydicom.dcmread(RGB_JPEG).pixel_array.astype(int)       # pydicom converts YBR to RGB
        got = np.asarray(image).astype(int)
        assert np.abs(got - expected).mean() < 4
        # really colour: the red, green and blue bands of SC_rgb's stripes differ
        assert np.abs(got[..., 0] - got[..., 2]).max() > 100

        # PALETTE COLOR through its palette (PS3.3 C.7.6.3.1.5)
        status, _, body = await get(s, instance_url(vna, PALETTE) + "/rendered", "image/png")
        assert status == 200
        ds = pydicom.dcmread(PALETTE)
        lut = apply_color_lut(ds.pixel_array, ds)
        expected = lut if lut.dtype == np.uint8 else np.floor(lut / 257.0 + 0.5).astype(np.uint8)
        assert np.array_equal(decoded(body), expected)


async def test_multiframe_frames(vna) -> None:
    await send(vna, EMRI)
    url = instance_url(vna, EMRI)
    frames = pydicom.dcmread(EMRI).pixel_array.astype(np.float64)
    async with aiohttp.ClientSession() as s:
        status, _, f5 = await get(s, url + "/frames/5/rendered")
        assert status == 200
        _, _, f1 = await get(s, url + "/frames/1/rendered")
        # PS3.18 10.4.1.1.3: frame 5 is pydicom's frame index 4, rendered on its own range
        assert_rounds_to(decoded(f5), min_max(frames[4]))
        assert_rounds_to(decoded(f1), min_max(frames[0]))
        assert not np.array_equal(decoded(f5), decoded(f1))
        # the instance's rendered resource is its first frame as a still image
        _, headers, still = await get(s, url + "/rendered")
        assert headers["Content-Type"] == "image/png" and still == f1
        # the explicit window applies to every frame
        _, _, body = await get(s, url + "/frames/10/rendered", window="200,300")
        assert_rounds_to(decoded(body), linear_window(frames[9], 200, 300))
        assert (await get(s, url + "/frames/11/rendered"))[0] == 400

        # several frames: multipart/related, one image per frame in the order asked
        status, headers, body = await get(s, url + "/frames/5,1/rendered", 'multipart/related; type="image/png"')
        assert status == 200
        assert headers["Content-Type"].startswith('multipart/related; type="image/png"')
        message = BytesParser(policy=HTTP).parsebytes(
            f"Content-Type: {headers['Content-Type']}\r\n\r\n".encode() + body)
        parts = [p.get_payload(decode=True) for p in message.iter_parts()]
        assert [p.get_content_type() for p in message.iter_parts()] == ["image/png", "image/png"]
        assert parts == [f5, f1]
        # ... which a client that takes only a single image/png cannot receive
        assert (await get(s, url + "/frames/5,1/rendered", "image/png"))[0] == 406


async def test_compressed_transfer_syntaxes_render(vna, index: Index, tmp_path: Path) -> None:
    # MR_small_RLE and MR_small_jpeg_ls_lossless share MR_small's SOP Instance UID: make them distinct
    rle, jls = variant(RLE, tmp_path, "rle"), variant(JLS, tmp_path, "jls")
    await send(vna, J2K, rle, jls, RGB_JPEG)
    stored = {i.sop_instance_uid: i.transfer_syntax_uid for i in await index.locate(
        Query(level=Level.IMAGE, keys=(QueryKey(0x00080018, "UI"),)), timeout=10)}
    # stored compressed, as sent: the server decodes JPEG 2000, RLE, JPEG-LS and JPEG itself
    assert stored[uids(J2K)[2]] == "1.2.840.10008.1.2.4.91"         # JPEG 2000
    assert stored[uids(rle)[2]] == "1.2.840.10008.1.2.5"            # RLE Lossless
    assert stored[uids(jls)[2]] == "1.2.840.10008.1.2.4.80"         # JPEG-LS Lossless
    assert stored[uids(RGB_JPEG)[2]] == "1.2.840.10008.1.2.4.50"    # JPEG Baseline
    async with aiohttp.ClientSession() as s:
        for path, window in ((J2K, None), (rle, (600, 1600)), (jls, (600, 1600))):
            status, _, body = await get(s, instance_url(vna, path) + "/rendered", "image/png")
            assert status == 200, (path, body)
            ds = pydicom.dcmread(path)
            values = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
            expected = min_max(values) if window is None else linear_window(values, *window)
            assert_rounds_to(decoded(body), expected)


async def test_thumbnails(vna, tmp_path: Path) -> None:
    """Supplement 203 thumbnails; the study's and series' representative is the middle instance (by
    Instance Number) of the first series (by Series Number)."""
    base_ds = pydicom.dcmread(CT)
    study = base_ds.StudyInstanceUID
    first_series, second_series = generate_uid(), generate_uid()
    files = {}
    # arrival order 3, 1, 2: the middle by arrival (1) is not the middle by Instance Number (2)
    for n in (3, 1, 2):
        files[n] = variant(CT, tmp_path, f"s1_{n}", SeriesInstanceUID=first_series, SeriesNumber=1, InstanceNumber=n,
                           PixelData=(base_ds.pixel_array + 100 * n).astype(np.int16).tobytes())
    other = variant(CT, tmp_path, "s2", SeriesInstanceUID=second_series, SeriesNumber=2, InstanceNumber=1)
    await send(vna, other, files[3], files[1], files[2])
    base = f"http://127.0.0.1:{vna.ports.http}/dicomweb/studies/{study}"
    async with aiohttp.ClientSession() as s:
        # what OHIF sends: GET .../thumbnail?viewport=256,256 with Accept: image/jpeg
        status, headers, body = await get(s, instance_url(vna, files[1]) + "/thumbnail", "image/jpeg",
                                          viewport="256,256")
        assert status == 200 and headers["Content-Type"] == "image/jpeg" and headers[CORP] == "cross-origin"
        image = Image.open(io.BytesIO(body))
        assert image.format == "JPEG" and image.width <= 256 and image.height <= 256
        # without a viewport the server picks a small size
        _, _, body = await get(s, instance_url(vna, files[1]) + "/thumbnail", "image/jpeg")
        assert max(Image.open(io.BytesIO(body)).size) <= 128
        _, _, body = await get(s, instance_url(vna, files[1]) + "/frames/1/thumbnail", "image/jpeg",
                               viewport="64,64")
        assert Image.open(io.BytesIO(body)).size == (64, 64)

        _, _, middle = await get(s, instance_url(vna, files[2]) + "/rendered", "image/png", viewport="128,128",
                                 window="500,2000")
        _, _, first = await get(s, instance_url(vna, files[1]) + "/rendered", "image/png", viewport="128,128",
                                window="500,2000")
        assert middle != first
        for url in (f"{base}/thumbnail", f"{base}/series/{first_series}/thumbnail",
                    f"{base}/rendered", f"{base}/series/{first_series}/rendered"):
            status, headers, body = await get(s, url, "image/png", viewport="128,128", window="500,2000")
            assert status == 200, url
            assert headers[CORP] == "cross-origin"
            assert body == middle, url
        status, headers, body = await get(s, f"{base}/thumbnail", "image/jpeg", viewport="256,256")
        assert status == 200 and headers["Content-Type"] == "image/jpeg"
        assert max(Image.open(io.BytesIO(body)).size) <= 256
        # the second series on its own has its single instance
        _, _, body = await get(s, f"{base}/series/{second_series}/thumbnail", "image/png")
        _, _, own = await get(s, instance_url(vna, other) + "/thumbnail", "image/png")
        assert body == own


async def test_dicomweb_client_rendered(vna) -> None:
    await send(vna, EMRI, CT)
    session = requests.Session()      # closed after use: an idle keep-alive would delay the server's drain
    client = DICOMwebClient(f"http://127.0.0.1:{vna.ports.http}/dicomweb", session=session)
    st, se, sop = uids(EMRI)
    ct_st, ct_se, ct_sop = uids(CT)

    def calls() -> tuple[bytes, bytes, bytes, bytes]:
        with session:
            return (client.retrieve_instance_rendered(ct_st, ct_se, ct_sop, media_types=("image/jpeg",)),
                    client.retrieve_instance_rendered(ct_st, ct_se, ct_sop, media_types=("image/png",),
                                                      params={"window": "40,400,linear"}),
                    client.retrieve_instance_frames_rendered(st, se, sop, frame_numbers=[5],
                                                             media_types=("image/png",)),
                    client.retrieve_series_rendered(ct_st, ct_se, media_types=("image/jpeg",)))

    jpeg, png, frame5, series = await asyncio.to_thread(calls)
    assert Image.open(io.BytesIO(jpeg)).format == "JPEG"
    ds = pydicom.dcmread(CT)
    assert_rounds_to(decoded(png), linear_window(apply_modality_lut(ds.pixel_array, ds).astype(np.float64), 40, 400))
    assert_rounds_to(decoded(frame5), min_max(pydicom.dcmread(EMRI).pixel_array[4]))
    assert Image.open(io.BytesIO(series)).size == (128, 128)
