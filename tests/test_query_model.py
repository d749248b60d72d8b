"""Unit tests of the query model without a database: how values are normalised for matching
(archive/instance.py) and which SQL conditions and answers archive/query.py builds (PS3.4 C.2.2.2)."""

from __future__ import annotations

import pytest

from archive.attributes import Level
from archive.instance import normalise_date, normalise_datetime, normalise_pn, normalise_time
from archive.query import Query, QueryError, QueryKey, _split_range, build_sql, row_to_json

STUDY_DATE, STUDY_TIME, ACQ_DT = 0x00080020, 0x00080030, 0x0008002A
PATIENT_NAME, STUDY_DESCRIPTION, STUDY_UID = 0x00100010, 0x00081030, 0x0020000D
PROCEDURE_CODES, CODE_VALUE, SCHEME = 0x00081032, 0x00080100, 0x00080102


# -- normalisation (PS3.5 6.2) ----------------------------------------------------------------------

@pytest.mark.parametrize("value,expected", [("20200115", "20200115"), ("2020.01.15", "20200115"),
                                            (" 20200115 ", "20200115"), ("2020011", None), ("", None),
                                            (None, None), ("2020-01-15", None)])
def test_normalise_date(value, expected):
    """DA is YYYYMMDD; the ACR-NEMA YYYY.MM.DD form is still accepted (PS3.5 Table 6.2-1 note)."""
    assert normalise_date(value) == expected


@pytest.mark.parametrize("value,upper,expected", [
    ("093000", False, "093000.000000"), ("0930", False, "093000.000000"), ("09", False, "090000.000000"),
    ("093000.5", False, "093000.500000"), ("09:30:00", False, "093000.000000"),
    ("0930", True, "093059.999999"), ("09", True, "095959.999999"), ("093000", True, "093000.999999"),
    ("093000.25", True, "093000.259999"), ("0930000", False, None), ("ab", False, None), ("", False, None)])
def test_normalise_time(value, upper, expected):
    """TM components left out are the lowest value, or for a range's upper bound the highest."""
    assert normalise_time(value, upper=upper) == expected


@pytest.mark.parametrize("value,upper,expected", [
    ("20200115093501", False, "20200115093501.000000"), ("20200115093501", True, "20200115093501.999999"),
    ("20200115", False, "20200115000000.000000"), ("20200115", True, "20200115235959.999999"),
    ("2020", True, "20201231235959.999999"), ("202002", True, "20200231235959.999999"),
    ("20210610141601.25", False, "20210610141601.250000"),
    ("20200115093501+0100", False, "20200115093501.000000"), ("20200115093501-0500", False, "20200115093501.000000"),
    ("2020011509350", False, None), ("", False, None)])
def test_normalise_datetime(value, upper, expected):
    assert normalise_datetime(value, upper=upper) == expected


@pytest.mark.parametrize("value,expected", [
    ("Doe^John", "doe^john"), ("Doe^John^^^", "doe^john"), ("DOE^JOHN ", "doe^john"),
    ("Yamada^Tarou=山田^太郎=やまだ^たろう", "yamada^tarou"), ({"Alphabetic": "Müller^Jürgen"}, "müller^jürgen"),
    ({"Ideographic": "山田^太郎"}, None), ("", None), (None, None)])
def test_normalise_pn(value, expected):
    """PN matching uses the alphabetic group, case-folded, without trailing empty components (PS3.5 6.2)."""
    assert normalise_pn(value) == expected


# -- ranges (PS3.4 C.2.2.2.5) -----------------------------------------------------------------------

@pytest.mark.parametrize("value,expected", [
    ("20200115093501", None),
    ("20200115093501-0500", None),                                  # one value with a UTC offset
    ("20200115093501.5+0100", None),
    ("20200115093501-20200115093502", ("20200115093501", "20200115093502")),
    ("20200116000000-20211231235959", ("20200116000000", "20211231235959")),
    ("-20200115235959", ("", "20200115235959")),
    ("20220101000102-", ("20220101000102", "")),
    ("2020-2021", ("2020", "2021")),                                # years: a range, not an offset
    ("20200115093501-0500-20200115093502-0500", ("20200115093501-0500", "20200115093502-0500")),
])
def test_split_datetime_range(value, expected):
    assert _split_range(value, normalise_datetime) == expected


