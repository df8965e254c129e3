"""Workers sharing one accept queue, each taking its share of the connections.

The supervisor's workers accept from one listening socket (``runner``: a draining worker
just stops taking from the queue and the others take what waits there, so a rolling restart
fails no request). Left to the event loop, whichever worker wakes first accepts every
connection waiting: a client that opens its pool in one burst (nginx's upstream keepalive,
wrk's 64 connections) could land entirely on one worker, and the other cores serve nobody.

Here each worker publishes how many connections it holds in a slot of memory the workers
share (a ``multiprocessing`` array the supervisor made), and a worker holding more than
``SLACK`` connections above the least loaded worker that accepts stops listening for a
moment (``PAUSE``), so that worker takes the ones waiting. No connection waits long for
it: a worker that has yielded for ``PATIENCE`` while connections still wait takes them
itself, and a worker that stops (draining, starting, dead) marks its slot ``NOT_ACCEPTING``
so nobody yields to it. Only accepting looks at the slots; a request costs nothing.

The slots also say which workers are warm (their Redis connections open, their scripts
loaded: ``warmup``), so any worker can tell whether every worker of the server is warm and
accepting (``/readyz``), and whether the whole server is stopping: then each worker takes
what waits in the queue before it closes its copy of the listening socket, so the socket
closes with nothing waiting in it (a connection still queued when the last copy closes is
reset) and from then on a new connection is refused at once. A worker that stops alone (a
rolling restart) leaves what waits to the others.

Every accepted connection gets the worker's ``guard.Gate`` as its protocol factory; at the
gate's cap, the site closes an idle connection for each one waiting, or when none is
idle stops listening until a connection ends (``Gate.make_room``).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import select
import socket
import time
from typing import Any

from aiohttp import web

from ratekeeper.server.guard import Gate

__all__ = ["AcceptShare", "AcceptSlots", "BalancedSite"]

log = logging.getLogger("ratekeeper.process.accept")

NOT_ACCEPTING = -1  # a slot whose worker is starting, draining, gone or never was
SLACK = 1  # connections a worker may hold above the least loaded one before it yields
PAUSE = 0.001  # how long a worker that yields stops listening
PATIENCE = 0.05  # after yielding this long with connections still waiting, accept them
BEAT = 0.1  # a serving worker says it is alive this often
STALE = 0.5  # a worker silent this long (stopped, stuck) is not yielded to
ACCEPT_BURST = 64  # connections accepted per wake-up at most
RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class AcceptSlots:
    """Shared memory for ``size`` workers (``multiprocessing`` arrays the supervisor makes
    and passes to each worker it spawns): per slot, the connections its worker holds
    (NOT_ACCEPTING when it does not accept), when it last said it was alive
    (``time.monotonic``, one clock for every process of the machine) and whether it is
    warm; for the server, how many workers it runs (``workers``, default ``size``) and
    whether it is stopping as a whole."""

    def __init__(self, size: int, context: Any, *, workers: int | None = None) -> None:
        self.counts = context.RawArray("i", size)
        self.beats = context.RawArray("d", size)
        self.warm = context.RawArray("b", size)
        self.stopping = context.RawValue("b", 0)
        self.workers = size if workers is None else workers
        for slot in range(size):
            self.counts[slot] = NOT_ACCEPTING

    def __len__(self) -> int:
        return len(self.counts)

    def release(self, slot: int) -> None:
        """The slot's worker is gone, or not yet serving."""
        self.counts[slot] = NOT_ACCEPTING
        self.warm[slot] = 0

    def stop_all(self) -> None:
        """The whole server stops: each worker takes what waits before it closes its socket."""
        self.stopping.value = 1

    def unready(self) -> str | None:
        """Why the server should not take traffic now; None when it should: as many warm,
        accepting, live workers as it runs, and not stopping."""
        if self.stopping.value:
            return "the server is stopping"
        alive = time.monotonic() - STALE
        serving = sum(1 for slot in range(len(self))
                      if self.counts[slot] >= 0 and self.beats[slot] > alive and self.warm[slot])
        if serving >= self.workers:
            return None
        return f"{serving} of {self.workers} workers are warm and accepting"


class AcceptShare:
    """One worker's part of the slots: its own count, and whether it should yield."""

    __slots__ = ("beats", "counts", "slot", "slots", "yielding_since")

    def __init__(self, slots: AcceptSlots, slot: int) -> None:
        self.slots = slots
        self.counts, self.beats = slots.counts, slots.beats
        self.slot = slot
        self.yielding_since: float | None = None

    def start(self) -> None:
        self.beat()
        self.counts[self.slot] = 0

    def stop(self) -> None:
        self.counts[self.slot] = NOT_ACCEPTING

    def warmed(self) -> None:
        """This worker's Redis connections are open and its scripts loaded."""
        self.slots.warm[self.slot] = 1

    def everyone_stops(self) -> bool:
        """Whether the whole server is stopping, not this worker alone."""
        return bool(self.slots.stopping.value)

    def beat(self) -> None:
        self.beats[self.slot] = time.monotonic()

    def opened(self) -> None:
        if self.counts[self.slot] >= 0:
            self.counts[self.slot] += 1

    def closed(self) -> None:
        if self.counts[self.slot] > 0:
            self.counts[self.slot] -= 1

    def over_share(self, now: float) -> bool:
        """Whether another live accepting worker holds more than SLACK fewer connections."""
        counts, beats, mine = self.counts, self.beats, self.counts[self.slot]
        alive = now - STALE
        least = min((counts[i] for i in range(len(counts))
                     if i != self.slot and counts[i] >= 0 and beats[i] > alive), default=None)
        return least is not None and mine > least + SLACK

    def should_yield(self, now: float) -> bool:
        """Whether to leave the waiting connections to another worker now."""
        if not self.over_share(now):
            self.yielding_since = None
            return False
        if self.yielding_since is None:
            self.yielding_since = now
        return now - self.yielding_since < PATIENCE

    def caught_up(self) -> None:
        """Nothing waits any more: the next wait for another worker starts afresh."""
        self.yielding_since = None


