"""A Redis connection the coalescer holds and speaks to itself: a batch is one write, and its
replies are parsed as they arrive, with no task and no stream in between.

redis-py reads a reply through asyncio's streams: a batch sent with ``send_packed_command``
and read with ``read_response`` costs a task to run it, an ``asyncio.timeout``, a
``StreamWriter.drain``, and for each reply a ``StreamReader`` wait and a pass of the task.
With two workers that was 3 - 5 us of worker CPU per ``/v1/check`` request at 15 checks
per call, up to a tenth of it (``loadtest/README.md``).

``HeldConnection.take`` takes a connection redis-py's pool made, so connecting, AUTH, SELECT,
TLS and Sentinel's choice of master stay redis-py's, and makes itself its transport's
protocol: ``send`` writes a batch's commands, ``data_received`` feeds hiredis (with
redis-py's error classes, so a reply error is the exception redis-py would raise), and once
the batch's replies are all in, the owner's callback gets them. One batch at a time is out
on a connection. The owner gets instead, and the connection is closed:

- a ``TimeoutError`` when the batch's deadline passes first;
- a ``ConnectionError`` when the connection breaks first (``answered`` tells how many of the
  batch's replies came before it: with none, nothing of the batch can have run);
- redis-py's ``InvalidResponse`` when the bytes are not RESP.

A closed connection goes back to its pool through ``release``, disconnected, so the pool
connects it again before its next use.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse

try:
    import hiredis
    from redis._parsers.base import BaseParser
except ImportError:  # pragma: no cover - redis-py's hiredis extra is a dependency
    HIREDIS = False
else:
    HIREDIS = True

__all__ = ["HeldConnection", "available"]

# (held connection, the batch's token, its replies or what ended it)
Done = Callable[["HeldConnection", Any, "list[Any] | BaseException"], None]


def available() -> bool:
    """Whether connections can be held (hiredis parses their replies)."""
    return HIREDIS


class HeldConnection(asyncio.Protocol):
    """A redis-py connection whose transport this protocol reads (see the module)."""

    __slots__ = ("_done", "_expected", "_loop", "_reader", "_replies", "_streams", "_timer",
                 "_token", "closed", "connection", "transport")

    def __init__(self, connection: Any, transport: asyncio.Transport, done: Done,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.connection = connection
        self.transport = transport
        # redis-py's protocol, told when the connection ends (its close waits for that)
        self._streams = transport.get_protocol()
        self._done = done
        self._loop = loop
        kwargs: dict[str, Any] = {"protocolError": InvalidResponse,
                                  "replyError": BaseParser.parse_error}
        encoder = getattr(connection, "encoder", None)
        if encoder is not None and encoder.decode_responses:
            kwargs["encoding"] = encoder.encoding
            kwargs["errors"] = encoder.encoding_errors
        self._reader = hiredis.Reader(**kwargs)
        self._token: Any = None  # the batch out on this connection (None: none)
        self._expected = 0
        self._replies: list[Any] = []
        self._timer: asyncio.TimerHandle | None = None
        self.closed = False

    @classmethod
    def take(cls, connection: Any, done: Done) -> HeldConnection:
        """Hold ``connection`` (connected, fresh from its pool, with nothing left to read)."""
        transport = connection._writer.transport
        held = cls(connection, transport, done, asyncio.get_running_loop())
        transport.set_protocol(held)
        return held

    @property
    def answered(self) -> int:
        """How many replies of the batch out have come."""
        return len(self._replies)

    def send(self, data: bytes, replies: int, token: Any, deadline: float | None) -> None:
        """Write ``data`` (``replies`` commands); the owner's callback gets ``token`` and
        their replies, or what ended them, by ``deadline`` (loop time) at the latest."""
        if self.closed:
            raise RedisConnectionError("a closed held connection was sent a batch")
        self._token = token
        self._expected = replies
        self._replies = []
        if deadline is not None:
            self._timer = self._loop.call_at(deadline, self._expire)
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        try:
            while True:
                reply = reader.gets()
                if reply is False:
                    return
                if self._token is None:  # a reply nobody asked for: not RESP we can follow
                    raise InvalidResponse("a reply came while no batch was out")
                replies = self._replies  # (the owner's callback may have sent the next batch)
                replies.append(reply)
                if len(replies) == self._expected:
                    token, self._token = self._token, None
                    if self._timer is not None:
                        self._timer.cancel()
                        self._timer = None
                    self._done(self, token, replies)
        except InvalidResponse as exc:
            self._end(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(RedisConnectionError(
            "Connection closed by server." if exc is None else f"Connection lost: {exc}"))
        self._streams.connection_lost(exc)

    def eof_received(self) -> bool | None:
        return False  # (the transport then closes: connection_lost)

    def _expire(self) -> None:
        self._timer = None
        self._end(TimeoutError("Redis did not answer a batch before its deadline"))

    def _end(self, exc: BaseException) -> None:
        """Close; the batch out, if any, ends with ``exc``."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.closed:
            self.closed = True
            self.transport.abort()
        token, self._token = self._token, None
        if token is not None:
            self._done(self, token, exc)

    def close(self) -> None:
        """Close it (a batch out on it ends with a ConnectionError)."""
        self._end(RedisConnectionError("the held connection was closed"))

    async def release(self, pool: Any) -> None:
        """Close it and give the connection back to ``pool``, the pool it came from (which
        connects it anew)."""
        self.close()
        await self.connection.disconnect(nowait=True)
        await pool.release(self.connection)
