"""Server-side rendering of stored images into consumer formats (PS3.18 8.3.5.1 rendered resources,
PS3.18 9 WADO-URI), and transcoding a stored object to a native transfer syntax. Pure: bytes in, bytes
out, no I/O; pixel decoding is CPU-bound, so callers run these functions in a worker pool.

The grayscale pipeline is PS3.4 N.2.1's, reduced to what a still image needs:

1. decode frame N of the stored pixel data (pydicom, with the pylibjpeg codecs for JPEG, JPEG-LS,
   JPEG 2000 and RLE; YBR colour is converted to RGB by pydicom);
2. Modality LUT: Rescale Slope/Intercept (per frame for enhanced objects, PS3.3 C.7.6.16.2.9), or the
   Modality LUT Sequence;
3. VOI: the requested window, else the object's first Window Center/Width (per frame for enhanced
   objects, PS3.3 C.7.6.16.2.10) with its VOI LUT Function, else its VOI LUT Sequence, else the
   frame's own minimum..maximum mapped linearly;
4. MONOCHROME1 is inverted so that 0 is black (PS3.3 C.7.6.3.1.2);
5. scaling into the viewport, preserving the aspect ratio (square pixels assumed).

Colour images (RGB, YBR_*) skip steps 2-4; PALETTE COLOR goes through its palette (PS3.3 C.7.6.3.1.5).
Output is 8 bits per sample, encoded by Pillow as JPEG, PNG or GIF.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, pixel_array
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from archive import frames as px
from archive.errors import MisuseError

JPEG, PNG, GIF = "image/jpeg", "image/png", "image/gif"
RENDERED_MEDIA_TYPES = (JPEG, PNG, GIF)        # in order of preference for `*/*` and `image/*`
NATIVE_TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
MAX_OUTPUT_SIDE = 8192                          # a sanity bound on requested viewports

_PILLOW_FORMAT = {JPEG: "JPEG", PNG: "PNG", GIF: "GIF"}
_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# What a broken or unsupported codestream makes pydicom and its plugins raise while decoding.
_DECODE_ERRORS = (ValueError, RuntimeError, NotImplementedError, AttributeError, TypeError, KeyError,
                  IndexError, EOFError, OSError)


class RenderError(MisuseError):
    """A request that cannot be rendered as asked (the HTTP edge answers 400, 406 or 404)."""


class NotAnImage(RenderError):
    """The object has no pixel data, so no rendered media type exists for it."""


class FrameOutOfRange(RenderError):
    def __init__(self, frame: int, frames: int) -> None:
        super().__init__(f"frame {frame} does not exist: the instance has {frames} frame(s)")
        self.frame = frame
        self.frames = frames


class UndecodablePixelData(RenderError):
    """The stored pixel data could not be decoded (unsupported codec or corrupt codestream)."""


@dataclass(frozen=True, slots=True)
class Window:
    """A VOI window in modality units (PS3.3 C.11.2.1.2); `function` LINEAR, LINEAR_EXACT or SIGMOID."""

    center: float
    width: float
    function: str = "LINEAR"

    def __post_init__(self) -> None:
        if self.function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
            raise RenderError(f"unknown VOI LUT function {self.function!r}")
        # PS3.3 C.11.2.1.2.1: Window Width >= 1 for LINEAR; > 0 for LINEAR_EXACT and SIGMOID
        if not math.isfinite(self.center) or not math.isfinite(self.width):
            raise RenderError("window center and width must be finite numbers")
        if self.function == "LINEAR" and self.width < 1:
            raise RenderError("window width must be >= 1 for the LINEAR function")
        if self.width <= 0:
            raise RenderError("window width must be > 0")


@dataclass(frozen=True, slots=True)
class Viewport:
    """Output size bounds and an optional source region, in pixels of the frame.

    PS3.18 8.3.5.1.3: `viewport=vw,vh[,sx,sy,sw,sh]`; a negative sw or sh flips the region. Either of
    `width` and `height` may be None (WADO-URI's `rows` or `columns` alone): only the other bounds.
    """

    width: int | None
    height: int | None
    sx: int = 0
    sy: int = 0
    sw: int | None = None
    sh: int | None = None

    def __post_init__(self) -> None:
        for side in (self.width, self.height):
            if side is not None and not 1 <= side <= MAX_OUTPUT_SIDE:
                raise RenderError(f"viewport sides must be between 1 and {MAX_OUTPUT_SIDE}")
        if self.width is None and self.height is None:
            raise RenderError("a viewport needs a width or a height")
        if self.sw == 0 or self.sh == 0:
            raise RenderError("an empty source region")


@dataclass(frozen=True, slots=True)
class Rendering:
    """How to render: media type, VOI window, viewport, WADO-URI region (fractions x1,y1,x2,y2), quality."""

    media_type: str = JPEG
    window: Window | None = None
    viewport: Viewport | None = None
    region: tuple[float, float, float, float] | None = None
    quality: int = 90

    def __post_init__(self) -> None:
        if self.media_type not in RENDERED_MEDIA_TYPES:
            raise RenderError(f"cannot render as {self.media_type}")
        if not 1 <= self.quality <= 100:
            raise RenderError("quality must be an integer from 1 to 100")
        if self.region is not None:
            x1, y1, x2, y2 = self.region
            if not (0.0 <= x1 < x2 <= 1.0 and 0.0 <= y1 < y2 <= 1.0):
                raise RenderError("region must be x1,y1,x2,y2 with 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1")


def read_instance(data: bytes) -> Dataset:
    """Parse a stored PS3.10 file (pixel data kept encoded, decoded per frame later)."""
    try:
        return pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, *_DECODE_ERRORS) as exc:
        raise UndecodablePixelData(f"cannot parse the stored object: {exc}") from exc


def number_of_frames(ds: Dataset) -> int:
    if not any(k in ds for k in _PIXEL_DATA_KEYWORDS):
        raise NotAnImage("the instance has no pixel data")
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


def render(data: bytes, frames: Sequence[int], rendering: Rendering, *,
           transfer_syntax_uid: str | None = None, dataset_offset: int | None = None) -> list[bytes]:
    """Render each 1-based frame of the stored PS3.10 `data` as `rendering.media_type`.

    With the object's transfer syntax and data set offset (the index knows both), native grayscale
    and RGB pixel data take the fast path (`native_image`); anything else is decoded by pydicom."""
    if transfer_syntax_uid is not None and dataset_offset is not None:
        image = native_image(data, transfer_syntax_uid, dataset_offset)
        if image is not None:
            return [render_native_frame(image, n, rendering) for n in frames]
    return render_pydicom(data, frames, rendering)


def render_pydicom(data: bytes, frames: Sequence[int], rendering: Rendering) -> list[bytes]:
    """`render` by a full pydicom parse and decode: every photometric interpretation and codec."""
    ds = read_instance(data)
    return [render_frame(ds, n, rendering) for n in frames]


def render_frame(ds: Dataset, frame: int, rendering: Rendering) -> bytes:
    image = frame_to_8bit(ds, frame, rendering.window)
    return encode(_fit(image, rendering.viewport, rendering.region), rendering.media_type, rendering.quality)


def frame_to_8bit(ds: Dataset, frame: int, window: Window | None = None) -> np.ndarray:
    """Frame `frame` (1-based) after the Modality, VOI and Presentation steps: uint8, (rows, columns) for
    grayscale or (rows, columns, 3) for colour."""
    frames = number_of_frames(ds)
    if not 1 <= frame <= frames:
        raise FrameOutOfRange(frame, frames)
    try:
        arr = pixel_array(ds, index=frame - 1)
    except _DECODE_ERRORS as exc:
        raise UndecodablePixelData(f"cannot decode the pixel data: {exc}") from exc
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if photometric == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(arr, ds)
        except _DECODE_ERRORS as exc:
            raise UndecodablePixelData(f"cannot apply the palette: {exc}") from exc
        return _to_uint8(rgb, 16 if rgb.dtype.itemsize > 1 else 8)
    if samples == 3 or arr.ndim == 3:
        # RGB, or YBR_* already converted to RGB by pydicom
        return _to_uint8(arr, int(ds.get("BitsStored", 8) or 8))
    values = _modality(arr, ds, frame)
    out = _voi(values, ds, frame, window)
    if photometric == "MONOCHROME1":
        out = 255.0 - out
    return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)


def _to_uint8(arr: np.ndarray, bits: int) -> np.ndarray:
    if arr.dtype == np.uint8 and bits <= 8:
        return arr
    bits = max(1, min(bits, 8 * arr.dtype.itemsize))
    scaled = arr.astype(np.float64) * (255.0 / (2 ** bits - 1))
    return np.clip(np.floor(scaled + 0.5), 0, 255).astype(np.uint8)


def _frame_item(ds: Dataset, frame: int, sequence: str) -> Dataset | None:
    """The item of a functional group macro for `frame`: per-frame first, then shared (PS3.3 C.7.6.16)."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and len(per_frame) >= frame:
        group = per_frame[frame - 1].get(sequence)
        if group:
            return group[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        group = shared[0].get(sequence)
        if group:
            return group[0]
    return None


def _first_number(value: object) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if len(value) else None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _modality(arr: np.ndarray, ds: Dataset, frame: int) -> np.ndarray:
    item = _frame_item(ds, frame, "PixelValueTransformationSequence")
    source = item if item is not None else ds
    slope = _first_number(source.get("RescaleSlope"))
    intercept = _first_number(source.get("RescaleIntercept"))
    if slope is not None and intercept is not None:
        return arr.astype(np.float64) * slope + intercept
    if item is None and ds.get("ModalityLUTSequence"):
        try:
            return apply_modality_lut(arr, ds).astype(np.float64)
        except _DECODE_ERRORS as exc:
            raise UndecodablePixelData(f"cannot apply the Modality LUT: {exc}") from exc
    return arr.astype(np.float64)


def _stored_window(ds: Dataset, frame: int) -> Window | None:
    item = _frame_item(ds, frame, "FrameVOILUTSequence")
    source = item if item is not None else ds
    center = _first_number(source.get("WindowCenter"))
    width = _first_number(source.get("WindowWidth"))
    function = str(source.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if center is None or width is None:
        return None
    try:
        return Window(center, width, function)
    except RenderError:
        return None  # an invalid stored window: fall back to the frame's range


def apply_window(values: np.ndarray, window: Window) -> np.ndarray:
    """PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT) and C.11.2.1.3.1 (SIGMOID) onto 0..255, as float."""
    c, w = window.center, window.width
    if window.function == "SIGMOID":
        return 255.0 / (1.0 + np.exp(-4.0 * (values - c) / w))
    if window.function == "LINEAR_EXACT":
        out = ((values - c) / w + 0.5) * 255.0
        out[values <= c - w / 2] = 0.0
        out[values > c + w / 2] = 255.0
        return out
    if w == 1:
        # a one-unit window is a threshold: the formula's (w - 1) denominator vanishes
        return np.where(values > c - 0.5, 255.0, 0.0)
    out = ((values - (c - 0.5)) / (w - 1) + 0.5) * 255.0
    out[values <= c - 0.5 - (w - 1) / 2] = 0.0
    out[values > c - 0.5 + (w - 1) / 2] = 255.0
    return out


def _voi(values: np.ndarray, ds: Dataset, frame: int, window: Window | None) -> np.ndarray:
    window = window or _stored_window(ds, frame)
    if window is not None:
        return apply_window(values, window)
    voi_lut = ds.get("VOILUTSequence")
    if voi_lut:
        try:
            bits = int(voi_lut[0].LUTDescriptor[2])
            mapped = apply_voi(values.astype(np.int64), ds).astype(np.float64)
        except (*_DECODE_ERRORS, IndexError) as exc:
            raise UndecodablePixelData(f"cannot apply the VOI LUT: {exc}") from exc
        return mapped * (255.0 / (2 ** bits - 1))
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros_like(values)
    return (values - low) * (255.0 / (high - low))


def _fit(image: np.ndarray, viewport: Viewport | None,
         region: tuple[float, float, float, float] | None) -> Image.Image:
    """Crop the source region and scale it to fit the viewport, keeping the aspect ratio."""
    pil = Image.fromarray(np.ascontiguousarray(image))  # uint8: "L" for (rows, cols), "RGB" for (rows, cols, 3)
    rows, cols = image.shape[:2]
    if region is not None:
        x1, y1, x2, y2 = region
        box = (math.floor(x1 * cols), math.floor(y1 * rows), math.ceil(x2 * cols), math.ceil(y2 * rows))
        pil = pil.crop((box[0], box[1], max(box[2], box[0] + 1), max(box[3], box[1] + 1)))
    if viewport is None:
        return pil
    sx, sy = viewport.sx, viewport.sy
    sw = viewport.sw if viewport.sw is not None else pil.width - sx
    sh = viewport.sh if viewport.sh is not None else pil.height - sy
    # PS3.18 8.3.5.1.3: a negative sw (sh) means the region extends left (up) from sx (sy) and is flipped
    left, right = sorted((sx, sx + sw))
    top, bottom = sorted((sy, sy + sh))
    left, top = max(left, 0), max(top, 0)
    right, bottom = min(right, pil.width), min(bottom, pil.height)
    if right <= left or bottom <= top:
        raise RenderError("the viewport's source region lies outside the image")
    if (left, top, right, bottom) != (0, 0, pil.width, pil.height):
        pil = pil.crop((left, top, right, bottom))
    if sw < 0:
        pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if sh < 0:
        pil = pil.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    scales = [viewport.width / pil.width if viewport.width else math.inf,
              viewport.height / pil.height if viewport.height else math.inf]
    scale = min(scales)
    size = (max(1, min(MAX_OUTPUT_SIDE, round(pil.width * scale))),
            max(1, min(MAX_OUTPUT_SIDE, round(pil.height * scale))))
    if viewport.width:
        size = (min(size[0], viewport.width), size[1])
    if viewport.height:
        size = (size[0], min(size[1], viewport.height))
    if size != pil.size:
        pil = pil.resize(size, Image.Resampling.LANCZOS)
    return pil


def encode(image: Image.Image, media_type: str, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if media_type == JPEG:
        image.save(buf, "JPEG", quality=quality)
    else:
        image.save(buf, _PILLOW_FORMAT[media_type])
    return buf.getvalue()


# -- the fast path: native grayscale and RGB pixel data, without pydicom -------------------------------
#
# Most stored images are uncompressed MONOCHROME1/2 or RGB of 8 or 16 bits. For those, the attributes
# the pipeline needs are read from the top-level elements (archive/frames.py, struct only), the frame is
# a numpy view of the stored bytes, and the Modality, VOI and Presentation steps collapse into one
# lookup table indexed by the stored bit pattern: the same float arithmetic as the pydicom path, done
# once per possible value (2**Bits Allocated) instead of once per pixel, so both paths give the same
# 8-bit values. Anything else (compressed, big endian, PALETTE COLOR, YBR_*, Modality or VOI LUT Sequences, enhanced
# objects with functional groups, 1- or 32-bit samples) returns None from `native_image`: pydicom.

_SAMPLES, _PHOTOMETRIC, _PLANAR = 0x00280002, 0x00280004, 0x00280006
_BITS_STORED, _PIXEL_REPRESENTATION = 0x00280101, 0x00280103
_WINDOW_CENTER, _WINDOW_WIDTH, _VOI_LUT_FUNCTION = 0x00281050, 0x00281051, 0x00281056
_RESCALE_INTERCEPT, _RESCALE_SLOPE = 0x00281052, 0x00281053
_MODALITY_LUT_SEQUENCE, _VOI_LUT_SEQUENCE = 0x00283000, 0x00283010
_FLOAT_PIXEL_DATA, _DOUBLE_FLOAT_PIXEL_DATA = 0x7FE00008, 0x7FE00009
_SHARED_GROUPS, _PER_FRAME_GROUPS = 0x52009229, 0x52009230
# present, these need what only the pydicom path implements
_FALLBACK_ELEMENTS = (_MODALITY_LUT_SEQUENCE, _VOI_LUT_SEQUENCE, _FLOAT_PIXEL_DATA, _DOUBLE_FLOAT_PIXEL_DATA, _SHARED_GROUPS,
                      _PER_FRAME_GROUPS)


@dataclass(frozen=True, slots=True)
class NativeImage:
    """Native little endian MONOCHROME1/2 or RGB pixel data located in a stored object."""

    data: bytes                 # the stored object: frames are views of it
    pixel_offset: int
    frames: int
    rows: int
    columns: int
    samples: int                # 1 (MONOCHROME1/2) or 3 (RGB)
    bits_allocated: int         # 8 or 16
    bits_stored: int
    signed: bool
    planar: bool                # PS3.3 C.7.6.3.1.3: RGB stored plane by plane
    monochrome1: bool
    rescale: tuple[float, float] | None   # (slope, intercept)
    window: Window | None                 # the stored one (PS3.3 C.11.2.1.2)

    @property
    def frame_bytes(self) -> int:
        return self.rows * self.columns * self.samples * self.bits_allocated // 8


def _text_number(text: str) -> float | None:
    return _first_number(text) if text else None


def native_image(data: bytes, transfer_syntax_uid: str, dataset_offset: int) -> NativeImage | None:
    """The stored object's pixel data if the fast path can render it, else None (use pydicom)."""
    if transfer_syntax_uid not in NATIVE_TRANSFER_SYNTAXES:
        return None
    try:
        layout = px.parse_layout(data, transfer_syntax_uid, offset=dataset_offset)
    except (px.MalformedPixelData, MisuseError, ValueError):
        return None  # pydicom says what is wrong with it
    pixel = layout.elements.get(px.PIXEL_DATA)
    if pixel is None or pixel.length is None or any(t in layout.elements for t in _FALLBACK_ELEMENTS):
        return None
    photometric = layout.photometric_interpretation.upper()
    samples, bits = layout.samples_per_pixel, layout.bits_allocated
    bits_stored = px.us_value(layout, _BITS_STORED) or bits
    signed = px.us_value(layout, _PIXEL_REPRESENTATION) == 1
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        if samples != 1 or bits not in (8, 16):
            return None
    elif photometric == "RGB":
        # 8-bit RGB is sent as stored; Bits Stored below 8 or signed colour are rare enough for pydicom
        if samples != 3 or bits not in (8, 16) or signed or (bits == 8 and bits_stored != 8):
            return None
    else:
        return None
    if not 1 <= bits_stored <= bits or layout.rows <= 0 or layout.columns <= 0:
        return None
    # pydicom refuses pixel data shorter than all the frames it announces: so does the fast path
    if pixel.length < layout.number_of_frames * layout.rows * layout.columns * samples * bits // 8:
        return None
    slope = _text_number(px.text_value(layout, _RESCALE_SLOPE))
    intercept = _text_number(px.text_value(layout, _RESCALE_INTERCEPT))
    center = _text_number(px.text_value(layout, _WINDOW_CENTER))
    width = _text_number(px.text_value(layout, _WINDOW_WIDTH))
    window = None
    if center is not None and width is not None:
        try:
            window = Window(center, width, px.text_value(layout, _VOI_LUT_FUNCTION).upper() or "LINEAR")
        except RenderError:
            window = None  # an invalid stored window: the frame's range, as in _stored_window
    return NativeImage(
        data=layout.data, pixel_offset=pixel.offset, frames=layout.number_of_frames, rows=layout.rows,
        columns=layout.columns, samples=samples, bits_allocated=bits, bits_stored=bits_stored, signed=signed,
        planar=samples == 3 and px.us_value(layout, _PLANAR) == 1, monochrome1=photometric == "MONOCHROME1",
        rescale=(slope, intercept) if slope is not None and intercept is not None else None, window=window)


def _stored_values(bits_allocated: int, bits_stored: int, signed: bool) -> np.ndarray:
    """Every bit pattern of a sample as pydicom reads it: signed or not, unused high bits corrected by
    shifting them out (PS3.5 8.1.1; pydicom's `correct_unused_bits`). Indexed by the pattern."""
    unsigned = np.arange(1 << bits_allocated, dtype=np.uint16 if bits_allocated == 16 else np.uint8)
    values = unsigned.view(unsigned.dtype.str.replace("u", "i")) if signed else unsigned
    shift = bits_allocated - bits_stored
    if shift:
        values = np.right_shift(np.left_shift(values, shift), shift)
    return values


@functools.lru_cache(maxsize=64)
def _grey_lut(bits_allocated: int, bits_stored: int, signed: bool, rescale: tuple[float, float] | None,
              window: Window | None, low_high: tuple[float, float] | None, monochrome1: bool) -> np.ndarray:
    """uint8 for every stored bit pattern after the Modality LUT, the VOI (`window`, else the frame's
    `low_high` mapped linearly) and MONOCHROME1's inversion: `frame_to_8bit`'s arithmetic, per value."""
    values = _stored_values(bits_allocated, bits_stored, signed).astype(np.float64)
    if rescale is not None:
        values = values * rescale[0] + rescale[1]
    if window is not None:
        # a SIGMOID's exp overflows to inf far from the center, giving 0 as it should
        with np.errstate(over="ignore"):
            out = apply_window(values, window)
    else:
        assert low_high is not None
        low, high = low_high
        out = np.zeros_like(values) if high <= low else (values - low) * (255.0 / (high - low))
    if monochrome1:
        out = 255.0 - out
    lut = np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)
    lut.flags.writeable = False
    return lut


@functools.lru_cache(maxsize=8)
def _colour_lut(bits_allocated: int, bits_stored: int) -> np.ndarray:
    """`_to_uint8` of every stored bit pattern of an unsigned colour sample."""
    lut = _to_uint8(_stored_values(bits_allocated, bits_stored, False), bits_stored)
    lut.flags.writeable = False
    return lut


def _frame_range(image: NativeImage, raw: np.ndarray) -> tuple[float, float]:
    """The frame's minimum and maximum in modality units (the VOI when there is no window)."""
    stored = raw
    if image.signed:
        stored = stored.view(stored.dtype.str.replace("u", "i"))
    shift = image.bits_allocated - image.bits_stored
    if shift:
        stored = np.right_shift(np.left_shift(stored, shift), shift)
    ends = np.array([stored.min(), stored.max()], dtype=np.float64)
    if image.rescale is not None:
        # an affine map is monotonic in floating point too: its extremes are those of the stored values
        ends = ends * image.rescale[0] + image.rescale[1]
    return float(ends.min()), float(ends.max())


def native_frame_to_8bit(image: NativeImage, frame: int, window: Window | None = None) -> np.ndarray:
    """`frame_to_8bit` for a `NativeImage`: uint8, (rows, columns) or (rows, columns, 3)."""
    if not 1 <= frame <= image.frames:
        raise FrameOutOfRange(frame, image.frames)
    dtype = np.dtype("<u2") if image.bits_allocated == 16 else np.dtype(np.uint8)
    count = image.rows * image.columns * image.samples
    raw = np.frombuffer(image.data, dtype=dtype, count=count,
                        offset=image.pixel_offset + (frame - 1) * image.frame_bytes)
    if image.samples == 3:
        if image.planar:
            raw = raw.reshape(3, image.rows, image.columns).transpose(1, 2, 0)
        else:
            raw = raw.reshape(image.rows, image.columns, 3)
        if dtype == np.uint8:
            return raw
        return np.take(_colour_lut(image.bits_allocated, image.bits_stored), raw)
    window = window or image.window
    low_high = _frame_range(image, raw) if window is None else None
    lut = _grey_lut(image.bits_allocated, image.bits_stored, image.signed, image.rescale, window, low_high,
                    image.monochrome1)
    return np.take(lut, raw).reshape(image.rows, image.columns)


def render_native_frame(image: NativeImage, frame: int, rendering: Rendering) -> bytes:
    pixels = native_frame_to_8bit(image, frame, rendering.window)
    return encode(_fit(pixels, rendering.viewport, rendering.region), rendering.media_type, rendering.quality)


def transcode_native(data: bytes, transfer_syntax: str) -> bytes:
    """The stored PS3.10 `data` re-encoded in a native (uncompressed) little endian transfer syntax,
    decompressing the pixel data if needed. The SOP Instance UID is kept: the object is the same."""
    target = UID(transfer_syntax)
    if target not in NATIVE_TRANSFER_SYNTAXES:
        raise RenderError(f"cannot transcode to transfer syntax {transfer_syntax}")
    ds = read_instance(data)
    if ds.file_meta.TransferSyntaxUID == target:
        return data
    try:
        if ds.file_meta.TransferSyntaxUID.is_compressed and "PixelData" in ds:
            ds.decompress(generate_instance_uid=False)
        ds.file_meta.TransferSyntaxUID = target
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
    except _DECODE_ERRORS as exc:
        raise UndecodablePixelData(f"cannot transcode the stored object: {exc}") from exc
    return buf.getvalue()
