"""The HTTP wire: the aiohttp application, its routes and its error translation.

``POST /v1/check`` and ``/v1/check/batch`` are also answered inside the HTTP protocol
(``hotpath``, installed by ``serve_hot_paths``); the answers are the same either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
from aiohttp import web
from aiohttp.typedefs import Middleware

from .answers import (
    CLIENT_ERRORS,
    JSON,
    MAX_BODY,
    Answer,
    error_answer,
    json_answer,
    response,
    wire,
    wire_head,
    wire_tail,
)
from .config import Config, load_config
from .errors import ConfigError
from .flags import FlagBoard
from .headers import rate_limit_headers
from .hotpath import HOT_PATHS, OUTBOX, STOPPING, HotHandler, HotProtocol, Later, Outbox
from .keys import Keyspace
from .limiter import Limiter
from .localcache import LocalCache
from .metrics import Metrics
from .pipeline import Coalescer, coalesced
from .service import Allowed, Checker, Pending
from .settings import Settings
from .spec import openapi_document
from .store import Store, open_store
from .top import TopDenials
from .wire import BatchResponse, Decision, ErrorBody, Health, Readiness

__all__ = [
    "MAX_BODY",
    "RUNTIME",
    "STOPPING",
    "Runtime",
    "build_checker",
    "create_app",
    "decision_later",
    "error_response",
    "json_response",
    "reload_config",
]

log = logging.getLogger("ratekeeper.server")

_encode = msgspec.json.Encoder().encode
Settled = TypeVar("Settled", Decision, Decision | Allowed)
_new = tuple.__new__


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
    bodies: DenialBodies = field(default_factory=lambda: DenialBodies())  # encoded denials


RUNTIME = web.AppKey("runtime", Runtime)


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


class DenialBodies:
    """The answers to ``POST /v1/check`` for its decisions; denials encoded once each.

    The local cache hands out one Decision per subject until a figure in it changes, so a
    flood of repeat offenders is answered with bytes encoded once (allowed answers are new
    objects every time and are not kept). Entries hold their Decision, so an id is never
    reused while it is here.
    """

    __slots__ = ("_known", "size")

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._known: dict[int, tuple[Decision, Answer, bytes]] = {}  # ..., its wire_head

    def _denial(self, decision: Decision) -> tuple[Decision, Answer, bytes]:
        known = self._known.get(id(decision))
        if known is None or known[0] is not decision:
            if len(self._known) >= self.size:
                self._known.clear()
            answer = Answer(200, _headers(decision), _encode(decision))
            known = self._known[id(decision)] = (
                decision, answer, wire_head(200, answer.headers, len(answer.body)))
        return known

    def response(self, decision: Decision) -> web.Response:
        """The answer for ``decision``, for aiohttp to send."""
        if decision.allowed:
            return response(Answer(200, _headers(decision), _encode(decision)))
        return response(self._denial(decision)[1])

    def wire(self, decision: Decision | Allowed) -> bytes:
        """The answer for ``decision``, as the bytes of an HTTP response (``hotpath``); an
        Allowed's from its action's form."""
        if type(decision) is Allowed:
            return decision.form.wire(decision.figures, decision.token)
        assert isinstance(decision, Decision)
        if decision.allowed:
            body = _encode(decision)
            return wire_head(200, _headers(decision), len(body)) + wire_tail() + body
        _, answer, head = self._denial(decision)
        return head + wire_tail() + answer.body


def decision_later(runtime: Runtime, stage: Pending, finish: Callable[[Decision], bytes]
                   ) -> Later:
    """The hot paths' ``check_pending``: ``finish`` gets the Decision once Redis answered."""
    return _later(runtime.checker, stage, finish, runtime.checker.settle)


def _later(checker: Checker, stage: Pending, finish: Callable[[Settled], bytes],
           settle: Callable[[Pending, asyncio.Future[Any]], Settled]) -> Later:
    future = checker.check_soon(stage)
    if future is None:
        return Later(asyncio.ensure_future(checker.check_pending(stage)),
                     lambda done: finish(done.result()))
    # (Later(...) without its Python __new__: one is made per check)
    return _new(Later, (future, lambda done: finish(settle(stage, done))))


def _hot_check(app: web.Application, message: Any, body: bytes, protocol: HotProtocol
               ) -> bytes | Later:
    runtime = app[RUNTIME]
    checker = runtime.checker
    decision = checker.check_now(checker.decode(body))
    if isinstance(decision, Pending):
        # an allowed answer is made from its action's form (Checker.settle_answer)
        return _later(checker, decision, runtime.bodies.wire, checker.settle_answer)
    return runtime.bodies.wire(decision)


def batch_answer(results: list[Decision | Allowed]) -> Answer:
    """The answer to a batch: each allowed check's JSON from its action's form."""
    encoded = [msgspec.Raw(result.form.body(result.figures, result.token))
               if type(result) is Allowed else result for result in results]
    # (a Raw is encoded as the JSON it holds: the same bytes as the Decision it stands for)
    return json_answer(BatchResponse(results=encoded))  # type: ignore[arg-type]


def _hot_check_batch(app: web.Application, message: Any, body: bytes, protocol: HotProtocol
                     ) -> Later:
    checker = app[RUNTIME].checker
    decisions = asyncio.ensure_future(checker.answer_many(checker.decode_batch(body)))
    return Later(decisions, lambda done: wire(batch_answer(done.result())))


async def check(request: web.Request) -> web.Response:
    """POST /v1/check: decide one request."""
    runtime = request.app[RUNTIME]
    decision = await runtime.checker.check(runtime.checker.decode(await request.read()))
    return runtime.bodies.response(decision)


async def check_batch(request: web.Request) -> web.Response:
    """POST /v1/check/batch: decide several requests, answered in order."""
    checker = request.app[RUNTIME].checker
    results = await checker.answer_many(checker.decode_batch(await request.read()))
    return response(batch_answer(results))


async def refund(request: web.Request) -> web.Response:
    """POST /v1/refund: give back the hits a check took (its answer's ``refund`` token), once."""
    checker = request.app[RUNTIME].checker
    body = await request.read()
    return json_response(await checker.refund(checker.decode_refund(body)))


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz: the process answers (and which worker process it is)."""
    return json_response(Health(status="ok", pid=os.getpid()))


async def readyz(request: web.Request) -> web.Response:
    """GET /readyz: Redis answers and the scripts are loaded."""
    runtime = request.app[RUNTIME]
    ready = await runtime.limiter.ready()  # 503 at once while the circuit is open
    body = Readiness(status="ready" if ready else "unavailable", store=runtime.store.kind,
                     breaker=runtime.limiter.breaker.state)
    return json_response(body, status=200 if ready else 503)


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
                          metrics=metrics)
        # one Redis pipeline per event-loop tick instead of one round trip per check
        limiter.scripts = coalesced(limiter.scripts, live.redis, limiter.timeout)
        # the hot paths' answers to a script call's checks leave as soon as they are all made
        app[OUTBOX] = outbox = Outbox(asyncio.get_running_loop())
        if isinstance(limiter.scripts.check, Coalescer):
            limiter.scripts.check.after_settle.append(outbox.flush)
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
    hot: dict[tuple[str, str], HotHandler] = {("POST", "/v1/check"): _hot_check,
                                              ("POST", "/v1/check/batch"): _hot_check_batch}
    app[HOT_PATHS] = hot
    app.router.add_post("/v1/refund", refund)
    from .proxy import add_routes as add_proxy_routes  # here: proxy.py imports RUNTIME from us
    add_proxy_routes(app)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    return app
