"""Log lines: one line per record whatever a client sends, aiohttp's parser errors without
the bytes, the peer or a traceback, and client errors sampled."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from ratekeeper import logs
from ratekeeper.logs import (
    AiohttpFilter,
    JsonFormatter,
    Sampler,
    TextFormatter,
    client_error,
    escape,
)

from support.common import SALT, FakeClock
from support.processes import ServerProcess
from support.redis_servers import RedisServer

FORGED = "/x\n2026-01-01 00:00:00,000 ERROR ratekeeper.admin.api: forged\r\u2028\u0085\x1b[31m"
CONFIG = """
[rules.r]
limit = "5 per minute"
key = ["ip"]
[actions.a]
rules = ["r"]
"""
# requests aiohttp's parser refuses; each carries a marker that must never reach the log
MALFORMED = [
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nrk-marker-header without a colon\r\n\r\n",
    b"GET /rk-marker-path\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Rk: " + b"rk-marker-long" * 1000 + b"\r\n\r\n",
    b"POST /v1/check HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zz-rk-marker\r\n{}\r\n0\r\n\r\n",
    b"rk-marker-method\x7f / HTTP/1.1\r\n\r\n",
]


def record(msg: str, *args: object, **extra: Any) -> logging.LogRecord:
    made = logging.LogRecord("ratekeeper.test", logging.WARNING, __file__, 1, msg, args, None)
    for key, value in extra.items():
        setattr(made, key, value)
    return made


def test_control_characters_are_escaped_in_text_lines() -> None:
    """A newline (or CR, U+2028, NEL, ESC) in the message or a field cannot start a line."""
    line = TextFormatter().format(record("refused %s", FORGED, path=FORGED))
    assert "\n" not in line and "\r" not in line and "\u2028" not in line
    assert "\x1b" not in line and "\x85" not in line
    assert line.splitlines() == [line]
    assert "refused /x\\x0a2026-01-01" in line and "path=/x\\x0a" in line


def test_control_characters_are_escaped_in_json_lines() -> None:
    """The JSON line is one line and still says the same, escaped."""
    line = JsonFormatter().format(record("refused %s", FORGED, fields={"p": [FORGED]}))
    assert line.splitlines() == [line]
    assert "\u2028" not in line and "\x85" not in line
    body = json.loads(line)
    assert body["msg"].startswith("refused /x\\x0a2026")
    assert "\n" not in body["fields"]["p"][0]


def test_a_traceback_is_indented_and_its_message_escaped() -> None:
    """In text, no line of a traceback starts where a record would."""
    try:
        raise ValueError(FORGED)
    except ValueError:
        made = logging.LogRecord("ratekeeper.test", logging.ERROR, __file__, 1, "failed", (),
                                 sys.exc_info())
    lines = TextFormatter().format(made).splitlines()
    assert lines[0].endswith("failed")
    assert all(line.startswith("    ") for line in lines[1:])
    assert not any("forged" in line and not line.startswith("    ") for line in lines)


def test_escape_leaves_ordinary_text_alone() -> None:
    """Printable text, quotes and non-ASCII letters pass as they are."""
    text = "flag read-only turned on by alice: \"ok\" — café"
    assert escape(text) == text
    assert escape("a\tb") == "a\\x09b"


def test_the_sampler_lets_n_per_second_through_and_counts_the_rest() -> None:
    """Three a second per kind: the rest are held back and counted on the next line."""
    clock = FakeClock()
    sampler = Sampler(3, clock=lambda: clock.ms / 1000)
    assert [sampler.admit("a") for _ in range(5)] == [0, 0, 0, None, None]
    assert sampler.admit("b") == 0  # kinds are counted apart
    clock.advance(0.5)
    assert sampler.admit("a") is None
    clock.advance(0.5)
    assert sampler.admit("a") == 3
    assert [sampler.admit("a") for _ in range(3)] == [0, 0, None]


def test_client_error_lines_are_sampled(monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    """Ten refusals of one kind within a second log two lines; the next second's first line
    says eight were held back."""
    clock = FakeClock()
    monkeypatch.setattr(logs, "client_errors", Sampler(2, clock=lambda: clock.ms / 1000))
    log = logging.getLogger("ratekeeper.test")
    caplog.set_level(logging.INFO, logger="ratekeeper.test")
    for _ in range(10):
        client_error(log, "refused", "refused a form")
    assert len(caplog.records) == 2
    clock.advance(1)
    client_error(log, "refused", "refused a form")
    assert len(caplog.records) == 3 and getattr(caplog.records[-1], "suppressed", 0) == 8
    assert caplog.records[0].filename == __file__.rsplit("/", 1)[-1]  # the caller's line


@pytest.fixture
def aiohttp_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[io.StringIO, FakeClock]]:
    """aiohttp.server's records, filtered as configure_logging does, written as text lines
    into a buffer (the filter's sampler on a clock the test moves)."""
    clock = FakeClock()
    logger = logging.getLogger("aiohttp.server")
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(TextFormatter())
    only = AiohttpFilter(Sampler(2, clock=lambda: clock.ms / 1000))
    logger.addFilter(only)
    logger.addHandler(handler)
    monkeypatch.setattr(logger, "level", logging.DEBUG)
    yield buffer, clock
    logger.removeHandler(handler)
    logger.removeFilter(only)


def ask(port: int, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(raw)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


async def test_aiohttp_parser_errors_are_logged_without_bytes_peer_or_traceback(
        aiohttp_logs: tuple[io.StringIO, FakeClock]) -> None:
    """A real aiohttp server refuses each malformed request with a 400; what its server log
    says passes the filter as one line naming the parser's error class only, at most two of
    a kind a second, the next second's first line counting those held back."""
    buffer, clock = aiohttp_logs

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    loop = asyncio.get_running_loop()
    sent = [*MALFORMED, *[MALFORMED[0]] * 3]  # the header line's kind: five in one second
    try:
        for raw in sent:
            reply = await loop.run_in_executor(None, ask, server.port or 0, raw)
            assert reply.split(b"\r\n")[0].split(b" ")[1] == b"400", reply[:100]
        clock.advance(1)
        await loop.run_in_executor(None, ask, server.port or 0, MALFORMED[0])
    finally:
        await server.close()
    text = buffer.getvalue()
    lines = text.splitlines()
    assert "rk-marker" not in text and "Traceback" not in text and "127.0.0.1" not in text
    assert all("aiohttp.server: malformed HTTP request refused (" in line for line in lines)
    assert not any(" ERROR " in line for line in lines), lines
    assert len(lines) < len(sent) + 1
    assert lines[-1].endswith("suppressed=3"), lines


def test_the_access_log_never_passes() -> None:
    """aiohttp's access log would print the peer and the request line: it is dropped."""
    access = logging.LogRecord("aiohttp.access", logging.INFO, __file__, 1,
                               '127.0.0.1 "GET /x HTTP/1.1" 200', (), None)
    assert AiohttpFilter().filter(access) is False


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_real_server_logs_malformed_requests_cleanly(
        serve_process: Callable[..., ServerProcess], redis_server: RedisServer,
        key_prefix: str, fmt: str) -> None:
    """`ratekeeper serve` answers malformed HTTP with a 400; its log, in either format, holds
    none of the bytes sent, no peer address and no traceback, and every line is one record."""
    server = serve_process(CONFIG, {"RATEKEEPER_REDIS_URL": redis_server.url,
                                    "RATEKEEPER_IP_SALT": SALT.decode(),
                                    "RATEKEEPER_KEY_PREFIX": key_prefix,
                                    "RATEKEEPER_LOG_FORMAT": fmt})
    for raw in MALFORMED * 3:
        reply = ask(server.port, raw)
        assert reply.split(b"\r\n")[0].split(b" ")[1] == b"400", reply[:100]
    # a later request answered means the earlier ones were done with, logs included
    assert b" 200 " in ask(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                                        b"Connection: close\r\n\r\n").split(b"\r\n")[0]
    text = server.log.read_text()
    assert "rk-marker" not in text and "Traceback" not in text
    for line in text.splitlines():
        if fmt == "json":
            json.loads(line)
        if "ratekeeper.process.runner" not in line:  # (it says where it listens)
            assert "127.0.0.1" not in line, line
