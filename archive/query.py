"""The one query model: C-FIND identifiers and QIDO-RS parameters both become a `Query`, and this
module turns a Query into SQL over the index (PS3.4 C.2.2.2 matching) and rows into DICOM JSON.

Matching rules, decided once here:
- Single value matching is exact, except PN, which is case-insensitive on the alphabetic group
  (PS3.4 C.2.2.2.1 permits case-insensitive PN matching).
- `*` and `?` are wildcards for string VRs (C.2.2.2.4); a lone `*` is universal matching.
- UID keys accept a list of UIDs (C.2.2.2.2); DA, TM and DT keys accept ranges (C.2.2.2.5); each
  of StudyDate/StudyTime is matched independently (no combined date-time matching). A DT value's
  "-HHMM" UTC offset is told apart from a range's '-' by shape (`_split_range`).
- A zero-length value is universal matching (C.2.2.2.3): the key is returned, not matched.
- A sequence key with one item whose sub-keys carry values matches entities having an item that
  matches every such sub-key (C.2.2.2.6); the answer holds only the matching items, each with only
  the requested sub-keys.
- Entities without a value for a matched key do not match it.
- Keys of levels below the query level are ignored; keys of unknown level are returned empty.
"""

from __future__ import annotations

import functools

import json
import re
from dataclasses import dataclass, field
from typing import Any

from archive.attributes import BY_TAG, Key, Level, Match, level_of
from archive.errors import MisuseError
from archive.instance import normalise_date, normalise_datetime, normalise_pn, normalise_time

_VR_MATCH = {"UI": Match.UID, "PN": Match.PN, "DA": Match.DATE, "TM": Match.TIME, "DT": Match.DATETIME,
             "IS": Match.NUMBER, "US": Match.NUMBER, "SQ": Match.SEQUENCE}
# VRs for which * and ? are not wildcards (PS3.4 C.2.2.2.4)
_NO_WILDCARD_VRS = {"DA", "TM", "DT", "SL", "SS", "US", "UL", "FL", "FD", "OB", "OW", "UN", "AT", "DS",
                    "IS", "AS", "UI"}


class QueryError(MisuseError):
    """A query that cannot be run as given (an unsupported level, a malformed range)."""


@dataclass(frozen=True, slots=True)
class QueryKey:
    """One attribute of a query: matched when `value` is non-empty, always returned.

    `value` is the attribute's string value (a tuple for several values, as DICOM's backslash list);
    for a sequence, `items` holds the sub-keys of its single item.
    """

    tag: int
    vr: str
    value: str | tuple[str, ...] | None = None
    items: tuple["QueryKey", ...] | None = None


@dataclass(frozen=True, slots=True)
class Query:
    level: Level
    keys: tuple[QueryKey, ...]
    limit: int | None = None
    offset: int = 0
    fuzzy: bool = False             # QIDO fuzzymatching: PN components match by prefix
    include_all: bool = False       # return every stored attribute of the level(s)
    top: Level = Level.PATIENT      # the information model's top level (Study Root: STUDY)


@dataclass(slots=True)
class _Sql:
    where: list[str] = field(default_factory=list)
    args: list[Any] = field(default_factory=list)

    def arg(self, value: Any) -> str:
        self.args.append(value)
        return f"${len(self.args)}"


_FROM = {
    Level.PATIENT: "patient p",
    Level.STUDY: "study st JOIN patient p ON p.pk = st.patient_fk",
    Level.SERIES: "series se JOIN study st ON st.pk = se.study_fk JOIN patient p ON p.pk = st.patient_fk",
    Level.IMAGE: ("instance i JOIN series se ON se.pk = i.series_fk JOIN study st ON st.pk = se.study_fk "
                  "JOIN patient p ON p.pk = st.patient_fk"),
}

