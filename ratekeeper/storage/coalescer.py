"""Coalescing: the checks queued in one event-loop tick go to Redis as one write.

Under load many requests reach their check in the same tick of the event loop. Sent one by
one, each would take a pooled connection, a write, a read and a script call of its own;
coalesced, the tick's checks are one write of check.lua calls that Redis decides one after
another (each call reads TIME once). Exactness is unchanged: each call is atomic, and the
calls of a write run in the order they were queued, which is the order the callers asked.

The deadline: a batch's fail modes decide only when Redis fails. The clock of a batch starts
when it leaves this process's queue (never while it waits there behind other batches), its
budget grows with its size (``timeout`` plus ``per_check`` for each check it carries), so a
large batch is not failed for being large, and a deadline the event loop was too busy to
keep is moved on (``within``): the process's own load never turns into a deadline miss.
Large groups are sent as several check.lua calls of at most ``max_checks`` checks in the one
write, so Redis serves other clients between them, and the calls still run in order.

Batches go over one connection to Redis that answers by callback (``pipe.Pipe``): a write
is sent from the tick's flush, with no task of its own, and its replies settle the callers
as they are read. Up to ``max_inflight`` writes are out on it, pipelined; Redis runs them in
the order they were sent. The connection opens on first use and again after Redis closed it
(a restart): a pipe knows it is closed as soon as the event loop reads the end, so a write is
never sent on it, and a write whose connection breaks while it is out is failed, since Redis
may have run it. A write that misses its deadline ends its connection too, as replies still
to come would belong to it. Only READONLY from a Sentinel's master, answered before anything
ran, sends the write once more, on a new connection to the master the Sentinels name then. A
NOSCRIPT reply (a restart, a failover, SCRIPT FLUSH) is answered by sending those calls again
as EVAL, which carries the source. Errors reach each caller as redis-py would raise them;
``on_batch`` hears of every batch's end (its seconds, or what ended it) once, so the breaker
counts a failed write once, not once per check in it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ReadOnlyError, ResponseError

from ratekeeper.storage.pipe import Locate, Pipe, Replies, bulk, open_pipe
from ratekeeper.storage.scripts import LuaScript, check_replies

__all__ = ["Arg", "Coalescer", "Request", "within"]

T = TypeVar("T")

Arg = str | int | bytes
# one check: its KEYS, now (ARGV[1], '' for Redis TIME), cost, the rule set of its action
Request = tuple[Sequence[str], Arg, Arg, tuple[Arg, ...]]
Command = tuple[list[str], list[Arg]]  # KEYS and ARGV of one check.lua call

# Checks one write carries at most (whole groups; a larger group goes alone).
MAX_BATCH = 1024
# Checks one check.lua call decides at most: Redis serves other clients between calls.
MAX_CHECKS = 128
# Writes out at a time: while Redis runs one, the next is on its way with the checks that
# came meanwhile, so neither this process nor Redis waits for the other.
MAX_INFLIGHT = 2
PER_CHECK = 0.0002  # seconds of budget each check adds to its batch's deadline
GRACE = 0.005  # seconds a batch past its budget waits for a reply the loop has not read yet
LAG = 0.002  # seconds late a timer may fire and still count as the loop keeping time
SLACK = 1.0  # seconds past its budget a batch fails however late the loop is

# (seconds, None) when Redis answered a batch; (seconds, exception) when it ended otherwise
BatchObserver = Callable[[float, BaseException | None], None]


def _bulk(value: Arg) -> bytes:
    return bulk(value if isinstance(value, bytes) else str(value).encode())


# The encoding of the arguments that repeat from call to call (counts, costs, each rule's
# limit, window and algorithm), by value: a key is always new, an argument seldom.
_ENCODED: dict[str | int, bytes] = {}
_MAX_ENCODED = 4096


def encode_command(name: bytes, first: str | bytes, keys: Sequence[str],
                   args: Sequence[Arg]) -> bytes:
    """One EVALSHA (``first``: the SHA) or EVAL (``first``: the source) in RESP."""
    parts = [b"*%d\r\n" % (3 + len(keys) + len(args)), bulk(name), _bulk(first),
             _bulk(len(keys))]
    parts += [bulk(key.encode()) for key in keys]
    encoded = _ENCODED
    for arg in args:
        if isinstance(arg, bytes) or arg is True or arg is False:  # (True would find 1's)
            parts.append(_bulk(arg))
            continue
        known = encoded.get(arg)
        if known is None:
            known = _bulk(arg)
            if len(encoded) < _MAX_ENCODED:
                encoded[arg] = known
        parts.append(known)
    return b"".join(parts)


class Coalescer:
    """Runs check.lua for many callers: one write per event-loop tick, few out at once."""

    def __init__(self, locate: Locate, script: LuaScript, *, timeout: float,
                 per_check: float = PER_CHECK, max_batch: int = MAX_BATCH,
                 max_checks: int = MAX_CHECKS, max_inflight: int = MAX_INFLIGHT,
                 sentinel: bool = False,
                 slot_of: Callable[[str], int] | None = None) -> None:
        self.locate = locate  # where the connection goes, asked at each connect
        self.script = script
        self.timeout = timeout
        self.per_check = per_check
        self.max_batch = max_batch
        self.max_checks = max_checks
        self.max_inflight = max_inflight
        # a Sentinel's master: READONLY there means it was demoted (``_Write.answered``)
        self.sentinel = sentinel
        # a Cluster node's: a script call's keys must share one slot (``_merged``)
        self.slot_of = slot_of
        self.on_batch: BatchObserver | None = None
        self.batches = 0  # writes sent
        self.checks = 0  # checks sent
        self._queue: list[tuple[Request, asyncio.Future[Any]]] = []
        self._groups: list[int] = []  # checks per submit(), in order: never split
        self._scheduled = False
        self._inflight = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pipe: Pipe | None = None
        self._opening: asyncio.Task[None] | None = None
        self._again: list[_Write] = []  # writes to send once more, on the next connection
        self._closed = False

    async def connect(self) -> None:
        """Open the connection now, if none is open (readiness: the first check finds it)."""
        self._adopt(asyncio.get_running_loop())
        if self._pipe is None or self._pipe.closed:
            self._open()
        if self._opening is not None:
            await asyncio.shield(self._opening)
        if self._pipe is None or self._pipe.closed:
            raise RedisConnectionError("the checks' connection to Redis could not be opened")

    async def close(self) -> None:
        """Close the connection; what is still out or waiting fails, and nothing is sent
        from now on."""
        self._closed = True
        pipe, self._pipe = self._pipe, None
        opening, self._opening = self._opening, None
        if self._loop is None or self._loop.is_closed():  # (what it had went with its loop)
            return
        if opening is not None:
            opening.cancel()
        closed = RedisConnectionError("the coalescer was closed")
        if pipe is not None:
            pipe.abort(closed)
        self._give_up(closed)

    def submit(self, requests: Sequence[Request]) -> list[asyncio.Future[Any]]:
        """Queue checks that go in one write, in order; one future each, resolving to the
        check's flat reply (or failing with what Redis raised for it)."""
        loop = asyncio.get_running_loop()
        self._adopt(loop)
        futures = [loop.create_future() for _ in requests]
        self._queue += zip(requests, futures, strict=True)
        self._groups.append(len(futures))
        if not self._scheduled and self._may_send():
            self._scheduled = True
            loop.call_soon(self._flush)
        return futures

    def _adopt(self, loop: asyncio.AbstractEventLoop) -> None:
        if loop is not self._loop:  # what was pending belonged to a loop that is gone
            self._loop, self._queue, self._groups = loop, [], []
            self._scheduled, self._inflight, self._again = False, 0, []
            self._pipe, self._opening = None, None  # (so did the connection's transport)

    def _may_send(self) -> bool:
        return self._inflight < self.max_inflight

    def _flush(self, spent: float = 0.0) -> None:
        """Send what is queued, as far as the writes allowed out go (``spent``: the seconds
        these checks already waited for the connection, which their deadline counts)."""
        self._scheduled = False
        if self._closed:
            self._give_up(RedisConnectionError("the coalescer was closed"))
            return
        pipe = self._pipe
        if pipe is None or not pipe.usable():
            if self._queue:
                self._open()
            return
        while self._queue and self._may_send():
            size = self._cut()
            batch = self._queue[:size]
            del self._queue[:size]
            # a caller that gave up (its request was cancelled) is not sent: the hit it
            # asked for must not be taken behind its back
            live = [call for call in batch if not call[1].done()]
            if not live:
                continue
            self._inflight += 1
            self.batches += 1
            self.checks += len(live)
            try:
                write = _Write(self, live, spent)
            except Exception as exc:  # (checks that cannot be put as script calls)
                self.settle(live, exc)
                continue
            write.send(pipe)

    def _cut(self) -> int:
        """How many queued checks the next write takes: whole groups, at most ``max_batch``
        checks, or the first group whatever its size."""
        size = taken = 0
        for group in self._groups:
            if taken and size + group > self.max_batch:
                break
            size += group
            taken += 1
        del self._groups[:taken]
        return size

    def _open(self) -> None:
        """Open a connection in the background, unless one is opening."""
        if self._opening is None and not self._closed:
            self._opening = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        """Connect within the deadline; then send what waited for it, its deadline counting
        the wait. What waited fails with the error when connecting does."""
        started = time.perf_counter()
        try:
            pipe = await within(self._locate_and_open(), self.timeout)
        except Exception as exc:
            self._opening = None
            self._give_up(exc, time.perf_counter() - started)
            return
        self._pipe, self._opening = pipe, None
        again, self._again = self._again, []
        for write in again:
            write.send(pipe)
        self._flush(spent=time.perf_counter() - started)

    async def _locate_and_open(self) -> Pipe:
        return await open_pipe(await self.locate())

    def _give_up(self, exc: Exception, seconds: float | None = None) -> None:
        """Fail what waits to be sent: a connection could not be opened in ``seconds`` (which
        ``on_batch`` hears of), or the coalescer was closed."""
        queued, self._queue, self._groups = self._queue, [], []
        again, self._again = self._again, []
        for write in again:
            write.end(exc)
        if queued and seconds is not None and self.on_batch is not None:
            self.on_batch(seconds, exc)
        for _, future in queued:
            if not future.done():
                future.set_exception(exc)

    def send_again(self, write: _Write) -> None:
        """Send ``write`` once more, on a connection opened since it was sent (or the next)."""
        pipe = self._pipe
        if pipe is not None and pipe.usable():
            write.send(pipe)
            return
        self._again.append(write)
        self._open()

    def settle(self, batch: list[tuple[Request, asyncio.Future[Any]]],
               outcome: list[Any] | BaseException) -> None:
        """A write ended: its callers get their replies (or what ended it)."""
        self._inflight -= 1
        for i, (_, future) in enumerate(batch):
            if future.done():  # the caller gave up while its batch was out
                continue
            result = outcome if isinstance(outcome, BaseException) else outcome[i]
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
        if self._queue and not self._scheduled and self._may_send():
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)


