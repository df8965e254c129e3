"""Every connection is guarded (`ratekeeper.server.guard`): a request must arrive whole in time, a
malformed one gets the JSON 400 and nothing of what it sent, an oversized `Expect:
100-continue` gets its 413 at once, and a worker at its connection cap closes idle
connections so that new clients get in. In-process against real Redis, then against real
`ratekeeper serve` processes (uvloop, a low descriptor limit)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ratekeeper.server.guard import FIELD_MAX, RESERVED_FILES, connection_cap
from ratekeeper.settings import Settings

from support.common import ONE_RULE, SALT
from support.edge import (
    CLOSED,
    Launched,
    exchange,
    get,
    guarded_server,
    parse_reply,
    post,
    read_reply,
    read_to_end,
)
from support.redis_servers import RedisServer

RULES = ONE_RULE.format(limit="1000 per minute", algorithm="sliding-log")
CHECK = b'{"action": "a", "ip": "192.0.2.7"}'
MALFORMED = {"error": "malformed HTTP request"}
MARK = "Zq7MARK"  # in every malformed request: never in an answer or a log line
MARKB = MARK.encode()

BAD_REQUESTS = {
    "bad request line": f"{MARK} / HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    "no version": f"GET /{MARK}\r\n\r\n".encode(),
    "unknown version": f"GET /{MARK} HTTP/3.0\r\nHost: x\r\n\r\n".encode(),
    "header without colon": f"GET / HTTP/1.1\r\nHost: x\r\n{MARK} here\r\n\r\n".encode(),
    "space before colon": f"GET / HTTP/1.1\r\nHost: x\r\n{MARK} : 1\r\n\r\n".encode(),
    "control character": f"GET / HTTP/1.1\r\nHost: x\r\nX-A: {MARK}\x01\r\n\r\n".encode(),
    "bare LF": f"GET / HTTP/1.1\nHost: x\nX-A: {MARK}\n\n".encode(),
    "folded header": f"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n {MARK}\r\n\r\n".encode(),
    "invalid chunk size": (f"POST /v1/check HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
                           f"\r\n\r\nzz{MARK}\r\n{{}}\r\n0\r\n\r\n").encode(),
    "chunk without CRLF": (f"POST /v1/check HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
                           f"\r\n\r\n2\r\n{{}}{MARK}0\r\n\r\n").encode(),
    "length and chunked": (f"POST /v1/check HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                           f"Transfer-Encoding: chunked\r\nX-A: {MARK}\r\n\r\n2\r\n{{}}\r\n0"
                           f"\r\n\r\n").encode(),
    "oversized header": (f"GET / HTTP/1.1\r\nHost: x\r\nX-A: {MARK}" + "a" * FIELD_MAX
                         + "\r\n\r\n").encode(),
    "oversized target": f"GET /{MARK}{'a' * 9000} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    "oversized trailer": ("POST /v1/refund HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
                          f"\r\n\r\n2\r\n{{}}\r\n0\r\nX-A: {MARK}" + "a" * FIELD_MAX
                          + "\r\n\r\n").encode(),
    "too many trailers": ("POST /v1/refund HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
                          "\r\n\r\n2\r\n{}\r\n0\r\n"
                          + "".join(f"X-{MARK}-{i}: 1\r\n" for i in range(200))
                          + "\r\n").encode(),
    "too many headers": ("GET / HTTP/1.1\r\nHost: x\r\n"
                         + "".join(f"X-{MARK}-{i}: 1\r\n" for i in range(200)) + "\r\n").encode(),
    "oversized head": ("GET / HTTP/1.1\r\nHost: x\r\n"
                       + "".join(f"X-{i}: {MARK}{'a' * 8000}\r\n" for i in range(9))
                       + "\r\n").encode(),
    "no Host": f"GET /{MARK} HTTP/1.1\r\n\r\n".encode(),
    "two Hosts": f"GET / HTTP/1.1\r\nHost: a\r\nHost: {MARK}\r\n\r\n".encode(),
    "two lengths": (f"POST /v1/check HTTP/1.1\r\nHost: x\r\nX-A: {MARK}\r\nContent-Length: 2"
                    f"\r\nContent-Length: 2\r\n\r\n{{}}").encode(),
    "bad target": f"GET {MARK} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    "undecodable host": f"GET http://xn--/{MARK} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    "CONNECT": f"CONNECT {MARK}.example:443 HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    "TLS hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + MARKB,
}


def assert_quiet(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing from aiohttp at WARNING or above, no traceback, and nothing a client sent,
    in the log."""
    for record in caplog.records:
        assert not (record.name.startswith("aiohttp") and record.levelno >= logging.WARNING), (
            record.getMessage())
        assert not record.exc_info, record.getMessage()
        assert MARK not in record.getMessage()


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
async def test_a_malformed_request_gets_the_json_400_then_the_connection_closes(
        settings: Settings, caplog: pytest.LogCaptureFixture, name: str) -> None:
    """The answer is the JSON 400 with `Connection: close`, it repeats none of the request,
    the connection then closes, and aiohttp logs nothing about it."""
    caplog.set_level(logging.DEBUG)
    async with guarded_server(settings, RULES) as server:
        raw = await exchange(server.port, BAD_REQUESTS[name])
    reply = parse_reply(raw)
    assert reply.status == 400
    assert msgspec.json.decode(reply.body) == MALFORMED
    assert reply.headers["content-type"] == "application/json"
    assert reply.headers["connection"] == "close"
    assert MARKB not in raw
    assert raw.count(b"HTTP/1.1 ") == 1 and raw.endswith(reply.body)  # then it closed
    assert_quiet(caplog)


