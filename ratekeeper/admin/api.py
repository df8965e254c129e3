"""The admin API under ``/v1/admin``: kill switches, the audit trail, bans, resets, top lists,
tripwires and the traffic picture.

A sub-application: its middleware authenticates every request before anything is read, so
a missing or wrong token is a 401 that changes nothing, and a viewer token that tries to
change something is a 403. A change is written to Redis, applied in this process, recorded
in the audit trail, announced to every other process (``sync.py``) and alerted
(``alerts.py``), in that order.
Handlers about subjects (bans, resets, top lists) are in ``admin_subjects.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from aiohttp import web

from ratekeeper.admin import subjects as admin_subjects
from ratekeeper.admin.common import (
    ADMIN,
    AdminState,
    check_text,
    decode,
    duration_seconds,
    limit_param,
    parts,
    query,
    route_of,
)
from ratekeeper.api.admin_wire import (
    MAX_AUDIT_LIMIT,
    MAX_FLAG_SECONDS,
    AuditEvent,
    AuditList,
    FlagList,
    FlagUpdate,
    FlagView,
    TrafficAction,
    TrafficPicture,
    TripwireList,
    TripwireUpdate,
)
from ratekeeper.config.rules import duration_text
from ratekeeper.config.tripwires import Tripwire
from ratekeeper.control.alerts import Alerts
from ratekeeper.control.audit import AuditLog
from ratekeeper.control.bans import BanBook
from ratekeeper.control.flagstore import FlagStore
from ratekeeper.control.sync import Event, StateSync, stop_tasks
from ratekeeper.control.traffic import Traffic
from ratekeeper.control.tripwires import Tripwires
from ratekeeper.decision.cache import LocalCache
from ratekeeper.decision.flags import FlagBoard, FlagState
from ratekeeper.errors import BadRequest, StoreUnavailable
from ratekeeper.server.auth import Principal, TokenAuth
from ratekeeper.server.http import Handler, error_response, json_response, unauthorized
from ratekeeper.server.state import RUNTIME, Runtime
from ratekeeper.settings import Settings

__all__ = ["ADMIN", "AdminState", "admin_app", "admin_context", "flag_views", "set_flag",
           "set_tripwire"]

log = logging.getLogger("ratekeeper.admin.api")

READ_METHODS = frozenset({"GET", "HEAD"})
DEFAULT_AUDIT_LIMIT = 50

_flag_update = msgspec.json.Decoder(FlagUpdate)
_tripwire_update = msgspec.json.Decoder(TripwireUpdate)


@web.middleware
async def admin_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A valid bearer token first, before any body is read; Redis failures become 503."""
    admin = request.config_dict[ADMIN]
    principal = admin.auth.authenticate(request.headers.get("Authorization"))
    if principal is None:
        return unauthorized("a valid admin token is required (Authorization: Bearer <token>)",
                            "ratekeeper")
    if request.method not in READ_METHODS and not principal.can_write:
        return error_response(403, f"token '{principal.name}' may only read")
    try:
        return await handler(request)
    except StoreUnavailable as exc:
        log.warning("%s %s by %s: %s (%s)", request.method, route_of(request), principal.name,
                    exc, type(exc.__cause__).__name__)
        return error_response(503, "Redis is unavailable; retry the request (every admin "
                                   "change is safe to repeat)")


# -- flags -----------------------------------------------------------------------------------

def _flag_view(board: FlagBoard, state: FlagState, now: float) -> FlagView:
    on = state.is_on(now)
    return FlagView(name=state.name, enabled=on, message=board.message_for(state),
                    description=board.declared[state.name].description,
                    updated_by=state.updated_by, updated_at=state.updated_at,
                    expires_at=state.expires_at if on else None)


async def list_flags(request: web.Request) -> web.Response:
    """GET /v1/admin/flags: every flag; this process's view when Redis cannot be asked."""
    runtime, admin, _ = parts(request)
    query(request, set())
    return json_response(await flag_views(runtime, admin))


