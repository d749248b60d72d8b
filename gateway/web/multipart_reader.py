"""multipart/related bodies (RFC 2046 5.1.1, RFC 2387) parsed as they arrive, for STOW-RS. No I/O.

Fed bytes in any chunking, `BodyParser.feed` returns events: `PartStart` (the part's headers, or why
they are unusable), `PartData` (a slice of its content) and `PartEnd`. Memory stays bounded by the
header limit plus one delimiter, whatever the size of a part, so the caller decides where the content
goes (memory, a temporary file).

Framing, as RFC 2046 has it: an optional preamble; each part is introduced by a delimiter line
`--boundary` (at the very start of the body, or after CRLF), optional linear white space and CRLF;
then the part's header lines, an empty line and its content; the close-delimiter `--boundary--` ends
the last part; whatever follows (the epilogue) is ignored. A CRLF before a delimiter belongs to the
delimiter, not to the content.

What is recoverable stays per part: headers that cannot be parsed, or a header block beyond the
limit, give a `PartStart` with `error` set and the part's content is still delimited (the caller
discards it), so the parts after it are not lost. What is not recoverable raises `MultipartError` from
`close()`: a body that ends before its close-delimiter (truncated), or that has no delimiter at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MAX_HEADER_BYTES = 16 * 1024   # per part; a DICOM part needs one or two short header lines
_MAX_PADDING = 256             # linear white space allowed after a boundary (RFC 2046 "transport-padding")
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_LINE_END = re.compile(rb"\r?\n")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 5.6.2 header field name

_PREAMBLE, _HEADERS, _BODY, _END = "preamble", "headers", "body", "end"


class MultipartError(ValueError):
    """The body as a whole cannot be parsed (400 Bad Request with this reason)."""


@dataclass(frozen=True, slots=True)
class PartStart:
    number: int                                   # 1-based position in the body
    headers: dict[str, str] = field(default_factory=dict)  # names lower-cased
    error: str | None = None                      # the headers are unusable: discard this part


@dataclass(frozen=True, slots=True)
class PartData:
    number: int
    data: bytes | memoryview  # a view of the chunk fed, when no copy was needed: use it before the next feed


@dataclass(frozen=True, slots=True)
class PartEnd:
    number: int


Event = PartStart | PartData | PartEnd


def valid_boundary(boundary: str) -> bool:
    """RFC 2046 5.1.1: 1 to 70 characters, printable ASCII, not ending in a space."""
    return 0 < len(boundary) <= 70 and boundary.isascii() and boundary.isprintable() and not boundary.endswith(" ")


def parse_headers(block: bytes) -> tuple[dict[str, str], str | None]:
    """The header fields of one part (RFC 5322 2.2 syntax, folded lines joined), or why they are unusable."""
    headers: dict[str, str] = {}
    name: str | None = None
    for raw in re.split(rb"\r?\n", block):
        line = raw.decode("latin-1")
        if line[:1] in (" ", "\t") and name is not None:  # obsolete line folding
            headers[name] += " " + line.strip()
            continue
        name_part, colon, value = line.partition(":")
        if not colon or not _TOKEN.match(name_part):
            return {}, f"part header line {line[:60]!r} is not 'Name: value'"
        name = name_part.lower()
        headers[name] = value.strip()
    return headers, None


class BodyParser:
    """Incremental parser of one multipart body with a known boundary.

    What is kept between chunks is `_buf` from offset `_off`: the few bytes that may begin a delimiter, or
    headers not yet complete. A chunk is scanned where it lies (joined to that small rest only when there is
    one) and content is handed out as views of it, so no byte of a part is copied here.
    """

    def __init__(self, boundary: str, *, max_header_bytes: int = MAX_HEADER_BYTES) -> None:
        if not valid_boundary(boundary):
            raise MultipartError(f"boundary {boundary[:80]!r} is not 1-70 printable characters (RFC 2046 5.1.1)")
        self._delimiter = b"\r\n--" + boundary.encode("ascii")
        self._max_header_bytes = max_header_bytes
        # the first delimiter may open the body without a CRLF before it: pretend there was one
        self._buf: bytes = b"\r\n"
        self._off = 0
        self._scanned = 0  # where the next delimiter search in _buf may start (what precedes was searched)
        self._state = _PREAMBLE
        self.parts = 0

    @property
    def finished(self) -> bool:
        return self._state == _END

    def feed(self, data: bytes) -> list[Event]:
        if self._state == _END:
            return []  # epilogue
        events: list[Event] = []
        if self._state == _BODY and self._body_without_delimiter(data, events):
            return events
        rest = len(self._buf) - self._off
        if rest:
            self._buf = self._buf[self._off:] + bytes(data)
            self._scanned = 0  # a delimiter may begin in the rest: search it all
        else:
            self._buf = bytes(data)
        self._off = 0
        while self._step(events):
            pass
        return events

    def _body_without_delimiter(self, data: bytes, events: list[Event]) -> bool:
        """The common case inside a large part: a chunk with no delimiter in it or across its edges is
        content, handed out without being copied; False to take the general path."""
        d = self._delimiter
        rest = self._buf[self._off:]
        if len(rest) >= len(d) or len(data) < len(d):
            return False
        at = data.find(d)
        if at >= 0:
            self._scanned = at  # no delimiter lies wholly inside data before `at`: the general path starts there
            return False
        if rest and d in rest + data[:len(d) - 1]:
            return False  # a delimiter that begins in what was kept from the previous chunk
        keep = self._partial_delimiter(data)
        if rest:
            events.append(PartData(self.parts, rest))
        events.append(PartData(self.parts, memoryview(data)[:len(data) - keep] if keep else data))
        self._buf, self._off = (bytes(data[len(data) - keep:]) if keep else b""), 0
        return True

    def _partial_delimiter(self, buf: bytes, start: int = 0) -> int:
        """The length of the longest end of buf[start:] that could begin a delimiter (0 almost always)."""
        d = self._delimiter
        lo = max(start, len(buf) - len(d) + 1)
        pos = buf.rfind(b"\r", lo)
        while pos >= 0:
            if d.startswith(buf[pos:]):
                return len(buf) - pos
            pos = buf.rfind(b"\r", lo, pos)
        return 0

    def close(self) -> list[Event]:
        """The body has ended: raise MultipartError unless the close-delimiter was seen."""
        if self._state == _PREAMBLE:
            raise MultipartError("the body holds no delimiter line for its boundary")
        if self._state == _HEADERS:
            raise MultipartError(f"the body ends inside the headers of part {self.parts}")
        if self._state == _BODY:
            raise MultipartError(f"the body ends inside part {self.parts}, before the close-delimiter")
        return []

    # -- one transition; True while progress is possible without more input -------------------------
    def _step(self, events: list[Event]) -> bool:
        if self._state == _PREAMBLE:
            return self._preamble(events)
        if self._state == _HEADERS:
            return self._headers(events)
        if self._state == _BODY:
            return self._body(events)
        return False

    def _delimiter_end(self, at: int) -> tuple[str, int] | None:
        """After a delimiter at `at`: ('close'|'open', where the next thing starts), 'invalid' as kind
        if the boundary is followed by something else, None if more input is needed to tell."""
        buf, pos = self._buf, at + len(self._delimiter)
        if len(buf) < pos + 2:
            return None
        if buf[pos:pos + 2] == b"--":
            return "close", pos + 2
        end = pos
        while end < len(buf) and buf[end] in b" \t":
            end += 1
            if end - pos > _MAX_PADDING:
                return "invalid", at + 1
        if end + 1 > len(buf) or (buf[end:end + 1] == b"\r" and end + 2 > len(buf)):
            return None
        if buf[end:end + 2] == b"\r\n":
            return "open", end + 2
        if buf[end:end + 1] == b"\n":  # a bare LF, as some hand-made bodies have
            return "open", end + 1
        return "invalid", at + 1

    def _find_delimiter(self, events: list[Event], number: int | None) -> tuple[str, int] | None:
        """Scan for the next delimiter, emitting (or, in the preamble, dropping) what precedes it."""
        start, self._scanned = max(self._off, self._scanned), 0
        while True:
            at = self._buf.find(self._delimiter, start)
            if at < 0:
                keep = self._partial_delimiter(self._buf, self._off)
                self._release(len(self._buf) - keep, events, number)
                return None
            end = self._delimiter_end(at)
            if end is None:
                self._release(at, events, number)
                return None
            kind, nxt = end
            if kind == "invalid":  # boundary text inside the content, not a delimiter line
                start = nxt
                continue
            self._release(at, events, number)
            self._off = nxt
            return kind, 0

    def _release(self, upto: int, events: list[Event], number: int | None) -> None:
        if upto <= self._off:
            return
        if number is not None:
            events.append(PartData(number, memoryview(self._buf)[self._off:upto]))  # a view, no copy
        self._off = upto

    def _open_part(self, kind: str) -> None:
        if kind == "close":
            self._state = _END
            self._buf, self._off = b"", 0
        else:
            self.parts += 1
            self._state = _HEADERS

    def _preamble(self, events: list[Event]) -> bool:
        found = self._find_delimiter(events, None)
        if found is None:
            return False
        self._open_part(found[0])
        return self._state != _END

    def _headers(self, events: list[Event]) -> bool:
        buf, off = self._buf, self._off
        empty = _LINE_END.match(buf, off)
        if empty:  # no header fields at all
            block, body_at = b"", empty.end()
        else:
            end = _HEADER_END.search(buf, off, off + self._max_header_bytes + 4)
            delimiter_at = buf.find(self._delimiter, off, off + self._max_header_bytes + len(self._delimiter))
            if delimiter_at >= 0 and (end is None or delimiter_at < end.start()):
                # the next delimiter comes before the empty line that ends the headers
                events.append(PartStart(self.parts, error=f"part {self.parts} has no empty line after its headers"))
                self._state = _BODY
                return True
            if end is None:
                if len(buf) - off > self._max_header_bytes:
                    # the part keeps its framing: its content (headers included) is delimited and dropped
                    events.append(PartStart(self.parts, error=f"part headers exceed {self._max_header_bytes} bytes"))
                    self._state = _BODY
                    return True
                return False
            block, body_at = buf[off:end.start()], end.end()
        headers, error = parse_headers(block) if block else ({}, None)
        events.append(PartStart(self.parts, headers, error))
        # empty content is fine: the delimiter (CRLF included) then follows at once
        self._off = body_at
        self._state = _BODY
        return True

    def _body(self, events: list[Event]) -> bool:
        found = self._find_delimiter(events, self.parts)
        if found is None:
            return False
        events.append(PartEnd(self.parts))
        self._open_part(found[0])
        return self._state != _END
