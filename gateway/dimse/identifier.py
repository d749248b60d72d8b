"""C-FIND / C-MOVE / C-GET Identifiers to and from the shared query model (PS3.4 C.4). No I/O."""

from __future__ import annotations

import zlib
from io import BytesIO
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

from archive.attributes import Level
from archive.dataset_encoding import encode_json_dataset
from archive.query import Query, QueryKey
from gateway.dimse.negotiation import (PATIENT_ROOT_FIND, PATIENT_ROOT_GET, PATIENT_ROOT_MOVE)

PATIENT_ROOT_MODELS = frozenset({PATIENT_ROOT_FIND, PATIENT_ROOT_MOVE, PATIENT_ROOT_GET})
_SKIP_TAGS = {0x00080005, 0x00080052, 0x00080056}  # SpecificCharacterSet, QueryRetrieveLevel, InstanceAvailability


class IdentifierError(ValueError):
    """The Identifier cannot be used: PS3.4 C.4.1.1.4 answers 0xA900 or 0xC000."""

    def __init__(self, reason: str, status: int = 0xA900) -> None:
        super().__init__(reason)
        self.status = status


def decode_identifier(data: bytes, transfer_syntax_uid: str) -> Dataset:
    ts = UID(transfer_syntax_uid)
    try:
        buf = zlib.decompress(data, -zlib.MAX_WBITS) if ts.is_deflated else data
        ds = read_dataset(BytesIO(buf), ts.is_implicit_VR, ts.is_little_endian)
        for elem in ds.iterall():  # force decoding now, so a bad value fails here
            _ = elem.value
    except Exception as exc:  # pydicom raises many kinds on malformed input
        raise IdentifierError(f"identifier cannot be decoded: {exc}", 0xC000) from exc
    return ds


def _value(elem: DataElement) -> str | tuple[str, ...] | None:
    v = elem.value
    if v is None or v == "" or v == b"":
        return None
    if isinstance(v, MultiValue):
        return tuple(str(x) for x in v)
    if isinstance(v, bytes):
        return None
    return str(v)


def _key(elem: DataElement) -> QueryKey:
    if elem.VR == "SQ":
        items = None
        if len(elem.value):
            items = tuple(_key(sub) for sub in elem.value[0])
        return QueryKey(elem.tag, "SQ", None, items)
    return QueryKey(elem.tag, elem.VR, _value(elem))


def query_from_identifier(ds: Dataset, sop_class_uid: str) -> Query:
    """The Query for a Q/R Identifier; raises IdentifierError for a missing or unknown level."""
    level_text = str(ds.get("QueryRetrieveLevel", "")).strip().upper()
    try:
        level = Level(level_text)
    except ValueError as exc:
        raise IdentifierError(f"QueryRetrieveLevel {level_text!r} is not PATIENT, STUDY, SERIES or IMAGE") from exc
    top = Level.PATIENT if sop_class_uid in PATIENT_ROOT_MODELS else Level.STUDY
    if level.depth < top.depth:
        raise IdentifierError(f"level {level.value} does not exist in the Study Root model")
    keys = tuple(_key(elem) for elem in ds if elem.tag not in _SKIP_TAGS and elem.tag.group not in (0, 2))
    return Query(level=level, keys=keys, top=top)


def _non_ascii(obj: Any) -> bool:
    if isinstance(obj, str):
        return not obj.isascii()
    if isinstance(obj, dict):
        return any(_non_ascii(v) for v in obj.values())
    if isinstance(obj, list):
        return any(_non_ascii(v) for v in obj)
    return False


def _encode(data: dict[str, Any], transfer_syntax_uid: str, text_encoding: str = "ascii") -> bytes:
    ts = UID(transfer_syntax_uid)
    return encode_json_dataset(data, implicit_vr=ts.is_implicit_VR, little_endian=ts.is_little_endian,
                               deflated=ts.is_deflated, text_encoding=text_encoding)


def encode_response(match: dict[str, Any], level: Level, transfer_syntax_uid: str,
                    request_charset: Any = None) -> bytes:
    """A C-FIND response Identifier from one match's DICOM JSON, in the context's transfer syntax.

    Names are stored decoded; a response holding non-ASCII text is sent as UTF-8 (ISO_IR 192,
    PS3.5 6.1.2.5.3); an all-ASCII one repeats the request's Specific Character Set.
    """
    data = dict(match)
    encoding = "ascii"
    if _non_ascii(match):
        data["00080005"] = {"vr": "CS", "Value": ["ISO_IR 192"]}
        encoding = "utf-8"
    elif request_charset:
        values = [request_charset] if isinstance(request_charset, str) else list(request_charset)
        data["00080005"] = {"vr": "CS", "Value": values}
    data["00080052"] = {"vr": "CS", "Value": [level.value]}
    return _encode(data, transfer_syntax_uid, encoding)


def encode_failed_list(sop_instance_uids: list[str], transfer_syntax_uid: str) -> bytes:
    """The Identifier of a final C-MOVE/C-GET response: Failed SOP Instance UID List (PS3.4 C.4.2.1.4)."""
    return _encode({"00080058": {"vr": "UI", "Value": list(sop_instance_uids)}}, transfer_syntax_uid)
