"""Start and stop the DICOM peers the benchmarks talk to, each on free loopback ports.

* :func:`orthanc` -- Orthanc with the PostgreSQL index plugin (its own private PostgreSQL from
  ``archive.embedded_pg``), filesystem storage, DICOMweb plugin.
* :func:`vna` -- ``python -m gateway.cli serve`` on a fresh data directory (embedded PostgreSQL).
* :func:`storescp` -- dcmtk ``storescp``, the C-MOVE destination.

Each is a context manager yielding a :class:`Peer`; leaving the block stops the processes it started
(SIGTERM, then SIGKILL after a grace period). ``destinations`` maps move-destination AE titles to
``(host, port)``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from archive.embedded_pg import EmbeddedPostgres, free_port  # noqa: E402

HOST = "127.0.0.1"
ORTHANC_BIN = "/usr/sbin/Orthanc"
ORTHANC_PLUGINS = Path("/usr/share/orthanc/plugins")
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}  # without it dcmtk waits ~50 ms on delayed ACKs
UNCOMPRESSED_LE = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"]


@dataclass
class Peer:
    """A running DICOM application entity."""

    name: str
    aet: str
    host: str
    port: int
    http_port: int | None = None
    storage: Path | None = None  # where received files land (storescp)


def _tail(log: Path, n: int = 3000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else ""


def _spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=log.parent)


def _stop(proc: subprocess.Popen, grace: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait(ready, proc: subprocess.Popen, log: Path, what: str, timeout: float = 90.0) -> None:
    """Poll ``ready()`` until true; fail early with the log tail if the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{_tail(log)}")
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready after {timeout:.0f} s:\n{_tail(log)}")


def echo(peer: Peer) -> bool:
    """C-ECHO the peer with dcmtk echoscu."""
    r = subprocess.run(["/usr/bin/echoscu", "-aec", peer.aet, peer.host, str(peer.port)],
                       env=DCMTK_ENV, capture_output=True, timeout=30)
    return r.returncode == 0


ORTHANC_PACKAGES = ("orthanc", "orthanc-dicomweb", "orthanc-postgresql")


def ensure_orthanc() -> None:
    """Orthanc and its two plugins from Debian, installed with apt when missing (as root)."""
    wanted = [Path(ORTHANC_BIN), ORTHANC_PLUGINS / "libOrthancPostgreSQLIndex.so",
              ORTHANC_PLUGINS / "libOrthancDicomWeb.so"]
    if all(p.exists() for p in wanted):
        return
    if os.geteuid() != 0:
        raise RuntimeError(f"Orthanc is missing: sudo apt-get install {' '.join(ORTHANC_PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", *ORTHANC_PACKAGES], env=env, check=True,
                   stdout=subprocess.DEVNULL)


