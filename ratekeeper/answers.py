"""What the server answers, as data: a status, headers and a body.

aiohttp sends an ``Answer`` on the routed way (``response``); the hot paths write its bytes to
the connection themselves (``wire``, see ``hotpath``). Client errors become their JSON 4xx here,
for both ways, so an answer is the same whichever way its request went.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, NamedTuple

import msgspec
from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

from .errors import BadRequest
from .wire import ErrorBody

__all__ = ["CLIENT_ERRORS", "JSON", "MAX_BODY", "Answer", "error_answer", "json_answer",
           "response", "wire", "wire_head", "wire_tail"]

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
    return json_answer(ErrorBody(error=exc.reason), status=exc.status)


def response(answer: Answer) -> web.Response:
    """``answer`` for aiohttp to send."""
    return web.Response(status=answer.status, headers=answer.headers, body=answer.body or None)


# ----------------------------------------------------------------- written by the hot paths

_REASONS = {status.value: status.phrase for status in HTTPStatus}
_SERVER = f"Server: {SERVER_SOFTWARE}\r\n"  # what aiohttp says on the routed way
_BODILESS = frozenset({204, 304})  # answers that carry no Content-Length (RFC 9110 8.6)


def wire_head(status: int, headers: Mapping[str, str], length: int) -> bytes:
    """An HTTP/1.1 answer's status line and header lines, up to its Date and Server
    (``wire_tail``), in aiohttp's order.

    A name or value with a line break would split the answer, so it is refused; every one
    comes from the server's config and decisions, never from a client.
    """
    lines = [f"{name}: {value}\r\n" for name, value in headers.items()]
    text = "".join(lines)
    if text.count("\n") != len(lines) or text.count("\r") != len(lines):
        raise ValueError(f"a header has a line break: {sorted(headers)}")
    length_line = "" if status in _BODILESS else f"Content-Length: {length}\r\n"
    return f"HTTP/1.1 {status} {_REASONS[status]}\r\n{text}{length_line}".encode()


class _Dates:
    """The Date and Server lines and the blank line after them, made once a second."""

    __slots__ = ("line", "second")

    def __init__(self) -> None:
        self.second = -1
        self.line = b""

    def now(self) -> bytes:
        second = int(time.time())
        if second != self.second:
            self.line = f"Date: {formatdate(second, usegmt=True)}\r\n{_SERVER}\r\n".encode()
            self.second = second
        return self.line


wire_tail = _Dates().now  # the last header lines (Date, Server) and the end of the head


def wire(answer: Answer) -> bytes:
    """``answer`` as the bytes of an HTTP/1.1 response on a connection that stays open."""
    body = answer.body
    return wire_head(answer.status, answer.headers, len(body)) + wire_tail() + body
