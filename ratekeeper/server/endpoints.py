"""The server's own endpoints: checks, refunds, health, readiness, metrics and the spec."""

from __future__ import annotations

import os

import msgspec
from aiohttp import web

from ratekeeper.api.headers import rate_limit_headers
from ratekeeper.api.spec import openapi_document
from ratekeeper.api.wire import BatchResponse, Decision, Health, Readiness
from ratekeeper.server import origin
from ratekeeper.server.http import JSON, Answer, json_response, response
from ratekeeper.server.state import RUNTIME
from ratekeeper.server.warmup import WORKERS
from ratekeeper.settings import Settings

__all__ = ["add_routes", "check_response"]

_encode = msgspec.json.Encoder().encode


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


def add_routes(app: web.Application, settings: Settings) -> None:
    """Serve the endpoints above on ``app`` (the origin's behind ``settings.origin_tokens``)."""
    app.router.add_post("/v1/check", check)
    app.router.add_post("/v1/check/batch", check_batch)
    app.router.add_post("/v1/refund", refund)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    origin.add_routes(app, settings.origin_tokens)
