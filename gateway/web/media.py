"""Media types and the Accept header as DICOMweb clients really send them (PS3.18 8.7). No I/O.

Handles lists, q-values, quoted and unquoted parameters (`type="application/dicom"` and
`type=application/octet-stream` both occur), `type="*/*"` and `*/*`, and `transfer-syntax=*`.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class MediaRange:
    type: str                       # e.g. "multipart/related", "application/dicom+json", "*/*"
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    def matches(self, media_type: str) -> bool:
        """Does this range admit `media_type` (no parameters)?"""
        if self.type == "*/*":
            return True
        main, _, sub = self.type.partition("/")
        other_main, _, other_sub = media_type.partition("/")
        return main == other_main and (sub == "*" or sub == other_sub)


def _split(text: str, sep: str) -> list[str]:
    """Split on `sep` outside double quotes."""
    parts, current, quoted = [], [], False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def parse_media_range(text: str) -> MediaRange | None:
    pieces = _split(text, ";")
    media = pieces[0].strip().lower()
    if not media:
        return None
    if "/" not in media:
        media = "*/*" if media == "*" else media + "/*"
    params: dict[str, str] = {}
    q = 1.0
    for piece in pieces[1:]:
        name, eq, value = piece.partition("=")
        name = name.strip().lower()
        value = value.strip().strip('"').strip()
        if not eq or not name:
            continue
        if name == "q":
            try:
                q = max(0.0, min(1.0, float(value)))
            except ValueError:
                q = 0.0
        else:
            # only the `type` parameter is case-insensitive; a boundary or a UID is not
            params[name] = value.lower() if name == "type" else value
    return MediaRange(media, params, q)


def parse_accept(header: str | None) -> list[MediaRange]:
    """The ranges of an Accept header, best first (stable for equal q); empty header: `*/*`."""
    return list(_parse_accept(header))


@functools.lru_cache(maxsize=256)  # clients send the same few Accept headers again and again
def _parse_accept(header: str | None) -> tuple[MediaRange, ...]:
    return tuple(_parse_accept_uncached(header))


def _parse_accept_uncached(header: str | None) -> list[MediaRange]:
    if not header or not header.strip():
        return [MediaRange("*/*")]
    ranges = [r for r in (parse_media_range(p) for p in _split(header, ",")) if r is not None]
    ranges = [r for r in ranges if r.q > 0]
    return sorted(ranges, key=lambda r: -r.q)


def content_type_params(header: str | None) -> MediaRange | None:
    """A Content-Type header as a MediaRange (for multipart: its `type` and `boundary`)."""
    if not header:
        return None
    return parse_media_range(header)
