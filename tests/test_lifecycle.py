"""A vna process over its life: configuration, start (ports.json), health and metrics, the AE table
from the command line, and a graceful stop on SIGTERM (readiness off, stop listening, drain, exit 0)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (CTImageStorage, StudyRootQueryRetrieveInformationModelFind,
                                  StudyRootQueryRetrieveInformationModelGet,
                                  StudyRootQueryRetrieveInformationModelMove, Verification)

from archive.config import Settings
from archive.errors import ConfigError
from gateway.dimse import commands as C
from tests.conftest import DCMTK, run_tool
from tests.test_crash_recovery import REPO, vna_process
from tests.test_robustness import RawSCU, encoded, expect_abort_then_close, make_ct, raw_associated

HOST = "127.0.0.1"


async def http_get(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{HOST}:{port}{path}", timeout=aiohttp.ClientTimeout(total=5)) as rsp:
            return rsp.status, await rsp.text()


async def vna_cli(*args: str, env: dict[str, str] | None = None, check: bool = True) -> Any:
    return await run_tool(sys.executable, "-m", "gateway.cli", *args, check=check,
                          env={"PYTHONPATH": str(REPO), **(env or {})})


# -- SIGTERM -----------------------------------------------------------------------------------------

class SlowSender(threading.Thread):
    """pynetdicom SCU: associates and echoes, then waits for `go` before storing a few instances
    with pauses in between, then releases. Models a modality in the middle of sending a series."""

    def __init__(self, port: int, count: int = 3) -> None:
        super().__init__(name="slow-sender", daemon=True)
        self.port = port
        self.datasets = [make_ct() for _ in range(count)]
        self.associated = threading.Event()
        self.go = threading.Event()
        self.statuses: list[Any] = []
        self.released = False
        self.released_at = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            ae = AE(ae_title="SLOW")
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
            ae.add_requested_context(Verification)
            ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
            assoc = ae.associate(HOST, self.port, ae_title="VNA")
            assert assoc.is_established
            self.statuses.append(assoc.send_c_echo().Status)
            self.associated.set()
            assert self.go.wait(30)
            for ds in self.datasets:
                self.statuses.append(assoc.send_c_store(ds).Status)
                time.sleep(0.2)
            assoc.release()
            self.released = assoc.is_released
            self.released_at = time.monotonic()
        except BaseException as exc:  # reported by the test
            self.error = exc
            self.associated.set()


async def _refused(port: int) -> bool:
    try:
        _reader, writer = await asyncio.open_connection(HOST, port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


async def test_sigterm_drains_the_open_association_then_exits_0(tmp_path: Path, database_url: str) -> None:
    async with vna_process(tmp_path / "vna", database_url, env={"VNA__HTTP__DRAIN_TIMEOUT": "30"}) as vna:
        # --dicom-port 0 / --http-port 0: the chosen ports are in ports.json and serve
        ports = json.loads((tmp_path / "vna" / "ports.json").read_text())
        assert ports == {"dicom": vna.dicom_port, "http": vna.http_port} and 0 not in ports.values()
        await run_tool(DCMTK / "echoscu", "-aet", "ECHO", "-aec", "VNA", HOST, str(vna.dicom_port))
        assert await http_get(vna.http_port, "/readyz") == (200, "ready\n")

        sender = SlowSender(vna.dicom_port)
        sender.start()
        await asyncio.to_thread(sender.associated.wait, 30)
        assert sender.error is None, sender.error
        # a second association is inside a C-STORE: half of its P-DATA bytes are sent
        raw = await RawSCU.connect(vna.dicom_port, calling_ae="MIDPDU")
        mid = make_ct()
        pdus = b"".join(raw.assoc.send_message(3, {
            "CommandField": C.C_STORE_RQ, "MessageID": 1, "Priority": C.PRIORITY_MEDIUM,
            "AffectedSOPClassUID": mid.SOPClassUID, "AffectedSOPInstanceUID": mid.SOPInstanceUID}, encoded(mid)))
        raw.writer.write(pdus[: len(pdus) // 2])
        await raw.writer.drain()
        vna.signal(signal.SIGTERM)
        stopped_at = time.monotonic()

        # readiness goes false at once, liveness stays (the process still works off what it has)
        while (await http_get(vna.http_port, "/readyz"))[0] != 503:
            assert time.monotonic() - stopped_at < 1, "/readyz still 200 a second after SIGTERM"
            await asyncio.sleep(0.02)
        assert (await http_get(vna.http_port, "/livez"))[0] == 200
        # no new associations: the DICOM port stops listening
        while not await _refused(vna.dicom_port):
            assert time.monotonic() - stopped_at < 1, "DICOM port still accepting a second after SIGTERM"
            await asyncio.sleep(0.02)

        # the open association may finish its work
        await asyncio.sleep(0.5)
        assert vna.proc is not None and vna.proc.returncode is None, "exited without waiting for the association"
        raw.writer.write(pdus[len(pdus) // 2:])
        rsp = await raw.next_event()
        assert rsp.command["CommandField"] == C.C_STORE_RSP and rsp.command["Status"] == 0x0000
        await raw.release()
        sender.go.set()
        await asyncio.to_thread(sender.join, 30)
        assert sender.error is None, sender.error
        assert sender.statuses == [0x0000] * 4 and sender.released
        assert await vna.wait(10) == 0, vna.log()
        assert time.monotonic() - sender.released_at < 5
    assert "draining" in vna.log()
    assert "event loop uvloop.Loop" in vna.log()  # the default (`event_loop`)

    conn = await asyncpg.connect(database_url)
    try:
        stored = {r[0] for r in await conn.fetch("SELECT sop_instance_uid FROM instance")}
    finally:
        await conn.close()
    assert stored == {ds.SOPInstanceUID for ds in sender.datasets} | {mid.SOPInstanceUID}


async def test_drain_is_bounded_by_drain_timeout(tmp_path: Path, database_url: str) -> None:
    # on the standard library's loop (VNA__EVENT_LOOP=asyncio) as on uvloop
    async with vna_process(tmp_path / "vna", database_url,
                           env={"VNA__HTTP__DRAIN_TIMEOUT": "1", "VNA__EVENT_LOOP": "asyncio"}) as vna:
        assert "event loop asyncio.unix_events._UnixSelectorEventLoop" in vna.log()
        reader, writer = await raw_associated(vna.dicom_port, calling_ae="IDLE")  # never sends anything
        vna.signal(signal.SIGTERM)
        started = time.monotonic()
        # PS3.8 7.3.1: the association is ended by an A-ABORT when the drain time is up
        await expect_abort_then_close(reader, timeout=10)
        writer.close()
        assert 0.8 < time.monotonic() - started < 4
        assert await vna.wait(10) == 0, vna.log()


# -- health and metrics ------------------------------------------------------------------------------

def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _dimse_traffic(port: int, study_uid: str) -> dict[str, Any]:
    ae = AE(ae_title="METRICS")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for cx in (Verification, StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelGet,
               StudyRootQueryRetrieveInformationModelMove):
        ae.add_requested_context(cx)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    # PS3.4 C.4.3.1.1: C-GET sends on the same association, to us acting as Storage SCP
    assoc = ae.associate(HOST, port, ae_title="VNA", ext_neg=[build_role(CTImageStorage, scu_role=True, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])
    assert assoc.is_established
    out: dict[str, Any] = {"echo": assoc.send_c_echo().Status}
    out["store"] = assoc.send_c_store(make_ct(StudyInstanceUID=study_uid)).Status
    out["refused"] = assoc.send_c_store(make_ct(StudyInstanceUID=None)).Status
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    out["find"] = [s.Status for s, _ in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)]
    out["move"] = [s.Status for s, _ in assoc.send_c_move(query, "NOWHERE", StudyRootQueryRetrieveInformationModelMove)]
    out["get"] = [s.Status for s, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)]
    assoc.release()
    return out


async def test_health_and_metrics(vna) -> None:
    port = vna.ports.http
    assert await http_get(port, "/livez") == (200, "ok\n")
    assert await http_get(port, "/readyz") == (200, "ready\n")

    reader, writer = await raw_associated(vna.ports.dicom, calling_ae="HOLDER")
    status, text = await http_get(port, "/metrics")
    assert status == 200
    assert _samples(text)[("vna_dimse_associations_active", ())] == 1
    writer.write(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # A-ABORT
    await reader.read()
    writer.close()

    study_uid = "1.2.826.0.1.3680043.9.7.1"
    out = await asyncio.to_thread(_dimse_traffic, vna.ports.dicom, study_uid)
    assert out["echo"] == 0 and out["store"] == 0
    assert out["refused"] & 0xF000 in (0xA000, 0xC000)  # PS3.4 B.2.3 failure: no StudyInstanceUID
    assert out["find"] == [0xFF00, 0x0000]
    assert out["move"] == [0xA801]  # PS3.4 C.4.2.1.4: Move Destination Unknown
    assert out["get"] == [0x0000]

    await asyncio.sleep(0.1)
    s = _samples((await http_get(port, "/metrics"))[1])
    assert s[("vna_dimse_associations_active", ())] == 0
    assert s[("vna_ingest_instances_total", (("outcome", "stored"), ("protocol", "dimse")))] == 1
    assert s[("vna_ingest_seconds_count", (("protocol", "dimse"),))] == 1
    assert s[("vna_ingest_seconds_bucket", (("le", "+Inf"), ("protocol", "dimse")))] == 1
    failures = {labels: v for (name, labels), v in s.items() if name == "vna_ingest_failures_total"}
    assert failures == {(("reason", "missing-attribute"),): 1}
    assert s[("vna_dimse_requests_total", (("service", "C-ECHO"), ("status", "success")))] == 1
    assert s[("vna_dimse_requests_total", (("service", "C-STORE"), ("status", "failure")))] == 1
    for service in ("C-STORE", "C-FIND", "C-MOVE", "C-GET"):
        assert s[("vna_dimse_request_seconds_count", (("service", service),))] >= 1, service
        assert s[("vna_dimse_request_seconds_bucket", (("le", "+Inf"), ("service", service)))] >= 1
    assert s[("vna_dimse_request_seconds_count", (("service", "C-STORE"),))] == 2


# -- configuration -----------------------------------------------------------------------------------

@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in list(os.environ):
        if key.upper().startswith("VNA__"):
            monkeypatch.delenv(key)
    return monkeypatch


def test_defaults(clean_env):
    s = Settings.load()
    assert (s.ae_title, s.dicom.port, s.http.port, s.dicom.max_pdu_length) == ("VNA", 11112, 8080, 262144)
    assert s.database.url is None and s.object_root == s.data_dir / "objects"


@pytest.mark.parametrize("fmt", ["yaml", "toml"])
def test_precedence_flags_over_env_over_file_over_defaults(clean_env, tmp_path, fmt):
    if fmt == "yaml":
        text = "ae_title: FILEAE\ndicom:\n  port: 1001\n  max_associations: 7\n  acse_timeout: 3\nhttp:\n  port: 2001\n"
    else:
        text = 'ae_title = "FILEAE"\n[dicom]\nport = 1001\nmax_associations = 7\nacse_timeout = 3\n[http]\nport = 2001\n'
    config = tmp_path / f"vna.{fmt}"
    config.write_text(text)
    clean_env.setenv("VNA__DICOM__PORT", "1002")
    clean_env.setenv("VNA__DICOM__ACSE_TIMEOUT", "4.5")
    clean_env.setenv("VNA__AE_TITLE", "ENVAE")
    s = Settings.load({"dicom": {"port": 1003}}, config)
    assert s.dicom.port == 1003                  # flag beats env and file
    assert s.dicom.acse_timeout == 4.5           # env beats file
    assert s.ae_title == "ENVAE"
    assert s.dicom.max_associations == 7         # file beats default, merged per key within a section
    assert s.http.port == 2001
    assert s.dicom.network_timeout == 60.0       # default
    with pytest.raises(Exception):
        s.dicom.port = 1  # type: ignore[misc]  # frozen after load


def test_env_lists_and_nested_keys(clean_env):
    clean_env.setenv("VNA__DICOM__CALLING_AE_ALLOWLIST", "MODALITY1,WORKSTATION")
    clean_env.setenv("VNA__INGEST__DUPLICATE_POLICY", "keep-newest")
    clean_env.setenv("vna__dicom__network_timeout", "2")  # case-insensitive
    s = Settings.load()
    assert s.dicom.calling_ae_allowlist == ("MODALITY1", "WORKSTATION")
    assert s.ingest.duplicate_policy.value == "keep-newest"
    assert s.dicom.network_timeout == 2


@pytest.mark.parametrize("source, value, expected", [
    ("env", ("VNA__DICOM__PORT", "70000"), "dicom.port"),
    ("env", ("VNA__DICOM__NETWORK_TIMEOUT", "soon"), "dicom.network_timeout"),
    ("env", ("VNA__INGEST__DUPLICATE_POLICY", "overwrite"), "ingest.duplicate_policy"),
    ("flag", {"dicom": {"max_pdu_length": 100}}, "dicom.max_pdu_length"),
    ("flag", {"ae_title": "BAD\\TITLE"}, "ae_title"),
    ("flag", {"ae_title": "SEVENTEEN_CHARS_X"}, "ae_title"),
    ("file", "dicom:\n  prot: 104\n", "dicom.prot"),
    ("file", "dicom: [1, 2\n", "not valid YAML"),
    ("file", "- a\n- b\n", "mapping"),
])
def test_invalid_values_raise_config_error(clean_env, tmp_path, source, value, expected):
    overrides, config = None, None
    if source == "env":
        clean_env.setenv(*value)
    elif source == "flag":
        overrides = value
    else:
        config = tmp_path / "vna.yaml"
        config.write_text(value)
    with pytest.raises(ConfigError) as info:
        Settings.load(overrides, config)
    assert expected in str(info.value)


def test_missing_config_file(clean_env, tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        Settings.load(None, tmp_path / "absent.yaml")


@pytest.mark.parametrize("args, env, expected", [
    (("--dicom-port", "70000"), {}, "dicom.port"),
    ((), {"VNA__DICOM__MAX_ASSOCIATIONS": "0"}, "dicom.max_associations"),
    (("--ae-title", "WAY_TOO_LONG_AE_TITLE"), {}, "ae_title"),
])
async def test_serve_with_invalid_setting_exits_2(tmp_path, args, env, expected):
    result = await vna_cli("serve", "--data-dir", str(tmp_path / "d"), "--http-port", "0", *args, env=env,
                           check=False)
    assert result.returncode == 2, result
    assert result.stderr.startswith("vna: ") and expected in result.stderr
    assert not (tmp_path / "d" / "ports.json").exists()


async def test_serve_with_bad_config_file_exits_2(tmp_path):
    config = tmp_path / "vna.toml"
    config.write_text("[dicom\nport = 1\n")
    result = await vna_cli("serve", "--config", str(config), "--data-dir", str(tmp_path / "d"), check=False)
    assert result.returncode == 2 and "not valid TOML" in result.stderr


# -- the AE table from the command line --------------------------------------------------------------

async def test_ae_add_list_remove_round_trip(tmp_path, database_url):
    db = ("--database-url", database_url, "--data-dir", str(tmp_path))
    assert (await vna_cli("ae", "list", *db)).stdout == ""
    added = await vna_cli("ae", "add", "STORESCP", "127.0.0.1", "11113", *db)
    assert "STORESCP -> 127.0.0.1:11113" in added.stdout
    await vna_cli("ae", "add", "ARCHIVE2", "pacs.example", "104", *db)
    await vna_cli("ae", "add", "STORESCP", "10.0.0.9", "4242", *db)  # add again: updated
    listed = (await vna_cli("ae", "list", *db)).stdout.splitlines()
    assert sorted(line.split() for line in listed) == [["ARCHIVE2", "pacs.example:104"], ["STORESCP", "10.0.0.9:4242"]]

    conn = await asyncpg.connect(database_url)
    try:
        rows = {tuple(r) for r in await conn.fetch("SELECT ae_title, host, port FROM application_entity")}
    finally:
        await conn.close()
    assert rows == {("ARCHIVE2", "pacs.example", 104), ("STORESCP", "10.0.0.9", 4242)}

    await vna_cli("ae", "remove", "STORESCP", *db)
    assert [line.split()[0] for line in (await vna_cli("ae", "list", *db)).stdout.splitlines()] == ["ARCHIVE2"]
    gone = await vna_cli("ae", "remove", "STORESCP", *db, check=False)
    assert gone.returncode == 2 and "STORESCP" in gone.stderr
    # PS3.5 6.2: an AE title has at most 16 characters and no backslash
    for bad in ("SEVENTEEN_CHARS_X", "BAD\\AE"):
        result = await vna_cli("ae", "add", bad, "127.0.0.1", "104", *db, check=False)
        assert result.returncode == 2 and "not a valid AE title" in result.stderr


async def test_ae_added_by_cli_is_a_move_destination(tmp_path, database_url, vna):
    """`vna ae add` writes the same table the running server reads for C-MOVE destinations."""
    db = ("--database-url", database_url, "--data-dir", str(tmp_path))
    await vna_cli("ae", "add", "DEST", "127.0.0.1", "9", *db)  # nothing listens on port 9

    def move() -> list[int]:
        ae = AE(ae_title="MOVER")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate(HOST, vna.ports.dicom, ae_title="VNA")
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = "1.2.3"
        statuses = [s.Status for s, _ in assoc.send_c_move(query, "DEST", StudyRootQueryRetrieveInformationModelMove)]
        assoc.release()
        return statuses

    statuses = await asyncio.to_thread(move)
    assert 0xA801 not in statuses  # known now (nothing matched, so nothing to send)
    assert statuses[-1] == 0x0000
