"""Runs the scripts and turns their answers (or Redis's failure) into typed results.

This is the one place where Redis errors become ``StoreUnavailable``. Every call has a
deadline (``timeout``, covering connecting and the call itself, and starting when the call
leaves this process: waiting for its turn here is never Redis failing) and goes through a
circuit breaker, so a dead or stopped Redis costs at most one deadline per call until the
circuit opens, then nothing. On Redis Cluster each node has its own breaker, so a failing
node degrades only the checks whose keys it holds, and a check whose keys span several slots
is split per slot (see ``slots``); on one Redis the checks of a tick are one write
(``pipeline``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from enum import IntEnum
from typing import Any, NamedTuple, TypeVar

from redis.exceptions import RedisClusterException, RedisError, ResponseError

from . import slots
from .breaker import Breaker, BreakerState
from .errors import StoreUnavailable
from .metrics import Metrics
from .pipeline import Coalescer, within
from .scripts import Scripts, check_args, check_replies

__all__ = ["CheckCall", "Limiter", "Outcome", "Status", "WindowState", "parse_outcome"]

log = logging.getLogger("ratekeeper.limiter")

T = TypeVar("T")
# what a failing Redis raises: its own errors, socket errors, our deadline, and the cluster
# client's errors that are not RedisErrors (no reachable node)
REDIS_FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)
READY_TIMEOUT = 0.5  # seconds; readiness may wait longer than a check
# Redis calls (other than coalesced checks) one process has out at most; more wait their
# turn, and their deadline starts when it comes (each call holds a connection, a Cluster
# client opens one per call out, and a burst of connects would miss every deadline)
MAX_IN_FLIGHT = 64


# Limiter.check's arguments: keys, cost, number of ban keys, number of rules, rule ARGV
CheckCall = tuple[list[str], int, int, int, Sequence[str | int]]


class Status(IntEnum):
    """What the script decided."""

    LIMITED = 0
    ALLOWED = 1
    BANNED = 2
    PENALTY = 3


class WindowState(NamedTuple):
    """One window after the decision: hits left, ms until fully reset, ms until retry."""

    remaining: int
    reset_ms: int
    retry_ms: int


class Outcome(NamedTuple):
    """The script's answer for one request (a tuple: one is made per decision)."""

    status: Status
    now_ms: int
    shadowed: bool
    culprit: int  # check.lua's `index`: the ban key (BANNED) or rule (PENALTY), 1-based
    wait_ms: int
    windows: tuple[WindowState, ...]


def _is_cluster(redis: Any) -> bool:
    from redis.asyncio.cluster import RedisCluster

    return isinstance(redis, RedisCluster)