class BalancedSite(web.BaseSite):
    """aiohttp's site for a listening socket other workers share, accepting its share.

    It accepts the connections itself (rather than through ``loop.create_server``) so that it
    can stop between two of them; each accepted socket becomes a connection of ``gate`` (a
    guard around a connection of the runner's server) through
    ``loop.connect_accepted_socket``, as the loop's own server would make it. Stopping closes
    this worker's copy of the listening socket.
    """

    __slots__ = ("_beat", "_full", "_gate", "_listening", "_loop", "_name", "_paused",
                 "_share", "_sock", "_stopped", "_tasks")

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, share: AcceptShare,
                 gate: Gate) -> None:
        super().__init__(runner)
        self._sock = sock
        self._share = share
        self._gate = gate
        host, port = sock.getsockname()[:2]
        self._name = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        self._loop = asyncio.get_running_loop()
        self._paused: asyncio.TimerHandle | None = None  # yielding to the other workers
        self._full = False  # at the gate's cap, waiting for a connection to end
        self._listening = False
        self._stopped = False
        self._beat: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def name(self) -> str:
        return self._name

    async def start(self) -> None:
        await super().start()
        self._gate.released = self._released
        self._gate.start()
        self._sock.setblocking(False)
        self._share.start()
        self._beat = self._loop.call_later(BEAT, self._heartbeat)
        self._listen()

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._share.stop()
        if self._beat is not None:
            self._beat.cancel()
        if self._paused is not None:
            self._paused.cancel()
            self._paused = None
        self._deaf()
        if self._share.everyone_stops():
            self._take_waiting()
        self._sock.close()
        await super().stop()

    def _listen(self) -> None:
        if not self._listening and not self._stopped:
            self._loop.add_reader(self._sock.fileno(), self._accept)
            self._listening = True

    def _deaf(self) -> None:
        if self._listening:
            self._loop.remove_reader(self._sock.fileno())
            self._listening = False

    def _accept(self) -> None:
        share, gate = self._share, self._gate
        for _ in range(ACCEPT_BURST):
            if share.should_yield(time.monotonic()):
                self._pause(PAUSE)
                return
            if gate.full:
                if not _waiting(self._sock):
                    share.caught_up()
                    return
                if not gate.make_room():  # every connection is busy
                    self._full = True  # until one ends (_released)
                    self._deaf()
                    return
            if not self._take_one():
                return

    def _take_one(self) -> bool:
        """Accept one waiting connection; False when none waits or none can be taken now."""
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            self._share.caught_up()
            return False
        except OSError as exc:
            if exc.errno in RESOURCE_ERRORS:  # out of descriptors: leave them queued
                log.error("cannot accept a connection: %s", exc.strerror)
                self._pause(1.0)
                return False
            return True  # that one connection is gone (ECONNABORTED and the like)
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._share.opened()
        self._gate.opened()
        task = self._loop.create_task(self._connect(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    def _take_waiting(self) -> None:
        """Accept every connection waiting in the queue, whatever the share and the cap:
        the socket is about to close, and would reset them."""
        taken = 0
        while not self._paused and self._take_one():
            taken += 1
        if self._paused is not None:
            self._paused.cancel()
            self._paused = None
        if taken:
            log.info("took the %d connection(s) waiting before closing the socket", taken)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._gate, sock=conn)
        except Exception as exc:  # e.g. the client already reset it
            # (its type only: an error about a socket may carry the client's address)
            log.debug("accepted connection dropped: %s", type(exc).__name__)
            conn.close()
            self._gate.failed()

    def _released(self) -> None:
        """A connection ended."""
        self._share.closed()
        if self._full and not self._gate.full:
            self._full = False
            if self._paused is None:
                self._listen()

    def _heartbeat(self) -> None:
        self._share.beat()
        self._beat = self._loop.call_later(BEAT, self._heartbeat)

    def _pause(self, seconds: float) -> None:
        self._deaf()
        self._paused = self._loop.call_later(seconds, self._resume)

    def _resume(self) -> None:  # (stop cancels it)
        self._paused = None
        if not _waiting(self._sock):  # another worker took them
            self._share.caught_up()
        if not self._full:
            self._listen()


def _waiting(sock: socket.socket) -> bool:
    """Whether connections wait in the listening socket's queue."""
    poll = select.poll()  # (not select.select: any descriptor number)
    poll.register(sock, select.POLLIN)
    return bool(poll.poll(0))