async def test_requests_before_a_malformed_one_are_answered_first(
        settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    """Two checks pipelined in one write are both answered; a malformed request sent after
    them is answered with the 400, in order, and the connection then closes."""
    async with guarded_server(settings, RULES) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(post("/v1/check", CHECK) * 2)
        first, second = await read_reply(reader), await read_reply(reader)
        writer.write(BAD_REQUESTS["header without colon"])
        rest = await read_to_end(reader)
        writer.close()
    assert (first.status, second.status) == (200, 200)
    remaining = [msgspec.json.decode(r.body)["limits"][0]["remaining"] for r in (first, second)]
    assert remaining == [999, 998]
    assert parse_reply(rest).status == 400
    assert_quiet(caplog)


async def test_expect_100_continue_over_64_kib_gets_the_413_at_once(
        settings: Settings) -> None:
    """No `100 Continue` comes first: the client never sends the body it announced."""
    async with guarded_server(settings, RULES) as server:
        raw = await exchange(server.port, post("/v1/check", b"", "Expect: 100-continue")
                             .replace(b"Content-Length: 0", b"Content-Length: 65537"))
    reply = parse_reply(raw)
    assert reply.status == 413 and b"100 Continue" not in raw
    assert msgspec.json.decode(reply.body) == {"error": "the request body is larger than 64 KiB"}


async def test_expect_100_continue_within_64_kib_is_answered_as_usual(
        settings: Settings) -> None:
    """`100 Continue`, then, once the body has come, the decision."""
    async with guarded_server(settings, RULES) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        request = post("/v1/check", CHECK, "Expect: 100-continue")
        head = request[:-len(CHECK)]
        writer.write(head)
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(CHECK)
        reply = await read_reply(reader)
        writer.close()
    assert reply.status == 200 and msgspec.json.decode(reply.body)["allowed"]


async def test_an_unknown_expectation_gets_417_without_its_text(settings: Settings) -> None:
    """aiohttp would answer `Unknown Expect: <what the client sent>`."""
    async with guarded_server(settings, RULES) as server:
        raw = await exchange(server.port, post("/v1/check", CHECK, f"Expect: {MARK}"))
    reply = parse_reply(raw)
    assert reply.status == 417 and MARKB not in raw


async def test_a_405_says_which_methods_are_allowed(settings: Settings) -> None:
    """GET on the POST-only /v1/check: 405 with `Allow: POST`."""
    async with guarded_server(settings, RULES) as server:
        raw = await exchange(server.port, get("/v1/check", "Connection: close"))
    reply = parse_reply(raw)
    assert reply.status == 405
    assert reply.headers.get("allow") == "POST"


# ------------------------------------------------------------------------------ deadlines

TIMEOUT = 0.3  # the request timeout of the tests below, in seconds


async def test_a_head_that_never_ends_is_closed_with_408(settings: Settings) -> None:
    """Slowloris: a head sent up to its last header line and no further."""
    async with guarded_server(settings, RULES, timeout=TIMEOUT) as server:
        raw = await exchange(server.port, post("/v1/check", CHECK)[:40])
    assert parse_reply(raw).status == 408


async def test_a_body_that_never_ends_is_closed_with_408(settings: Settings) -> None:
    """Half of the body the Content-Length announced, then nothing."""
    async with guarded_server(settings, RULES, timeout=TIMEOUT) as server:
        raw = await exchange(server.port, post("/v1/check", CHECK)[:-10])
        assert len(server.gate) == 0  # (aiohttp's handler waiting for it has ended too)
    assert parse_reply(raw).status == 408


async def test_a_head_sent_a_byte_at_a_time_does_not_buy_more_time(
        settings: Settings) -> None:
    """Each byte comes well within the timeout; the head as a whole does not."""
    request = get("/healthz") + b"X-Pad: " + b"a" * 100 + b"\r\n\r\n"
    async with guarded_server(settings, RULES, timeout=TIMEOUT) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        for sent in range(1, len(request) + 1):
            writer.write(request[sent - 1:sent])
            if await _closed_within(reader, TIMEOUT / 10):
                break
        writer.close()
    assert sent < len(request)


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    try:
        async with asyncio.timeout(seconds):
            await reader.read(65536)
            return True
    except TimeoutError:
        return False


async def test_a_connection_that_sends_nothing_is_closed_without_an_answer(
        settings: Settings) -> None:
    """A connection opened and left silent is closed; there is no request to answer."""
    async with guarded_server(settings, RULES, timeout=TIMEOUT) as server:
        assert await exchange(server.port, b"") == CLOSED


async def test_an_idle_keepalive_connection_is_not_timed_out(settings: Settings) -> None:
    """The timeout is for a request coming in: between requests a connection may rest."""
    async with guarded_server(settings, RULES, timeout=TIMEOUT) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(get("/healthz"))
        assert (await read_reply(reader)).status == 200
        assert not await _closed_within(reader, 3 * TIMEOUT)
        writer.write(get("/healthz"))
        assert (await read_reply(reader)).status == 200
        writer.close()


# ------------------------------------------------------------------------------ the cap

async def test_at_the_cap_the_longest_idle_connection_makes_room(settings: Settings) -> None:
    """Four idle connections fill a cap of four: a fifth client is answered, and the
    connection idle longest is the one closed for it."""
    async with guarded_server(settings, RULES, limit=4) as server:
        idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(4)]
        await _until(lambda: len(server.gate) == 4)
        raw = await exchange(server.port, get("/healthz", "Connection: close"))
        assert parse_reply(raw).status == 200
        assert await read_to_end(idle[0][0]) == CLOSED  # the longest idle
        idle[0][1].close()
        for reader, writer in idle[1:]:
            assert not reader.at_eof()
            writer.write(get("/healthz"))
            assert (await read_reply(reader)).status == 200
            writer.close()


