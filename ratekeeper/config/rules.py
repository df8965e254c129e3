"""The rules file: TOML parsed and validated into frozen objects.

Every error names the file and the dotted key it is about, and all errors of a file are
reported together, so ``ratekeeper check-config`` can list them in one run. Warnings name
what is valid but almost certainly not meant: a rule or flag nothing uses, a subject field
that looks like a misspelling of another.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from limits import parse_many

from ratekeeper.config.tripwires import Alerting, Tripwire, parse_alerts, parse_tripwires
from ratekeeper.errors import ConfigError

__all__ = [
    "Action",
    "Config",
    "Flag",
    "IPGrouping",
    "Route",
    "Rule",
    "Window",
    "config_from_data",
    "config_warnings",
    "duration_text",
    "load_config",
    "parse_config",
    "parse_duration",
]

Algorithm = Literal["sliding-log", "sliding-counter"]
FailMode = Literal["open", "closed"]

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}\Z")  # (\Z: `$` allows a final newline)
SUBJECT_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}\Z")
# Request fields that are not subjects, so no rule may use them as a key.
RESERVED_FIELDS = frozenset({"action", "cost", "ip_hash", "checks"})
METHODS = frozenset({"*", "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
DURATION_UNITS = {
    "s": 1, "sec": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
    "w": 604800, "week": 604800, "weeks": 604800,
}
DURATION_RE = re.compile(r"^\s*(\d+)\s*([a-z]+)\s*$")
# Flags the service itself reads, so no action needs to list them.
BUILT_IN_FLAGS = frozenset({"shadow-mode"})
# The subject fields a package index sends; a field one edit away from one of these (or from
# a field other rules use) is more likely a typo than a new subject.
COMMON_SUBJECTS = frozenset({"ip", "user", "project"})


@dataclass(frozen=True, slots=True)
class Window:
    """One limit of a rule: at most ``limit`` hits in any ``seconds``-long window."""

    limit: int
    seconds: int


@dataclass(frozen=True, slots=True)
class Rule:
    """A named limit: its windows, the subject fields that make its bucket, and its policy."""

    name: str
    windows: tuple[Window, ...]
    key: tuple[str, ...]
    algorithm: Algorithm = "sliding-log"
    fail: FailMode = "open"
    shadow: bool = False
    penalty: int = 0  # seconds in the penalty box after exceeding; 0 = none


@dataclass(frozen=True, slots=True)
class Action:
    """What the origin asks about: the rules that all must pass and the flags that block it."""

    name: str
    rules: tuple[Rule, ...]
    flags: tuple[str, ...]
    clearable: bool = False  # the origin may clear its counters (POST /v1/origin/clear)


@dataclass(frozen=True, slots=True)
class Flag:
    """A kill switch declared in the config; its state lives in Redis."""

    name: str
    description: str = ""
    message: str = ""
    assume: bool = False  # its state while Redis holds none for it (e.g. Redis unreadable)
    notify: bool = False  # the origin shows its message site-wide while it is on
    origin: bool = False  # the origin reads it (GET /v1/origin/flags) rather than an action


@dataclass(frozen=True, slots=True)
class Route:
    """Maps a proxied request (method and path glob) to an action."""

    method: str
    path: str
    action: str


@dataclass(frozen=True, slots=True)
class IPGrouping:
    """How many leading bits of an address identify one client."""

    ipv4_prefix: int = 32
    ipv6_prefix: int = 64


@dataclass(frozen=True, slots=True)
class Config:
    """A validated rules file."""

    rules: Mapping[str, Rule]
    actions: Mapping[str, Action]
    flags: Mapping[str, Flag]
    routes: tuple[Route, ...] = ()
    ip: IPGrouping = field(default_factory=IPGrouping)
    source: str = "<config>"
    tripwires: Mapping[str, Tripwire] = field(default_factory=dict)
    alerts: Alerting = field(default_factory=Alerting)

    @property
    def subjects(self) -> frozenset[str]:
        """Every subject field some rule keys on, plus ``ip``."""
        names = {"ip"}
        for rule in self.rules.values():
            names.update(rule.key)
        return frozenset(names)


def load_config(path: str | Path) -> Config:
    """Read and validate a rules file; raise ConfigError naming the file and keys."""
    name = str(path)
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError([f"{name}: cannot read the file ({exc.strerror})"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{name}: the file is not UTF-8"]) from None
    return parse_config(text, source=name)


def parse_config(text: str, *, source: str = "<config>") -> Config:
    """Validate TOML text; raise ConfigError with every problem found."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: invalid TOML: {exc}"]) from None
    return config_from_data(data, source=source)