class _Write:
    """One write out: its checks, the script calls they went as, its deadline."""

    __slots__ = ("batch", "callers", "coalescer", "commands", "ended", "missing", "pipe",
                 "replies", "retried", "started", "watch")

    def __init__(self, coalescer: Coalescer, batch: list[tuple[Request, asyncio.Future[Any]]],
                 spent: float = 0.0) -> None:
        self.coalescer = coalescer
        self.batch = batch
        self.started = time.perf_counter()
        self.commands, self.callers = _merged([request for request, _ in batch],
                                              coalescer.max_checks, coalescer.slot_of)
        self.ended = False
        self.retried = False  # sent once more (a demoted master)
        self.pipe: Pipe | None = None
        self.replies: list[Any] = []
        self.missing: list[int] = []  # the calls the script cache lacked, sent as EVAL
        loop = asyncio.get_running_loop()
        budget = max(0.0, coalescer.timeout - spent) + coalescer.per_check * len(batch)
        now = loop.time()
        self.watch = _Watch(loop, self.expire, now + budget, now + budget + SLACK)

    def send(self, pipe: Pipe) -> None:
        """Send the calls (EVALSHA) on ``pipe``."""
        if self.ended:
            return
        self.missing = []  # (sent again, a write goes whole)
        sha = self.coalescer.script.sha
        try:
            data = b"".join([encode_command(b"EVALSHA", sha, keys, args)
                             for keys, args in self.commands])
            pipe.send(data, len(self.commands), self.answered)
        except Exception as exc:  # (a check that cannot be encoded, a closed connection)
            self.end(exc)
            return
        self.pipe = pipe

    def answered(self, replies: Replies) -> None:
        """The replies of the calls as sent (EVALSHA), or, once ``missing`` is set, of the
        calls the script cache lacked, sent again as EVAL."""
        if self.ended:
            return
        if isinstance(replies, BaseException):
            self.end(replies)
            return
        again = self.missing
        if again:
            for i, reply in zip(again, replies, strict=True):
                self.replies[i] = reply
            replies = self.replies
        # READONLY for the first call, in a round that carried every call: none has run
        if (self.coalescer.sentinel and isinstance(replies[0], ReadOnlyError)
                and len(again) in (0, len(self.commands))):
            self.demoted()
            return
        self.missing = [] if again else [i for i, reply in enumerate(replies)
                                         if isinstance(reply, NoScriptError)]
        if not self.missing:
            self.finish(replies)
            return
        self.replies = replies
        script = self.coalescer.script.script
        data = b"".join([encode_command(b"EVAL", script, *self.commands[i])
                         for i in self.missing])
        try:
            assert self.pipe is not None
            self.pipe.send(data, len(self.missing), self.answered)
        except Exception as exc:
            self.end(exc)

    def demoted(self) -> None:
        """READONLY from a Sentinel's master for the first call: it was demoted under the
        connection, and nothing of the write has run (each call's first write would have
        met READONLY). Once more on a new connection, to the master the Sentinels name
        then; a second time, the checks fail."""
        if self.pipe is not None:  # (the writes out behind it are answered on it, and decide
            self.pipe.retire()   # each for itself)
        if self.retried:
            self.end(RedisConnectionError("the master is now a replica"))
            return
        self.retried = True
        self.coalescer.send_again(self)

    def finish(self, replies: list[Any]) -> None:
        try:
            outcome: list[Any] | BaseException = _results(len(self.batch), self.callers,
                                                          replies)
        except Exception as exc:  # (a reply we can't read)
            outcome = exc
        self.end(outcome)

    def expire(self) -> None:
        """The deadline passed: the write fails, and so does its connection, on which its
        replies may still come."""
        if self.ended:
            return
        self.end(TimeoutError(f"Redis did not answer {len(self.batch)} checks in time"))
        if self.pipe is not None:
            self.pipe.abort(RedisConnectionError("a write on it missed its deadline"))

    def end(self, outcome: list[Any] | BaseException) -> None:
        if self.ended:
            return
        self.ended = True
        self.watch.stop()
        coalescer = self.coalescer
        if coalescer.on_batch is not None:
            coalescer.on_batch(time.perf_counter() - self.started,
                               outcome if isinstance(outcome, BaseException) else None)
        coalescer.settle(self.batch, outcome)


