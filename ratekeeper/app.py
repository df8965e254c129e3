"""The application factory: the server's endpoints, the admin API and the admin page on one
aiohttp application, with the worker's state opened on startup and closed on cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from ratekeeper.admin.api import admin_app, admin_context
from ratekeeper.admin.web.app import webadmin_app, webadmin_context
from ratekeeper.config.rules import Config
from ratekeeper.decision.cache import LocalCache
from ratekeeper.decision.flags import FlagBoard
from ratekeeper.decision.top import TopDenials
from ratekeeper.identity.keys import Keyspace
from ratekeeper.metrics import Metrics
from ratekeeper.server import authz, endpoints
from ratekeeper.server.http import MAX_BODY, error_middleware
from ratekeeper.server.state import RUNTIME, STOPPING, Runtime, build_checker
from ratekeeper.settings import Settings
from ratekeeper.storage.limiter import Limiter
from ratekeeper.storage.store import Store, open_store

__all__ = ["create_app"]


def create_app(settings: Settings, config: Config, *, store: Store | None = None,
               clock: Callable[[], int] | None = None) -> web.Application:
    """Build the application; connections open on startup and close on cleanup."""
    stopping = asyncio.Event()  # set by the runner when the worker drains
    app = web.Application(client_max_size=MAX_BODY, middlewares=[error_middleware(stopping)])
    app[STOPPING] = stopping
    # a test clock (ms) drives flag expiry and the local cache too; else the real clocks
    wall: Callable[[], float] = time.time if clock is None else (lambda: clock() / 1000)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        own_store = store is None
        live = open_store(settings) if store is None else store
        metrics = Metrics()
        limiter = Limiter(live.redis, timeout=settings.redis_timeout_ms / 1000, clock=clock,
                          metrics=metrics, checks=live.checks)
        flags = FlagBoard(config.flags)
        cache = LocalCache(settings.local_cache_size, now_ms=clock)
        keyspace = Keyspace(settings.ip_salt, prefix=settings.key_prefix, grouping=config.ip)
        denials = TopDenials(live.redis, keyspace, wall)
        app[RUNTIME] = Runtime(settings=settings, store=live, limiter=limiter, flags=flags,
                               checker=build_checker(config, settings, limiter, flags,
                                                     cache=cache, denials=denials, wall=wall),
                               metrics=metrics, cache=cache, denials=denials)
        await limiter.ready()  # connect and load the scripts now; a Redis that is down is fine
        counting = asyncio.create_task(metrics.flush_forever())
        yield
        counting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await counting
        await limiter.close()
        if own_store:
            await live.close()

    app.cleanup_ctx.append(lifecycle)
    app.cleanup_ctx.append(admin_context(settings, wall))
    app.add_subapp("/v1/admin", admin_app())
    app.cleanup_ctx.append(webadmin_context(settings))
    app.add_subapp("/admin", webadmin_app())
    endpoints.add_routes(app, settings)
    authz.add_routes(app)
    return app