class Limiter:
    """Decides checks with check.lua: coalesced per event-loop tick on one Redis (or a
    Sentinel's master, or the embedded store), one call per check on a Cluster. Redis time
    unless a test clock is given."""

    def __init__(self, redis: Any, *, timeout: float,
                 clock: Callable[[], int] | None = None, breaker: Breaker | None = None,
                 sharded: bool | None = None, metrics: Metrics | None = None,
                 coalesce: bool = True) -> None:
        self.redis = redis
        self.timeout = timeout
        self.scripts = Scripts.register(redis)
        self.breaker = breaker or Breaker()
        # on a cluster, keys of different hash tags may live in different slots and nodes:
        # each node has its breaker, so a failing node degrades only the checks it holds
        self.sharded = _is_cluster(redis) if sharded is None else sharded
        self._node_breakers: dict[str, Breaker] = {}
        self.coalescer: Coalescer | None = None
        if coalesce and not self.sharded:
            pool = getattr(redis, "connection_pool", None)
            self.coalescer = Coalescer(redis, self.scripts.check, timeout=timeout,
                                       sentinel=bool(getattr(pool, "is_master", False)))
            self.coalescer.on_batch = self._batch_done
        self._clock = clock
        self._in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._topology = asyncio.Lock()
        self._topology_known = not self.sharded
        self._logged_at = -1.0
        self._background: set[asyncio.Future[None]] = set()
        self.metrics = metrics
        self._reported_state = ""

    def _batch_done(self, seconds: float, error: BaseException | None) -> None:
        """A coalesced write ended: the breaker and the metrics count it once."""
        if error is None:
            self.breaker.success()
            self._report("check", None, seconds)
        elif isinstance(error, REDIS_FAILURES):
            self._failed("check", error)

    async def _call(self, make: Callable[[], Awaitable[T]], *, op: str,
                    timeout: float | None = None, breakers: Sequence[Breaker] = (),
                    healthy: Callable[[T], bool] | None = None) -> T:
        """Run ``make()`` under the breakers (default: the limiter's) and the deadline; Redis
        failures become ours.

        The deadline starts once the call may go (``MAX_IN_FLIGHT``): waiting for its turn
        in this process is not Redis failing. ``healthy`` tells the breakers whether a result
        that came back is a success; ``op`` names the call in metrics.
        """
        breakers = breakers or (self.breaker,)
        self._admit(op, breakers)
        try:
            async with self._in_flight:
                started = time.perf_counter()
                if not self._topology_known:
                    await self._learn_topology()
                result: T = await within(make(), self.timeout if timeout is None else timeout)
        except REDIS_FAILURES as exc:
            raise self._failed(op, exc, breakers) from exc
        except BaseException:
            for breaker in breakers:
                breaker.abandon()
            raise
        ok = healthy is None or healthy(result)
        for breaker in breakers:
            if ok:
                breaker.success()
            else:
                breaker.failure()
        self._report(op, None, time.perf_counter() - started)
        return result

    def _admit(self, op: str, breakers: Sequence[Breaker] = ()) -> None:
        """Raise StoreUnavailable at once while a circuit the call needs is open."""
        breakers = breakers or (self.breaker,)
        allowed = [breaker for breaker in breakers if breaker.allow()]
        if len(allowed) < len(breakers):
            for breaker in allowed:  # (a probe let through is not used)
                breaker.abandon()
            self._report(op, "CircuitOpen")
            raise StoreUnavailable("redis: circuit open")

    def _failed(self, op: str, exc: BaseException,
                breakers: Sequence[Breaker] = ()) -> StoreUnavailable:
        """Count a failed call (breakers, log, metrics); the error to raise instead."""
        for breaker in breakers or (self.breaker,):
            breaker.failure(timed_out=isinstance(exc, TimeoutError))
        self._log_failure(exc)
        self._report(op, type(exc).__name__)
        return StoreUnavailable(f"redis: {type(exc).__name__}")

    def _report(self, op: str, error: str | None, seconds: float = 0.0) -> None:
        metrics = self.metrics
        if metrics is None:
            return
        if error is None:
            metrics.redis_call(op, seconds)
        else:
            metrics.redis_error(op, error)
        self._report_state()

    def _report_state(self) -> None:
        """Publish the breaker's state when it changed since last published."""
        state = self.breaker_state
        if state != self._reported_state:
            self._reported_state = state
            if self.metrics is not None:
                self.metrics.breaker_state(state)

    @property
    def breaker_state(self) -> BreakerState:
        """The worst state of the limiter's breakers (on a Cluster, one per node)."""
        states = {self.breaker.state, *(b.state for b in self._node_breakers.values())}
        for state in ("open", "half-open"):
            if state in states:
                return state
        return "closed"

    def _log_failure(self, exc: BaseException) -> None:
        # at most one line a second: an outage fails every call
        now = time.monotonic()
        if now - self._logged_at >= 1.0:
            self._logged_at = now
            log.warning("redis call failed (%s: %s); the fail modes decide", type(exc).__name__,
                        str(exc)[:200] or "deadline passed")

    async def _learn_topology(self) -> None:
        # a cluster client that meets a burst of calls before it knows the slots sends most of
        # them to the wrong node, and redis-py then resets connections other calls are using
        async with self._topology:
            if not self._topology_known:
                await self.redis.initialize()
                self._topology_known = True

    def _node_breakers_of(self, keys: Sequence[str]) -> tuple[Breaker, ...]:
        """The breakers of the Cluster nodes that hold ``keys`` (as the client knows them)."""
        names = set()
        for key in keys:
            try:
                node = self.redis.get_node_from_key(key)
            except Exception:  # (no slot map yet, or a slot no node serves)
                node = None
            names.add("" if node is None else node.name)
        breakers = []
        for name in sorted(names):
            breaker = self._node_breakers.get(name)
            if breaker is None:
                breaker = self._node_breakers[name] = Breaker()
            breakers.append(breaker)
        return tuple(breakers)

    async def decide(self, calls: Sequence[CheckCall]) -> list[Sequence[int] | StoreUnavailable]:
        """check.lua's flat reply for each call (``parse_outcome`` reads it), in order; a
        call Redis could not decide is its StoreUnavailable (the fail modes decide it).

        On one Redis the calls go in one write, decided in this order, so they get the
        answers sequential checks would get; on a Cluster each is a call of its own.
        """
        if not calls:
            return []
        now = "" if self._clock is None else str(self._clock())
        coalescer = self.coalescer
        if coalescer is None:
            return list(await asyncio.gather(*(self._decide_alone(call, now)
                                               for call in calls)))
        try:
            self._admit("check")
        except StoreUnavailable as exc:
            return [exc] * len(calls)
        futures = coalescer.submit([(keys, now, cost, tuple(rule_args))
                                    for keys, cost, _, _, rule_args in calls])
        replies: list[Sequence[int] | StoreUnavailable] = []
        try:
            for future in futures:
                try:
                    replies.append(await future)
                except REDIS_FAILURES as exc:  # (the breaker counted its write: _batch_done)
                    replies.append(StoreUnavailable(f"redis: {type(exc).__name__}"))
        except BaseException:  # the caller went away: its checks are not sent, if not yet
            self.breaker.abandon()
            for future in futures:
                future.cancel()
            raise
        return replies

    async def _decide_alone(self, call: CheckCall, now: str) -> Sequence[int] | StoreUnavailable:
        """One check as a call of its own (a Cluster): split per slot when it must be."""
        keys, cost, n_bans, n_rules, rule_args = call
        breakers = self._node_breakers_of(keys) if self.sharded and self._topology_known else ()
        try:
            if self.sharded:
                plan = slots.split(keys, n_bans, n_rules, rule_args)
                if len(plan.groups) > 1:
                    return await self._check_slots(plan, now, cost, breakers)
            args = check_args(now, cost, len(keys), rule_args)
            script = self.scripts.check

            async def one() -> Sequence[int]:
                [reply] = check_replies(await script(keys=list(keys), args=args))
                if isinstance(reply, ResponseError):
                    raise reply
                return reply  # type: ignore[no-any-return]

            return await self._call(one, op="check", breakers=breakers)
        except StoreUnavailable as exc:
            return exc

    async def _check_slots(self, plan: slots.SlotPlan, now: str, cost: int,
                           breakers: Sequence[Breaker] = ()) -> list[int]:
        """One check.lua call per slot; refund the slots that took if any denied.

        The first slot reads Redis TIME and the others are given that time, so every hit of
        the request is stamped alike and one (now_ms, cost) gives all of it back: refund.lua
        removes log entries by their exact stamp, and slots live on nodes whose clocks differ.
        """

        def call(group: slots.SlotGroup, at: str) -> Any:
            keys = plan.keys(group)
            args = check_args(at, cost, len(keys), plan.args(group))
            return self.scripts.check(keys=keys, args=args)

        async def ask_one(index: int, at: str) -> None:
            [reply] = check_replies(await call(plan.groups[index], at))
            if isinstance(reply, ResponseError):
                raise reply
            answered[index] = _answer(reply)

        answered: dict[int, slots.Answer] = {}  # filled as the slots answer

        ask = ask_one

        async def ask_all() -> list[BaseException]:
            await ask(0, now)
            at = str(answered[0].now_ms)
            results = await asyncio.gather(*(ask(i, at) for i in range(1, len(plan.groups))),
                                           return_exceptions=True)
            failed = [r for r in results if isinstance(r, BaseException)]
            for exc in failed:
                if not isinstance(exc, REDIS_FAILURES):
                    raise exc
            return failed

        def owed() -> list[slots.Refund]:
            return slots.taken(plan, [answered.get(i) for i in range(len(plan.groups))], cost)

        try:
            failed = await self._call(ask_all, op="check", breakers=breakers,
                                      healthy=lambda failed: not failed)
        except StoreUnavailable:
            # the deadline passed with some slots done: they may have taken hits
            self._in_background(self._refund_groups(plan, owed(), cost))
            raise
        if failed:
            # some slots answered, others failed: give back what was taken, and let the fail
            # modes decide this request as if Redis had not answered at all
            self._in_background(self._refund_groups(plan, owed(), cost))
            raise StoreUnavailable(f"redis: {type(failed[0]).__name__}") from failed[0]
        merged = slots.merge(plan, [answered[i] for i in range(len(plan.groups))], cost)
        if merged.refunds:
            # awaited: once the denial is answered, the request has consumed nothing
            await self._refund_groups(plan, merged.refunds, cost)
        return _reply(merged.answer)

    def _in_background(self, work: Awaitable[None]) -> None:
        """Run a refund owed after a failure without making the degraded answer wait for it."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _refund_groups(self, plan: slots.SlotPlan, refunds: Sequence[slots.Refund],
                             cost: int) -> None:
        """Give back what each slot took; failures are logged (the hits then expire)."""

        def call(rules: tuple[int, ...], at_ms: int) -> Any:
            keys = [plan.rules[r].keys[0] for r in rules]
            args: list[str | int] = [cost, at_ms, len(rules)]
            for r in rules:
                args += plan.rules[r].refund_args
            return self.scripts.refund(keys=keys, args=args)

        if not refunds:
            return
        # not through the breaker: a refund is owed even while the circuit opens
        try:
            async with asyncio.timeout(self.timeout):
                results = await asyncio.gather(*(call(rules, at) for _, rules, at in refunds),
                                               return_exceptions=True)
        except TimeoutError:
            results = [TimeoutError()]
        for result in results:
            if isinstance(result, BaseException):
                log.warning("could not give back hits after a cross-slot denial (%s); they "
                            "expire with their window", type(result).__name__)

    async def refund(self, keys: Sequence[str], cost: int, at_ms: int,
                     rule_args: Sequence[str | int]) -> list[int]:
        """Run refund.lua: give back ``cost`` hits taken at ``at_ms``; hits given back per rule."""

        def call(indexes: Sequence[int], args: Sequence[str | int]) -> Any:
            return self.scripts.refund(keys=[keys[i] for i in indexes],
                                       args=[cost, at_ms, len(indexes), *args])

        if not self.sharded:
            raw = await self._call(lambda: call(range(len(keys)), rule_args), op="refund")
            return [int(v) for v in raw]
        groups = slots.split_refund(keys, rule_args)
        answers = await self._call(lambda: asyncio.gather(*(call(i, a) for i, a in groups)),
                                   op="refund")
        given = [0] * len(keys)
        for (indexes, _), raw in zip(groups, answers, strict=True):
            for i, value in zip(indexes, raw, strict=True):
                given[i] = int(value)
        return given

    async def claim(self, key: str, ttl_ms: int) -> bool:
        """SET NX with a TTL: True for the first caller only (e.g. one refund per token)."""
        return bool(await self._call(
            lambda: self.redis.set(key, b"1", nx=True, px=max(ttl_ms, 1)), op="claim"))

    async def release(self, key: str) -> None:
        """Undo a claim (best effort: a claim whose work failed may be retried)."""
        await self._call(lambda: self.redis.delete(key), op="release")

    def now_ms(self) -> int:
        """This process's idea of now in ms: the test clock when one is injected."""
        return self._clock() if self._clock is not None else time.time_ns() // 1_000_000

    async def carry_over(self, pairs: Sequence[tuple[str, str]]) -> None:
        """Copy each (old, new) key to its new name, with its TTL, unless the new one exists."""

        async def copy() -> None:
            read = self.redis.pipeline(transaction=False)
            for old, _ in pairs:
                read.dump(old)
                read.pttl(old)
            found = await read.execute()
            write = self.redis.pipeline(transaction=False)
            writes = 0
            for i, (_, new) in enumerate(pairs):
                dumped, ttl = found[2 * i], int(found[2 * i + 1])
                if dumped is not None and (ttl > 0 or ttl == -1):
                    # no REPLACE: a key already written under the new name is newer; keep it
                    write.restore(new, max(ttl, 0), dumped)
                    writes += 1
            if writes:
                await write.execute(raise_on_error=False)

        if pairs:
            await self._call(copy, op="carry_over")

    async def ready(self) -> bool:
        """True when Redis answers and the scripts are loaded (loading them if flushed); on a
        Cluster, once the slot map is known and every master answers."""

        async def load() -> None:
            if self.sharded:
                await self.redis.ping(target_nodes=self.redis.PRIMARIES)
            loaded = await self.redis.script_exists(*self.scripts.shas)
            if not all(loaded):
                for script in self.scripts.all:
                    await self.redis.script_load(script.script)

        try:
            await self._call(load, op="ready", timeout=max(self.timeout, READY_TIMEOUT))
        except StoreUnavailable:
            return False
        return True


