"""Enforcement inside the app: WSGI and aiohttp middleware over the ``[[routes]]`` table.

Both map method + path to an action with ``ratekeeper.routes.RouteTable`` (the table
``/v1/authz`` uses), take the client's address only from trusted proxies, ask the sidecar, and
answer a denial themselves as ``application/problem+json`` (``429`` with ``Retry-After`` and the
RateLimit headers, ``403`` with the kill switch's message); an allowed request goes on and its
response gets the RateLimit headers. A routing mistake the sidecar rejects (4xx) is logged and
the request goes on: a bad rules file must not take the app down.
"""

from __future__ import annotations

from .aiohttp import ratekeeper_middleware
from .wsgi import RatekeeperMiddleware

__all__ = ["RatekeeperMiddleware", "ratekeeper_middleware"]