async def within(work: Awaitable[T], budget: float) -> T:
    """``await work`` with a deadline of ``budget`` seconds that this process's own load
    cannot make it miss.

    A plain ``asyncio.timeout`` may fire before the loop has read a reply that is already
    in the socket (uvloop runs timers before it polls), and a loop busy with a burst wakes
    every timer late. So a deadline that passes while the loop is late by more than ``LAG``
    is moved ``GRACE`` on, and the work fails only at a deadline the loop met on time, after
    one more ``GRACE`` in which it polls its sockets (``_Watch``); then the timeout scope
    cancels the work. Under load that never lets up, the work still fails ``SLACK`` seconds
    past its budget, for a Redis that is gone.
    """
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(None) as scope:
        now = loop.time()
        # (rescheduled to now, the scope cancels the work and raises TimeoutError)
        watch = _Watch(loop, lambda: scope.reschedule(loop.time()), now + budget,
                       now + budget + SLACK)
        try:
            return await work
        finally:
            watch.stop()


class _Watch:
    """A deadline that this process's own load cannot make its work miss (``within``, and
    each write): once it has passed with the loop on time, ``due`` is called."""

    __slots__ = ("deadline", "due", "handle", "last_chance", "loop", "until")

    def __init__(self, loop: asyncio.AbstractEventLoop, due: Callable[[], None],
                 deadline: float, until: float) -> None:
        self.loop = loop
        self.due = due
        self.deadline = deadline
        self.until = until  # the deadline however late the loop is
        self.last_chance = False
        self.handle = loop.call_at(deadline, self._fire)

    def _fire(self) -> None:
        now = self.loop.time()
        on_time = now - self.deadline <= LAG
        if (self.last_chance and on_time) or now >= self.until:
            self.due()
            return
        self.last_chance = on_time  # on time: one more poll, then it fails
        self.deadline = now + GRACE
        self.handle = self.loop.call_at(self.deadline, self._fire)

    def stop(self) -> None:
        """Watch no more, and let go of ``due`` (a write's, which holds this watch: freed
        by reference counting, with no cycle for the garbage collector to find)."""
        self.handle.cancel()
        self.due = _nothing


