"""Admin handlers about subjects: bans, resets of counters, and the most-denied lists."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from aiohttp import web

from ratekeeper.admin.common import (
    AdminState,
    check_text,
    decode,
    duration_seconds,
    limit_param,
    parts,
    query,
)
from ratekeeper.api.admin_wire import (
    MAX_BAN_SECONDS,
    SUBJECT_HASH_FIELD,
    AuditEvent,
    BanList,
    BanView,
    LiftRequest,
    LiftResult,
    ResetCleared,
    ResetResult,
    TopResult,
)
from ratekeeper.config.rules import Rule, duration_text
from ratekeeper.control.sync import Event
from ratekeeper.decision.checker import Checker
from ratekeeper.decision.top import KEEP, LOOKBACK_SECONDS
from ratekeeper.errors import BadRequest
from ratekeeper.identity.keys import Keyspace, is_subject_hash
from ratekeeper.server.auth import Principal
from ratekeeper.server.http import error_response, json_response
from ratekeeper.server.state import Runtime
from ratekeeper.storage.storecall import store_call

__all__ = ["add_ban", "ban_subject", "lift_ban", "lift_subject", "list_bans", "reset", "top"]

log = logging.getLogger("ratekeeper.admin.api")

DEFAULT_TOP_LIMIT = 20
_lift_request = msgspec.json.Decoder(LiftRequest)


# -- bans ------------------------------------------------------------------------------------

def _given_subjects(body: Any, fields: tuple[str, ...]) -> list[tuple[str, str]]:
    return [(field, getattr(body, field)) for field in fields
            if getattr(body, field) is not None]


def _ban_subject(keyspace: Keyspace, field: str, value: str) -> tuple[str, str]:
    """(the field a ban list shows, the subject hash) for one subject of a ban request."""
    if field == "ip":
        return "ip", keyspace.subject((("ip", keyspace.ip_value(value)),))
    if field == "ip_hash":
        return "ip", keyspace.subject((("ip", keyspace.ip_hash_value(value)),))
    if field == SUBJECT_HASH_FIELD:
        return "", value
    return field, keyspace.subject(((field, keyspace.text_value(value)),))


async def add_ban(request: web.Request) -> web.Response:
    """POST /v1/admin/bans: ban one subject for ``duration`` (seconds, or such as "1d")."""
    runtime, admin, principal = parts(request)
    body = decode(admin.codecs_for(runtime.checker).ban, await request.read())
    return json_response(await ban_subject(runtime, admin, principal, body), status=201)


async def ban_subject(runtime: Runtime, admin: AdminState, principal: Principal,
                      body: Any) -> BanView:
    """Ban the one subject of a decoded ban request, for the API and the admin page alike."""
    checker = runtime.checker
    codecs = admin.codecs_for(checker)
    given = _given_subjects(body, codecs.subject_fields)
    if len(given) != 1:
        raise BadRequest("give exactly one subject to ban: " + ", ".join(codecs.subject_fields))
    check_text(admin, reason=body.reason)
    duration = duration_seconds(body.duration, "duration", MAX_BAN_SECONDS)
    field, subject = _ban_subject(checker.keyspace, *given[0])
    now = admin.wall()
    ban = BanView(id=subject, field=field, reason=body.reason, created_by=principal.name,
                  created_at=now, expires_at=now + duration)
    await admin.bans.add(ban, checker.keyspace.ban_key(subject), duration * 1000)
    await admin.audit.record(AuditEvent(
        at=now, actor=principal.name, kind="ban", target=f"ban:{subject}",
        detail={"field": field, "duration": duration, "expires_at": ban.expires_at},
        reason=body.reason))
    await admin.sync.announce(Event(kind="ban", subjects=[subject]))
    log.info("subject %s:%s banned for %d s by %s", field or "hash", subject, duration,
             principal.name)
    # the alert names the kind of subject, never the subject (not even its hash)
    admin.alerts.send("ban", f"{principal.name} banned {_a(field)} for {duration_text(duration)}"
                             + (f": {body.reason}" if body.reason else ""),
                      field=field, duration=duration, by=principal.name, reason=body.reason)
    return ban


def _a(field: str) -> str:
    """``an ip``, ``a user``; ``a subject`` for a ban by hash."""
    name = field or "subject"
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


async def list_bans(request: web.Request) -> web.Response:
    """GET /v1/admin/bans: active bans, newest first, by subject hash."""
    _, admin, _ = parts(request)
    query(request, set())
    return json_response(BanList(bans=await admin.bans.active(admin.wall())))


async def lift_ban(request: web.Request) -> web.Response:
    """DELETE /v1/admin/bans/{id}: lift a ban, everywhere at once."""
    runtime, admin, principal = parts(request)
    ban_id = request.match_info["id"]
    raw = await request.read()
    lift = decode(_lift_request, raw) if raw.strip() else LiftRequest()
    if not await lift_subject(runtime, admin, principal, ban_id, lift):
        return error_response(404, "no active ban with that id")
    return json_response(LiftResult(id=ban_id))


async def lift_subject(runtime: Runtime, admin: AdminState, principal: Principal,
                       ban_id: str, lift: LiftRequest) -> bool:
    """Lift the ban ``ban_id`` (a subject hash) everywhere; False when there was none."""
    if not is_subject_hash(ban_id):
        raise BadRequest("a ban id is the 22-character subject hash GET /v1/admin/bans lists")
    check_text(admin, reason=lift.reason)
    if not await admin.bans.lift(ban_id, runtime.checker.keyspace.ban_key(ban_id)):
        return False
    await admin.audit.record(AuditEvent(at=admin.wall(), actor=principal.name, kind="lift",
                                        target=f"ban:{ban_id}", reason=lift.reason))
    await admin.sync.announce(Event(kind="lift", subjects=[ban_id]))
    log.info("ban %s lifted by %s", ban_id, principal.name)
    admin.alerts.send("lift", f"{principal.name} lifted a ban"
                              + (f": {lift.reason}" if lift.reason else ""),
                      by=principal.name, reason=lift.reason)
    return True


# -- reset -----------------------------------------------------------------------------------

def _reset_scope(checker: Checker, body: Any) -> tuple[str, tuple[Rule, ...]]:
    if (body.action is None) == (body.rule is None):
        raise BadRequest("give either action or rule")
    if body.action is not None:
        plan = checker.plans.get(body.action)
        if plan is None:
            raise BadRequest("unknown action")
        return f"action:{body.action}", plan.action.rules
    rule = checker.config.rules.get(body.rule)
    if rule is None:
        raise BadRequest("unknown rule")
    return f"rule:{body.rule}", (rule,)


async def reset(request: web.Request) -> web.Response:
    """POST /v1/admin/reset: clear a subject's counters and penalty boxes for an action or rule."""
    runtime, admin, principal = parts(request)
    checker = runtime.checker
    keyspace = checker.keyspace
    body = decode(admin.codecs_for(checker).reset, await request.read())
    target, rules = _reset_scope(checker, body)
    check_text(admin, reason=body.reason)
    values = checker.subjects(body)
    by_hash = body.subject_hash
    if by_hash is not None and (values or body.action is not None):
        raise BadRequest("subject_hash goes with rule alone, without other subject fields")
    pairs: list[tuple[Rule, str]] = []
    for rule in rules:
        if by_hash is not None:
            if not rule.key:
                raise BadRequest(f"rule '{rule.name}' has one global bucket: reset it "
                                 "without a subject")
            pairs.append((rule, by_hash))
            continue
        for field in rule.key:
            if field not in values:
                what = "ip or ip_hash" if field == "ip" else f"'{field}'"
                raise BadRequest(f"rule '{rule.name}' needs {what}")
        pairs.append((rule, keyspace.subject((f, values[f]) for f in rule.key)))
    async with store_call():
        pipe = checker.limiter.redis.pipeline(transaction=False)
        for rule, subject in pairs:
            # one DEL per key: on a cluster a rule's keys share a slot, two rules may not
            pipe.delete(keyspace.counter_key(subject, rule))
            pipe.delete(keyspace.penalty_key(subject, rule))
        counts = await pipe.execute()
    cleared = [ResetCleared(rule=rule.name, subject=subject,
                            deleted=int(counts[2 * i]) + int(counts[2 * i + 1]))
               for i, (rule, subject) in enumerate(pairs)]
    await admin.audit.record(AuditEvent(
        at=admin.wall(), actor=principal.name, kind="reset", target=target,
        detail={"subjects": {c.rule: c.subject for c in cleared},
                "deleted": sum(c.deleted for c in cleared)},
        reason=body.reason))
    await admin.sync.announce(Event(kind="reset",
                                    pairs=[(rule.name, subject) for rule, subject in pairs]))
    log.info("%s reset by %s", target, principal.name)
    return json_response(ResetResult(cleared=cleared))


# -- top -------------------------------------------------------------------------------------

async def top(request: web.Request) -> web.Response:
    """GET /v1/admin/top?rule=NAME&limit=N: the most-denied subjects (hashed), last hour."""
    runtime, _, _ = parts(request)
    params = query(request, {"rule", "limit"})
    name = params.get("rule")
    if not name:
        raise BadRequest("give the rule: /v1/admin/top?rule=NAME")
    rule = runtime.checker.config.rules.get(name)
    if rule is None:
        raise BadRequest("unknown rule")
    limit = limit_param(params, DEFAULT_TOP_LIMIT, KEEP)
    denials = runtime.checker.denials
    entries = await denials.top(rule, limit) if denials is not None else []
    return json_response(TopResult(rule=rule.name, key=list(rule.key),
                                   window=LOOKBACK_SECONDS, subjects=entries))