_COMPUTED_SQL = {
    0x00201200: "(SELECT count(*) FROM study x WHERE x.patient_fk = p.pk)",
    0x00201202: "(SELECT count(*) FROM series y JOIN study x ON x.pk = y.study_fk WHERE x.patient_fk = p.pk)",
    0x00201204: ("(SELECT count(*) FROM instance z JOIN series y ON y.pk = z.series_fk "
                 "JOIN study x ON x.pk = y.study_fk WHERE x.patient_fk = p.pk)"),
    0x00201206: "(SELECT count(*) FROM series y WHERE y.study_fk = st.pk)",
    0x00201208: "(SELECT count(*) FROM instance z JOIN series y ON y.pk = z.series_fk WHERE y.study_fk = st.pk)",
    0x00201209: "(SELECT count(*) FROM instance z WHERE z.series_fk = se.pk)",
    0x00080061: ("(SELECT array_agg(DISTINCT y.modality ORDER BY y.modality) FROM series y "
                 "WHERE y.study_fk = st.pk AND y.modality IS NOT NULL)"),
    0x00080062: ("(SELECT array_agg(DISTINCT z.sop_class_uid ORDER BY z.sop_class_uid) FROM instance z "
                 "JOIN series y ON y.pk = z.series_fk WHERE y.study_fk = st.pk)"),
}