def test_split_datetime_range_malformed():
    with pytest.raises(QueryError):
        _split_range("2020x-2021", normalise_datetime)


@pytest.mark.parametrize("value,expected", [("20200101-20201231", ("20200101", "20201231")),
                                            ("-20200115", ("", "20200115")), ("20211231-", ("20211231", "")),
                                            ("20200115", None)])
def test_split_date_range(value, expected):
    assert _split_range(value, normalise_date) == expected


def _sql(level: Level, *keys: QueryKey, top: Level = Level.PATIENT) -> tuple[str, list]:
    return build_sql(Query(level=level, keys=keys, top=top))


def test_datetime_range_conditions():
    """A closed DT range compares against both bounds, the upper one padded to its end."""
    text, args = _sql(Level.IMAGE, QueryKey(ACQ_DT, "DT", "20200115093501-20200115093502"))
    assert "i.acquisition_datetime >= $1 AND i.acquisition_datetime <= $2" in text
    assert args == ["20200115093501.000000", "20200115093502.999999"]


def test_datetime_with_offset_is_single_value():
    text, args = _sql(Level.IMAGE, QueryKey(ACQ_DT, "DT", "20200115093501-0500"))
    assert "i.acquisition_datetime BETWEEN $1 AND $2" in text
    assert args == ["20200115093501.000000", "20200115093501.999999"]


def test_time_open_ranges():
    text, args = _sql(Level.STUDY, QueryKey(STUDY_TIME, "TM", "-0900"))
    assert "st.study_time <= $1" in text and args == ["090059.999999"]
    text, args = _sql(Level.STUDY, QueryKey(STUDY_TIME, "TM", "1400-"))
    assert "st.study_time >= $1" in text and args == ["140000.000000"]


@pytest.mark.parametrize("value", ["2020011-", "abc", "-"])
def test_malformed_date_is_refused(value):
    with pytest.raises(QueryError):
        _sql(Level.STUDY, QueryKey(STUDY_DATE, "DA", value))


# -- single value, wildcard, universal, UID list ---------------------------------------------------

def test_pn_single_value_is_case_folded():
    text, args = _sql(Level.PATIENT, QueryKey(PATIENT_NAME, "PN", "DOE^JOHN^^"))
    assert "p.patient_name = $1" in text and args == ["doe^john"]


def test_wildcards_become_like_with_sql_metacharacters_escaped():
    """PS3.4 C.2.2.2.4: only * and ? are wildcards; a literal % or _ in the value stays literal."""
    text, args = _sql(Level.STUDY, QueryKey(STUDY_DESCRIPTION, "LO", "50%_?x*"))
    assert "st.study_description LIKE $3" in text
    assert args[2] == "50\\%\\__x%"


def test_wildcard_prefix_is_also_given_as_a_range():
    """The literal part before the first wildcard bounds the values byte-wise (text_pattern_ops), so a
    generic plan can use an index where a constant LIKE prefix would (archive/query.py `_prefix_range`)."""
    text, args = _sql(Level.STUDY, QueryKey(STUDY_DESCRIPTION, "LO", "50%_?x*"))
    assert "st.study_description ~>=~ $1 AND st.study_description ~<~ $2 AND st.study_description LIKE $3" in text
    assert args == ["50%_", "50%`", "50\\%\\__x%"]  # the prefix is literal: % and _ are not wildcards here
    text, args = _sql(Level.PATIENT, QueryKey(PATIENT_NAME, "PN", "Doe^J*"))
    assert "p.patient_name ~>=~ $1 AND p.patient_name ~<~ $2 AND p.patient_name LIKE $3" in text
    assert args == ["doe^j", "doe^k", "doe^j%"]


@pytest.mark.parametrize("value", ["*DOE", "?OE"])
def test_no_range_without_a_literal_prefix(value):
    text, args = _sql(Level.PATIENT, QueryKey(PATIENT_NAME, "PN", value))
    assert "~>=~" not in text and len(args) == 1


