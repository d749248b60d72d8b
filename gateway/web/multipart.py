"""A streaming multipart/related writer (RFC 2387, RFC 2046 5.1) for WADO-RS answers (PS3.18 8.6.1.2).

Sans-I/O: it only builds the bytes around the parts; the caller streams each part's body between
`part_header` and the next part (or `close`), so a study is never held in memory.

    writer = MultipartRelated("application/dicom")
    response.headers["Content-Type"] = writer.content_type
    yield writer.part_header("application/dicom")
    async for chunk in store.stream(location): yield chunk
    yield writer.close()
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterable, AsyncIterator, Iterable


class MultipartRelated:
    """One multipart/related body whose root type (the `type` parameter) is `part_type`."""

    def __init__(self, part_type: str, *, boundary: str | None = None) -> None:
        # 32 random hex digits: RFC 2046 5.1.1 requires the boundary not to occur in any part
        self.boundary = boundary or os.urandom(16).hex()
        self.part_type = part_type
        self._parts = 0

    @property
    def content_type(self) -> str:
        """The Content-Type header of the whole message (RFC 2387 3.1 `type`; quoted: it holds a '/')."""
        return f'multipart/related; type="{self.part_type}"; boundary={self.boundary}'

    def part_header(self, content_type: str, headers: Iterable[tuple[str, str]] = ()) -> bytes:
        """The delimiter and headers that open the next part; its body follows directly."""
        # RFC 2046 5.1.1: the CRLF before a delimiter belongs to the delimiter, not to the previous body
        lead = b"\r\n" if self._parts else b""
        self._parts += 1
        lines = [f"--{self.boundary}", f"Content-Type: {content_type}"]
        lines += [f"{name}: {value}" for name, value in headers]
        return lead + ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def close(self) -> bytes:
        """The close delimiter that ends the message."""
        lead = b"\r\n" if self._parts else b""
        return lead + f"--{self.boundary}--\r\n".encode("latin-1")

    @property
    def parts(self) -> int:
        return self._parts


async def stream_parts(writer: MultipartRelated,
                       parts: AsyncIterable[tuple[str, list[tuple[str, str]], AsyncIterable[bytes]]],
                       ) -> AsyncIterator[bytes]:
    """The whole message as chunks: for each (content type, headers, body chunks) a part."""
    async for content_type, headers, body in parts:
        yield writer.part_header(content_type, headers)
        async for chunk in body:
            yield chunk
    yield writer.close()
