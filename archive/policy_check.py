"""`vna policy check`: a storage policy confronted with the live Ceph cluster.

Asks the monitors (through librados, one connection) for the pools, the CRUSH rules, the CRUSH tree and the
erasure-code profiles in use, then for every storage class: its pool exists, its size and min_size make sense,
its CRUSH rule can place all its copies in distinct failure domains (archive/crush.py), and says in plain
words what the class does with an object. Without RADOS (storage.backend filesystem) the pools are
directories under the store's root and only the file itself is checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from archive.crush import CrushTree, describe_pool
from archive.errors import StorageError
from archive.policy import Policy


@dataclass(slots=True)
class PolicyCheck:
    policy: Policy
    classes: list[str] = field(default_factory=list)    # one line per class, in plain words
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def report(self) -> str:
        p = self.policy
        lines = [f"policy {p.source}: {len(p.classes)} storage classes, {len(p.rules)} rules"]
        lines += [f"  {line}" for line in self.classes]
        lines.append("rules (the first that matches wins):")
        for n, rule in enumerate(p.rules, 1):
            lines.append(f"  {n}. {rule.describe()} -> {rule.storage_class}")
        lines.append(f"  otherwise -> {p.default_class}")
        steps = [(c.name, s) for c in p.classes.values() for s in c.lifecycle]
        if steps:
            lines.append("lifecycle:")
            lines += [f"  {name} -> {s.move_to} after {s.after_days:g} days" for name, s in steps]
        lines += [f"warning: {w}" for w in self.warnings]
        lines += [f"error: {e}" for e in self.problems]
        lines.append("OK" if self.ok else f"FAILED: {len(self.problems)} problem(s)")
        return "\n".join(lines)


def check_offline(policy: Policy, root: str) -> PolicyCheck:
    """A policy for the filesystem store: each pool is a directory under `root`."""
    check = PolicyCheck(policy)
    for c in policy.classes.values():
        check.classes.append(f"{c.name}: directory {root}/{c.pool} (filesystem store: one copy, no CRUSH)")
    return check


async def check_against_cluster(policy: Policy, connection: Any) -> PolicyCheck:
    """Check every class of `policy` against the cluster `connection` (a RadosConnection) reaches."""
    check = PolicyCheck(policy)
    try:
        pools = {p["pool_name"]: p for p in await connection.mon_command({"prefix": "osd pool ls", "detail": "detail"})}
        rules = {r["rule_id"]: r for r in await connection.mon_command({"prefix": "osd crush rule dump"})}
        tree = CrushTree.from_osd_tree(await connection.mon_command({"prefix": "osd tree"}))
    except StorageError as exc:
        check.problems.append(f"cannot read the cluster's pools and CRUSH map: {exc}")
        return check
    profiles: dict[str, dict[str, Any]] = {}
    for c in policy.classes.values():
        pool = pools.get(c.pool)
        if pool is None:
            check.problems.append(f"class {c.name}: pool {c.pool!r} does not exist "
                                  f"(the cluster has: {', '.join(sorted(pools)) or 'no pools'})")
            check.classes.append(f"{c.name}: pool {c.pool} MISSING")
            continue
        profile_name = pool.get("erasure_code_profile") or ""
        if pool.get("type") == 3 and profile_name and profile_name not in profiles:
            try:
                profiles[profile_name] = await connection.mon_command(
                    {"prefix": "osd erasure-code-profile get", "name": profile_name})
            except StorageError as exc:
                check.warnings.append(f"class {c.name}: erasure-code profile {profile_name!r} unreadable: {exc}")
        report = describe_pool(pool, rules.get(pool.get("crush_rule")), tree,
                               profiles.get(profile_name) if pool.get("type") == 3 else None)
        words = report.words.removeprefix(f"pool {c.pool}, ")
        check.classes.append(f"{c.name}: pool {c.pool}, {words}")
        check.problems += [f"class {c.name}: {p}" for p in report.problems]
        check.warnings += [f"class {c.name}: {w}" for w in report.warnings]
    return check
