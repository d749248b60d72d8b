"""split_part10's direct reader of the File Meta Information agrees with pydicom's on every corpus file,
and leaves whatever it does not read itself to pydicom (unit tests of archive/instance.py)."""

from __future__ import annotations

import struct
from pathlib import Path

import pydicom.data
import pytest

from archive.errors import InvalidInstance
from archive.instance import _file_meta_explicit_le, _split_part10_pydicom, file_meta, split_part10

CT = "1.2.840.10008.5.1.4.1.1.2"


def _corpus() -> list[Path]:
    return [Path(f) for f in sorted(pydicom.data.get_testdata_files()) if Path(f).is_file()]


def test_direct_reader_agrees_with_pydicom_on_the_corpus() -> None:
    read_directly = 0
    for path in _corpus():
        data = path.read_bytes()
        try:
            expected: object = _split_part10_pydicom(data)
        except InvalidInstance:
            expected = InvalidInstance
        found = _file_meta_explicit_le(data)
        if found is not None:
            read_directly += 1
            assert found == expected, path.name
        got: object
        try:
            got = split_part10(data)
        except InvalidInstance:
            got = InvalidInstance
        assert got == expected, path.name
    assert read_directly > 200  # the fast path is the common one, not a rarely taken branch


def test_the_data_set_starts_after_the_meta_group() -> None:
    meta = file_meta(CT, "1.2.3", "1.2.840.10008.1.2.1", "MODALITY")
    data_set = struct.pack("<HH2sH", 0x0008, 0x0016, b"UI", 26) + CT.encode() + b"\0"
    assert split_part10(meta + data_set) == ("1.2.840.10008.1.2.1", len(meta))


@pytest.mark.parametrize("cut", [10, 131, 140, 150])
def test_truncated_or_foreign_input_goes_to_pydicom(cut: int) -> None:
    meta = file_meta(CT, "1.2.3", "1.2.840.10008.1.2.1", None)
    assert _file_meta_explicit_le(meta[:cut]) is None
    with pytest.raises(InvalidInstance):
        split_part10(meta[:cut])
    with pytest.raises(InvalidInstance):
        split_part10(b"not dicom at all" * 20)


def test_parsing_in_place_equals_parsing_a_copy_of_the_data_set() -> None:
    """parse_instance(file, start=offset) reads the data set where it lies in the PS3.10 file; the result is
    the same as for a copy of the data set alone, refusals included."""
    from archive.instance import parse_instance

    compared = 0
    for path in _corpus():
        data = path.read_bytes()
        try:
            ts, offset = split_part10(data)
        except InvalidInstance:
            continue
        outcomes = []
        for buf, start in ((data[offset:], 0), (data, offset)):
            try:
                outcomes.append(parse_instance(buf, ts, start=start))
            except InvalidInstance as exc:
                outcomes.append((exc.status, exc.code))
        assert outcomes[0] == outcomes[1], path.name
        compared += 1
    assert compared > 200
