"""The DICOM JSON Model (PS3.18 Annex F) of a received data set, straight from its encoded bytes.

Every instance we ingest needs its metadata as DICOM JSON (QIDO-RS / WADO-RS metadata), without
bulk data. pydicom gets there through ``read_dataset`` + ``Dataset.to_json_dict``, building a
``DataElement`` (and value objects such as ``DSfloat``, ``PersonName``, ``UID``) per attribute:
~4 ms for a CT header. :func:`to_dicom_json` walks the PS3.5 Chapter 7 encoding with ``struct`` and
builds the JSON dicts directly, about an order of magnitude faster.

The output is pydicom 3.0's, exactly: ``to_json_dict(bulk_data_threshold, handler,
suppress_invalid_tags=True)`` of the data set that ``read_dataset(..., stop_when=lambda t, vr, l: t
>= 0x7FE00010)`` returns. That means pydicom's conventions, not only the standard's:

* an element that pydicom cannot convert under strict validation (``config.strict_reading()``,
  which ``suppress_invalid_tags`` switches on) is left out: an over-long SH/LO/ST/LT value, a DS/IS
  that is not a PS3.5 6.2 decimal/integer string, a UI that is not a PS3.5 9.1 UID, a binary number
  whose length is not a multiple of its size, text that does not decode in its character set, an
  unknown VR, a public tag missing from the dictionary in implicit VR. If the failure is inside a
  sequence item, the whole top-level sequence is left out (pydicom's item conversion re-raises);
* empty values have no "Value" key, except SQ which always has one (possibly ``[]``);
* multi-valued strings keep empty components as ``""``;
* binary values longer than ``(bulk_data_threshold // 4) * 3`` bytes become a BulkDataURI;
* ambiguous VRs are resolved like ``pydicom.filewriter.correct_ambiguous_vr_element`` does.

It follows pydicom's default configuration (``replace_un_with_known_vr``, ``infer_sq_for_un_vr``,
``assume_implicit_vr_switch`` on; ``datetime_conversion``, ``use_DS_decimal``, numpy values off)
whatever the process has set, since an archive should not depend on global switches.

Where it differs from pydicom, on purpose (none of it occurs in pydicom's or pydicom-data's test
files except where ``tests/test_dicom_json.py`` lists the file):

* structure is checked, not guessed: a length running past its container (a truncated file), a
  missing delimiter, an item tag that is not (FFFE,E000), 1 to 7 stray bytes at the end, nesting
  deeper than the interpreter's recursion limit raise :class:`~archive.errors.InvalidInstance`.
  pydicom reads such input leniently, or leaves a malformed defined length sequence out;
* an undefined length sequence decodes its text with the data set's (0008,0005), wherever that
  element is; pydicom uses the character set read so far (the same for data sets in tag order).

Pure function, no I/O.
"""

from __future__ import annotations

import codecs
import re
from binascii import b2a_base64
from collections.abc import Callable
from struct import Struct, error as StructError
from typing import Any

from pydicom._dicom_dict import DicomDictionary
from pydicom.charset import (
    CODES_TO_ENCODINGS,
    STAND_ALONE_ENCODINGS,
    default_encoding,
    handled_encodings,
    python_encoding,
)
from pydicom.datadict import dictionary_VR, private_dictionary_VR

from archive.errors import InvalidInstance

__all__ = ["to_dicom_json"]

# PS3.5 7.5: item, item delimitation, sequence delimitation tags
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQ_END = 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_CHARSET = 0x00080005
_PIXEL_REPRESENTATION = 0x00280103
_BITS_ALLOCATED = 0x00280100
_WAVEFORM_BITS_ALLOCATED = 0x003A021A
_LUT_DESCRIPTOR = 0x00283002
_LUT_DATA = 0x00283006

# PS3.5 Table 6.2-1
_STANDARD_VRS = (
    "AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN "
    "UR US UT UV"
).split()
_VR_OF_BYTES = {vr.encode("ascii"): vr for vr in _STANDARD_VRS}
# PS3.5 Table 7.1-1: explicit VRs with a 2-byte reserved field and a 4-byte length
_LONG_VRS = frozenset("OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())

# PS3.5 Table 6.2-1, grouped by how pydicom decodes the value (pydicom.values.converters)
(_K_STR, _K_DS, _K_IS, _K_UI, _K_AE, _K_UR, _K_TEXT, _K_LONG_TEXT, _K_PN, _K_NUM, _K_AT,
 _K_BIN, _K_SQ, _K_AMBIGUOUS, _K_US_SS_BYTES) = range(15)
_KIND = {
    "AS": _K_STR, "CS": _K_STR, "DA": _K_STR, "DT": _K_STR, "TM": _K_STR,
    "DS": _K_DS, "IS": _K_IS, "UI": _K_UI, "AE": _K_AE, "UR": _K_UR,
    "SH": _K_TEXT, "LO": _K_TEXT, "UC": _K_TEXT,
    "ST": _K_LONG_TEXT, "LT": _K_LONG_TEXT, "UT": _K_LONG_TEXT,
    "PN": _K_PN,
    "US": _K_NUM, "SS": _K_NUM, "UL": _K_NUM, "SL": _K_NUM, "UV": _K_NUM, "SV": _K_NUM,
    "FL": _K_NUM, "FD": _K_NUM,
    "AT": _K_AT,
    "OB": _K_BIN, "OD": _K_BIN, "OF": _K_BIN, "OL": _K_BIN, "OV": _K_BIN, "OW": _K_BIN,
    "UN": _K_BIN,
    "SQ": _K_SQ,
    "US or SS": _K_AMBIGUOUS, "OB or OW": _K_AMBIGUOUS, "US or OW": _K_AMBIGUOUS,
    "US or SS or OW": _K_AMBIGUOUS,
}
_NUM_FORMAT = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "UV": "Q", "SV": "q", "FL": "f",
               "FD": "d"}
