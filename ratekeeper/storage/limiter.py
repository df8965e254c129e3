"""Runs the scripts and turns their answers (or Redis's failure) into typed results.

This is the one place where Redis errors become ``StoreUnavailable``. Every call has a
deadline (``timeout``, covering connecting and the call itself, and starting when the call
leaves this process: waiting for its turn here is never Redis failing) and goes through a
circuit breaker, so a dead or stopped Redis costs at most one deadline per call until the
circuit opens, then nothing. On Redis Cluster each node has its own breaker, so a failing
node degrades only the checks whose keys it holds, and a check whose keys span several slots
is split per slot (see ``slots``); on one Redis the checks of a tick are one write
(``coalescer``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from enum import IntEnum
from typing import Any, NamedTuple, TypeVar

from redis.exceptions import (
    AskError,
    MovedError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)

from ratekeeper.errors import StoreUnavailable
from ratekeeper.metrics import Metrics
from ratekeeper.storage import slots
from ratekeeper.storage.breaker import Breaker, BreakerState
from ratekeeper.storage.coalescer import Arg, Coalescer, Request, within
from ratekeeper.storage.pipe import Locate, locate_for, node_locate
from ratekeeper.storage.scripts import Scripts, check_args, check_replies

__all__ = ["CheckCall", "Limiter", "Outcome", "Status", "WindowState", "parse_outcome"]

log = logging.getLogger("ratekeeper.storage.limiter")

T = TypeVar("T")
# what a failing Redis raises: its own errors, socket errors, our deadline, and the cluster
# client's errors that are not RedisErrors (no reachable node)
REDIS_FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)
READY_TIMEOUT = 0.5  # seconds; readiness may wait longer than a check
# Redis calls (other than coalesced checks) one process has out at most; more wait their
# turn, and their deadline starts when it comes (each call holds a connection, a Cluster
# client opens one per call out, and a burst of connects would miss every deadline)
MAX_IN_FLIGHT = 64
TOPOLOGY_REFRESH = 1.0  # seconds between reads of a Cluster's slot map after a failure
# what a Cluster node answers for a slot it does not hold (the Cluster client follows them);
# CLUSTERDOWN is not one: the node refuses to serve (a master is down and the cluster requires
# full coverage), and the check is that node's failure
REDIRECTS = (MovedError, AskError, TryAgainError)


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
    """The script's answer for one request, as the local cache and the denial counts read it
    (a tuple: one is made per denial)."""

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
                 checks: Locate | None = None) -> None:
        self.redis = redis
        self.timeout = timeout
        self.scripts = Scripts.register(redis)
        self.breaker = breaker or Breaker()
        # on a cluster, keys of different hash tags may live in different slots and nodes:
        # each node has its breaker, so a failing node degrades only the checks it holds
        self.sharded = _is_cluster(redis) if sharded is None else sharded
        self._nodes: dict[str, tuple[Coalescer, Breaker]] = {}
        self._refreshed_at = float("-inf")
        self.coalescer: Coalescer | None = None
        if not self.sharded:
            # (``checks``: where the coalesced checks connect, when ``redis`` cannot say)
            pool = getattr(redis, "connection_pool", None)
            self.coalescer = Coalescer(locate_for(redis) if checks is None else checks,
                                       self.scripts.check, timeout=timeout,
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

    def _batch_done(self, seconds: float, error: BaseException | None,
                    breaker: Breaker | None = None) -> None:
        """A coalesced write ended: its breaker and the metrics count it once."""
        breaker = breaker or self.breaker
        if error is None:
            breaker.success()
            self._report("check", None, seconds)
        elif isinstance(error, REDIS_FAILURES):
            self._failed("check", error, (breaker,))

    async def _call(self, make: Callable[[], Awaitable[T]], *, op: str,
                    timeout: float | None = None, breakers: Sequence[Breaker] = ()) -> T:
        """Run ``make()`` under the breakers (default: the limiter's) and the deadline; Redis
        failures become ours.

        The deadline starts once the call may go (``MAX_IN_FLIGHT``): waiting for its turn
        in this process is not Redis failing. ``op`` names the call in metrics.
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
        for breaker in breakers:
            breaker.success()
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
            breaker.failure()
        self._log_failure(exc)
        self._report(op, type(exc).__name__)
        return StoreUnavailable(f"redis: {type(exc).__name__}")

    def _report(self, op: str, error: str | None, seconds: float = 0.0) -> None:
        metrics = self.metrics
        if metrics is None:
            return
        if error is None:
            metrics.redis_call(op, seconds)
            if self._reported_state == "closed":
                return  # (a call that went well leaves every breaker closed)
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
        states = {self.breaker.state, *(b.state for _, b in self._nodes.values())}
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
            return await self._decide_sharded(calls, now)
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

    async def _decide_sharded(self, calls: Sequence[CheckCall], now: str
                              ) -> list[Sequence[int] | StoreUnavailable]:
        """The checks on a Cluster, in order: checks of one slot each go out together (each
        node's coalescer keeps their order); a check over several slots waits for the ones
        before it, and the ones after it wait for it, so a batch is decided as one check
        after another."""
        if not self._topology_known:
            try:
                await self._call(self._learn_topology, op="topology")
            except StoreUnavailable as exc:
                return [exc] * len(calls)
        replies: list[Sequence[int] | StoreUnavailable] = []
        run: list[Request] = []  # checks of one slot each, since the last over several
        for keys, cost, n_bans, n_rules, rule_args in calls:
            plan = slots.split(keys, n_bans, n_rules, rule_args)
            if len(plan.groups) == 1:
                run.append((keys, now, cost, tuple(rule_args)))
                continue
            replies += await self._script_calls(run)
            run = []
            replies.append(await self._unavailable_as_reply(self._check_slots(plan, now, cost)))
        replies += await self._script_calls(run)
        return replies

    @staticmethod
    async def _unavailable_as_reply(call: Awaitable[Sequence[int]]
                                    ) -> Sequence[int] | StoreUnavailable:
        try:
            return await call
        except StoreUnavailable as exc:
            return exc

    async def _script_call(self, keys: Sequence[str], now: str, cost: int,
                           rule_set: tuple[str | int, ...]) -> Sequence[int]:
        """check.lua for keys of one slot (``_script_calls``); raises StoreUnavailable."""
        [reply] = await self._script_calls([(keys, now, cost, rule_set)])
        if isinstance(reply, StoreUnavailable):
            raise reply
        return reply

    async def _script_calls(self, requests: Sequence[Request]
                            ) -> list[Sequence[int] | StoreUnavailable]:
        """check.lua for checks whose keys share one slot each, in order.

        The checks of one node go to its coalescer together, so they leave in one write, in
        order. A check whose node is unknown, or whose node answers that it no longer holds
        the slot, goes through the Cluster client instead (it follows MOVED and ASK).
        """
        results: list[Sequence[int] | StoreUnavailable | None] = [None] * len(requests)
        by_node: dict[int, tuple[Coalescer, Breaker, list[int]]] = {}
        alone: list[int] = []
        for i, (keys, _, _, _) in enumerate(requests):
            node = self._node_of(keys[0])
            if node is None:
                alone.append(i)
            else:
                by_node.setdefault(id(node[0]), (*node, []))[2].append(i)
        sent: list[tuple[int, asyncio.Future[Any], Breaker]] = []
        for coalescer, breaker, indexes in by_node.values():
            try:
                self._admit("check", (breaker,))
            except StoreUnavailable as exc:
                for i in indexes:
                    results[i] = exc
                continue
            futures = coalescer.submit([requests[i] for i in indexes])
            sent += [(i, future, breaker) for i, future in zip(indexes, futures, strict=True)]
        try:
            for i, future, _ in sent:
                try:
                    results[i] = await future
                except REDIRECTS:
                    self._refresh_topology()
                    alone.append(i)
                except REDIS_FAILURES as exc:  # (the node's breaker counted its write)
                    self._refresh_topology()
                    results[i] = StoreUnavailable(f"redis: {type(exc).__name__}")
        except BaseException:
            for _, future, breaker in sent:
                breaker.abandon()
                future.cancel()
            raise
        for i in sorted(alone):
            results[i] = await self._unavailable_as_reply(self._through_client(*requests[i]))
        return results  # type: ignore[return-value]

    async def _through_client(self, keys: Sequence[str], now: Arg, cost: Arg,
                              rule_set: tuple[Arg, ...]) -> Sequence[int]:
        """check.lua for one check through the Cluster client (under the deadline)."""
        args = check_args(str(now), int(cost), len(keys),
                          [v.decode() if isinstance(v, bytes) else v for v in rule_set])
        script = self.scripts.check

        async def one() -> Sequence[int]:
            [reply] = check_replies(await script(keys=list(keys), args=args))
            if isinstance(reply, ResponseError):
                raise reply
            return reply  # type: ignore[no-any-return]

        return await self._call(one, op="check")

    def _node_of(self, key: str) -> tuple[Coalescer, Breaker] | None:
        """The coalescer and breaker of the Cluster node that holds ``key``, as the client's
        slot map says; None when it cannot say."""
        try:
            node = self.redis.get_node_from_key(key)
        except Exception:  # (a slot no node serves, in a topology change)
            return None
        return None if node is None else self._node(node)

    def _node(self, node: Any) -> tuple[Coalescer, Breaker]:
        """The coalescer and breaker of a Cluster node (a ``ClusterNode``)."""
        known = self._nodes.get(node.name)
        if known is None:
            coalescer = Coalescer(node_locate(self.redis, node.host, node.port),
                                  self.scripts.check, timeout=self.timeout,
                                  slot_of=self.redis.keyslot)
            breaker = Breaker()
            coalescer.on_batch = lambda seconds, error: self._batch_done(seconds, error, breaker)
            known = self._nodes[node.name] = (coalescer, breaker)
        return known

    def _refresh_topology(self) -> None:
        """Have the Cluster client read the slot map again (at most once a second): a node
        failed or no longer holds a slot, and a replica may have taken its place."""
        now = time.monotonic()
        if now - self._refreshed_at < TOPOLOGY_REFRESH:
            return
        self._refreshed_at = now

        async def refresh() -> None:
            try:
                await within(self.redis.nodes_manager.initialize(), READY_TIMEOUT * 4)
            except (*REDIS_FAILURES, Exception) as exc:
                log.debug("the Cluster's slot map could not be read (%s)", type(exc).__name__)

        self._in_background(refresh())

    async def _check_slots(self, plan: slots.SlotPlan, now: str, cost: int) -> list[int]:
        """One check.lua call per slot; refund the slots that took if any denied.

        The first slot reads Redis TIME and the others are given that time, so every hit of
        the request is stamped alike and one (now_ms, cost) gives all of it back: refund.lua
        removes log entries by their exact stamp, and slots live on nodes whose clocks differ.
        """
        answered: dict[int, slots.Answer] = {}  # filled as the slots answer

        async def ask(index: int, at: str) -> None:
            group = plan.groups[index]
            reply = await self._script_call(plan.keys(group), at, cost, tuple(plan.args(group)))
            answered[index] = _answer(reply)

        def owed() -> list[slots.Refund]:
            return slots.taken(plan, [answered.get(i) for i in range(len(plan.groups))], cost)

        await ask(0, now)  # (a failure here took nothing: no slot answered)
        at = str(answered[0].now_ms)
        results = await asyncio.gather(*(ask(i, at) for i in range(1, len(plan.groups))),
                                       return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        for exc in failed:
            if not isinstance(exc, StoreUnavailable):
                raise exc
        if failed:
            # some slots answered, others failed: give back what was taken, and let the fail
            # modes decide this request as if Redis had not answered at all
            self._in_background(self._refund_groups(plan, owed(), cost))
            raise failed[0]
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
        async def give_back(rules: tuple[int, ...], at_ms: int) -> Any:
            async with self._in_flight:  # (its deadline starts when its turn comes)
                return await within(call(rules, at_ms), max(self.timeout, READY_TIMEOUT))

        results = await asyncio.gather(*(give_back(rules, at) for _, rules, at in refunds),
                                       return_exceptions=True)
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

    async def clear(self, keys: Sequence[str]) -> int:
        """Delete ``keys`` (one DEL each: on a Cluster they may live in different slots);
        how many existed."""

        async def delete() -> int:
            pipe = self.redis.pipeline(transaction=False)
            for key in keys:
                pipe.delete(key)
            return sum(int(count) for count in await pipe.execute())

        return await self._call(delete, op="clear")

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
                await self._warm_masters()
            elif self.coalescer is not None:
                await self.coalescer.connect()  # (the checks' connection, warm)
            loaded = await self.redis.script_exists(*self.scripts.shas)
            if not all(loaded):
                for script in self.scripts.all:
                    await self.redis.script_load(script.script)

        try:
            await self._call(load, op="ready", timeout=max(self.timeout, READY_TIMEOUT))
        except StoreUnavailable:
            return False
        return True

    async def _warm_masters(self) -> None:
        """Connect to every master and load the scripts there (``ready``)."""
        for node in self.redis.get_primaries():
            await self._node(node)[0].connect()
            loaded = await self.redis.execute_command("SCRIPT EXISTS", *self.scripts.shas,
                                                      target_nodes=node)
            if not all(loaded):
                for script in self.scripts.all:
                    await self.redis.execute_command("SCRIPT LOAD", script.script,
                                                     target_nodes=node)

    async def close(self) -> None:
        """Close the coalescers' connections (the store closes its client)."""
        if self.coalescer is not None:
            await self.coalescer.close()
        for coalescer, _ in self._nodes.values():
            await coalescer.close()
        self._nodes.clear()


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
