"""The admin page at ``/admin``: kill switches, bans, top lists, audit, health, and a live
picture of the traffic with the tripwires, in HTML.

Signed in with the admin API's tokens (``server/auth.py``'s check), the page makes its changes
through the admin API's own functions (``admin.set_flag``, ``admin_subjects.ban_subject``,
``admin_subjects.lift_subject``), so they are validated, audited under the token's name and
announced to every process exactly like API calls. Every form posts back here with a CSRF
token and is answered with a redirect to the page (post/redirect/get); a viewer token sees
the page without forms, and its posts are refused. No script, no asset from elsewhere:
one stylesheet served from here, and a Content-Security-Policy that allows nothing else. The
live picture of the traffic is a frame of this page (``GET /admin/traffic``, which only this
site may frame) that reloads itself every ``REFRESH_SECONDS`` with a meta refresh, so it
stays live while the tab is open, and the page around it (its forms, what is typed in them)
is never reloaded. The forms' handlers are in ``forms.py``, sessions and CSRF in
``session.py``, the page's data in ``view.py``, the health line in ``health.py``, the live
picture in ``traffic.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
import secrets
from collections.abc import AsyncIterator, Callable

import aiohttp_jinja2
import jinja2
from aiohttp import web

from ratekeeper.admin.common import ADMIN
from ratekeeper.admin.web.common import (
    UNREADABLE_FORM,
    WEBADMIN,
    WebAdminState,
    current_session,
    field,
    parts,
    read_form,
    redirect,
    refuse,
    render,
    url_for,
)
from ratekeeper.admin.web.forms import add_ban, arm_tripwire, change_flag, lift_ban
from ratekeeper.admin.web.health import DecisionRate, health
from ratekeeper.admin.web.session import (
    SESSION_COOKIE,
    SIGNIN_COOKIE,
    SIGNIN_SECONDS,
    Sessions,
    clear_cookie,
    cross_origin,
    is_https,
    same_token,
    set_cookie,
)
from ratekeeper.admin.web.throttle import SignInThrottle
from ratekeeper.admin.web.traffic import LEGEND, live_picture
from ratekeeper.admin.web.view import FILTERS, gather
from ratekeeper.errors import StoreUnavailable
from ratekeeper.identity.forwarded import TrustedProxies
from ratekeeper.logs import client_error
from ratekeeper.server.http import Handler
from ratekeeper.server.state import RUNTIME
from ratekeeper.settings import Settings

__all__ = ["webadmin_app", "webadmin_context"]

log = logging.getLogger("ratekeeper.admin.web.app")

# Nothing but this service's own stylesheet, forms and frame (the live picture); no script.
CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; frame-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
# The live picture: framed by this site's page only, and with nothing to frame or submit.
FRAME_CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'none'; "
             "frame-ancestors 'self'; base-uri 'none'")
REFRESH_SECONDS = 5
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
}


@web.middleware
async def page_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Security headers on every answer; a Redis outage is a page that says so."""
    try:
        response = await handler(request)
    except StoreUnavailable:
        response = render(request, "message.html", {
            "title": "Redis is unreachable",
            "text": "The admin page needs Redis for sessions and for every change, and it "
                    "does not answer. Checks go on from the rules' fail modes and every "
                    "process keeps the kill switches it last knew. Try again shortly."},
            status=503)
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    response.headers.setdefault("Cache-Control", "no-store")
    return response


# -- the page --------------------------------------------------------------------------------

async def page(request: web.Request) -> web.Response:
    """GET /admin: everything an admin needs in an incident, on one page."""
    session = await current_session(request, take_flash=True)
    if session is None:
        return redirect(url_for(request, "signin"))
    runtime, admin, state = parts(request)
    sections = await gather(runtime, admin)
    status = await health(runtime, admin.sync, state.rate, sections.flags_stale)
    return render(request, "page.html", {
        "session": session, "can_write": session.principal.can_write, "now": admin.wall(),
        "s": sections, "health": status, "flash": session.flash,
        "refresh": REFRESH_SECONDS})


async def traffic(request: web.Request) -> web.Response:
    """GET /admin/traffic: the live picture, the page's frame, which reloads itself."""
    session = await current_session(request)
    if session is None:
        response = render(request, "message.html", {
            "title": "Signed out", "text": "Sign in again to see the traffic."}, status=401)
    else:
        _, admin, _ = parts(request)
        response = render(request, "traffic.html", {
            "now": admin.wall(), "live": await live_picture(admin), "legend": LEGEND,
            "refresh": REFRESH_SECONDS})
    response.headers["Content-Security-Policy"] = FRAME_CSP
    response.headers["X-Frame-Options"] = "SAMEORIGIN"
    return response


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
    if await current_session(request) is not None:
        return redirect(url_for(request, "page"))
    _, admin, state = parts(request)
    token = secrets.token_urlsafe(32)
    note = SIGNIN_NOTES.get(request.query.get("note", ""))
    response = render(request, "signin.html", {
        "csrf": token, "note": note, "configured": admin.auth.configured})
    set_cookie(response, SIGNIN_COOKIE, token, secure=is_https(request, state.proxies),
               max_age=SIGNIN_SECONDS)
    return response


