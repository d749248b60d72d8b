"""``archive.dicom_json.to_dicom_json`` against pydicom's own DICOM JSON, on the whole test-data corpus.

The reference is what the module promises to equal: pydicom 3.0's
``read_dataset(BytesIO(body), implicit, little, stop_when=lambda t, vr, l: t >= 0x7FE00010)``
followed by ``to_json_dict(1024, handler, suppress_invalid_tags=True)``, where ``body`` is the data set
after the File Meta Information (inflated for Deflated Explicit VR Little Endian) and ``handler``
names the BulkDataURI after the tag like the default ``bulk_uri``. Results are compared as JSON text
with sorted keys, so 1 and 1.0 differ and NaN equals NaN.

Selection rule (`_corpus`): every regular file from ``pydicom.data.get_testdata_files()`` (pydicom's
test files and the PyPI package pydicom-data) that ``dcmread(f, stop_before_pixels=True)`` reads and
whose File Meta Information holds a Transfer Syntax UID. Files that fail this (text, JSON, ICC, gzip,
``*NoMeta.dcm``, ``no_meta.dcm``, ``rtstruct.dcm``, ``OT-PAL-8-face.dcm``, ``meta_missing_tsyntax.dcm``)
give no transfer syntax to decode them with.

Besides the files as they are, each data set is also compared re-encoded by pydicom in Implicit VR
Little Endian and Explicit VR Big Endian (dictionary and private-dictionary VR lookups, 'US or SS'
resolution, byte order), and read to the end instead of stopping at Pixel Data (encapsulated pixel
data skipped item by item, trailing padding).

Excluded files are listed in `EXCLUDED` with the reason; for each, the test checks the reason still
holds (``to_dicom_json`` raises ``InvalidInstance``) instead of skipping it.
"""

from __future__ import annotations

import json
import struct
import warnings
import zlib
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pydicom.data
import pytest
from pydicom._dicom_dict import DicomDictionary
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.filewriter import write_dataset
from pydicom.valuerep import STANDARD_VR

from archive.dicom_json import to_dicom_json
from archive.errors import InvalidInstance

# Truncated files: pydicom reads the short value it finds and carries on, to_dicom_json refuses a
# length that runs past the end of its container (an ingest must not index half an instance).
EXCLUDED = {
    "rtplan_truncated.dcm": "truncated inside Beam Sequence (300A,00B0): its value runs past the end",
    "DICOMDIR-nooffset": "truncated inside the last item of Directory Record Sequence (0004,1220)",
}
# Read to the end (no stop at Pixel Data), two more files are truncated in their pixel data.
EXCLUDED_FULL = EXCLUDED | {
    "MR_truncated.dcm": "Pixel Data (7FE0,0010) runs past the end of the file",
    "emri_small_jpeg_2k_lossless_too_short.dcm":
        "encapsulated Pixel Data (7FE0,0010) without its Sequence Delimitation Item",
}
DEFLATED = "1.2.840.10008.1.2.1.99"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"


def _stop_at_pixel_data(tag: int, vr: str | None, length: int) -> bool:
    return tag >= 0x7FE00010


def _handler(elem: Any) -> str:
    return f"bulk/{int(elem.tag):08X}"


