"""What every admin handler shares: the per-process admin state and request plumbing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web

from ratekeeper.api.admin_wire import SUBJECT_HASH_FIELD, ban_request_type, reset_request_type
from ratekeeper.api.wire import decode
from ratekeeper.config.rules import parse_duration
from ratekeeper.control.alerts import Alerts
from ratekeeper.control.audit import AuditLog
from ratekeeper.control.bans import BanBook
from ratekeeper.control.flagstore import FlagStore
from ratekeeper.control.sync import StateSync
from ratekeeper.control.tripwires import Tripwires
from ratekeeper.decision.checker import Checker
from ratekeeper.errors import BadRequest
from ratekeeper.identity.keys import contains_ip
from ratekeeper.server.auth import Principal, TokenAuth
from ratekeeper.server.state import RUNTIME, Runtime

__all__ = ["ADMIN", "AdminState", "Codecs", "check_text", "decode", "duration_seconds",
           "limit_param", "parts", "query", "route_of"]


@dataclass(slots=True)
class Codecs:
    """Decoders of the bodies whose fields depend on the config."""

    checker: Checker
    ban: msgspec.json.Decoder[Any]
    reset: msgspec.json.Decoder[Any]
    subject_fields: tuple[str, ...]


@dataclass(slots=True)
class AdminState:
    """What the admin handlers use, made once per process."""

    auth: TokenAuth
    flagstore: FlagStore
    audit: AuditLog
    bans: BanBook
    sync: StateSync
    wall: Callable[[], float]
    alerts: Alerts
    tripwires: Tripwires
    codecs: Codecs | None = None

    def codecs_for(self, checker: Checker) -> Codecs:
        """Decoders for the current config (rebuilt after a reload)."""
        if self.codecs is None or self.codecs.checker is not checker:
            subjects = checker.config.subjects
            fields = ("ip", "ip_hash", SUBJECT_HASH_FIELD,
                      *sorted(subjects - {"ip", "ip_hash", SUBJECT_HASH_FIELD}))
            self.codecs = Codecs(checker=checker,
                                 ban=msgspec.json.Decoder(ban_request_type(subjects)),
                                 reset=msgspec.json.Decoder(reset_request_type(subjects)),
                                 subject_fields=fields)
        return self.codecs


ADMIN = web.AppKey("admin", AdminState)


def route_of(request: web.Request) -> str:
    """The route a request took, as declared (``/v1/admin/bans/{id}``), for a log line: the
    path itself is the client's text."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "(no route)"


def query(request: web.Request, allowed: set[str]) -> dict[str, str]:
    """The query parameters; an unknown one is a 400, like an unknown body field."""
    if not set(request.query) <= allowed:
        known = ", ".join(sorted(allowed)) or "none"
        raise BadRequest(f"unknown query parameter (this path takes: {known})")
    return {key: request.query[key] for key in request.query}


def limit_param(params: dict[str, str], default: int, high: int) -> int:
    """The ``limit`` parameter: an integer from 1 to ``high``."""
    raw = params.get("limit")
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"limit must be an integer from 1 to {high}") from None
    if not 1 <= value <= high:
        raise BadRequest(f"limit must be an integer from 1 to {high}")
    return value


def duration_seconds(value: int | str, what: str, most: int) -> int:
    """Seconds from whole seconds or a duration such as ``"90s"``, ``"2h"``, ``"1 day"``
    (the config's parser, as the CLI uses it), from 1 to ``most``; else BadRequest."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text) if text.isdigit() else parse_duration(text)
        except ValueError:
            raise BadRequest(f"{what} must be a duration such as 3600, 90s, 2h or 1d") from None
    if value < 1:
        raise BadRequest(f"{what} must be at least one second")
    if value > most:
        raise BadRequest(f"{what} must be at most {most // 86400} days")
    return value


def check_text(admin: AdminState, **texts: str | None) -> None:
    """Free text goes to Redis and the audit trail, where no IP and no token may go."""
    for field, text in texts.items():
        if not text:
            continue
        if contains_ip(text):
            raise BadRequest(f"{field} must not contain an IP address (ban by ip to record "
                             "its hash instead)")
        if admin.auth.mentions_token(text):
            raise BadRequest(f"{field} must not contain an admin token")


def parts(request: web.Request) -> tuple[Runtime, AdminState, Principal]:
    """The runtime, the admin state and the caller (the middleware let only known ones in)."""
    admin = request.config_dict[ADMIN]
    principal = admin.auth.authenticate(request.headers.get("Authorization"))
    if principal is None:  # pragma: no cover - the admin middleware answered 401 already
        raise web.HTTPUnauthorized()
    return request.config_dict[RUNTIME], admin, principal
