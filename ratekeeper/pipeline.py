"""Coalescing: the check calls made in one event-loop tick go to Redis as one check.lua call.

Under load many requests reach their check in the same tick of the event loop. Sent one by
one, each takes a pooled connection, a write, a read and a script call of its own; coalesced,
the tick's requests are one EVALSHA of check.lua, which decides them one after another (it
reads TIME once, and Redis sets up the script once). Exactness is unchanged: the call is
atomic, and check.lua decides its requests in the order they were queued, which is the order
the callers asked, each seeing what the ones before it wrote.

``Coalescer`` is a ``CheckScript`` (``sha``, ``script`` and an awaitable ``__call__(keys=...,
args=...)`` taking one request, ``scripts.check_args``), so it stands in for one:
``coalesced(scripts, redis, timeout)`` swaps it in for the check script of a ``Scripts``.
The limiter queues its checks with ``request`` and ``request_many``, which take a request's
parts (keys, now, cost, rule set) instead of its ARGV. Each caller gets its own request's
reply. Each call's deadline is kept here, with one timer for the calls of one tick
(``asyncio.timeout`` per call cost more than the rest of the limiter's Python); the
limiter's breaker sees each call as before, and its metrics each batch's Redis time once
(``observe``). Errors reach each caller as redis-py raised them (a connection error fails
every call of the batch; an error check.lua met deciding one request fails only that
request's call, as a ResponseError), so the limiter's translation of Redis errors stays
where it is.

On a plain ``redis.asyncio.Redis`` (single server or Sentinel) the call is encoded here and
written on a pooled connection the coalescer holds between batches and reads itself
(``heldconn.py``): redis-py's own command packing costs more than deciding in Redis, and its
stream-based read a task per batch. The embedded fakeredis gets a redis-py pipeline; a
cluster client is not coalesced at all (``coalesced``). A batch is sent again only when its
connection turns out dead before the first answer (Redis restarted, a Sentinel failover):
one that broke after some answers is not, so a hit is never taken twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ReadOnlyError, ResponseError

from . import heldconn
from .heldconn import HeldConnection
from .scripts import CheckScript, LuaScript, Scripts, check_replies

__all__ = ["Coalescer", "coalesced"]

Arg = str | int | bytes
# one request: its KEYS, now (ARGV[1]), cost, rule set (scripts.check_args), its caller
Call = tuple[Sequence[str], Arg, Arg, tuple[Arg, ...], "asyncio.Future[Any]"]
Command = tuple[list[str], list[Arg]]  # KEYS and ARGV of one script call

# A tick rarely holds more than the server's concurrency; the cap bounds one write's size and
# one check.lua call (a few keys and three arguments per request, plus each action's rules).
MAX_BATCH = 512
# Script calls out at a time, and how many checks those out may carry for one more to leave
# beside them. Under load one call is out and the checks of the requests that come meanwhile
# go in the next, which grows with the load: a second call out beside a large one split the
# checks into smaller calls and left the cores idle more often, every request of a worker
# waiting in Redis (make bench, two workers: idle 4.6 -> 3.2%, about 1% more checks/s). A
# lone check, or a few, still leave at once beside a small call, as they would with two
# calls out: with Redis behind a proxy that delays each way by 0.25 ms, at 1,000 checks/s,
# p99 was 2.0 - 2.8 ms with one call out at most, 1.7 - 2.0 ms this way and 1.7 - 1.9 ms
# with two out always (loadtest/far_redis.py).
MAX_INFLIGHT = 2
OVERLAP_BELOW = 8
# Encoded ARGV values that repeat (counts, algorithm letters, limits, windows), per process.
_ENCODED: dict[str | int, bytes] = {}
_MAX_ENCODED = 4096


def _bulk(value: Arg) -> bytes:
    data = value if isinstance(value, bytes) else str(value).encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


def _arg(value: Arg) -> bytes:
    kind = type(value)
    if kind is not int and kind is not str:  # bytes, and no float or bool aliasing an int
        return _bulk(value)
    encoded = _ENCODED.get(value)  # type: ignore[arg-type]
    if encoded is None:
        encoded = _bulk(value)
        if len(_ENCODED) < _MAX_ENCODED:
            _ENCODED[value] = encoded  # type: ignore[index]
    return encoded


def _bulk_keys(keys: Sequence[str]) -> bytes:
    """Key names as RESP bulk strings: encoded in one go when they are ASCII (they are,
    unless the key prefix is not), as a character then counts one byte."""
    text = "".join([f"${len(key)}\r\n{key}\r\n" for key in keys])
    if text.isascii():
        return text.encode()
    return b"".join([_bulk(key) for key in keys])


def encode_evalsha(sha: str, keys: Sequence[str], args: Sequence[Arg]) -> bytes:
    """One EVALSHA command in RESP, as redis-py would send it."""
    parts = [b"*%d\r\n$7\r\nEVALSHA\r\n$%d\r\n%s\r\n" % (3 + len(keys) + len(args),
                                                           len(sha), sha.encode()),
             _arg(len(keys)), _bulk_keys(keys)]
    parts += [_arg(arg) for arg in args]
    return b"".join(parts)


def encode_eval(source: str | bytes, keys: Sequence[str], args: Sequence[Arg]) -> bytes:
    """One EVAL command (the script's source) in RESP."""
    return b"".join([b"*%d\r\n$4\r\nEVAL\r\n" % (3 + len(keys) + len(args)),
                     _bulk(source), _arg(len(keys)), _bulk_keys(keys),
                     *[_arg(arg) for arg in args]])


class Coalescer(CheckScript):
    """Runs check.lua for many callers: one call per event-loop tick, few in flight."""

    __slots__ = ("_deadline", "_direct", "_group", "_groups", "_held", "_inflight", "_loop",
                 "_out", "_queue", "_scheduled", "_sentinel", "_tasks", "after_settle",
                 "batches", "calls", "dropped", "max_batch", "max_inflight", "observe",
                 "overlap_below", "redis", "script_calls", "timeout")

    def __init__(self, redis: Any, script: LuaScript, *, max_batch: int = MAX_BATCH,
                 max_inflight: int = MAX_INFLIGHT, overlap_below: int = OVERLAP_BELOW,
                 timeout: float | None = None) -> None:
        super().__init__(redis, script.name, script.script)
        self.redis = redis
        # a subclass (fakeredis) or a cluster client takes the redis-py pipeline
        self._direct = type(redis) is Redis and heldconn.available()
        self.max_batch = max_batch
        # While this many pipelines are out, calls wait and go in the next, larger one: under
        # load batches grow instead of connections and syscalls. A pipeline leaves while
        # another is out only when those out carry fewer than ``overlap_below`` checks.
        self.max_inflight = max_inflight
        self.overlap_below = overlap_below
        # each call's deadline (queued and sent), and a whole batch's
        self.timeout = timeout
        self._group: list[asyncio.Future[Any]] | None = None  # this tick's calls, one timer
        self.calls = 0  # requests (callers) sent, for metrics and tests
        self.batches = 0  # batches sent (one write each)
        self.script_calls = 0  # check.lua calls sent: one per batch, unless its now_ms differ
        self.dropped = 0  # calls whose caller gave up before they were sent
        self._queue: list[Call] = []
        # how many calls each request()/request_many() queued, in order: a batch request's
        # checks are never split between two script calls, which two connections could
        # deliver to Redis in either order
        self._groups: list[int] = []
        self._scheduled = False
        self._inflight = 0
        self._out = 0  # the checks of the pipelines out
        self._tasks: set[asyncio.Task[None]] = set()
        # pooled connections this coalescer holds between batches (at most max_inflight):
        # taking one from redis-py's pool and giving it back cost more than a batch's write
        self._held: list[HeldConnection] = []
        # a held connection's batch deadline: each call's, else the pool's socket timeout
        pool = redis.connection_pool if self._direct else None
        self._deadline: float | None = timeout if timeout is not None or pool is None else (
            pool.connection_kwargs.get("socket_timeout"))
        # a Sentinel's master pool: READONLY there means a failover (``_answered``)
        self._sentinel = bool(getattr(pool, "is_master", False))
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop the state above is of
        # called with each batch's seconds once Redis answered it (the limiter's metrics)
        self.observe: Callable[[float], None] | None = None
        # run soon after a batch's callers have their replies, once the callbacks the replies
        # scheduled have run (and the next call has left): the hot paths' outbox
        # (hotpath.Outbox) writes the answers a batch settled then, in the tick they were
        # made rather than the one after
        self.after_settle: list[Callable[[], None]] = []

    async def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = (),
                       client: Any = None) -> Any:
        """Decide one request in the next batch; its flat reply (``client`` is ignored)."""
        return await self.queue(keys, args)

    def queue(self, keys: Sequence[str], args: Iterable[Arg]) -> asyncio.Future[Any]:
        """Queue one call of one request (``scripts.check_args``); the future resolves to
        what the script returned for it. Arguments that are not one request fail the future
        with a ValueError, and nothing is sent for it.
        """
        args = tuple(args)
        # [now, 1, 1, na, *rule set, cost, nk, 1]
        na = args[3] if len(args) > 3 else -1
        if (type(na) is not int or len(args) != 7 + na or args[1] != 1 or args[2] != 1
                or args[-1] != 1):
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            future.set_exception(ValueError("a coalesced check.lua call carries one request "
                                            "with one rule set (scripts.check_args)"))
            return future
        return self.request(keys, args[0], args[-3], args[4:4 + na])

    def request(self, keys: Sequence[str], now: Arg, cost: Arg,
                rule_set: tuple[Arg, ...]) -> asyncio.Future[Any]:
        """Queue one request: ``queue`` without building and taking apart its ARGV.

        With a ``timeout``, the future fails with TimeoutError once it has waited that long
        (queued or sent): the calls queued in one tick share one timer.
        """
        loop = self._running()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((keys, now, cost, rule_set, future))
        self._queued(loop, (future,))
        return future

    def request_many(self, requests: Iterable[tuple[Sequence[str], Arg, Arg, tuple[Arg, ...]]]
                     ) -> list[asyncio.Future[Any]]:
        """``request`` for each (keys, now, cost, rule set), in order: one future each."""
        loop = self._running()
        create = loop.create_future
        futures: list[asyncio.Future[Any]] = []
        queue = self._queue
        for keys, now, cost, rule_set in requests:
            future: asyncio.Future[Any] = create()
            queue.append((keys, now, cost, rule_set, future))
            futures.append(future)
        self._queued(loop, futures)
        return futures

    def _running(self) -> asyncio.AbstractEventLoop:
        """The running loop (asyncio.get_running_loop costs a getpid() syscall on Python
        3.11: it is asked only when the loop this coalescer was last used on is not the one
        running)."""
        loop = self._loop
        if loop is None or not loop.is_running():
            loop = asyncio.get_running_loop()
            if loop is not self._loop:
                self._adopt(loop)
        return loop

    def _queued(self, loop: asyncio.AbstractEventLoop,
                futures: Sequence[asyncio.Future[Any]]) -> None:
        """Calls were queued: their deadline (one timer per tick) and the next flush."""
        self._groups.append(len(futures))
        if self.timeout is not None:
            group = self._group
            if group is None:
                group = self._group = []
                loop.call_later(self.timeout, _expire, group)
                loop.call_soon(self._close_group)
            group += futures
        if not self._scheduled and self._may_send():
            self._scheduled = True
            loop.call_soon(self._flush)

    def _adopt(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start afresh on another event loop: what was pending belonged to the old one (its
        timers, flushes and tasks will never run), and its callers are gone with it."""
        self._loop = loop
        self._group = None
        self._scheduled = False
        self._inflight = 0
        self._out = 0
        self._tasks = set()
        self._held = []  # connections of the old loop's transports: never used again
        self.dropped += len(self._queue)
        self._queue = []
        self._groups = []

    def _close_group(self) -> None:
        self._group = None  # the next tick's calls get a timer of their own

    def _flush(self) -> None:
        self._scheduled = False
        while self._queue and self._may_send():
            queue = self._queue
            size = self._cut()
            batch = queue[:size]
            del queue[:size]
            # a caller that already gave up (its deadline passed) is not sent: it has had
            # its answer, and the hit it asked for must not be taken behind its back
            live = [call for call in batch if not call[4].done()]
            self.dropped += len(batch) - len(live)
            if not live:
                continue
            self._inflight += 1
            self._out += len(live)
            self.calls += len(live)
            self.batches += 1
            if self._direct:
                self._start(live)
            else:
                self._spawn(self._run_pipeline(live))

    def _may_send(self) -> bool:
        """Whether a queued call may leave now (``max_inflight``, ``overlap_below``)."""
        return self._inflight == 0 or (self._inflight < self.max_inflight
                                       and self._out < self.overlap_below)

    def _cut(self) -> int:
        """How many queued calls the next batch takes: whole groups (``_groups``), at most
        ``max_batch`` calls, or the first group whatever its size."""
        groups = self._groups
        size = taken = 0
        for group in groups:
            if taken and size + group > self.max_batch:
                break
            size += group
            taken += 1
        del groups[:taken]
        return size

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)  # (the loop keeps only weak references to tasks)
        task.add_done_callback(self._tasks.discard)

    def _settle(self, calls: Sequence[Call], outcome: list[Any] | BaseException) -> None:
        """A batch is over: each caller gets its reply, or every caller what ended it."""
        self._inflight -= 1
        self._out -= len(calls)
        if isinstance(outcome, BaseException):
            cancelled = isinstance(outcome, asyncio.CancelledError)
            for call in calls:
                future = call[4]
                if not future.done():
                    if cancelled:
                        future.cancel()
                    else:
                        future.set_exception(outcome)
        else:
            for (_, _, _, _, future), result in zip(calls, outcome, strict=True):
                if future.done():  # the caller gave up while its batch was out
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        loop = self._loop
        if loop is None:
            return
        # the next call leaves first: Redis, the one serial stage, gets work before the
        # answers go out (about 1.5% more checks/s at two workers than the other way round)
        if self._queue and not self._scheduled and self._may_send():
            self._scheduled = True
            loop.call_soon(self._flush)
        for then in self.after_settle:
            loop.call_soon(then)

    # -- on a plain redis.asyncio.Redis: held connections (heldconn.py), no task per batch

    def _start(self, calls: list[Call]) -> None:
        try:
            commands, callers = _merged(calls)
            data = b"".join([encode_evalsha(self.sha, keys, args) for keys, args in commands])
        except Exception as exc:  # (a bug) its callers fail; the batch must not keep its slot
            self._settle(calls, ResponseError(f"the check calls could not be encoded: {exc!r}"))
            return
        self.script_calls += len(commands)
        deadline = None
        if self._deadline is not None:
            deadline = self._loop.time() + self._deadline  # type: ignore[union-attr]
        batch = _Batch(calls, commands, callers, data, deadline)
        held = self._held
        while held and held[-1].closed:  # (the server closed it while it was idle)
            self._spawn(held.pop().release(self.redis.connection_pool))
        if held:
            held.pop().send(data, len(commands), batch, deadline)
        else:
            self._spawn(self._connect(batch))

    async def _connect(self, batch: _Batch) -> None:
        """Send ``batch`` on a connection fresh from the pool, held from then on."""
        try:
            if batch.deadline is None:
                connection = await self.redis.connection_pool.get_connection()
            else:
                async with asyncio.timeout_at(batch.deadline):
                    connection = await self.redis.connection_pool.get_connection()
        except BaseException as exc:  # (the pool's connect: every caller sees it fail)
            self._settle(batch.calls, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        held = HeldConnection.take(connection, self._answered)
        held.send(batch.data, batch.expected, batch, batch.deadline)

    def _answered(self, held: HeldConnection, batch: _Batch,
                  outcome: list[Any] | BaseException) -> None:
        """A held connection's batch is back (or ended): retry, resend or settle it."""
        answered = held.answered  # replies that came before the end, if it ended
        if self._sentinel and not isinstance(outcome, BaseException):
            readonly = [i for i, reply in enumerate(outcome) if isinstance(reply, ReadOnlyError)]
            if readonly:
                # A Sentinel's master turned replica under an open connection: as redis-py
                # does, the connection goes and the reply is an error of the connection
                # (its pool asks the Sentinels for the new master when it connects again)
                held.close()
                outcome = RedisConnectionError("The previous master is now a slave")
                answered = readonly[0]
        if isinstance(outcome, BaseException):
            self._spawn(held.release(self.redis.connection_pool))
            if isinstance(outcome, RedisConnectionError) and answered == 0 and not batch.retried:
                # Nothing of this write reached a live server (Redis restarted, closed the
                # connection, failed over): sending it once more cannot take a hit twice.
                # The other held connections are likely dead too: they go back to the pool,
                # and the batch goes again on one the pool connects. A write that broke
                # after some answers is not sent again.
                batch.retried = True
                self._drop_held()
                self._spawn(self._connect(batch))
                return
            self._settle(batch.calls, outcome)
            return
        if batch.replies is None:
            missing = [i for i, reply in enumerate(outcome) if isinstance(reply, NoScriptError)]
            if missing:
                # Redis lost its script cache (a restart, a failover, SCRIPT FLUSH): those
                # calls did not run. EVAL carries the source, so it runs whatever the cache
                # holds (a second flush racing a reload cannot fail it) and caches the
                # script again.
                batch.replies, batch.missing, batch.retried = outcome, missing, False
                batch.data = b"".join([encode_eval(self.script, *batch.commands[i])
                                       for i in missing])
                batch.expected = len(missing)
                held.send(batch.data, batch.expected, batch, batch.deadline)
                return
            replies = outcome
        else:
            replies = batch.replies
            for i, reply in zip(batch.missing, outcome, strict=True):
                replies[i] = reply
        self._held.append(held)
        if self.observe is not None:
            self.observe(time.perf_counter() - batch.started)
        self._settle_replies(batch.calls, batch.callers, replies)

    def _settle_replies(self, calls: Sequence[Call], callers: list[list[int]],
                        replies: list[Any]) -> None:
        """``_settle`` with the script calls' replies; a reply that cannot be taken apart fails
        the batch's callers as a Redis error would, rather than keep the batch's slot."""
        try:
            results = _results(calls, callers, replies)
        except Exception as exc:
            self._settle(calls, ResponseError(f"check.lua's reply could not be read: {exc!r}"))
            return
        self._settle(calls, results)

    def _drop_held(self) -> None:
        """Close the idle held connections and give them back to the pool."""
        held, self._held = self._held, []
        for connection in held:
            self._spawn(connection.release(self.redis.connection_pool))

    # -- on anything else (the embedded fakeredis): redis-py's pipeline, a task per batch

    async def _run_pipeline(self, calls: list[Call]) -> None:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                commands, callers = _merged(calls)
                self.script_calls += len(commands)
                replies = await self._pipeline(commands, by_sha=True)
                missing = [i for i, reply in enumerate(replies)
                           if isinstance(reply, NoScriptError)]
                if missing:  # (as _answered)
                    again = await self._pipeline([commands[i] for i in missing], by_sha=False)
                    for i, reply in zip(missing, again, strict=True):
                        replies[i] = reply
        except BaseException as exc:  # every caller sees the transport's failure
            self._settle(calls, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        if self.observe is not None:
            self.observe(time.perf_counter() - started)
        self._settle_replies(calls, callers, replies)

    async def _pipeline(self, commands: Sequence[Command], *, by_sha: bool) -> list[Any]:
        pipe = self.redis.pipeline(transaction=False)
        for keys, args in commands:
            if by_sha:
                pipe.evalsha(self.sha, len(keys), *keys, *args)
            else:
                pipe.eval(self.script, len(keys), *keys, *args)
        return list(await pipe.execute(raise_on_error=False))


class _Batch:
    """A batch out on a held connection: its callers, its script calls, where it stands."""

    __slots__ = ("callers", "calls", "commands", "data", "deadline", "expected", "missing",
                 "replies", "retried", "started")

    def __init__(self, calls: list[Call], commands: list[Command], callers: list[list[int]],
                 data: bytes, deadline: float | None) -> None:
        self.calls = calls
        self.commands = commands
        self.callers = callers
        self.data = data  # what is (or was last) written
        self.expected = len(commands)  # replies to it
        self.deadline = deadline
        self.started = time.perf_counter()
        self.replies: list[Any] | None = None  # the EVALSHA replies, while some go again
        self.missing: list[int] = []  # which of them go again as EVAL
        self.retried = False  # this write went again on a fresh connection


def _results(calls: Sequence[Call], callers: list[list[int]], replies: list[Any]) -> list[Any]:
    """Each call's own reply (or exception), in batch order, from its script calls' replies."""
    if len(replies) == 1 and not isinstance(replies[0], Exception):
        answers = check_replies(replies[0])  # one script call, the batch's callers in order
        if len(answers) == len(calls):
            return answers
    results: list[Any] = [None] * len(calls)
    for indexes, reply in zip(callers, replies, strict=True):
        if isinstance(reply, Exception):  # the whole call failed: so did each request
            for i in indexes:
                results[i] = reply
            continue
        answers = check_replies(reply)
        if len(answers) != len(indexes):
            error = ResponseError(f"check.lua answered {len(answers)} requests of "
                                  f"{len(indexes)}")
            answers = [error] * len(indexes)
        for i, answer in zip(indexes, answers, strict=True):
            results[i] = answer
    return results


def _expire(group: list[asyncio.Future[Any]]) -> None:
    """A tick's calls reached their deadline: the ones still unanswered fail."""
    for future in group:
        if not future.done():
            future.set_exception(TimeoutError())


class _Run:
    """Consecutive calls of a batch that go as one check.lua call."""

    __slots__ = ("_last", "callers", "keys", "now", "requests", "set_args", "sets")

    def __init__(self, now: Arg) -> None:
        self.now = now
        self.callers: list[int] = []  # indexes into the batch
        self.keys: list[str] = []
        self.sets: dict[tuple[Arg, ...], int] = {}  # a rule set: its number in the call
        self.set_args: list[Arg] = []
        self.requests: list[Arg] = []
        # the previous request's rule set and number: checks of one action share the tuple
        # (the action's plan), so most requests need no hashing of it
        self._last: tuple[tuple[Arg, ...], int] | None = None

    def add(self, index: int, keys: Sequence[str], rule_set: tuple[Arg, ...], cost: Arg,
            n_keys: Arg) -> None:
        last = self._last
        if last is not None and last[0] is rule_set:
            number = last[1]
        else:
            known = self.sets.get(rule_set)
            if known is None:
                number = self.sets[rule_set] = len(self.sets) + 1
                self.set_args.append(len(rule_set))
                self.set_args += rule_set
            else:
                number = known
            self._last = (rule_set, number)
        self.keys += keys
        self.requests += (cost, n_keys, number)
        self.callers.append(index)

    def command(self) -> Command:
        return self.keys, [self.now, len(self.callers), len(self.sets), *self.set_args,
                           *self.requests]


def _merged(batch: Sequence[Call]) -> tuple[list[Command], list[list[int]]]:
    """The batch as check.lua calls of many requests, and which callers each call answers.

    Consecutive calls with one now_ms (ARGV[1]; always '' in production) become one call, in
    order; a rule set that several of them carry (the same action) is sent once.
    """
    runs: list[_Run] = []
    run: _Run | None = None
    for i, (keys, now, cost, rule_set, _) in enumerate(batch):
        if run is None or now != run.now:
            run = _Run(now)
            runs.append(run)
        run.add(i, keys, rule_set, cost, len(keys))
    return [run.command() for run in runs], [run.callers for run in runs]


def coalesced(scripts: Scripts, redis: Any, timeout: float | None = None) -> Scripts:
    """``scripts`` with its check script called through a Coalescer (``timeout``: each
    call's deadline, in seconds).

    A Redis Cluster client is left as it is: the limiter splits a check across slots itself,
    and a pipeline there would be redis-py's cluster pipeline, which nothing here tests.
    """
    from redis.asyncio.cluster import RedisCluster

    if isinstance(redis, RedisCluster):
        return scripts
    return dataclasses.replace(scripts, check=Coalescer(redis, scripts.check,
                                                         timeout=timeout))
