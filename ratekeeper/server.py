"""The HTTP wire: the aiohttp application, its routes and its error translation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.typedefs import Middleware

from .answers import CLIENT_ERRORS, JSON, MAX_BODY, Answer, error_answer, json_answer, response
from .config import Config, load_config
from .errors import ConfigError
from .flags import FlagBoard
from .headers import rate_limit_headers
from .keys import Keyspace
from .limiter import Limiter
from .localcache import LocalCache
from .metrics import Metrics
from .service import Checker
from .settings import Settings
from .spec import openapi_document
from .store import Store, open_store
from .top import TopDenials
from .warmup import WORKERS
from .wire import BatchResponse, Decision, ErrorBody, Health, Readiness

__all__ = [
    "MAX_BODY",
    "RUNTIME",
    "STOPPING",
    "Runtime",
    "build_checker",
    "create_app",
    "error_response",
    "json_response",
    "reload_config",
]

log = logging.getLogger("ratekeeper.server")

_encode = msgspec.json.Encoder().encode


@dataclass(slots=True)
class Runtime:
    """The live state of one process; ``checker`` is swapped whole on a config reload."""

    settings: Settings
    store: Store
    limiter: Limiter
    flags: FlagBoard
    checker: Checker
    metrics: Metrics
    cache: LocalCache | None = None  # known banned / over-limit subjects, shared by reloads
    denials: TopDenials | None = None  # counts for GET /v1/admin/top, shared by reloads


RUNTIME = web.AppKey("runtime", Runtime)
# set by the runner when the worker drains: every answer then closes its connection
STOPPING = web.AppKey("stopping", asyncio.Event)


def build_checker(config: Config, settings: Settings, limiter: Limiter,
                  flags: FlagBoard, *, cache: LocalCache | None = None,
                  denials: TopDenials | None = None,
                  wall: Callable[[], float] = time.time) -> Checker:
    """A Checker for ``config`` sharing this process's store and flag state."""
    keyspace = Keyspace(settings.ip_salt, prefix=settings.key_prefix, grouping=config.ip,
                        previous_salt=settings.ip_salt_previous or None)
    if cache is not None:
        cache.clear()  # what it knew was decided under the previous rules
    return Checker(config, keyspace, limiter, flags, cache=cache, denials=denials,
                   metrics=limiter.metrics, wall=wall)


def reload_config(app: web.Application, path: str) -> bool:
    """Swap in the rules of ``path`` whole; when it is bad, log why and keep the current ones."""
    runtime = app[RUNTIME]
    try:
        config = load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            log.error("reload: %s", line)
        log.error("reload: %s is invalid; still serving the rules loaded before", path)
        return False
    runtime.checker = build_checker(config, runtime.settings, runtime.limiter, runtime.flags,
                                    cache=runtime.cache, denials=runtime.denials,
                                    wall=runtime.checker.wall)
    log.info("reload: now serving %s (%d rules, %d actions)", path, len(config.rules),
             len(config.actions))
    return True


def json_response(body: Any, *, status: int = 200) -> web.Response:
    """A JSON response encoded by msgspec."""
    return response(json_answer(body, status=status))


def error_response(status: int, message: str) -> web.Response:
    """A 4xx with ``{"error": message}``."""
    return json_response(ErrorBody(error=message), status=status)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_middleware(stopping: asyncio.Event) -> Middleware:
    """Client errors become JSON ``{"error": ...}`` (nothing a client sends becomes a 5xx);
    once ``stopping`` is set, every answer closes its connection.

    One middleware for both: each one is another coroutine on every request's path.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        return await _answered(handler(request), stopping)

    return middleware


async def _answered(answer: Awaitable[web.StreamResponse], stopping: asyncio.Event
                    ) -> web.StreamResponse:
    """``answer``'s response, a client error as its JSON answer; once ``stopping`` is set,
    one that closes its connection."""
    try:
        response_ = await answer
    except CLIENT_ERRORS as exc:
        response_ = response(error_answer(exc))
    if stopping.is_set():
        # the client learns from the answer that this connection ends here, so it never
        # sends another request into a connection we are about to close
        response_.force_close()
    return response_


def _headers(decision: Decision) -> dict[str, str]:
    """A check answer's headers: its RateLimit fields and the JSON Content-Type."""
    headers = rate_limit_headers(decision)
    headers["Content-Type"] = JSON
    return headers


def check_response(decision: Decision) -> web.Response:
    """The answer to a check: the Decision's JSON and its RateLimit headers."""
    return response(Answer(200, _headers(decision), _encode(decision)))


async def check(request: web.Request) -> web.Response:
    """POST /v1/check: decide one request."""
    checker = request.app[RUNTIME].checker
    return check_response(await checker.check(checker.decode(await request.read())))


async def check_batch(request: web.Request) -> web.Response:
    """POST /v1/check/batch: decide several requests, answered in order."""
    checker = request.app[RUNTIME].checker
    decisions = await checker.check_batch(checker.decode_batch(await request.read()))
    return json_response(BatchResponse(results=decisions))


async def refund(request: web.Request) -> web.Response:
    """POST /v1/refund: give back the hits a check took (its answer's ``refund`` token), once."""
    checker = request.app[RUNTIME].checker
    body = await request.read()
    return json_response(await checker.refund(checker.decode_refund(body)))


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz: the process answers (and which worker process it is)."""
    return json_response(Health(status="ok", pid=os.getpid()))


async def readyz(request: web.Request) -> web.Response:
    """GET /readyz: every worker of the server is warm and accepting (``warmup``), and Redis
    answers with the scripts loaded; else 503, with the reason."""
    runtime = request.app[RUNTIME]
    workers = request.app.get(WORKERS)  # (none when a test client serves the app)
    reason = None if workers is None else workers.unready()
    if reason is None and not await runtime.limiter.ready():  # at once while the circuit is open
        reason = "Redis does not answer with the scripts loaded"
    body = Readiness(status="unavailable" if reason else "ready", store=runtime.store.kind,
                     breaker=runtime.limiter.breaker_state)
    return json_response({**msgspec.structs.asdict(body), "reason": reason},
                         status=503 if reason else 200)


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text, summed over every worker."""
    runtime = request.app[RUNTIME]
    now = runtime.checker.wall()
    for state in runtime.flags.all():  # flag state as this process knows it, at scrape time
        runtime.metrics.flag_state(state.name, runtime.flags.is_on(state.name, now))
    body, content_type = runtime.metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def openapi(request: web.Request) -> web.Response:
    """GET /openapi.json: the spec of every endpoint, for the live config's types."""
    checker = request.app[RUNTIME].checker
    return json_response(openapi_document(checker.request_type, checker.batch_type))


def create_app(settings: Settings, config: Config, *, store: Store | None = None,
               clock: Callable[[], int] | None = None) -> web.Application:
    """Build the application; connections open on startup and close on cleanup."""
    from .admin import admin_app, admin_context  # it imports this module

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
                          metrics=metrics, node_client=live.node_client)
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
    from .webadmin import webadmin_app, webadmin_context  # it imports this module

    app.cleanup_ctx.append(webadmin_context(settings))
    app.add_subapp("/admin", webadmin_app())
    app.router.add_post("/v1/check", check)
    app.router.add_post("/v1/check/batch", check_batch)
    app.router.add_post("/v1/refund", refund)
    from .proxy import add_routes as add_proxy_routes  # here: proxy.py imports RUNTIME from us
    add_proxy_routes(app)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    return app
