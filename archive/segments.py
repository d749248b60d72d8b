"""Packed segments: the filesystem store's small objects written into large preallocated files.

Why: a file per object costs an inode, a directory entry and, at its fdatasync, the writes that make them
durable: on the journal-less ext4 of this project's machines about 0.4 ms of CPU for a 512 KiB instance.
A segment is a file allocated ahead (fallocate) into which objects are written at increasing offsets; an
object's fdatasync then records only its data and the change of its extent from unwritten to written.
STOW-RS of 512 KiB instances, one per request: +20-27 % instances/s, 0.3-0.6 ms less CPU per instance
(docs/performance.md, "Packed segments"). Zeroing segments ahead (with direct I/O) instead of allocating
them was measured too and is slower: the zeros compete for the disk with the objects and the WAL.

Layout of a segment (`<prefix>.segments/<name>.seg` under the store's root): regions, each beginning at a
multiple of 4096 bytes, each
- a 512-byte header: the magic `VNASEG01`, the object's size (u64, little endian), the length of its key
  (u16) and the key (UTF-8; what the object was stored as, for an operator; at most 494 bytes kept);
- the object's bytes, then zeros to the next multiple of 4096.
A block not beginning with the magic is no object: space not written yet, or a punched hole.
An object's location is `<segment>@<offset>+<size>`, the offset being where its bytes begin.

Deleting an object punches a hole over its region (fallocate FALLOC_FL_PUNCH_HOLE), which frees its
blocks at once. An object written but never indexed (a crash between the two) stays until the orphan
sweeper prunes its segment (archive/ingest.py `sweep_orphans`): every range of a segment that holds no
object the index names is punched, and a segment that holds none is removed. It prunes only segments
unchanged for the grace period and not locked: a process holds an exclusive flock on every segment it may
still write into.

Functions here block: the store calls them in its threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import secrets
import socket
import struct
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

ALIGN = 4096
HEADER_BYTES = 512
MAGIC = b"VNASEG01"
_HEAD = struct.Struct("<8sQH")
_KEY_MAX = HEADER_BYTES - _HEAD.size
SEGMENTS_DIR = ".segments"
SUFFIX = ".seg"
_ZERO_WRITE = 8 << 20  # bytes per write of zeros where holes cannot be punched

_LOCATION = re.compile(r"^(?P<segment>(?:[^@]*/)?\.segments/[^/@]+\.seg)@(?P<offset>\d+)\+(?P<size>\d+)$")


@dataclass(frozen=True, slots=True)
class PackedLocation:
    segment: str  # the segment file, relative to the store's root
    offset: int   # where the object's bytes begin
    size: int

    @property
    def region(self) -> tuple[int, int]:
        """(start, length) of the object's region: header, bytes and padding."""
        start = self.offset - HEADER_BYTES
        return start, region_length(self.size)

    def text(self) -> str:
        return f"{self.segment}@{self.offset}+{self.size}"


def parse_location(location: str) -> PackedLocation | None:
    """The packed location `location` names, or None for a location of a file of its own."""
    m = _LOCATION.match(location)
    if m is None:
        return None
    offset = int(m["offset"])
    if offset < HEADER_BYTES or (offset - HEADER_BYTES) % ALIGN:
        return None
    return PackedLocation(m["segment"], offset, int(m["size"]))


def holds(fd: int, location: PackedLocation) -> bool:
    """Does the segment open as `fd` still hold the object at `location` (its header in place)?"""
    head = os.pread(fd, _HEAD.size, location.offset - HEADER_BYTES)
    return len(head) == _HEAD.size and _HEAD.unpack(head)[:2] == (MAGIC, location.size)


