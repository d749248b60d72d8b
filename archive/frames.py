"""Pixel data of a stored data set: where frame N's bytes are, what a top-level element's value is,
and decoding to uncompressed little endian (WADO-RS frames, bulk data and transcoding). Pure, no I/O.

The data set is read as encoded (PS3.5 Chapter 7) with `struct`, top-level elements only, so that a
frame or a bulk value is a slice of the stored bytes, found without building a pydicom Dataset:
- native pixel data (PS3.5 8.2): frame N is `frame_size` bytes at N * frame_size (bits, for
  Bits Allocated 1, where frames are packed without padding between them);
- encapsulated pixel data (PS3.5 A.4): a frame is one or more fragments, delimited by the Extended
  Offset Table (7FE0,0001/0002), else the Basic Offset Table, else (empty tables) by the same rules
  as pydicom.encaps.generate_fragmented_frames: one fragment = one frame, fragments == frames, a
  single frame, and otherwise the JPEG EOI / EOC marker (FFD9) at the end of a frame's last fragment.
Both kinds can be located from the elements before the pixel data alone (`parse_layout(...,
stop_at_pixel_data=True)`, `native_frame_span`, `frame_item_ranges`), so a caller reads one frame's
bytes, not the object.
Decoding compressed frames and re-encoding whole instances uses pydicom (with pylibjpeg); callers
run those functions in a worker thread, never on the event loop.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from io import BytesIO

from pydicom.datadict import dictionary_VR
from pydicom.uid import UID

from archive.errors import InternalError, MisuseError
from archive.instance import inflate

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"

PIXEL_DATA = 0x7FE00010
_EXTENDED_OFFSET_TABLE, _EXTENDED_OFFSET_TABLE_LENGTHS = 0x7FE00001, 0x7FE00002
_ROWS, _COLUMNS, _SAMPLES, _BITS_ALLOCATED = 0x00280010, 0x00280011, 0x00280002, 0x00280100
_NUMBER_OF_FRAMES, _PHOTOMETRIC = 0x00280008, 0x00280004

_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"))
_ITEM, _ITEM_DELIMITER, _SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
# PS3.5 7.3: the byte width of the words to swap when a big endian value is sent little endian
_SWAP_WIDTH = {"OW": 2, "US": 2, "SS": 2, "AT": 2, "OL": 4, "OF": 4, "UL": 4, "SL": 4, "FL": 4,
               "OD": 8, "OV": 8, "FD": 8, "UV": 8, "SV": 8}


class FrameNotFound(MisuseError):
    """A frame number the instance does not have."""


class NotProducible(MisuseError):
    """The stored pixel data cannot be turned into what was asked (no decoder, no pixel data)."""


class MalformedPixelData(InternalError):
    """A stored data set whose pixel data does not add up (ingest validated its structure)."""


class Truncated(MalformedPixelData):
    """The bytes end inside an element: malformed for a whole object, "read more" for a prefix."""


@dataclass(frozen=True, slots=True)
class Element:
    """A top-level element as encoded: VR (None in implicit VR, unless known) and where its value is."""

    tag: int
    vr: str | None
    offset: int
    length: int | None  # None: undefined length (a sequence or encapsulated pixel data)


@dataclass(frozen=True, slots=True)
class DataSetLayout:
    """The top-level elements of one data set and the image attributes frames depend on."""

    data: bytes                    # the PS3.10 file, or the data set alone if it was deflated
    transfer_syntax_uid: str
    little_endian: bool
    elements: dict[int, Element]
    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    number_of_frames: int
    photometric_interpretation: str

    @property
    def encapsulated(self) -> bool:
        pixel = self.elements.get(PIXEL_DATA)
        return pixel is not None and pixel.length is None

    @property
    def has_pixel_data(self) -> bool:
        return PIXEL_DATA in self.elements

    def frame_bits(self) -> int:
        """Bits in one native frame (PS3.5 8.2; YBR_*_422 holds two samples per pixel, PS3.3 C.7.6.3.1.2)."""
        samples = 2 if self.photometric_interpretation in ("YBR_FULL_422", "YBR_PARTIAL_422") \
            else self.samples_per_pixel
        return self.rows * self.columns * samples * self.bits_allocated


class _Reader:
    def __init__(self, data: bytes, little_endian: bool) -> None:
        self.data = data
        self.end = len(data)
        self.e = "<" if little_endian else ">"

    def header(self, pos: int, explicit: bool) -> tuple[int, bytes | None, int, int]:
        """(tag, VR, length, value offset) of the element at pos (PS3.5 7.1.2, 7.1.3)."""
        if self.end - pos < 8:
            raise Truncated("data set ends inside an element header")
        group, elem = struct.unpack_from(self.e + "HH", self.data, pos)
        if explicit and group != 0xFFFE:
            vr = self.data[pos + 4:pos + 6]
            if vr in _LONG_VRS:
                if self.end - pos < 12:
                    raise Truncated("data set ends inside an element header")
                return group << 16 | elem, vr, struct.unpack_from(self.e + "L", self.data, pos + 8)[0], pos + 12
            return group << 16 | elem, vr, struct.unpack_from(self.e + "H", self.data, pos + 6)[0], pos + 8
        return group << 16 | elem, None, struct.unpack_from(self.e + "L", self.data, pos + 4)[0], pos + 8

    def skip_items(self, pos: int, explicit: bool) -> int:
        """Past the Sequence Delimitation Item of an undefined-length sequence starting at pos."""
        while True:
            tag, _, length, value = self.header(pos, False)
            if tag == _SEQUENCE_DELIMITER:
                return value
            if tag != _ITEM:
                raise MalformedPixelData(f"expected an item, found ({tag >> 16:04X},{tag & 0xFFFF:04X})")
            pos = self.skip_item_elements(value, explicit) if length == _UNDEFINED else value + length

    def skip_item_elements(self, pos: int, explicit: bool) -> int:
        """Past the Item Delimitation Item of an undefined-length item whose elements start at pos."""
        while True:
            tag, vr, length, value = self.header(pos, explicit)
            if tag == _ITEM_DELIMITER:
                return value
            # PS3.5 6.2.2: a UN of undefined length holds Implicit VR Little Endian items
            pos = self.skip_items(value, explicit and vr != b"UN") if length == _UNDEFINED else value + length


def _first_us(data: bytes, el: Element | None, e: str) -> int | None:
    if el is None or not el.length or el.length < 2:
        return None
    return struct.unpack_from(e + "H", data, el.offset)[0]


def _text(data: bytes, el: Element | None) -> str:
    if el is None or not el.length:
        return ""
    return data[el.offset:el.offset + el.length].decode("ascii", "replace").split("\\")[0].strip("\0 ")


def parse_layout(data: bytes, transfer_syntax_uid: str, *, offset: int = 0,
                 stop_at_pixel_data: bool = False) -> DataSetLayout:
    """The top-level elements of the data set at `offset` in `data` (a PS3.10 file: where its File Meta
    Information ends), encoded in `transfer_syntax_uid`, and the image attributes (PS3.3 C.7.6.3)
    that locate its frames. Element offsets are positions in `layout.data`.

    With `stop_at_pixel_data`, `data` may be a prefix of the object: parsing ends at the (7FE0,0010)
    header, whose value need not be in `data`; `Truncated` says the prefix ends before that.
    A deflated data set (PS3.5 A.5) must be whole."""
    ts = UID(transfer_syntax_uid)
    if not ts.is_transfer_syntax:
        raise MalformedPixelData(f"unknown transfer syntax {transfer_syntax_uid}")
    if ts.is_deflated:
        data, offset = inflate(data[offset:], ts), 0
    explicit = not ts.is_implicit_VR
    if explicit and len(data) >= offset + 6 and not data[offset + 4:offset + 6].isalpha():
        explicit = False  # an "explicit VR" data set written in implicit VR: read it as pydicom does
    reader = _Reader(data, ts.is_little_endian)
    elements: dict[int, Element] = {}
    pos = offset
    while pos < reader.end:
        tag, vr, length, value = reader.header(pos, explicit)
        vr_text = vr.decode("ascii", "replace") if vr else None
        if vr_text is None and tag != PIXEL_DATA:
            try:
                vr_text = dictionary_VR(tag)
            except KeyError:
                vr_text = None
        if stop_at_pixel_data and tag == PIXEL_DATA:
            elements[tag] = Element(tag, vr_text, value, None if length == _UNDEFINED else length)
            break
        if length == _UNDEFINED:
            elements[tag] = Element(tag, vr_text or ("OB" if tag == PIXEL_DATA else "SQ"), value, None)
            pos = reader.skip_items(value, explicit and vr != b"UN")
            continue
        if value + length > reader.end:
            raise Truncated(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) runs past the data set")
        elements[tag] = Element(tag, vr_text, value, length)
        pos = value + length
    if stop_at_pixel_data and PIXEL_DATA not in elements:
        raise Truncated("the prefix ends before the pixel data")
    e = reader.e
    frames_text = _text(data, elements.get(_NUMBER_OF_FRAMES))
    try:
        frames = int(frames_text) if frames_text else 1
    except ValueError:
        frames = 1
    bits = _first_us(data, elements.get(_BITS_ALLOCATED), e) or 0
    pixel = elements.get(PIXEL_DATA)
    if pixel is not None and pixel.vr is None:
        elements[PIXEL_DATA] = Element(PIXEL_DATA, "OW" if bits > 8 else "OB", pixel.offset, pixel.length)
    return DataSetLayout(
        data=data, transfer_syntax_uid=str(ts), little_endian=ts.is_little_endian, elements=elements,
        rows=_first_us(data, elements.get(_ROWS), e) or 0, columns=_first_us(data, elements.get(_COLUMNS), e) or 0,
        samples_per_pixel=_first_us(data, elements.get(_SAMPLES), e) or 1, bits_allocated=bits,
        number_of_frames=max(frames, 1), photometric_interpretation=_text(data, elements.get(_PHOTOMETRIC)))


def us_value(layout: DataSetLayout, tag: int) -> int | None:
    """The first value of a top-level US element (None: absent or empty)."""
    return _first_us(layout.data, layout.elements.get(tag), "<" if layout.little_endian else ">")


def text_value(layout: DataSetLayout, tag: int) -> str:
    """The first value of a top-level text element (DS, IS, CS...), stripped ("" if absent)."""
    return _text(layout.data, layout.elements.get(tag))


def _swapped(value: bytes, width: int) -> bytes:
    """`value` with every `width`-byte word reversed (big to little endian)."""
    if width < 2 or len(value) % width:
        return value
    fmt = {2: "H", 4: "L", 8: "Q"}[width]
    count = len(value) // width
    return struct.pack(f"<{count}{fmt}", *struct.unpack(f">{count}{fmt}", value))


def swap_width(layout: DataSetLayout, el: Element) -> int:
    """The width of the words to reverse to send this value little endian (0: none)."""
    if layout.little_endian:
        return 0
    if el.tag == PIXEL_DATA:
        return _pixel_swap_width(layout, el)
    return _SWAP_WIDTH.get(el.vr or "", 0)


def _pixel_swap_width(layout: DataSetLayout, pixel: Element) -> int:
    """PS3.5 7.3: OW is a stream of 16-bit words in the transfer syntax's byte order, 8-bit samples two
    to a word too (pydicom swaps those pairwise); wider samples are words of their own size, as pydicom
    reads them. OB is a byte stream: never swapped."""
    if layout.little_endian or pixel.vr != "OW":
        return 0
    return 2 if layout.bits_allocated <= 16 else layout.bits_allocated // 8


def little_endian_value(raw: bytes, width: int) -> bytes:
    """A value (or a word-aligned piece of it) as read, little endian."""
    return _swapped(raw, width) if width else raw


def element_value(layout: DataSetLayout, tag: int) -> bytes | None:
    """The value of a top-level element of defined length, little endian (PS3.18 8.7.3.3.1: uncompressed
    bulk data is sent in little endian byte order); None if absent or encapsulated."""
    el = layout.elements.get(tag)
    if el is None or el.length is None:
        return None
    return little_endian_value(layout.data[el.offset:el.offset + el.length], swap_width(layout, el))


def _check_index(layout: DataSetLayout, index: int) -> None:
    if not layout.has_pixel_data:
        raise NotProducible("the instance has no pixel data")
    if not 0 <= index < layout.number_of_frames:
        raise FrameNotFound(f"frame {index + 1} does not exist: the instance has {layout.number_of_frames} "
                            f"frame{'s' if layout.number_of_frames != 1 else ''}")


@dataclass(frozen=True, slots=True)
class FrameSpan:
    """Where a native frame's bytes are in the stored object, and how to turn them into the frame."""

    offset: int       # of the first byte holding the frame
    length: int       # bytes to read
    bit_offset: int   # Bits Allocated 1: the frame starts this many bits into the first byte
    bits: int
    swap: int         # big endian words of this width to reverse (0: none)
    lead: int = 0     # bytes read before the frame to start on a word boundary (with `swap`)