_NUM_SIZE = {vr: Struct("<" + c).size for vr, c in _NUM_FORMAT.items()}
_NUM_ONE = {
    (little, vr): Struct(("<" if little else ">") + c)
    for little in (True, False) for vr, c in _NUM_FORMAT.items()
}

# PS3.5 Table 6.2-1 maximum lengths that pydicom enforces when reading strictly
# (pydicom.valuerep.MAX_VALUE_LEN, checked on the decoded value including its padding)
_MAX_LEN = {"SH": 16, "LO": 64, "ST": 1024, "LT": 10240, "UC": 0, "UT": 0}

# PS3.5 6.2 value formats, as pydicom.valuerep.VR_REGEXES ("$" also matches before a final "\n",
# which pydicom rejects separately)
_DS_RE = re.compile(r"^ *[+\-]?(\d+|\d+\.\d*|\.\d+)([eE][+\-]?\d+)? *$")
_IS_RE = re.compile(r"^ *[+\-]?\d+ *$")
_UI_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

# 'US or SS' attributes whose VR follows Pixel Representation (pydicom.filewriter, PS3.3 C.7.6.3)
_AMBIGUOUS_US_SS_TAGS = frozenset({
    0x00189810, 0x00221452, 0x00280104, 0x00280105, 0x00280106, 0x00280107, 0x00280108,
    0x00280109, 0x00280110, 0x00280111, 0x00280120, 0x00280121, 0x00281101, 0x00281102,
    0x00281103, 0x00283002, 0x00409211, 0x00409216, 0x00603004, 0x00603006,
})
# 'OB or OW' waveform attributes following Waveform Bits Allocated (PS3.3 C.10.9.1)
_AMBIGUOUS_OB_OW_TAGS = frozenset({0x54000110, 0x54000112, 0x5400100A, 0x54001010})
# (60xx,3000) Overlay Data: OW in implicit VR, OB or OW in explicit (PS3.5 8.1.2)
_OVERLAY_DATA_TAGS = frozenset((g << 16) | 0x3000 for g in range(0x6000, 0x601F, 2))
# LUT Descriptors (PS3.3 C.11.1.1.1): pydicom reads a negative first value of an explicit SS as
# its unsigned meaning (pydicom.hooks.raw_element_value)
_LUT_DESCRIPTOR_TAGS = frozenset({0x00281101, 0x00281102, 0x00281103, 0x00283002})

_ESC = b"\x1b"
_TEXT_DELIMITERS = frozenset({0x0D, 0x0A, 0x09, 0x0C})  # PS3.5 6.1.2.5.3: reset G0
_ESCAPE_FRAGMENTS = re.compile(b"(^[^\x1b]+|[\x1b][^\x1b]*)")


class _Drop(ValueError):
    """An element pydicom would leave out of the JSON (its strict conversion raises)."""


def _truncated(what: str, pos: int) -> InvalidInstance:
    return InvalidInstance(f"malformed data set: {what} at byte {pos}")


# ---------------------------------------------------------------------------------------------
# Dictionaries (PS3.6 and pydicom's private dictionary), memoized

_PUBLIC_VR: dict[int, str | None] = {tag: entry[0] for tag, entry in DicomDictionary.items()}
_PRIVATE_VR: dict[tuple[int, str], str] = {}
_KEYS: dict[int, str] = {}
_ENCODINGS: dict[tuple[str, ...], list[str]] = {}
_CACHE_LIMIT = 1 << 16  # bounds the memo tables against hostile input


def _public_vr(tag: int) -> str | None:
    """VR of a public tag in PS3.6 (repeating groups included), None if unknown or private."""
    try:
        return _PUBLIC_VR[tag]
    except KeyError:
        pass
    vr: str | None = None
    if not (tag >> 16) & 1:
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            vr = None
    if len(_PUBLIC_VR) < _CACHE_LIMIT:
        _PUBLIC_VR[tag] = vr
    return vr


def _private_vr(tag: int, creator: str) -> str:
    """VR of a private tag from pydicom's private dictionary, "UN" if unknown (PS3.5 6.2.2)."""
    key = (tag, creator)
    try:
        return _PRIVATE_VR[key]
    except KeyError:
        pass
    try:
        vr = private_dictionary_VR(tag, creator)
    except KeyError:
        vr = "UN"
    if len(_PRIVATE_VR) < _CACHE_LIMIT:
        _PRIVATE_VR[key] = vr
    return vr


