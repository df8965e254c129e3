"""The check endpoints' own lane (`ratekeeper.server.hot`): a connection whose requests are
checks is answered by its guard, every other request by aiohttp, and a client cannot tell
which. In-process behind a real Gate, against real Redis.

A connection whose first request is not a check is aiohttp's for good, so the same check
sent after a `GET /healthz` is answered by aiohttp's route: that is the reference every
answer of the lane is compared with.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ratekeeper.api.headers import rate_limit_headers
from ratekeeper.api.wire import Decision, LimitState
from ratekeeper.server.hot import reply_to
from ratekeeper.server.state import STOPPING
from ratekeeper.settings import Settings

from support.common import ONE_RULE
from support.edge import Reply, get, guarded_server, post, read_reply, read_to_end
from support.redis_servers import RedisServer

RULES = ONE_RULE.format(limit="3 per minute", algorithm="sliding-log")
MARK = "Zq7MARK"  # client text that must never come back


def check(ip: str, **extra: Any) -> bytes:
    return msgspec.json.encode({"action": "a", "ip": ip, **extra})


def _moment_free(decision: dict[str, Any]) -> dict[str, Any]:
    """A decision without what names the moment it was made: its refund token (signed per
    request) and its millisecond timings."""
    decision.pop("refund", None)
    decision.pop("retry_after_ms", None)
    for window in decision.get("limits", []):
        window.pop("reset_ms", None)
    return decision


def comparable(reply: Reply) -> tuple[int, dict[str, str], Any]:
    """What both answerers must agree on: the status, the headers but the ones that name
    the moment or the server, and the JSON body without what names the moment."""
    headers = {k: v for k, v in reply.headers.items()
               if k not in ("date", "server", "connection", "content-length")}
    body = json.loads(reply.body)
    if isinstance(body, dict) and "results" in body:
        body["results"] = [_moment_free(result) for result in body["results"]]
    elif isinstance(body, dict):
        body = _moment_free(body)
    return reply.status, headers, body


async def answers(port: int, requests: list[bytes], *, via_aiohttp: bool) -> list[Reply]:
    """Each request's answer, sent one after another on one connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if via_aiohttp:
            writer.write(get("/healthz"))
            assert (await read_reply(reader)).status == 200
        replies = []
        for request in requests:
            writer.write(request)
            replies.append(await read_reply(reader))
        return replies
    finally:
        writer.close()


def sequence(name: str, ip: str) -> list[bytes]:
    """The requests of one comparison, for the subject ``ip``."""
    one = {"action": "a", "ip": ip}
    bodies = {
        "allowed, then over the limit": [one] * 5,
        "unknown action": [{"action": MARK, "ip": ip}],
        "not an IP": [{"action": "a", "ip": MARK}],
        "unknown field": [{**one, MARK: 1}],
    }
    if name in bodies:
        return [post("/v1/check", msgspec.json.encode(body)) for body in bodies[name]]
    if name == "bad JSON":
        return [post("/v1/check", f'{{"action": "{MARK}"'.encode())]
    if name == "over 64 KiB":
        return [post("/v1/check", b" " * (64 * 1024 + 1))]
    checks = [one] * 4 if name == "batch" else [one, {"action": "a", "ip": MARK}]
    return [post("/v1/check/batch", msgspec.json.encode({"checks": checks}))]


SEQUENCES = ["allowed, then over the limit", "bad JSON", "unknown action", "not an IP",
             "unknown field", "batch", "batch with a bad entry", "over 64 KiB"]


@pytest.mark.parametrize("name", SEQUENCES)
async def test_the_lane_answers_as_aiohttp_does(settings: Settings, name: str) -> None:
    """Status, RateLimit headers and JSON body are the same from both, for allowed and
    denied checks, batches and bad input alike; no answer repeats the client's text."""
    async with guarded_server(settings, RULES) as server:
        lane = await answers(server.port, sequence(name, "192.0.2.1"), via_aiohttp=False)
        aiohttp = await answers(server.port, sequence(name, "192.0.2.2"), via_aiohttp=True)
    assert "server" not in lane[0].headers and "server" in aiohttp[0].headers  # (who answered)
    assert [comparable(r) for r in lane] == [comparable(r) for r in aiohttp]
    assert all(MARK.encode() not in r.raw for r in lane)
    assert all(r.headers["date"] for r in lane)


