"""The edge of every HTTP connection: each request must arrive in time and well formed, a
worker holds no more connections than it has file descriptors for, and the check endpoints
are answered without aiohttp.

aiohttp's own connection handler (``runner.server()``, a ``RequestHandler``) would wait an
hour for a request head that never ends and forever for a body that stops coming, and it
answers a request it cannot parse with its own text, which repeats what the client sent,
and a logged traceback. So every connection's protocol is a ``Guard``: it reads the bytes
first and parses them with ``httptools`` (llhttp, strict), to learn where each request's
head and body end and whether they are well formed, and to route it:

- ``POST /v1/check`` and ``POST /v1/check/batch`` (without a ``Content-Encoding``) go to the
  gate's hot lane (``server/hot.py``): the guard keeps the body, the lane decides, and the
  guard writes the answers in the order the requests came (``_owe``, ``_flush``);
- every other request goes to aiohttp's protocol, which the guard composes and opens for the
  connection when the first such request comes. When that is the connection's first request,
  aiohttp is handed every byte unchanged from then on (``PASS``). After checks the lane has
  answered (``HOT``), the connection is aiohttp's for good (``RELAY``): the guard rewrites
  each request it parsed (method, target, version, header lines, body; a chunked body
  re-chunked) and hands it on once the lane's answers before it are written.

A guard answers, itself and as JSON, what aiohttp must not see:

- a request not received whole within ``request_timeout`` of its first byte (of the
  connection's opening, for its first request): ``408``, or nothing when it never began;
- a malformed request (request line, header, chunked framing, a header or head larger than
  aiohttp takes, a missing ``Host``, a duplicated header aiohttp refuses): ``400``
  ``{"error": "malformed HTTP request"}``, which repeats nothing the client sent;
- ``Expect: 100-continue`` with a ``Content-Length`` over 64 KiB: ``413`` at once, never a
  ``100 Continue`` first; any other ``Expect``: ``417``.

Such an answer follows the answers to the requests before it on the connection (the lane's,
and aiohttp's: its access-log hook ``Answered`` tells the guard of each), then the
connection closes: after
a half-close that lets the client read the answer, when aiohttp holds none of its requests.
A read that holds a refused request is not handed on at all, so a request pipelined before
it in the same read goes unanswered: the refusal then answers the first such request.
No route upgrades a connection: after an ``Upgrade`` request the bytes are HTTP again. aiohttp
reads them so when it declines the upgrade, but only from a later read, so a read is handed
on in pieces that end where an upgrade request does (``_pass``); a relayed upgrade request
loses its ``Upgrade`` header, and so is a plain one to aiohttp.

A ``Gate`` is one worker's set of connections: their timeouts (one sweep, a few times per
timeout), and the cap. At the cap, the connection idle longest (open, no request coming in,
every answer sent) is closed to make room; when none is idle, the accepting site waits for
one to end (``Gate.make_room``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import resource
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import httptools
import msgspec
import yarl
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from ratekeeper.server.hot import CONTINUE, HotLane, Pending, Reply, hot_kind
from ratekeeper.server.http import MAX_BODY, TOO_LARGE_TEXT

__all__ = ["ANSWERS_LOG", "Answered", "ClientGone", "Gate", "Guard", "connection_cap",
           "hush_client_gone"]

# the logger aiohttp is given with ``Answered``; nothing is ever written to it
ANSWERS_LOG = logging.getLogger("ratekeeper.answered")

# aiohttp's own limits (RequestHandler's defaults): beyond them it refuses a request itself
LINE_MAX = 8190  # bytes of a request target
FIELD_MAX = 8190  # bytes of a header's name and value together
FIELDS_MAX = 100  # header lines (aiohttp refuses more than 128)
HEAD_MAX = 64 * 1024  # bytes of a whole request head
LINGER = 2.0  # seconds a closing connection still reads, so the client can read the answer
RESERVED_FILES = 64  # descriptors a worker keeps for Redis, logs and metrics at the least
INF = math.inf


def _answer(status: int, reason: str, message: str) -> bytes:
    body = msgspec.json.encode({"error": message})
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


MALFORMED = _answer(400, "Bad Request", "malformed HTTP request")
TIMED_OUT = _answer(408, "Request Timeout", "the request did not arrive in time")
TOO_LARGE = _answer(413, "Request Entity Too Large", TOO_LARGE_TEXT)
NO_EXPECTATION = _answer(417, "Expectation Failed", "only Expect: 100-continue is supported")

# headers a guard looks at, as bits; those aiohttp takes only once (its SINGLETON_HEADERS)
_HOST, _LENGTH = 1, 2
_SINGLE_NAMES = (b"host", b"content-length", b"content-location", b"content-range",
                 b"content-type", b"etag", b"max-forwards", b"server", b"transfer-encoding",
                 b"user-agent")
_WATCHED = {name: 1 << index for index, name in enumerate(_SINGLE_NAMES)}
_SINGLE = sum(_WATCHED.values())
_WATCHED[b"expect"] = _EXPECT_BIT = 1 << len(_SINGLE_NAMES)
_WATCHED[b"sec-websocket-key1"] = _OLD_WEBSOCKET = 1 << (len(_SINGLE_NAMES) + 1)
_WATCHED[b"content-encoding"] = _ENCODED = 1 << (len(_SINGLE_NAMES) + 2)
_CHUNKED = _WATCHED[b"transfer-encoding"]
_WATCHED_SIZES = frozenset(len(name) for name in _WATCHED)
assert _WATCHED[b"host"] == _HOST and _WATCHED[b"content-length"] == _LENGTH

OPEN, REFUSING, LINGERING, ENDING = 0, 1, 2, 3  # a guard's state
PASS, HOT, RELAY = 0, 1, 2  # who reads a guard's requests (see the module)
MAX_OWED = 64  # answers a connection may be owed before the guard stops reading it
Owed = tuple[bytes | Reply | Pending, bool]  # an answer, and whether it ends


class _Refusal(Exception):
    """Raised inside a parser callback to stop parsing; the guard has its answer."""


def connection_cap(configured: int = 0) -> int:
    """The most connections a worker holds: ``configured``, or (0) what its file descriptor
    limit leaves after a reserve of a quarter, at least RESERVED_FILES."""
    if configured > 0:
        return configured
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(1, soft - max(RESERVED_FILES, soft // 4))


class Guard(asyncio.Protocol):
    """One connection's protocol, wrapped around aiohttp's (see the module)."""

    __slots__ = ("answered", "began_here", "body", "chunked", "deadline", "early", "eof",
                 "expect", "fields", "gate", "head_bytes", "head_size", "heads", "heads_parsed",
                 "held", "in_head", "inner", "kind", "lane", "length", "lines", "mode", "owed",
                 "parser", "read_size", "receiving", "refusal", "relay_heads", "relay_held",
                 "relay_mark", "relay_out", "seen", "skip", "splits", "state", "stopped_reading",
                 "transport", "url", "writes_paused")

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.lane = gate.lane
        self.inner: asyncio.Protocol | None = None  # aiohttp's, once a request goes to it
        self.mode = HOT if self.lane is not None else PASS
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.state = OPEN
        self.deadline = INF  # loop time by which the request coming in must have arrived
        self.receiving = False  # a request has begun and not yet ended
        self.in_head = False  # ... and its head has not ended
        self.began_here = False  # ... and it began in the read being parsed
        self.heads_parsed = 0  # request heads parsed for aiohttp
        self.heads = 0  # request heads handed to aiohttp
        self.held = False  # aiohttp has the head of a request whose body is still coming
        self.answered = 0  # answers aiohttp has sent
        self.refusal = MALFORMED  # what a failed parse answers
        self.skip = 0  # body bytes of an upgrade request, which llhttp does not read
        # the lane's side: every read while the first request's destination is unknown
        self.early: bytearray | None = bytearray() if self.mode == HOT else None
        self.kind = 0  # the lane's endpoint of the request coming in (hot_kind), else 0
        self.body = bytearray()  # ... and its body so far
        self.owed: deque[Owed] = deque()  # the lane's answers not yet written, in order
        self.relay_out = bytearray()  # requests for aiohttp, rewritten, not yet handed on
        # what was relayed before the read being parsed: relay_out's length, the heads in it,
        # and whether it ends inside a request (a refusal cuts the read's part away)
        self.relay_mark = self.relay_heads = 0
        self.relay_held = False
        self.read_size = 0  # bytes of the read being parsed
        self.splits: list[int] = []  # where in it an upgrade request ends (PASS hands on there)
        self.stopped_reading = False  # reads paused by the guard
        self.writes_paused = False  # the transport's buffer is full
        self.eof = False  # the client's end closed while answers were owed
        self.lines: list[bytes] = []  # the request's header lines, while it may be relayed
        self.chunked = False
        self._reset_head()

    def _reset_head(self) -> None:
        self.url = b""
        self.fields = 0
        self.head_size = 0
        self.head_bytes = 0  # of a head that spans reads, counted from its second read
        self.seen = 0
        self.length = 0
        self.expect = b""
        if self.mode != PASS:
            self.lines = []

    # ------------------------------------------------------------------ the transport's side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        self.deadline = self.gate.loop.time() + self.gate.timeout
        self.gate.joined(self)
        if self.mode == PASS:
            self._open_inner()

    def _open_inner(self) -> asyncio.Protocol:
        inner = self.inner = self.gate.server()
        assert self.transport is not None
        inner.connection_made(self.transport)
        return inner

    def data_received(self, data: bytes) -> None:
        if self.state != OPEN:
            return  # refused or ending: nothing more is read
        if self.early is not None:
            self.early += data
        self.read_size = len(data)
        self.splits.clear()
        rest = self._skip(data) if self.skip else data
        try:
            self.parser.feed_data(rest)
        except httptools.HttpParserUpgrade as exc:
            if not self._upgraded(rest, int(exc.args[0])):
                self.refuse(MALFORMED)
                return
        except httptools.HttpParserError:
            self.refuse(self.refusal)
            return
        if self.state != OPEN:
            return  # a request asked to close the connection: what follows it is not read
        if self.in_head:
            if self.began_here:  # its part of this read is unknown, and at most one read
                self.began_here = False
            else:
                self.head_bytes += len(data)
                if self.head_bytes > HEAD_MAX:
                    self.refuse(MALFORMED)
                    return
        mode = self.mode
        if mode == PASS:
            self._pass(data)
        elif mode == RELAY and not self.owed:
            self._relay(self.receiving and not self.in_head)
        self._mark()
        if not self.receiving and not self.owed and self.answered >= self.heads:
            self.gate.rests(self)

    def _pass(self, data: bytes) -> None:
        """Hand aiohttp the client's bytes (all of them, for the connection's first read), in
        pieces that end where an upgrade request does: aiohttp reads on after a declined
        upgrade only from a later read."""
        if self.early is not None:  # the first request went to aiohttp: all it sent
            base = len(self.early) - len(data)
            data = bytes(self.early)
            self.early = None
            self.splits = [base + at for at in self.splits]
        self.heads = self.heads_parsed
        self.held = self.receiving and not self.in_head
        inner = self.inner
        assert inner is not None
        start = 0
        for at in self.splits:
            if start < at < len(data):
                inner.data_received(data[start:at])
                start = at
        self.splits.clear()
        inner.data_received(data[start:] if start else data)

    def _mark(self) -> None:
        """What is relayed so far stays, whatever the next read holds."""
        self.relay_mark = len(self.relay_out)
        self.relay_heads = self.heads_parsed
        self.relay_held = self.receiving and not self.in_head

    def eof_received(self) -> bool | None:
        if self.owed:
            self.eof = True  # the answers owed are still written; then the connection ends
            return True
        if self.state != OPEN:
            return False  # (the transport closes)
        if self.inner is None:
            return False
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = LINGERING
        self.owed.clear()  # (their checks finish; nobody is left to read the answers)
        self.gate.left(self)
        if self.inner is not None:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()
        elif self.transport is not None:  # the lane's answers wait: so does its reading
            self.writes_paused = self.stopped_reading = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.writes_paused = False
        if self.inner is not None:
            self.inner.resume_writing()
        self._resume_reading()  # (reading the guard paused, aiohttp's protocol opened since)

    def _resume_reading(self) -> None:
        if (self.stopped_reading and not self.writes_paused and len(self.owed) <= MAX_OWED // 2
                and self.transport):
            self.stopped_reading = False
            self.transport.resume_reading()

    # ------------------------------------------------------------------ httptools' callbacks

    def on_message_begin(self) -> None:
        if self.state != OPEN:
            raise _Refusal  # the request before asked to close the connection
        self.receiving = self.in_head = self.began_here = True
        self.gate.idle.pop(self, None)  # (Gate.works, on every request's path)
        if self.deadline == INF:
            self.deadline = self.gate.loop.time() + self.gate.timeout
        self._reset_head()

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > LINE_MAX:
            raise _Refusal

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value)
        self.fields += 1
        if size > FIELD_MAX or self.fields > FIELDS_MAX:
            raise _Refusal
        if not self.in_head:
            return  # a chunked body's trailer: aiohttp reads past it, and so does the lane
        self.head_size += size
        if self.mode != PASS:  # kept in case the request is to be relayed to aiohttp
            self.lines.append(b"%s: %s\r\n" % (name, value))
        if len(name) in _WATCHED_SIZES:
            bit = _WATCHED.get(name.lower(), 0)
            if bit:
                self._watched(bit, value)

    def _watched(self, bit: int, value: bytes) -> None:
        if bit & self.seen & _SINGLE or bit == _OLD_WEBSOCKET:
            raise _Refusal
        self.seen |= bit
        if bit == _LENGTH:
            self.length = int(value)  # (llhttp let only digits through)
        elif bit == _EXPECT_BIT and value.strip().lower() != b"100-continue":
            self.expect = value

    def on_headers_complete(self) -> None:
        parser = self.parser
        self.in_head = False
        version = parser.get_http_version()
        if (self.fields > FIELDS_MAX or self.head_size + 4 * self.fields + len(self.url) > HEAD_MAX
                or version not in ("1.1", "1.0")
                or not (self.url.startswith(b"/") or self._target_ok(parser.get_method()))):
            raise _Refusal
        if version == "1.1":  # (aiohttp reads neither Host nor Expect from HTTP/1.0)
            if not self.seen & _HOST:
                raise _Refusal
            if self.expect:
                self.refusal = NO_EXPECTATION
                raise _Refusal
            if self.seen & _EXPECT_BIT and self.length > MAX_BODY:
                self.refusal = TOO_LARGE
                raise _Refusal
        if self.mode == PASS:
            self.heads_parsed += 1
        else:
            self._route(parser, version)

    def _route(self, parser: httptools.HttpRequestParser, version: str) -> None:
        """Send the request whose head just ended to the lane or to aiohttp."""
        method = parser.get_method()
        if self.mode == HOT and not self.seen & _ENCODED and not parser.should_upgrade():
            self.kind = hot_kind(method, self.url)
            if self.kind:
                self.early = None
                if self.seen & _EXPECT_BIT and version == "1.1":
                    self._owe(CONTINUE, False)
                return
        self.heads_parsed += 1
        if self.early is not None:  # the connection's first request: aiohttp reads it all
            self.mode = PASS
            self.lines = []
            self._open_inner()
            return
        if self.mode == HOT:  # from now on aiohttp reads them all, as the guard writes them
            self.mode = RELAY
            self._open_inner()
        self.chunked = bool(self.seen & _CHUNKED)
        lines = self.lines
        if parser.should_upgrade():  # declined, as aiohttp would: it reads on as HTTP
            lines = [line for line in lines if line[:8].lower() != b"upgrade:"]
        self.relay_out += b"%s %s HTTP/%s\r\n%s\r\n" % (method, self.url, version.encode(),
                                                         b"".join(lines))

    def on_body(self, body: bytes) -> None:
        if self.kind:
            if len(self.body) <= MAX_BODY:  # (beyond it, the answer is a 413)
                self.body += body
        elif self.mode == RELAY:
            if self.chunked:
                self.relay_out += b"%x\r\n%s\r\n" % (len(body), body)
            else:
                self.relay_out += body

    def on_message_complete(self) -> None:
        self.receiving = False
        self.deadline = INF
        if self.kind:
            assert self.lane is not None
            kind, self.kind = self.kind, 0
            # (decoded before answer returns: the buffer is not copied, and then reused)
            answer = self.lane.answer(kind, self.body, self._settled)
            self.body.clear()
            self._owe(answer, not self.parser.should_keep_alive())
        elif self.mode == RELAY and self.chunked:
            self.relay_out += b"0\r\n\r\n"

    def _target_ok(self, method: bytes) -> bool:
        """Whether aiohttp takes a request target other than origin-form (``/path``): ``*``
        for OPTIONS, or an absolute URL with a host; never CONNECT's authority-form."""
        url = self.url
        if method == b"CONNECT":
            return False
        if url == b"*":
            return method == b"OPTIONS"
        text = url.decode("utf-8", "surrogateescape")
        scheme, sep, _ = text.partition("://")
        if not sep or not scheme.isalpha():
            return False
        try:
            # (.host decodes IDNA, as aiohttp does: a host it cannot decode is refused here)
            return yarl.URL(text, encoded=True).host is not None
        except ValueError:
            return False

    def _upgraded(self, data: bytes, offset: int) -> bool:
        """Go on after an ``Upgrade`` request (llhttp stops there); False when its body
        cannot be found."""
        if self.seen & _CHUNKED:
            return False
        self.skip = self.length
        rest = data[offset:]
        if self.skip:
            self.receiving = True
            self.deadline = self.gate.loop.time() + self.gate.timeout
            rest = self._skip(rest)
        else:
            self.splits.append(self.read_size - len(rest))
        if rest:
            try:
                self.parser.feed_data(rest)
            except httptools.HttpParserUpgrade as exc:
                return self._upgraded(rest, int(exc.args[0]))
            except httptools.HttpParserError:
                return False
        return True

    def _skip(self, data: bytes) -> bytes:
        """What follows the upgrade request's body in ``data`` (a suffix of the read)."""
        taken = min(self.skip, len(data))
        if self.mode == RELAY:
            self.relay_out += data[:taken]
        self.skip -= taken
        if not self.skip:
            self.receiving = False
            self.deadline = INF
            self.splits.append(self.read_size - len(data) + taken)
        return data[taken:]

    # ------------------------------------------------------------------ answers and endings

    def answered_one(self) -> None:
        """aiohttp has sent an answer on this connection (``Answered``)."""
        self.answered += 1
        if self.state == REFUSING:
            self._settle()
        elif not self.receiving and not self.owed and self.answered >= self.heads:
            self.gate.rests(self)

    def _owe(self, answer: bytes | Reply | Pending, close: bool) -> None:
        """Write ``answer`` (the lane's) after those owed before it; ``close``: and then end
        the connection, reading nothing more."""
        self.owed.append((answer, close))
        if close:
            self.state = ENDING
        if len(self.owed) == 1:
            self._flush()
        elif len(self.owed) > MAX_OWED and not self.stopped_reading and self.transport:
            self.stopped_reading = True  # a client pipelining faster than it is answered
            self.transport.pause_reading()

    def _settled(self, pending: Pending) -> None:
        """The lane has decided ``pending``."""
        if self.owed and self.owed[0][0] is pending:
            self._flush()

    def _flush(self) -> None:
        """Write the answers owed that are ready, in order; once none is owed, hand aiohttp
        what was relayed meanwhile."""
        owed, lane, transport = self.owed, self.lane, self.transport
        assert lane is not None and transport is not None
        while owed:
            answer, close = owed[0]
            if isinstance(answer, Pending):
                if answer.reply is None:
                    return
                answer = answer.reply
            owed.popleft()
            if isinstance(answer, bytes):
                transport.write(answer)
                continue
            # a draining worker ends the connection with the last answer owed
            ending = close or answer.ends or (not owed and lane.stopping.is_set())
            transport.write(lane.render(answer, ending))
            if ending:
                self.state = ENDING
                owed.clear()
                self.linger()
                return
        self._resume_reading()
        if self.state == REFUSING:
            self._relay(self.relay_held)
            self._settle()
            return
        if self.mode == RELAY:
            self._relay(self.receiving and not self.in_head)
        if self.eof:
            self.eof = False
            if self.inner is None or not self.inner.eof_received():
                transport.close()
        elif not self.receiving and self.answered >= self.heads:
            self.gate.rests(self)

    def _relay(self, held: bool) -> None:
        """Hand aiohttp the requests rewritten for it; ``held``: the last of them is not
        whole yet."""
        if self.relay_out:
            data = bytes(self.relay_out)
            self.relay_out.clear()
            self.heads = self.heads_parsed
            self.held = held
            assert self.inner is not None
            self.inner.data_received(data)
        self._mark()

    def refuse(self, answer: bytes) -> None:
        """Answer ``answer`` once what came before is answered, then close."""
        if self.state != OPEN:
            return
        self.state = REFUSING
        self.refusal = answer
        self.deadline = INF  # the answers before it are the server's to finish
        # the read that held it is not handed on
        del self.relay_out[self.relay_mark:]
        self.heads_parsed = self.relay_heads
        self.gate.works(self)
        if not self.owed:
            self._relay(self.relay_held)
            self._settle()

    def _settle(self) -> None:
        before = self.heads - self.held  # requests aiohttp has whole
        if self.answered < before or self.transport is None:
            return
        transport = self.transport
        if self.held or self.kind:
            # aiohttp (or the lane) has this request's head: the connection ends at once,
            # which leaves aiohttp's handler nothing to write into
            if self.answered == before:
                transport.write(self.refusal)
            transport.close()
            return
        transport.write(self.refusal)
        self.linger()

    def linger(self) -> None:
        """Half-close, read what still comes for a while, then close."""
        if self.transport is None:
            return
        self.state = LINGERING
        self.gate.works(self)
        self.deadline = self.gate.loop.time() + LINGER
        if self.eof:  # the client has closed its end: nothing more will come
            self.transport.close()
        elif self.transport.can_write_eof():
            self.transport.write_eof()
        else:
            self.transport.close()

    def expire(self, now: float) -> None:
        """The deadline has passed."""
        transport = self.transport
        if transport is None:
            return
        if self.state == LINGERING or (self.state == OPEN and not self.receiving
                                       and not self.owed):
            self.state = LINGERING
            transport.close()  # a connection that never sent a request: nothing to answer
        elif not transport.is_reading():  # aiohttp holds back: the wait is the server's
            self.deadline = now + self.gate.timeout
        else:
            self.refuse(TIMED_OUT)

    def evict(self) -> None:
        """Close this idle connection to make room for another."""
        self.state = LINGERING
        if self.transport is not None:
            self.transport.close()