async def test_at_the_cap_a_connection_with_a_request_coming_in_is_never_closed(
        settings: Settings) -> None:
    """Four connections each in the middle of a request fill a cap of four: a fifth client
    waits (its connection is not taken) until one of them ends, and then is answered."""
    async with guarded_server(settings, RULES, limit=4) as server:
        busy = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(4)]
        for _, writer in busy:
            writer.write(post("/v1/check", CHECK)[:30])
        await _until(lambda: len(server.gate) == 4 and not server.gate.idle)
        waiting = asyncio.ensure_future(exchange(server.port, get("/healthz", "Connection: close")))
        done, _ = await asyncio.wait([waiting], timeout=0.3)
        assert not done
        busy[0][1].write(post("/v1/check", CHECK)[30:])
        assert (await read_reply(busy[0][0])).status == 200
        busy[0][1].close()
        assert parse_reply(await waiting).status == 200
        for reader, writer in busy[1:]:
            assert not reader.at_eof()
            writer.close()


async def _until(condition: object, timeout: float = 5.0) -> None:
    assert callable(condition)
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def test_the_default_cap_leaves_descriptors_for_the_rest() -> None:
    """A configured cap is taken as it is; the default is below RLIMIT_NOFILE by a reserve."""
    import resource

    assert connection_cap(123) == 123
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert 0 < connection_cap() <= soft - RESERVED_FILES


def test_the_settings_of_the_edge_are_read_from_the_environment() -> None:
    """RATEKEEPER_REQUEST_TIMEOUT_MS, RATEKEEPER_MAX_CONNECTIONS and RATEKEEPER_WARMUP_MS."""
    defaults = Settings.from_env({})
    assert (defaults.request_timeout_ms, defaults.max_connections, defaults.warmup_ms) == (
        10_000, 0, 10_000)
    chosen = Settings.from_env({"RATEKEEPER_REQUEST_TIMEOUT_MS": "250",
                                "RATEKEEPER_MAX_CONNECTIONS": "64", "RATEKEEPER_WARMUP_MS": "0"})
    assert (chosen.request_timeout_ms, chosen.max_connections, chosen.warmup_ms) == (250, 64, 0)