def _key(tag: int) -> str:
    """The PS3.18 F.2.1 attribute key: eight uppercase hex digits."""
    try:
        return _KEYS[tag]
    except KeyError:
        key = f"{tag:08X}"
        if len(_KEYS) < _CACHE_LIMIT:
            _KEYS[tag] = key
        return key


# ---------------------------------------------------------------------------------------------
# Specific Character Set (PS3.3 C.12.1.1.2, PS3.5 6.1)

def _python_encoding(term: str) -> str:
    """Python codec for one defined term, fixing the usual misspellings like pydicom does."""
    try:
        return python_encoding[term]
    except KeyError:
        pass
    patched = None
    if re.match("^ISO[^_]IR", term) is not None:
        patched = "ISO_IR" + term[6:]
    elif re.match("^(?=ISO.2022.IR.)(?!ISO 2022 IR )", term) is not None:
        patched = "ISO 2022 IR " + term[12:]
    if patched:
        return python_encoding.get(patched, default_encoding)
    try:
        codecs.lookup(term)
    except (LookupError, ValueError):  # ValueError: NUL in the name
        return default_encoding
    return term


def _encodings(raw_value: bytes) -> list[str]:
    """Python codecs for a (0008,0005) value, as ``pydicom.charset.convert_encodings``.

    Unknown terms fall back to the default repertoire, like pydicom does when reading leniently
    (it reads (0008,0005) before strict conversion starts); stand-alone encodings (ISO_IR 192,
    GB18030, GBK) drop any code extensions (PS3.5 6.1.2.5.4 d).
    """
    terms = tuple(raw_value.decode("latin-1").rstrip(" \x00").split("\\"))
    try:
        return _ENCODINGS[terms]
    except KeyError:
        pass
    names = list(terms)
    if not names[0]:
        names[0] = "" if len(names) == 1 else "ISO_IR 6"
    result = [_python_encoding(name) for name in names]
    if len(names) > 1:
        if names[0] in STAND_ALONE_ENCODINGS:
            result = result[:1]
        else:
            for i in range(len(names) - 1, 0, -1):
                if names[i] in STAND_ALONE_ENCODINGS:
                    del result[i]
    if len(_ENCODINGS) < _CACHE_LIMIT:
        _ENCODINGS[terms] = result
    return result


def _decode(value: bytes, encodings: list[str]) -> str:
    """Decode a SH/LO/ST/LT/UT/UC/PN value (PS3.5 6.1.2.4, 6.1.2.5).

    Without escape sequences this is one codec call. With ISO 2022 code extensions it is a strict
    port of ``pydicom.charset.decode_bytes``: pydicom's version reads the global validation mode,
    and the strict mode it runs under inside ``to_json_dict`` raises where the lenient one would
    substitute replacement characters. Raising here leaves the element out, as pydicom does.
    """
    if _ESC not in value:
        return value.decode(encodings[0])
    parts = []
    for fragment in _ESCAPE_FRAGMENTS.findall(value):
        if not fragment.startswith(_ESC):
            parts.append(fragment.decode(encodings[0]))
            continue
        size = 4 if fragment.startswith((b"\x1b$(", b"\x1b$)")) else 3
        encoding = CODES_TO_ENCODINGS.get(fragment[:size], "")
        if encoding not in encodings and encoding != default_encoding:
            raise _Drop("unknown escape sequence")
        if encoding in handled_encodings:
            parts.append(fragment.decode(encoding))
            continue
        fragment = fragment[size:]
        # a control character resets to the first encoding (PS3.5 6.1.2.5.3)
        cut = next((i for i, c in enumerate(fragment) if c in _TEXT_DELIMITERS), None)
        if cut is None:
            parts.append(fragment.decode(encoding))
        else:
            parts.append(fragment[:cut].decode(encoding) + fragment[cut:].decode(encodings[0]))
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# Pass 1: structure (PS3.5 7.1 data elements, 7.5 nesting of data sets)
#
# A data set becomes {tag: (vr | None, value_offset, value_length, undefined_length, items)},
# the last occurrence of a duplicated tag winning (as in pydicom). `items` is the list of
# (implicit_vr, data set) of an undefined length sequence, parsed now because its end is only
# found by parsing it; defined length sequences are parsed when converted.

_Entry = tuple[str | None, int, int, bool, Any]


class _Syntax:
    """Struct codecs for one byte order."""

    __slots__ = ("little", "explicit", "implicit", "u32", "item_bytes", "seq_end_bytes")

    def __init__(self, little: bool) -> None:
        e = "<" if little else ">"
        self.little = little
        self.explicit = Struct(e + "HH2sH")
        self.implicit = Struct(e + "HHL")
        self.u32 = Struct(e + "L")
        self.item_bytes = Struct(e + "HH").pack(0xFFFE, 0xE000)
        self.seq_end_bytes = Struct(e + "HH").pack(0xFFFE, 0xE0DD)