class Gate:
    """One worker's connections: each a ``Guard`` around ``server()``'s protocol (aiohttp's
    ``runner.server``); their deadlines and their cap (see the module)."""

    def __init__(self, server: Callable[[], asyncio.Protocol], *, request_timeout: float,
                 limit: int, lane: HotLane | None = None) -> None:
        self.server = server
        self.lane = lane  # answers the check endpoints; without one aiohttp answers all
        self.timeout = request_timeout
        self.limit = limit
        self.loop = asyncio.get_running_loop()
        self.guards: set[Guard] = set()
        self.idle: dict[Guard, None] = {}  # the connections idle now, longest idle first
        self.leaving: set[Guard] = set()  # closed to make room, not yet gone
        self.opening = 0  # accepted sockets not yet connected
        self.released: Callable[[], None] | None = None  # told when a connection ends
        self._sweep: asyncio.TimerHandle | None = None

    def __call__(self) -> Guard:
        return Guard(self)

    def __len__(self) -> int:
        return len(self.guards) + self.opening - len(self.leaving)

    def start(self) -> None:
        """Begin watching deadlines."""
        if self._sweep is None:
            self._sweep = self.loop.call_later(self.interval, self._sweeping)

    def stop(self) -> None:
        """Stop watching deadlines."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None

    @property
    def interval(self) -> float:
        """How often deadlines are looked at."""
        return min(1.0, max(0.01, self.timeout / 4))

    @property
    def full(self) -> bool:
        """Whether the worker holds its cap of connections."""
        return len(self) >= self.limit

    async def close_lane(self, timeout: float) -> None:
        """Close the connections only the lane has served, once every answer the lane owes is
        written (or ``timeout`` has passed): before the app's state is closed, which a check
        still arriving would need. aiohttp's runner closes the others."""
        deadline = self.loop.time() + timeout
        while any(guard.owed for guard in self.guards) and self.loop.time() < deadline:
            await asyncio.sleep(0.01)
        for guard in [g for g in self.guards if g.inner is None]:
            guard.evict()

    def make_room(self) -> bool:
        """Close the connection idle longest (it is gone by the next turn of the loop), for
        one waiting to be accepted; False when none is idle."""
        longest = next(iter(self.idle), None)
        if longest is None:
            return False
        del self.idle[longest]
        self.leaving.add(longest)
        longest.evict()
        return True

    def opened(self) -> None:
        """A socket was accepted; its guard joins once it is connected."""
        self.opening += 1

    def failed(self) -> None:
        """An accepted socket could not be connected."""
        self.opening -= 1
        self._released()

    def joined(self, guard: Guard) -> None:
        if self.opening:
            self.opening -= 1
        self.guards.add(guard)
        self.idle[guard] = None

    def left(self, guard: Guard) -> None:
        self.guards.discard(guard)
        self.idle.pop(guard, None)
        self.leaving.discard(guard)
        self._released()

    def rests(self, guard: Guard) -> None:
        """``guard``'s connection is idle from now on."""
        if guard.state == OPEN:
            self.idle.pop(guard, None)
            self.idle[guard] = None

    def works(self, guard: Guard) -> None:
        """``guard``'s connection is not idle."""
        self.idle.pop(guard, None)

    def _released(self) -> None:
        if self.released is not None:
            self.released()

    def _sweeping(self) -> None:
        now = self.loop.time()
        for guard in [g for g in self.guards if g.deadline <= now]:
            guard.expire(now)
        self._sweep = self.loop.call_later(self.interval, self._sweeping)


class ClientGone(logging.Filter):
    """Drops aiohttp's "Error handling request" for a request whose connection ended before
    its body came (a guard closed it, or the client left): nothing went wrong in the server,
    and a traceback for each would drown those that matter."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, ConnectionResetError)
                    and str(record.msg).startswith("Error handling request"))


def hush_client_gone() -> None:
    """Put ``ClientGone`` on aiohttp's connection handler's logger (once)."""
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, ClientGone) for f in server_log.filters):
        server_log.addFilter(ClientGone())


class Answered(AbstractAccessLogger):
    """aiohttp's access-log hook, which it calls once each answer is sent, logging nothing:
    it tells the connection's guard (the transport's protocol) so."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        transport = request.transport
        if transport is not None:
            guard: Any = transport.get_protocol()
            if type(guard) is Guard:
                guard.answered_one()