def _nothing() -> None:
    pass


def _results(size: int, callers: list[list[int]], replies: list[Any]) -> list[Any]:
    """Each check's own reply (or exception), in batch order, from the calls' replies."""
    results: list[Any] = [None] * size
    for indexes, reply in zip(callers, replies, strict=True):
        if isinstance(reply, Exception):  # the whole call failed: so did each of its checks
            answers: list[Any] = [reply] * len(indexes)
        else:
            answers = check_replies(reply)
            if len(answers) != len(indexes):
                error = ResponseError(f"check.lua answered {len(answers)} checks of "
                                      f"{len(indexes)}")
                answers = [error] * len(indexes)
        for i, answer in zip(indexes, answers, strict=True):
            results[i] = answer
    return results


class _Call:
    """Consecutive checks of a batch that go as one check.lua call."""

    __slots__ = ("callers", "keys", "now", "requests", "set_args", "sets")

    def __init__(self, now: Arg) -> None:
        self.now = now
        self.callers: list[int] = []  # indexes into the batch
        self.keys: list[str] = []
        self.sets: dict[tuple[Arg, ...], int] = {}  # a rule set: its number in the call
        self.set_args: list[Arg] = []
        self.requests: list[Arg] = []

    def add(self, index: int, keys: Sequence[str], cost: Arg, rule_set: tuple[Arg, ...]
            ) -> None:
        number = self.sets.get(rule_set)
        if number is None:
            number = self.sets[rule_set] = len(self.sets) + 1
            self.set_args += (len(rule_set), *rule_set)
        self.keys += keys
        self.requests += (cost, len(keys), number)
        self.callers.append(index)

    def command(self) -> Command:
        return self.keys, [self.now, len(self.callers), len(self.sets), *self.set_args,
                           *self.requests]


def _merged(requests: Sequence[Request], max_checks: int,
            slot_of: Callable[[str], int] | None = None
            ) -> tuple[list[Command], list[list[int]]]:
    """The batch as check.lua calls, and which checks each call answers.

    Consecutive checks with one ``now`` (always '' in production) and at most
    ``max_checks`` of them become one call, in order; a rule set several of them carry (the
    same action) is sent once per call. With ``slot_of`` (a Cluster node), a call holds the
    checks of one slot: the checks are taken slot by slot, in order within each slot (checks
    of different slots share no key, so their order does not matter).
    """
    order: Sequence[int] = range(len(requests))
    slots = [0] * len(requests)
    if slot_of is not None:
        slots = [slot_of(keys[0]) for keys, _, _, _ in requests]
        order = sorted(order, key=slots.__getitem__)
    calls: list[_Call] = []
    call: _Call | None = None
    call_slot = -1
    for i in order:
        keys, now, cost, rule_set = requests[i]
        if (call is None or now != call.now or slots[i] != call_slot
                or len(call.callers) >= max_checks):
            call = _Call(now)
            call_slot = slots[i]
            calls.append(call)
        call.add(i, keys, cost, rule_set)
    return [c.command() for c in calls], [c.callers for c in calls]
