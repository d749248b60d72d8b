"""The archive as the protocol layers see it: one bundle handed to the DIMSE server and the web app."""

from __future__ import annotations

from dataclasses import dataclass

from archive.index import Index
from archive.ingest import Ingestor
from archive.objectstore import ObjectStore


@dataclass(frozen=True, slots=True)
class ArchiveServices:
    index: Index
    store: ObjectStore
    ingestor: Ingestor