_SYNTAX = {True: _Syntax(True), False: _Syntax(False)}


def _looks_implicit(data: bytes, pos: int, end: int) -> bool:
    """pydicom's heuristic: the first element's VR field is not two uppercase letters."""
    if pos + 6 > end:
        return False
    a, b = data[pos + 4], data[pos + 5]
    return not (0x40 < a < 0x5B and 0x40 < b < 0x5B)


def _scan(
    data: bytes, pos: int, end: int, implicit: bool, syn: _Syntax, *,
    delimited: bool, stop_at_pixel_data: bool,
) -> tuple[dict[int, _Entry], int]:
    """Parse element headers of one data set from `pos` up to `end` (or its Item Delimitation).

    Returns the entries and the position after the data set.
    """
    raw: dict[int, _Entry] = {}
    explicit_unpack = syn.explicit.unpack_from
    implicit_unpack = syn.implicit.unpack_from
    u32 = syn.u32.unpack_from
    vr_of = _VR_OF_BYTES
    long_vrs = _LONG_VRS
    while pos < end:
        if pos + 8 > end:
            raise _truncated("element header past the end", pos)
        if implicit:
            group, elem, length = implicit_unpack(data, pos)
            vr: str | None = None
            pos += 8
        else:
            group, elem, vr_bytes, length = explicit_unpack(data, pos)
            vr = vr_of.get(vr_bytes)
            if vr is not None:
                if vr in long_vrs:
                    if pos + 12 > end:
                        raise _truncated("element header past the end", pos)
                    length = u32(data, pos + 8)[0]
                    pos += 12
                else:
                    pos += 8
            elif not (b"AA" <= vr_bytes <= b"ZZ"):
                # PS3.5 6.2.2 / pydicom: a writer switched to implicit VR for this element
                group, elem, length = implicit_unpack(data, pos)
                pos += 8
            else:
                # an unknown VR with a 2-byte length; the element is dropped when converted
                vr = vr_bytes.decode("latin-1")
                pos += 8
        tag = (group << 16) | elem
        if tag == _ITEM_END:
            return raw, pos  # PS3.5 7.5.2; pydicom ends any data set here, so do we
        if stop_at_pixel_data and tag >= _PIXEL_DATA:
            return raw, pos - (12 if vr in long_vrs else 8)
        if length != 0xFFFFFFFF:
            if pos + length > end:
                raise _truncated(f"value of ({group:04X},{elem:04X}) runs past the end", pos)
            raw[tag] = (vr, pos, length, False, None)
            pos += length
            continue
        # undefined length (PS3.5 7.1.3): a sequence, or encapsulated/unknown data ending with a
        # Sequence Delimitation Item
        if vr == "UN":
            vr = "SQ"  # PS3.5 6.2.2: UN of undefined length is an implicit VR sequence
        elif vr is None:
            vr = _public_vr(tag)
            if vr is None:
                if pos + 4 > end:
                    raise _truncated("value past the end", pos)
                if data[pos:pos + 4] == syn.item_bytes:
                    vr = "SQ"
        if vr == "SQ":
            items, after = _scan_items(data, pos, None, end, implicit, syn)
            raw[tag] = ("SQ", pos, after - pos, True, items)
            pos = after
        else:
            value_length, after = _undefined_value(data, pos, end, syn)
            raw[tag] = (vr, pos, value_length, True, None)
            pos = after
    if delimited:
        raise _truncated("missing Item Delimitation Item", pos)
    return raw, pos


def _scan_items(
    data: bytes, pos: int, end: int | None, limit: int, implicit: bool, syn: _Syntax,
) -> tuple[list[tuple[bool, dict[int, _Entry]]], int]:
    """Parse the items of a sequence value (PS3.5 7.5.1).

    `end` is where a defined length value ends, None for undefined length; `limit` is the end
    of the enclosing value, which nothing inside may cross.
    """
    items = []
    unpack = syn.implicit.unpack_from
    while end is None or pos < end:
        if pos + 8 > limit:
            raise _truncated("sequence item past the end", pos)
        group, elem, length = unpack(data, pos)
        tag = (group << 16) | elem
        pos += 8
        if tag == _SEQ_END:
            break
        if tag != _ITEM:
            raise _truncated(f"({group:04X},{elem:04X}) where an item tag belongs", pos - 8)
        # items of an explicit VR data set may be implicit VR (PS3.5 6.2.2, UN sequences)
        item_implicit = implicit or _looks_implicit(data, pos, limit)
        if length == 0xFFFFFFFF:
            raw, pos = _scan(data, pos, limit, item_implicit, syn, delimited=True,
                             stop_at_pixel_data=False)
        else:
            if pos + length > limit:
                raise _truncated("sequence item runs past the end", pos)
            raw, _ = _scan(data, pos, pos + length, item_implicit, syn, delimited=False,
                           stop_at_pixel_data=False)
            pos += length
        items.append((item_implicit, raw))
    return items, pos