def _quiet(fn: Callable[[], Any]) -> Any:
    """Run pydicom with its (many, expected) warnings about the test data silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def reference(body: bytes, implicit: bool, little: bool, *, stop: bool = True,
              threshold: int = 1024, handler: Callable[[Any], str] = _handler) -> dict:
    def run() -> dict:
        ds = read_dataset(BytesIO(body), implicit, little,
                          stop_when=_stop_at_pixel_data if stop else None)
        return ds.to_json_dict(threshold, handler, suppress_invalid_tags=True)
    return _quiet(run)


def _corpus() -> dict[str, Path]:
    files = {}
    roots = {Path(pydicom.data.__file__).parent: "pydicom"}
    try:
        import data_store  # pydicom-data
        roots[Path(data_store.__file__).parent] = "pydicom-data"
    except ImportError:
        pass
    for name in sorted(pydicom.data.get_testdata_files()):
        path = Path(name)
        if not path.is_file():
            continue
        try:
            ds = _quiet(lambda: pydicom.dcmread(path, stop_before_pixels=True))
        except Exception:  # noqa: BLE001 - "pydicom can read it" is the selection rule
            continue
        meta = getattr(ds, "file_meta", None)
        if not meta or "TransferSyntaxUID" not in meta:
            continue
        root = next(r for r in roots if r in path.parents)
        files[f"{roots[root]}/{path.relative_to(root)}"] = path
    return files


CORPUS = _corpus()


def load(path: Path) -> tuple[bytes, bool, bool]:
    """The data set bytes after the File Meta Information, and their VR encoding and byte order."""
    def run() -> tuple[Any, bytes]:
        with open(path, "rb") as fp:
            read_preamble(fp, True)
            meta = _read_file_meta_info(fp)
            return meta, fp.read()
    meta, body = _quiet(run)
    syntax = meta.TransferSyntaxUID
    if syntax == DEFLATED:
        body = zlib.decompress(body, -15)
    return body, syntax == IMPLICIT_LE, syntax != EXPLICIT_BE


def _text(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


def assert_same(mine: dict, ref: dict) -> None:
    if _text(mine) == _text(ref):
        return
    lines = []
    for key in sorted(set(mine) | set(ref)):
        a, b = mine.get(key), ref.get(key)
        if _text(a) != _text(b):
            lines.append(f"{key}: mine {_text(a)[:200]}\n{' ' * len(key)}  pydicom {_text(b)[:200]}")
    pytest.fail("differs from pydicom:\n" + "\n".join(lines[:20]))


def _excluded(name: str, table: dict[str, str]) -> str | None:
    return table.get(name.rsplit("/", 1)[-1])


def test_corpus_is_there() -> None:
    """The corpus is pydicom's and pydicom-data's, and every exclusion names a real file."""
    assert len(CORPUS) > 200
    assert any(name.startswith("pydicom-data/") for name in CORPUS)
    names = [n.rsplit("/", 1)[-1] for n in CORPUS]
    for excluded in EXCLUDED_FULL:
        assert names.count(excluded) == 1, excluded


@pytest.mark.parametrize("name", list(CORPUS))
def test_corpus_file(name: str) -> None:
    body, implicit, little = load(CORPUS[name])
    if _excluded(name, EXCLUDED):  # the reason must still hold
        with pytest.raises(InvalidInstance, match="past the end"):
            to_dicom_json(body, implicit_vr=implicit, little_endian=little)
        return
    assert_same(to_dicom_json(body, implicit_vr=implicit, little_endian=little),
                reference(body, implicit, little))


@pytest.mark.parametrize("name", list(CORPUS))
def test_corpus_file_to_the_end(name: str) -> None:
    """Without stopping at Pixel Data: encapsulated fragments, overlays, trailing padding."""
    body, implicit, little = load(CORPUS[name])
    if _excluded(name, EXCLUDED_FULL):  # the reason must still hold
        with pytest.raises(InvalidInstance, match="past the end|missing Sequence Delimitation"):
            to_dicom_json(body, implicit_vr=implicit, little_endian=little,
                          stop_at_pixel_data=False)
        return
    assert_same(to_dicom_json(body, implicit_vr=implicit, little_endian=little,
                              stop_at_pixel_data=False),
                reference(body, implicit, little, stop=False))


@pytest.mark.parametrize("implicit,little", [(True, True), (False, False)],
                         ids=["implicit-little", "explicit-big"])
@pytest.mark.parametrize("name", [n for n in CORPUS if not _excluded(n, EXCLUDED)])
def test_corpus_file_reencoded(name: str, implicit: bool, little: bool) -> None:
    """The same data set written by pydicom in another VR encoding / byte order (the truncated files,
    which pydicom cannot re-encode, are checked by the two tests above)."""
    source, source_implicit, source_little = load(CORPUS[name])

    def encode() -> bytes:
        ds = read_dataset(BytesIO(source), source_implicit, source_little,
                          stop_when=_stop_at_pixel_data)
        fp = DicomBytesIO()
        fp.is_implicit_VR = implicit
        fp.is_little_endian = little
        write_dataset(fp, ds)
        return fp.getvalue()

    body = _quiet(encode)
    assert_same(to_dicom_json(body, implicit_vr=implicit, little_endian=little),
                reference(body, implicit, little))


def test_bulk_data_threshold_and_uri() -> None:
    """A value becomes a BulkDataURI above (threshold // 4) * 3 bytes, named by `bulk_uri`."""
    for name in ("pydicom/test_files/CT_small.dcm", "pydicom/test_files/MR_small.dcm"):
        body, implicit, little = load(CORPUS[name])
        for threshold in (0, 8, 64, 1 << 20):
            mine = to_dicom_json(body, implicit_vr=implicit, little_endian=little,
                                 bulk_data_threshold=threshold,
                                 bulk_uri=lambda tag: f"/bulk/{tag:08x}", stop_at_pixel_data=False)
            ref = reference(body, implicit, little, stop=False, threshold=threshold,
                            handler=lambda elem: f"/bulk/{int(elem.tag):08x}")
            assert_same(mine, ref)
            assert ("BulkDataURI" in mine["7FE00010"]) == (threshold < 1 << 20)


def test_memoryview_input() -> None:
    body, implicit, little = load(CORPUS["pydicom/test_files/CT_small.dcm"])
    assert_same(to_dicom_json(memoryview(body), implicit_vr=implicit, little_endian=little),
                to_dicom_json(body, implicit_vr=implicit, little_endian=little))


# ---------------------------------------------------------------------------------------------
# Synthetic data sets: one element per VR with awkward values, in three encodings

_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}


