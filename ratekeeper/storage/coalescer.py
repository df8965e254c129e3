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

Batches go over connections the coalescer takes from the client's pool and keeps, one per
write out at most, speaking redis-py's public connection API (``send_packed_command`` /
``read_response``). Keeping them spares each write the pool's lock and bookkeeping; the
client closes them with its pool. Before each write the pool's ``ensure_connection``
reconnects one the server closed while it was idle (Redis restarted), so a write is never
sent twice: one whose connection breaks is failed, since Redis may have run it. Only
READONLY from a Sentinel's master, before anything ran, sends the write once more, on the
connection reconnected to the new master (a Sentinel pool's connection asks the Sentinels
where the master is as it connects). The client is best made without a socket timeout
(``Store.checks``): ``within`` is the deadline, and redis-py gives each write under a
socket timeout a task of its own and each read a timeout scope. A NOSCRIPT reply (a
restart, a failover, SCRIPT FLUSH) is answered by sending those calls again as EVAL, which
carries the source. Errors reach each caller as redis-py raised them; ``on_batch`` hears of
every batch's end (its seconds, or what ended it) once, so the breaker counts a failed
write once, not once per check in it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ReadOnlyError, ResponseError

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
    data = value if isinstance(value, bytes) else str(value).encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


# The encoding of the arguments that repeat from call to call (counts, costs, each rule's
# limit, window and algorithm), by value: a key is always new, an argument seldom.
_ENCODED: dict[str | int, bytes] = {}
_MAX_ENCODED = 4096


def encode_command(name: bytes, first: str | bytes, keys: Sequence[str],
                   args: Sequence[Arg]) -> bytes:
    """One EVALSHA (``first``: the SHA) or EVAL (``first``: the source) in RESP."""
    parts = [b"*%d\r\n$%d\r\n%s\r\n" % (3 + len(keys) + len(args), len(name), name),
             _bulk(first), _bulk(len(keys))]
    for key in keys:
        data = key.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    encoded = _ENCODED
    for arg in args:
        if isinstance(arg, bytes) or arg is True or arg is False:  # (True would find 1's)
            parts.append(_bulk(arg))
            continue
        bulk = encoded.get(arg)
        if bulk is None:
            bulk = _bulk(arg)
            if len(encoded) < _MAX_ENCODED:
                encoded[arg] = bulk
        parts.append(bulk)
    return b"".join(parts)