def _like_pattern(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _prefix_range(sql: _Sql, expr: str, value: str) -> str:
    """Conditions (each followed by AND) bounding `expr` to the values that begin with the literal part of
    the wildcard value `value` before its first * or ?, or "" when it begins with a wildcard.

    The index plans statements once, generically (archive/database.py): a LIKE whose pattern is a parameter
    cannot be turned into an index range then, as PostgreSQL does for a constant pattern. These bounds can
    (the text_pattern_ops operators ~>=~ and ~<~ compare byte by byte, and UTF-8's byte order is the code
    point order, so every value beginning with the prefix lies between the prefix and the prefix with its
    last character raised by one)."""
    cut = min((i for i in (value.find("*"), value.find("?")) if i >= 0), default=len(value))
    prefix = value[:cut]
    if not prefix:
        return ""
    conditions = f"{expr} ~>=~ {sql.arg(prefix)} AND "
    after = ord(prefix[-1]) + 1
    if after <= 0x10FFFF and not 0xD800 <= after <= 0xDFFF:
        conditions += f"{expr} ~<~ {sql.arg(prefix[:-1] + chr(after))} AND "
    return conditions


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def _values(key: QueryKey) -> list[str]:
    if key.value is None:
        return []
    vals = list(key.value) if isinstance(key.value, tuple) else [key.value]
    return [v for v in (str(x).strip() for x in vals) if v]


def _json_text(alias: str, tag_hex: str, vr: str, *, item: str | None = None) -> str:
    """SQL for the first value of a stored attribute, as text."""
    base = item if item is not None else (f"({alias}.metadata::jsonb)" if alias == "i" else f"{alias}.attrs")
    if vr == "PN":
        return f"lower({base}->'{tag_hex}'->'Value'->0->>'Alphabetic')"
    return f"({base}->'{tag_hex}'->'Value'->>0)"


# One DT value: date and time, optional fraction, optional UTC offset (PS3.5 Table 6.2-1)
_DT_VALUE = re.compile(r"\d{4,14}(?:\.\d{1,6})?(?:[+-]\d{4})?")


def _split_range(value: str, norm: Any) -> tuple[str, str] | None:
    """(low, high) of a range (either may be empty), or None for a single value (PS3.4 C.2.2.2.5).

    A DT value may end in a "-HHMM" UTC offset, so its '-' is not always the range separator: a
    single value is one DT whose only '-' comes after the date (YYYYMMDD) and starts a 4-digit offset;
    otherwise the separator is the first '-' that leaves a valid DT (or nothing) on each side.
    """
    if "-" not in value:
        return None
    if norm is not normalise_datetime:
        low, _, high = value.partition("-")
        return low, high
    if _DT_VALUE.fullmatch(value) and value.count("-") == 1 and value.index("-") > 8:
        return None
    for pos, char in enumerate(value):
        if char == "-":
            low, high = value[:pos], value[pos + 1:]
            if (not low or _DT_VALUE.fullmatch(low)) and (not high or _DT_VALUE.fullmatch(high)):
                return low, high
    raise QueryError(f"malformed date-time range {value!r}")


def _range(sql: _Sql, expr: str, value: str, norm: Any) -> str:
    bounds = _split_range(value, norm)
    if bounds is None:
        exact = norm(value)
        if exact is None:
            raise QueryError(f"malformed date/time value {value!r}")
        if norm is normalise_date:
            return f"{expr} = {sql.arg(exact)}"
        upper = norm(value, upper=True)
        return f"{expr} BETWEEN {sql.arg(exact)} AND {sql.arg(upper)}"
    low, high = bounds
    parts = []
    if low:
        lo = norm(low)
        if lo is None:
            raise QueryError(f"malformed range start {low!r}")
        parts.append(f"{expr} >= {sql.arg(lo)}")
    if high:
        hi = norm(high) if norm is normalise_date else norm(high, upper=True)
        if hi is None:
            raise QueryError(f"malformed range end {high!r}")
        parts.append(f"{expr} <= {sql.arg(hi)}")
    if not parts:
        raise QueryError(f"empty range {value!r}")
    return " AND ".join(parts)


def _condition(sql: _Sql, expr: str, match: Match, vr: str, values: list[str], fuzzy: bool, *,
               column: bool = False) -> str | None:
    """SQL for one key's matching, or None for universal matching. `column`: `expr` is an index column,
    whose wildcard matches get a prefix range too (`_prefix_range`)."""
    if not values:
        return None
    if match is Match.UID:
        return f"{expr} = ANY({sql.arg(values)}::text[])"
    ors = []
    for v in values:
        if match in (Match.DATE, Match.TIME, Match.DATETIME):
            norm = {Match.DATE: normalise_date, Match.TIME: normalise_time, Match.DATETIME: normalise_datetime}[match]
            ors.append(_range(sql, expr, v, norm))
        elif match is Match.NUMBER:
            if v == "*":
                return None  # a lone '*' is universal matching whatever the VR (PS3.4 C.2.2.2.4)
            try:
                ors.append(f"{expr} = {sql.arg(int(v))}")
            except ValueError as exc:
                raise QueryError(f"{v!r} is not an integer") from exc
        elif match is Match.PN:
            if v.strip("*") == "":
                return None
            pattern = v.lower()
            if not _has_wildcard(pattern):
                pattern = normalise_pn(pattern) or ""
            if fuzzy:
                # PS3.18 8.3.4.1 fuzzymatching: each name component matches by prefix
                p = _like_pattern(pattern.rstrip("*")) + "%"
                ors.append(f"({expr} LIKE {sql.arg(p)} OR {expr} LIKE {sql.arg('%^' + p)})")
            elif _has_wildcard(pattern):
                ranged = _prefix_range(sql, expr, pattern) if column else ""
                ors.append(f"{ranged}{expr} LIKE {sql.arg(_like_pattern(pattern))}")
            else:
                ors.append(f"{expr} = {sql.arg(pattern)}")
        else:
            if vr not in _NO_WILDCARD_VRS and _has_wildcard(v):
                if v.strip("*") == "":
                    return None
                ranged = _prefix_range(sql, expr, v) if column else ""
                ors.append(f"{ranged}{expr} LIKE {sql.arg(_like_pattern(v))}")
            else:
                ors.append(f"{expr} = {sql.arg(v)}")
    return ors[0] if len(ors) == 1 else "(" + " OR ".join(ors) + ")"


def _sequence_items(alias: str, tag: int) -> str:
    """The items of a stored sequence as a set of (item, n) rows, in stored order."""
    base = f"({alias}.metadata::jsonb)" if alias == "i" else f"{alias}.attrs"
    return (f"jsonb_array_elements(coalesce({base}->'{tag:08X}'->'Value', '[]'::jsonb)) "
            f"WITH ORDINALITY AS seq(item, n)")


def _sequence_condition(sql: _Sql, alias: str, key: QueryKey, fuzzy: bool) -> str | None:
    """SQL that an item matches every valued sub-key of the key's single item, or None (universal)."""
    subs = []
    for sub in key.items or ():
        match = _VR_MATCH.get(sub.vr, Match.STRING)
        if match is Match.SEQUENCE:
            continue
        cond = _condition(sql, _json_text(alias, f"{sub.tag:08X}", sub.vr, item="item"), match, sub.vr,
                          _values(sub), fuzzy)
        if cond:
            subs.append(cond)
    if not subs:
        return None
    return " AND ".join(subs)


def _key_level(tag: int) -> Level:
    return level_of(tag) or Level.IMAGE


def _match(query: Query) -> tuple[_Sql, dict[int, str]]:
    """The WHERE conditions of `query` and, per sequence key whose item carries values, the condition an
    item of it must meet (over `item`), which also picks the items returned (PS3.4 C.2.2.2.6)."""
    sql = _Sql()
    level = query.level
    item_conds: dict[int, str] = {}
    if level.depth < query.top.depth:
        raise QueryError(f"level {level.value} is not part of this information model")
    for key in query.keys:
        klevel = _key_level(key.tag)
        if klevel.depth > level.depth:
            continue
        indexed: Key | None = BY_TAG.get(key.tag)
        values = _values(key)
        if indexed is not None and indexed.match is Match.COMPUTED:
            if key.tag == 0x00080061 and values:
                sql.where.append(f"EXISTS (SELECT 1 FROM series y WHERE y.study_fk = st.pk AND y.modality = "
                                 f"ANY({sql.arg(values)}::text[]))")
            continue
        if key.vr == "SQ":
            cond = _sequence_condition(sql, klevel.alias, key, query.fuzzy)
            if cond:
                item_conds[key.tag] = cond
                cond = f"EXISTS (SELECT 1 FROM {_sequence_items(klevel.alias, key.tag)} WHERE {cond})"
        elif indexed is not None:
            cond = _condition(sql, f"{klevel.alias}.{indexed.column}", indexed.match, indexed.vr, values,
                              query.fuzzy, column=True)
        else:
            match = _VR_MATCH.get(key.vr, Match.STRING)
            expr = _json_text(klevel.alias, f"{key.tag:08X}", key.vr)
            if match is Match.NUMBER:
                expr = f"({expr})::numeric"
            elif match in (Match.DATE, Match.TIME, Match.DATETIME):
                expr = {Match.DATE: f"replace({expr}, '.', '')",
                        Match.TIME: f"vna_norm_time({expr})",
                        Match.DATETIME: f"vna_norm_datetime({expr})"}[match]
            cond = _condition(sql, expr, match, key.vr, values, query.fuzzy)
        if cond:
            sql.where.append(cond)
    return sql, item_conds


def _uses_metadata(query: Query) -> bool:
    """Does the answer need an instance's whole stored JSON (not only its level attrs)?"""
    return query.level is Level.IMAGE and (query.include_all or any(
        _key_level(k.tag) is Level.IMAGE and k.tag not in BY_TAG for k in query.keys))


def _statement(query: Query, sql: _Sql, select: str, *, page_after: int | None = None,
               page_size: int | None = None, lateral: str = "") -> str:
    level = query.level
    if page_size is not None:
        select = f"{level.alias}.pk AS pk, {select}"
        if page_after is not None:
            sql.where.append(f"{level.alias}.pk > {sql.arg(page_after)}")
    text = f"SELECT {select} FROM {_FROM[level]}{lateral}"
    if sql.where:
        text += " WHERE " + " AND ".join(sql.where)
    text += f" ORDER BY {level.alias}.pk"
    if page_size is not None:
        text += f" LIMIT {int(page_size)}"
    elif query.limit is not None:
        text += f" LIMIT {int(query.limit)}"
    if query.offset:
        text += f" OFFSET {int(query.offset)}"
    return text


def build_sql(query: Query, *, select: str | None = None, page_after: int | None = None,
              page_size: int | None = None) -> tuple[str, list[Any]]:
    """SELECT for `query`: by default the attrs of each level down to the query level and the
    computed attributes asked for; `select` replaces the column list (retrieve uses it).

    With `page_size`, rows come a page at a time in primary-key order (keyset pagination: the next
    page starts after `page_after`, the last pk seen, which the `pk` column returns)."""
    sql, item_conds = _match(query)
    level = query.level
    if select is None:
        cols = [f"{lvl.alias}.attrs AS {lvl.alias}_attrs" for lvl in Level if lvl.depth <= level.depth]
        for key in query.keys:
            if key.tag in _COMPUTED_SQL and BY_TAG[key.tag].level.depth <= level.depth:
                cols.append(f"{_COMPUTED_SQL[key.tag]} AS c_{key.tag:08x}")
        for tag, cond in item_conds.items():
            # PS3.4 C.2.2.2.6: only the matching items of a sequence are returned
            items = _sequence_items(_key_level(tag).alias, tag)
            cols.append(f"(SELECT jsonb_agg(item ORDER BY n) FROM {items} WHERE {cond}) AS m_{tag:08x}")
        if _uses_metadata(query):
            cols.append("i.metadata AS i_metadata")
        select = ", ".join(cols)
    return _statement(query, sql, select, page_after=page_after, page_size=page_size), sql.args


# -- DICOM JSON built by PostgreSQL (QIDO-RS) ---------------------------------------------------------
# The answer's text is assembled in SQL from the stored jsonb, never decoded into Python objects: the
# same content row_to_json gives, with the top-level keys in ascending tag order (PS3.18 F.2).

_SAFE_VR = re.compile(r"[A-Z]{2}")


def _empty_element(vr: str) -> str:
    """SQL literal of an attribute without a value: {"vr": VR} (PS3.18 F.2.2)."""
    if not _SAFE_VR.fullmatch(vr):
        raise QueryError(f"not a VR: {vr!r}")
    return f"'{{\"vr\":\"{vr}\"}}'"


def _computed_text(tag: int) -> str:
    """SQL text of a computed attribute (PS3.4 C.6.1.1 / PS3.18 Table 10.6.3-3): counts as IS numbers,
    ModalitiesInStudy and SOPClassesInStudy as sorted distinct values, empty when there are none."""
    vr = BY_TAG[tag].vr
    if tag in (0x00080061, 0x00080062):
        column, source = {
            0x00080061: ("y.modality", "series y WHERE y.study_fk = st.pk AND y.modality IS NOT NULL"),
            0x00080062: ("z.sop_class_uid", "instance z JOIN series y ON y.pk = z.series_fk WHERE y.study_fk = st.pk"),
        }[tag]
        values = f"(SELECT json_agg(DISTINCT {column} ORDER BY {column}) FROM {source})"
        return f"coalesce('{{\"vr\":\"{vr}\",\"Value\":' || {values}::text || '}}', {_empty_element(vr)})"
    return f"'{{\"vr\":\"{vr}\",\"Value\":[' || {_COMPUTED_SQL[tag]} || ']}}'"


def _sequence_text(key: QueryKey, elem: str, source_items: str, cond: str | None) -> str:
    """SQL text of a returned sequence: only the matching items when its item had values (taken from
    `source_items`, as the matching saw them), and in each item only the requested sub-keys."""
    wanted = ", ".join(f"'{s.tag:08X}'" for s in key.items or ())
    keep = (f"(SELECT coalesce(jsonb_object_agg(f.k, f.v), '{{}}'::jsonb) FROM jsonb_each(item) AS f(k, v) "
            f"WHERE f.k IN ({wanted}))")
    if cond is not None:
        items = f"(SELECT coalesce(jsonb_agg({keep} ORDER BY n), '[]'::jsonb) FROM {source_items} WHERE {cond})"
        return (f"(SELECT CASE WHEN e IS NULL THEN {_empty_element(key.vr)} "
                f"ELSE (e || jsonb_build_object('Value', {items}))::text END FROM (SELECT {elem} AS e) AS x)")
    items = (f"(SELECT coalesce(jsonb_agg({keep} ORDER BY n), '[]'::jsonb) "
             f"FROM jsonb_array_elements(e->'Value') WITH ORDINALITY AS seq(item, n))")
    return (f"(SELECT CASE WHEN e IS NULL THEN {_empty_element(key.vr)} "
            f"WHEN e ? 'Value' THEN (e || jsonb_build_object('Value', {items}))::text ELSE e::text END "
            f"FROM (SELECT {elem} AS e) AS x)")


def _object_text(query: Query, item_conds: dict[int, str]) -> str:
    """SQL text of one entity's DICOM JSON object: the requested keys (computed ones included), or with
    `include_all` every stored attribute of the levels with the requested keys over them."""
    level = query.level
    metadata = _uses_metadata(query)
    parts: dict[str, str] = {}
    for key in query.keys:
        tag_hex = f"{key.tag:08X}"
        if key.tag in _COMPUTED_SQL:
            if BY_TAG[key.tag].level.depth <= level.depth:
                parts[tag_hex] = _computed_text(key.tag)
            continue
        klevel = _key_level(key.tag)
        if klevel.depth > level.depth:
            continue
        elem = f"{klevel.alias}.attrs->'{tag_hex}'"
        if klevel is Level.IMAGE and metadata:
            elem = f"coalesce({elem}, im.doc->'{tag_hex}')"
        if key.vr == "SQ" and key.items:
            source = _sequence_items(klevel.alias, key.tag)
            parts[tag_hex] = _sequence_text(key, elem, source, item_conds.get(key.tag))
        else:
            parts[tag_hex] = f"coalesce(({elem})::text, {_empty_element(key.vr)})"
    if parts:
        text = " || ',' || ".join(f"'\"{t}\":' || {parts[t]}" for t in sorted(parts))
        text = f"'{{' || {text} || '}}'"
    else:
        text = "'{}'"
    if not query.include_all:
        return text
    merged = " || ".join(f"{lvl.alias}.attrs" for lvl in Level if lvl.depth <= level.depth)
    if metadata:
        merged += " || (SELECT coalesce(jsonb_object_agg(f.k, f.v), '{}'::jsonb) FROM jsonb_each(im.doc) " \
                  "AS f(k, v) WHERE f.k NOT LIKE '7FE0%')"
    return f"(({merged}) || ({text})::jsonb)::text"


def build_json_sql(query: Query) -> tuple[str, list[Any]]:
    """`_build_json_sql`, memoized: viewers repeat the same searches (a study list refreshed, a patient's
    studies), and composing the statement is a fifth of a small QIDO-RS request's CPU."""
    try:
        sql, args = _json_sql_memo(query)
    except TypeError:  # a value that cannot be hashed: compose it afresh
        return _build_json_sql(query)
    return sql, list(args)


@functools.lru_cache(maxsize=1024)
def _json_sql_memo(query: Query) -> tuple[str, tuple[Any, ...]]:
    sql, args = _build_json_sql(query)
    return sql, tuple(args)


def _build_json_sql(query: Query) -> tuple[str, list[Any]]:
    """SELECT of one text value: the DICOM JSON array answering `query` (PS3.18 10.6.3), "[]" when
    nothing matches; `limit` and `offset` apply, entities come in primary-key order as `build_sql`'s."""
    sql, item_conds = _match(query)
    # with the instance's whole stored JSON parsed once per row when the answer needs it
    lateral = " CROSS JOIN LATERAL (SELECT i.metadata::jsonb AS doc) AS im" if _uses_metadata(query) else ""
    inner = _statement(query, sql, f"{query.level.alias}.pk AS pk, {_object_text(query, item_conds)} AS doc",
                       lateral=lateral)
    return f"SELECT coalesce('[' || string_agg(q.doc, ',' ORDER BY q.pk) || ']', '[]') FROM ({inner}) AS q", sql.args


def _filter_items(elem: dict[str, Any], key: QueryKey, matched: list[Any] | None) -> dict[str, Any]:
    """A returned sequence keeps only the items that matched (`matched`, when the key had item values)
    and in them only the sub-keys the request named (all if it named none) (PS3.4 C.2.2.2.6)."""
    if matched is not None:
        elem = {**elem, "Value": matched}
    if not key.items or "Value" not in elem:
        return elem
    wanted = {f"{s.tag:08X}" for s in key.items}
    items = [{t: v for t, v in item.items() if t in wanted} for item in elem["Value"]]
    return {**elem, "Value": items}


def _computed_json(tag: int, value: Any) -> dict[str, Any]:
    vr = BY_TAG[tag].vr
    if value is None or value == []:
        return {"vr": vr}
    return {"vr": vr, "Value": list(value) if isinstance(value, list) else [value]}


def row_to_json(query: Query, row: Any) -> dict[str, Any]:
    """The DICOM JSON answer for one matched entity: only the keys the query names (or all)."""
    level = query.level
    sources: dict[Level, dict[str, Any]] = {}
    for lvl in Level:
        if lvl.depth <= level.depth:
            sources[lvl] = row[f"{lvl.alias}_attrs"]
    metadata = None
    if "i_metadata" in row.keys():
        metadata = json.loads(row["i_metadata"])
    out: dict[str, Any] = {}
    if query.include_all:
        for lvl in Level:
            if lvl in sources:
                out.update(sources[lvl])
        if metadata is not None:
            out.update({t: v for t, v in metadata.items() if not t.startswith("7FE0")})
    for key in query.keys:
        tag_hex = f"{key.tag:08X}"
        if key.tag in _COMPUTED_SQL:
            col = f"c_{key.tag:08x}"
            if col in row.keys():
                out[tag_hex] = _computed_json(key.tag, row[col])
            continue
        klevel = _key_level(key.tag)
        if klevel.depth > level.depth:
            continue
        src = sources[klevel]
        if klevel is Level.IMAGE and metadata is not None and tag_hex not in src:
            src = metadata
        elem = src.get(tag_hex)
        matched = row[f"m_{key.tag:08x}"] if key.vr == "SQ" and f"m_{key.tag:08x}" in row.keys() else None
        out[tag_hex] = _filter_items(elem, key, matched) if elem is not None else {"vr": key.vr}
    return dict(sorted(out.items()))
