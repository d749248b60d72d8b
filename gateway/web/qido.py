"""QIDO-RS (PS3.18 10.6): search parameters to the shared `Query`, answers as DICOM JSON. No I/O.

Decisions:
- Matching is C-FIND's (archive/query.py); UID lists are comma-separated (PS3.18 8.3.4.1), other
  multi-value keys backslash-separated as in DICOM.
- `fuzzymatching=true` makes PN keys match each name component by prefix, case-insensitively.
- Keys of a level below the one searched (e.g. Modality on /studies) are ignored and named in a
  `Warning: 299` header, as are unknown parameters (PS3.18 8.3.4.4 lets the origin server ignore them).
- The default attributes of PS3.18 Table 10.6.3-3 to -5 are always returned; `includefield` adds to
  them, `includefield=all` returns every stored attribute of the levels involved.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR, tag_for_keyword

from archive.attributes import Level, level_of
from archive.jsontext import ascii_json
from archive.query import Query, QueryKey

MAX_LIMIT = 10_000


class QidoError(ValueError):
    """An unusable search (400 Bad Request, with this message as the reason)."""


# PS3.18 Table 10.6.3-3 (study), 10.6.3-4 (series), 10.6.3-5 (instance)
_STUDY_DEFAULTS = (0x00080005, 0x00080020, 0x00080030, 0x00080050, 0x00080061, 0x00080090, 0x00080201,
                   0x00100010, 0x00100020, 0x00100030, 0x00100040, 0x0020000D, 0x00200010, 0x00201206,
                   0x00201208, 0x00081030)
_SERIES_DEFAULTS = (0x00080005, 0x00080060, 0x0008103E, 0x00080201, 0x0020000E, 0x00200011, 0x00201209,
                    0x00400244, 0x00400245, 0x00400275, 0x0020000D)
_INSTANCE_DEFAULTS = (0x00080005, 0x00080016, 0x00080018, 0x00080201, 0x00200013, 0x00280010, 0x00280011,
                      0x00280100, 0x00280008, 0x0020000D, 0x0020000E)
DEFAULTS = {Level.STUDY: _STUDY_DEFAULTS, Level.SERIES: _SERIES_DEFAULTS, Level.IMAGE: _INSTANCE_DEFAULTS}
_CONTROL = {"limit", "offset", "fuzzymatching", "includefield", "emptyvalue", "orderby"}


@dataclass(frozen=True, slots=True)
class Search:
    query: Query
    warnings: tuple[str, ...]


@functools.lru_cache(maxsize=4096)
def parse_tag(name: str) -> int:
    """A keyword (`PatientName`) or eight hex digits (`00100010`) as a tag; QidoError otherwise."""
    if len(name) == 8:
        try:
            return int(name, 16)
        except ValueError:
            pass
    tag = tag_for_keyword(name)
    if tag is None:
        raise QidoError(f"{name!r} is neither a DICOM keyword nor a tag")
    return tag


@functools.lru_cache(maxsize=4096)
def _vr(tag: int) -> str:
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    return vr.split(" or ")[0]


def _split_values(vr: str, raw: str) -> str | tuple[str, ...]:
    if vr == "UI" or "\\" in raw:
        values = [v.strip() for v in raw.replace("\\", ",").split(",") if v.strip()]
        return tuple(values) if len(values) > 1 else (values[0] if values else "")
    return raw


def _int_param(params: Mapping[str, str], name: str, default: int | None) -> int | None:
    if name not in params:
        return default
    try:
        value = int(params[name])
    except ValueError as exc:
        raise QidoError(f"{name} must be a non-negative integer, not {params[name]!r}") from exc
    if value < 0:
        raise QidoError(f"{name} must be a non-negative integer")
    return value


def build_search(level: Level, params: Iterable[tuple[str, str]], path_uids: Mapping[int, str]) -> Search:
    """The Query for a QIDO-RS request at `level` with the URL's query `params` and path UIDs."""
    pairs = list(params)
    single = {k.lower(): v for k, v in pairs}
    warnings: list[str] = []
    matched: dict[int, QueryKey] = {}
    sequences: dict[int, list[QueryKey]] = {}
    for name, raw in pairs:
        if name.lower() in _CONTROL:
            continue
        head, _, sub = name.partition(".")
        try:
            tag = parse_tag(head)
            sub_tag = parse_tag(sub) if sub else None
        except QidoError as exc:
            warnings.append(f"{exc}: ignored")
            continue
        key_level = level_of(tag) or Level.IMAGE
        if key_level.depth > level.depth:
            warnings.append(f"{name} is not an attribute of the {level.value.lower()} level and was ignored")
            continue
        if sub_tag is not None:
            sequences.setdefault(tag, []).append(QueryKey(sub_tag, _vr(sub_tag), _split_values(_vr(sub_tag), raw)))
            continue
        vr = _vr(tag)
        matched[tag] = QueryKey(tag, vr, _split_values(vr, raw) if raw else None)
    for tag, items in sequences.items():
        matched[tag] = QueryKey(tag, "SQ", None, tuple(items))
    for tag, uid in path_uids.items():
        matched[tag] = QueryKey(tag, "UI", uid)

    include_all = False
    for name, raw in pairs:
        if name.lower() != "includefield":
            continue
        for field in filter(None, (f.strip() for f in raw.split(","))):
            if field.lower() == "all":
                include_all = True
                continue
            try:
                tag = parse_tag(field)
            except QidoError as exc:
                warnings.append(f"includefield {exc}: ignored")
                continue
            if (level_of(tag) or Level.IMAGE).depth > level.depth:
                warnings.append(f"includefield {field} is below the {level.value.lower()} level and was ignored")
                continue
            matched.setdefault(tag, QueryKey(tag, _vr(tag)))
    for tag in DEFAULTS[level]:
        matched.setdefault(tag, QueryKey(tag, _vr(tag)))

    limit = _int_param(single, "limit", None)
    if limit is not None:
        limit = min(limit, MAX_LIMIT)
    fuzzy = single.get("fuzzymatching", "false").lower() == "true"
    query = Query(level=level, keys=tuple(matched.values()), limit=limit,
                  offset=_int_param(single, "offset", 0) or 0, fuzzy=fuzzy, include_all=include_all,
                  top=Level.STUDY)
    return Search(query, tuple(warnings))
