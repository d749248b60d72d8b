"""Storage policies: which storage class (which pool) an instance is written to, and where it moves as it ages.

A policy is a YAML file (`storage.policy_file`), validated whole when it is loaded and then frozen:

    default_class: standard          # instances no rule matches (default: the class named "default")
    classes:
      standard:   {pool: vna}
      all-dc:
        pool: vna-all-dc             # created by the operators, with its size and CRUSH rule
        description: one copy per datacentre
        lifecycle:
          - {after_days: 365, move_to: cold}
      regional:   {pool: vna-dc-a}
      cold:       {pool: vna-cold}   # e.g. an erasure-coded pool
    rules:                           # the first rule that matches wins
      - match: {institution_name: "North Hospital"}
        class: all-dc
      - name: south by DIMSE
        match: {institution_name: ["South Clinic", "South Clinic *"], protocol: dimse}
        class: regional

A rule matches when every key it names matches (a key it does not name matches anything):
`institution_name` (InstitutionName 0008,0080), `calling_ae` (the sending AE title; DIMSE only),
`protocol` (`dimse` or `dicomweb`), `modality` (Modality 0008,0060). A value is one pattern or a list of
them; `*` matches any run of characters and `?` one character (as C-FIND wildcards, PS3.4 C.2.2.2.4), the
rest matches exactly, case included. Leading and trailing spaces of the instance's values are not
significant (PS3.5 6.2, LO, CS and AE); an absent value is matched as the empty string.

A lifecycle step `{after_days: N, move_to: C}` says an instance stored more than N days ago (its age
counts from when it was stored) belongs in class C; of a class's steps the one with the largest
`after_days` not beyond the age applies, then the steps of C, and so on (the chain must not loop).
`vna policy apply` moves the instances whose class differs from what this says.

This module is pure (no I/O but reading the file); `vna policy check` confronts a policy with the cluster.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from archive.errors import ConfigError

PROTOCOLS = ("dimse", "dicomweb")
MATCH_KEYS = ("institution_name", "calling_ae", "protocol", "modality")
DEFAULT_CLASS = "default"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# a pool name is also a directory name under the filesystem store's root: no '/', no leading dot
_POOL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True, slots=True)
class LifecycleStep:
    after_days: float
    move_to: str


@dataclass(frozen=True, slots=True)
class StorageClass:
    name: str
    pool: str
    lifecycle: tuple[LifecycleStep, ...] = ()  # by after_days, ascending
    description: str = ""


@dataclass(frozen=True, slots=True)
class Attributes:
    """What rules match on, for one instance."""

    institution_name: str | None = None
    calling_ae: str | None = None
    protocol: str | None = None
    modality: str | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    storage_class: str
    # per match key, its patterns compiled to one regular expression; a key not named is absent
    patterns: tuple[tuple[str, tuple[str, ...], re.Pattern[str]], ...] = ()

    def matches(self, attrs: Attributes) -> bool:
        for key, _texts, regex in self.patterns:
            value = getattr(attrs, key)
            if regex.fullmatch((value or "").strip()) is None:
                return False
        return True

    def describe(self) -> str:
        if not self.patterns:
            return "every instance"
        parts = []
        for key, texts, _ in self.patterns:
            shown = " or ".join(repr(t) for t in texts)
            parts.append(f"{key} {shown}")
        return " and ".join(parts)


@dataclass(frozen=True, slots=True)
class Policy:
    classes: Mapping[str, StorageClass]
    rules: tuple[Rule, ...]
    default_class: str
    source: str = "<built-in>"

    @classmethod
    def single(cls, pool: str | None) -> Policy:
        """What a process without a policy file has: one class "default", on the configured pool."""
        return cls(classes=MappingProxyType({DEFAULT_CLASS: StorageClass(DEFAULT_CLASS, pool or "")}),
                   rules=(), default_class=DEFAULT_CLASS)

    @property
    def default(self) -> StorageClass:
        return self.classes[self.default_class]

    @property
    def pools(self) -> tuple[str, ...]:
        """Every pool the classes name, each once, in the order of the classes."""
        return tuple(dict.fromkeys(c.pool for c in self.classes.values()))

    def choose_class(self, *, institution_name: str | None = None, calling_ae: str | None = None,
                     protocol: str | None = None, modality: str | None = None) -> StorageClass:
        """The class of a newly stored instance: the first rule that matches, else the default class."""
        return self.classes[self.rule_for(Attributes(institution_name, calling_ae, protocol, modality))]

    def rule_for(self, attrs: Attributes) -> str:
        """The name of the class the rules give `attrs` (before any lifecycle step)."""
        for rule in self.rules:
            if rule.matches(attrs):
                return rule.storage_class
        return self.default_class

    def after_lifecycle(self, storage_class: str, age_days: float) -> StorageClass:
        """Where an instance that the rules put in `storage_class` belongs once `age_days` old."""
        current = self.classes[storage_class]
        for _ in range(len(self.classes)):  # validation rules out loops; bounded all the same
            step = None
            for s in current.lifecycle:
                if s.after_days <= age_days:
                    step = s
            if step is None:
                return current
            current = self.classes[step.move_to]
        return current

    def desired_class(self, attrs: Attributes, age_days: float) -> StorageClass:
        """The class an instance with `attrs`, stored `age_days` ago, should be in now."""
        return self.after_lifecycle(self.rule_for(attrs), age_days)

    @property
    def has_lifecycle(self) -> bool:
        return any(c.lifecycle for c in self.classes.values())


def load_policy(path: Path) -> Policy:
    """Read and validate a policy file; ConfigError lists every problem found."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read policy file {path}: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"policy file {path} is not valid YAML: {exc}") from exc
    return parse_policy(data, source=str(path))