async def flag_views(runtime: Runtime, admin: AdminState) -> FlagList:
    """Every flag, fresh from Redis, or this process's last known state marked stale."""
    stale = False
    try:
        await admin.sync.refresh()
    except StoreUnavailable:
        stale = True
    now = admin.wall()
    board = runtime.flags
    return FlagList(flags=[_flag_view(board, s, now) for s in board.all()], stale=stale)


async def put_flag(request: web.Request) -> web.Response:
    """PUT /v1/admin/flags/{name}: turn a kill switch on or off."""
    runtime, admin, principal = parts(request)
    name = request.match_info["name"]
    if name not in runtime.flags.declared:
        return error_response(404, "unknown flag: GET /v1/admin/flags lists them")
    update = decode(_flag_update, await request.read())
    return json_response(await set_flag(runtime, admin, principal, name, update))


async def set_flag(runtime: Runtime, admin: AdminState, principal: Principal, name: str,
                   update: FlagUpdate) -> FlagView:
    """Turn the declared flag ``name`` on or off, for the API and the admin page alike."""
    board = runtime.flags
    check_text(admin, message=update.message, reason=update.reason)
    expires_in = None
    if update.expires_in is not None:
        if not update.enabled:
            raise BadRequest("expires_in only applies when turning a flag on")
        expires_in = duration_seconds(update.expires_in, "expires_in", MAX_FLAG_SECONDS)
    now = admin.wall()
    state = FlagState(name=name, enabled=update.enabled, message=update.message or "",
                      updated_by=principal.name, updated_at=now,
                      expires_at=now + expires_in if expires_in else None)
    await admin.flagstore.set(board, state)
    detail: dict[str, Any] = {"enabled": update.enabled}
    if expires_in is not None:
        detail["expires_in"] = expires_in
    if update.message is not None:
        detail["message"] = update.message
    await admin.audit.record(AuditEvent(at=now, actor=principal.name, kind="flag", target=name,
                                        detail=detail, reason=update.reason or ""))
    await admin.sync.announce(Event(kind="flags"))
    log.info("flag %s turned %s by %s", name, "on" if update.enabled else "off", principal.name)
    text = f"{principal.name} turned {name} {'on' if update.enabled else 'off'}"
    if expires_in is not None:
        text += f" for {duration_text(expires_in)}"
    if update.reason:
        text += f": {update.reason}"
    admin.alerts.send("flag", text, flag=name, enabled=update.enabled, by=principal.name,
                      expires_in=expires_in, reason=update.reason or "")
    return _flag_view(board, state, now)


# -- audit -----------------------------------------------------------------------------------

async def list_audit(request: web.Request) -> web.Response:
    """GET /v1/admin/audit?limit=N: the last N admin events, newest first."""
    _, admin, _ = parts(request)
    limit = limit_param(query(request, {"limit"}), DEFAULT_AUDIT_LIMIT, MAX_AUDIT_LIMIT)
    return json_response(AuditList(events=await admin.audit.recent(limit)))


# -- tripwires and traffic ------------------------------------------------------------------

async def list_tripwires(request: web.Request) -> web.Response:
    """GET /v1/admin/tripwires: every tripwire, its count in the window and its state."""
    _, admin, _ = parts(request)
    query(request, set())
    return json_response(TripwireList(tripwires=await admin.tripwires.views()))


async def put_tripwire(request: web.Request) -> web.Response:
    """PUT /v1/admin/tripwires/{name}: disarm or re-arm a tripwire."""
    _, admin, principal = parts(request)
    wire = admin.tripwires.get(request.match_info["name"])
    if wire is None:
        return error_response(404, "unknown tripwire: GET /v1/admin/tripwires lists them")
    await set_tripwire(admin, principal, wire, decode(_tripwire_update, await request.read()))
    return json_response(await admin.tripwires.view(wire.name))


async def set_tripwire(admin: AdminState, principal: Principal, wire: Tripwire,
                       update: TripwireUpdate) -> None:
    """Disarm or re-arm ``wire``, for the API and the admin page alike."""
    check_text(admin, reason=update.reason)
    await admin.tripwires.set_armed(wire, update.armed, principal.name, update.reason or "")


