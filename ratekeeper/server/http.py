"""What the server answers, as data: a status, headers and a body.

Handlers build an ``Answer`` and aiohttp sends it (``response``). Client errors become their
JSON 4xx here (``error_answer``), so every path answers bad input alike; their sentences are
the server's own, never the client's text.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NamedTuple

import msgspec
from aiohttp import web
from aiohttp.typedefs import Middleware

from ratekeeper.api.wire import ErrorBody
from ratekeeper.errors import BadRequest

__all__ = ["CLIENT_ERRORS", "JSON", "MAX_BODY", "TOO_LARGE_TEXT", "Answer", "Handler",
           "error_answer", "error_middleware", "error_response", "json_answer", "json_response",
           "response", "unauthorized"]

MAX_BODY = 64 * 1024
TOO_LARGE_TEXT = f"the request body is larger than {MAX_BODY // 1024} KiB"  # (its 413's)
JSON = "application/json"
_encode = msgspec.json.Encoder().encode

# what a client's request can make a handler raise; each becomes a 4xx (``error_answer``)
CLIENT_ERRORS = (BadRequest, web.HTTPException, web.RequestPayloadError)


class Answer(NamedTuple):
    """One HTTP answer; Content-Length, Date and Server are added when it is sent."""

    status: int
    headers: Mapping[str, str]
    body: bytes = b""


def json_answer(body: Any, *, status: int = 200) -> Answer:
    """A JSON answer encoded by msgspec."""
    return Answer(status, {"Content-Type": JSON}, _encode(body))


def error_answer(exc: BadRequest | web.HTTPException | web.RequestPayloadError) -> Answer:
    """The JSON ``{"error": ...}`` answer for a client error; a redirect or success is
    re-raised."""
    if isinstance(exc, BadRequest):
        return json_answer(ErrorBody(error=str(exc)), status=400)
    if isinstance(exc, web.RequestPayloadError):  # e.g. a gzip body that is not gzip
        return json_answer(ErrorBody(error="the request body could not be decoded"), status=400)
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return json_answer(ErrorBody(error=TOO_LARGE_TEXT), status=413)
    if exc.status < 400:
        raise exc
    answer = json_answer(ErrorBody(error=exc.reason), status=exc.status)
    allow = exc.headers.get("Allow")
    if allow is not None:  # a 405 must say which methods the path takes (RFC 9110 15.5.6)
        return answer._replace(headers={**answer.headers, "Allow": allow})
    return answer


def response(answer: Answer) -> web.Response:
    """``answer`` for aiohttp to send."""
    return web.Response(status=answer.status, headers=answer.headers, body=answer.body or None)


def json_response(body: Any, *, status: int = 200) -> web.Response:
    """A JSON response encoded by msgspec."""
    return response(json_answer(body, status=status))


def error_response(status: int, message: str) -> web.Response:
    """A 4xx with ``{"error": message}``."""
    return json_response(ErrorBody(error=message), status=status)


def unauthorized(message: str, realm: str) -> web.Response:
    """The 401 for a request without a valid bearer token of ``realm``."""
    answer = error_response(401, message)
    answer.headers["WWW-Authenticate"] = f'Bearer realm="{realm}"'
    return answer


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
