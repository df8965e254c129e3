"""Enforcement inside the app: WSGI and aiohttp middleware over the ``[[routes]]`` table.

Both map method + path to an action with ``ratekeeper.config.routes.RouteTable`` (the table
``/v1/authz`` uses), take the client's address only from trusted proxies, ask the sidecar, and
answer a denial themselves as ``application/problem+json`` (``429`` with ``Retry-After`` and the
RateLimit headers, ``403`` with the kill switch's message); an allowed request goes on and its
response gets the RateLimit headers. A routing mistake the sidecar rejects (4xx) is logged and
the request goes on: a bad rules file must not take the app down.
"""

from __future__ import annotations

from ratekeeper.lazy import exports

# each public name, and the module that defines it (a WSGI app never loads aiohttp)
_HOMES = {
    "RatekeeperMiddleware": "ratekeeper.client.middleware.wsgi",
    "ratekeeper_middleware": "ratekeeper.client.middleware.aiohttp",
}

__all__ = sorted(_HOMES, key=str.casefold)
__getattr__, __dir__ = exports(__name__, _HOMES)
