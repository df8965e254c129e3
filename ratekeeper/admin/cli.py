"""The admin commands of ``ratekeeper``: a client of the admin API that prints tables.

    ratekeeper flags list | on NAME [--message M] [--reason R] [--expires-in 2h] | off NAME
    ratekeeper bans list | add FIELD VALUE --duration 1h [--reason R] | lift ID
    ratekeeper audit [--limit N]
    ratekeeper top RULE [--limit N]
    ratekeeper reset (--action A | --rule R) [FIELD=VALUE ...] [--reason R]
    ratekeeper tripwires list | disarm NAME [--reason R] | arm NAME [--reason R]

The server and token come from ``--url`` / ``--token`` or ``RATEKEEPER_URL`` /
``RATEKEEPER_TOKEN``. Durations are seconds or a number and a unit (``90s``, ``30m``, ``2h``,
``1d``, ``1 week``); times are printed in ISO 8601, UTC. Exit status: 0 done, 1 the server
refused or could not be reached, 2 a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp

from ratekeeper.config.rules import parse_duration

__all__ = ["COMMANDS", "add_commands", "run"]

COMMANDS = frozenset({"flags", "bans", "audit", "top", "reset", "tripwires"})
DEFAULT_URL = "http://127.0.0.1:8080"
TIMEOUT = 10.0
MAX_CELL = 60


class CommandError(Exception):
    """A failure to report in one line; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _common(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--url", help=f"the server (default: $RATEKEEPER_URL or {DEFAULT_URL})")
    parser.add_argument("--token", help="an admin token (default: $RATEKEEPER_TOKEN)")
    parser.add_argument("--json", action="store_true", help="print the API's JSON answer")
    return parser


def add_commands(commands: Any) -> None:
    """Add the admin sub-commands to the ``ratekeeper`` argument parser."""
    flags = commands.add_parser("flags", help="list and flip kill switches")
    verbs = flags.add_subparsers(dest="verb", required=True)
    _common(verbs.add_parser("list", help="every flag and its state"))
    on = _common(verbs.add_parser("on", help="turn a flag on"))
    on.add_argument("name")
    on.add_argument("--message", help="what users are shown (default: the config's)")
    on.add_argument("--reason", help="why, for the audit trail")
    on.add_argument("--expires-in", metavar="DURATION",
                    help="turn it off again after this long: 3600, 90m, 2h, 1d")
    off = _common(verbs.add_parser("off", help="turn a flag off"))
    off.add_argument("name")
    off.add_argument("--reason", help="why, for the audit trail")

    bans = commands.add_parser("bans", help="list, add and lift bans")
    verbs = bans.add_subparsers(dest="verb", required=True)
    _common(verbs.add_parser("list", help="active bans (subjects are hashed)"))
    add = _common(verbs.add_parser("add", help="ban a subject, e.g. `bans add ip 203.0.113.7`"))
    add.add_argument("field", help="ip, ip_hash, subject_hash, user, project, ...")
    add.add_argument("value")
    add.add_argument("--duration", required=True, metavar="DURATION",
                     help="how long: 3600, 90m, 2h, 1d")
    add.add_argument("--reason", default="", help="why, for the audit trail")
    lift = _common(verbs.add_parser("lift", help="lift a ban by its id"))
    lift.add_argument("id")
    lift.add_argument("--reason", default="", help="why, for the audit trail")

    audit = _common(commands.add_parser("audit", help="recent admin changes, newest first"))
    audit.add_argument("--limit", type=int, default=20, help="events to show (default: 20)")

    top = _common(commands.add_parser("top", help="a rule's most-denied subjects, last hour"))
    top.add_argument("rule")
    top.add_argument("--limit", type=int, default=20, help="subjects to show (default: 20)")

    reset = _common(commands.add_parser("reset", help="clear a subject's counters"))
    scope = reset.add_mutually_exclusive_group(required=True)
    scope.add_argument("--action", help="clear every rule of this action")
    scope.add_argument("--rule", help="clear this rule only")
    reset.add_argument("subjects", nargs="*", metavar="FIELD=VALUE",
                       help="the subjects the rules key on, e.g. ip=203.0.113.7 user=alice")
    reset.add_argument("--reason", default="", help="why, for the audit trail")

    wires = commands.add_parser("tripwires", help="list, disarm and re-arm tripwires")
    verbs = wires.add_subparsers(dest="verb", required=True)
    _common(verbs.add_parser("list", help="every tripwire, its count and its state"))
    for verb, what in (("disarm", "let it count but never trip"),
                       ("arm", "re-arm it (and clear a trip, so it may trip again)")):
        change = _common(verbs.add_parser(verb, help=what))
        change.add_argument("name")
        change.add_argument("--reason", default="", help="why, for the audit trail")


def run(args: argparse.Namespace) -> int:
    """Run one admin command; returns the exit status."""
    try:
        return asyncio.run(_run(args))
    except CommandError as exc:
        print(f"ratekeeper: {exc}", file=sys.stderr)
        return exc.code


def _seconds(text: str | None, option: str) -> int | None:
    if text is None:
        return None
    try:
        # "3600", "90s", "2h", "1d", "1 day" alike
        value = int(text) if text.strip().isdigit() else parse_duration(text.strip())
    except ValueError:
        raise CommandError(f"{option}: '{text}' is not a duration such as 3600, 90m, 2h or "
                           "1 day", 2) from None
    if value < 1:
        raise CommandError(f"{option} must be at least one second", 2)
    return value


async def _run(args: argparse.Namespace) -> int:
    url = (args.url or os.environ.get("RATEKEEPER_URL") or DEFAULT_URL).rstrip("/")
    token = args.token or os.environ.get("RATEKEEPER_TOKEN")
    if not token:
        raise CommandError("give an admin token with --token or RATEKEEPER_TOKEN", 2)
    method, path, body = _request(args)
    answer = await _call(url, token, method, path, body)
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print(_render(args, answer))
    return 0


def _request(args: argparse.Namespace) -> tuple[str, str, dict[str, Any] | None]:
    command, verb = args.command, getattr(args, "verb", None)
    if command == "flags" and verb == "list":
        return "GET", "/v1/admin/flags", None
    if command == "flags":
        body: dict[str, Any] = {"enabled": verb == "on"}
        if args.reason:
            body["reason"] = args.reason
        if verb == "on":
            if args.message:
                body["message"] = args.message
            expires_in = _seconds(args.expires_in, "--expires-in")
            if expires_in is not None:
                body["expires_in"] = expires_in
        return "PUT", f"/v1/admin/flags/{quote(args.name, safe='')}", body
    if command == "bans" and verb == "list":
        return "GET", "/v1/admin/bans", None
    if command == "bans" and verb == "add":
        return "POST", "/v1/admin/bans", {args.field: args.value,
                                          "duration": _seconds(args.duration, "--duration"),
                                          "reason": args.reason}
    if command == "bans":
        return "DELETE", f"/v1/admin/bans/{quote(args.id, safe='')}", {"reason": args.reason}
    if command == "audit":
        return "GET", "/v1/admin/audit?" + urlencode({"limit": args.limit}), None
    if command == "top":
        return "GET", "/v1/admin/top?" + urlencode({"rule": args.rule, "limit": args.limit}), None
    if command == "tripwires" and verb == "list":
        return "GET", "/v1/admin/tripwires", None
    if command == "tripwires":
        return "PUT", f"/v1/admin/tripwires/{quote(args.name, safe='')}", {
            "armed": verb == "arm", "reason": args.reason}
    body = {"reason": args.reason}
    body.update({"action": args.action} if args.action else {"rule": args.rule})
    for item in args.subjects:
        field, sep, value = item.partition("=")
        if not sep or not field:
            raise CommandError(f"subjects are FIELD=VALUE, not '{item}'", 2)
        body[field] = value
    return "POST", "/v1/admin/reset", body


async def _call(url: str, token: str, method: str, path: str,
                body: dict[str, Any] | None) -> Any:
    headers = {"Authorization": f"Bearer {token}"}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as http, \
                http.request(method, url + path, json=body, headers=headers) as response:
            text = await response.text()
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        reason = str(exc) or type(exc).__name__
        raise CommandError(f"cannot reach {url}: {reason}") from None
    try:
        answer = json.loads(text) if text else {}
    except ValueError:
        answer = {"error": text.strip()[:200]}
    if status >= 400:
        error = answer.get("error") if isinstance(answer, dict) else None
        raise CommandError(f"{method} {path} failed with {status}: {error or 'no reason given'}")
    return answer


# -- output ----------------------------------------------------------------------------------

def _when(value: Any) -> str:
    """A Unix time as ISO 8601 in UTC, to the second."""
    if value is None:
        return "-"
    return datetime.fromtimestamp(float(value), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _detail(detail: dict[str, Any]) -> str:
    return " ".join(f"{key}={_value(key, value)}" for key, value in detail.items())


def _value(key: str, value: Any) -> str:
    if key.endswith("_at") and _is_number(value):
        return _when(value)  # the API gives Unix seconds; a person reads a date
    if isinstance(value, dict):
        return ",".join(f"{k}:{_value(str(k), v)}" for k, v in value.items())
    if isinstance(value, list):
        return ",".join(_value(key, v) for v in value)
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _cell(value: Any) -> str:
    text = "-" if value is None or value == "" else str(value)
    text = " ".join(text.split())
    return text if len(text) <= MAX_CELL else text[:MAX_CELL - 1] + "…"


def _wire_state(wire: dict[str, Any]) -> str:
    state = "armed" if wire["armed"] else "disarmed"
    if wire["shadow"]:
        state += " (shadow)"
    return state + (", tripped" if wire["tripped_until"] else "")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], empty: str = "none") -> str:
    """Columns padded to their widest cell, under upper-case headers; ``empty`` for no rows."""
    if not rows:
        return empty
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max([len(header)] + [len(row[i]) for row in cells])
              for i, header in enumerate(headers)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _render(args: argparse.Namespace, answer: Any) -> str:
    command, verb = args.command, getattr(args, "verb", None)
    rows: list[Sequence[Any]]
    if command == "flags" and verb == "list":
        rows = [(f["name"], "on" if f["enabled"] else "off", f["updated_by"],
                 _when(f["updated_at"]), _when(f["expires_at"]), f["message"])
                for f in answer["flags"]]
        out = table(["flag", "state", "updated by", "updated at", "expires at", "message"],
                    rows)
        if answer.get("stale"):
            out += "\n(Redis is unavailable: this is the server's last known state)"
        return out
    if command == "flags":
        expires = f" until {_when(answer['expires_at'])}" if answer.get("expires_at") else ""
        return f"{answer['name']} is {'on' if answer['enabled'] else 'off'}{expires}"
    if command == "bans" and verb == "list":
        rows = [(b["id"], b["field"], _when(b["expires_at"]), b["created_by"], b["reason"])
                for b in answer["bans"]]
        return table(["id", "field", "expires at", "by", "reason"], rows,
                     "none (no active bans)")
    if command == "bans" and verb == "add":
        return f"banned {answer['field'] or 'subject'} as {answer['id']} until " \
               f"{_when(answer['expires_at'])}"
    if command == "bans":
        return f"lifted {answer['id']}"
    if command == "audit":
        rows = [(_when(e["at"]), e["actor"], e["kind"], e["target"], _detail(e["detail"]),
                 e["reason"]) for e in answer["events"]]
        return table(["at", "actor", "kind", "target", "detail", "reason"], rows,
                     "none (no admin changes recorded)")
    if command == "top":
        rows = [(s["subject"], s["denied"]) for s in answer["subjects"]]
        key = "+".join(answer["key"]) or "global"
        return table([f"subject ({key}, hashed)", "denied"], rows,
                     f"none ({answer['rule']} denied no one in the last hour)")
    if command == "tripwires" and verb == "list":
        rows = [(w["name"], _wire_state(w), f"{w['seen']}/{w['threshold']}",
                 f"{w['window']} s", w["action"], w["count"], w["flag"],
                 f"{w['duration']} s", _when(w["tripped_until"]))
                for w in answer["tripwires"]]
        return table(["tripwire", "state", "count", "window", "action", "counts", "flag",
                      "trips for", "tripped until"], rows, "none (the config has no tripwires)")
    if command == "tripwires":
        return f"{answer['name']} is {_wire_state(answer)}"
    rows = [(c["rule"], c["subject"], c["deleted"]) for c in answer["cleared"]]
    return table(["rule", "subject", "keys deleted"], rows, "none (nothing to clear)")