async def get_traffic(request: web.Request) -> web.Response:
    """GET /v1/admin/traffic: every process's decisions per minute over the last hour."""
    _, admin, _ = parts(request)
    query(request, set())
    picture = await admin.tripwires.traffic.picture()
    return json_response(TrafficPicture(
        start=picture.first_minute * 60,
        actions=[TrafficAction(action=name, minutes=series)
                 for name, series in sorted(picture.actions.items())],
        rules=dict(picture.denying_rules())))


# -- wiring ----------------------------------------------------------------------------------

def admin_app() -> web.Application:
    """The sub-application to mount at ``/v1/admin``."""
    app = web.Application(middlewares=[admin_middleware])
    app.router.add_get("/flags", list_flags)
    app.router.add_put("/flags/{name}", put_flag)
    app.router.add_get("/audit", list_audit)
    app.router.add_post("/bans", admin_subjects.add_ban)
    app.router.add_get("/bans", admin_subjects.list_bans)
    app.router.add_delete("/bans/{id}", admin_subjects.lift_ban)
    app.router.add_post("/reset", admin_subjects.reset)
    app.router.add_get("/top", admin_subjects.top)
    app.router.add_get("/tripwires", list_tripwires)
    app.router.add_put("/tripwires/{name}", put_tripwire)
    app.router.add_get("/traffic", get_traffic)
    return app


def admin_context(settings: Settings, wall: Callable[[], float]
                  ) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context (after the runtime's) that runs flag sync, the top-list flush, and
    the traffic flush that trips the tripwires; alerts are sent from here on."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        runtime = app[RUNTIME]
        redis = runtime.store.redis
        now: Callable[[], float] = lambda: round(wall(), 3)  # noqa: E731 - ms are enough
        keyspace = runtime.checker.keyspace
        auth = TokenAuth(settings.admin_tokens, settings.viewer_tokens)
        if not auth.configured:
            log.warning("no RATEKEEPER_ADMIN_TOKENS: the admin API answers 401 to everyone")
        audit = AuditLog(redis, keyspace.audit_key())
        flagstore = FlagStore(redis, keyspace.flags_key())
        cache = runtime.checker.cache
        if cache is None:
            cache = LocalCache(0)
        listen = runtime.store.kind != "memory"  # one process: nobody else to tell
        sync = StateSync(redis, keyspace.events_channel(), flagstore, runtime.flags, cache,
                         audit, wall=now, interval=settings.sync_interval_ms / 1000,
                         listen=listen)
        alerts = Alerts(runtime.checker.config.alerts.webhooks, settings.webhook_secret,
                        runtime.metrics, wall=now)
        traffic = Traffic(redis, keyspace, runtime.metrics, now)
        tripwires = Tripwires(traffic, lambda: runtime.checker.config, runtime.flags,
                              flagstore, audit, sync, alerts, runtime.metrics, now)
        app[ADMIN] = AdminState(auth=auth, flagstore=flagstore, audit=audit,
                                bans=BanBook(redis, keyspace.ban_index_key()), sync=sync,
                                wall=now, alerts=alerts, tripwires=tripwires)
        await alerts.start()
        await sync.start()
        counting = asyncio.create_task(tripwires.flush_forever(
            lambda: runtime.limiter.breaker_state))
        if listen:
            cache.announce = lambda pairs: sync.announce(Event(kind="refund", pairs=pairs))
        denials = runtime.denials
        flusher = asyncio.create_task(denials.flush_forever()) if denials is not None else None
        yield
        await stop_tasks([counting])
        with contextlib.suppress(StoreUnavailable):
            await tripwires.flush()  # the last second's counts
        if flusher is not None:
            await stop_tasks([flusher])
        if denials is not None:
            with contextlib.suppress(StoreUnavailable):
                await denials.flush()  # the last second's counts
        await sync.stop()
        await alerts.stop()

    return context