def element(tag: int, vr: str | None, value: bytes, implicit: bool, little: bool,
            undefined: bool = False) -> bytes:
    """One encoded data element (PS3.5 7.1.2/7.1.3); `vr` None writes an implicit VR header."""
    e = "<" if little else ">"
    length = 0xFFFFFFFF if undefined else len(value)
    if implicit or vr is None:
        return struct.pack(e + "HHL", tag >> 16, tag & 0xFFFF, length) + value
    if vr in _LONG_VRS:
        return struct.pack(e + "HH2sHL", tag >> 16, tag & 0xFFFF, vr.encode(), 0, length) + value
    return struct.pack(e + "HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), length) + value


def item(content: bytes, little: bool, undefined: bool = False) -> bytes:
    e = "<" if little else ">"
    if undefined:
        return (struct.pack(e + "HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + content
                + struct.pack(e + "HHL", 0xFFFE, 0xE00D, 0))
    return struct.pack(e + "HHL", 0xFFFE, 0xE000, len(content)) + content


def sequence_end(little: bool) -> bytes:
    return struct.pack("<HHL" if little else ">HHL", 0xFFFE, 0xE0DD, 0)


ENCODINGS = [(False, True), (True, True), (False, False)]
ENCODING_IDS = ["explicit-little", "implicit-little", "explicit-big"]
# the first public, non-retired PS3.6 attribute of each VR (implicit VR finds the VR from it)
VR_TAGS = {}
for _tag, _entry in sorted(DicomDictionary.items()):
    if (_entry[0] in STANDARD_VR and _entry[0] != "SQ" and not _entry[3]
            and _tag >> 16 not in (0x0000, 0x0002, 0x0004) and _tag != 0x00080005):
        VR_TAGS.setdefault(_entry[0], _tag)
TEXT = [b"", b" ", b"\x00", b"A", b"A\\B", b"A\\", b"\\", b"A \x00", b" A", b"A\\ B ", b"X" * 16,
        b"X" * 17, b"X" * 64 + b" ", b"X" * 65, b"\xe9t\xe9", b"\xff\xfe", b"A\n",
        b"A\x1b$BF|K\\\x1b(B", b"\x1b-A\xe9", b"a=b", b"1\n"]
NUMBERS = [b"1.5", b" 1.5 ", b"1\\2", b"1\\", b"1\\\\2", b"abc", b"1e3", b"1E+03", b"nan", b"inf",
           b"12345678901234567", b".5", b"5.", b"+1", b"1 2", b"1,5", b"\x001", b"12", b" 12 ",
           b"1.0", b"2147483648", b"-2147483648", b"1234567890123", b"\t", b"1_0", b"0x10",
           b"\xb2"]
UIDS = [b"1.2.3\x00", b"1.2.03", b"1.2 ", b"1.2\\3.4", b"1.2\\", b"1." + b"2" * 62,
        b"1." + b"2" * 63, b"1..2", b"0.0", b"1.2\n"]
NAMES = [b"A^B", b"A^B=C=D", b"A=B=C=D", b"=B", b"A\\B", b"A\\", b"=", b"A\\=", b"X" * 65,
         b"A==" + b"X" * 65, b"A^B ", b"\xc3\xa9"]
BINARY = [b"", b"\x01", b"\x01\x02", b"\x01\x02\x03\x04", b"\x00" * 6, b"\x00" * 8, b"\xff" * 16,
          b"\x5c\x00", b"\x01" * 767, b"\x01" * 768, b"\x01" * 770]
CHARSETS = [None, b"ISO_IR 100", b"ISO_IR 192", b"\\ISO 2022 IR 87", b"ISO 2022 IR 100",
            b"ISO_IR 144", b"GB18030", b"BOGUS", b"ISO IR 100", b"ISO_IR 192\\ISO 2022 IR 87"]
CHARSET_VRS = {"LO", "LT", "PN", "SH", "ST", "UC", "UT"}


def _values(vr: str) -> list[bytes]:
    if vr in ("DS", "IS"):
        return NUMBERS + TEXT
    if vr == "UI":
        return UIDS + TEXT
    if vr == "PN":
        return NAMES + TEXT
    if vr in ("AT", "FD", "FL", "OB", "OD", "OF", "OL", "OV", "OW", "SL", "SS", "SV", "UL", "UN",
              "US", "UV"):
        return BINARY
    return TEXT


@pytest.mark.parametrize("implicit,little", ENCODINGS, ids=ENCODING_IDS)
@pytest.mark.parametrize("vr", sorted(VR_TAGS))
def test_awkward_values(vr: str, implicit: bool, little: bool) -> None:
    """Padding, empty and multiple values, over-long and invalid strings, character sets."""
    for value in _values(vr):
        for charset in CHARSETS if vr in CHARSET_VRS else [None]:
            body = b""
            if charset is not None:
                padded = charset + b" " * (len(charset) % 2)
                body += element(0x00080005, "CS", padded, implicit, little)
            body += element(VR_TAGS[vr], vr, value, implicit, little)
            mine = to_dicom_json(body, implicit_vr=implicit, little_endian=little)
            assert _text(mine) == _text(reference(body, implicit, little)), (value, charset)


def _structures(implicit: bool, little: bool) -> dict[str, bytes]:
    """Data sets exercising nesting, ambiguous VRs and private tags (pydicom's quirks included)."""
    def el(tag: int, vr: str | None, value: bytes, undefined: bool = False) -> bytes:
        return element(tag, vr, value, implicit, little, undefined)

    def sq(tag: int, items: list[bytes], undefined: bool = False, undefined_items: bool = False,
           vr: str = "SQ") -> bytes:
        content = b"".join(item(i, little, undefined_items) for i in items)
        if undefined:
            return el(tag, vr, content + sequence_end(little), undefined=True)
        return el(tag, vr, content)

    us = struct.Struct("<H" if little else ">H").pack
    ss = struct.Struct("<h" if little else ">h").pack
    smallest = el(0x00280106, "US", ss(-5))          # 'US or SS' Smallest Image Pixel Value
    pr0, pr1, pr_empty = (el(0x00280103, "US", us(0)), el(0x00280103, "US", us(1)),
                          el(0x00280103, "US", b""))
    lut_ss = el(0x00283002, "SS", ss(-1) + ss(-32768) + us(16))
    lut_one = el(0x00283002, "US", us(1) + us(0) + us(16))
    lut_data = el(0x00283006, "OW", us(7) * 4)
    pixels = el(0x7FE00010, "OW", b"\x00" * 8)
    bits = {n: el(0x00280100, "US", us(n)) for n in (8, 16)}
    siemens = el(0x00290010, "LO", b"SIEMENS CSA HEADER")
    return {
        "us-or-ss alone": smallest, "us-or-ss pr0": smallest + pr0, "us-or-ss pr1": smallest + pr1,
        "us-or-ss empty pr": smallest + pr_empty,
        "pr inherited, defined seq": pr1 + sq(0x00081140, [smallest]),
        "pr not inherited, undefined seq": pr1 + sq(0x00081140, [smallest], undefined=True),
        "pr inherited, undefined items": pr1 + sq(0x00081140, [smallest], undefined_items=True),
        "pr inherited twice": pr1 + sq(0x00081140, [sq(0x00081150, [smallest])]),
        "pr in item": sq(0x00081140, [pr1 + smallest]),
        "empty pr in item": sq(0x00081140, [smallest + pr_empty]),
        "pixels without pr in item": sq(0x00081140, [smallest + pixels]),
        "lut descriptor": lut_ss, "lut descriptor pr1": lut_ss + pr1,
        "lut data": lut_data, "lut data, descriptor": lut_ss + lut_data,
        "lut data, one entry": lut_one + lut_data, "lut data pr1": pr1 + lut_ss + lut_data,
        "icon 8 bits": sq(0x00880200, [bits[8] + pixels]),
        "icon 16 bits": sq(0x00880200, [bits[16] + pixels]),
        "icon no bits": sq(0x00880200, [pixels]),
        "overlay": el(0x60003000, "OW", b"\x01\x02"), "curve": el(0x50003000, "OW", b"\x01\x02"),
        "waveform": sq(0x54000100, [el(0x54001010, "OW", b"\x01\x02")]),
        "waveform bits": sq(0x54000100, [el(0x003A021A, "US", us(16))
                                         + el(0x54001010, "OW", b"\x01\x02")]),
        "gray lut data": el(0x00281200, "OW", b"\x01\x02"),
        "us-or-ss unresolved": el(0x00280071, "US", b"12") + el(0x00281111, "US", b"\x01\x02"),
        "private known": siemens + el(0x00291008, "CS", b"IMAGE NUM 4 ")
                         + el(0x00291009, "LO", b"20050723"),
        "private unknown": el(0x00090010, "LO", b"ACME") + el(0x00091001, "LO", b"x"),
        "private without creator": el(0x00091001, "LO", b"x") + el(0x00090001, "LO", b"y")
                                   + el(0x00090000, "UL", b"\x04\x00\x00\x00"),
        "private multi-valued creator": el(0x00290010, "LO", b"SIEMENS CSA HEADER\\X")
                                        + el(0x00291008, "CS", b"IMAGE NUM 4 "),
        "private invalid creator": el(0x00290010, "LO", b"X" * 70)
                                   + el(0x00291008, "CS", b"IMAGE NUM 4 "),
        "private undefined UN sequence": el(0x00090010, "LO", b"ACME") + sq(
            0x00091001, [element(0x00100010, None, b"A^B", True, little)], undefined=True,
            vr="UN"),
        "UN public": element(0x00100010, "UN", b"A^B\\C", False, little)
                     + element(0x00280010, "UN", us(512), False, little),
        "UN public sequence": element(0x00081140, "UN", item(
            element(0x00081150, None, b"1.2\x00", True, little), little), False, little),
        "UN undefined sequence": sq(0x00081140, [element(0x00081150, None, b"1.2\x00", True,
                                                         little)], undefined=True, vr="UN"),
        "unknown public tag": el(0x00100011, "LO", b"x") + el(0x00100000, "UL", us(4) * 2),
        "charset per item": el(0x00080005, "CS", b"ISO_IR 100")
                            + sq(0x00081140, [el(0x00100010, "PN", b"\xe9")])
                            + sq(0x00081141, [el(0x00080005, "CS", b"ISO_IR 192")
                                              + el(0x00100010, "PN", b"\xc3\xa9")]),
        "empty charset in item": el(0x00080005, "CS", b"ISO_IR 192") + sq(
            0x00081140, [el(0x00080005, "CS", b"") + el(0x00100010, "PN", b"\xe9")]),
        "empty sequence": sq(0x00081140, []), "empty undefined sequence": sq(0x00081140, [],
                                                                             undefined=True),
        "empty item": sq(0x00081140, [b""]),
        "empty undefined item": sq(0x00081140, [b""], undefined_items=True),
        "invalid value in item": sq(0x00081140, [el(0x00080018, "UI", b"1.02")])
                                 + el(0x00100010, "PN", b"A"),
        "invalid value in undefined item": sq(0x00081140, [el(0x00080018, "UI", b"1.02")],
                                              undefined=True) + el(0x00100010, "PN", b"A"),
        "encapsulated": el(0x7FE00010, "OB", item(b"", little) + item(b"\x01" * 10, little)
                           + sequence_end(little), undefined=True),
        "undefined length OB": el(0x00091011, "OB", b"\x01\x02" + sequence_end(little),
                                  undefined=True),
        "private undefined length with items": el(0x00090010, "LO", b"ACME") + sq(
            0x00091002, [el(0x00100010, "PN", b"A")], undefined=True, vr="OB"),
        "duplicate tag": el(0x00100010, "PN", b"A") + el(0x00100010, "PN", b"B"),
        "after pixel data": pixels + el(0xFFFCFFFC, "OB", b"\x00\x00"),
        "float pixel data": el(0x7FE00008, "OF", b"\x00" * 4),
        "item delimiter at top level": el(0x00100010, "PN", b"A")
                                       + struct.pack("<HHL" if little else ">HHL", 0xFFFE,
                                                     0xE00D, 0) + el(0x00100020, "LO", b"B"),
        "sequence delimiter in defined sequence": el(0x00081140, "SQ", item(b"", little)
                                                     + sequence_end(little) + item(b"", little)),
        "implicit VR element in explicit data": el(0x00100010, "PN", b"A^B")
                                                + element(0x00100020, None, b"ID", True, little),
        "unknown VR": element(0x00100010, "XX", b"A^B", False, little)
                      + element(0x00100020, "LO", b"ID", False, little),
    }


@pytest.mark.parametrize("implicit,little", ENCODINGS, ids=ENCODING_IDS)
@pytest.mark.parametrize("stop", [True, False], ids=["stop", "to-the-end"])
def test_structures(implicit: bool, little: bool, stop: bool) -> None:
    for name, body in _structures(implicit, little).items():
        mine = to_dicom_json(body, implicit_vr=implicit, little_endian=little,
                             stop_at_pixel_data=stop)
        assert _text(mine) == _text(reference(body, implicit, little, stop=stop)), name


# ---------------------------------------------------------------------------------------------
# Malformed input

def _ct_small() -> tuple[bytes, bool, bool]:
    return load(CORPUS["pydicom/test_files/CT_small.dcm"])


def test_truncated_value_raises() -> None:
    """Cutting the data set inside any value (top level or nested) is refused."""
    body, implicit, little = _ct_small()
    ds = _quiet(lambda: read_dataset(BytesIO(body), implicit, little,
                                     stop_when=_stop_at_pixel_data))
    cuts = [elem.value_tell + elem.length // 2 for elem in ds._dict.values()
            if elem.length not in (0, 1, 0xFFFFFFFF)]
    assert len(cuts) > 50
    for cut in cuts:
        with pytest.raises(InvalidInstance):
            to_dicom_json(body[:cut], implicit_vr=implicit, little_endian=little)


def test_truncated_header_raises() -> None:
    body, implicit, little = _ct_small()
    with pytest.raises(InvalidInstance, match="header"):
        to_dicom_json(body[:3], implicit_vr=implicit, little_endian=little)
    header = element(0x00100010, "PN", b"AB", False, True)
    with pytest.raises(InvalidInstance):
        to_dicom_json(header[:7], implicit_vr=False, little_endian=True)


def test_every_prefix_parses_or_raises_invalid_instance() -> None:
    """No prefix of a real data set crashes: it is a (shorter) data set or InvalidInstance."""
    for name in ("pydicom/test_files/CT_small.dcm", "pydicom/test_files/rtplan.dcm",
                 "pydicom/test_files/MR_small_bigendian.dcm"):
        body, implicit, little = load(CORPUS[name])
        for cut in range(0, min(len(body), 6000), 3):
            try:
                to_dicom_json(body[:cut], implicit_vr=implicit, little_endian=little)
            except InvalidInstance:
                pass


def test_bad_item_tag_raises() -> None:
    items = item(element(0x00081150, None, b"1.2\x00", True, True), True)
    bad = bytearray(element(0x00081140, "SQ", items, False, True))
    bad[12:16] = struct.pack("<HH", 0xFFFE, 0xE001)  # (FFFE,E001) is no item tag (PS3.5 7.5)
    with pytest.raises(InvalidInstance, match="item tag"):
        to_dicom_json(bytes(bad), implicit_vr=False, little_endian=True)


def test_missing_delimiters_raise() -> None:
    content = item(element(0x00081150, "UI", b"1.2\x00", False, True), True)
    no_sequence_end = element(0x00081140, "SQ", content, False, True, undefined=True)
    with pytest.raises(InvalidInstance):
        to_dicom_json(no_sequence_end, implicit_vr=False, little_endian=True)
    open_item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + element(
        0x00081150, "UI", b"1.2\x00", False, True)
    no_item_end = element(0x00081140, "SQ", open_item, False, True, undefined=True)
    with pytest.raises(InvalidInstance):
        to_dicom_json(no_item_end, implicit_vr=False, little_endian=True)
    fragments = item(b"\x01\x02", True)
    no_pixel_end = element(0x7FE00010, "OB", fragments, False, True, undefined=True)
    with pytest.raises(InvalidInstance):
        to_dicom_json(no_pixel_end, implicit_vr=False, little_endian=True,
                      stop_at_pixel_data=False)


def test_deep_nesting_raises() -> None:
    body = element(0x00100010, "PN", b"A", False, True)
    for _ in range(2000):
        body = element(0x00081140, "SQ", item(body, True), False, True)
    with pytest.raises(InvalidInstance, match="nested"):
        to_dicom_json(body, implicit_vr=False, little_endian=True)
