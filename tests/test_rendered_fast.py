"""The rendering fast path (archive.rendering.native_image: native MONOCHROME1/2 and RGB pixel data
read without pydicom, windowed by a lookup table) against the pydicom path it stands in for, on the
pydicom corpus and on variants of it: PNG output decoded, pixel values within +/-1, for several windows,
rescale, signed data, unused high bits, MONOCHROME1, multi-frame, planar colour and viewports.
A unit test of one module: no server."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from archive.instance import split_part10
from archive.rendering import (PNG, FrameOutOfRange, Rendering, Viewport, Window, native_image, render,
                               render_pydicom)

WINDOWS = (None, Window(40, 400), Window(600, 1600), Window(100, 1), Window(-500, 3000, "LINEAR_EXACT"),
           Window(0, 50, "SIGMOID"), Window(1000, 2000, "SIGMOID"))

# native files of the pydicom corpus the fast path renders (grayscale 16-bit signed and unsigned,
# MONOCHROME1, rescaled, multi-frame, 8- and 16-bit RGB, planar and interleaved)
CORPUS = ("CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_padded.dcm", "emri_small.dcm",
          "RG1_UNCI.dcm", "RG3_UNCR.dcm", "MR2_UNCI.dcm", "693_UNCR.dcm", "SC_rgb.dcm", "SC_rgb_2frame.dcm",
          "SC_rgb_16bit_2frame.dcm", "color-pl.dcm", "US1_UNCR.dcm")
# what stays with pydicom: compressed, big endian, PALETTE COLOR, YBR, 1-bit, a VOI LUT Sequence
NOT_FAST = ("JPEG2000.dcm", "MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm", "MR_small_bigendian.dcm",
            "OBXXXX1A.dcm", "SC_ybr_full_uncompressed.dcm", "liver_1frame.dcm", "vlut_04.dcm")


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png))).astype(np.int32)


def _compare(data: bytes, renderings: list[Rendering]) -> None:
    ts, offset = split_part10(data)
    image = native_image(data, ts, offset)
    assert image is not None, "the fast path does not take this object"
    with warnings.catch_warnings():
        # pydicom warns about excess padding after the pixel data; not what is tested here
        warnings.simplefilter("ignore", UserWarning)
        for rendering in renderings:
            for frame in sorted({1, image.frames // 2 + 1, image.frames}):
                slow = _pixels(render_pydicom(data, [frame], rendering)[0])
                fast = _pixels(render(data, [frame], rendering, transfer_syntax_uid=ts, dataset_offset=offset)[0])
                assert fast.shape == slow.shape, (rendering, frame)
                assert np.abs(fast - slow).max() <= 1, (rendering, frame)


def _saved(ds: pydicom.Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.mark.parametrize("name", CORPUS)
def test_corpus_fast_path_matches_pydicom(name: str) -> None:
    data = Path(get_testdata_file(name)).read_bytes()
    _compare(data, [Rendering(PNG, window=w) for w in WINDOWS]
             + [Rendering(PNG, viewport=Viewport(50, 40)), Rendering(PNG, viewport=Viewport(64, 64, 10, 5, -20, 30))])


@pytest.mark.parametrize("name", NOT_FAST)
def test_other_objects_stay_with_pydicom(name: str) -> None:
    data = Path(get_testdata_file(name)).read_bytes()
    ts, offset = split_part10(data)
    assert native_image(data, ts, offset) is None


def _grey(bits: int, signed: bool, values: np.ndarray, **attrs: object) -> bytes:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for kw in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
        if kw in ds:
            delattr(ds, kw)
    rows, cols = values.shape[-2:]
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = int(signed)
    if values.ndim == 3:
        ds.NumberOfFrames = values.shape[0]
    for kw, value in attrs.items():
        setattr(ds, kw, value)
    ds.PixelData = values.astype(values.dtype.newbyteorder("<")).tobytes()
    return _saved(ds)


def test_signed_and_unsigned_8_bit() -> None:
    rng = np.random.default_rng(7)
    windows = [Rendering(PNG, window=w) for w in (None, Window(0, 100), Window(100, 60), Window(-20, 30))]
    _compare(_grey(8, False, rng.integers(0, 256, (33, 47), dtype=np.uint8)), windows)
    _compare(_grey(8, True, rng.integers(-128, 128, (33, 47), dtype=np.int8)), windows)
    _compare(_grey(8, True, rng.integers(-128, 128, (3, 20, 30), dtype=np.int8),
                   PhotometricInterpretation="MONOCHROME1", RescaleSlope=2, RescaleIntercept=-7), windows)


def test_unused_high_bits_are_ignored() -> None:
    """PS3.5 8.1.1: bits above Bits Stored carry no meaning; pydicom shifts them out, sign extending."""
    rng = np.random.default_rng(8)
    stored = rng.integers(-2048, 2048, (40, 50), dtype=np.int16)
    junk = stored.view(np.uint16) ^ (rng.integers(0, 16, (40, 50), dtype=np.uint16) << 12)
    for signed, values in ((True, junk.view(np.int16)), (False, junk)):
        data = _grey(16, signed, values, BitsStored=12, HighBit=11, RescaleSlope=1, RescaleIntercept=-1024)
        _compare(data, [Rendering(PNG, window=w) for w in (None, Window(0, 2000), Window(-1024, 400))])


def test_rescale_multiframe_monochrome1_and_stored_windows() -> None:
    rng = np.random.default_rng(9)
    frames = rng.integers(0, 4096, (4, 32, 24), dtype=np.uint16)
    frames[2] = 1000  # a flat frame: its range is empty, it renders black
    renderings = [Rendering(PNG, window=w) for w in (None, Window(500, 800), Window(-300, 5000, "SIGMOID"))]
    _compare(_grey(16, False, frames, PhotometricInterpretation="MONOCHROME1", RescaleSlope="-0.5",
                   RescaleIntercept="100", WindowCenter="-800\\-500", WindowWidth="1000\\400"), renderings)
    # an invalid stored window (width 0): the frame's range instead, on both paths
    _compare(_grey(16, False, frames, WindowCenter=40, WindowWidth=0), renderings)
    _compare(_grey(16, False, frames, WindowCenter=40, WindowWidth=300, VOILUTFunction="LINEAR_EXACT"),
             renderings)


def test_planar_16_bit_colour() -> None:
    rng = np.random.default_rng(10)
    ds = pydicom.dcmread(get_testdata_file("SC_rgb_16bit.dcm"))
    planes = rng.integers(0, 1 << 12, (3, int(ds.Rows), int(ds.Columns)), dtype=np.uint16)
    ds.PlanarConfiguration, ds.BitsStored, ds.HighBit = 1, 12, 11
    ds.PixelData = planes.astype("<u2").tobytes()
    _compare(_saved(ds), [Rendering(PNG), Rendering(PNG, viewport=Viewport(20, 20))])


def test_frame_out_of_range() -> None:
    data = Path(get_testdata_file("emri_small.dcm")).read_bytes()
    ts, offset = split_part10(data)
    with pytest.raises(FrameOutOfRange):
        render(data, [11], Rendering(PNG), transfer_syntax_uid=ts, dataset_offset=offset)
