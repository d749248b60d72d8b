"""What every vna process sets up the same way: logging, pydicom, the event loop and its executor, and the
garbage collector after start-up. Used by `vna` (gateway/cli.py) and by its workers (gateway/workers.py)."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pydicom.config

from archive.config import EventLoop, Settings

T = TypeVar("T")

_GC_THRESHOLD_0 = 20_000  # allocations between young-generation collections (CPython's default is 700)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h> mallopt parameters
_MMAP_THRESHOLD = 32 << 20   # buffers up to this size come from the heap
_TRIM_THRESHOLD = 128 << 20  # free memory kept at the top of a heap for the next requests


def configure_process(settings: Settings, *, name: str | None = None) -> None:
    """Logging at settings.log_level (lines tagged with `name`, e.g. a worker's); pydicom's reading mode."""
    tag = f"{name} " if name else ""
    logging.basicConfig(level=settings.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s")
    # We store what we receive and never re-validate values on read (PS3.5 errors in the wild abound).
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    tune_malloc()


def tune_malloc() -> bool:
    """Keep instance-sized buffers in the heap. glibc's defaults serve a large allocation with a fresh mmap
    (from 128 KiB, raised only to the largest size freed so far) and give memory back once 2x that sits free at
    the top of a heap. Every received instance (a 512 KiB CT slice is several such buffers: the body's chunks,
    the joined part, its copies) then pays a page fault and a zeroed page per 4 KiB, and an munmap: about
    0.4 ms for two 512 KiB buffers against 0.03 ms from the heap on this machine. With the thresholds fixed,
    freed buffers are reused; a process keeps up to `_TRIM_THRESHOLD` of free heap. False where the C library
    has no mallopt (musl)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def run_loop(settings: Settings, main: Coroutine[Any, Any, T]) -> T:
    """Run `main` on the configured event loop (`event_loop`: uvloop by default), with `io_threads` threads
    for blocking calls."""
    factory = None
    if settings.event_loop is EventLoop.uvloop:
        import uvloop
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        # the Runner shuts this executor down when it closes, as it would the default one
        runner.get_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=settings.io_threads, thread_name_prefix="vna-io"))
        return runner.run(main)


def settle_gc() -> None:
    """After start-up: the objects alive now (modules, pydicom's data dictionary, the app) live as long as the
    process, so the cyclic collector stops traversing them (`gc.freeze`), and it runs less often, since each
    ingested instance allocates thousands of short-lived containers that reference counting frees anyway."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(_GC_THRESHOLD_0, *gc.get_threshold()[1:])
