"""The hot paths, answered inside the HTTP protocol: ``POST /v1/check``, ``/v1/check/batch``
and nginx's and Traefik's ``GET /v1/authz``.

aiohttp answers a request by building a Request, running the handler in a task of its own, and
building, preparing and writing a Response: with one worker, a bare aiohttp server spends about
32 us of CPU per request, and this protocol about 11 us on the same request (``make bench``).
The origin, or its proxy, sends one of these on every request it guards, so ``HotProtocol``
(aiohttp's own ``RequestHandler``, parsing with aiohttp's parser) answers them itself: the
handler in ``app[HOT_PATHS]`` decides from the parsed message and its body, and the answer's
bytes go to the connection (``answers.wire``).

A request goes aiohttp's usual way instead, where its route gives the same answer, when it is
not exactly a hot path (another path, a query string), says ``Expect``, has a compressed body
or one over 64 KiB, is HTTP/1.0 or ``Connection: close``, or comes while the server drains (a
hot request's body that comes in pieces is waited for here). Answers leave in the order their
requests came: the protocol only answers while aiohttp has none of the connection's requests
in hand, answers one at a time (one waiting for Redis, a ``Later``, holds the requests behind
it), and hands aiohttp everything from the first request it does not answer itself. Answers
wait for the end of the tick in the ``Outbox``, those given at once and those a script call
settled alike (the coalescer flushes it once a call's answers are all made); a request handed
to aiohttp, or an answer that closes its connection, first flushes it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

import aiohttp
from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from .answers import CLIENT_ERRORS, MAX_BODY, Answer, error_answer, wire

__all__ = ["HOT_PATHS", "OUTBOX", "STOPPING", "HotHandler", "HotProtocol", "Later", "Outbox",
           "serve_hot_paths", "supported"]

log = logging.getLogger("ratekeeper.server")

STOPPING = web.AppKey("stopping", asyncio.Event)  # set when the worker drains


class Later(NamedTuple):
    """An answer that waits for something (Redis): ``finish(future)`` once it is done."""

    future: asyncio.Future[Any]
    finish: Callable[[asyncio.Future[Any]], bytes]


# A hot path's handler: (the application, the parsed request, its body, the connection) ->
# the answer's bytes, or a Later. It may raise a client error (``answers.CLIENT_ERRORS``).
HotHandler = Callable[[web.Application, RawRequestMessage, bytes, "HotProtocol"], "bytes | Later"]
# (method, raw path) -> its handler; create_app and proxy.add_routes fill it in
HOT_PATHS = web.AppKey("hot_paths", dict[tuple[str, str], HotHandler])

_FAILED = Answer(500, {"Content-Type": "application/json", "Connection": "close"},
                 b'{"error":"internal error"}')


_QUEUED_MAX = 64 * 1024  # of one connection's answers in the outbox: asyncio's high-water mark


def _body_coming(app: web.Application, message: RawRequestMessage, body: bytes,
                 protocol: HotProtocol) -> bytes:
    raise AssertionError("a marker, never called")


_BODY_COMING: HotHandler = _body_coming  # (HotProtocol._handler)


def _client_error(exc: BaseException) -> bytes:
    """The answer to a client error a handler raised: the routed way's (``error_answer``),
    or the redirect or success the exception is."""
    if isinstance(exc, web.HTTPException) and exc.status < 400:
        return wire(Answer(exc.status, exc.headers, exc.body or b""))  # type: ignore[arg-type]
    return wire(error_answer(exc))  # type: ignore[arg-type]


class HotProtocol(RequestHandler):
    """aiohttp's connection handler, answering the hot paths itself (see the module)."""

    __slots__ = ("_app", "_drift", "_held", "_hot", "_later", "_outbox", "_parser_full",
                 "_queued", "_remote", "_serving", "_started", "_stopping")

    def attach(self, app: web.Application, outbox: Outbox) -> None:
        """Serve ``app``'s hot paths on this connection."""
        self._app = app
        self._outbox = outbox
        self._queued = 0  # bytes of this connection's answers waiting in the outbox
        self._hot = app[HOT_PATHS]
        self._stopping = app[STOPPING]
        self._held: deque[tuple[Any, StreamReader]] = deque()  # parsed, not yet routed
        self._later: Later | None = None  # the answer this connection waits for
        self._serving = False
        self._parser_full = False  # the parser stopped at its queue limit; more may be parsed
        # aiohttp took a request of this connection before its body was all in: the parser
        # may stop short of its limit (_serve then feeds it nothing after each run of answers;
        # _check_drift lowers aiohttp's queue limit to match)
        self._drift = False
        self._started = False  # aiohttp's start() has run (it then only waits for messages)
        self._remote: str | None = None

    @property
    def remote(self) -> str | None:
        """The peer's address, as ``request.remote`` says it."""
        if self._remote is None:
            peer = self.peername
            self._remote = str(peer[0]) if isinstance(peer, (list, tuple)) else (
                None if peer is None else str(peer))
        return self._remote

    async def start(self) -> None:
        self._started = True
        await super().start()

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        later = self._later
        if later is not None:  # let the answer being decided go out first
            started = self._loop.time()
            await asyncio.wait([later.future], timeout=timeout)
            await asyncio.sleep(0)  # (its finishing callback runs first)
            if self._queued:  # and its answer leaves before aiohttp closes the connection
                self._outbox.flush()
            if timeout is not None:
                timeout = max(0.0, timeout - (self._loop.time() - started))
        await super().shutdown(timeout)

    def _process_keepalive(self) -> None:
        if self._later is not None or self._held:  # not idle: a request is being answered
            self._keepalive_handle = None
            self._touch()
            return
        super()._process_keepalive()

    def resume_writing(self) -> None:
        super().resume_writing()
        if (self._held or self._parser_full) and not self._serving:
            self._serve()  # answering stopped while the client did not read

    def resume_reading(self, resume_parser: bool = True) -> None:
        # A request body's reader calls this each time it is read from, and aiohttp then
        # feeds its parser nothing and resumes the transport: work only when something paused
        # the reading (the body's flow control, or a full message queue).
        if self._reading_paused or self._buffer_paused:
            super().resume_reading(resume_parser)

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        if self._later is None and not self._held and (
                self._messages or (self._started if waiter is None else waiter.done())):
            super().data_received(data)  # aiohttp has requests of this connection in hand
            self._check_drift()
            return
        # aiohttp waits for a request (or has not started): parse, and route them here
        self._waiter = None
        try:
            super().data_received(data)
        finally:
            self._waiter = waiter
        messages = self._messages
        held = self._held
        if not messages:
            if held:
                self._serve()  # the first one's body may be all in now
            return
        held.extend(messages)
        messages.clear()
        # aiohttp's parser stops at 32 requests not yet taken (fewer once aiohttp took one
        # whose body came in pieces): it is fed nothing to go on once these are answered
        if self._drift or len(held) >= self._max_msg_queue_size - 1:
            self._parser_full = True
            if not self._buffer_paused:
                self._pause_reading_for_buffer()
        self._serve()

    def _serve(self) -> None:
        """Answer the held requests in order while they are hot and none waits; hand the
        rest to aiohttp."""
        if self._serving:
            return
        self._serving = True
        try:
            held = self._held
            # (``_paused``: the client does not read its answers; resume_writing goes on)
            while self._later is None and not self._force_close and not self._paused:
                if held:
                    message, payload = held[0]
                    handler = self._handler(message, payload)
                    if handler is None:
                        self._hand_over()
                        return
                    if handler is not _BODY_COMING:
                        held.popleft()
                        self._parser.message_consumed()  # type: ignore[union-attr]
                        self._answer(handler, message, payload)
                        continue
                    # the last one held waits for the rest of its body: read on
                if not self._parser_full:
                    if held and self._buffer_paused:
                        self._resume_reading_for_buffer()
                    return  # (data_received comes back with more)
                self._parser_full = False  # parse what the parser stopped at
                self.data_received(b"")  # (which holds them: this is not re-entered)
                if not self._parser_full and self._buffer_paused:
                    self._resume_reading_for_buffer()
        finally:
            self._serving = False

    def _handler(self, message: Any, payload: StreamReader) -> HotHandler | None:
        """The hot handler for ``message``; ``_BODY_COMING`` while its body is on its way;
        None when aiohttp should answer it."""
        if type(message) is not RawRequestMessage:  # (a parse error is aiohttp's 400)
            return None
        handler = self._hot.get((message.method, message.path))
        if (handler is None or message.should_close or message.version != HttpVersion11
                or message.compression is not None or message.upgrade
                or hdrs.EXPECT in message.headers or payload.exception() is not None
                or payload.total_bytes > MAX_BODY or self._stopping.is_set()):
            return None
        if not payload.is_eof():
            # A body that comes in pieces is waited for here (aiohttp, given a request
            # before its body is all in, loses count of the requests its parser holds);
            # unless the body's flow control stopped reading, which only aiohttp resumes.
            return None if self._reading_paused else _BODY_COMING
        return handler

    def _hand_over(self) -> None:
        """Give aiohttp every held request, in order; it reads on from here."""
        if self._queued:  # aiohttp writes its answers at once: ours go first
            self._outbox.flush()
        messages = self._messages
        messages.extend(self._held)
        self._held.clear()
        self._check_drift()
        self._parser_full = False  # aiohttp resumes reading as it drains (_buffer_paused)
        if not self._buffer_paused and len(messages) >= self._max_msg_queue_size:
            self._pause_reading_for_buffer()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _check_drift(self) -> None:
        """Note when aiohttp is given a request whose body is still to come.

        aiohttp's C parser counts a request once its body is complete: taken before that,
        such a request frees no slot, then takes one for good, and the parser stops at 31
        requests not yet taken, one short of aiohttp's queue limit. aiohttp pauses reading
        at its limit and feeds its parser again only while paused, as its queue drains:
        below it, aiohttp resumes reading with the parser stopped, and what the parser holds
        back of a pipelined run waits for bytes a client awaiting its answers never sends.
        So aiohttp's limit becomes the parser's (with the pure-Python parser, which counts
        a request at its head, aiohttp merely pauses one request earlier).
        """
        if not self._drift and not all(payload.is_eof() for _, payload in self._messages):
            self._drift = True
            self._max_msg_queue_size -= 1

    def _answer(self, handler: HotHandler, message: RawRequestMessage,
                payload: StreamReader) -> None:
        # the body is all in (``_handler``): its pieces, as read_nowait(-1) joins them, without
        # its bookkeeping for a reader that reads on (nothing else reads this payload)
        body = (b"".join(payload._buffer) if type(payload) is StreamReader
                else payload.read_nowait(-1))  # (no body: aiohttp's EMPTY_PAYLOAD)
        try:
            answer = handler(self._app, message, body, self)
        except CLIENT_ERRORS as exc:
            answer = _client_error(exc)
        except Exception:
            log.exception("answering %s %s failed", message.method, message.path)
            self._fail()
            return
        if type(answer) is bytes:
            self._write_soon(answer)
        else:
            self._later = answer  # type: ignore[assignment]
            answer.future.add_done_callback(self._finish)  # type: ignore[union-attr]

    def _finish(self, future: asyncio.Future[Any]) -> None:
        later = self._later
        assert later is not None and later.future is future
        self._later = None
        try:
            answer = later.finish(future)
        except CLIENT_ERRORS as exc:  # (a batch is validated as it is decided)
            answer = _client_error(exc)
        except (Exception, asyncio.CancelledError):  # (cancelled: the coalescer was stopped)
            log.exception("answering a request failed")
            self._fail()
            return
        if self._stopping.is_set() and not self._held and not self._parser_full:
            # the worker drains: as on the routed way (server._answered), the answer says
            # the connection ends here, and it does (a request held behind it is aiohttp's,
            # whose answer says so)
            end = answer.index(b"\r\n\r\n") + 2
            self._write(answer[:end] + b"Connection: close\r\n" + answer[end:])
            self.force_close()
            return
        # with the rest of the run its script call settled (``Outbox``)
        self._write_soon(answer)
        if self._held or self._parser_full:
            self._serve()

    def _fail(self) -> None:
        """Answer 500 and close: the server, not the request, is at fault."""
        self._write(wire(_FAILED))
        self.force_close()

    def _write_soon(self, answer: bytes) -> None:
        """Write an answer given at once at the end of the tick (``Outbox``)."""
        if self.transport is not None and not self._force_close:
            self._touch()  # (a Later's answer touches in _finish)
            self._queued += len(answer)
            self._outbox.add(self, answer)
            if self._queued > _QUEUED_MAX:  # a client pipelining: let the transport judge
                self._outbox.flush()  # whether it reads its answers (pause_writing)

    def _write(self, answer: bytes) -> None:
        transport = self.transport
        if transport is None or self._force_close:
            return
        if self._queued:  # an earlier answer of this connection goes first
            self._outbox.flush()
        transport.write(answer)

    def _touch(self) -> None:
        """Restart the keep-alive clock, as aiohttp does after each answer."""
        if self._keepalive_timeout > 0:
            loop = self._loop
            self._next_keepalive_close_time = loop.time() + self._keepalive_timeout
            if self._keepalive_handle is None:
                self._keepalive_handle = loop.call_at(self._next_keepalive_close_time,
                                                      self._process_keepalive)


