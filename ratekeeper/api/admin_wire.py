"""Request and response types of the admin API, decoded and encoded by msgspec.

Requests forbid unknown fields, so a typo is a 400 and never a silent no-op. The ban and
reset bodies are generated from the config, like the check request, because the subject
fields they accept (user, project, ...) are the ones the rules key on.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from ratekeeper.api.wire import IPText, SubjectValue

__all__ = [
    "MAX_AUDIT_LIMIT",
    "MAX_BAN_SECONDS",
    "MAX_FLAG_SECONDS",
    "MAX_TOP_LIMIT",
    "AuditEvent",
    "AuditList",
    "BanList",
    "BanView",
    "FlagList",
    "FlagUpdate",
    "FlagView",
    "LiftRequest",
    "LiftResult",
    "ResetCleared",
    "ResetResult",
    "TopEntry",
    "TopResult",
    "TrafficAction",
    "TrafficPicture",
    "TripwireList",
    "TripwireUpdate",
    "TripwireView",
    "ban_request_type",
    "reset_request_type",
]

MAX_AUDIT_LIMIT = 1000  # events one GET /v1/admin/audit may ask for
MAX_TOP_LIMIT = 200  # subjects one GET /v1/admin/top lists at most (and Redis keeps per minute)
MAX_FLAG_SECONDS = 366 * 86400
MAX_BAN_SECONDS = 10 * 366 * 86400
SUBJECT_HASH_FIELD = "subject_hash"

Text = Annotated[str, Meta(max_length=1000)]
FlagSeconds = Annotated[int, Meta(ge=1, le=MAX_FLAG_SECONDS, description="seconds")]
BanSeconds = Annotated[int, Meta(ge=1, le=MAX_BAN_SECONDS, description="seconds")]
# A duration as the CLI and the admin page take it; the admin API reads it with the config's
# duration parser and holds the seconds to the same bounds as an integer's.
DurationText = Annotated[str, Meta(
    min_length=1, max_length=32, examples=["90s", "30m", "2h", "1d", "1 hour"],
    description="a number and a unit (s, m, h, d, w, or the words), or whole seconds")]
SubjectHash = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{22}$")]
Name = Annotated[str, Meta(min_length=1, max_length=128)]


class FlagUpdate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``PUT /v1/admin/flags/{name}``: turn a kill switch on or off."""

    enabled: bool
    message: Text | None = None  # shown to users; default: the one declared in the config
    reason: Text | None = None  # why, for the audit trail
    # until it turns itself off (enabling only): seconds, or a duration such as "2h"
    expires_in: FlagSeconds | DurationText | None = None


class FlagView(msgspec.Struct, frozen=True):
    """One kill switch: on or off, what users are told, who changed it and when."""

    name: str
    enabled: bool
    message: str
    description: str
    updated_by: str | None
    updated_at: float | None  # Unix seconds
    expires_at: float | None  # Unix seconds; None = until turned off


class FlagList(msgspec.Struct, frozen=True):
    """``GET /v1/admin/flags``; ``stale`` when Redis could not be asked (this process's view)."""

    flags: list[FlagView]
    stale: bool = False


class AuditEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One admin change. Never holds an IP or a token: subjects appear as their hashes."""

    at: float  # Unix seconds
    # the token's name, "ratekeeper" for what the service did itself, or "tripwire:<name>"
    actor: str
    # flag, flag-expired, flags-restored, ban, lift, reset, tripwire, tripwire-arm,
    # tripwire-disarm
    kind: str
    target: str  # the flag name, "<field>:<subject hash>", "rule:<name>" or "action:<name>"
    detail: dict[str, Any] = {}
    reason: str = ""
    id: str = ""  # the stream entry id


class AuditList(msgspec.Struct, frozen=True):
    """``GET /v1/admin/audit``: newest first."""

    events: list[AuditEvent]


class BanView(msgspec.Struct, frozen=True):
    """An active ban. ``id`` is the subject's hash; the raw value is never kept."""

    id: str
    field: str  # the subject field (ip, user, project, ...); "" when banned by hash
    reason: str
    created_by: str
    created_at: float  # Unix seconds
    expires_at: float  # Unix seconds


class BanList(msgspec.Struct, frozen=True):
    """``GET /v1/admin/bans``: newest first."""

    bans: list[BanView]


class LiftRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Optional body of ``DELETE /v1/admin/bans/{id}``."""

    reason: Text = ""


class LiftResult(msgspec.Struct, frozen=True):
    """The ban that was lifted."""

    id: str
    lifted: bool = True


class ResetCleared(msgspec.Struct, frozen=True):
    """One rule's counters (and penalty box) of one subject, cleared."""

    rule: str
    subject: str
    deleted: int  # Redis keys removed (0 when there was nothing to clear)


class ResetResult(msgspec.Struct, frozen=True):
    """``POST /v1/admin/reset``."""

    cleared: list[ResetCleared]


class TopEntry(msgspec.Struct, frozen=True):
    """One subject (hashed) and how many of its requests a rule denied."""

    subject: str
    denied: int


class TopResult(msgspec.Struct, frozen=True):
    """``GET /v1/admin/top?rule=NAME``: the most-denied subjects over the last ``window``."""

    rule: str
    key: list[str]  # the subject fields hashed together into ``subject``
    window: int  # seconds looked back
    subjects: list[TopEntry]


def _subject_fields(subjects: Iterable[str]) -> list[tuple[str, Any, Any]]:
    fields: list[tuple[str, Any, Any]] = [("ip", IPText | None, None),
                                          ("ip_hash", SubjectValue | None, None),
                                          (SUBJECT_HASH_FIELD, SubjectHash | None, None)]
    taken = {name for name, _, _ in fields}
    fields += [(name, SubjectValue | None, None) for name in sorted(set(subjects))
               if name not in taken]
    return fields


def ban_request_type(subjects: Iterable[str]) -> type[msgspec.Struct]:
    """``POST /v1/admin/bans``: exactly one subject, a duration (seconds, or such as "1d"),
    a reason."""
    fields = _subject_fields(subjects)
    fields += [("duration", BanSeconds | DurationText, msgspec.NODEFAULT), ("reason", Text, "")]
    return msgspec.defstruct("BanRequest", fields, forbid_unknown_fields=True, kw_only=True)


def reset_request_type(subjects: Iterable[str]) -> type[msgspec.Struct]:
    """``POST /v1/admin/reset``: an action or a rule, and the subjects its rules key on."""
    fields: list[tuple[str, Any, Any]] = [("action", Name | None, None),
                                          ("rule", Name | None, None)]
    fields += _subject_fields(subjects)
    fields += [("reason", Text, "")]
    return msgspec.defstruct("ResetRequest", fields, forbid_unknown_fields=True, kw_only=True)


class TripwireView(msgspec.Struct, frozen=True, kw_only=True):
    """A tripwire as declared, and its state shared by every process."""

    name: str
    action: str
    count: str  # which decisions it counts: allowed, denied or all
    threshold: int  # decisions within ``window`` that trip it
    window: int  # seconds
    flag: str  # the kill switch a trip turns on
    duration: int  # seconds the flag stays on
    shadow: bool  # a trip is recorded and alerted, the flag left alone
    armed: bool  # False: disarmed by an admin, it counts but never trips
    seen: int  # decisions counted within the window now (a sliding-window estimate)
    tripped_until: float | None  # Unix seconds; None = not tripped
    disarmed_by: str | None = None
    disarmed_at: float | None = None  # Unix seconds
    reason: str = ""  # why it was disarmed


class TripwireList(msgspec.Struct, frozen=True):
    """``GET /v1/admin/tripwires``."""

    tripwires: list[TripwireView]


class TripwireUpdate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``PUT /v1/admin/tripwires/{name}``: disarm (``armed: false``) or re-arm a tripwire."""

    armed: bool
    reason: Text | None = None  # why, for the audit trail


class TrafficAction(msgspec.Struct, frozen=True):
    """One action's decisions per minute, by category, oldest minute first."""

    action: str
    # allowed, limited (a rule's window), boxed (a penalty box), banned, disabled, degraded
    minutes: dict[str, list[int]]


class TrafficPicture(msgspec.Struct, frozen=True):
    """``GET /v1/admin/traffic``: every process's decisions over the last hour."""

    start: int  # Unix seconds of the first minute
    actions: list[TrafficAction]
    # rule -> limited (its windows) and boxed (its penalty box) -> denials, most denying first
    rules: dict[str, dict[str, int]]