@contextmanager
def orthanc(workdir: Path, destinations: dict[str, tuple[str, int]], tcp_nodelay: bool = True,
            overrides: dict | None = None) -> Iterator[Peer]:
    """Orthanc + PostgreSQL index in ``workdir`` (which should be new, for an empty archive).

    Orthanc's DICOM stack is dcmtk, so ``tcp_nodelay`` (TCP_NODELAY=1 in its environment) spares it
    the delayed-ACK stalls as it does the dcmtk tools. ``overrides`` are merged into its configuration.
    """
    ensure_orthanc()
    workdir.mkdir(parents=True, exist_ok=True)
    pg = EmbeddedPostgres(workdir / "pg")
    dsn = urlsplit(pg.ensure_running())
    try:
        dicom_port, http_port = free_port(), free_port()
        while http_port == dicom_port:  # each call binds port 0 and lets go: the kernel may hand out one twice
            http_port = free_port()
        config = {
            "Name": "bench-orthanc",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"),
            "StorageCompression": False,
            "HttpPort": http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAet": "ORTHANC",
            "DicomPort": dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowMove": True,
            "AcceptedTransferSyntaxes": UNCOMPRESSED_LE,
            "DicomModalities": {aet: [aet, h, p] for aet, (h, p) in destinations.items()},
            "Plugins": [str(ORTHANC_PLUGINS / "libOrthancPostgreSQLIndex.so"),
                        str(ORTHANC_PLUGINS / "libOrthancDicomWeb.so")],
            "PostgreSQL": {"EnableIndex": True, "EnableStorage": False, "Host": dsn.hostname,
                           "Port": dsn.port, "Database": dsn.path.lstrip("/"),
                           "Username": dsn.username, "Password": dsn.password, "Lock": False},
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            **(overrides or {}),
        }
        conf = workdir / "orthanc.json"
        conf.write_text(json.dumps(config, indent=1))
        log = workdir / "orthanc.log"
        env = DCMTK_ENV if tcp_nodelay else {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
        proc = _spawn([ORTHANC_BIN, str(conf)], log, env=env)
        try:
            direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # ignore *_proxy

            def ready() -> bool:
                with direct.open(f"http://{HOST}:{http_port}/system", timeout=2) as r:
                    return r.status == 200
            _wait(ready, proc, log, "Orthanc")
            yield Peer("orthanc", "ORTHANC", HOST, dicom_port, http_port)
        finally:
            _stop(proc)
    finally:
        pg.stop()


def _vna_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway.cli", *args]


def _vna_env(source: Path) -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{source}{os.pathsep}{path}" if path else str(source)}


def _stop_orphan_postgres(data_dir: Path) -> None:
    """If vna died without stopping its embedded PostgreSQL, stop that postmaster (by its pid)."""
    pgdata = data_dir / "pg"
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split()[0])
        if str(pgdata).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGINT)  # PostgreSQL's "fast" shutdown
    except (OSError, ValueError, IndexError):
        pass


@contextmanager
def vna(workdir: Path, destinations: dict[str, tuple[str, int]], aet: str = "VNA",
        source: Path = REPO) -> Iterator[Peer]:
    """vna (the code in ``source``, by default this work tree) serving a new data directory
    ``workdir/data``, with ``destinations`` registered."""
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    log = workdir / "vna.log"
    ports_file = data / "ports.json"
    env = _vna_env(source)
    proc = _spawn(_vna_cli("serve", "--data-dir", str(data), "--dicom-port", "0", "--http-port", "0",
                           "--ae-title", aet), log, env=env)
    try:
        _wait(lambda: ports_file.exists() and bool(ports_file.read_text().strip()), proc, log, "vna")
        ports = json.loads(ports_file.read_text())
        peer = Peer("vna", aet, HOST, int(ports["dicom"]), int(ports["http"]))
        _wait(lambda: echo(peer), proc, log, "vna C-ECHO", timeout=30)
        for name, (h, p) in destinations.items():
            subprocess.run(_vna_cli("ae", "add", name, h, str(p), "--data-dir", str(data)),
                           env=env, check=True, capture_output=True, timeout=60, cwd=workdir)
        yield peer
    finally:
        _stop(proc)
        _stop_orphan_postgres(data)


@contextmanager
def storescp(workdir: Path, aet: str = "BENCHSCP", ignore: bool = False) -> Iterator[Peer]:
    """dcmtk storescp writing received instances to ``workdir/in`` (or discarding them)."""
    incoming = workdir / "in"
    incoming.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = workdir / "storescp.log"
    args = ["/usr/bin/storescp", "--aetitle", aet, "--output-directory", str(incoming)]
    proc = _spawn(args + (["--ignore"] if ignore else []) + [str(port)], log, env=DCMTK_ENV)
    peer = Peer("storescp", aet, HOST, port, storage=None if ignore else incoming)
    try:
        _wait(lambda: echo(peer), proc, log, "storescp", timeout=30)
        yield peer
    finally:
        _stop(proc, grace=5)
