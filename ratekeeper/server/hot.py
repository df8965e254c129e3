"""The check endpoints' own answers: ``POST /v1/check`` and ``POST /v1/check/batch``, read by a
connection's guard (``server/guard.py``) and answered here as HTTP bytes, without aiohttp.

These two endpoints carry nearly all of the origin's traffic, and most of what a request
costs in aiohttp (its request and response objects, the router, the middleware, the access
log) buys them nothing: their input is one JSON body and their answer one JSON body with the
RateLimit headers. The guard already parses every request with httptools to enforce the
edge; for these two it keeps the body and asks the worker's ``HotLane`` for the answer. The
lane decides through the same ``Checker.check_batch`` and ``Checker.check`` that the aiohttp
routes of the same paths use (a test client serves those), encodes the same ``Decision`` with
msgspec, and writes the same headers. Every other request goes to aiohttp.

The checks that arrive in one tick of the event loop, on any connection, are decided as one
batch: one task, one pass through the checker and one Redis write for all of them, where a
task per request would cost a check a quarter more CPU. They are independent requests, so
any order is a true one; the batch's is the order they arrived in. A batch is all or
nothing on bad input (``check_batch`` validates every request before deciding any), so
when one of them is bad the tick's checks are decided one by one instead, and only the bad
one gets its 400.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from email.utils import formatdate
from typing import Any, NamedTuple

import msgspec
from aiohttp import web

from ratekeeper.api.headers import rate_limit_lines
from ratekeeper.api.wire import BatchResponse, Decision, ErrorBody
from ratekeeper.decision.checker import Checker
from ratekeeper.errors import BadRequest
from ratekeeper.server.http import MAX_BODY, TOO_LARGE_TEXT
from ratekeeper.server.state import RUNTIME, STOPPING

__all__ = ["BATCH", "CHECK", "CONTINUE", "HotLane", "Pending", "Reply", "hot_kind", "reply_to"]

log = logging.getLogger("ratekeeper.server")

CHECK, BATCH = 1, 2  # the endpoints a lane answers
_TARGETS = {b"/v1/check": CHECK, b"/v1/check/batch": BATCH}
_encode = msgspec.json.Encoder().encode

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def hot_kind(method: bytes, target: bytes) -> int:
    """Which endpoint a lane answers for this request line, or 0 when aiohttp does."""
    return _TARGETS.get(target, 0) if method == b"POST" else 0


class Reply(NamedTuple):
    """An answer before it is put on the wire: its status, extra header lines (CRLF-ended),
    JSON body, and whether the connection must end after it."""

    status: int
    headers: bytes
    body: bytes
    ends: bool = False


class Pending:
    """An answer being decided; ``done`` hears when its ``reply`` is in."""

    __slots__ = ("done", "reply")

    def __init__(self, done: Callable[[Pending], None]) -> None:
        self.done = done
        self.reply: Reply | None = None

    def settle(self, reply: Reply) -> None:
        self.reply = reply
        self.done(self)


class HotLane:
    """One worker's answers to the check endpoints, for the app's live checker."""

    __slots__ = ("_date", "_second", "_tasks", "_tick", "app", "stopping")

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.stopping = app[STOPPING]
        self._tick: list[tuple[Any, Pending]] = []  # the checks of this tick, in order
        self._tasks: set[asyncio.Task[None]] = set()  # (the loop keeps weak references)
        self._second = 0
        self._date = b""

    def answer(self, kind: int, body: bytes | bytearray, done: Callable[[Pending], None]
               ) -> Reply | Pending:
        """The answer to one request: at once when its input is bad, else the ``Pending``
        that ``done`` hears of once it is decided."""
        if len(body) > MAX_BODY:
            return _error(413, TOO_LARGE_TEXT, ends=True)
        checker = self.app[RUNTIME].checker
        pending = Pending(done)
        try:
            if kind == CHECK:
                request = checker.decode(body)
                if not self._tick:  # the task begins at the loop's next turn, with the tick's
                    self._start(self._decide_tick())
                self._tick.append((request, pending))
            else:
                self._start(self._batch(checker, checker.decode_batch(body), pending))
        except BadRequest as exc:
            return _error(400, str(exc))
        return pending

    def _start(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _decide_tick(self) -> None:
        checks, self._tick = self._tick, []
        checker = self.app[RUNTIME].checker
        requests = [request for request, _ in checks]
        replies: Sequence[Reply]
        try:
            try:
                replies = [reply_to(d) for d in await checker.check_batch(requests)]
            except BadRequest:  # one of them is bad: each alone, so only it is refused
                replies = await asyncio.gather(*(_check(checker, r) for r in requests))
        except Exception as exc:
            replies = [_failed(exc)] * len(checks)
        for (_, pending), reply in zip(checks, replies, strict=True):
            _settle(pending, reply)

    @staticmethod
    async def _batch(checker: Checker, requests: list[Any], pending: Pending) -> None:
        try:
            reply = Reply(200, b"", _encode(BatchResponse(
                results=await checker.check_batch(requests))))
        except BadRequest as exc:
            reply = _error(400, str(exc))
        except Exception as exc:
            reply = _failed(exc)
        _settle(pending, reply)

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


def _settle(pending: Pending, reply: Reply) -> None:
    """Give ``pending`` its reply; a connection that fails to take it fails alone."""
    try:
        pending.settle(reply)
    except Exception:
        log.exception("an answer could not be written")


def reply_to(decision: Decision) -> Reply:
    """The answer to a check: the Decision's JSON and its RateLimit headers, the bytes the
    aiohttp route of the same path sends (``endpoints.check_response``)."""
    return Reply(200, rate_limit_lines(decision), _encode(decision))


async def _check(checker: Checker, request: Any) -> Reply:
    try:
        return reply_to(await checker.check(request))
    except BadRequest as exc:
        return _error(400, str(exc))


def _error(status: int, message: str, *, ends: bool = False) -> Reply:
    return Reply(status, b"", _encode(ErrorBody(error=message)), ends)


def _failed(exc: BaseException) -> Reply:
    """The answer when deciding raised what no client input can: logged, then a 500."""
    log.error("a check could not be answered", exc_info=exc)
    return _error(500, "internal server error", ends=True)


_STATUS = {200: b"200 OK", 400: b"400 Bad Request", 413: b"413 Request Entity Too Large",
           500: b"500 Internal Server Error"}
