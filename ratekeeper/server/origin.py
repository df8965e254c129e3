"""The origin's own endpoints: its kill switches to read, an action's windows read exactly,
and counters to clear.

``GET /v1/origin/flags`` lists every flag as this process knows it (no Redis call: flags are
synced in the background), for banners and behaviour switches. ``POST /v1/origin/state`` is a
look (cost 0) at an action that Redis answers, never the local cache, so every figure is
Redis's now (a cached denial keeps the remaining hits Redis gave when it denied).
``POST /v1/origin/clear`` deletes an action's counters for some subjects, the way an
application forgives a user after a success (a verified email, a finished password reset).

Each needs a credential of its own, ``RATEKEEPER_ORIGIN_TOKEN`` (several, comma-separated, while
one is being rotated), sent as ``Authorization: Bearer``. The check port may be reachable by
clients (a proxy that forwards too much, a sidecar bound wide): without that token a client
could clear its own counters. Clears stay narrow even with it: only an action the config marks
``clearable = true``, only its counters (penalty boxes and bans are the admins'), and outside
the admin audit trail, which records what people do. With no token set, these endpoints answer
401 to everyone.
"""

from __future__ import annotations

from aiohttp import web

from ratekeeper.api.wire import FlagStates, OriginFlag
from ratekeeper.decision.checker import NotClearable
from ratekeeper.server.auth import TokenAuth
from ratekeeper.server.http import Handler, error_response, json_response, unauthorized
from ratekeeper.server.state import RUNTIME
from ratekeeper.settings import AdminToken

__all__ = ["ORIGIN_AUTH", "ORIGIN_TOKEN_ENV", "add_routes"]

ORIGIN_TOKEN_ENV = "RATEKEEPER_ORIGIN_TOKEN"
ORIGIN_AUTH = web.AppKey("origin_auth", TokenAuth)
NO_TOKEN = ("a valid origin token is required (Authorization: Bearer <token>, one of the "
            f"sidecar's {ORIGIN_TOKEN_ENV})")


def _origin_only(handler: Handler) -> Handler:
    """``handler`` behind the origin token: a 401 for anyone else, before the body is read."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        if request.app[ORIGIN_AUTH].authenticate(request.headers.get("Authorization")) is None:
            return unauthorized(NO_TOKEN, "ratekeeper-origin")
        return await handler(request)

    return guarded


@_origin_only
async def flags(request: web.Request) -> web.Response:
    """GET /v1/origin/flags: every declared flag, on or off, with its message."""
    runtime = request.app[RUNTIME]
    board = runtime.flags
    now = runtime.checker.wall()
    listed = []
    for state in board.all():
        on = state.is_on(now)
        listed.append(OriginFlag(name=state.name, enabled=on,
                                 message=board.message_for(state),
                                 notify=board.declared[state.name].notify,
                                 assumed=state.assumed,
                                 expires_at=state.expires_at if on else None))
    return json_response(FlagStates(flags=listed))


@_origin_only
async def state(request: web.Request) -> web.Response:
    """POST /v1/origin/state: a look at an action (a check's body; its cost is not read),
    answered by Redis."""
    checker = request.app[RUNTIME].checker
    return json_response(await checker.state(checker.decode(await request.read())))


@_origin_only
async def clear(request: web.Request) -> web.Response:
    """POST /v1/origin/clear: delete a clearable action's counters for the subjects given (a
    check's body; its cost is not read)."""
    checker = request.app[RUNTIME].checker
    try:
        result = await checker.clear(checker.decode(await request.read()))
    except NotClearable as exc:
        return error_response(403, str(exc))
    return json_response(result)


def add_routes(app: web.Application, tokens: tuple[bytes, ...]) -> None:
    """Serve the origin endpoints on ``app``, behind ``tokens`` (``Settings.origin_tokens``;
    none: every request is refused)."""
    app[ORIGIN_AUTH] = TokenAuth(AdminToken("origin", token.decode()) for token in tokens)
    app.router.add_get("/v1/origin/flags", flags)
    app.router.add_post("/v1/origin/state", state)
    app.router.add_post("/v1/origin/clear", clear)
