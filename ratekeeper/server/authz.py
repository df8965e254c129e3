"""``/v1/authz``: the check for reverse proxies (nginx ``auth_request``, Traefik ``forwardAuth``,
Envoy ``ext_authz`` over HTTP).

What each proxy sends, and what is read:

- nginx ``auth_request`` makes a GET subrequest; the snippet in ``examples/nginx.conf`` sets
  ``X-Original-Method``, ``X-Original-URI`` (``$request_uri``) and ``X-Real-IP``
  (``$remote_addr``). nginx only understands 2xx, 401 and 403 from it, so the snippet turns our
  429 into the client's 429 itself (``auth_request_set`` + ``error_page``).
- Traefik ``forwardAuth`` makes a GET with ``X-Forwarded-Method``, ``X-Forwarded-Uri`` and
  ``X-Forwarded-For``, and hands any non-2xx answer, headers and body, to the client.
- Envoy's HTTP ``ext_authz`` sends the original method to ``path_prefix`` + the original path,
  with only the headers ``allowed_headers`` lets through; it allows on ``200`` only and hands
  anything else to the client. So it gets its own endpoint, ``/v1/authz/envoy<path>``
  (``path_prefix: /v1/authz/envoy``), which answers 200 when allowed and reads the client from
  ``X-Forwarded-For`` alone (Envoy never sets ``X-Real-IP``, so a client could).

The client address is believed from those headers only when the peer is a trusted proxy
(``RATEKEEPER_TRUSTED_PROXIES``). Each request costs 1. Routed actions may only have rules keyed
on ``ip`` or ``[]`` (the config refuses others): a proxy knows nothing else about the client, and
limits on users or projects belong in the app, through the client library. Answers: ``204``
(``200`` for Envoy) when allowed or when no route matches, with the RateLimit headers; ``429``
or ``403`` as problem+json otherwise, plus ``Ratekeeper-Detail`` (the detail sentence, escaped
for a JSON string) so nginx can build the body. Never a 5xx.

Anything the forwarding headers say gets a defined answer. Missing method or path, or a path
that is no request target (an absolute URI whose authority cannot be read, such as
``http://[::1/legacy/x``), is a ``400`` with a JSON ``{"error": ...}`` that repeats none of it:
no proxy forwards such a target from a request it served, and guessing a path for it could let
it past its route, so it is refused rather than let through as unrouted. A client address that
is no address, or that comes from a peer we do not trust, is replaced by the peer's
(``forwarded``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from aiohttp import web
from multidict import CIMultiDictProxy

from ratekeeper.api.problem import denial, passing_headers
from ratekeeper.api.wire import Decision
from ratekeeper.config.routes import RouteTable
from ratekeeper.config.rules import Config, Route
from ratekeeper.errors import BadRequest
from ratekeeper.identity.forwarded import TrustedProxies
from ratekeeper.server.http import Answer, response
from ratekeeper.server.state import RUNTIME

__all__ = ["ENVOY_PREFIX", "add_routes", "authz", "authz_envoy"]

ENVOY_PREFIX = "/v1/authz/envoy"
DETAIL_HEADER = "Ratekeeper-Detail"
MISSING = ("send the original method and path: X-Original-Method and X-Original-URI (nginx), "
           "or X-Forwarded-Method and X-Forwarded-Uri (Traefik)")
UNREADABLE = ("the original URI (X-Original-URI or X-Forwarded-Uri) is not a valid request "
              "target")


@dataclass(slots=True)
class _ProxyState:
    """The route table of the live config (rebuilt when a reload swaps it) and the proxies."""

    trusted: TrustedProxies | None = None
    config: Config | None = None
    table: RouteTable = field(default_factory=lambda: RouteTable(()))


PROXY_STATE = web.AppKey("proxy_state", _ProxyState)


def add_routes(app: web.Application) -> None:
    """Serve ``GET /v1/authz`` and Envoy's ``/v1/authz/envoy/...`` on ``app``."""
    app[PROXY_STATE] = _ProxyState()
    app.router.add_get("/v1/authz", authz)
    # [\s\S], not ".": a percent-encoded newline in the path must match too
    app.router.add_route("*", ENVOY_PREFIX + r"{path:(/[\s\S]*)?}", authz_envoy)


def _forwarded(app: web.Application, headers: CIMultiDictProxy[str], peer: str | None
               ) -> tuple[str, str, str | None]:
    """The method, target and client that nginx's or Traefik's headers name."""
    method = headers.get("X-Original-Method") or headers.get("X-Forwarded-Method")
    target = headers.get("X-Original-URI") or headers.get("X-Forwarded-Uri")
    if not method or not target:
        raise BadRequest(MISSING)
    return method, target, _trusted(app).from_headers(peer, headers)


async def authz(request: web.Request) -> web.Response:
    """GET /v1/authz: may the request described by the forwarding headers go on?"""
    app = request.app
    return response(await _decided(app, *_forwarded(app, request.headers, request.remote),
                                   allowed=204))


async def authz_envoy(request: web.Request) -> web.Response:
    """Any method on /v1/authz/envoy<path>: Envoy's ext_authz check of ``<method> <path>``."""
    app = request.app
    target = request.raw_path[len(ENVOY_PREFIX):] or "/"
    ip = _trusted(app).from_headers(request.remote, request.headers, real_ip=False)
    return response(await _decided(app, request.method, target, ip, allowed=200))


def _trusted(app: web.Application) -> TrustedProxies:
    state = app[PROXY_STATE]
    if state.trusted is None:
        state.trusted = TrustedProxies(app[RUNTIME].settings.trusted_proxies)
    return state.trusted


def _table(app: web.Application, config: Config) -> RouteTable:
    state = app[PROXY_STATE]
    if state.config is not config:
        state.table, state.config = RouteTable.from_config(config), config
    return state.table


def _route(table: RouteTable, method: str, target: str) -> Route | None:
    try:
        return table.match(method, target)
    except ValueError:
        raise BadRequest(UNREADABLE) from None


async def _decided(app: web.Application, method: str, target: str, ip: str | None, *,
                   allowed: int) -> Answer:
    """The answer for the request ``method target``: ``allowed`` when no route matches."""
    checker = app[RUNTIME].checker
    route = _route(_table(app, checker.config), method, target)
    if route is None:
        return Answer(allowed, {})
    decision = await checker.check(checker.request_type(action=route.action, ip=ip))
    return _answer(decision, allowed)


def _answer(decision: Decision, allowed: int) -> Answer:
    """The answer to a proxy for ``decision``: ``allowed`` (204 or 200), 429 or 403."""
    refusal = denial(decision)
    if refusal is None:
        return Answer(allowed, passing_headers(decision))
    headers = dict(refusal.headers)
    headers[DETAIL_HEADER] = json.dumps(refusal.detail, ensure_ascii=True)[1:-1]
    return Answer(refusal.status, headers, refusal.body)
