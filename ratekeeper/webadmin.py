"""The admin page at ``/admin``: kill switches, bans, top lists, audit and health, in HTML.

Signed in with the admin API's tokens (``auth.py``'s check), the page makes its changes
through the admin API's own functions (``admin.set_flag``, ``admin_subjects.ban_subject``,
``admin_subjects.lift_subject``), so they are validated, audited under the token's name and
announced to every process exactly like API calls. Every form posts back here with a CSRF
token and is answered with a redirect to the page (post/redirect/get); a viewer token sees
the page without forms, and its posts are refused. No script, no asset from elsewhere:
one stylesheet served from here, and a Content-Security-Policy that allows nothing else.
Sessions and CSRF are in ``webadmin_session.py``, the data in ``webadmin_view.py``, the
health line in ``webadmin_health.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp_jinja2
import jinja2
import msgspec
from aiohttp import web
from multidict import MultiDictProxy

from .admin import set_flag
from .admin_common import ADMIN, AdminState, decode
from .admin_subjects import ban_subject, lift_subject
from .admin_wire import FlagUpdate, LiftRequest
from .config import parse_duration
from .errors import BadRequest, StoreUnavailable
from .forwarded import TrustedProxies
from .server import RUNTIME, Handler, Runtime
from .settings import Settings
from .webadmin_health import DecisionRate, health
from .webadmin_session import (
    SESSION_COOKIE,
    SIGNIN_COOKIE,
    SIGNIN_SECONDS,
    Session,
    Sessions,
    clear_cookie,
    cross_origin,
    is_https,
    same_token,
    set_cookie,
)
from .webadmin_view import FILTERS, gather, span

__all__ = ["WEBADMIN", "WebAdminState", "webadmin_app", "webadmin_context"]

log = logging.getLogger("ratekeeper.webadmin")

# Nothing but this service's own stylesheet and forms; no script at all.
CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
# What the sign-in page may say, chosen by a query parameter (never text from the URL).
SIGNIN_NOTES = {
    "failed": ("error", "That token was not accepted."),
    "signed-out": ("ok", "Signed out."),
    "ended": ("error", "Your session has ended. Sign in again."),
}
_flag_update = msgspec.json.Decoder(FlagUpdate)
_encode = msgspec.json.Encoder().encode


@dataclass(slots=True)
class WebAdminState:
    """What the page's handlers share, made once per process."""

    sessions: Sessions
    rate: DecisionRate
    proxies: TrustedProxies


WEBADMIN = web.AppKey("webadmin", WebAdminState)


def _parts(request: web.Request) -> tuple[Runtime, AdminState, WebAdminState]:
    config = request.config_dict
    return config[RUNTIME], config[ADMIN], config[WEBADMIN]


def _url(request: web.Request, route: str, **parts: str) -> str:
    return str(request.app.router[route].url_for(**parts))


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _page(request: web.Request, template: str, context: dict[str, Any], *,
          status: int = 200) -> web.Response:
    def url(route: str, **parts: str) -> str:
        return _url(request, route, **parts)

    return aiohttp_jinja2.render_template(template, request, {**context, "url": url},
                                          status=status)


def _refuse(request: web.Request, status: int, title: str, text: str) -> web.Response:
    log.warning("admin page: %s %s refused (%d): %s", request.method, request.path, status,
                text)
    return _page(request, "message.html", {"title": title, "text": text}, status=status)


@web.middleware
async def page_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Security headers on every answer; a Redis outage is a page that says so."""
    try:
        response = await handler(request)
    except StoreUnavailable:
        response = _page(request, "message.html", {
            "title": "Redis is unreachable",
            "text": "The admin page needs Redis for sessions and for every change, and it "
                    "does not answer. Checks go on from the rules' fail modes and every "
                    "process keeps the kill switches it last knew. Try again shortly."},
            status=503)
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    response.headers.setdefault("Cache-Control", "no-store")
    return response


async def _session(request: web.Request, *, take_flash: bool = False) -> Session | None:
    _, _, state = _parts(request)
    return await state.sessions.load(request.cookies.get(SESSION_COOKIE), take_flash=take_flash)


# -- the page --------------------------------------------------------------------------------

async def page(request: web.Request) -> web.Response:
    """GET /admin: everything an admin needs in an incident, on one page."""
    session = await _session(request, take_flash=True)
    if session is None:
        return _redirect(_url(request, "signin"))
    runtime, admin, state = _parts(request)
    sections = await gather(runtime, admin)
    status = await health(runtime, admin.sync, state.rate, sections.flags_stale)
    return _page(request, "page.html", {
        "session": session, "can_write": session.principal.can_write, "now": admin.wall(),
        "s": sections, "health": status, "flash": session.flash})


async def asset(request: web.Request) -> web.Response:
    """GET /admin/static/{name}: the stylesheet and the icon, the page's only assets."""
    name = request.match_info["name"]
    if name not in ASSETS:
        raise web.HTTPNotFound()
    return web.Response(body=request.app[ASSET_BODIES][name], content_type=ASSETS[name],
                        headers={"Cache-Control": "private, max-age=3600"})


