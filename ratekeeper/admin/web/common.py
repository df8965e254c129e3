"""What the admin page's handlers share: per-process state and the answers they give."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import aiohttp_jinja2
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import MultiDictProxy

from ratekeeper.admin.common import ADMIN, AdminState, route_of
from ratekeeper.admin.web.health import DecisionRate
from ratekeeper.admin.web.session import SESSION_COOKIE, Session, Sessions
from ratekeeper.admin.web.throttle import SignInThrottle
from ratekeeper.identity.forwarded import TrustedProxies
from ratekeeper.logs import client_error
from ratekeeper.server.state import RUNTIME, Runtime

__all__ = ["UNREADABLE_FORM", "WEBADMIN", "WebAdminState", "current_session", "field", "parts",
           "read_form", "redirect", "refuse", "render", "url_for"]

log = logging.getLogger("ratekeeper.admin.web.app")


@dataclass(slots=True)
class WebAdminState:
    """What the page's handlers use, made once per process."""

    sessions: Sessions
    rate: DecisionRate
    proxies: TrustedProxies
    throttle: SignInThrottle


WEBADMIN = web.AppKey("webadmin", WebAdminState)


def parts(request: web.Request) -> tuple[Runtime, AdminState, WebAdminState]:
    """The runtime, the admin API's state and the page's state."""
    config = request.config_dict
    return config[RUNTIME], config[ADMIN], config[WEBADMIN]


async def current_session(request: web.Request, *, take_flash: bool = False
                          ) -> Session | None:
    """The session of this request's cookie, or None."""
    return await parts(request)[2].sessions.load(request.cookies.get(SESSION_COOKIE),
                                                 take_flash=take_flash)


UNREADABLE_FORM = "The form could not be read. Nothing was changed."


async def read_form(request: web.Request) -> MultiDictProxy[Any] | None:
    """The posted form; None when its body is not one (a multipart body without a boundary,
    bytes that are not its charset), which the page answers with a 400, never a 500."""
    try:
        return await request.post()
    except (ValueError, LookupError, HttpProcessingError):  # (LookupError: a charset)
        return None


def field(form: MultiDictProxy[Any], name: str) -> str:
    """A text field of a posted form ('' when absent or a file)."""
    value = form.get(name, "")
    return value if isinstance(value, str) else ""


def url_for(request: web.Request, route: str, **values: str) -> str:
    """The path of one of the page's named routes."""
    return str(request.app.router[route].url_for(**values))


def redirect(location: str) -> web.Response:
    """303 See Other: after a form, the browser GETs the page (post/redirect/get)."""
    return web.Response(status=303, headers={"Location": location})


def render(request: web.Request, template: str, context: dict[str, Any], *,
           status: int = 200) -> web.Response:
    """A template rendered to HTML (autoescaped), with ``url(route, ...)`` available."""

    def url(route: str, **values: str) -> str:
        return url_for(request, route, **values)

    return aiohttp_jinja2.render_template(template, request, {**context, "url": url},
                                          status=status)


def refuse(request: web.Request, status: int, title: str, text: str) -> web.Response:
    """A page that says why nothing was done, and a sampled log line naming the route (never
    the path the client sent) and the reason (our sentence, never a token)."""
    route = route_of(request)
    client_error(log, f"refused {status} {route}", "admin page: %s %s refused (%d): %s",
                 request.method, route, status, text)
    return render(request, "message.html", {"title": title, "text": text}, status=status)
