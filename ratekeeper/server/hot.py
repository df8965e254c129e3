"""The check endpoints' own answers: ``POST /v1/check`` and ``POST /v1/check/batch``, read by a
connection's guard (``server/guard.py``) and answered here as HTTP bytes, without aiohttp.

These two endpoints carry nearly all of the origin's traffic, and most of what a request
costs in aiohttp (its request and response objects, the router, the middleware, the access
log) buys them nothing: their input is one JSON body and their answer one JSON body with the
RateLimit headers. The guard already parses every request with httptools to enforce the
edge; for these two it keeps the body and asks a ``HotLane`` for the answer, which decides
through the same ``Checker.check`` and ``Checker.check_batch`` that the aiohttp routes of
the same paths use (a test client serves those), encodes the same ``Decision`` with msgspec,
and writes the same headers. Every other request goes to aiohttp.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Coroutine
from email.utils import formatdate
from typing import Any, NamedTuple

import msgspec
from aiohttp import web

from ratekeeper.api.headers import rate_limit_headers
from ratekeeper.api.wire import BatchResponse, ErrorBody
from ratekeeper.decision.checker import Checker
from ratekeeper.errors import BadRequest
from ratekeeper.server.http import MAX_BODY
from ratekeeper.server.state import RUNTIME, STOPPING

__all__ = ["BATCH", "CHECK", "CONTINUE", "HotLane", "Reply", "error", "failed", "hot_kind"]

log = logging.getLogger("ratekeeper.server")

CHECK, BATCH = 1, 2  # the endpoints a lane answers
_TARGETS = {b"/v1/check": CHECK, b"/v1/check/batch": BATCH}
_encode = msgspec.json.Encoder().encode

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def hot_kind(method: bytes, target: bytes) -> int:
    """Which endpoint a lane answers for this request line, or 0 when aiohttp does."""
    return _TARGETS.get(target, 0) if method == b"POST" else 0


class HotLane:
    """One worker's answers to the check endpoints, for the app's live checker."""

    __slots__ = ("_date", "_second", "app", "stopping")

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.stopping = app[STOPPING]
        self._second = 0
        self._date = b""

    def answer(self, kind: int, body: bytes) -> Reply | Coroutine[Any, Any, Reply]:
        """The answer to one request: at once when its input is bad, else the coroutine that
        decides it."""
        if len(body) > MAX_BODY:
            return error(413, f"the request body is larger than {MAX_BODY // 1024} KiB",
                         ends=True)
        checker = self.app[RUNTIME].checker
        try:
            if kind == CHECK:
                return _check(checker, checker.decode(body))
            return _batch(checker, checker.decode_batch(body))
        except BadRequest as exc:
            return error(400, str(exc))

    def render(self, reply: Reply, close: bool) -> bytes:
        """``reply`` as HTTP/1.1 bytes, saying whether the connection ends after it."""
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._date = formatdate(now, usegmt=True).encode()
        connection = b"close" if close else b"keep-alive"
        return (b"HTTP/1.1 %s\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n"
                b"Date: %s\r\nConnection: %s\r\n\r\n%s"
                % (_STATUS[reply.status], reply.headers, len(reply.body), self._date, connection,
                   reply.body))


class Reply(NamedTuple):
    """An answer before it is put on the wire: its status, extra header lines (CRLF-ended),
    JSON body, and whether the connection must end after it."""

    status: int
    headers: bytes
    body: bytes
    ends: bool = False


def error(status: int, message: str, *, ends: bool = False) -> Reply:
    """A JSON ``{"error": message}`` answer."""
    return Reply(status, b"", _encode(ErrorBody(error=message)), ends)


def failed(exc: BaseException) -> Reply:
    """The answer when deciding raised what no client input can: logged, then a 500."""
    log.error("a check could not be answered", exc_info=exc)
    return error(500, "internal server error", ends=True)


async def _check(checker: Checker, request: Any) -> Reply:
    try:
        decision = await checker.check(request)
    except BadRequest as exc:
        return error(400, str(exc))
    lines = "".join(f"{name}: {value}\r\n" for name, value in rate_limit_headers(decision).items())
    return Reply(200, lines.encode(), _encode(decision))


async def _batch(checker: Checker, requests: list[Any]) -> Reply:
    try:
        decisions = await checker.check_batch(requests)
    except BadRequest as exc:
        return error(400, str(exc))
    return Reply(200, b"", _encode(BatchResponse(results=decisions)))


_STATUS = {200: b"200 OK", 400: b"400 Bad Request", 413: b"413 Request Entity Too Large",
           500: b"500 Internal Server Error"}
