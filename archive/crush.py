"""What a Ceph pool's CRUSH rule does with its copies, in plain words, and whether it can place them all.

`vna policy check` gives this module what the monitors report (`osd pool ls detail`, `osd crush rule dump`,
`osd tree`, `osd erasure-code-profile get`) and prints, for each storage class, sentences like

    all-dc: pool vna-all-dc, 2 copies, one per datacentre: dc-a, dc-b
    regional: pool vna-dc-a, 2 copies on distinct hosts in dc-a (h1, h2)

Whether a rule can place `size` copies is worked out by following its steps over the CRUSH tree as CRUSH
does, counting instead of hashing: `take` starts under a bucket; `choose{,leaf}_{firstn,indep} N type T`
picks, under each bucket chosen so far, N distinct buckets of type T that hold at least one usable OSD (N 0:
the pool's size, N < 0: size + N), `chooseleaf` then one OSD under each; `emit` adds the result. A rule that
yields fewer distinct OSDs than the pool's size leaves every placement group undersized (fewer than `size`
copies, forever): `check` reports it, and reports a pool whose placeable copies fall below min_size (its
writes would block). Only OSDs with a CRUSH weight above 0 (and of the rule's device class, for a
`take root~class`) count; whether they are up now is the cluster's health, not the rule's ability.

Pure: no I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# CRUSH type names as words
_WORDS = {"datacenter": ("datacentre", "datacentres"), "osd": ("OSD", "OSDs"), "pdu": ("PDU", "PDUs"),
          "chassis": ("chassis", "chassis")}


def word(type_name: str, n: int = 1) -> str:
    one, many = _WORDS.get(type_name, (type_name, type_name + "s"))
    return one if n == 1 else many


@dataclass(frozen=True, slots=True)
class Node:
    id: int
    name: str
    type: str
    children: tuple[int, ...] = ()
    weight: float = 0.0          # OSDs: the CRUSH weight (0: never chosen)
    device_class: str | None = None
    up: bool = True


@dataclass(frozen=True, slots=True)
class CrushTree:
    nodes: dict[int, Node]

    @classmethod
    def from_osd_tree(cls, tree: dict[str, Any]) -> CrushTree:
        """From `osd tree -f json` (nodes; stray OSDs, outside any bucket, are never chosen)."""
        nodes = {}
        for n in tree.get("nodes", []):
            nodes[n["id"]] = Node(id=n["id"], name=n["name"], type=n["type"], children=tuple(n.get("children", ())),
                                  weight=float(n.get("crush_weight", 0.0)), device_class=n.get("device_class"),
                                  up=n.get("status", "up") == "up")
        return cls(nodes)

    def by_name(self, name: str) -> Node | None:
        return next((n for n in self.nodes.values() if n.name == name), None)

    def osds_under(self, node_id: int, device_class: str | None = None) -> list[Node]:
        """Usable OSDs at or under `node_id`, in tree order."""
        node = self.nodes.get(node_id)
        if node is None:
            return []
        if node.type == "osd":
            ok = node.weight > 0 and (device_class is None or node.device_class == device_class)
            return [node] if ok else []
        return [o for c in node.children for o in self.osds_under(c, device_class)]

    def under(self, node_id: int, type_name: str, device_class: str | None = None) -> list[Node]:
        """Buckets (or OSDs) of `type_name` at or under `node_id` holding a usable OSD, sorted by name."""
        node = self.nodes.get(node_id)
        if node is None:
            return []
        if node.type == type_name:
            return [node] if self.osds_under(node.id, device_class) else []
        found = [b for c in node.children for b in self.under(c, type_name, device_class)]
        return sorted(found, key=lambda b: b.name)


@dataclass(slots=True)
class Placement:
    """What following a rule gives: the distinct OSDs it can place copies on, and the buckets chosen on the way."""

    osds: list[Node] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def simulate(rule: dict[str, Any], tree: CrushTree, size: int) -> Placement:
    """Follow `rule` (one entry of `osd crush rule dump`) for a pool of `size` copies; see the module docstring."""
    out = Placement()
    working: list[Node] = []
    device_class: str | None = None
    emitted: list[Node] = []
    for step in rule.get("steps", []):
        op = step.get("op")
        if op == "take":
            name = step.get("item_name", "")
            base, _, device_class = name.partition("~")  # "default~ssd": the shadow tree of one device class
            device_class = device_class or None
            node = tree.by_name(base) or tree.nodes.get(step.get("item", 0))
            if node is None:
                out.problems.append(f"rule {rule.get('rule_name')!r} takes {name!r}, which is not in the CRUSH tree")
                return out
            working = [node]
        elif op in ("choose_firstn", "choose_indep", "chooseleaf_firstn", "chooseleaf_indep"):
            num = int(step.get("num", 0))
            n = num if num > 0 else size + num
            chosen: list[Node] = []
            for parent in working:
                candidates = tree.under(parent.id, step.get("type", "osd"), device_class)
                picked = candidates[:max(n, 0)]
                if op.startswith("chooseleaf"):
                    picked = [tree.osds_under(b.id, device_class)[0] for b in picked]
                chosen.extend(picked)
            working = chosen
        elif op == "emit":
            emitted.extend(working)
            working = []
        # set_* tunables steps do not change what can be placed
    seen: set[int] = set()
    for node in emitted:
        if node.type != "osd":
            out.problems.append(f"rule {rule.get('rule_name')!r} emits {word(node.type)} {node.name}, not OSDs "
                                "(a choose step without a leaf)")
            return out
        if node.id not in seen:
            seen.add(node.id)
            out.osds.append(node)
    return out


@dataclass(frozen=True, slots=True)
class PoolReport:
    pool: str
    words: str                     # what the pool does with its copies, in plain words
    copies: int                    # size (replicated) or k+m (erasure-coded)
    placeable: int                 # distinct OSDs the rule reaches, at most `copies`
    problems: tuple[str, ...]      # each a reason the pool cannot serve as a storage class
    warnings: tuple[str, ...]


def describe_pool(pool: dict[str, Any], rule: dict[str, Any] | None, tree: CrushTree,
                  ec_profile: dict[str, Any] | None = None) -> PoolReport:
    """Describe one pool (an entry of `osd pool ls detail`) and check that its rule places all its copies."""
    name = pool["pool_name"]
    size, min_size = int(pool["size"]), int(pool["min_size"])
    erasure = pool.get("type") == 3  # pg_pool_t: 1 replicated, 3 erasure
    problems: list[str] = []
    warnings: list[str] = []
    if rule is None:
        return PoolReport(name, f"pool {name}, CRUSH rule {pool.get('crush_rule')} (not found)", size, 0,
                          (f"pool {name}: its CRUSH rule {pool.get('crush_rule')} does not exist",), ())
    if size < 1 or not 1 <= min_size <= size:
        problems.append(f"pool {name}: size {size} and min_size {min_size} make no sense (1 <= min_size <= size)")
    k = m = None
    if erasure and ec_profile:
        k, m = int(ec_profile.get("k", 0)), int(ec_profile.get("m", 0))
        if min_size < k:
            problems.append(f"pool {name}: min_size {min_size} is below k={k}: writes could be acknowledged "
                            "with fewer chunks than needed to read them back")
        elif min_size == k and m > 0:
            warnings.append(f"pool {name}: min_size {min_size} = k accepts writes that the loss of one more OSD "
                            "makes unreadable (k+1 is safer)")
    elif size >= 2 and min_size == 1:
        warnings.append(f"pool {name}: min_size 1 acknowledges writes held by a single copy")

    placement = simulate(rule, tree, size)
    problems.extend(placement.problems)
    placeable = min(len(placement.osds), size)
    words = _words(name, rule, tree, size, placement, k, m)
    if not placement.problems and placeable < size:
        need = _shortfall(rule, tree, size)
        problems.append(f"pool {name}: CRUSH rule {rule.get('rule_name')!r} can place only {placeable} of its "
                        f"{size} copies{need}")
        if placeable < min_size:
            problems.append(f"pool {name}: fewer placeable copies ({placeable}) than min_size {min_size}: "
                            "writes would block")
    return PoolReport(name, words, size, placeable, tuple(problems), tuple(warnings))


def _chooses(rule: dict[str, Any]) -> tuple[str | None, list[dict[str, Any]]]:
    """(the bucket taken, the choose steps) of a rule of one take ... emit; (None, []) for anything else."""
    steps = [s for s in rule.get("steps", []) if not str(s.get("op", "")).startswith("set_")]
    if len(steps) < 3 or steps[0].get("op") != "take" or steps[-1].get("op") != "emit":
        return None, []
    middle = steps[1:-1]
    if not all(str(s.get("op", "")).startswith("choose") for s in middle):
        return None, []
    return steps[0].get("item_name", ""), middle


def _words(pool: str, rule: dict[str, Any], tree: CrushTree, size: int, placement: Placement,
           k: int | None, m: int | None) -> str:
    copies = (f"erasure-coded k={k} m={m} ({size} chunks, any {k} restore an object)"
              if k is not None else f"{size} {'copy' if size == 1 else 'copies'}")
    taken, chooses = _chooses(rule)
    if taken is None:
        return f"pool {pool}, {copies}, CRUSH rule {rule.get('rule_name')!r} on " + \
            ", ".join(f"osd.{o.id}" for o in placement.osds)
    base, _, device_class = taken.partition("~")
    root = tree.by_name(base)
    where = "" if root is None or root.type == "root" else f" in {base}"
    dc = f" ({device_class} OSDs)" if device_class else ""
    if len(chooses) == 1:
        t = chooses[0].get("type", "osd")
        names = [b.name for b in tree.under(root.id, t, device_class or None)] if root else []
        return f"pool {pool}, {copies} on distinct {word(t, 2)}{where}{dc} ({', '.join(names)})"
    if len(chooses) == 2:
        outer, inner = chooses
        d, t = outer.get("type", "osd"), inner.get("type", "osd")
        per = int(inner.get("num", 0))
        domains = [b.name for b in tree.under(root.id, d, device_class or None)] if root else []
        if per == 1:
            return f"pool {pool}, {copies}, one per {word(d)}{where}{dc}: {', '.join(domains)}"
        per_text = f"up to {per}" if per > 0 else "all"
        return (f"pool {pool}, {copies}, {per_text} per {word(d)} on distinct {word(t, 2)}{where}{dc}: "
                f"{', '.join(domains)}")
    return f"pool {pool}, {copies}, CRUSH rule {rule.get('rule_name')!r} on " + \
        ", ".join(f"osd.{o.id}" for o in placement.osds)


def _shortfall(rule: dict[str, Any], tree: CrushTree, size: int) -> str:
    """Why a rule places too few copies, for the simple rule shapes: which failure domains it lacks."""
    taken, chooses = _chooses(rule)
    if taken is None or not chooses:
        return ""
    base, _, device_class = taken.partition("~")
    root = tree.by_name(base)
    if root is None:
        return ""
    t = chooses[0].get("type", "osd")
    have = tree.under(root.id, t, device_class or None)
    want = int(chooses[0].get("num", 0))
    want = want if want > 0 else size + want
    names = ", ".join(b.name for b in have) or "none"
    if len(chooses) == 1:
        return (f": it needs {size} distinct {word(t, 2)} under {base}, which has {len(have)} ({names})")
    per = int(chooses[1].get("num", 0))
    return (f": it picks {min(want, len(have))} {word(t, 2)} under {base} ({names}) and "
            f"{per if per > 0 else 'all'} {word(chooses[1].get('type', 'osd'), 2)} in each")