class Outbox:
    """Answers given at once (the kill switches, the local cache: the whole of a flood) are
    written together at the end of the event-loop tick, after the tick's requests were read.

    Written as each request is read, every answer wakes the client's reading thread by
    itself; written in one run, most of them find it awake. With one worker, a flood from
    the local cache costs about 30 us of CPU per request this way, against 40 written one by
    one. Answers that waited for Redis come the same way: a script call's reply settles a run
    of them in one tick, and they leave together once the last is made (2.9% more
    throughput at two workers than writing each as it is made: wrk's reading threads spent
    10.5 us of CPU per answer instead of 12, woken once per run). The coalescer that
    settled them flushes the outbox right after their callbacks ran (server.py hands it
    ``flush``), in the same tick, rather than at the end of the next. A connection's
    answers still leave in order: one that is written at once, or a request handed to
    aiohttp, first flushes the outbox.
    """

    __slots__ = ("_answers", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._answers: list[tuple[HotProtocol, bytes]] = []

    def add(self, protocol: HotProtocol, answer: bytes) -> None:
        answers = self._answers
        answers.append((protocol, answer))
        if len(answers) == 1:
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write every waiting answer now."""
        if not self._answers:
            return
        answers, self._answers = self._answers, []
        for protocol, answer in answers:
            protocol._queued = 0
            transport = protocol.transport
            if transport is not None and not protocol._force_close:
                transport.write(answer)


# the worker's Outbox, when the application makes it at startup (so that what settles its
# Laters can flush it: server.py); else serve_hot_paths makes one
OUTBOX = web.AppKey("outbox", Outbox)


class _HotServer(web.Server):
    """aiohttp's server, making a HotProtocol for each connection (``serve_hot_paths``)."""

    hot_app: web.Application
    outbox: Outbox

    def __call__(self) -> RequestHandler:
        protocol = HotProtocol(self, loop=self._loop, **self._kwargs)
        protocol.attach(self.hot_app, self.outbox)
        return protocol


# What HotProtocol uses of aiohttp's connection handler beyond its public API (aiohttp 3.14):
# its message queue and waiter, its parser's queue accounting, its flow-control flags.
_INTERNALS = ("_messages", "_waiter", "_parser", "_buffer_paused", "_reading_paused", "_paused",
              "_force_close", "_keepalive_handle", "_keepalive_timeout",
              "_next_keepalive_close_time", "_max_msg_queue_size")
_METHODS = ("_pause_reading_for_buffer", "_resume_reading_for_buffer", "_process_keepalive")
_PAYLOAD = ("_buffer",)  # a request body's StreamReader: the pieces of its body


def supported() -> bool:
    """Whether this aiohttp has the internals HotProtocol relies on."""
    slots = {name for cls in RequestHandler.__mro__ for name in getattr(cls, "__slots__", ())}
    return (all(name in slots for name in _INTERNALS)
            and all(callable(getattr(RequestHandler, name, None)) for name in _METHODS)
            and all(name in StreamReader.__slots__ for name in _PAYLOAD)
            and not hasattr(web.Server, "__slots__"))


def serve_hot_paths(app: web.Application, server: web.Server) -> None:
    """Make ``server`` (``AppRunner.server`` once set up, on the running loop) answer
    ``app``'s hot paths in its connections; the routes stay, for every request the protocol
    hands to aiohttp. On an aiohttp whose internals differ (``supported``), nothing changes
    but a warning: the routes answer everything, more slowly."""
    if not supported():
        log.warning("aiohttp %s lacks what the hot paths need: every request takes the "
                    "routed way", aiohttp.__version__)
        return
    server.__class__ = _HotServer  # (aiohttp makes each connection's handler in __call__)
    server.hot_app = app  # type: ignore[attr-defined]
    outbox = app.get(OUTBOX)
    server.outbox = (Outbox(asyncio.get_running_loop())  # type: ignore[attr-defined]
                     if outbox is None else outbox)
