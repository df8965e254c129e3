"""The admin page's forms: turn a kill switch on or off, ban a subject, lift a ban, disarm or
re-arm a tripwire.

Each form is refused unless it comes from this site, with a live session, that session's
CSRF token and an admin (not viewer) token. Then it calls the admin API's own function
(``admin.set_flag``, ``admin_subjects.ban_subject`` / ``lift_subject``) with a body decoded
by the API's own types, so the rules, the audit entry (with the signed-in name) and the
announcement to every process are the API's. The outcome is left as a one-shot message in
the session, and the answer is a redirect to the page (post/redirect/get).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web
from multidict import MultiDictProxy

from ratekeeper.admin.api import set_flag, set_tripwire
from ratekeeper.admin.common import decode, duration_seconds
from ratekeeper.admin.subjects import ban_subject, lift_subject
from ratekeeper.admin.web.common import (
    UNREADABLE_FORM,
    current_session,
    field,
    parts,
    read_form,
    redirect,
    refuse,
    url_for,
)
from ratekeeper.admin.web.session import Session, cross_origin, same_token
from ratekeeper.api.admin_wire import (
    MAX_BAN_SECONDS,
    MAX_FLAG_SECONDS,
    FlagUpdate,
    LiftRequest,
    TripwireUpdate,
)
from ratekeeper.config.rules import duration_text
from ratekeeper.errors import BadRequest, StoreUnavailable
from ratekeeper.server.http import Handler

__all__ = ["add_ban", "arm_tripwire", "change", "change_flag", "lift_ban"]

Change = Callable[[web.Request, Session, MultiDictProxy[Any]], Awaitable[str]]
OUTCOME_ID = "outcome"  # the id of the page's one-shot message (page.html)

_flag_update = msgspec.json.Decoder(FlagUpdate)
_tripwire_update = msgspec.json.Decoder(TripwireUpdate)
_lift_request = msgspec.json.Decoder(LiftRequest)
_encode = msgspec.json.Encoder().encode


def change(run: Change) -> Handler:
    """A form handler: same origin, a session, its CSRF token and an admin token, or refused.

    Then the change runs; its outcome becomes the next page view's message, and the answer
    is a redirect to the page (post/redirect/get) at that message: a form far down the page
    would otherwise come back to a page whose outcome is out of view.
    """

    async def handler(request: web.Request) -> web.StreamResponse:
        _, _, state = parts(request)
        why = cross_origin(request, state.proxies)
        if why is not None:
            return refuse(request, 403, "Change refused", f"{why}. Nothing was changed.")
        session = await current_session(request)
        if session is None:
            return refuse(request, 401, "Not signed in",
                          "Your session has ended or was never started. Nothing was "
                          "changed. Sign in and try again.")
        form = await read_form(request)
        if form is None:
            return refuse(request, 400, "Change refused", UNREADABLE_FORM)
        if not same_token(session.csrf, field(form, "csrf")):
            return refuse(request, 403, "Change refused",
                          "This form did not come from your current session (its CSRF "
                          "token is missing or wrong). Nothing was changed. Reload the "
                          "page and try again.")
        if not session.principal.can_write:
            return refuse(request, 403, "Change refused",
                          f"Token '{session.principal.name}' may only read. Nothing "
                          "was changed.")
        try:
            kind, text = "ok", await run(request, session, form)
        except BadRequest as exc:
            kind, text = "error", f"Nothing was changed: {exc}."
        except StoreUnavailable:
            kind, text = "error", ("Redis is unavailable, so the change may not have "
                                   "been made. Try again: every change is safe to repeat.")
        with contextlib.suppress(StoreUnavailable):
            await state.sessions.flash(session, kind, text)
        return redirect(url_for(request, "page") + f"#{OUTCOME_ID}")

    handler.__doc__ = run.__doc__
    return handler


@change
async def change_flag(request: web.Request, session: Session, form: MultiDictProxy[Any]
                      ) -> str:
    """POST /admin/flags/{name}: turn a kill switch on (message, reason, expiry) or off."""
    runtime, admin, _ = parts(request)
    name = request.match_info["name"]
    if name not in runtime.flags.declared:
        raise BadRequest("there is no such flag")
    enabled = {"on": True, "off": False}.get(field(form, "enabled"))
    if enabled is None:
        raise BadRequest("say whether to turn the flag on or off")
    body: dict[str, Any] = {"enabled": enabled}
    reason, message = field(form, "reason").strip(), field(form, "message").strip()
    expires = field(form, "expires_in").strip()
    if reason:
        body["reason"] = reason
    if enabled and message:
        body["message"] = message
    if enabled and expires:
        body["expires_in"] = duration_seconds(expires, "the expiry", MAX_FLAG_SECONDS)
    view = await set_flag(runtime, admin, session.principal, name,
                          decode(_flag_update, _encode(body)))
    if not view.enabled:
        return f"{name} is off."
    until = f" for {duration_text(body['expires_in'])}" if "expires_in" in body else ""
    return f"{name} is on{until}."


@change
async def add_ban(request: web.Request, session: Session, form: MultiDictProxy[Any]) -> str:
    """POST /admin/bans: ban one subject (an IP is hashed on the way in) for a duration."""
    runtime, admin, _ = parts(request)
    kind = field(form, "field")
    if kind not in admin.codecs_for(runtime.checker).subject_fields:
        raise BadRequest("choose what kind of subject to ban")
    value = field(form, "value").strip()
    if not value:
        raise BadRequest(f"give the {kind} to ban")
    duration = duration_seconds(field(form, "duration"), "the duration", MAX_BAN_SECONDS)
    body = {kind: value, "duration": duration, "reason": field(form, "reason").strip()}
    ban = await ban_subject(runtime, admin, session.principal,
                            decode(admin.codecs_for(runtime.checker).ban, _encode(body)))
    shown = f"{ban.field} " if ban.field else ""
    return f"Banned {shown}{ban.id} for {duration_text(ban.expires_at - ban.created_at)}."


@change
async def lift_ban(request: web.Request, session: Session, form: MultiDictProxy[Any]) -> str:
    """POST /admin/bans/{id}/lift: lift a ban everywhere."""
    runtime, admin, _ = parts(request)
    ban_id = request.match_info["id"]
    lift = decode(_lift_request, _encode({"reason": field(form, "reason").strip()}))
    if not await lift_subject(runtime, admin, session.principal, ban_id, lift):
        raise BadRequest("that ban had already ended or been lifted")
    return f"Lifted the ban on {ban_id}."


@change
async def arm_tripwire(request: web.Request, session: Session, form: MultiDictProxy[Any]
                       ) -> str:
    """POST /admin/tripwires/{name}: disarm a tripwire, or re-arm it."""
    _, admin, _ = parts(request)
    wire = admin.tripwires.get(request.match_info["name"])
    if wire is None:
        raise BadRequest("there is no such tripwire")
    armed = {"on": True, "off": False}.get(field(form, "armed"))
    if armed is None:
        raise BadRequest("say whether to disarm or re-arm the tripwire")
    update = decode(_tripwire_update, _encode({"armed": armed,
                                                "reason": field(form, "reason").strip()}))
    await set_tripwire(admin, session.principal, wire, update)
    return f"{wire.name} is {'armed' if armed else 'disarmed'}."
