"""aiohttp middleware: an ``AsyncClient`` check before routed requests."""

from __future__ import annotations

import logging
from collections.abc import Iterable, MutableMapping

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ratekeeper.api.problem import denial, passing_headers
from ratekeeper.client.aio import AsyncClient
from ratekeeper.client.base import RequestRejected
from ratekeeper.config.routes import RouteTable
from ratekeeper.identity.forwarded import Network, TrustedProxies
from ratekeeper.settings import DEFAULT_TRUSTED_PROXIES

__all__ = ["ratekeeper_middleware"]

log = logging.getLogger("ratekeeper.client.middleware")


def _add(headers: MutableMapping[str, str], extra: dict[str, str]) -> None:
    for name, value in extra.items():
        headers.setdefault(name, value)


def ratekeeper_middleware(client: AsyncClient, routes: RouteTable, *,
                          trusted_proxies: Iterable[Network | str] = DEFAULT_TRUSTED_PROXIES
                          ) -> Middleware:
    """A middleware for ``web.Application(middlewares=[...])``."""
    trusted = TrustedProxies(trusted_proxies)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            route = routes.match(request.method, request.raw_path)
        except ValueError:  # a target whose authority cannot be read: no route can be told
            return web.json_response({"error": "the request target cannot be read"},
                                     status=400)
        if route is None:
            return await handler(request)
        ip = trusted.from_headers(request.remote, request.headers)
        try:
            decision = await client.check(route.action, ip=ip)
        except RequestRejected as exc:
            log.error("ratekeeper refused route %s %s -> %s: %s", route.method, route.path,
                      route.action, exc)
            return await handler(request)
        refusal = denial(decision)
        if refusal is not None:
            return web.Response(status=refusal.status, headers=refusal.headers,
                                body=refusal.body)
        extra = passing_headers(decision)
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            _add(exc.headers, extra)
            raise
        if not response.prepared:  # a streamed response has sent its headers already
            _add(response.headers, extra)
        return response

    return middleware