# -- signing in and out ----------------------------------------------------------------------

async def signin_form(request: web.Request) -> web.Response:
    """GET /admin/signin: the token form, with a double-submit CSRF token."""
    if await _session(request) is not None:
        return _redirect(_url(request, "page"))
    _, admin, state = _parts(request)
    token = secrets.token_urlsafe(32)
    note = SIGNIN_NOTES.get(request.query.get("note", ""))
    response = _page(request, "signin.html", {
        "csrf": token, "note": note, "configured": admin.auth.configured})
    set_cookie(response, SIGNIN_COOKIE, token, secure=is_https(request, state.proxies),
               max_age=SIGNIN_SECONDS)
    return response


async def signin(request: web.Request) -> web.Response:
    """POST /admin/signin: a valid admin or viewer token starts a session."""
    _, admin, state = _parts(request)
    why = cross_origin(request, state.proxies)
    if why is not None:
        return _refuse(request, 403, "Sign-in refused", f"{why}. Nobody was signed in.")
    form = await request.post()
    if not same_token(request.cookies.get(SIGNIN_COOKIE, ""), _text(form, "csrf")):
        return _refuse(request, 403, "Sign-in refused",
                       "This sign-in form has expired or did not come from this page. "
                       "Open the sign-in page again.")
    token = _text(form, "token").strip()
    principal = admin.auth.authenticate(f"Bearer {token}") if token else None
    if principal is None:
        log.warning("admin page: sign-in with an unknown token refused")
        return _redirect(_url(request, "signin") + "?note=failed")
    session = await state.sessions.create(principal, token)
    log.info("admin page: %s signed in (%s)", principal.name, principal.role)
    response = _redirect(_url(request, "page"))
    secure = is_https(request, state.proxies)
    set_cookie(response, SESSION_COOKIE, session.id, secure=secure,
               max_age=state.sessions.seconds)
    clear_cookie(response, SIGNIN_COOKIE, secure=secure)
    return response


async def signout(request: web.Request) -> web.Response:
    """POST /admin/signout: end the session for every process."""
    _, _, state = _parts(request)
    why = cross_origin(request, state.proxies)
    if why is not None:
        return _refuse(request, 403, "Sign-out refused", f"{why}.")
    session = await _session(request)
    form = await request.post()
    if session is not None:
        if not same_token(session.csrf, _text(form, "csrf")):
            return _refuse(request, 403, "Sign-out refused",
                           "This form did not come from your session. Reload the page.")
        await state.sessions.end(session.id)
        log.info("admin page: %s signed out", session.principal.name)
    response = _redirect(_url(request, "signin") + "?note=signed-out")
    clear_cookie(response, SESSION_COOKIE, secure=is_https(request, state.proxies))
    return response


# -- changes ---------------------------------------------------------------------------------

Change = Callable[[web.Request, Session, MultiDictProxy[Any]], Awaitable[str]]


def _text(form: MultiDictProxy[Any], name: str) -> str:
    value = form.get(name, "")
    return value if isinstance(value, str) else ""


def _seconds(text: str, what: str) -> int:
    text = text.strip()
    try:
        value = int(text) if text.isdigit() else parse_duration(text)
    except ValueError:
        raise BadRequest(f"{what} must be a duration such as 3600, 90m, 2h or 1d") from None
    if value < 1:
        raise BadRequest(f"{what} must be at least one second")
    return value


