"""Packed segments of the filesystem store (archive/segments.py, archive/objectstore.py): objects written into
preallocated files, read back whole and in ranges, deleted by punching holes, and pruned by the orphan sweeper."""

from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path

import pytest

from archive import segments
from archive.errors import StorageError
from archive.index import Index
from archive.ingest import sweep_orphans
from archive.objectstore import FileSystemStore
from metrics.registry import Metrics
from tests.conftest import make_ingestor
from tests.digests import blake3_text
from tests.test_stow import make_instance

SIZES = [0, 1, 4096 - segments.HEADER_BYTES - 1, 4096 - segments.HEADER_BYTES, 4096, 300_001]


def packed_store(root: Path, **kw: int) -> FileSystemStore:
    return FileSystemStore(root, pack_max_bytes=kw.pop("pack_max_bytes", 1 << 20), **kw)


def segment_files(root: Path) -> list[Path]:
    return sorted(root.rglob(f"*{segments.SUFFIX}"))


async def test_a_packed_object_reads_back_whole_and_in_ranges(tmp_path: Path) -> None:
    store = packed_store(tmp_path)
    data = [os.urandom(n) for n in SIZES]
    objs = [await store.put(f"1.2/3.4/{i}.dcm", [d[:7], d[7:]], pack_prefix="", timeout=5) for i, d in enumerate(data)]
    for obj, d in zip(objs, data, strict=True):
        packed = segments.parse_location(obj.location)
        assert packed is not None and packed.segment.startswith(".segments/") and packed.size == len(d)
        assert (packed.offset - segments.HEADER_BYTES) % segments.ALIGN == 0  # each region starts on a block
        assert obj.size == len(d) and obj.digest == blake3_text(d)
        assert await store.get(obj.location, timeout=5) == d
        assert await store.get(obj.location, offset=3, timeout=5) == d[3:]
        assert b"".join([c async for c in store.stream(obj.location, offset=5, chunk_size=4096)]) == d[5:]
        assert await store.stat(obj.location, timeout=5) == len(d)
    [segment] = segment_files(tmp_path)
    # allocated ahead (fallocate): the objects' fdatasyncs record no allocation of their own
    assert segment.stat().st_size == segment.stat().st_blocks * 512 == segments.SegmentWriter.FIRST_SEGMENT_BYTES
    # no file per object: the directories of the keys are never made
    assert not (tmp_path / "1.2").exists()
    # the segment describes itself: every object with the key it was stored as
    assert sorted(await store.packed_objects()) == sorted((o.location, f"1.2/3.4/{i}.dcm") for i, o in enumerate(objs))


async def test_objects_written_at_once_get_regions_of_their_own(tmp_path: Path) -> None:
    store = packed_store(tmp_path)
    data = [os.urandom(1000 + 7919 * i) for i in range(40)]
    objs = await asyncio.gather(*(store.put(f"k/{i}", [d], pack_prefix="", timeout=10) for i, d in enumerate(data)))
    regions = sorted(segments.parse_location(o.location).region for o in objs)  # type: ignore[union-attr]
    for (start, length), (nxt, _) in zip(regions, regions[1:]):
        assert start + length <= nxt
    assert [await store.get(o.location, timeout=5) for o in objs] == data


async def test_segments_grow_and_large_objects_keep_a_file_of_their_own(tmp_path: Path) -> None:
    store = packed_store(tmp_path, segment_bytes=1 << 20, pack_max_bytes=300_000)
    objs = [await store.put(f"k/{i}", [bytes([i]) * 200_000], pack_prefix="p/", timeout=5) for i in range(12)]
    assert all(o.location.startswith("p/.segments/") for o in objs)  # under the storage class's directory
    assert len(segment_files(tmp_path)) == 3  # 12 regions of 200 KiB in segments of at most 1 MiB
    assert [await store.get(o.location, timeout=5) for o in objs] == [bytes([i]) * 200_000 for i in range(12)]
    big = await store.put("k/big", [b"x" * 300_001], pack_prefix="p/", timeout=5)  # over pack_max_bytes
    assert big.location == "k/big" and (tmp_path / "k/big").stat().st_size == 300_001
    plain = await store.put("k/plain", [b"y"], timeout=5)  # no prefix: a move's put, at its planned location
    assert plain.location == "k/plain"