def _undefined_value(data: bytes, pos: int, n: int, syn: _Syntax) -> tuple[int, int]:
    """Length of an undefined length non-sequence value and the position after its delimiter.

    Encapsulated pixel data (PS3.5 A.4) is skipped item by item; anything else falls back to a
    search for the Sequence Delimitation Item before `n`, as pydicom does.
    """
    item_bytes = syn.item_bytes
    end_bytes = syn.seq_end_bytes
    u32 = syn.u32.unpack_from
    p = pos
    while p + 4 <= n:
        tag_bytes = data[p:p + 4]
        if tag_bytes == end_bytes:
            return p - pos, min(p + 8, n)
        if tag_bytes != item_bytes or p + 8 > n:
            break
        p += 8 + u32(data, p + 4)[0]
    found = data.find(end_bytes, pos, n)
    if found < 0:
        raise _truncated("missing Sequence Delimitation Item", pos)
    return found - pos, min(found + 8, n)


# ---------------------------------------------------------------------------------------------
# Pass 2: values (PS3.18 F.2)

class _Context:
    """What converting one data set needs besides its bytes."""

    __slots__ = ("data", "raw", "implicit", "syn", "little", "encodings", "inherited_pr",
                 "limit", "bulk_uri", "creators", "path", "nested_bulk_uri")

    def __init__(self, data: bytes, raw: dict[int, _Entry], implicit: bool, syn: _Syntax,
                 encodings: list[str], inherited_pr: int | None, limit: int,
                 bulk_uri: Callable[[int], str],
                 nested_bulk_uri: Callable[[tuple[int, ...]], str] | None = None,
                 path: tuple[int, ...] = ()) -> None:
        self.data = data
        self.raw = raw
        self.implicit = implicit
        self.syn = syn
        self.little = syn.little
        self.encodings = encodings
        self.inherited_pr = inherited_pr
        self.limit = limit
        self.bulk_uri = bulk_uri
        self.nested_bulk_uri = nested_bulk_uri
        self.path = path  # (sequence tag, item index, ...) of this item; () at the top level
        self.creators: dict[int, str] = {}