def region_length(size: int) -> int:
    return -(-(HEADER_BYTES + size) // ALIGN) * ALIGN


def header(key: str, size: int) -> bytes:
    encoded = key.encode("utf-8")[:_KEY_MAX]
    return _HEAD.pack(MAGIC, size, len(encoded)) + encoded + bytes(_KEY_MAX - len(encoded))


def scan(fd: int, segment: str) -> Iterator[tuple[PackedLocation, str]]:
    """Every object in the segment open as `fd`: (location, key), in the order of the file."""
    end = os.fstat(fd).st_size
    offset = 0
    while offset < end:
        try:
            offset = os.lseek(fd, offset, os.SEEK_DATA)  # over punched holes at once
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # nothing but holes to the end
                return
            raise
        offset -= offset % ALIGN
        head = os.pread(fd, HEADER_BYTES, offset)
        if len(head) < HEADER_BYTES or not head.startswith(MAGIC):
            offset += ALIGN
            continue
        _magic, size, key_length = _HEAD.unpack_from(head)
        if offset + HEADER_BYTES + size > end:  # a header whose object cannot be there: not one of ours
            offset += ALIGN
            continue
        key = head[_HEAD.size:_HEAD.size + key_length].decode("utf-8", "replace")
        yield PackedLocation(segment, offset + HEADER_BYTES, size), key
        offset += region_length(size)


_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def allocate(fd: int, size: int) -> None:
    """Allocate [0, size) (Linux fallocate, mode 0: unwritten extents, nothing written). Not glibc's
    posix_fallocate, which on a filesystem without fallocate writes every block instead; there the segment
    simply grows with its objects."""
    if _fallocate is not None and _fallocate(fd, 0, 0, size) == 0:
        return
    err = ctypes.get_errno() if _fallocate is not None else errno.ENOSYS
    if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
        raise OSError(err, os.strerror(err))


def punch(fd: int, start: int, length: int) -> bool:
    """Free the blocks of [start, start + length), which then read as zeros; False where the filesystem cannot
    (the range is then zeroed by a write, and its space stays taken until the segment is removed)."""
    if length <= 0:
        return True
    if _fallocate is not None and _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, start, length) == 0:
        return True
    err = ctypes.get_errno() if _fallocate is not None else errno.ENOSYS
    if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
        raise OSError(err, os.strerror(err))
    zeros = bytes(min(length, _ZERO_WRITE))
    for at in range(start, start + length, len(zeros)):
        os.pwrite(fd, zeros[:min(len(zeros), start + length - at)], at)
    return False


@dataclass(eq=False)
class Segment:
    """One segment a writer writes into; its descriptor holds an exclusive flock while the writer may write."""

    path: str      # absolute
    segment: str   # relative to the store's root (the location's first part)
    fd: int
    size: int      # allocated up to here: regions are reserved below it
    reserved: int = 0     # where the next region goes
    users: int = 0        # puts between their reservation and their fdatasync
    sealed: bool = False


