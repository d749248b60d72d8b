"""archive/jsontext.py: orjson's speed, json.dumps' text (compact, ASCII only)."""

from __future__ import annotations

import json

import pytest

from archive.jsontext import dumps, dumps_bytes


@pytest.mark.parametrize("obj", [
    {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^John"}]}, "00280030": {"vr": "DS", "Value": [0.5, 2]}},
    {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎"}]}},
    {"big": 2**70, "list": [None, True, "x\"y\\z\n"]},
])
def test_same_value_and_ascii_text_as_json_dumps(obj: object) -> None:
    text = dumps(obj)
    assert text.isascii()
    assert json.loads(text) == obj
    assert dumps_bytes(obj) == text.encode("ascii")


def test_non_ascii_is_escaped_as_json_dumps_does() -> None:
    obj = {"a": "Müller"}
    assert dumps(obj) == json.dumps(obj, separators=(",", ":")) == '{"a":"M\\u00fcller"}'


def test_compact_like_json_dumps() -> None:
    obj = {"00080016": {"vr": "UI", "Value": ["1.2.3"]}, "n": [1, 2, 3]}
    assert dumps(obj) == json.dumps(obj, separators=(",", ":"))
