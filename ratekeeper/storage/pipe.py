"""The connection the coalesced checks go over: one socket to Redis that answers by callback.

redis-py's asyncio connection reads a reply through a stream reader and a chain of
coroutines, so each write it has out costs a task, a deadline scope and several turns of the
event loop; at a few hundred checks a second, when every check travels alone, that is a
quarter of a check's time in this process. The coalescer needs none of it: it writes a
tick's checks as one block of pipelined script calls and wants their replies back in order.
A ``Pipe`` is an asyncio protocol that parses what Redis sends with hiredis (the parser
redis-py itself uses) as it arrives, and gives each write its replies in a callback.

It speaks only what the checks need: it connects (TCP, TLS or a Unix socket), authenticates
and selects the database as redis-py would for the same client, then carries pipelined
commands. Where to connect comes from the store's own client (``locate_for``): its pool's
connection arguments, or, behind a Sentinel, the master the Sentinels name at each connect.
A pipe Redis closed says so at once (``closed``), so a write is never sent on it; one whose
connection breaks while a write is out fails that write, since Redis may have run it.
"""

from __future__ import annotations

import asyncio
import collections
import select
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import hiredis
from redis.exceptions import (
    AskError,
    AuthenticationError,
    BusyLoadingError,
    ClusterCrossSlotError,
    ClusterDownError,
    ExecAbortError,
    MasterDownError,
    MovedError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

__all__ = ["Endpoint", "Locate", "Pipe", "Replies", "bulk", "encode", "fixed", "locate_for",
           "node_locate", "open_pipe"]

# a write's replies, each a value or the ResponseError Redis answered; or what ended the write
Replies = list[Any] | BaseException
Done = Callable[[Replies], None]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a Redis listens, and how to be let in."""

    host: str = "localhost"
    port: int = 6379
    path: str = ""  # a Unix socket, instead of host and port
    username: str | None = None
    password: str | None = None
    db: int = 0
    tls: ssl.SSLContext | None = None

    @classmethod
    def of(cls, arguments: Mapping[str, Any], tls: ssl.SSLContext | None = None) -> Endpoint:
        """From redis-py's connection arguments (a pool's ``connection_kwargs``)."""
        return cls(host=str(arguments.get("host") or "localhost"),
                   port=int(arguments.get("port") or 6379),
                   path=str(arguments.get("path") or ""),
                   username=arguments.get("username"), password=arguments.get("password"),
                   db=int(arguments.get("db") or 0), tls=tls)

    def handshake(self) -> list[tuple[bytes, ...]]:
        """The commands a new connection sends first."""
        commands: list[tuple[bytes, ...]] = []
        if self.password is not None:
            credentials = (self.password,) if self.username is None else (self.username,
                                                                          self.password)
            commands.append((b"AUTH", *[part.encode() for part in credentials]))
        if self.db:
            commands.append((b"SELECT", b"%d" % self.db))
        return commands


# Where the checks connect, asked at each connect (a Sentinel's master can change).
Locate = Callable[[], Awaitable[Endpoint]]


def bulk(data: bytes) -> bytes:
    """One argument of a command, in RESP."""
    return b"$%d\r\n%s\r\n" % (len(data), data)


def encode(*parts: bytes) -> bytes:
    """One command in RESP."""
    return b"*%d\r\n" % len(parts) + b"".join([bulk(part) for part in parts])


# An error reply's code, and the exception redis-py raises for it (its message is the rest):
# redis-py's own table is not public, and the limiter and the Cluster code tell them apart.
ERRORS: dict[str, type[Exception]] = {
    "ERR": ResponseError, "NOSCRIPT": NoScriptError, "READONLY": ReadOnlyError,
    "MOVED": MovedError, "ASK": AskError, "TRYAGAIN": TryAgainError,
    "CLUSTERDOWN": ClusterDownError, "CROSSSLOT": ClusterCrossSlotError,
    "MASTERDOWN": MasterDownError, "LOADING": BusyLoadingError, "OOM": OutOfMemoryError,
    "NOAUTH": AuthenticationError, "WRONGPASS": AuthenticationError,
    "NOPERM": NoPermissionError, "EXECABORT": ExecAbortError,
}


def reply_error(message: str) -> Exception:
    """An error reply as the exception redis-py raises for it."""
    code, _, rest = message.partition(" ")
    kind = ERRORS.get(code)
    if kind is None:
        return ResponseError(message)
    try:
        return kind(rest)
    except Exception:  # (a MOVED or ASK whose address cannot be read)
        return ResponseError(message)


class Pipe(asyncio.Protocol):
    """One connection to Redis: writes go out as given, each write's replies come back to
    its callback, in the order the writes were sent."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader(replyError=reply_error)
        self.transport: asyncio.Transport | None = None
        self.closed = False  # no write may be sent: Redis closed it, or it was retired
        self._waiting: collections.deque[tuple[int, list[Any], Done]] = collections.deque()
        self._poll = select.poll()
        # whatever the connection began with has been read (over TLS, a session ticket may
        # follow the handshake: not before a reply has come)
        self._settled = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses, but behave as one)
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._poll.register(sock.fileno(), select.POLLIN)
        self._settled = transport.get_extra_info("sslcontext") is None

    def usable(self) -> bool:
        """Whether a write may be sent now. With nothing out, anything the socket holds is
        the end of a connection Redis closed (a restart) that the event loop has not read
        yet: uvloop reads sockets before it runs what the last turn scheduled, asyncio's own
        loop after, so the pipe asks the socket itself, and closes."""
        if self.closed:
            return False
        if self._waiting or not self._settled or not self._poll.poll(0):
            return True
        self.abort(RedisConnectionError("Redis closed the connection"))
        return False

    def send(self, data: bytes, expected: int, done: Done) -> None:
        """Write ``data`` (``expected`` commands); ``done`` gets their replies, or what ended
        the connection first."""
        if self.closed or self.transport is None:
            raise RedisConnectionError("the connection to Redis is closed")
        self._waiting.append((expected, [], done))
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiting = self._waiting
        while waiting:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError:
                self.abort(RedisConnectionError("Redis sent what is not RESP"))
                return
            if reply is False:
                return
            expected, replies, done = waiting[0]
            replies.append(reply)
            if len(replies) == expected:
                waiting.popleft()
                self._settled = True
                done(replies)
                if waiting is not self._waiting:  # (``done`` ended the connection)
                    return
        if self.closed:  # retired, and the last write out is answered
            self.close()

    def eof_received(self) -> bool:
        # (before connection_lost, as the loop reads the end: no write is sent after it)
        self.closed = True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(RedisConnectionError("Redis closed the connection") if exc is None
                   else RedisConnectionError(f"the connection to Redis broke: {exc}"))

    def retire(self) -> None:
        """Send nothing more, and close once the writes out are answered."""
        self.closed = True
        if not self._waiting:
            self.close()

    def abort(self, exc: BaseException) -> None:
        """End the connection at once; the writes out fail with ``exc``."""
        self.closed = True
        self._fail(exc)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    def close(self) -> None:
        """End the connection once what was written is sent."""
        self.closed = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _fail(self, exc: BaseException) -> None:
        waiting, self._waiting = self._waiting, collections.deque()
        for _, _, done in waiting:
            done(exc)