def parse_policy(data: Any, *, source: str = "<policy>") -> Policy:
    """Validate the parsed YAML of a policy into a frozen Policy; ConfigError lists every problem."""
    problems: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError(f"policy {source}: the top level must be a mapping with 'classes' and 'rules'")
    for key in data:
        if key not in ("version", "default_class", "classes", "rules"):
            problems.append(f"unknown key {key!r} at the top level (known: version, default_class, classes, rules)")
    if data.get("version", 1) != 1:
        problems.append(f"version {data.get('version')!r} is not supported (1 is)")

    classes = _parse_classes(data.get("classes"), problems)
    default_class = data.get("default_class", DEFAULT_CLASS)
    if not isinstance(default_class, str):
        problems.append(f"default_class must be a class name, not {default_class!r}")
    elif classes and default_class not in classes:
        problems.append(f"default_class {default_class!r} is not one of the classes ({', '.join(classes)})"
                        if "default_class" in data else
                        f"no class named {DEFAULT_CLASS!r}: name one, or set default_class")
    rules = _parse_rules(data.get("rules", []), classes, problems)
    _check_lifecycles(classes, problems)
    if problems:
        raise ConfigError(f"policy {source}: " + "; ".join(problems))
    return Policy(classes=MappingProxyType(classes), rules=tuple(rules), default_class=default_class,
                  source=source)


def _parse_classes(raw: Any, problems: list[str]) -> dict[str, StorageClass]:
    if not isinstance(raw, dict) or not raw:
        problems.append("'classes' must map at least one class name to its pool")
        return {}
    classes: dict[str, StorageClass] = {}
    for name, spec in raw.items():
        where = f"class {name!r}"
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            problems.append(f"{where}: a class name is 1-64 letters, digits, '.', '_' or '-'")
            continue
        if isinstance(spec, str):
            spec = {"pool": spec}
        if not isinstance(spec, dict):
            problems.append(f"{where}: must be a mapping with 'pool' (and optionally 'lifecycle', 'description')")
            continue
        for key in spec:
            if key not in ("pool", "lifecycle", "description"):
                problems.append(f"{where}: unknown key {key!r} (known: pool, lifecycle, description)")
        pool = spec.get("pool")
        if not isinstance(pool, str) or not _POOL.fullmatch(pool):
            problems.append(f"{where}: 'pool' must name a pool (letters, digits, '.', '_', '-'), not {pool!r}")
            pool = ""
        steps = _parse_lifecycle(spec.get("lifecycle", []), where, problems)
        description = spec.get("description", "")
        if not isinstance(description, str):
            problems.append(f"{where}: 'description' must be text")
            description = ""
        classes[name] = StorageClass(name, pool, steps, description)
    return classes


