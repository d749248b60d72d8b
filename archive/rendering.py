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


def render(data: bytes, frames: Sequence[int], rendering: Rendering) -> list[bytes]:
    """Render each 1-based frame of the stored PS3.10 `data` as `rendering.media_type`."""
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