def change(anchor: str) -> Callable[[Change], Handler]:
    """A form handler: same origin, a session, its CSRF token and an admin token, or refused.

    Then the change runs; its outcome becomes the next page view's message, and the answer
    is a redirect to the page (post/redirect/get).
    """

    def wrap(run: Change) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            _, _, state = _parts(request)
            why = cross_origin(request, state.proxies)
            if why is not None:
                return _refuse(request, 403, "Change refused", f"{why}. Nothing was changed.")
            session = await _session(request)
            if session is None:
                return _refuse(request, 401, "Not signed in",
                               "Your session has ended or was never started. Nothing was "
                               "changed. Sign in and try again.")
            form = await request.post()
            if not same_token(session.csrf, _text(form, "csrf")):
                return _refuse(request, 403, "Change refused",
                               "This form did not come from your current session (its CSRF "
                               "token is missing or wrong). Nothing was changed. Reload the "
                               "page and try again.")
            if not session.principal.can_write:
                return _refuse(request, 403, "Change refused",
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
            return _redirect(_url(request, "page") + f"#{anchor}")

        handler.__doc__ = run.__doc__
        return handler

    return wrap


@change("flags")
async def change_flag(request: web.Request, session: Session, form: MultiDictProxy[Any]
                      ) -> str:
    """POST /admin/flags/{name}: turn a kill switch on (message, reason, expiry) or off."""
    runtime, admin, _ = _parts(request)
    name = request.match_info["name"]
    if name not in runtime.flags.declared:
        raise BadRequest("there is no such flag")
    enabled = {"on": True, "off": False}.get(_text(form, "enabled"))
    if enabled is None:
        raise BadRequest("say whether to turn the flag on or off")
    body: dict[str, Any] = {"enabled": enabled}
    reason, message = _text(form, "reason").strip(), _text(form, "message").strip()
    expires = _text(form, "expires_in").strip()
    if reason:
        body["reason"] = reason
    if enabled and message:
        body["message"] = message
    if enabled and expires:
        body["expires_in"] = _seconds(expires, "the expiry")
    view = await set_flag(runtime, admin, session.principal, name,
                          decode(_flag_update, _encode(body)))
    if not view.enabled:
        return f"{name} is off."
    until = f" for {span(body['expires_in'])}" if "expires_in" in body else ""
    return f"{name} is on{until}."


@change("bans")
async def add_ban(request: web.Request, session: Session, form: MultiDictProxy[Any]) -> str:
    """POST /admin/bans: ban one subject (an IP is hashed on the way in) for a duration."""
    runtime, admin, _ = _parts(request)
    field = _text(form, "field")
    if field not in admin.codecs_for(runtime.checker).subject_fields:
        raise BadRequest("choose what kind of subject to ban")
    value = _text(form, "value").strip()
    if not value:
        raise BadRequest(f"give the {field} to ban")
    body = {field: value, "duration": _seconds(_text(form, "duration"), "the duration"),
            "reason": _text(form, "reason").strip()}
    ban = await ban_subject(runtime, admin, session.principal,
                            decode(admin.codecs_for(runtime.checker).ban, _encode(body)))
    shown = f"{ban.field} " if ban.field else ""
    return f"Banned {shown}{ban.id} for {span(ban.expires_at - ban.created_at)}."


@change("bans")
async def lift_ban(request: web.Request, session: Session, form: MultiDictProxy[Any]) -> str:
    """POST /admin/bans/{id}/lift: lift a ban everywhere."""
    runtime, admin, _ = _parts(request)
    ban_id = request.match_info["id"]
    lift = decode(msgspec.json.Decoder(LiftRequest),
                  _encode({"reason": _text(form, "reason").strip()}))
    if not await lift_subject(runtime, admin, session.principal, ban_id, lift):
        raise BadRequest("that ban had already ended or been lifted")
    return f"Lifted the ban on {ban_id}."


# -- wiring ----------------------------------------------------------------------------------

ASSETS = {"admin.css": "text/css", "icon.svg": "image/svg+xml"}
ASSET_BODIES = web.AppKey("assets", dict[str, bytes])


def webadmin_app() -> web.Application:
    """The sub-application to mount at ``/admin``."""
    app = web.Application(middlewares=[page_middleware])
    aiohttp_jinja2.setup(app, loader=jinja2.PackageLoader("ratekeeper", "templates"),
                         autoescape=True, undefined=jinja2.StrictUndefined,
                         filters=FILTERS, default_helpers=False)
    static = importlib.resources.files("ratekeeper") / "static"
    app[ASSET_BODIES] = {name: (static / name).read_bytes() for name in ASSETS}
    app.router.add_get("", page, name="page")
    app.router.add_get("/", page)
    app.router.add_get("/static/{name}", asset, name="static")
    app.router.add_get("/signin", signin_form, name="signin")
    app.router.add_post("/signin", signin)
    app.router.add_post("/signout", signout, name="signout")
    app.router.add_post("/flags/{name}", change_flag, name="flag")
    app.router.add_post("/bans", add_ban, name="bans")
    app.router.add_post("/bans/{id}/lift", lift_ban, name="lift")
    return app


def webadmin_context(settings: Settings) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context (after the admin API's) for sessions and the decision counter."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        runtime, admin = app[RUNTIME], app[ADMIN]
        sessions = Sessions(runtime.store.redis, runtime.checker.keyspace,
                            settings.admin_tokens, settings.viewer_tokens, admin.wall)
        rate = DecisionRate(runtime, admin.wall)
        app[WEBADMIN] = WebAdminState(sessions=sessions, rate=rate,
                                      proxies=TrustedProxies(settings.trusted_proxies))
        # nobody can sign in without a token, so nobody would read the counts
        flusher = asyncio.create_task(rate.flush_forever()) if admin.auth.configured else None
        yield
        if flusher is not None:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher

    return context