async def open_pipe(endpoint: Endpoint) -> Pipe:
    """A pipe to ``endpoint``, authenticated and on its database; the caller bounds the time
    it takes. Failing to connect raises redis-py's ConnectionError, as its own clients do; a
    refused handshake, the error Redis answered."""
    loop = asyncio.get_running_loop()
    pipe: Pipe
    try:
        if endpoint.path:
            _, pipe = await loop.create_unix_connection(Pipe, endpoint.path, ssl=endpoint.tls)
        else:
            _, pipe = await loop.create_connection(
                Pipe, endpoint.host, endpoint.port, ssl=endpoint.tls,
                server_hostname=endpoint.host if endpoint.tls is not None else None)
    except OSError as exc:  # (refused, unreachable, a name that does not resolve, TLS)
        raise RedisConnectionError(f"could not connect to Redis: {exc}") from exc
    commands = endpoint.handshake()
    if not commands:
        return pipe
    answered: asyncio.Future[Replies] = loop.create_future()

    def done(replies: Replies) -> None:
        if not answered.done():
            answered.set_result(replies)

    try:
        pipe.send(b"".join(encode(*command) for command in commands), len(commands), done)
        replies = await answered
    except BaseException:
        pipe.abort(RedisConnectionError("the connection to Redis was given up"))
        raise
    if isinstance(replies, BaseException):
        raise replies
    for reply in replies:
        if isinstance(reply, Exception):
            pipe.abort(RedisConnectionError("Redis refused the connection's handshake"))
            raise reply
    return pipe


def locate_for(client: Any) -> Locate:
    """Where ``client`` (a redis-py ``Redis``) connects: its pool's connection arguments, and
    behind a Sentinel the master the Sentinels name now."""
    pool = client.connection_pool
    arguments = dict(pool.connection_kwargs)
    tls = _tls_of(pool)
    sentinels = getattr(pool, "sentinel_manager", None)
    if sentinels is not None and getattr(pool, "is_master", False):
        service = pool.service_name

        async def master() -> Endpoint:
            host, port = await sentinels.discover_master(service)
            return Endpoint.of({**arguments, "host": host, "port": port}, tls)

        return master
    if "server" in arguments or ("host" not in arguments and "path" not in arguments):
        # (fakeredis: nothing listens where it says; the store serves it, ``Store.checks``)
        raise TypeError(f"the coalesced checks cannot connect where {client!r} does")
    return fixed(Endpoint.of(arguments, tls))


def node_locate(cluster: Any, host: str, port: int) -> Locate:
    """Where the checks of one Cluster node connect: the node, with the cluster client's
    credentials."""
    return fixed(Endpoint.of({**cluster.get_connection_kwargs(), "host": host, "port": port}))


def fixed(endpoint: Endpoint) -> Locate:
    """Always ``endpoint``."""

    async def locate() -> Endpoint:
        return endpoint

    return locate


def _tls_of(pool: Any) -> ssl.SSLContext | None:
    """The TLS context redis-py builds for ``pool``'s connections (``rediss://``), if any."""
    from redis.asyncio.connection import SSLConnection

    if not issubclass(pool.connection_class, SSLConnection):
        return None
    context: ssl.SSLContext = pool.make_connection().ssl_context.get()
    return context