# ------------------------------------------------------------------------------ fuzzing

GOOD = [post("/v1/check", CHECK), get("/healthz"),
        post("/v1/check", CHECK).replace(b"Content-Length: 34", b"Transfer-Encoding: chunked")
        .replace(CHECK, b"22\r\n" + CHECK + b"\r\n0\r\n\r\n")]


@st.composite
def mangled(draw: st.DrawFn) -> bytes:
    """A good request with a few bytes changed, inserted or removed."""
    data = bytearray(draw(st.sampled_from(GOOD)))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data) - 1))
        how = draw(st.sampled_from(["set", "insert", "delete"]))
        byte = draw(st.sampled_from([0, 1, 9, 10, 13, 32, 34, 44, 58, 127, 200, 255, 0x4D]))
        if how == "set":
            data[at] = byte
        elif how == "insert":
            data.insert(at, byte)
        else:
            del data[at]
    return bytes(data) + get("/healthz", "Connection: close")


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=mangled())
async def test_whatever_arrives_aiohttp_logs_no_parse_error(
        settings: Settings, caplog: pytest.LogCaptureFixture, request: bytes) -> None:
    """Mangled requests, each followed by a good one: whatever the guard lets through aiohttp
    parses without an error of its own (its answers are the app's: JSON, never its text/plain
    error page), and nothing is logged at WARNING or above."""
    caplog.clear()
    async with guarded_server(settings, RULES, timeout=TIMEOUT) as server:
        raw = await exchange(server.port, request)
    assert raw.startswith(b"HTTP/1.1 ")
    assert b"text/plain" not in raw
    assert_quiet(caplog)


# ------------------------------------------------------------------------ real processes

def env_for(redis_server: RedisServer, key_prefix: str, **extra: str) -> dict[str, str]:
    return {"RATEKEEPER_REDIS_URL": redis_server.url, "RATEKEEPER_IP_SALT": SALT.decode(),
            "RATEKEEPER_KEY_PREFIX": key_prefix, **extra}


@pytest.mark.slow
async def test_a_served_worker_guards_its_connections(
        tmp_path: Path, redis_server: RedisServer, key_prefix: str) -> None:
    """`ratekeeper serve` (uvloop, its own site even with one worker): a slow head and a slow
    body are closed with 408, a malformed request gets the JSON 400, and the log holds no
    traceback and nothing the clients sent."""
    server = Launched(tmp_path, RULES, env_for(redis_server, key_prefix,
                                               RATEKEEPER_REQUEST_TIMEOUT_MS="300"))
    try:
        server.wait_serving()
        slow_head, slow_body, malformed, good = await asyncio.gather(
            exchange(server.port, post("/v1/check", CHECK)[:40]),
            exchange(server.port, post("/v1/check", CHECK)[:-10]),
            exchange(server.port, BAD_REQUESTS["invalid chunk size"]),
            exchange(server.port, post("/v1/check", CHECK, "Connection: close")))
    finally:
        log = server.stop()
    assert [parse_reply(raw).status for raw in (slow_head, slow_body, malformed, good)] == [
        408, 408, 400, 200]
    assert "Traceback" not in log and MARK not in log and "192.0.2.7" not in log


@pytest.mark.slow
async def test_an_idle_socket_flood_under_a_low_file_limit_locks_out_no_client(
        tmp_path: Path, redis_server: RedisServer, key_prefix: str) -> None:
    """250 idle connections against a worker allowed 200 files: a new client is still
    answered (the worker closes idle connections at its cap instead of running out of
    descriptors and accepting nobody)."""
    server = Launched(tmp_path, RULES, env_for(redis_server, key_prefix), files=200)
    flood: list[asyncio.StreamWriter] = []
    try:
        server.wait_serving()
        for _ in range(250):
            flood.append((await asyncio.open_connection("127.0.0.1", server.port))[1])
        raw = await exchange(server.port, post("/v1/check", CHECK, "Connection: close"),
                             wait=15)
        reply = parse_reply(raw)
        assert reply.status == 200 and msgspec.json.decode(reply.body)["allowed"]
    finally:
        for writer in flood:
            writer.close()
        log = server.stop()
    assert "Traceback" not in log
