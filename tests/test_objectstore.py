"""The filesystem object store's put: in place, durable, and whole (unit tests of archive/objectstore.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

import archive.objectstore as objectstore
from archive import digest as digests
from archive.config import DigestAlgorithm
from archive.errors import StorageError
from archive.objectstore import FileSystemStore, filesystem_type
from tests.digests import blake3_text, sha256_text


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


async def test_put_writes_the_object_under_its_key(tmp_path: Path) -> None:
    store = FileSystemStore(tmp_path)
    obj = await store.put("1.2/3.4/5.6.abc.dcm", [b"head", b"tail"], timeout=5)
    assert obj.location == "1.2/3.4/5.6.abc.dcm" and obj.size == 8
    assert obj.digest == blake3_text(b"headtail")  # storage.digest's default
    assert (tmp_path / obj.location).read_bytes() == b"headtail"
    assert _files(tmp_path) == {obj.location}  # no temporary file left beside it


async def test_put_digests_with_the_configured_algorithm(tmp_path: Path) -> None:
    data = [b"x" * 100_000, b"y" * 3]
    store = FileSystemStore(tmp_path, digest=DigestAlgorithm.sha256)
    obj = await store.put("a/b.dcm", data, timeout=5)
    assert obj.digest == sha256_text(b"".join(data))
    # whatever wrote it, a digest text is verified by the algorithm it names
    assert digests.recompute(obj.digest, b"".join(data)) == obj.digest
    assert digests.recompute(blake3_text(b"z"), b"z") == blake3_text(b"z")
    assert digests.recompute(obj.digest, b"tampered") != obj.digest


@pytest.mark.parametrize("text", ["md5:abc", "blake3", "blake3:", "", "SHA256:00"])
def test_a_digest_of_an_unknown_algorithm_is_refused(text: str) -> None:
    with pytest.raises(StorageError, match="not a digest this archive can verify"):
        digests.algorithm_of(text)


async def test_put_over_an_existing_name_replaces_it_whole(tmp_path: Path) -> None:
    store = FileSystemStore(tmp_path)
    await store.put("s/x.dcm", [b"old content"], timeout=5)
    obj = await store.put("s/x.dcm", [b"new"], digest="sha256:given", timeout=5)
    assert (tmp_path / "s/x.dcm").read_bytes() == b"new"
    assert obj.digest == "sha256:given" and obj.size == 3
    assert _files(tmp_path) == {"s/x.dcm"}


async def test_a_failed_write_leaves_nothing_under_the_key(tmp_path: Path) -> None:
    store = FileSystemStore(tmp_path)
    with pytest.raises(TypeError):
        await store.put("s/y.dcm", [b"first part", None], timeout=5)  # type: ignore[list-item]
    assert _files(tmp_path) == set()
    await store.put("s/z.dcm", [b"kept"], timeout=5)
    with pytest.raises((TypeError, StorageError)):
        await store.put("s/z.dcm", [b"partial", None], timeout=5)  # type: ignore[list-item]
    assert (tmp_path / "s/z.dcm").read_bytes() == b"kept"  # the old object stays whole
    assert _files(tmp_path) == {"s/z.dcm"}


@pytest.mark.parametrize("name_synced", [True, False])
async def test_directory_fsyncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name_synced: bool) -> None:
    """New directories are made durable in their parents; the file's own directory is fsynced only where
    the filesystem does not persist a new name with the file's fsync."""
    synced: list[Path] = []
    monkeypatch.setattr(objectstore, "_fsync_dir", synced.append)
    store = FileSystemStore(tmp_path)
    store._new_entry_synced = name_synced
    await store.put("study/series/a.dcm", [b"a"], timeout=5)
    new_dirs = [tmp_path, tmp_path / "study"]  # the parents of the two directories created
    assert synced == (new_dirs if name_synced else [*new_dirs, tmp_path / "study/series"])
    synced.clear()
    await store.put("study/series/b.dcm", [b"b"], timeout=5)
    assert synced == ([] if name_synced else [tmp_path / "study/series"])


def test_filesystem_type_of_known_mounts(tmp_path: Path) -> None:
    assert filesystem_type(Path("/proc/self")) == "proc"
    assert filesystem_type(tmp_path) not in (None, "proc")


@pytest.mark.parametrize("location", ["../outside.dcm", "a/../../outside.dcm", "/etc/passwd", ""])
async def test_locations_outside_the_root_are_refused(tmp_path: Path, location: str) -> None:
    store = FileSystemStore(tmp_path / "objects")
    with pytest.raises(StorageError):
        await store.put(location, [b"x"], timeout=5)
    with pytest.raises(StorageError):
        await store.get(location, timeout=5)
    assert not (tmp_path / "outside.dcm").exists()
