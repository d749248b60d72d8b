"""Digests of stored objects: `<algorithm>:<hex>` over the whole object, as the index and RADOS manifests
record them and as moves verify copies against.

The text names its algorithm, so an object written under one `storage.digest` setting stays verifiable
under another. BLAKE3 is the default: it is the largest single CPU item of ingest after Python itself, and
on this machine a 512 KiB CT slice takes 0.07 ms against SHA-256's 0.31 ms (OpenSSL with SHA-NI;
docs/performance.md). SHA-256 (FIPS 180-4) remains for deployments that must use a FIPS hash.
Both release the GIL on large inputs, so hashing in a worker thread does not stall the event loop.

Pure functions, no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol

import blake3

from archive.config import DigestAlgorithm
from archive.errors import StorageError


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> object: ...

    def hexdigest(self) -> str: ...


def hasher(algorithm: DigestAlgorithm) -> Hasher:
    """A fresh incremental hasher for `algorithm`."""
    if algorithm is DigestAlgorithm.blake3:
        return blake3.blake3()
    return hashlib.sha256()


def text(algorithm: DigestAlgorithm, h: Hasher) -> str:
    """The digest text of a finished hasher."""
    return f"{algorithm.value}:{h.hexdigest()}"


def digest_of(parts: Sequence[bytes | memoryview], algorithm: DigestAlgorithm) -> str:
    h = hasher(algorithm)
    for p in parts:
        h.update(p)
    return text(algorithm, h)


def algorithm_of(digest: str) -> DigestAlgorithm:
    """The algorithm a digest text names; StorageError if it names none we know."""
    name, sep, value = digest.partition(":")
    try:
        if not sep or not value:
            raise ValueError(digest)
        return DigestAlgorithm(name)
    except ValueError:
        raise StorageError(f"{digest!r} is not a digest this archive can verify "
                           f"(<{'|'.join(a.value for a in DigestAlgorithm)}>:<hex>)") from None


def recompute(digest: str, data: bytes | memoryview) -> str:
    """The digest of `data` by the algorithm `digest` names: equal to `digest` when `data` is intact."""
    return digest_of([data], algorithm_of(digest))
