"""Storage policies: the policy file (archive/policy.py), CRUSH rules in plain words (archive/crush.py), `vna policy
check` against a real three-OSD Ceph cluster in two datacentres, and SIGHUP reloading the policy of `vna serve`.

Rules match InstitutionName (0008,0080, LO), the calling AE title (AE), the protocol and Modality (0008,0060, CS):
leading and trailing spaces of these values are not significant (PS3.5 6.2), `*` and `?` are wildcards as in
C-FIND (PS3.4 C.2.2.2.4), everything else matches exactly.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydicom.uid import generate_uid

from archive.crush import CrushTree, describe_pool, simulate
from archive.errors import ConfigError
from archive.index import Index
from archive.policy import Attributes, Policy, load_policy, parse_policy
from tests.ceph_policy import POLICY, cli_env, cluster3, make_ct, monitor, part10, stow, storage_for

# -- the policy file -----------------------------------------------------------------------------------------------

ISSUE_POLICY = {
    "default_class": "standard",
    "classes": {
        "standard": {"pool": "vna"},
        "all-dc": {"pool": "vna-all-dc", "lifecycle": [{"after_days": 365, "move_to": "cold"},
                                                       {"after_days": 30, "move_to": "warm"}]},
        "warm": {"pool": "vna-warm", "lifecycle": [{"after_days": 3650, "move_to": "cold"}]},
        "regional": {"pool": "vna-dc-a"},
        "cold": {"pool": "vna-cold"},
    },
    "rules": [
        {"name": "north", "match": {"institution_name": "North Hospital"}, "class": "all-dc"},
        {"match": {"institution_name": ["South Clinic", "South Clinic *"], "protocol": "dimse"}, "class": "regional"},
        {"match": {"calling_ae": "CT?", "modality": "CT"}, "class": "warm"},
        {"match": {"institution_name": "*"}, "class": "regional"},
    ],
}


def test_first_matching_rule_wins_and_unmatched_instances_get_the_default_class() -> None:
    p = parse_policy(ISSUE_POLICY)
    assert p.choose_class(institution_name="North Hospital", protocol="dicomweb").name == "all-dc"
    assert p.choose_class(institution_name="North Hospital", calling_ae="CT1", protocol="dimse",
                          modality="CT").name == "all-dc"  # rule 1 before rule 3
    assert p.choose_class(institution_name="South Clinic", protocol="dimse").name == "regional"
    assert p.choose_class(institution_name="South Clinic Annex", protocol="dimse").name == "regional"
    # rule 2 wants DIMSE; rule 3 wants a calling AE; the catch-all rule 4 wants an InstitutionName ('*' matches
    # any value, even empty, PS3.4 C.2.2.2.4)
    assert p.choose_class(institution_name="South Clinic", protocol="dicomweb").name == "regional"
    assert p.choose_class(protocol="dicomweb").name == "regional"
    assert p.choose_class(calling_ae="CT1", protocol="dimse", modality="CT", institution_name="X").name == "warm"
    no_catch_all = parse_policy({**ISSUE_POLICY, "rules": ISSUE_POLICY["rules"][:3]})
    assert no_catch_all.choose_class(institution_name="Elsewhere", protocol="dicomweb").name == "standard"
    assert no_catch_all.default.pool == "vna"
    assert no_catch_all.pools == ("vna", "vna-all-dc", "vna-warm", "vna-dc-a", "vna-cold")


def test_patterns_match_whole_values_with_wildcards_case_and_spaces() -> None:
    p = parse_policy({"classes": {"default": {"pool": "a"}, "x": {"pool": "b"}},
                      "rules": [{"match": {"institution_name": ["St. Mary's (North)", "Clinic ?", "*Radiology*"]},
                                 "class": "x"}]})

    def cls(name: str | None) -> str:
        return p.choose_class(institution_name=name).name

    assert cls("St. Mary's (North)") == "x"       # dots and brackets are literal
    assert cls("  St. Mary's (North) ") == "x"    # PS3.5 6.2: surrounding spaces not significant
    assert cls("St. Mary's (north)") == "default"  # case is significant
    assert cls("St. Marys (North)") == "default"
    assert cls("Clinic 7") == "x" and cls("Clinic 77") == "default" and cls("Clinic ") == "default"
    assert cls("Central Radiology Dept") == "x" and cls("Radiology") == "x"
    assert cls(None) == "default" and cls("") == "default"  # absent: matched as the empty string


def test_lifecycle_steps_follow_age_and_chain() -> None:
    p = parse_policy(ISSUE_POLICY)
    north = Attributes(institution_name="North Hospital", protocol="dimse")
    assert p.desired_class(north, 0).name == "all-dc"
    assert p.desired_class(north, 29.9).name == "all-dc"
    assert p.desired_class(north, 30).name == "warm"        # the step with the largest after_days <= age
    assert p.desired_class(north, 364).name == "warm"
    assert p.desired_class(north, 365).name == "cold"
    assert p.after_lifecycle("warm", 3650).name == "cold"   # warm's own step: age counts from storing
    assert p.after_lifecycle("regional", 10_000).name == "regional"
    assert p.has_lifecycle and not Policy.single("vna").has_lifecycle


def test_without_a_policy_file_there_is_one_default_class() -> None:
    p = Policy.single("vna")
    assert list(p.classes) == ["default"] and p.default.pool == "vna" and p.rules == ()
    assert p.choose_class(institution_name="North Hospital").name == "default"


DROP = object()  # a top-level key left out


@pytest.mark.parametrize(("change", "reason"), [
    ({"classes": {}}, "'classes' must map at least one class"),
    ({"colour": "red"}, "unknown key 'colour' at the top level"),
    ({"version": 2}, "version 2 is not supported"),
    ({"default_class": "nope"}, "default_class 'nope' is not one of the classes"),
    ({"default_class": None, "classes": {"a": {"pool": "x"}}}, "default_class must be a class name"),
    ({"default_class": DROP, "classes": {"a": {"pool": "x"}}, "rules": []}, "no class named 'default'"),
    ({"classes": {"default": {"pool": "a/b"}}}, "'pool' must name a pool"),
    ({"classes": {"default": {"pool": ".hidden"}}}, "'pool' must name a pool"),
    ({"classes": {"default": {}}}, "'pool' must name a pool"),
    ({"classes": {"default": {"pool": "x", "size": 3}}}, "unknown key 'size'"),
    ({"classes": {"bad name": {"pool": "x"}}}, "a class name is 1-64 letters"),
    ({"rules": [{"match": {"institution_name": "X"}, "class": "missing"}]}, "class 'missing' is not defined"),
    ({"rules": [{"match": {"patient_name": "X"}, "class": "cold"}]}, "cannot match on 'patient_name'"),
    ({"rules": [{"match": {"protocol": "hl7"}, "class": "cold"}]}, "protocol must be one of dimse, dicomweb"),
    ({"rules": [{"match": {"modality": 3}, "class": "cold"}]}, "modality must be text or a list of texts"),
    ({"rules": [{"match": {"modality": "CT"}}]}, "'class' must name a class"),
    ({"rules": [{"match": {}, "class": "cold", "priority": 1}]}, "unknown key 'priority'"),
    ({"rules": {"north": "all-dc"}}, "'rules' must be a list"),
    ({"classes": {**ISSUE_POLICY["classes"], "cold": {"pool": "c", "lifecycle": [{"after_days": -1, "move_to": "warm"}]}}},
     "after_days must be a number of days >= 0"),
    ({"classes": {**ISSUE_POLICY["classes"], "cold": {"pool": "c", "lifecycle": [{"after_days": 1}]}}},
     "must have exactly 'after_days' and 'move_to'"),
    ({"classes": {**ISSUE_POLICY["classes"], "cold": {"pool": "c", "lifecycle": [{"after_days": 1, "move_to": "ice"}]}}},
     "lifecycle moves to 'ice', which is not defined"),
    ({"classes": {**ISSUE_POLICY["classes"], "cold": {"pool": "c", "lifecycle": [{"after_days": 1, "move_to": "cold"}]}}},
     "cannot move to its own class"),
    ({"classes": {**ISSUE_POLICY["classes"], "cold": {"pool": "c", "lifecycle": [{"after_days": 1, "move_to": "all-dc"}]}}},
     "lifecycle steps loop: all-dc -> warm -> cold -> all-dc"),
    ({"classes": {**ISSUE_POLICY["classes"], "warm": {"pool": "w", "lifecycle": [
        {"after_days": 5, "move_to": "cold"}, {"after_days": 5, "move_to": "regional"}]}}},
     "two lifecycle steps with the same after_days"),
])
def test_invalid_policies_are_refused_with_the_reason(change: dict[str, Any], reason: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(reason)):
        parse_policy({k: v for k, v in {**ISSUE_POLICY, **change}.items() if v is not DROP})


def test_every_problem_is_listed_at_once(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("classes:\n  default: {pool: 'a/b'}\nrules:\n  - {class: nowhere}\n")
    with pytest.raises(ConfigError) as err:
        load_policy(tmp_path / "p.yaml")
    assert "'pool' must name a pool" in str(err.value) and "class 'nowhere' is not defined" in str(err.value)
    assert str(tmp_path / "p.yaml") in str(err.value)
    (tmp_path / "bad.yaml").write_text("classes: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_policy(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="cannot read policy file"):
        load_policy(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_policy(tmp_path / "list.yaml")


# -- CRUSH rules in plain words, on the tree and rules the three-OSD test cluster reports ---------------------------

# `ceph osd tree -f json` and `ceph osd crush rule dump -f json` of scripts/ceph-cluster --osds 3 (abridged)
TREE = CrushTree.from_osd_tree({"nodes": [
    {"id": -1, "name": "default", "type": "root", "children": [-10, -4]},
    {"id": -4, "name": "dc-a", "type": "datacenter", "children": [-7, -3]},
    {"id": -3, "name": "h1", "type": "host", "children": [0]},
    {"id": 0, "name": "osd.0", "type": "osd", "crush_weight": 0.001, "device_class": "hdd", "status": "up"},
    {"id": -7, "name": "h2", "type": "host", "children": [1]},
    {"id": 1, "name": "osd.1", "type": "osd", "crush_weight": 0.001, "device_class": "hdd", "status": "up"},
    {"id": -10, "name": "dc-b", "type": "datacenter", "children": [-9]},
    {"id": -9, "name": "h3", "type": "host", "children": [2]},
    {"id": 2, "name": "osd.2", "type": "osd", "crush_weight": 0.001, "device_class": "hdd", "status": "up"}]})
ALL_DC = {"rule_id": 2, "rule_name": "all-dc", "steps": [
    {"op": "take", "item": -1, "item_name": "default"}, {"op": "choose_firstn", "num": 0, "type": "datacenter"},
    {"op": "chooseleaf_firstn", "num": 1, "type": "host"}, {"op": "emit"}]}
DC_A_ONLY = {"rule_id": 1, "rule_name": "dc-a-only", "steps": [
    {"op": "take", "item": -4, "item_name": "dc-a"}, {"op": "chooseleaf_firstn", "num": 0, "type": "host"},
    {"op": "emit"}]}


def pool(name: str, size: int, min_size: int = 1, **extra: Any) -> dict[str, Any]:
    return {"pool_name": name, "type": 1, "size": size, "min_size": min_size, "crush_rule": 0, **extra}


def test_crush_rules_in_plain_words_and_what_they_can_place() -> None:
    r = describe_pool(pool("vna-all-dc", 2), ALL_DC, TREE)
    assert r.words == "pool vna-all-dc, 2 copies, one per datacentre: dc-a, dc-b"
    assert (r.placeable, r.problems) == (2, ())
    assert {o.id for o in simulate(ALL_DC, TREE, 2).osds} in ({0, 2}, {1, 2})
    r = describe_pool(pool("vna-dc-a", 2, 2), DC_A_ONLY, TREE)
    assert r.words == "pool vna-dc-a, 2 copies on distinct hosts in dc-a (h1, h2)"
    assert (r.placeable, r.problems, r.warnings) == (2, (), ())
    # "3 copies, one per datacentre" cannot be honoured with two datacentres
    r = describe_pool(pool("vna-all-dc", 3), ALL_DC, TREE)
    assert r.placeable == 2 and "can place only 2 of its 3 copies" in r.problems[0]
    r = describe_pool(pool("vna-dc-a", 3, 3), DC_A_ONLY, TREE)
    assert r.problems == ("pool vna-dc-a: CRUSH rule 'dc-a-only' can place only 2 of its 3 copies: it needs 3 distinct "
                          "hosts under dc-a, which has 2 (h1, h2)",
                          "pool vna-dc-a: fewer placeable copies (2) than min_size 3: writes would block")
    assert describe_pool(pool("p", 2), None, TREE).problems == ("pool p: its CRUSH rule 0 does not exist",)
    assert describe_pool(pool("p", 2, 3), DC_A_ONLY, TREE).problems[0].startswith("pool p: size 2 and min_size 3")


def test_crush_counts_only_usable_osds_of_the_rule_device_class() -> None:
    ssd = {"rule_name": "fast", "steps": [{"op": "take", "item": -2, "item_name": "default~ssd"},
                                          {"op": "chooseleaf_firstn", "num": 0, "type": "host"}, {"op": "emit"}]}
    r = describe_pool(pool("fast", 2), ssd, TREE)
    assert r.placeable == 0 and "can place only 0 of its 2 copies" in r.problems[0]
    hdd = {**ssd, "steps": [{**ssd["steps"][0], "item_name": "default~hdd"}, *ssd["steps"][1:]]}
    assert describe_pool(pool("slow", 3), hdd, TREE).placeable == 3
    # an OSD of CRUSH weight 0 is never chosen
    nodes = {**TREE.nodes}
    nodes[2] = nodes[2].__class__(id=2, name="osd.2", type="osd", weight=0.0)
    r = describe_pool(pool("vna-all-dc", 2), ALL_DC, CrushTree(nodes))
    assert r.placeable == 1 and r.words == "pool vna-all-dc, 2 copies, one per datacentre: dc-a"


def test_erasure_coded_pool_words_and_min_size() -> None:
    ec_rule = {"rule_name": "cold", "steps": [{"op": "set_chooseleaf_tries", "num": 5},
                                              {"op": "take", "item": -1, "item_name": "default"},
                                              {"op": "chooseleaf_indep", "num": 0, "type": "host"}, {"op": "emit"}]}
    r = describe_pool(pool("vna-cold", 3, 3, type=3), ec_rule, TREE, {"k": "2", "m": "1"})
    assert r.words == ("pool vna-cold, erasure-coded k=2 m=1 (3 chunks, any 2 restore an object) on distinct hosts "
                       "(h1, h2, h3)")
    assert (r.problems, r.warnings) == ((), ())
    assert "min_size 2 = k" in describe_pool(pool("vna-cold", 3, 2, type=3), ec_rule, TREE, {"k": 2, "m": 1}).warnings[0]


# -- against the live cluster -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ceph3() -> Iterator[dict[str, Any]]:
    with cluster3() as cluster:
        yield cluster


async def vna_cli(cluster: dict[str, Any], *args: str | Path, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway.cli", *map(str, args),
                                                env={**os.environ, **env}, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_policy_check_describes_a_good_policy(ceph3: dict[str, Any], database_url: str, tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text(POLICY)
    env = cli_env(ceph3, database_url, tmp_path / "data")
    rc, out, err = await vna_cli(ceph3, "policy", "check", "--policy", tmp_path / "policy.yaml", env=env)
    assert rc == 0, out + err
    lines = out.splitlines()
    assert "  all-dc: pool vna-all-dc, 2 copies, one per datacentre: dc-a, dc-b" in lines
    assert "  regional: pool vna-dc-a, 2 copies on distinct hosts in dc-a (h1, h2)" in lines
    assert "  default: pool vna, 2 copies on distinct hosts (h1, h2, h3)" in lines
    assert "  1. institution_name 'North Hospital' -> all-dc" in lines
    assert "  otherwise -> default" in lines
    assert lines[-1] == "OK"
    # the test cluster's pools accept writes with one copy left: said, not refused
    assert "warning: class all-dc: pool vna-all-dc: min_size 1 acknowledges writes held by a single copy" in lines

    # the same file from storage.policy_file
    rc, out2, _ = await vna_cli(ceph3, "policy", "check",
                                env={**env, "VNA__STORAGE__POLICY_FILE": str(tmp_path / "policy.yaml")})
    assert (rc, out2) == (0, out)


async def test_policy_check_rejects_a_missing_pool_and_rules_that_cannot_place_their_copies(
        ceph3: dict[str, Any], database_url: str, tmp_path: Path) -> None:
    env = cli_env(ceph3, database_url, tmp_path / "data")
    (tmp_path / "missing.yaml").write_text(POLICY.replace("  regional: {pool: vna-dc-a}\n",
                                                          "  regional: {pool: vna-dc-a}\n  cold: {pool: vna-cold}\n"))
    rc, out, _ = await vna_cli(ceph3, "policy", "check", "--policy", tmp_path / "missing.yaml", env=env)
    assert rc == 1
    assert "error: class cold: pool 'vna-cold' does not exist (the cluster has: vna, vna-all-dc, vna-dc-a)" in out
    assert out.splitlines()[-1] == "FAILED: 1 problem(s)"

    # a replicated rule that wants 3 hosts in dc-b, which has one; and "3 copies, one per datacentre" with two
    async with monitor(ceph3) as mon:
        await mon.mon_command({"prefix": "osd crush rule create-replicated", "name": "dc-b-only", "root": "dc-b",
                               "type": "host"})
        for name, rule in (("vna-dc-b", "dc-b-only"), ("vna-all-dc-3", "all-dc")):
            await mon.mon_command({"prefix": "osd pool create", "pool": name, "pg_num": 8, "pgp_num": 8,
                                   "pool_type": "replicated", "rule": rule})
            await mon.mon_command({"prefix": "osd pool set", "pool": name, "var": "size", "val": "3",
                                   "yes_i_really_mean_it": True})
            await mon.mon_command({"prefix": "osd pool set", "pool": name, "var": "min_size", "val": "2"})
    (tmp_path / "impossible.yaml").write_text(
        "classes:\n  default: {pool: vna}\n  dc-b: {pool: vna-dc-b}\n  three: {pool: vna-all-dc-3}\n")
    rc, out, _ = await vna_cli(ceph3, "policy", "check", "--policy", tmp_path / "impossible.yaml", env=env)
    assert rc == 1
    lines = out.splitlines()
    assert "  dc-b: pool vna-dc-b, 3 copies on distinct hosts in dc-b (h3)" in lines
    assert ("error: class dc-b: pool vna-dc-b: CRUSH rule 'dc-b-only' can place only 1 of its 3 copies: it needs 3 "
            "distinct hosts under dc-b, which has 1 (h3)") in lines
    assert "error: class dc-b: pool vna-dc-b: fewer placeable copies (1) than min_size 2: writes would block" in lines
    assert "  three: pool vna-all-dc-3, 3 copies, one per datacentre: dc-a, dc-b" in lines
    assert any(line.startswith("error: class three: pool vna-all-dc-3: CRUSH rule 'all-dc' can place only 2 of its 3")
               for line in lines)
    assert lines[-1] == "FAILED: 3 problem(s)"

    # an invalid file is a configuration error (exit 2) with its reasons
    (tmp_path / "invalid.yaml").write_text("classes:\n  default: {pool: vna}\nrules:\n  - {class: nowhere}\n")
    rc, out, err = await vna_cli(ceph3, "policy", "check", "--policy", tmp_path / "invalid.yaml", env=env)
    assert rc == 2 and "rule 1: class 'nowhere' is not defined" in err


async def test_serve_refuses_a_policy_naming_a_missing_pool(ceph3: dict[str, Any], vna_factory: Callable[..., Any],
                                                            tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text("classes:\n  default: {pool: vna}\n  cold: {pool: no-such-pool}\n")
    with pytest.raises(ConfigError, match="storage class 'cold': RADOS pool 'no-such-pool' does not exist"):
        await vna_factory(storage=storage_for(ceph3, tmp_path / "policy.yaml"))


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_sighup_reloads_the_policy_and_keeps_the_old_one_when_the_new_is_bad(
        ceph3: dict[str, Any], database_url: str, index: Index, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text("classes:\n  default: {pool: vna}\n  regional: {pool: vna-dc-a}\n")
    data_dir = tmp_path / "data"
    env = {**os.environ, **cli_env(ceph3, database_url, data_dir), "VNA__STORAGE__POLICY_FILE": str(policy_file)}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway.cli", "serve", "--dicom-port", "0",
                                                "--http-port", "0", env=env, stderr=asyncio.subprocess.PIPE)
    log: list[str] = []

    async def read_log() -> None:
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            log.append(line.decode())

    reader = asyncio.create_task(read_log())

    async def hup_and_wait(word: str) -> None:
        seen = len(log)
        proc.send_signal(signal.SIGHUP)
        for _ in range(200):
            if any(word in line for line in log[seen:]):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"no {word!r} in the log after SIGHUP: {log[seen:]}")

    async def store_one() -> str:
        ds = make_ct("South Clinic", study=generate_uid(), series=generate_uid(), n=1, size=8)
        await stow(http, http_port, [part10(ds)])
        return await index.pool.fetchval("SELECT storage_class || ' ' || location FROM instance "
                                         "WHERE sop_instance_uid = $1", ds.SOPInstanceUID)

    try:
        for _ in range(300):
            if (data_dir / "ports.json").exists():
                break
            assert proc.returncode is None, "".join(log)
            await asyncio.sleep(0.05)
        http_port = json.loads((data_dir / "ports.json").read_text())["http"]
        assert (await store_one()).startswith("default vna/")

        policy_file.write_text(POLICY)  # South Clinic -> regional (vna-dc-a)
        await hup_and_wait("reloaded")
        assert (await store_one()).startswith("regional vna-dc-a/")

        policy_file.write_text("classes: [broken\n")  # invalid YAML: logged, the policy in force kept
        await hup_and_wait("not reloaded")
        assert (await store_one()).startswith("regional vna-dc-a/")

        policy_file.write_text(POLICY.replace("vna-dc-a", "vna-nowhere"))  # a pool that does not exist: kept too
        await hup_and_wait("not reloaded")
        assert any("RADOS pool 'vna-nowhere' does not exist" in line for line in log)
        assert (await store_one()).startswith("regional vna-dc-a/")
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
        await reader
    assert proc.returncode == 0, "".join(log)
