"""JSON text fast: orjson's encoder, with the output json.dumps(separators=(",", ":")) would give.

Stored DICOM JSON and responses are ASCII, non-ASCII characters written as \\u escapes (RFC 8259 7): the
index's SQL builds JSON by text concatenation on that assumption (archive/index.py `metadata_json`,
gateway/web/qido.py). orjson writes UTF-8, so a text that is not pure ASCII (rare: names in other
scripts) is written by the standard encoder instead. orjson is 5-10x faster on the nested dicts of a
data set's metadata, encoded once per stored instance.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def dumps(obj: Any) -> str:
    """Compact JSON text of `obj`, ASCII only."""
    try:
        data = orjson.dumps(obj)
    except TypeError:  # what orjson does not take (e.g. an integer beyond 64 bits)
        return json.dumps(obj, separators=(",", ":"))
    if data.isascii():
        return data.decode("ascii")
    return json.dumps(obj, separators=(",", ":"))


def dumps_bytes(obj: Any) -> bytes:
    """`dumps` as bytes (an HTTP body)."""
    try:
        data = orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, separators=(",", ":")).encode("ascii")
    return data if data.isascii() else json.dumps(obj, separators=(",", ":")).encode("ascii")
