"""The error tree of vna (one module so every layer catches the same families).

    VnaError
    ├── MisuseError          the caller or the operator did something wrong
    │   ├── ConfigError          bad settings, missing package, bad command-line value
    │   └── InvalidInstance      a DICOM object we refuse (carries a DIMSE status and a reason)
    │       └── DuplicateConflict    same SOP Instance UID, other content, policy "reject"
    ├── RemoteError          a peer or a service failed
    │   ├── DatabaseError        PostgreSQL
    │   ├── StorageError         the object store
    │   └── PeerError            a remote DICOM node (C-MOVE destination)
    └── InternalError        a bug in vna

At the DIMSE edge these become Status codes (PS3.7 Annex C); at the HTTP edge HTTP errors with a reason.
"""

from __future__ import annotations


class VnaError(Exception):
    """Base of every error vna raises on purpose."""


class MisuseError(VnaError):
    pass


class ConfigError(MisuseError):
    pass


class InvalidInstance(MisuseError):
    """An instance refused at ingest. `status` is the DIMSE status a C-STORE SCP answers with."""

    # PS3.4 B.2.3: 0xA9xx "Data Set does not match SOP Class", 0xC0xx "Cannot understand"
    def __init__(self, reason: str, *, status: int = 0xC000, code: str = "invalid") -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.code = code


class DuplicateConflict(InvalidInstance):
    def __init__(self, reason: str) -> None:
        # 0xA900 would claim a SOP class mismatch; PS3.4 leaves the C-STORE code for "duplicate with
        # other content" to the implementation within the Cannot Understand range.
        super().__init__(reason, status=0xC011, code="conflict")


class RemoteError(VnaError):
    pass


class DatabaseError(RemoteError):
    pass


class StorageError(RemoteError):
    pass


class PeerError(RemoteError):
    pass


class InternalError(VnaError):
    pass