def _answer(raw: Sequence[int]) -> slots.Answer:
    outcome = parse_outcome(raw)
    return slots.Answer(
        status=int(outcome.status), now_ms=outcome.now_ms, shadowed=outcome.shadowed,
        index=outcome.culprit, wait_ms=outcome.wait_ms,
        windows=tuple((w.remaining, w.reset_ms, w.retry_ms) for w in outcome.windows),
    )


def _reply(answer: slots.Answer) -> list[int]:
    """The flat reply check.lua would give for ``answer`` (``parse_outcome`` reads it)."""
    reply = [answer.status, answer.now_ms, int(answer.shadowed), answer.index, answer.wait_ms]
    for window in answer.windows:
        reply += window
    return reply


_STATUS = {int(status): status for status in Status}
_new = tuple.__new__


def parse_outcome(raw: Sequence[int]) -> Outcome:
    """Validate the flat array check.lua returns."""
    n = len(raw)
    if n < 5 or (n - 5) % 3:
        raise ValueError(f"check.lua answered {n} values")
    # Lua numbers come back as Redis integers: ints already. The tuples are built with
    # tuple.__new__ (what NamedTuple._make does), from slices of exactly three.
    windows = tuple([_new(WindowState, raw[i:i + 3]) for i in range(5, n, 3)])
    return _new(Outcome, (_STATUS[raw[0]], raw[1], raw[2] == 1, raw[3], raw[4], windows))