async def signin(request: web.Request) -> web.Response:
    """POST /admin/signin: a valid admin or viewer token starts a session."""
    _, admin, state = parts(request)
    why = cross_origin(request, state.proxies)
    if why is not None:
        return refuse(request, 403, "Sign-in refused", f"{why}. Nobody was signed in.")
    form = await read_form(request)
    if form is None:
        return refuse(request, 400, "Sign-in refused", UNREADABLE_FORM)
    if not same_token(request.cookies.get(SIGNIN_COOKIE, ""), field(form, "csrf")):
        return refuse(request, 403, "Sign-in refused",
                       "This sign-in form has expired or did not come from this page. "
                       "Open the sign-in page again.")
    client = state.proxies.from_headers(request.remote, request.headers)
    wait_ms = await state.throttle.wait_ms(client)
    if wait_ms:
        minutes = -(-wait_ms // 60_000)
        response = refuse(request, 429, "Too many failed sign-ins",
                          f"Too many failed sign-ins came from your network. Try again in "
                          f"{minutes} minute{'s' if minutes != 1 else ''}.")
        response.headers["Retry-After"] = str(-(-wait_ms // 1000))
        return response
    token = field(form, "token").strip()
    principal = admin.auth.authenticate(f"Bearer {token}") if token else None
    if principal is None:
        client_error(log, "unknown token", "admin page: sign-in with an unknown token refused")
        await state.throttle.failed(client)
        return redirect(url_for(request, "signin") + "?note=failed")
    await state.throttle.succeeded(client)
    previous = await current_session(request)
    if previous is not None:  # signing in again replaces the session, never adds one
        await state.sessions.end(previous.id)
    session = await state.sessions.create(principal, token)
    log.info("admin page: %s signed in (%s)", principal.name, principal.role)
    response = redirect(url_for(request, "page"))
    secure = is_https(request, state.proxies)
    set_cookie(response, SESSION_COOKIE, session.id, secure=secure,
               max_age=state.sessions.seconds)
    clear_cookie(response, SIGNIN_COOKIE, secure=secure)
    return response


async def signout(request: web.Request) -> web.Response:
    """POST /admin/signout: end the session for every process."""
    _, _, state = parts(request)
    why = cross_origin(request, state.proxies)
    if why is not None:
        return refuse(request, 403, "Sign-out refused", f"{why}.")
    session = await current_session(request)
    form = await read_form(request)
    if form is None:
        return refuse(request, 400, "Sign-out refused", UNREADABLE_FORM)
    if session is not None:
        if not same_token(session.csrf, field(form, "csrf")):
            return refuse(request, 403, "Sign-out refused",
                           "This form did not come from your session. Reload the page.")
        await state.sessions.end(session.id)
        log.info("admin page: %s signed out", session.principal.name)
    response = redirect(url_for(request, "signin") + "?note=signed-out")
    clear_cookie(response, SESSION_COOKIE, secure=is_https(request, state.proxies))
    return response


# -- wiring ----------------------------------------------------------------------------------

ASSETS = {"admin.css": "text/css", "icon.svg": "image/svg+xml"}
ASSET_BODIES = web.AppKey("assets", dict[str, bytes])


def webadmin_app() -> web.Application:
    """The sub-application to mount at ``/admin``."""
    app = web.Application(middlewares=[page_middleware])
    aiohttp_jinja2.setup(app, loader=jinja2.PackageLoader("ratekeeper.admin.web", "templates"),
                         autoescape=True, undefined=jinja2.StrictUndefined,
                         filters=FILTERS, default_helpers=False)
    static = importlib.resources.files("ratekeeper.admin.web") / "static"
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
    app.router.add_get("/traffic", traffic, name="traffic")
    app.router.add_post("/tripwires/{name}", arm_tripwire, name="tripwire")
    return app


def webadmin_context(settings: Settings) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context (after the admin API's) for sessions and the decision counter."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        runtime, admin = app[RUNTIME], app[ADMIN]
        sessions = Sessions(runtime.store.redis, runtime.checker.keyspace,
                            settings.admin_tokens, settings.viewer_tokens, admin.wall)
        rate = DecisionRate(runtime, admin.wall)
        app[WEBADMIN] = WebAdminState(sessions=sessions, rate=rate,
                                      proxies=TrustedProxies(settings.trusted_proxies),
                                      throttle=SignInThrottle(runtime.store.redis,
                                                              runtime.checker.keyspace))
        # nobody can sign in without a token, so nobody would read the counts
        flusher = asyncio.create_task(rate.flush_forever()) if admin.auth.configured else None
        yield
        if flusher is not None:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher

    return context
