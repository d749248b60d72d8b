"""The archive as the protocol layers see it: one bundle handed to the DIMSE server and the web app."""

from __future__ import annotations

from dataclasses import dataclass

from archive.index import Index
from archive.ingest import Ingestor
from archive.objectstore import ObjectStore
from archive.stores import StoreRegistry


@dataclass(frozen=True, slots=True)
class ArchiveServices:
    """`stores` reads every recorded object: `stores.for_location(inst.store, inst.location)`; `store` is the
    default storage class's store (where new objects go without a policy file)."""

    index: Index
    store: ObjectStore
    ingestor: Ingestor
    stores: StoreRegistry = None  # type: ignore[assignment]  # None: the ingestor's registry

    def __post_init__(self) -> None:
        if self.stores is None:
            object.__setattr__(self, "stores", self.ingestor.stores)
