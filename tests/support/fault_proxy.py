"""A TCP proxy between the sidecar and a redis-server that a test tells to misbehave.

The proxy runs on the test's event loop and passes bytes through untouched until told
otherwise. Each fault acts on one step of the way to Redis:

- ``refuse()``: stop listening, so connecting fails at once (``accept()`` listens again on
  the same port);
- ``hold_new``: connections accepted from now on complete the TCP handshake but carry nothing
  either way, so the client's connect (its handshake commands) hangs;
- ``hold_writes`` / ``hold_replies``: bytes towards Redis / towards the client wait in the
  proxy, on every connection;
- ``cut_next_reply()``: the reply to the next watched call is forwarded in part, then the
  connection is closed;
- ``close_on_use``: a connection that carries a watched call is closed before a byte of it
  reaches Redis (a connection that dies as it is taken into use);
- ``drop_all()``: close every connection now, with a FIN or a reset.

``clear()`` ends every fault: held bytes go on their way (late) on the connections still
open. A connection that either side closes is closed on the other side too, and the bytes it
held are dropped.

A watched call is a write towards Redis that carries one of the ``watch`` markers (say, a
script's SHA1) within one read: the proxy counts them (``calls``) and the replies Redis sent them
(``replies``, held or not), so a test knows when Redis has run a call.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

__all__ = ["FaultProxy"]

TO_REDIS = 0
TO_CLIENT = 1
CHUNK = 65536


class FaultProxy:
    """A misbehaving TCP proxy in front of ``upstream_port`` on 127.0.0.1 (see the module)."""

    def __init__(self, upstream_port: int, *, watch: tuple[bytes, ...] = (),
                 host: str = "127.0.0.1") -> None:
        self.host = host
        self.upstream_port = upstream_port
        self.watch = tuple(marker.upper() for marker in watch)
        self.port = 0  # chosen when it first listens
        self.hold_new = False
        self.hold_writes = False
        self.hold_replies = False
        self.close_on_use = False
        self.accepted = 0  # connections accepted, ever
        self.calls = 0  # watched calls on their way to Redis
        self.replies = 0  # replies to watched calls that came from Redis (held or not)
        self.cuts = 0  # replies cut short
        self.lost = 0  # replies to watched calls held when their connection closed
        self.closed_on_use = 0  # connections closed by ``close_on_use``
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._cut = False

    @property
    def url(self) -> str:
        """The redis:// URL that reaches Redis through the proxy."""
        return f"redis://{self.host}:{self.port}/0"

    async def start(self) -> FaultProxy:
        """Listen on a free port."""
        await self.accept()
        return self

    async def accept(self) -> None:
        """Listen (again, on the same port once one was chosen)."""
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._accepted, self.host, self.port,
                                                  reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def refuse(self) -> None:
        """Stop listening: new connections are refused; open ones carry on."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    def cut_next_reply(self) -> None:
        """Cut the reply to the next watched call short, and close its connection."""
        self._cut = True

    def drop_all(self, *, reset: bool = False) -> None:
        """Close every open connection (``reset``: with an RST instead of a FIN)."""
        for link in list(self._links):
            link.close(reset=reset)

    def clear(self) -> None:
        """End every fault but ``refuse()``; held bytes go on their way."""
        self.hold_new = self.hold_writes = self.hold_replies = self.close_on_use = False
        self._cut = False
        for link in list(self._links):
            link.hold_all = False
            link.flush()

    async def close(self) -> None:
        """Stop listening and close every connection."""
        await self.refuse()
        self.drop_all()
        # (not cancelled: asyncio's server reports a cancelled connection task as an error)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)

    def holds(self, link: _Link, direction: int) -> bool:
        """Whether bytes of ``link`` going ``direction`` wait in the proxy now."""
        if link.hold_all:
            return True
        return self.hold_writes if direction == TO_REDIS else self.hold_replies

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                        ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.accepted += 1
        link = _Link(self, writer)
        self._links.add(link)
        try:
            await link.run(reader)
        finally:
            self._links.discard(link)
            self._tasks.discard(task)
            link.close()

    def passing(self, link: _Link, direction: int, data: bytes) -> None:
        """Bytes read from one side, on their way to the other."""
        watched_reply = False
        if direction == TO_REDIS:
            upper = data.upper()
            if any(marker in upper for marker in self.watch):
                if self.close_on_use:
                    self.closed_on_use += 1
                    link.close()
                    return
                self.calls += 1
                link.awaiting_reply = True
                # (a call pipelined behind one still to be answered keeps that one's cut)
                link.cut_reply, self._cut = link.cut_reply or self._cut, False
        elif link.awaiting_reply:
            link.awaiting_reply = False
            self.replies += 1
            watched_reply = True
            if link.cut_reply:
                link.cut_reply = False
                self.cuts += 1
                link.write(direction, data[:max(1, len(data) // 2)])
                link.close()
                return
        if self.holds(link, direction) or link.held[direction]:
            link.held[direction] += data
            link.watched_reply |= watched_reply
            return
        link.write(direction, data)


class _Link:
    """One client connection and its connection to Redis."""

    def __init__(self, proxy: FaultProxy, client: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.writers: list[asyncio.StreamWriter | None] = [None, client]  # by direction
        self.held = [bytearray(), bytearray()]  # by direction
        self.hold_all = proxy.hold_new
        self.awaiting_reply = False  # a watched call went; its reply has not come
        self.cut_reply = False
        self.watched_reply = False  # the bytes held towards the client hold such a reply
        self.closed = False

    async def run(self, client: asyncio.StreamReader) -> None:
        try:
            upstream, to_redis = await asyncio.open_connection(self.proxy.host,
                                                               self.proxy.upstream_port)
        except OSError:
            return  # Redis is down: the client sees its connection closed
        if self.closed:  # closed while it connected
            to_redis.close()
            return
        self.writers[TO_REDIS] = to_redis
        pumps = [asyncio.ensure_future(self._pump(client, TO_REDIS)),
                 asyncio.ensure_future(self._pump(upstream, TO_CLIENT))]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    async def _pump(self, source: asyncio.StreamReader, direction: int) -> None:
        with contextlib.suppress(OSError):
            while not self.closed:
                data = await source.read(CHUNK)
                if not data:
                    return
                self.proxy.passing(self, direction, data)

    def write(self, direction: int, data: bytes) -> None:
        writer = self.writers[direction]
        if writer is not None and not self.closed and data:
            writer.write(data)

    def flush(self) -> None:
        """Send what was held, unless the proxy still holds this direction."""
        for direction in (TO_REDIS, TO_CLIENT):
            if self.held[direction] and not self.proxy.holds(self, direction):
                data, self.held[direction] = bytes(self.held[direction]), bytearray()
                self.write(direction, data)
        if not self.held[TO_CLIENT]:
            self.watched_reply = False

    def close(self, *, reset: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        if self.watched_reply and self.held[TO_CLIENT]:
            self.proxy.lost += 1
        for writer in self.writers:
            if writer is None:
                continue
            if reset:
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
                writer.transport.abort()
            else:
                writer.close()