def test_prefix_range_upper_bound_at_the_end_of_unicode():
    """No character follows U+10FFFF (nor is a surrogate one): the range is then open above."""
    text, args = _sql(Level.STUDY, QueryKey(STUDY_DESCRIPTION, "LO", "a\U0010ffff*"))
    assert "~>=~ $1 AND" in text and "~<~" not in text and args[0] == "a\U0010ffff"
    text, args = _sql(Level.STUDY, QueryKey(STUDY_DESCRIPTION, "LO", "a\ud7ff*"))
    assert "~<~" not in text
    text, args = _sql(Level.STUDY, QueryKey(STUDY_DESCRIPTION, "LO", "\u00e9t*"))
    assert args[:2] == ["\u00e9t", "\u00e9u"]


@pytest.mark.parametrize("value", [None, "", "*", "**"])
def test_universal_matching_adds_no_condition(value):
    text, args = _sql(Level.STUDY, QueryKey(STUDY_DESCRIPTION, "LO", value))
    assert "WHERE" not in text and args == []


def test_uid_list():
    text, args = _sql(Level.STUDY, QueryKey(STUDY_UID, "UI", ("1.2.3", "1.2.4")))
    assert "st.study_instance_uid = ANY($1::text[])" in text and args == [["1.2.3", "1.2.4"]]


def test_level_outside_the_model_is_refused():
    with pytest.raises(QueryError):
        _sql(Level.PATIENT, QueryKey(PATIENT_NAME, "PN", None), top=Level.STUDY)


# -- sequence matching (PS3.4 C.2.2.2.6) ------------------------------------------------------------

def _procedure_query(*subs: QueryKey) -> Query:
    return Query(level=Level.STUDY, keys=(QueryKey(PROCEDURE_CODES, "SQ", None, subs),))


def test_sequence_condition_and_matched_items_column():
    text, args = build_sql(_procedure_query(QueryKey(CODE_VALUE, "SH", "MR*"), QueryKey(SCHEME, "SH", "LOCAL")))
    assert "EXISTS (SELECT 1 FROM jsonb_array_elements" in text
    assert f"AS m_{PROCEDURE_CODES:08x}" in text
    assert args == ["MR%", "LOCAL"]


def test_sequence_without_item_values_is_universal():
    text, args = build_sql(_procedure_query(QueryKey(CODE_VALUE, "SH", None)))
    assert "WHERE" not in text and "m_" not in text and args == []


def _code(value: str, scheme: str) -> dict:
    return {"00080100": {"vr": "SH", "Value": [value]}, "00080102": {"vr": "SH", "Value": [scheme]},
            "00080104": {"vr": "LO", "Value": [f"meaning of {value}"]}}


STUDY_ATTRS = {"00081032": {"vr": "SQ", "Value": [_code("MRKNEE", "LOCAL"), _code("ZZ99", "OTHER")]}}


def test_answer_holds_only_matching_items_and_requested_sub_keys():
    query = _procedure_query(QueryKey(CODE_VALUE, "SH", "MR*"))
    row = {"p_attrs": {}, "st_attrs": STUDY_ATTRS, f"m_{PROCEDURE_CODES:08x}": [_code("MRKNEE", "LOCAL")]}
    out = row_to_json(query, row)
    assert out["00081032"] == {"vr": "SQ", "Value": [{"00080100": {"vr": "SH", "Value": ["MRKNEE"]}}]}


def test_universal_sequence_answer_is_the_whole_sequence():
    query = Query(level=Level.STUDY, keys=(QueryKey(PROCEDURE_CODES, "SQ", None, None),))
    out = row_to_json(query, {"p_attrs": {}, "st_attrs": STUDY_ATTRS})
    assert out["00081032"] == STUDY_ATTRS["00081032"]


def test_answer_has_only_requested_keys():
    """PS3.4 C.4.1.1.3.2: the answer holds the requested keys (empty when unknown), nothing else."""
    query = Query(level=Level.STUDY, keys=(QueryKey(STUDY_UID, "UI", None), QueryKey(STUDY_DESCRIPTION, "LO", None)))
    row = {"p_attrs": {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^John"}]}},
           "st_attrs": {"0020000D": {"vr": "UI", "Value": ["1.2.3"]}, "00080020": {"vr": "DA", "Value": ["20200115"]}}}
    assert row_to_json(query, row) == {"00081030": {"vr": "LO"}, "0020000D": {"vr": "UI", "Value": ["1.2.3"]}}