async def test_delete_frees_the_region_and_nothing_else(tmp_path: Path) -> None:
    store = packed_store(tmp_path)
    objs = [await store.put(f"k/{i}", [bytes([65 + i]) * 200_000], pack_prefix="", timeout=5) for i in range(3)]
    [segment] = segment_files(tmp_path)
    blocks = segment.stat().st_blocks
    await store.delete(objs[1].location, timeout=5)
    assert segment.stat().st_blocks <= blocks - 2 * (200_000 // 1024)  # 512-byte blocks: the space is freed
    assert [loc for loc, _ in await store.packed_objects()] == [objs[0].location, objs[2].location]
    assert await store.get(objs[0].location, timeout=5) == b"A" * 200_000
    assert await store.get(objs[2].location, timeout=5) == b"C" * 200_000
    await store.delete(objs[1].location, timeout=5)  # deleting again is no error, as for a file
    with pytest.raises(StorageError, match="deleted"):
        await store.get(objs[1].location, timeout=5)  # an error, not zeros


async def test_an_object_deleted_while_streamed_fails_the_stream_instead_of_sending_zeros(tmp_path: Path) -> None:
    store = packed_store(tmp_path)
    obj = await store.put("k/0", [b"z" * 100_000], pack_prefix="", timeout=5)
    chunks = store.stream(obj.location, chunk_size=30_000)
    assert await anext(chunks) == b"z" * 30_000
    await store.delete(obj.location, timeout=5)
    with pytest.raises(StorageError, match="deleted"):
        async for _ in chunks:
            pass
    whole = await store.put("k/1", [b"w" * 100_000], pack_prefix="", timeout=5)
    assert b"".join([c async for c in store.stream(whole.location, chunk_size=30_000)]) == b"w" * 100_000


async def test_a_failed_write_leaves_no_object(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = packed_store(tmp_path)
    kept = await store.put("k/kept", [b"k" * 5000], pack_prefix="", timeout=5)

    def fail(fd: int, buffers: list[bytes], offset: int) -> int:
        os.pwrite(fd, buffers[0], offset)  # the header reaches the file, then the disk fails
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "pwritev", fail)
    with pytest.raises(StorageError, match="No space left"):
        await store.put("k/lost", [b"l" * 5000], pack_prefix="", timeout=5)
    monkeypatch.undo()
    assert [loc for loc, _ in await store.packed_objects()] == [kept.location]
    after = await store.put("k/after", [b"a" * 10], pack_prefix="", timeout=5)
    assert await store.get(after.location, timeout=5) == b"a" * 10


@pytest.mark.parametrize("location", ["../.segments/x.seg@512+1", ".segments/x.seg@100+1", ".segments/x.seg@512"])
async def test_malformed_or_escaping_packed_locations_are_refused(tmp_path: Path, location: str) -> None:
    store = packed_store(tmp_path / "objects")
    with pytest.raises(StorageError):
        await store.get(location, timeout=5)


async def test_prune_keeps_what_the_index_names_and_removes_an_empty_segment(tmp_path: Path) -> None:
    store = packed_store(tmp_path, segment_bytes=1 << 20)
    objs = [await store.put(f"k/{i}", [bytes([i]) * 300_000], pack_prefix="", timeout=5) for i in range(5)]
    first, second = (str(p.relative_to(tmp_path)) for p in segment_files(tmp_path))
    in_first = {o.location for o in objs if o.location.startswith(f"{first}@")}
    in_second = {o.location for o in objs} - in_first
    assert in_first and in_second
    # the writer still writes into the second segment (and holds it), not into the first, which it filled
    assert await store.prune_segment(second, set(), timeout=5) == 0
    keep = {o.location for o in objs[::2]}
    assert await store.prune_segment(first, keep, timeout=5) == len(in_first - keep)
    assert {loc for loc, _ in await store.packed_objects()} == (keep & in_first) | in_second
    for i, o in enumerate(objs):
        if o.location in keep | in_second:
            assert await store.get(o.location, timeout=5) == bytes([i]) * 300_000
    store.close()  # the writer lets go
    assert await store.prune_segment(second, set(), timeout=5) == len(in_second)
    assert not (tmp_path / second).exists()  # nothing left in it: removed


async def test_another_process_holding_a_segment_keeps_the_sweeper_out(tmp_path: Path) -> None:
    store = packed_store(tmp_path)
    await store.put("k/0", [b"x" * 100], pack_prefix="", timeout=5)
    store.close()
    [segment] = segment_files(tmp_path)
    fd = os.open(segment, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a live writer (another worker or replica) holds its segments
        assert await FileSystemStore(tmp_path).prune_segment(str(segment.relative_to(tmp_path)), set(), timeout=5) == 0
        assert segment.exists()
    finally:
        os.close(fd)
    assert await FileSystemStore(tmp_path).prune_segment(str(segment.relative_to(tmp_path)), set(), timeout=5) == 1
    assert not segment.exists()


async def test_the_orphan_sweeper_prunes_segments_by_the_index(index: Index, tmp_path: Path) -> None:
    store = packed_store(tmp_path / "objects")
    ingestor = make_ingestor(index, store)
    stored = [(await ingestor.ingest_part10(make_instance(), protocol="dicomweb", source="test")).parsed
              for _ in range(3)]
    orphan = await store.put("never/indexed", [b"o" * 4000], pack_prefix="", timeout=5)
    rows = await index.pool.fetch("SELECT location FROM instance")
    assert len(rows) == 3 and all(segments.parse_location(r["location"]) for r in rows)
    # the writer still holds its segment: nothing is pruned, whatever the grace
    assert await sweep_orphans(index, store, grace_seconds=0, metrics=Metrics()) == 0
    store.close()
    assert await sweep_orphans(index, store, grace_seconds=3600, metrics=Metrics()) == 0  # too recent
    assert await sweep_orphans(index, store, grace_seconds=0, metrics=Metrics()) == 1
    assert {loc for loc, _ in await store.packed_objects()} == {r["location"] for r in rows}
    assert orphan.location not in {loc for loc, _ in await store.packed_objects()}
    assert len(stored) == 3