def _parse_lifecycle(raw: Any, where: str, problems: list[str]) -> tuple[LifecycleStep, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.append(f"{where}: 'lifecycle' must be a list of steps {{after_days: N, move_to: CLASS}}")
        return ()
    steps = []
    for n, step in enumerate(raw, 1):
        if not isinstance(step, dict) or set(step) != {"after_days", "move_to"}:
            problems.append(f"{where}: lifecycle step {n} must have exactly 'after_days' and 'move_to'")
            continue
        days, target = step["after_days"], step["move_to"]
        if isinstance(days, bool) or not isinstance(days, int | float) or not math.isfinite(days) or days < 0:
            problems.append(f"{where}: lifecycle step {n}: after_days must be a number of days >= 0, not {days!r}")
            continue
        if not isinstance(target, str):
            problems.append(f"{where}: lifecycle step {n}: move_to must be a class name, not {target!r}")
            continue
        steps.append(LifecycleStep(float(days), target))
    days_seen = [s.after_days for s in steps]
    if len(set(days_seen)) != len(days_seen):
        problems.append(f"{where}: two lifecycle steps with the same after_days")
    return tuple(sorted(steps, key=lambda s: s.after_days))


def _parse_rules(raw: Any, classes: dict[str, StorageClass], problems: list[str]) -> list[Rule]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        problems.append("'rules' must be a list of {match: {...}, class: NAME}")
        return []
    rules = []
    for n, spec in enumerate(raw, 1):
        where = f"rule {n}"
        if not isinstance(spec, dict):
            problems.append(f"{where}: must be a mapping with 'match' and 'class'")
            continue
        if isinstance(spec.get("name"), str):
            where = f"rule {n} ({spec['name']})"
        for key in spec:
            if key not in ("name", "match", "class"):
                problems.append(f"{where}: unknown key {key!r} (known: name, match, class)")
        target = spec.get("class")
        if not isinstance(target, str):
            problems.append(f"{where}: 'class' must name a class")
            continue
        if classes and target not in classes:
            problems.append(f"{where}: class {target!r} is not defined")
        match = spec.get("match") or {}
        if not isinstance(match, dict):
            problems.append(f"{where}: 'match' must be a mapping of {', '.join(MATCH_KEYS)}")
            continue
        patterns = []
        for key, value in match.items():
            if key not in MATCH_KEYS:
                problems.append(f"{where}: cannot match on {key!r} (only on {', '.join(MATCH_KEYS)})")
                continue
            texts = tuple(value) if isinstance(value, list) else (value,)
            if not texts or not all(isinstance(t, str) for t in texts):
                problems.append(f"{where}: {key} must be text or a list of texts, not {value!r}")
                continue
            if key == "protocol" and not set(texts) <= set(PROTOCOLS):
                problems.append(f"{where}: protocol must be one of {', '.join(PROTOCOLS)}, not {value!r}")
                continue
            patterns.append((key, texts, _compile(texts)))
        rules.append(Rule(str(spec.get("name") or f"rule {n}"), target, tuple(patterns)))
    return rules


def _compile(patterns: tuple[str, ...]) -> re.Pattern[str]:
    """PS3.4 C.2.2.2.4 wildcards: '*' any run of characters, '?' one; the rest literally."""
    alternatives = []
    for p in patterns:
        alternatives.append("".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in p.strip()))
    return re.compile("|".join(f"(?:{a})" for a in alternatives), re.DOTALL)


def _check_lifecycles(classes: dict[str, StorageClass], problems: list[str]) -> None:
    for c in classes.values():
        for s in c.lifecycle:
            if s.move_to not in classes:
                problems.append(f"class {c.name!r}: lifecycle moves to {s.move_to!r}, which is not defined")
            elif s.move_to == c.name:
                problems.append(f"class {c.name!r}: a lifecycle step cannot move to its own class")
    # the lifecycle graph must not loop: a loop would move instances back and forth forever
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for s in classes[name].lifecycle:
            if s.move_to not in classes or s.move_to == name:
                continue
            if state.get(s.move_to) == 1:
                loop = path[path.index(s.move_to):] + [s.move_to] if s.move_to in path else [name, s.move_to]
                problems.append(f"lifecycle steps loop: {' -> '.join(loop)}")
            elif s.move_to not in state:
                visit(s.move_to, path + [s.move_to])
        state[name] = 2

    for name in classes:
        if name not in state:
            visit(name, [name])