class Coalescer:
    """Runs check.lua for many callers: one write per event-loop tick, few out at once."""

    def __init__(self, redis: Any, script: LuaScript, *, timeout: float,
                 per_check: float = PER_CHECK, max_batch: int = MAX_BATCH,
                 max_checks: int = MAX_CHECKS, max_inflight: int = MAX_INFLIGHT,
                 sentinel: bool = False,
                 slot_of: Callable[[str], int] | None = None) -> None:
        self.redis = redis
        self.script = script
        self.timeout = timeout
        self.per_check = per_check
        self.max_batch = max_batch
        self.max_checks = max_checks
        self.max_inflight = max_inflight
        # a Sentinel's master: READONLY there means it was demoted (``_exchange``)
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
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: list[Any] = []  # the connections kept, between writes
        self._kept: list[Any] = []  # every connection kept (``close``)

    async def close(self) -> None:
        """Give the connections kept back to the client's pool."""
        kept, self._kept, self._idle = self._kept, [], []
        for connection in kept:
            await self.redis.connection_pool.release(connection)

    def submit(self, requests: Sequence[Request]) -> list[asyncio.Future[Any]]:
        """Queue checks that go in one write, in order; one future each, resolving to the
        check's flat reply (or failing with what Redis raised for it)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # what was pending belonged to a loop that is gone
            self._loop, self._queue, self._groups = loop, [], []
            self._scheduled, self._inflight, self._tasks = False, 0, set()
            self._idle, self._kept = [], []  # (so did the connections' transports)
        futures = [loop.create_future() for _ in requests]
        self._queue += zip(requests, futures, strict=True)
        self._groups.append(len(futures))
        if not self._scheduled and self._may_send():
            self._scheduled = True
            loop.call_soon(self._flush)
        return futures

    def _may_send(self) -> bool:
        return self._inflight < self.max_inflight

    def _flush(self) -> None:
        self._scheduled = False
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
            task = asyncio.ensure_future(self._run(live))
            self._tasks.add(task)  # (the loop keeps only weak references to tasks)
            task.add_done_callback(self._tasks.discard)

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

    async def _run(self, batch: list[tuple[Request, asyncio.Future[Any]]]) -> None:
        started = time.perf_counter()
        outcome: list[Any] | BaseException
        try:
            commands, callers = _merged([request for request, _ in batch], self.max_checks,
                                        self.slot_of)
            replies = await within(self._exchange(commands),
                                   self.timeout + self.per_check * len(batch))
            outcome = _results(len(batch), callers, replies)
        except Exception as exc:  # (Redis's failure, our deadline, or a reply we can't read)
            outcome = exc
        except asyncio.CancelledError as exc:  # the loop is shutting down
            outcome = exc
        if self.on_batch is not None:
            self.on_batch(time.perf_counter() - started,
                          outcome if isinstance(outcome, BaseException) else None)
        self._settle(batch, outcome)
        if isinstance(outcome, asyncio.CancelledError):
            raise outcome

    def _settle(self, batch: list[tuple[Request, asyncio.Future[Any]]],
                outcome: list[Any] | BaseException) -> None:
        self._inflight -= 1
        for i, (_, future) in enumerate(batch):
            if future.done():  # the caller gave up while its batch was out
                continue
            result = outcome if isinstance(outcome, BaseException) else outcome[i]
            if isinstance(result, asyncio.CancelledError):
                future.cancel()
            elif isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
        if self._queue and not self._scheduled and self._may_send():
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    async def _exchange(self, commands: list[Command]) -> list[Any]:
        """Send the calls on a kept connection and read their replies (EVALSHA, then EVAL
        for any the script cache lacked); sent once more, on the same connection reconnected,
        when a Sentinel's master answered READONLY before any of them ran."""
        sha = self.script.sha
        data = b"".join([encode_command(b"EVALSHA", sha, keys, args) for keys, args in commands])
        replies = await self._send_retried(data, len(commands))
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            again = b"".join([encode_command(b"EVAL", self.script.script, *commands[i])
                              for i in missing])
            for i, reply in zip(missing, await self._send_retried(again, len(missing)),
                                strict=True):
                replies[i] = reply
        return replies

    async def _send_retried(self, data: bytes, expected: int) -> list[Any]:
        try:
            return await self._send(data, expected)
        except _Demoted:  # reconnecting, the connection asks the Sentinels for the new master
            return await self._send(data, expected, retried=True)

    async def _connection(self) -> Any:
        """A kept connection, (re)connected, or a new one from the pool. A close is seen once
        the loop has read it, and the loop has had its turn at the sockets since the checks
        were queued (``submit`` flushes at the next turn, and the write's task starts at the
        one after)."""
        pool = self.redis.connection_pool
        if not self._idle:
            connection = await pool.get_connection()  # (ensured by the pool)
            self._kept.append(connection)
            return connection
        connection = self._idle.pop()
        try:
            await pool.ensure_connection(connection)
        except BaseException:
            if connection in self._kept:
                self._idle.append(connection)
            raise
        return connection

    async def _send(self, data: bytes, expected: int, retried: bool = False) -> list[Any]:
        connection = await self._connection()
        replies: list[Any] = []
        healthy = False
        try:
            await connection.send_packed_command(data, check_health=False)
            while len(replies) < expected:
                try:
                    reply = await connection.read_response()
                except (ReadOnlyError, RedisConnectionError) as exc:
                    # demoted: nothing of it has run (a Sentinel pool's own connection says
                    # so as a ConnectionError raised from the READONLY)
                    if self.sentinel and not replies and _readonly(exc):
                        if retried:
                            raise RedisConnectionError("the master is now a replica") from exc
                        raise _Demoted() from exc
                    if not isinstance(exc, ReadOnlyError):
                        raise
                    reply = exc
                except ResponseError as exc:  # one call's error: the others stand
                    reply = exc
                replies.append(reply)
            healthy = True
        finally:
            try:
                if not healthy:  # what is left to read on it is unknown: it reconnects
                    await connection.disconnect(nowait=True)
            finally:
                if connection in self._kept:  # (not when ``close`` gave it back meanwhile)
                    self._idle.append(connection)
        return replies


class _Demoted(Exception):
    """A Sentinel's master answered READONLY before any call of the write ran."""


def _readonly(exc: BaseException) -> bool:
    """Whether ``exc`` is READONLY, or was raised while handling it."""
    return isinstance(exc, ReadOnlyError) or isinstance(exc.__context__, ReadOnlyError)


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
        watch = _Watch(loop, scope, now + budget, now + budget + SLACK)
        try:
            return await work
        finally:
            watch.handle.cancel()


class _Watch:
    """The deadline of one ``within``: on time, it ends ``scope`` (at once)."""

    __slots__ = ("deadline", "handle", "last_chance", "loop", "scope", "until")

    def __init__(self, loop: asyncio.AbstractEventLoop, scope: asyncio.Timeout,
                 deadline: float, until: float) -> None:
        self.loop = loop
        self.scope = scope
        self.deadline = deadline
        self.until = until  # the deadline however late the loop is
        self.last_chance = False
        self.handle = loop.call_at(deadline, self._due)

    def _due(self) -> None:
        now = self.loop.time()
        on_time = now - self.deadline <= LAG
        if (self.last_chance and on_time) or now >= self.until:
            self.scope.reschedule(now)  # (the scope cancels the work and raises TimeoutError)
            return
        self.last_chance = on_time  # on time: one more poll, then it fails
        self.deadline = now + GRACE
        self.handle = self.loop.call_at(self.deadline, self._due)


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
