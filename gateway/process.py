"""What every vna process sets up the same way: logging, pydicom, the event loop and its executor, and the
garbage collector after start-up. Used by `vna` (gateway/cli.py) and by its workers (gateway/workers.py)."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pydicom.config

from archive.config import EventLoop, Settings

T = TypeVar("T")

_GC_THRESHOLD_0 = 20_000  # allocations between young-generation collections (CPython's default is 700)


def configure_process(settings: Settings, *, name: str | None = None) -> None:
    """Logging at settings.log_level (lines tagged with `name`, e.g. a worker's); pydicom's reading mode."""
    tag = f"{name} " if name else ""
    logging.basicConfig(level=settings.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s")
    # We store what we receive and never re-validate values on read (PS3.5 errors in the wild abound).
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


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