def config_from_data(data: Mapping[str, Any], *, source: str = "<config>") -> Config:
    """Validate an already-parsed document; raise ConfigError with every problem found."""
    parser = _Parser(source)
    config = parser.parse(dict(data))
    if parser.errors:
        raise ConfigError(parser.errors)
    return config


_UNITS = (("d", 86400), ("h", 3600), ("min", 60), ("s", 1))


def duration_text(seconds: float) -> str:
    """``2 h 5 min``, ``10 min``: a duration as a person says it, in its two largest units
    (``parse_duration`` reads it back when it has one)."""
    left = max(0, round(seconds))
    if left == 0:
        return "0 s"
    parts = []
    for unit, size in _UNITS:
        if left >= size:
            parts.append(f"{left // size} {unit}")
            left %= size
        if len(parts) == 2:
            break
    return " ".join(parts)


def parse_duration(value: object) -> int:
    """Seconds from ``3600``, ``"90s"``, ``"2h"``, ``"1 hour"``, ``"30 minutes"``."""
    if isinstance(value, bool):
        raise ValueError("a duration must be a number of seconds or a string like '1 hour'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return value
    if isinstance(value, str):
        match = DURATION_RE.match(value.lower())
        if match and match.group(2) in DURATION_UNITS:
            return int(match.group(1)) * DURATION_UNITS[match.group(2)]
    raise ValueError(f"{value!r} is not a duration such as 3600, '90s', '2h' or '1 hour'")


def config_warnings(config: Config) -> list[str]:
    """What ``check-config`` warns about: valid, but probably not what was meant.

    A subject field is just a name the request must carry, so a misspelt one (``"usr"``) is a
    valid config whose checks then all fail with a 400; only its likeness to another field
    can give it away.
    """
    warnings: list[str] = []

    def warn(where: str, message: str) -> None:
        warnings.append(f"{config.source}: {where}: warning: {message}")

    used_rules = {rule.name for action in config.actions.values() for rule in action.rules}
    used_flags = {flag for action in config.actions.values() for flag in action.flags}
    for name in config.rules:
        if name not in used_rules:
            warn(f"rules.{name}", "no action lists this rule, so it never counts anything")
    for name, flag in config.flags.items():
        if name not in used_flags and name not in BUILT_IN_FLAGS and not (
                flag.origin or flag.notify):
            warn(f"flags.{name}", "no action lists this flag, so turning it on blocks nothing")
    for name, wire in config.tripwires.items():
        declared = config.flags.get(wire.flag)
        if wire.flag not in used_flags and not (declared is not None and declared.origin):
            warn(f"tripwires.{name}.flag", f'no action lists flag "{wire.flag}", so a trip '
                 "blocks nothing (unless the origin reads it: then set origin = true on it)")
    for name, action in config.actions.items():
        if not action.rules and not action.flags:
            warn(f"actions.{name}", "has no rules and no flags, so every check is allowed")
    users: dict[str, int] = {}
    for rule in config.rules.values():
        for subject in rule.key:
            users[subject] = users.get(subject, 0) + 1
    for rule in config.rules.values():
        for subject in rule.key:
            twin = _likely_meant(subject, users)
            if twin is not None:
                warn(f"rules.{rule.name}.key", f'"{subject}" looks like a misspelling of '
                     f'"{twin}" (checks of actions with this rule must send a "{subject}" '
                     "field)")
    return warnings


def _likely_meant(subject: str, users: Mapping[str, int]) -> str | None:
    """The field ``subject`` was probably meant to be, or None when it looks deliberate."""
    if subject in COMMON_SUBJECTS or len(subject) < 3:
        return None
    for other in sorted(COMMON_SUBJECTS | set(users) - {subject}):
        if _edits(subject, other) == 1 and (
                other in COMMON_SUBJECTS or users.get(other, 0) > users[subject]):
            return other
    return None


def _edits(a: str, b: str) -> int:
    """Edit distance with adjacent transpositions (``usre`` is one edit from ``user``)."""
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        row = [i]
        for j, cb in enumerate(b, 1):
            cost = min(previous[j] + 1, row[j - 1] + 1, previous[j - 1] + (ca != cb))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                cost = min(cost, previous2[j - 2] + 1)
            row.append(cost)
        previous2, previous = previous, row
    return previous[-1]


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        self.errors: list[str] = []

    def error(self, where: str, message: str) -> None:
        self.errors.append(f"{self.source}: {where}: {message}")

    def table(self, value: object, where: str) -> dict[str, Any]:
        if isinstance(value, dict):
            return value
        self.error(where, "must be a table")
        return {}

    def only(self, data: Mapping[str, object], where: str, allowed: set[str]) -> None:
        for key in data:
            if key not in allowed:
                hint = ", ".join(sorted(allowed))
                self.error(f"{where}.{key}" if where else key, f"unknown key (allowed: {hint})")

    def names(self, data: Mapping[str, object], where: str) -> None:
        for key in data:
            if not NAME_RE.match(key):
                self.error(f"{where}.{key}", "names use a-z, 0-9, '.', '_' and '-' (at most 64)")

    def parse(self, data: dict[str, Any]) -> Config:
        self.only(data, "", {"ip", "rules", "actions", "flags", "routes", "tripwires", "alerts"})
        ip = self.ip(self.table(data.get("ip", {}), "ip"))
        flags_data = self.table(data.get("flags", {}), "flags")
        self.names(flags_data, "flags")
        flags = {n: self.flag(n, self.table(v, f"flags.{n}")) for n, v in flags_data.items()}
        rules_data = self.table(data.get("rules", {}), "rules")
        self.names(rules_data, "rules")
        rules = {}
        for rule_name, value in rules_data.items():
            rule = self.rule(rule_name, self.table(value, f"rules.{rule_name}"))
            if rule is not None:
                rules[rule_name] = rule
        actions_data = self.table(data.get("actions", {}), "actions")
        self.names(actions_data, "actions")
        actions = {
            n: self.action(n, self.table(v, f"actions.{n}"), rules, rules_data, flags)
            for n, v in actions_data.items()
        }
        if not actions:
            self.error("actions", "at least one action is required")
        routes = self.routes(data.get("routes", []), actions)
        tripwires = parse_tripwires(data.get("tripwires", {}), actions=actions_data,
                                    flags=flags,
                                    names_ok=lambda n: NAME_RE.match(n) is not None,
                                    duration=parse_duration, error=self.error)
        alerts = parse_alerts(data.get("alerts", {}), self.error)
        return Config(rules=rules, actions=actions, flags=flags, routes=routes, ip=ip,
                      tripwires=tripwires, alerts=alerts,
                      source=self.source)

    def ip(self, data: dict[str, Any]) -> IPGrouping:
        self.only(data, "ip", {"ipv4_prefix", "ipv6_prefix"})
        v4 = self.integer(data, "ip", "ipv4_prefix", 32, 8, 32)
        v6 = self.integer(data, "ip", "ipv6_prefix", 64, 16, 128)
        return IPGrouping(ipv4_prefix=v4, ipv6_prefix=v6)

    def integer(self, data: Mapping[str, object], where: str, key: str, default: int,
                low: int, high: int) -> int:
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.error(f"{where}.{key}", f"must be an integer from {low} to {high}")
            return default
        return value

    def string(self, data: Mapping[str, object], where: str, key: str, default: str) -> str:
        value = data.get(key, default)
        if not isinstance(value, str):
            self.error(f"{where}.{key}", "must be a string")
            return default
        return value

    def choice(self, data: Mapping[str, object], where: str, key: str, options: tuple[str, ...],
               default: str) -> str:
        value = data.get(key, default)
        if value not in options:
            self.error(f"{where}.{key}", "must be one of " + ", ".join(f'"{o}"' for o in options))
            return default
        return str(value)

    def flag(self, name: str, data: dict[str, Any]) -> Flag:
        where = f"flags.{name}"
        self.only(data, where, {"description", "message", "assume", "notify", "origin"})
        return Flag(name=name, description=self.string(data, where, "description", ""),
                    message=self.string(data, where, "message", ""),
                    assume=self.boolean(data, where, "assume"),
                    notify=self.boolean(data, where, "notify"),
                    origin=self.boolean(data, where, "origin"))

    def boolean(self, data: Mapping[str, object], where: str, key: str) -> bool:
        value = data.get(key, False)
        if not isinstance(value, bool):
            self.error(f"{where}.{key}", "must be true or false")
            return False
        return value

    def rule(self, name: str, data: dict[str, Any]) -> Rule | None:
        where = f"rules.{name}"
        self.only(data, where, {"limit", "key", "algorithm", "fail", "shadow", "penalty"})
        windows = self.windows(data, where)
        key = self.key(data, where)
        algorithm = self.choice(data, where, "algorithm", ("sliding-log", "sliding-counter"),
                                "sliding-log")
        fail = self.choice(data, where, "fail", ("open", "closed"), "open")
        shadow = data.get("shadow", False)
        if not isinstance(shadow, bool):
            self.error(f"{where}.shadow", "must be true or false")
            shadow = False
        penalty = 0
        if "penalty" in data:
            try:
                penalty = parse_duration(data["penalty"])
            except ValueError as exc:
                self.error(f"{where}.penalty", str(exc))
        if windows is None or key is None:
            return None
        return Rule(name=name, windows=windows, key=key,
                    algorithm=algorithm,  # type: ignore[arg-type]
                    fail=fail,  # type: ignore[arg-type]
                    shadow=shadow, penalty=penalty)

    def windows(self, data: Mapping[str, object], where: str) -> tuple[Window, ...] | None:
        limit = data.get("limit")
        if not isinstance(limit, str) or not limit.strip():
            self.error(f"{where}.limit", 'is required, a string such as "5 per minute"')
            return None
        try:
            items = parse_many(limit)
        except ValueError:
            self.error(f"{where}.limit", f'cannot parse "{limit}" (write e.g. "5 per 5 minutes, '
                                         '20 per hour")')
            return None
        windows: dict[int, Window] = {}
        for item in items:
            seconds = int(item.get_expiry())
            if item.amount < 1:
                self.error(f"{where}.limit", "every limit must allow at least 1 hit")
                return None
            if seconds in windows:
                self.error(f"{where}.limit", f"two limits share the {seconds}-second window")
                return None
            windows[seconds] = Window(limit=int(item.amount), seconds=seconds)
        return tuple(windows[s] for s in sorted(windows))

    def key(self, data: Mapping[str, object], where: str) -> tuple[str, ...] | None:
        if "key" not in data:
            self.error(f"{where}.key", 'is required: a list of subject fields such as ["ip"], '
                                       "or [] for one global bucket")
            return None
        value = data["key"]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.error(f"{where}.key", "must be a list of subject field names")
            return None
        fields: list[str] = []
        for item in value:
            if not SUBJECT_RE.match(item) or item in RESERVED_FIELDS:
                self.error(f"{where}.key", f'"{item}" is not a usable subject field name')
                return None
            if item in fields:
                self.error(f"{where}.key", f'"{item}" is listed twice')
                return None
            fields.append(item)
        return tuple(fields)

    def action(self, name: str, data: dict[str, Any], rules: Mapping[str, Rule],
               declared_rules: Mapping[str, object], flags: Mapping[str, Flag]) -> Action:
        where = f"actions.{name}"
        self.only(data, where, {"rules", "flags", "clearable"})
        rule_names = self.name_list(data, where, "rules")
        flag_names = self.name_list(data, where, "flags")
        for rule_name in rule_names:
            if rule_name not in declared_rules:
                self.error(f"{where}.rules", f'"{rule_name}" is not a declared rule')
        for flag_name in flag_names:
            if flag_name not in flags:
                self.error(f"{where}.flags", f'"{flag_name}" is not a declared flag')
        return Action(name=name, rules=tuple(rules[r] for r in rule_names if r in rules),
                      flags=tuple(flag_names), clearable=self.boolean(data, where, "clearable"))

    def name_list(self, data: Mapping[str, object], where: str, key: str) -> tuple[str, ...]:
        value = data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.error(f"{where}.{key}", "must be a list of names")
            return ()
        if len(set(value)) != len(value):
            self.error(f"{where}.{key}", "lists a name twice")
        return tuple(dict.fromkeys(value))

    def routes(self, value: object, actions: Mapping[str, Action]) -> tuple[Route, ...]:
        if not isinstance(value, list):
            self.error("routes", "must be an array of tables ([[routes]])")
            return ()
        routes = []
        for index, item in enumerate(value):
            where = f"routes[{index}]"
            data = self.table(item, where)
            self.only(data, where, {"method", "path", "action"})
            method = self.string(data, where, "method", "*").upper()
            if method not in METHODS:
                self.error(f"{where}.method", "must be an HTTP method or \"*\"")
            path = self.string(data, where, "path", "")
            if not path.startswith("/"):
                self.error(f"{where}.path", 'must be a path glob starting with "/"')
            action = self.string(data, where, "action", "")
            if action not in actions:
                self.error(f"{where}.action", f'"{action}" is not a declared action')
            else:
                # a reverse proxy knows the client's address and nothing else about it
                for rule in actions[action].rules:
                    extra = [f for f in rule.key if f != "ip"]
                    if extra:
                        self.error(f"{where}.action", f'"{action}" has rule "{rule.name}" keyed '
                                   f'on "{extra[0]}", which a proxy cannot send; a routed '
                                   'action may only use rules keyed on ["ip"] or []')
                        break
            routes.append(Route(method=method, path=path, action=action))
        return tuple(routes)