async def test_pipelined_requests_are_answered_in_order_across_both(
        settings: Settings) -> None:
    """Checks, a request for aiohttp, a chunked check and a check again, all in one write:
    the answers come in the order asked, and the counter went down one at a time."""
    body = check("192.0.2.9")
    chunked = (b"POST /v1/check HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               + b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (5, body[:5], len(body) - 5, body[5:]))
    rules = ONE_RULE.format(limit="100 per minute", algorithm="sliding-log")
    async with guarded_server(settings, rules) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(post("/v1/check", body) * 2 + get("/healthz") + chunked
                     + post("/v1/check", body))
        replies = [await read_reply(reader) for _ in range(5)]
        writer.close()
    assert [r.status for r in replies] == [200] * 5
    assert json.loads(replies[2].body)["status"] == "ok"
    remaining = [json.loads(r.body)["limits"][0]["remaining"] for i, r in enumerate(replies)
                 if i != 2]
    assert remaining == [99, 98, 97, 96]


async def test_many_pipelined_checks_are_all_answered_in_order(settings: Settings) -> None:
    """More checks in one write than a connection may be owed at once: reading pauses and
    resumes, and every one is answered, in order."""
    rules = ONE_RULE.format(limit="1000 per minute", algorithm="sliding-log")
    async with guarded_server(settings, rules) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(post("/v1/check", check("192.0.2.10")) * 300)
        replies = [await read_reply(reader) for _ in range(300)]
        writer.close()
    assert [json.loads(r.body)["limits"][0]["remaining"] for r in replies] == list(
        range(999, 699, -1))


@pytest.mark.parametrize(("version", "extra", "closes"), [
    ("1.1", (), False),
    ("1.1", ("Connection: close",), True),
    ("1.0", (), True),
    ("1.0", ("Connection: keep-alive",), False),
])
async def test_the_connection_lives_on_as_the_request_asked(
        settings: Settings, version: str, extra: tuple[str, ...], closes: bool) -> None:
    """HTTP/1.1 keeps the connection unless it asks to close; HTTP/1.0 closes it unless it
    asks to keep it; the answer says which."""
    async with guarded_server(settings, RULES) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(post("/v1/check", check("192.0.2.3"), *extra)
                     .replace(b"HTTP/1.1", f"HTTP/{version}".encode()))
        reply = await read_reply(reader)
        if closes:
            rest = await read_to_end(reader)
        else:
            writer.write(post("/v1/check", check("192.0.2.3")))
            rest = (await read_reply(reader)).raw
        writer.close()
    assert reply.status == 200
    assert reply.headers["connection"] == ("close" if closes else "keep-alive")
    assert (rest == b"") is closes


async def test_expect_100_continue_is_answered_before_the_body(settings: Settings) -> None:
    """The client waits for `100 Continue`, then sends the body and gets the decision."""
    body = check("192.0.2.4")
    async with guarded_server(settings, RULES) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(post("/v1/check", b"", "Expect: 100-continue")
                     .replace(b"Content-Length: 0", b"Content-Length: %d" % len(body)))
        interim = await reader.readuntil(b"\r\n\r\n")
        writer.write(body)
        reply = await read_reply(reader)
        writer.close()
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert reply.status == 200 and json.loads(reply.body)["allowed"] is True


async def test_a_compressed_body_is_left_to_aiohttp(settings: Settings) -> None:
    """A body with a Content-Encoding is aiohttp's to decode; the check is decided."""
    body = gzip.compress(check("192.0.2.5"))
    async with guarded_server(settings, RULES) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(post("/v1/check", body, "Content-Encoding: gzip"))
        reply = await read_reply(reader)
        writer.close()
    assert reply.status == 200 and json.loads(reply.body)["allowed"] is True


async def test_a_draining_worker_ends_each_connection_with_its_answer(
        settings: Settings) -> None:
    """Once the worker drains, the next answer says `Connection: close` and the connection
    ends after it: the client never sends into a connection about to close."""
    async with guarded_server(settings, RULES) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(post("/v1/check", check("192.0.2.6")))
        first = await read_reply(reader)
        server.app[STOPPING].set()
        writer.write(post("/v1/check", check("192.0.2.6")))
        last = await read_reply(reader)
        rest = await read_to_end(reader)
        writer.close()
    assert first.headers["connection"] == "keep-alive"
    assert last.status == 200 and last.headers["connection"] == "close"
    assert rest == b""


async def test_a_client_that_closes_its_end_still_gets_its_answers(
        settings: Settings) -> None:
    """Checks sent, then the client's end closed at once: every answer is still written,
    then the connection ends."""
    async with guarded_server(settings, RULES) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(post("/v1/check", check("192.0.2.7")) * 2)
        writer.write_eof()
        raw = await read_to_end(reader)
        writer.close()
    assert raw.count(b"HTTP/1.1 200 OK") == 2


async def test_a_refusal_after_relayed_requests_comes_after_their_answers(
        settings: Settings, redis_server: RedisServer) -> None:
    """A check (Redis paused, so its answer is owed) and a request for aiohttp in one read; in
    the next read another request for aiohttp and a malformed one: the check and the first
    request are answered in order, then the 400, then the connection closes. The read that
    held the malformed request is not handed on."""
    async with guarded_server(settings, RULES) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        redis_server.cli("CLIENT", "PAUSE", "500", "ALL")
        writer.write(post("/v1/check", check("192.0.2.11")) + get("/healthz"))
        await writer.drain()
        await asyncio.sleep(0.1)  # (so that the server reads the two writes apart)
        writer.write(get("/healthz") + b"GET / HTTP/1.1\r\nHost: x\r\nbad\r\n\r\n")
        raw = await read_to_end(reader)
        writer.close()
    assert statuses(raw) == [b"200", b"200", b"400"]


UPGRADE = (b"GET /healthz HTTP/1.1\r\nHost: x\r\nUpgrade: foo\r\nConnection: upgrade\r\n"
           b"Content-Length: 5\r\n\r\nhello")


@pytest.mark.parametrize("after_a_check", [False, True])
async def test_requests_after_a_declined_upgrade_are_answered(
        settings: Settings, after_a_check: bool) -> None:
    """No route upgrades a connection: an upgrade request with a body is answered as a plain
    one, and every request pipelined after it in the same write is answered too, in order,
    whether aiohttp reads the client's bytes or the guard relays them after a check."""
    first = post("/v1/check", check("192.0.2.12")) if after_a_check else b""
    async with guarded_server(settings, RULES) as server:
        raw = await asyncio.wait_for(exchange_all(server.port, first + UPGRADE + get("/healthz")
                                                  + get("/healthz", "Connection: close")), 10)
    assert statuses(raw) == [b"200"] * (4 if after_a_check else 3)


def statuses(raw: bytes) -> list[bytes]:
    """The status of each answer in ``raw``, in order."""
    return re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)


