"""Reading one received instance: parse what the index needs, validate, build the PS3.10 file.

Pure functions, no I/O: the received bytes are kept as they are (never re-encoded); pydicom reads
them lazily to extract the attributes the index stores.
"""

from __future__ import annotations

import functools
import re
import struct
import zlib
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import UID

from archive.attributes import INDEXED_KEYS, LEVEL_TAGS, Level, Match
from archive.dicom_json import to_dicom_json
from archive.errors import InvalidInstance

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1464.1"  # vna's, under the pydicom-registered root
IMPLEMENTATION_VERSION_NAME = "VNA_010"
BULK_DATA_THRESHOLD = 1024

# PS3.5 9.1: digits and dots, at most 64 characters, no empty component, no leading zero
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

# PS3.4 B.2.3 C-STORE failure statuses
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000


def is_valid_uid(value: str) -> bool:
    return 0 < len(value) <= 64 and _UID_RE.match(value) is not None


@dataclass(frozen=True, slots=True)
class ParsedInstance:
    """What the index needs to know about one instance."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    columns: dict[str, Any]                 # indexed column name -> normalised value
    level_attrs: dict[Level, dict[str, Any]]  # DICOM JSON per level
    metadata: dict[str, Any]                # DICOM JSON of the whole data set, bulk data as URIs


def normalise_date(value: str | None) -> str | None:
    """DA to YYYYMMDD; also accepts the ACR-NEMA form YYYY.MM.DD still sent by old modalities."""
    if not value:
        return None
    v = value.strip().replace(".", "")
    return v if len(v) == 8 and v.isdigit() else None


def normalise_time(value: str | None, *, upper: bool = False) -> str | None:
    """TM to HHMMSS.FFFFFF (PS3.5 6.2); missing components are zero, or the maximum for a range's upper
    bound (so '1500' as an upper bound covers 15:00:00 to 15:00:59.999999)."""
    if not value:
        return None
    whole, _, frac = value.strip().replace(":", "").partition(".")
    if not whole.isdigit() or len(whole) not in (2, 4, 6) or (frac and not frac.isdigit()):
        return None
    whole += ("595959" if upper else "000000")[len(whole):]
    frac = (frac + ("9" if upper else "0") * 6)[:6]
    return f"{whole}.{frac}"


def normalise_datetime(value: str | None, *, upper: bool = False) -> str | None:
    """DT to YYYYMMDDHHMMSS.FFFFFF (offset ignored); partial values padded like times."""
    if not value:
        return None
    v = value.strip()
    for sign in "+-":
        if sign in v[4:]:
            v = v[: 4 + v[4:].index(sign)]
    whole, _, frac = v.partition(".")
    if not whole.isdigit() or len(whole) not in (4, 6, 8, 10, 12, 14):
        return None
    full = whole + ("1231235959"[len(whole) - 4:] if upper else "0101000000"[len(whole) - 4:])
    if upper and len(whole) == 6:  # month given: last day varies, 31 still sorts after every day
        full = whole + "31235959"
    if frac:
        frac = (frac + ("9" if upper else "0") * 6)[:6]
    else:
        frac = "999999" if upper else "000000"
    return f"{full}.{frac}"


def normalise_pn(value: Any) -> str | None:
    """The alphabetic group of a PN, lower-cased with trailing empty components removed."""
    if value is None:
        return None
    text = value.get("Alphabetic", "") if isinstance(value, dict) else str(value).split("=")[0]
    return text.rstrip("^ ").lower() or None


def _first(attrs: dict[str, Any], tag_hex: str) -> Any:
    elem = attrs.get(tag_hex)
    if not elem:
        return None
    values = elem.get("Value")
    return values[0] if values else None


def _column_value(kind: Match, raw: Any) -> Any:
    if raw is None:
        return None
    if kind is Match.PN:
        return normalise_pn(raw)
    if kind is Match.DATE:
        return normalise_date(str(raw))
    if kind is Match.TIME:
        return normalise_time(str(raw))
    if kind is Match.DATETIME:
        return normalise_datetime(str(raw))
    if kind is Match.NUMBER:
        try:
            return int(raw)
        except (TypeError, ValueError):
            return None
    return str(raw).strip()


def _transfer_syntax(transfer_syntax_uid: str) -> UID:
    ts = UID(transfer_syntax_uid)
    if not ts.is_transfer_syntax:
        raise InvalidInstance(f"unknown transfer syntax {transfer_syntax_uid}", status=STATUS_CANNOT_UNDERSTAND)
    return ts


def inflate(data: bytes, ts: UID) -> bytes:
    """The data set with Deflate (PS3.5 A.5) undone; other syntaxes unchanged."""
    if not ts.is_deflated:
        return data
    try:
        return zlib.decompress(data, -zlib.MAX_WBITS)
    except zlib.error as exc:
        raise InvalidInstance(f"deflated data set does not inflate: {exc}") from exc


_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"))
_ITEM, _ITEM_DELIMITER, _SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class PixelDataElement:
    """Where the top-level (7FE0,0010) sits in the data set: its VR and the offset of its value."""

    vr: str
    value_offset: int
    length: int | None  # None: undefined length (encapsulated, PS3.5 A.4)


def _is_sequence(tag: int) -> bool:
    """Implicit VR: is this a sequence by the data dictionary?"""
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        return False


@dataclass(frozen=True, slots=True)
class Structure:
    """What the walk learnt: the encoding actually used and where the pixel data is."""

    implicit_vr: bool
    pixel_data: PixelDataElement | None


class _Walker:
    """Checks every element header and item of a data set (PS3.5 7.1, 7.5) without decoding values.

    pydicom reads values lazily, so a data set cut off inside its pixel data would otherwise parse.
    """

    def __init__(self, data: bytes, ts: UID) -> None:
        self.data = data
        self.explicit = not ts.is_implicit_VR
        self.endian = "<" if ts.is_little_endian else ">"
        self.pixel_data: PixelDataElement | None = None

    def _header(self, pos: int, end: int, explicit: bool) -> tuple[int, bytes | None, int, int]:
        """(tag, VR, value length, value offset) of the element at pos."""
        if end - pos < 8:
            raise InvalidInstance("data set ends inside an element header")
        group, elem = struct.unpack_from(self.endian + "HH", self.data, pos)
        tag = group << 16 | elem
        if explicit and group != 0xFFFE:
            vr = self.data[pos + 4:pos + 6]
            if vr in _LONG_VRS:
                if end - pos < 12:
                    raise InvalidInstance("data set ends inside an element header")
                return tag, vr, struct.unpack_from(self.endian + "L", self.data, pos + 8)[0], pos + 12
            return tag, vr, struct.unpack_from(self.endian + "H", self.data, pos + 6)[0], pos + 8
        return tag, None, struct.unpack_from(self.endian + "L", self.data, pos + 4)[0], pos + 8

    def elements(self, pos: int, end: int, *, explicit: bool, top: bool = False, until_item_end: bool = False) -> int:
        if top and explicit and end - pos >= 6 and not self.data[pos + 4:pos + 6].isalpha():
            # an "explicit VR" data set actually written in implicit VR: read it as pydicom does
            explicit = self.explicit = False
        while pos < end:
            tag, vr, length, value = self._header(pos, end, explicit)
            if tag == _ITEM_DELIMITER and until_item_end:
                return value
            if top and tag == 0x7FE00010:
                vr_text = vr.decode("ascii", "replace") if vr else ("OB" if length == _UNDEFINED else "OW")
                self.pixel_data = PixelDataElement(vr_text, value, None if length == _UNDEFINED else length)
            if length == _UNDEFINED:
                # PS3.5 6.2.2: a UN sequence of undefined length is encoded in Implicit VR inside
                pos = self.items(value, end, explicit=explicit and vr != b"UN", undefined=True)
                continue
            if value + length > end:
                raise InvalidInstance(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) claims {length} bytes, "
                                      f"only {end - value} remain: the data set is truncated")
            if vr == b"SQ" or (vr is None and length and _is_sequence(tag)):
                self.items(value, value + length, explicit=explicit)
            pos = value + length
        if until_item_end:
            raise InvalidInstance("an item of undefined length has no Item Delimitation Item")
        return pos

    def items(self, pos: int, end: int, *, explicit: bool, undefined: bool = False) -> int:
        """Walk the items of a sequence (or pixel data fragments) from pos; return the offset after it."""
        while pos < end:
            if end - pos < 8:
                raise InvalidInstance("data set ends inside an item header")
            tag = struct.unpack_from(self.endian + "HH", self.data, pos)
            tag_value = tag[0] << 16 | tag[1]
            (length,) = struct.unpack_from(self.endian + "L", self.data, pos + 4)
            pos += 8
            if tag_value == _SEQUENCE_DELIMITER:
                return pos
            if tag_value != _ITEM:
                raise InvalidInstance(f"expected an item in a sequence, found ({tag[0]:04X},{tag[1]:04X})")
            if length == _UNDEFINED:
                pos = self.elements(pos, len(self.data), explicit=explicit, until_item_end=True)
            else:
                if pos + length > end:
                    raise InvalidInstance("an item runs past the end of its sequence: the data set is truncated")
                pos += length
        if undefined:
            raise InvalidInstance("a sequence of undefined length has no Sequence Delimitation Item")
        return pos


def check_structure(data: bytes, ts: UID, start: int = 0) -> Structure:
    """Prove the data set (from offset `start`) is complete and well nested; say how it is encoded and where
    its pixel data is."""
    walker = _Walker(data, ts)
    walker.elements(start, len(data), explicit=walker.explicit, top=True)
    return Structure(implicit_vr=not walker.explicit, pixel_data=walker.pixel_data)


def nested_bulk_path(path: tuple[int, ...]) -> str:
    """The relative BulkDataURI of a value inside a sequence item: `bulk/<sequence tag>/<item index>/.../<tag>`
    (tags in hex, items from 0), so that e.g. an Icon Image Sequence's Pixel Data is not confused with the
    instance's own `bulk/7FE00010` (PS3.18 F.2.6 leaves the URI's form to the origin server)."""
    return "bulk/" + "/".join(f"{p:08X}" if n % 2 == 0 else str(p) for n, p in enumerate(path))


def parse_bulk_path(text: str) -> tuple[int, ...] | None:
    """The path of `nested_bulk_path` (or a lone tag) from the part of a URI after `bulk/`; None if malformed."""
    pieces = text.split("/")
    if len(pieces) % 2 == 0:
        return None
    out = []
    for n, piece in enumerate(pieces):
        if n % 2 == 0:
            if len(piece) != 8 or not all(c in "0123456789abcdefABCDEF" for c in piece):
                return None
            out.append(int(piece, 16))
        else:
            if not piece.isdigit() or len(piece) > 6:
                return None
            out.append(int(piece))
    return tuple(out)


_COLUMNS = tuple((k.column, k.match, k.hex) for k in INDEXED_KEYS)


@functools.lru_cache(maxsize=8192)
def _levels_of(tag_hex: str) -> tuple[Level, ...]:
    """The levels whose attributes (the index's per-level JSON) include this top-level element."""
    tag = int(tag_hex, 16)
    levels = [lvl for lvl in (Level.STUDY, Level.SERIES, Level.IMAGE) if tag in LEVEL_TAGS[lvl]]
    if (tag >> 16 == 0x0010 and tag not in LEVEL_TAGS[Level.STUDY]) or tag == 0x00080005:
        levels.append(Level.PATIENT)
    return tuple(levels)


def parse_instance(data: bytes, transfer_syntax_uid: str, *, affected_sop_class_uid: str | None = None,
                   affected_sop_instance_uid: str | None = None, start: int = 0) -> ParsedInstance:
    """Validate one data set (from offset `start` of `data`: a PS3.10 file is parsed where it lies, not
    copied) and extract its index attributes (PS3.4 B.2.3 statuses on refusal)."""
    ts = _transfer_syntax(transfer_syntax_uid)
    if ts.is_deflated:
        buf, start = inflate(data[start:], ts), 0
    else:
        buf = data
    structure = check_structure(buf, ts, start)
    metadata = to_dicom_json(buf, implicit_vr=structure.implicit_vr, little_endian=ts.is_little_endian,
                             bulk_data_threshold=BULK_DATA_THRESHOLD, nested_bulk_uri=nested_bulk_path,
                             start=start)
    pixel_data = structure.pixel_data
    if pixel_data is not None:
        # PS3.18 F.2.6: pixel data is bulk data; WADO-RS metadata points at it
        metadata["7FE00010"] = {"vr": pixel_data.vr, "BulkDataURI": "bulk/7FE00010"}

    uids = {}
    for keyword, tag_hex in (("SOPClassUID", "00080016"), ("SOPInstanceUID", "00080018"),
                             ("StudyInstanceUID", "0020000D"), ("SeriesInstanceUID", "0020000E")):
        value = _first(metadata, tag_hex)
        value = str(value).strip("\0 ") if value is not None else ""
        if not value:
            # an invalid UI value is dropped by the JSON conversion, so "missing" includes "malformed"
            raise InvalidInstance(f"{keyword} is missing or not a valid UID",
                                  status=STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS,
                                  code="missing-attribute")
        if not is_valid_uid(value):
            raise InvalidInstance(f"{keyword} {value!r} is not a valid UID (PS3.5 9.1)",
                                  status=STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS, code="invalid-uid")
        uids[keyword] = value
    if affected_sop_class_uid and affected_sop_class_uid != uids["SOPClassUID"]:
        raise InvalidInstance(f"SOPClassUID {uids['SOPClassUID']} differs from the request's "
                              f"{affected_sop_class_uid}", status=STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS,
                              code="sop-class-mismatch")
    if affected_sop_instance_uid and affected_sop_instance_uid != uids["SOPInstanceUID"]:
        raise InvalidInstance(f"SOPInstanceUID {uids['SOPInstanceUID']} differs from the request's "
                              f"{affected_sop_instance_uid}", status=STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS,
                              code="sop-instance-mismatch")

    level_attrs: dict[Level, dict[str, Any]] = {lvl: {} for lvl in Level}
    for tag_hex, elem in metadata.items():
        for lvl in _levels_of(tag_hex):
            level_attrs[lvl][tag_hex] = elem

    columns = {column: _column_value(match, _first(metadata, tag_hex)) for column, match, tag_hex in _COLUMNS}
    columns["patient_id"] = columns["patient_id"] or ""
    columns["issuer_of_patient_id"] = columns["issuer_of_patient_id"] or ""
    return ParsedInstance(
        sop_class_uid=uids["SOPClassUID"], sop_instance_uid=uids["SOPInstanceUID"],
        study_instance_uid=uids["StudyInstanceUID"], series_instance_uid=uids["SeriesInstanceUID"],
        transfer_syntax_uid=transfer_syntax_uid, columns=columns, level_attrs=level_attrs, metadata=metadata)


def _meta_element(tag: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0" if vr == b"UI" else b" "
    if vr == b"OB":
        return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str,
              source_ae: str | None) -> bytes:
    """The 128-byte preamble, 'DICM' and the File Meta Information group (PS3.10 7.1)."""
    body = b"".join([
        _meta_element(0x00020001, b"OB", b"\x00\x01"),
        _meta_element(0x00020002, b"UI", sop_class_uid.encode()),
        _meta_element(0x00020003, b"UI", sop_instance_uid.encode()),
        _meta_element(0x00020010, b"UI", transfer_syntax_uid.encode()),
        _meta_element(0x00020012, b"UI", IMPLEMENTATION_CLASS_UID.encode()),
        _meta_element(0x00020013, b"SH", IMPLEMENTATION_VERSION_NAME.encode()),
        *([_meta_element(0x00020016, b"AE", source_ae.encode())] if source_ae else []),
    ])
    return b"\0" * 128 + b"DICM" + struct.pack("<HH2sHL", 0x0002, 0x0000, b"UL", 4, len(body)) + body


def split_part10(data: bytes) -> tuple[str, int]:
    """(transfer syntax, offset of the data set) of a PS3.10 file; InvalidInstance if it is not one."""
    found = _file_meta_explicit_le(data)
    return found if found is not None else _split_part10_pydicom(data)


def _file_meta_explicit_le(data: bytes) -> tuple[str, int] | None:
    """The common case read directly: preamble, 'DICM' and a group 0002 in Explicit VR Little Endian as
    PS3.10 7.1 requires; the data set starts at the first element of another group. None for anything
    else (a file without preamble, an implicit VR meta group, a truncated or odd one): pydicom's reader,
    which tolerates more and says what is wrong, decides those."""
    if len(data) < 132 or data[128:132] != b"DICM":
        return None
    pos, end, ts = 132, len(data), None
    while end - pos >= 8:
        group, element = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        vr = data[pos + 4:pos + 6]
        if not (vr.isalpha() and vr.isupper()):
            return None
        if vr in _LONG_VRS:
            if end - pos < 12:
                return None
            (length,) = struct.unpack_from("<L", data, pos + 8)
            value = pos + 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            value = pos + 8
        if length == _UNDEFINED or value + length > end:
            return None
        if element == 0x0010:
            ts = bytes(data[value:value + length]).decode("ascii", "replace").strip("\0 ")
        pos = value + length
    else:
        return None  # the file ends inside (or right after) its meta group: let pydicom judge it
    return (ts, pos) if ts else None


def _split_part10_pydicom(data: bytes) -> tuple[str, int]:
    fp = BytesIO(data)
    try:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
    except Exception as exc:  # pydicom's reader raises many kinds on non-DICOM input
        raise InvalidInstance(f"not a DICOM PS3.10 file: {exc}", code="not-dicom") from exc
    ts = str(meta.get("TransferSyntaxUID", "")).strip("\0 ")
    if not ts:
        raise InvalidInstance("the File Meta Information has no TransferSyntaxUID", code="not-dicom")
    return ts, fp.tell()
