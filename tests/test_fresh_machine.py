"""The README's run command on a fresh machine: a copy of the tracked files, a clean virtual environment
(VNA_VENV), no database configured. `scripts/serve` must install everything, start the embedded
PostgreSQL and answer DICOM, then drain and exit 0 on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import urllib.request
from pathlib import Path

from pydicom.data import get_testdata_file

from tests.conftest import DCMTK, run_tool

REPO = Path(__file__).resolve().parent.parent


def _copy_tracked_files(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    for name in filter(None, files.decode().split("\0")):
        src = REPO / name
        if src.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


async def test_readme_run_command_on_a_clean_venv(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    _copy_tracked_files(checkout)
    readme = (checkout / "README.md").read_text()
    assert "scripts/serve\n" in readme, "the README must show the run command this test runs"
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VNA_", "VIRTUAL_ENV"))}
    env["VNA_VENV"] = str(tmp_path / "venv")
    proc = await asyncio.create_subprocess_exec(
        str(checkout / "scripts" / "serve"), "--data-dir", str(data), "--dicom-port", "0", "--http-port", "0",
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        ports_file = data / "ports.json"
        for _ in range(1200):  # installing into a clean venv takes a while
            if ports_file.exists() or proc.returncode is not None:
                break
            await asyncio.sleep(0.5)
        assert ports_file.exists(), (await proc.stdout.read(20000)).decode(errors="replace")  # type: ignore[union-attr]
        ports = json.loads(ports_file.read_text())
        await run_tool(DCMTK / "echoscu", "-aet", "SCU", "-aec", "VNA", "127.0.0.1", str(ports["dicom"]))
        await run_tool(DCMTK / "storescu", "-aet", "SCU", "-aec", "VNA", "127.0.0.1", str(ports["dicom"]),
                       get_testdata_file("CT_small.dcm"))
        found = await run_tool(DCMTK / "findscu", "-S", "-aet", "SCU", "-aec", "VNA", "-k", "QueryRetrieveLevel=STUDY",
                               "-k", "StudyInstanceUID", "127.0.0.1", str(ports["dicom"]))
        assert "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322" in found.stderr
        ready = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{ports['http']}/readyz", timeout=5).status)
        assert ready == 200
        assert (data / "pg" / "PG_VERSION").exists(), "the embedded PostgreSQL lives under the data dir"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
