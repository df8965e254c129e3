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
written on a pooled connection the coalescer keeps between batches: redis-py's own command
packing costs more than deciding in Redis. The embedded fakeredis gets a redis-py pipeline;
a cluster client is not coalesced at all (``coalesced``). A batch is sent again only when
its connection turns out dead before the first answer (Redis restarted): one that broke
after some answers is not, so a hit is never taken twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from .scripts import CheckScript, LuaScript, Scripts, check_replies

__all__ = ["Coalescer", "coalesced"]

Arg = str | int | bytes
# one request: its KEYS, now (ARGV[1]), cost, rule set (scripts.check_args), its caller
Call = tuple[Sequence[str], Arg, Arg, tuple[Arg, ...], "asyncio.Future[Any]"]
Command = tuple[list[str], list[Arg]]  # KEYS and ARGV of one script call

# A tick rarely holds more than the server's concurrency; the cap bounds one write's size and
# one check.lua call (a few keys and three arguments per request, plus each action's rules).
MAX_BATCH = 512
MAX_INFLIGHT = 2
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

    __slots__ = ("_direct", "_group", "_idle", "_inflight", "_loop", "_queue", "_scheduled",
                 "_tasks", "batches", "calls", "dropped", "max_batch", "max_inflight",
                 "observe", "redis", "script_calls", "timeout")

    def __init__(self, redis: Any, script: LuaScript, *, max_batch: int = MAX_BATCH,
                 max_inflight: int = MAX_INFLIGHT, timeout: float | None = None) -> None:
        super().__init__(redis, script.name, script.script)
        self.redis = redis
        # a subclass (fakeredis) or a cluster client takes the redis-py pipeline
        self._direct = type(redis) is Redis
        self.max_batch = max_batch
        # While this many pipelines are out, calls wait and go in the next, larger one: under
        # load batches grow instead of connections and syscalls.
        self.max_inflight = max_inflight
        # each call's deadline (queued and sent), and a whole batch's
        self.timeout = timeout
        self._group: list[asyncio.Future[Any]] | None = None  # this tick's calls, one timer
        self.calls = 0  # requests (callers) sent, for metrics and tests
        self.batches = 0  # batches sent (one write each)
        self.script_calls = 0  # check.lua calls sent: one per batch, unless its now_ms differ
        self.dropped = 0  # calls whose caller gave up before they were sent
        self._queue: list[Call] = []
        self._scheduled = False
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        # pooled connections this coalescer keeps between batches (at most max_inflight):
        # taking one from redis-py's pool and giving it back cost more than a batch's write
        self._idle: list[Any] = []
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop the state above is of
        # called with each batch's seconds once Redis answered it (the limiter's metrics)
        self.observe: Callable[[float], None] | None = None

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
        return self.request_many([(keys, now, cost, rule_set)])[0]

    def request_many(self, requests: Iterable[tuple[Sequence[str], Arg, Arg, tuple[Arg, ...]]]
                     ) -> list[asyncio.Future[Any]]:
        """``request`` for each (keys, now, cost, rule set), in order: one future each."""
        loop = self._loop
        # (asyncio.get_running_loop costs a getpid() syscall on Python 3.11: it is asked
        # only when the loop this coalescer was last used on is not the one running)
        if loop is None or not loop.is_running():
            loop = asyncio.get_running_loop()
            if loop is not self._loop:
                self._adopt(loop)
        create = loop.create_future
        futures: list[asyncio.Future[Any]] = []
        queue = self._queue
        for keys, now, cost, rule_set in requests:
            future: asyncio.Future[Any] = create()
            queue.append((keys, now, cost, rule_set, future))
            futures.append(future)
        if self.timeout is not None:
            group = self._group
            if group is None:
                group = self._group = []
                loop.call_later(self.timeout, _expire, group)
                loop.call_soon(self._close_group)
            group += futures
        if not self._scheduled and self._inflight < self.max_inflight:
            self._scheduled = True
            loop.call_soon(self._flush)
        return futures

    def _adopt(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start afresh on another event loop: what was pending belonged to the old one (its
        timers, flushes and tasks will never run), and its callers are gone with it."""
        self._loop = loop
        self._group = None
        self._scheduled = False
        self._inflight = 0
        self._tasks = set()
        self._idle = []  # connections of the old loop's transports: never used again
        self.dropped += len(self._queue)
        self._queue = []

    def _close_group(self) -> None:
        self._group = None  # the next tick's calls get a timer of their own

    def _flush(self) -> None:
        self._scheduled = False
        while self._queue and self._inflight < self.max_inflight:
            batch = self._queue[:self.max_batch]
            del self._queue[:self.max_batch]
            # a caller that already gave up (its deadline passed) is not sent: it has had
            # its answer, and the hit it asked for must not be taken behind its back
            live = [call for call in batch if not call[4].done()]
            self.dropped += len(batch) - len(live)
            if not live:
                continue
            self._inflight += 1
            task = asyncio.ensure_future(self._run(live))
            # the loop keeps only weak references to tasks
            self._tasks.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._inflight -= 1
        if self._queue and not self._scheduled:
            self._scheduled = True
            task.get_loop().call_soon(self._flush)

    async def _run(self, batch: list[Call]) -> None:
        self.calls += len(batch)
        self.batches += 1
        started = time.perf_counter()
        try:
            if self.timeout is None:
                results = await self._send(batch)
            else:
                async with asyncio.timeout(self.timeout):
                    results = await self._send(batch)
        except asyncio.CancelledError:
            for call in batch:
                call[4].cancel()
            raise
        except BaseException as exc:  # every caller sees the transport's failure
            for call in batch:
                if not call[4].done():
                    call[4].set_exception(exc)
            return
        if self.observe is not None:
            self.observe(time.perf_counter() - started)
        for (_, _, _, _, future), result in zip(batch, results, strict=True):
            if future.done():  # the caller gave up while its batch was out
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _send(self, batch: Sequence[Call]) -> list[Any]:
        """Each call's own reply (or exception), in batch order."""
        results: list[Any] = [None] * len(batch)
        commands, callers = _merged(batch)
        replies = await self._pipeline(commands, by_sha=True)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            # Redis lost its script cache (a restart, a failover, SCRIPT FLUSH): those calls
            # did not run. EVAL carries the source, so it runs whatever the cache holds (a
            # second flush racing a reload cannot fail it) and caches the script again.
            again = await self._pipeline([commands[i] for i in missing], by_sha=False)
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
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

    async def _pipeline(self, commands: Sequence[Command], *, by_sha: bool) -> list[Any]:
        self.script_calls += len(commands)
        if self._direct:
            if by_sha:
                data = b"".join([encode_evalsha(self.sha, keys, args) for keys, args in commands])
            else:
                data = b"".join([encode_eval(self.script, keys, args)
                                 for keys, args in commands])
            return await self._write_and_read(data, len(commands))
        pipe = self.redis.pipeline(transaction=False)
        for keys, args in commands:
            if by_sha:
                pipe.evalsha(self.sha, len(keys), *keys, *args)
            else:
                pipe.eval(self.script, len(keys), *keys, *args)
        return list(await pipe.execute(raise_on_error=False))

    async def _write_and_read(self, data: bytes, replies: int) -> list[Any]:
        try:
            return await self._write_and_read_once(data, replies)
        except _NothingAnswered:
            # The connection was dead (Redis restarted, closed it, failed over): nothing of
            # this batch reached a live server, so sending it once more cannot take a hit
            # twice. The other held connections are likely dead too: they go back to the
            # pool, and the batch goes again on one the pool checks (and reconnects).
            # A batch that broke after some answers is not sent again.
            await self._drop_idle()
            try:
                return await self._write_and_read_once(data, replies, fresh=True)
            except _NothingAnswered as exc:
                raise exc.cause from None

    async def _write_and_read_once(self, data: bytes, replies: int, *,
                                   fresh: bool = False) -> list[Any]:
        pool = self.redis.connection_pool
        if self._idle and not fresh:
            connection = self._idle.pop()
        else:
            connection = await pool.get_connection()
            if self.timeout is not None:
                # held: each batch is bounded by this coalescer's deadline (``_run``), so
                # redis-py's own socket timeout, a task per send and a timer per read on
                # Python 3.11, is set aside until the connection goes back (``_release``)
                connection.socket_timeout = None
        results: list[Any] = []
        try:
            await connection.send_packed_command(data, check_health=False)
            for _ in range(replies):
                try:
                    results.append(await connection.read_response())
                except ResponseError as exc:  # a script error is one call's answer
                    results.append(exc)
        except BaseException as exc:
            # replies may still be on the wire: this connection cannot be reused
            await self._release(connection)
            if isinstance(exc, RedisConnectionError) and not results:
                raise _NothingAnswered(exc) from exc
            raise
        self._idle.append(connection)
        return results

    async def _drop_idle(self) -> None:
        """Close the held connections and give them back to the pool."""
        idle, self._idle = self._idle, []
        for connection in idle:
            await self._release(connection)

    async def _release(self, connection: Any) -> None:
        """Close a held connection and give it back to the pool as the pool made it."""
        await connection.disconnect(nowait=True)
        pool = self.redis.connection_pool
        connection.socket_timeout = pool.connection_kwargs.get("socket_timeout")
        await pool.release(connection)


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


class _NothingAnswered(Exception):
    """The connection failed before the first reply of a batch."""

    def __init__(self, cause: RedisConnectionError) -> None:
        super().__init__(str(cause))
        self.cause = cause


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