def _dataset(ctx: _Context, top: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    key = _key
    element = _element
    if top:
        for tag, entry in ctx.raw.items():
            try:
                out[key(tag)] = element(ctx, tag, entry)
            except (ValueError, LookupError):  # _Drop, or a codec/number pydicom rejects too
                continue
    else:
        for tag, entry in ctx.raw.items():
            out[key(tag)] = element(ctx, tag, entry)
    return out


def _resolve_vr(ctx: _Context, tag: int, vr: str | None, length: int) -> str:
    """The VR pydicom converts with (pydicom.hooks.raw_element_vr, PS3.5 6.2.2, 7.8.1)."""
    if vr is None:
        vr = _public_vr(tag)
        if vr is not None:
            return vr
        if (tag >> 16) & 1:
            return _private_element_vr(ctx, tag)
        if tag & 0xFFFF == 0:
            return "UL"  # group length, implied before DICOM 3.0
        raise _Drop("public tag not in the dictionary")
    if vr == "UN":
        if (tag >> 16) & 1:
            return _private_element_vr(ctx, tag)
        if length < 0xFFFF:
            return _public_vr(tag) or "UN"
    return vr


def _private_element_vr(ctx: _Context, tag: int) -> str:
    elem = tag & 0xFFFF
    if 0x0010 <= elem < 0x0100:
        return "LO"  # private creator (PS3.5 7.8.1)
    if elem & 0xFF00:
        creator = _creator(ctx, (tag & 0xFFFF0000) | (elem >> 8))
        if creator:
            return _private_vr(tag, creator)
    return "UN"


def _creator(ctx: _Context, creator_tag: int) -> str:
    """The private creator value of a block (PS3.5 7.8.1), "" if absent or not one string.

    Raises like pydicom when the creator element itself cannot be converted.
    """
    try:
        value = ctx.creators[creator_tag]
    except KeyError:
        value = ""
        entry = ctx.raw.get(creator_tag)
        if entry is not None:
            try:
                converted = _element(ctx, creator_tag, entry).get("Value")
            except (ValueError, LookupError):
                converted = None
                value = None
            if converted and len(converted) == 1 and isinstance(converted[0], str):
                value = converted[0]
        ctx.creators[creator_tag] = value
    if value is None:
        raise _Drop("unconvertible private creator")
    return value


def _element(ctx: _Context, tag: int, entry: _Entry) -> dict[str, Any]:
    vr, start, length, undefined, items = entry
    if (tag >> 16) & 1 and items is None:
        # pydicom (Dataset.__setitem__) converts the block's creator along with any private
        # element it converts lazily, and fails with it
        creator_tag = (tag & 0xFFFF0000) | ((tag & 0xFFFF) >> 8)
        if creator_tag != tag and creator_tag in ctx.raw:
            _creator(ctx, creator_tag)
    vr = _resolve_vr(ctx, tag, vr, length)
    kind = _KIND.get(vr)
    ambiguous = kind == _K_AMBIGUOUS
    if ambiguous:
        vr = _disambiguate(ctx, tag, vr, undefined)
        kind = _KIND[vr]
        if kind == _K_AMBIGUOUS:
            kind = _K_US_SS_BYTES if vr == "US or SS" else _K_BIN
    if kind is None:
        raise _Drop(f"unknown VR {vr!r}")
    if kind == _K_SQ:
        return {"vr": "SQ", "Value": _sequence(ctx, tag, start, length, items)}
    if length == 0:
        return {"vr": vr}
    data = ctx.data
    if kind == _K_STR:
        text = data[start:start + length].decode("latin-1").rstrip(" \x00")
        if not text:
            return {"vr": vr}
        return {"vr": vr, "Value": text.split("\\")}
    if kind == _K_DS:
        return _ds(vr, data[start:start + length].decode("latin-1"))
    if kind == _K_IS:
        return _is(vr, data[start:start + length].decode("latin-1"))
    if kind == _K_UI:
        return _ui(vr, data[start:start + length].decode("latin-1"))
    if kind == _K_TEXT:
        values = _decode(data[start:start + length], ctx.encodings).split("\\")
        limit = _MAX_LEN[vr]
        if limit:
            for v in values:
                if len(v) > limit:
                    raise _Drop(f"{vr} value longer than {limit}")
        if len(values) == 1:
            text = values[0].rstrip("\x00 ")
            return {"vr": vr, "Value": [text]} if text else {"vr": vr}
        return {"vr": vr, "Value": [v.rstrip("\x00 ") for v in values]}
    if kind == _K_NUM:
        out = _numbers(ctx, vr, start, length)
        if tag in _LUT_DESCRIPTOR_TAGS:
            values = out["Value"]
            if len(values) > 1 and values[0] < 0:
                if ambiguous:
                    # pydicom validates the first descriptor value as US after resolving SS
                    raise _Drop("negative first LUT Descriptor value")
                values[0] += 65536
        return out
    if kind == _K_BIN:
        if length > ctx.limit:
            if ctx.path and ctx.nested_bulk_uri is not None:
                return {"vr": vr, "BulkDataURI": ctx.nested_bulk_uri((*ctx.path, tag))}
            return {"vr": vr, "BulkDataURI": ctx.bulk_uri(tag)}
        encoded = b2a_base64(data[start:start + length], newline=False).decode("ascii")
        return {"vr": vr, "InlineBinary": encoded}
    if kind == _K_PN:
        return _pn(data[start:start + length], ctx.encodings)
    if kind == _K_LONG_TEXT:
        text = _decode(data[start:start + length], ctx.encodings)
        limit = _MAX_LEN[vr]
        if limit and len(text) > limit:
            raise _Drop(f"{vr} value longer than {limit}")
        text = text.rstrip("\x00 ")
        return {"vr": vr, "Value": [text]} if text else {"vr": vr}
    if kind == _K_AE:
        values = [v.strip() for v in data[start:start + length].decode("latin-1").split("\\")]
        if len(values) == 1 and not values[0]:
            return {"vr": vr}
        return {"vr": vr, "Value": values}
    if kind == _K_UR:
        text = data[start:start + length].decode("latin-1").rstrip()
        return {"vr": vr, "Value": [text]} if text else {"vr": vr}
    if kind == _K_AT:
        return _at(ctx, start, length)
    # 'US or SS' not resolved by Pixel Representation: pydicom keeps the bytes and then calls
    # int() on them for the JSON number, which only works for ASCII digits
    try:
        return {"vr": vr, "Value": [int(data[start:start + length])]}
    except ValueError as exc:
        raise _Drop("undecodable 'US or SS' value") from exc


def _ds(vr: str, text: str) -> dict[str, Any]:
    """DS (PS3.5 6.2): numbers as JSON numbers; invalid or over-long strings drop the element."""
    values = text.strip().rstrip(" \x00").split("\\")
    if len(values) == 1 and not values[0]:
        return {"vr": vr}
    out = []
    for v in values:
        s = v.strip()
        if not s or len(s) > 16 or _DS_RE.match(s) is None:
            raise _Drop("invalid DS")
        out.append(float(v))
    return {"vr": vr, "Value": out}


def _is(vr: str, text: str) -> dict[str, Any]:
    """IS (PS3.5 6.2): 12 characters at most, a 32-bit signed integer."""
    values = text.rstrip(" \x00").split("\\")
    if len(values) == 1 and not values[0]:
        return {"vr": vr}
    out = []
    for v in values:
        if len(v) > 12 or _IS_RE.match(v) is None or v[-1] == "\n":
            raise _Drop("invalid IS")
        n = int(v)
        if not -(2**31) <= n < 2**31:
            raise _Drop("IS out of range")
        out.append(n)
    return {"vr": vr, "Value": out}


def _ui(vr: str, text: str) -> dict[str, Any]:
    """UI (PS3.5 9.1): each UID at most 64 characters of digits and dots."""
    values = text.rstrip("\x00 ").split("\\")
    if len(values) == 1 and not values[0]:
        return {"vr": vr}
    for v in values:
        if v and (len(v) > 64 or _UI_RE.match(v) is None or v[-1] == "\n"):
            raise _Drop("invalid UID")
    return {"vr": vr, "Value": values}


def _pn(value: bytes, encodings: list[str]) -> dict[str, Any]:
    """PN as PS3.18 F.2.2 component group objects (pydicom's PersonName rules)."""
    values = _decode(value.rstrip(b"\x00 "), encodings).split("\\")
    out = []
    for v in values:
        groups = v.split("=")
        if len(groups) > 3:
            raise _Drop("more than three PN component groups")
        for g in groups:
            if len(g) > 64:
                raise _Drop("PN component group longer than 64")
        while groups and not groups[-1]:
            groups.pop()
        if not groups:
            if len(values) == 1:
                return {"vr": "PN"}
            raise _Drop("empty PN value among several")  # pydicom: IndexError on components[0]
        name = {"Alphabetic": groups[0]}
        if len(groups) > 1:
            name["Ideographic"] = groups[1]
            if len(groups) > 2:
                name["Phonetic"] = groups[2]
        out.append(name)
    return {"vr": "PN", "Value": out}


def _numbers(ctx: _Context, vr: str, start: int, length: int) -> dict[str, Any]:
    size = _NUM_SIZE[vr]
    if length % size:
        raise _Drop(f"{vr} length {length} is not a multiple of {size}")
    if length == size:
        return {"vr": vr, "Value": [_NUM_ONE[ctx.little, vr].unpack_from(ctx.data, start)[0]]}
    fmt = f"{'<' if ctx.little else '>'}{length // size}{_NUM_FORMAT[vr]}"
    return {"vr": vr, "Value": list(Struct(fmt).unpack_from(ctx.data, start))}


def _at(ctx: _Context, start: int, length: int) -> dict[str, Any]:
    """AT as eight hex digits (PS3.18 F.2.3); a trailing partial tag is ignored like pydicom."""
    count = 1 if length == 4 else length // 4
    if not count:
        return {"vr": "AT"}
    if count == 1 and length != 4:
        # pydicom holds a one-tag list here and fails to format it as a tag
        raise _Drop("AT value with a partial second tag")
    fmt = f"{'<' if ctx.little else '>'}{2 * count}H"
    words = Struct(fmt).unpack_from(ctx.data, start)
    return {"vr": "AT", "Value": [f"{words[i]:04X}{words[i + 1]:04X}"
                                   for i in range(0, 2 * count, 2)]}


def _sequence(ctx: _Context, tag: int, start: int, length: int,
              items: list[tuple[bool, dict[int, _Entry]]] | None) -> list[dict[str, Any]]:
    # pydicom hands Pixel Representation down only through the sequences it parses lazily, not
    # through undefined length ones parsed while reading (Dataset._set_pixel_representation)
    if items is None:
        items, _ = _scan_items(ctx.data, start, start + length, start + length, ctx.implicit,
                               ctx.syn)
        inherited = _effective_pr(ctx)
    else:
        inherited = None
    out = []
    for index, (item_implicit, raw) in enumerate(items):
        charset = raw.get(_CHARSET)
        if charset is None:
            encodings = ctx.encodings
        else:
            encodings = _encodings(ctx.data[charset[1]:charset[1] + charset[2]])
        item = _Context(ctx.data, raw, item_implicit, ctx.syn, encodings, inherited, ctx.limit,
                        ctx.bulk_uri, ctx.nested_bulk_uri, (*ctx.path, tag, index))
        out.append(_dataset(item, top=False))
    return out


# ---------------------------------------------------------------------------------------------
# Ambiguous VRs (PS3.6 'US or SS', 'OB or OW', 'US or OW'), as correct_ambiguous_vr_element

def _own_value(ctx: _Context, tag: int) -> tuple[bool, Any]:
    """(present, value) of an attribute of this data set, the value as pydicom holds it."""
    entry = ctx.raw.get(tag)
    if entry is None:
        return False, None
    values = _element(ctx, tag, entry).get("Value")
    if not values:
        return True, None
    return True, values[0] if len(values) == 1 else values


def _effective_pr(ctx: _Context) -> int | None:
    present, value = _own_value(ctx, _PIXEL_REPRESENTATION)
    if value is not None:
        return value
    return ctx.inherited_pr


def _disambiguate(ctx: _Context, tag: int, vr: str, undefined: bool) -> str:
    """The VR pydicom settles on; the ambiguous VR itself where pydicom leaves it."""
    if vr == "US or SS":
        if tag not in _AMBIGUOUS_US_SS_TAGS:
            return vr
        present, pr = _own_value(ctx, _PIXEL_REPRESENTATION)
        if pr is None:
            pr = ctx.inherited_pr
        if pr is None:
            if not present and _PIXEL_DATA not in ctx.raw:
                pr = 0
            elif not present:
                raise _Drop("no Pixel Representation to resolve 'US or SS'")
            else:
                pr = 1
        return ("US" if pr == 0 else "SS")
    if vr == "OB or OW":
        if tag == _PIXEL_DATA:
            if undefined:
                return "OB"
            if ctx.implicit:
                return "OW"
            return ("OW" if _attribute_over_8(ctx, _BITS_ALLOCATED) else "OB")
        if tag in _AMBIGUOUS_OB_OW_TAGS:
            if ctx.implicit:
                return "OW"
            return ("OW" if _attribute_over_8(ctx, _WAVEFORM_BITS_ALLOCATED) else "OB")
        if tag in _OVERLAY_DATA_TAGS:
            return "OW"
        return vr
    if vr == "US or OW" and tag == _LUT_DATA:
        # PS3.3 C.11.1.1.1: one LUT entry means US
        try:
            present, descriptor = _own_value(ctx, _LUT_DESCRIPTOR)
        except (ValueError, LookupError):
            entry = ctx.raw[_LUT_DESCRIPTOR]
            if _resolve_vr(ctx, _LUT_DESCRIPTOR, entry[0], entry[2]) != "US or SS":
                raise
            # pydicom keeps the raw bytes of a descriptor whose VR it failed to resolve, and
            # then reads their first byte as the number of entries
            present, descriptor = True, ctx.data[entry[1]:entry[1] + entry[2]]
        if not present or not isinstance(descriptor, (list, bytes)):
            raise _Drop("no LUT Descriptor to resolve 'US or OW'")
        return "US" if descriptor[0] == 1 else "OW"
    return vr


def _attribute_over_8(ctx: _Context, tag: int) -> bool:
    present, value = _own_value(ctx, tag)
    if not isinstance(value, int):
        raise _Drop("no bits allocated to resolve 'OB or OW'")
    return value > 8


# ---------------------------------------------------------------------------------------------

def to_dicom_json(
    buf: bytes | memoryview,
    *,
    implicit_vr: bool,
    little_endian: bool,
    bulk_data_threshold: int = 1024,
    bulk_uri: Callable[[int], str] = lambda tag: f"bulk/{tag:08X}",
    stop_at_pixel_data: bool = True,
    nested_bulk_uri: Callable[[tuple[int, ...]], str] | None = None,
    start: int = 0,
) -> dict[str, Any]:
    """Return the DICOM JSON Model (PS3.18 F.2) of an encoded data set, without bulk data.

    `buf` is the data set as transferred (PS3.5 7, after the PS3.10 File Meta Information and
    already inflated for the Deflated transfer syntax; anything but ``bytes`` is copied once), from
    offset `start` (a whole PS3.10 file can be given, with `start` after its File Meta Information);
    `implicit_vr` and `little_endian` come from its transfer syntax, though like pydicom the VR
    field of the first element has the last word on implicit vs explicit VR. Binary values
    longer than ``(bulk_data_threshold // 4) * 3`` bytes (so that their base64 stays under the
    threshold) are replaced by ``{"BulkDataURI": bulk_uri(tag)}``; inside a sequence item, by
    ``nested_bulk_uri(path)`` when given, `path` being (sequence tag, item index, ..., tag) from the
    top level (pydicom's handler sees only the element, hence `bulk_uri(tag)` without it). With `stop_at_pixel_data`,
    parsing ends at the first top-level element whose tag is (7FE0,0010) or greater; without it,
    encapsulated pixel data (PS3.5 A.4) is skipped item by item.

    The result equals pydicom 3.0's ``Dataset.to_json_dict(bulk_data_threshold, handler,
    suppress_invalid_tags=True)`` for the same bytes (see the module docstring for what that
    implies); it is built in a fraction of the time.

    Raises :class:`~archive.errors.InvalidInstance` when the encoding is malformed: a length
    running past its container, a missing delimiter, a bad item tag.

    Example::

        meta = to_dicom_json(body, implicit_vr=False, little_endian=True,
                             bulk_uri=lambda tag: f"{base}/bulk/{tag:08X}")
        meta["00100010"]  # {"vr": "PN", "Value": [{"Alphabetic": "CITIZEN^Jan"}]}
    """
    data = buf if type(buf) is bytes else bytes(buf)
    syn = _SYNTAX[bool(little_endian)]
    implicit = bool(implicit_vr)
    end = len(data)
    # pydicom trusts the first element over the transfer syntax (filereader._is_implicit_vr)
    if end - start >= 6:
        implicit = _looks_implicit(data, start, end)
    try:
        raw, _ = _scan(data, start, end, implicit, syn, delimited=False,
                       stop_at_pixel_data=stop_at_pixel_data)
        charset = raw.get(_CHARSET)
        encodings = (
            [default_encoding] if charset is None
            else _encodings(data[charset[1]:charset[1] + charset[2]])
        )
        ctx = _Context(data, raw, implicit, syn, encodings, None,
                       (bulk_data_threshold // 4) * 3, bulk_uri, nested_bulk_uri)
        return _dataset(ctx, top=True)
    except StructError as exc:  # a bound check missed: still malformed input, not a bug
        raise InvalidInstance(f"malformed data set: {exc}") from exc
    except RecursionError as exc:
        raise InvalidInstance("malformed data set: sequences nested too deeply") from exc
