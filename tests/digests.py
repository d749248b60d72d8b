"""The digest texts the archive records, computed here with hashlib and blake3 directly (not with
archive/digest.py, which the tests check)."""

from __future__ import annotations

import hashlib

import blake3


def blake3_text(data: bytes) -> str:
    """The digest of an object written with the default `storage.digest`."""
    return "blake3:" + blake3.blake3(data).hexdigest()


def sha256_text(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def digest_text(data: bytes, like: str) -> str:
    """The digest of `data` by the algorithm the digest text `like` names."""
    return {"blake3": blake3_text, "sha256": sha256_text}[like.partition(":")[0]](data)
