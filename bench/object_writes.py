"""What a durable object write costs on this machine's filesystem, by layout: the machine's CPU time (all
processes and the kernel's threads, from /proc/stat) and the wall time per object, one writer, no server.

    python bench/object_writes.py                       # 800 objects of 525,660 bytes under $TMPDIR
    python bench/object_writes.py --dir /data --count 2000 --size 524288

Layouts: a new file per object (vna's file layout: O_EXCL, write, fdatasync), the same without the
fdatasync, a new file written with O_DIRECT (cut to size), and one segment file (archive/segments.py)
appended to as it grows, preallocated with fallocate (vna's packed layout), or zeroed ahead with direct I/O
(zeroing not timed). Each layout writes into a fresh directory; the timing includes a final sync, so
writeback the kernel deferred is counted too.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ALIGN = 4096


def busy_seconds() -> float:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    p.add_argument("--count", type=int, default=800)
    p.add_argument("--size", type=int, default=525_660, help="bytes per object (the web data set's CT)")
    a = p.parse_args()
    data = os.urandom(a.size)
    region = -(-(a.size + 512) // ALIGN) * ALIGN
    aligned = mmap.mmap(-1, -(-a.size // ALIGN) * ALIGN)
    aligned[:a.size] = data
    root = a.dir / f"vna-object-writes-{os.getpid()}"

    def path(i: int) -> Path:
        d = root / str(i // 100)
        if i % 100 == 0:
            d.mkdir(exist_ok=True)
        return d / f"{i}.dcm"

    def new_file(i: int, sync: bool = True) -> None:
        fd = os.open(path(i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data)
        if sync:
            os.fdatasync(fd)
        os.close(fd)

    def direct_file(i: int) -> None:
        fd = os.open(path(i), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o644)
        os.write(fd, aligned)
        os.ftruncate(fd, a.size)
        os.fdatasync(fd)
        os.close(fd)

    segment: dict[str, int] = {}

    def open_segment(prepare: str) -> None:
        fd = os.open(root / "segment", os.O_RDWR | os.O_CREAT, 0o644)
        total = region * a.count
        if prepare == "fallocate":
            os.posix_fallocate(fd, 0, total)
        elif prepare == "zeroed":
            zfd = os.open(root / "segment", os.O_WRONLY | os.O_DIRECT)
            zeros = mmap.mmap(-1, 8 << 20)
            for at in range(0, total, len(zeros)):
                os.pwrite(zfd, memoryview(zeros)[:min(len(zeros), total - at)], at)
            os.fsync(zfd)
            os.close(zfd)
        os.fsync(fd)
        segment["fd"] = fd

    def segment_write(i: int) -> None:
        os.pwritev(segment["fd"], [bytes(512), data, bytes(region - 512 - a.size)], i * region)
        os.fdatasync(segment["fd"])

    layouts: list[tuple[str, Callable[[int], None], Callable[[], None]]] = [
        ("new file + fdatasync", new_file, lambda: None),
        ("new file, no fdatasync", lambda i: new_file(i, sync=False), lambda: None),
        ("new file, O_DIRECT + fdatasync", direct_file, lambda: None),
        ("segment, appended", segment_write, lambda: open_segment("none")),
        ("segment, fallocated (vna)", segment_write, lambda: open_segment("fallocate")),
        ("segment, zeroed ahead", segment_write, lambda: open_segment("zeroed")),
    ]
    print(f"{a.count} objects of {a.size} bytes under {a.dir}")
    print(f"{'layout':32} {'wall ms':>8} {'machine CPU ms':>15}")
    for name, write, prepare in layouts:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        segment.clear()
        prepare()
        os.sync()
        time.sleep(0.5)
        b0, t0 = busy_seconds(), time.perf_counter()
        for i in range(a.count):
            write(i)
        os.sync()
        wall, cpu = time.perf_counter() - t0, busy_seconds() - b0
        if "fd" in segment:
            os.close(segment["fd"])
        print(f"{name:32} {1000 * wall / a.count:8.3f} {1000 * cpu / a.count:15.3f}", flush=True)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
