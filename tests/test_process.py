"""What every vna process sets up (gateway/process.py): here, the C library's allocator for instance-sized
buffers. Run in a child interpreter, so that its page-fault count is its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_CYCLE = """
import os, resource, sys
from gateway.process import tune_malloc
print(tune_malloc() if sys.argv[1] == "tuned" else "default")
chunks = [os.urandom(65536) for _ in range(8)]
for _ in range(50):  # warm up: the heap grows to what the cycle needs once
    data = b"".join(chunks); copy = data[100:]; del data, copy
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(500):  # what each received 512 KiB instance does: join its chunks, copy a slice
    data = b"".join(chunks); copy = data[100:]; del data, copy
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 500)
"""


def _faults_per_cycle(mode: str) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", _CYCLE, mode], capture_output=True, text=True, check=True,
                         cwd=ROOT, timeout=60).stdout.split()
    return out[0], float(out[1])


def test_instance_sized_buffers_are_reused_without_page_faults() -> None:
    applied, tuned = _faults_per_cycle("tuned")
    assert applied == "True"
    # 2 x 512 KiB per cycle: 256 faults if each buffer were fresh pages; reused heap memory faults none
    assert tuned < 2, f"{tuned} page faults per 512 KiB cycle with tune_malloc"
    _, default = _faults_per_cycle("default")
    assert tuned < default  # what it is for: glibc's defaults map fresh pages for such buffers
