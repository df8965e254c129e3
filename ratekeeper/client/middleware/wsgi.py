"""WSGI middleware (Warehouse, Flask, Django): a ``SyncClient`` check before routed requests."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any
from urllib.parse import quote

from ratekeeper.api.problem import denial, passing_headers
from ratekeeper.client.base import RequestRejected
from ratekeeper.client.sync import SyncClient
from ratekeeper.config.routes import RouteTable
from ratekeeper.identity.forwarded import Network, TrustedProxies
from ratekeeper.settings import DEFAULT_TRUSTED_PROXIES

__all__ = ["RatekeeperMiddleware"]

log = logging.getLogger("ratekeeper.client.middleware")

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]


def _target(environ: Environ) -> str:
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        return str(raw)
    # PEP 3333: PATH_INFO is the decoded path as latin-1; re-quote so it is decoded only once
    path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    return quote(path.encode("latin-1", "replace"), safe="/")


def _status_line(status: int) -> str:
    return f"{status} {HTTPStatus(status).phrase}"


class RatekeeperMiddleware:
    """Wraps a WSGI app; routed requests are checked with ``client`` before the app runs."""

    def __init__(self, app: WSGIApp, client: SyncClient, routes: RouteTable, *,
                 trusted_proxies: Iterable[Network | str] = DEFAULT_TRUSTED_PROXIES) -> None:
        self.app = app
        self.client = client
        self.routes = routes
        self.trusted = TrustedProxies(trusted_proxies)

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        try:
            route = self.routes.match(environ.get("REQUEST_METHOD", "GET"), _target(environ))
        except ValueError:  # a target whose authority cannot be read: no route can be told
            start_response("400 Bad Request", [("Content-Type", "application/json")])
            return [b'{"error": "the request target cannot be read"}']
        if route is None:
            return self.app(environ, start_response)
        ip = self.trusted.client_ip(environ.get("REMOTE_ADDR"),
                                    real_ip=environ.get("HTTP_X_REAL_IP"),
                                    forwarded_for=environ.get("HTTP_X_FORWARDED_FOR"))
        try:
            decision = self.client.check(route.action, ip=ip)
        except RequestRejected as exc:
            log.error("ratekeeper refused route %s %s -> %s: %s", route.method, route.path,
                      route.action, exc)
            return self.app(environ, start_response)
        refusal = denial(decision)
        if refusal is not None:
            start_response(_status_line(refusal.status), list(refusal.headers.items()))
            return [refusal.body]
        extra = passing_headers(decision)

        def add_headers(status: str, headers: list[tuple[str, str]],
                        exc_info: Any = None) -> Any:
            present = {name.lower() for name, _ in headers}
            headers = headers + [(k, v) for k, v in extra.items() if k.lower() not in present]
            return start_response(status, headers, exc_info)

        return self.app(environ, add_headers)