async def exchange_all(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        return await read_to_end(reader)
    finally:
        writer.close()


async def test_a_chunked_check_with_a_trailer_is_decided(settings: Settings) -> None:
    """A trailer after a chunked body, even one that repeats a header, is read past."""
    body = check("192.0.2.13")
    request = (b"POST /v1/check HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n"
               b"Content-Type: application/json\r\n\r\n" % (len(body), body))
    async with guarded_server(settings, RULES) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request)
        reply = await read_reply(reader)
        writer.close()
    assert reply.status == 200 and json.loads(reply.body)["allowed"] is True


async def test_a_client_that_never_reads_stops_being_read(settings: Settings) -> None:
    """Answers a client leaves unread fill the server's write buffer only to its limit: the
    guard then stops reading that connection, however much more the client sends."""
    async with guarded_server(settings, RULES) as server:
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(post("/v1/check", b"{") * 80_000)  # each answered at once: a 400
        guard = None
        for _ in range(500):
            guard = next(iter(server.gate.guards), None)
            if guard is not None and guard.transport is not None and not (
                    guard.transport.is_reading()):
                break
            await asyncio.sleep(0.01)
        assert guard is not None and guard.transport is not None
        assert not guard.transport.is_reading()
        buffered = guard.transport.get_write_buffer_size()
        writer.transport.abort()
    assert buffered < 1024 * 1024


_names = st.text(alphabet=st.characters(codec="utf-8"),
                 min_size=1, max_size=12)
_figures = st.integers(min_value=0, max_value=2**53)


@st.composite
def _decisions(draw: st.DrawFn) -> Decision:
    windows = draw(st.lists(st.tuples(_names, st.integers(1, 10**9), st.integers(1, 10**7)),
                            min_size=0, max_size=4))
    limits = [LimitState(rule, limit, window, *draw(st.tuples(_figures, _figures, _figures)))
              for rule, limit, window in windows]
    token = draw(st.none() | st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEF0123456789-_.",
                                     min_size=1, max_size=80))
    answer: dict[str, Any] = draw(st.sampled_from([
        {"allowed": True, "reason": None}, {"allowed": True, "reason": None},
        {"allowed": True, "reason": "rate_limited", "shadow": True},
        {"allowed": False, "reason": "rate_limited", "retry_after": 3, "retry_after_ms": 2500},
        {"allowed": False, "reason": "banned", "retry_after": 0},
        {"allowed": False, "reason": "disabled", "flag": "f", "message": "m",
         "retry_after": 60},
        {"allowed": True, "reason": None, "degraded": True}]))
    return Decision(action=draw(_names), limits=limits, refund=token, **answer)


@settings(max_examples=300, deadline=None)
@given(decision=_decisions())
def test_an_answer_of_the_lane_has_the_routes_headers_and_body(decision: Decision) -> None:
    """The lane's answer to a check carries the header lines and the JSON body that the
    aiohttp route of the same path sends for it (``rate_limit_headers`` and msgspec), whatever
    the names, figures and reasons."""
    lines = "".join(f"{name}: {value}\r\n"
                    for name, value in rate_limit_headers(decision).items()).encode()
    reply = reply_to(decision)
    assert (reply.status, reply.headers, reply.body) == (200, lines,
                                                         msgspec.json.encode(decision))
