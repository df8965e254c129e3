"""What the server answers, as data: a status, headers and a body.

Handlers build an ``Answer`` and aiohttp sends it (``response``). Client errors become their
JSON 4xx here (``error_answer``), so every path answers bad input alike; their sentences are
the server's own, never the client's text.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import msgspec
from aiohttp import web

from .errors import BadRequest
from .wire import ErrorBody

__all__ = ["CLIENT_ERRORS", "JSON", "MAX_BODY", "Answer", "error_answer", "json_answer",
           "response"]

MAX_BODY = 64 * 1024
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
        return json_answer(ErrorBody(error=f"the request body is larger than "
                                           f"{MAX_BODY // 1024} KiB"), status=413)
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