class SegmentWriter:
    """Reserves regions in the current segment of each prefix (a storage class's directory). A writer's first
    segment under a prefix is `FIRST_SEGMENT_BYTES`, each next one twice as large up to `segment_bytes`, so that a
    server storing little allocates little. A process keeps an exclusive flock on each segment it may still write
    into; the orphan sweeper prunes only segments it can lock."""

    FIRST_SEGMENT_BYTES = 16 << 20

    def __init__(self, root: str, *, segment_bytes: int, fsync: bool) -> None:
        self.root = root
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self._current: dict[str, Segment] = {}
        self._lock = threading.Lock()
        self._name = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self._count = 0

    def reserve(self, prefix: str, length: int) -> tuple[Segment, int]:
        """A region of `length` bytes (a multiple of ALIGN) for an object under `prefix`: (segment, start). Call
        `release` once it is written and synced."""
        with self._lock:
            segment = self._current.get(prefix)
            if segment is None or segment.reserved + length > segment.size:
                size = self.FIRST_SEGMENT_BYTES if segment is None else 2 * segment.size
                size = max(min(size, self.segment_bytes), length)
                if segment is not None:
                    self._seal(segment)
                    del self._current[prefix]
                segment = self._current[prefix] = self._create(prefix, size)
            start = segment.reserved
            segment.reserved += length
            segment.users += 1
            return segment, start

    def release(self, segment: Segment) -> None:
        with self._lock:
            segment.users -= 1
            if segment.sealed and segment.users == 0:
                os.close(segment.fd)

    def close(self) -> None:
        with self._lock:
            for segment in self._current.values():
                self._seal(segment)
            self._current.clear()

    def _seal(self, segment: Segment) -> None:  # under the lock
        segment.sealed = True
        if segment.users == 0:
            os.close(segment.fd)

    def _create(self, prefix: str, size: int) -> Segment:
        """A new segment, locked and allocated (fallocate: its blocks are reserved, so that an object's fdatasync
        records no allocation of its own, only the extent's change from unwritten to written)."""
        directory = os.path.join(self.root, prefix, SEGMENTS_DIR)
        new_directory = not os.path.isdir(directory)
        if new_directory:
            os.makedirs(directory, exist_ok=True)
        self._count += 1
        name = f"{self._name}-{self._count:06d}{SUFFIX}"
        path = os.path.join(directory, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # new: nobody else holds it
            allocate(fd, size)
            if self.fsync:  # the segment's name, once per segment (its objects are synced with fdatasync)
                fsync_directory(directory)
                if new_directory:
                    fsync_directory(os.path.dirname(directory))
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return Segment(path, f"{prefix}{SEGMENTS_DIR}/{name}", fd, size)


def write_object(segment: Segment, start: int, key: str, parts: Sequence[bytes | memoryview], size: int,
                 hasher: object | None, fsync: bool) -> None:
    """Write one object's region (header, bytes, padding) at `start` and sync it; `hasher.update` sees its bytes."""
    pad = region_length(size) - HEADER_BYTES - size
    buffers: list[bytes | memoryview] = [header(key, size), *parts]
    if pad:
        buffers.append(bytes(pad))
    if hasher is not None:
        for p in parts:
            hasher.update(p)  # type: ignore[attr-defined]
    total = HEADER_BYTES + size + pad
    written = os.pwritev(segment.fd, buffers, start)
    if written < total:  # a short write (rare on a regular file): the rest one piece at a time
        data = b"".join(buffers)
        while written < total:
            written += os.pwrite(segment.fd, memoryview(data)[written:], start + written)
    if fsync:
        os.fdatasync(segment.fd)


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Make the entries of `directory` durable (a new name in it, POSIX fsync)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(path: str, segment: str, keep: set[str]) -> tuple[int, bool]:
    """Punch every range of the segment at `path` that holds no object in `keep` (locations); remove the
    segment if it holds none. (objects removed, whether the segment was removed). A segment a writer holds
    (its flock) is left alone."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0, False  # a writer may still write into it
        size = os.fstat(fd).st_size
        kept: list[tuple[int, int]] = []
        removed = 0
        for location, _key in scan(fd, segment):
            if location.text() in keep:
                kept.append(location.region)
            else:
                removed += 1
        if not kept:
            os.unlink(path)
            return removed, True
        at = 0
        for start, length in kept:
            punch(fd, at, start - at)
            at = start + length
        punch(fd, at, size - at)
        return removed, False
    finally:
        os.close(fd)


def segments_under(root: str) -> Iterator[tuple[str, str]]:
    """(path, segment relative to root) of every segment under `root`."""
    for dirpath, _dirs, files in os.walk(root):
        if os.path.basename(dirpath) != SEGMENTS_DIR:
            continue
        for name in files:
            if name.endswith(SUFFIX):
                path = os.path.join(dirpath, name)
                yield path, os.path.relpath(path, root)


@contextlib.contextmanager
def opened(path: str, flags: int = os.O_RDONLY) -> Iterator[int]:
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)