def native_frame_span(layout: DataSetLayout, index: int) -> FrameSpan:
    """Where frame `index` (0-based) of native pixel data lies (PS3.5 8.1.1, 8.2)."""
    _check_index(layout, index)
    pixel = layout.elements[PIXEL_DATA]
    if pixel.length is None:
        raise MisuseError("the pixel data is encapsulated")
    bits = layout.frame_bits()
    if bits <= 0:
        raise MalformedPixelData("Rows, Columns or Bits Allocated is missing")
    start_bit, end_bit = index * bits, (index + 1) * bits
    if end_bit > pixel.length * 8:
        raise MalformedPixelData(f"pixel data holds {pixel.length} bytes, too few for frame {index + 1}")
    swap = _pixel_swap_width(layout, pixel)
    first, last = pixel.offset + start_bit // 8, pixel.offset + (end_bit + 7) // 8
    lead = 0
    if swap:
        # whole words only: a frame of 8-bit samples may start or end in the middle of one
        lead = (first - pixel.offset) % swap
        first -= lead
        last = min(pixel.offset + pixel.length, last + -(last - pixel.offset) % swap)
    return FrameSpan(first, last - first, start_bit % 8, bits, swap, lead)


def frame_from_span(raw: bytes | memoryview, span: FrameSpan) -> bytes | memoryview:
    """The frame, little endian, from the `span.length` bytes read at `span.offset`."""
    if len(raw) != span.length:
        raise MalformedPixelData(f"the object ends inside the pixel data ({len(raw)} of {span.length} bytes)")
    if span.bit_offset == 0 and span.bits % 8 == 0:
        if not span.swap:
            return raw
        return _swapped(raw, span.swap)[span.lead:span.lead + span.bits // 8]
    # Bits Allocated 1 (PS3.5 8.1.1): frames follow each other bit by bit, least significant bit first
    as_int = (int.from_bytes(raw, "little") >> span.bit_offset) & ((1 << span.bits) - 1)
    return as_int.to_bytes((span.bits + 7) // 8, "little")


def native_frame(layout: DataSetLayout, index: int) -> bytes | memoryview:
    """Frame `index` (0-based) of native pixel data, little endian, from a layout of the whole object
    (a view of `layout.data` when no bytes need swapping)."""
    span = native_frame_span(layout, index)
    return frame_from_span(memoryview(layout.data)[span.offset:span.offset + span.length], span)


def _fragments(layout: DataSetLayout) -> tuple[list[int], list[tuple[int, int, int]]]:
    """(Basic Offset Table, [(item offset from the first fragment, value offset, length)]) (PS3.5 A.4)."""
    pixel = layout.elements[PIXEL_DATA]
    reader = _Reader(layout.data, True)  # PS3.5 A.4: encapsulated data is little endian
    tag, _, bot_length, pos = reader.header(pixel.offset, False)
    if tag != _ITEM or bot_length == _UNDEFINED or pos + bot_length > reader.end:
        raise MalformedPixelData("encapsulated pixel data does not start with a Basic Offset Table item")
    bot = list(struct.unpack_from(f"<{bot_length // 4}L", layout.data, pos))
    pos += bot_length
    first = pos
    fragments = []
    while True:
        tag, _, length, value = reader.header(pos, False)
        if tag == _SEQUENCE_DELIMITER:
            break
        if tag != _ITEM or length == _UNDEFINED or value + length > reader.end:
            raise MalformedPixelData("a pixel data fragment is malformed")
        fragments.append((pos - first, value, length))
        pos = value + length
    return bot, fragments


def encapsulated_frame_spans(layout: DataSetLayout) -> list[list[tuple[int, int]]]:
    """For every frame, the (offset, length) in `layout.data` of each of its fragments' values."""
    bot, fragments = _fragments(layout)
    eot = element_value(layout, _EXTENDED_OFFSET_TABLE)
    eot_lengths = element_value(layout, _EXTENDED_OFFSET_TABLE_LENGTHS)
    if eot and eot_lengths and len(eot) == len(eot_lengths) and len(eot) % 8 == 0:
        by_item = {item: value for item, value, _ in fragments}
        offsets = struct.unpack(f"<{len(eot) // 8}Q", eot)
        lengths = struct.unpack(f"<{len(eot) // 8}Q", eot_lengths)
        try:
            return [[(by_item[o], n)] for o, n in zip(offsets, lengths)]
        except KeyError as exc:
            raise MalformedPixelData("the Extended Offset Table points between fragments") from exc
    if bot:
        frames: list[list[tuple[int, int]]] = [[] for _ in bot]
        current = 0
        for item, value, length in fragments:
            while current + 1 < len(bot) and item >= bot[current + 1]:
                current += 1
            frames[current].append((value, length))
        return frames
    spans = [(value, length) for _, value, length in fragments]
    n = layout.number_of_frames
    if len(spans) == 1 or n == 1:
        return [spans]
    if len(spans) == n:
        return [[s] for s in spans]
    if len(spans) < n:
        raise MalformedPixelData(f"{len(spans)} fragments cannot hold {n} frames")
    # no offset table and more fragments than frames: a frame ends with the JPEG EOI / JPEG 2000 EOC
    # marker, as pydicom.encaps.generate_fragmented_frames finds it
    frames, frame = [], []
    for value, length in spans:
        frame.append((value, length))
        if b"\xff\xd9" in layout.data[max(value, value + length - 10):value + length]:
            frames.append(frame)
            frame = []
    if frame:
        frames.append(frame)
    return frames


def encapsulated_frames(layout: DataSetLayout, indices: list[int]) -> list[bytes | memoryview]:
    """The compressed bitstream of each frame in `indices` (0-based), as stored: a view of
    `layout.data` for a frame in one fragment, the fragments joined otherwise."""
    for index in indices:
        _check_index(layout, index)
    spans = encapsulated_frame_spans(layout)
    view = memoryview(layout.data)
    out: list[bytes | memoryview] = []
    for index in indices:
        if index >= len(spans):
            raise MalformedPixelData(f"the pixel data holds {len(spans)} frames, not {layout.number_of_frames}")
        pieces = [view[o:o + n] for o, n in spans[index]]
        out.append(pieces[0] if len(pieces) == 1 else b"".join(pieces))
    return out


def basic_offset_table_length(item_header: bytes) -> int:
    """The length of the Basic Offset Table from the 8 bytes that open encapsulated pixel data (PS3.5 A.4)."""
    tag, _, length, _ = _Reader(item_header, True).header(0, False)
    if tag != _ITEM or length == _UNDEFINED or length % 4:
        raise MalformedPixelData("encapsulated pixel data does not start with a Basic Offset Table item")
    return length


def frame_item_ranges(layout: DataSetLayout, basic_offset_table: bytes, first_fragment: int,
                      object_size: int) -> list[tuple[int, int]] | None:
    """For each frame, the (start, end) in the object of the items holding its fragments, located by the
    Extended Offset Table or else the Basic Offset Table (PS3.5 A.4, Table A.4-1); None when neither
    locates every frame, and the fragments must be walked. The last frame's range runs to the object's
    end: `fragment_values` stops at the Sequence Delimitation Item."""
    n = layout.number_of_frames
    eot = element_value(layout, _EXTENDED_OFFSET_TABLE)
    eot_lengths = element_value(layout, _EXTENDED_OFFSET_TABLE_LENGTHS)
    if eot and eot_lengths and len(eot) == len(eot_lengths) == 8 * n:
        offsets = struct.unpack(f"<{n}Q", eot)
        lengths = struct.unpack(f"<{n}Q", eot_lengths)
        return [(first_fragment + o, first_fragment + o + 8 + k) for o, k in zip(offsets, lengths)]
    if len(basic_offset_table) != 4 * n or n == 0:
        return None
    bot = struct.unpack(f"<{n}L", basic_offset_table)
    ends = [first_fragment + o for o in bot[1:]] + [object_size]
    return [(first_fragment + o, end) for o, end in zip(bot, ends)]


def fragment_values(raw: bytes | memoryview) -> bytes | memoryview:
    """A frame from the items that hold it: their values joined, up to a Sequence Delimitation Item or
    the end of `raw` (PS3.5 A.4: a frame is one or more fragments); a view of `raw` for one fragment."""
    raw = memoryview(raw)
    reader = _Reader(raw, True)  # type: ignore[arg-type]
    values, pos = [], 0
    while pos < len(raw):
        tag, _, length, value = reader.header(pos, False)
        if tag == _SEQUENCE_DELIMITER:
            break
        if tag != _ITEM or length == _UNDEFINED or value + length > len(raw):
            raise MalformedPixelData("the offset table does not point at whole fragments")
        values.append(raw[value:value + length])
        pos = value + length
    return values[0] if len(values) == 1 else b"".join(values)


def frames(layout: DataSetLayout, indices: list[int]) -> list[bytes | memoryview]:
    """Frames `indices` (0-based) as stored: compressed bitstreams, or native little endian bytes."""
    if layout.encapsulated:
        return encapsulated_frames(layout, indices)
    return [native_frame(layout, i) for i in indices]


# -- decoding (pydicom + pylibjpeg): call from a worker thread --------------------------------------

def can_decode(transfer_syntax_uid: str) -> bool:
    """Can pixel data in this syntax be decoded here (a pydicom decoder with an available plugin)?"""
    ts = UID(transfer_syntax_uid)
    if not ts.is_encapsulated:
        return ts.is_transfer_syntax
    from pydicom.pixels import get_decoder
    try:
        return get_decoder(ts).is_available
    except NotImplementedError:
        return False


def _read_part10(part10: bytes):  # type: ignore[no-untyped-def]
    import pydicom
    try:
        return pydicom.dcmread(BytesIO(part10), force=True)
    except Exception as exc:  # pydicom raises many kinds on malformed input
        raise MalformedPixelData(f"stored object cannot be read: {exc}") from exc


def decoded_frames(part10: bytes, indices: list[int]) -> list[bytes]:
    """Frames `indices` (0-based) decoded to native little endian bytes, color as RGB (PS3.18 8.7.3.3:
    application/octet-stream without a transfer-syntax parameter is Explicit VR Little Endian)."""
    from pydicom.pixels import pack_bits, pixel_array
    ds = _read_part10(part10)
    ts = ds.file_meta.TransferSyntaxUID
    if "PixelData" not in ds:
        raise NotProducible("the instance has no pixel data")
    if not can_decode(ts):
        raise NotProducible(f"pixel data in {ts} cannot be decoded here")
    total = int(ds.get("NumberOfFrames") or 1)
    out = []
    for index in indices:
        if not 0 <= index < total:
            raise FrameNotFound(f"frame {index + 1} does not exist: the instance has {total} frames")
        try:
            arr = pixel_array(ds, index=index)
        except Exception as exc:  # a decoder failing on the stored bitstream
            raise MalformedPixelData(f"frame {index + 1} cannot be decoded: {exc}") from exc
        if int(ds.BitsAllocated) == 1:
            out.append(pack_bits(arr))
        else:
            out.append(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
    return out


def _to_little_endian(ds) -> None:  # type: ignore[no-untyped-def]
    """Swap the words of every binary value of a data set read as big endian (PS3.5 7.3)."""
    bits = int(ds.get("BitsAllocated") or 0)
    for elem in ds.iterall():
        if elem.tag == PIXEL_DATA:
            if elem.VR == "OW" and bits > 8 and not elem.is_empty:
                elem.value = _swapped(elem.value, bits // 8)
        elif elem.VR in ("OW", "OL", "OF", "OD", "OV") and isinstance(elem.value, bytes):
            elem.value = _swapped(elem.value, _SWAP_WIDTH[elem.VR])
    ds.set_original_encoding(False, True, ds.original_character_set)


def transcode(part10: bytes, target_transfer_syntax_uid: str) -> bytes:
    """The PS3.10 file re-encoded in Explicit or Implicit VR Little Endian, pixel data decompressed
    (color to RGB); the SOP Instance UID is kept (lossless: PS3.5 8.2 identical pixel values)."""
    if target_transfer_syntax_uid not in (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN):
        raise NotProducible(f"cannot encode in {target_transfer_syntax_uid}")
    ds = _read_part10(part10)
    ts = ds.file_meta.TransferSyntaxUID
    if ts.is_encapsulated and "PixelData" in ds:
        if not can_decode(ts):
            raise NotProducible(f"pixel data in {ts} cannot be decoded here")
        try:
            ds.decompress(as_rgb=True, generate_instance_uid=False)
        except Exception as exc:  # a decoder failing on the stored bitstream
            raise MalformedPixelData(f"pixel data cannot be decoded: {exc}") from exc
    elif not ts.is_little_endian:
        _to_little_endian(ds)
    ds.file_meta.TransferSyntaxUID = UID(target_transfer_syntax_uid)
    out = BytesIO()
    implicit = target_transfer_syntax_uid == IMPLICIT_VR_LITTLE_ENDIAN
    try:
        ds.save_as(out, enforce_file_format=True, implicit_vr=implicit, little_endian=True)
    except Exception as exc:  # pydicom refusing to encode a value it read
        raise MalformedPixelData(f"cannot re-encode the instance: {exc}") from exc
    return out.getvalue()


def value_at_path(part10: bytes, path: tuple[int, ...]) -> bytes | None:
    """The binary value at `path` (sequence tag, item index, ..., tag; archive.instance.nested_bulk_path),
    little endian; None when the path names nothing binary."""
    ds = _read_part10(part10)
    little = ds.file_meta.TransferSyntaxUID.is_little_endian
    current = ds
    for n in range(0, len(path) - 1, 2):
        seq = current.get(path[n])
        if seq is None or seq.VR != "SQ" or path[n + 1] >= len(seq.value):
            return None
        current = seq.value[path[n + 1]]
    elem = current.get(path[-1])
    if elem is None or not isinstance(elem.value, bytes):
        return None
    return elem.value if little else _swapped(elem.value, _SWAP_WIDTH.get(elem.VR, 0))


def nested_element_value(part10: bytes, tag: int) -> bytes | None:
    """The binary value of the first element `tag` inside a sequence item, little endian.

    Ingest before 2026-12 named bulk data inside sequences by their own tag (`bulk/XXXXXXXX`; now by
    its path, `value_at_path`), so such a reference that is not a top-level element is looked up depth first."""
    ds = _read_part10(part10)
    little = ds.file_meta.TransferSyntaxUID.is_little_endian
    for elem in ds.iterall():
        if elem.tag == tag and isinstance(elem.value, bytes):
            return elem.value if little else _swapped(elem.value, _SWAP_WIDTH.get(elem.VR, 0))
    return None
