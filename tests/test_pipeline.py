"""The coalescer against a real redis-server: exactness, order, errors, NOSCRIPT, cancellation."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import BlockingConnectionPool, Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, RedisError, ResponseError

from ratekeeper.errors import StoreUnavailable
from ratekeeper.flags import FlagBoard
from ratekeeper.keys import Keyspace
from ratekeeper.limiter import Limiter, Status, parse_outcome
from ratekeeper.pipeline import Coalescer, coalesced, encode_eval, encode_evalsha
from ratekeeper.scripts import LuaScript, Scripts, check_args
from ratekeeper.service import Checker

from conftest import ONE_RULE, SALT, FakeClock, config_from
from redis_servers import RedisServer, free_port, running_redis


class PipelinedRedis(aioredis.Redis):
    """Not exactly redis.asyncio.Redis, so the Coalescer takes redis-py's pipeline."""


def coalesced_checker(text: str, redis: aioredis.Redis, prefix: str,
                      clock: FakeClock | None = None) -> tuple[Checker, Coalescer]:
    """A Checker whose limiter sends its check script through a Coalescer."""
    config = config_from(text)
    limiter = Limiter(redis, timeout=2.0, clock=clock)
    limiter.scripts = coalesced(limiter.scripts, redis)
    checker = Checker(config, Keyspace(SALT, prefix=prefix, grouping=config.ip), limiter,
                      FlagBoard(config.flags))
    assert isinstance(limiter.scripts.check, Coalescer)
    return checker, limiter.scripts.check


async def ask(checker: Checker, **fields: Any) -> Any:
    return await checker.check(checker.decode(json.dumps(fields).encode()))


def counter_call(prefix: str, subject: str, *, cost: int = 1, limit: int = 100,
                 now_ms: int = 1_700_000_000_000) -> tuple[list[str], list[str | int]]:
    """KEYS and ARGV of a one-request check.lua call: one sliding-counter rule of one window
    of a minute."""
    keys = [f"{prefix}:{{{subject}}}:r"]
    return keys, check_args(now_ms, cost, len(keys), ["c", "0", 0, 1, limit, 60_000])


@pytest.mark.parametrize("transport", ["direct", "redis-py pipeline"])
@pytest.mark.parametrize("algorithm", ["sliding-log", "sliding-counter"])
async def test_concurrent_checks_admit_exactly_the_limit(
        redis_server: RedisServer, key_prefix: str, clock: FakeClock, algorithm: str,
        transport: str) -> None:
    """200 concurrent checks of one subject at a limit of 20 admit exactly 20, coalesced,
    on either transport."""
    kind = aioredis.Redis if transport == "direct" else PipelinedRedis
    redis = kind.from_url(redis_server.url)
    checker, coalescer = coalesced_checker(
        ONE_RULE.format(limit="20 per minute", algorithm=algorithm), redis, key_prefix, clock)
    assert coalescer._direct is (transport == "direct")
    decisions = await asyncio.gather(
        *(ask(checker, action="a", ip="198.51.100.7") for _ in range(200)))
    allowed = [d for d in decisions if d.allowed]
    assert len(allowed) == 20
    assert all(d.reason == "rate_limited" for d in decisions if not d.allowed)
    # the hits were taken in call order: remaining counts down 19..0 over the first 20
    assert [d.limits[0].remaining for d in decisions[:20]] == list(range(19, -1, -1))
    assert coalescer.calls == 200
    assert coalescer.batches < coalescer.calls
    await redis.aclose()


async def test_one_tick_is_one_pipeline_and_answers_go_to_their_callers(
        redis: aioredis.Redis, key_prefix: str) -> None:
    """Calls queued in one tick are one pipeline; each caller gets its own subject's answer."""
    coalescer = Coalescer(redis, Scripts.register(redis).check)
    futures = []
    for i in range(50):
        keys, args = counter_call(key_prefix, f"s{i}", cost=i, limit=100)
        futures.append(coalescer.queue(keys, args))
    results = [parse_outcome(raw) for raw in await asyncio.gather(*futures)]
    assert coalescer.batches == 1 and coalescer.calls == 50
    # cost 0 only looks, so the first subject still has all 100
    assert [r.windows[0].remaining for r in results] == [100 - i for i in range(50)]
    assert all(r.status is Status.ALLOWED for r in results)


async def test_a_batch_requests_checks_always_go_in_one_call(
        redis: aioredis.Redis, key_prefix: str) -> None:
    """A batch request's checks (one request_many) go in one script call whatever its size,
    so Redis decides them in their order even past max_batch (two calls out on two
    connections could reach it in either order); single calls queued with it go in calls of
    their own around it."""
    coalescer = Coalescer(redis, Scripts.register(redis).check, max_batch=8)
    before = [coalescer.queue(*counter_call(key_prefix, f"s{i}")) for i in range(5)]
    subject = f"{key_prefix}:{{one}}:r"  # one subject, limit 30: the order shows
    group = coalescer.request_many([([subject], "", 1, ("c", "0", 0, 1, 30, 60_000))] * 40)
    after = [coalescer.queue(*counter_call(key_prefix, f"t{i}")) for i in range(5)]
    replies = await asyncio.gather(*group)
    await asyncio.gather(*before, *after)
    assert coalescer.calls == 50 and coalescer.batches == 3  # 5, the 40, 5
    assert [parse_outcome(r).status for r in replies] == (
        [Status.ALLOWED] * 30 + [Status.LIMITED] * 10)
    assert [parse_outcome(r).windows[0].remaining for r in replies[:30]] == list(
        range(29, -1, -1))


async def test_max_batch_splits_a_large_tick(redis: aioredis.Redis, key_prefix: str) -> None:
    """A tick with more calls than max_batch goes out as several pipelines, none lost."""
    coalescer = Coalescer(redis, Scripts.register(redis).check, max_batch=8)
    futures = [coalescer.queue(*counter_call(key_prefix, f"s{i}")) for i in range(20)]
    results = await asyncio.gather(*futures)
    assert len(results) == 20 and coalescer.calls == 20
    assert coalescer.batches == 3


async def test_a_script_error_fails_only_its_own_call(redis: aioredis.Redis,
                                                      key_prefix: str) -> None:
    """A call whose ARGV the script rejects raises ResponseError; its batch-mates, decided
    in the same check.lua call, succeed."""
    coalescer = Coalescer(redis, Scripts.register(redis).check)
    good = coalescer.queue(*counter_call(key_prefix, "good"))
    keys, args = counter_call(key_prefix, "bad")
    args[7] = "not-a-number"  # the rule's window count
    bad = coalescer.queue(keys, args)
    also_good = coalescer.queue(*counter_call(key_prefix, "good"))
    first, error, second = await asyncio.gather(good, bad, also_good, return_exceptions=True)
    assert isinstance(error, ResponseError)
    assert parse_outcome(first).windows[0].remaining == 99
    assert parse_outcome(second).windows[0].remaining == 98
    assert coalescer.batches == 1 and coalescer.script_calls == 1


async def test_script_flush_is_recovered_within_the_batch(redis: aioredis.Redis,
                                                          key_prefix: str) -> None:
    """After SCRIPT FLUSH the batch is answered (its calls sent again with EVAL), each hit
    counted once, and the script is cached again."""
    coalescer = Coalescer(redis, Scripts.register(redis).check)
    await asyncio.gather(coalescer.queue(*counter_call(key_prefix, "x")))
    await redis.script_flush()
    results = await asyncio.gather(*(coalescer.queue(*counter_call(key_prefix, "x"))
                                     for _ in range(5)))
    assert [parse_outcome(r).windows[0].remaining for r in results] == [98, 97, 96, 95, 94]
    assert (await redis.script_exists(coalescer.sha)) == [True]


async def test_connection_failure_fails_every_call_and_the_limiter_translates_it() -> None:
    """With Redis unreachable each caller gets a RedisError, which the Limiter makes
    StoreUnavailable, so the fail-open/closed decision still happens in one place."""
    # no retries: redis-py's default backoff would only make the test slow
    dead = aioredis.Redis(port=free_port(), socket_connect_timeout=0.5,
                          retry=Retry(NoBackoff(), 0))
    try:
        coalescer = Coalescer(dead, Scripts.register(dead).check)
        outcomes = await asyncio.gather(*(coalescer.queue(*counter_call("p", f"s{i}"))
                                          for i in range(3)), return_exceptions=True)
        assert all(isinstance(o, RedisConnectionError) for o in outcomes)
        limiter = Limiter(dead, timeout=1.0)
        limiter.scripts = coalesced(limiter.scripts, dead)
        keys, args = counter_call("p", "s")
        with pytest.raises(StoreUnavailable):
            await limiter.check(keys, 1, 0, 1, args[4:-3])
    finally:
        await dead.aclose()


async def test_a_caller_that_gives_up_before_sending_is_not_sent(
        redis: aioredis.Redis, key_prefix: str) -> None:
    """A call cancelled before its batch leaves never runs (its hit is not taken); the
    others are answered."""
    coalescer = Coalescer(redis, Scripts.register(redis).check)
    futures = [coalescer.queue(*counter_call(key_prefix, "same")) for i in range(3)]
    futures[1].cancel()
    first, third = await asyncio.gather(futures[0], futures[2])
    assert parse_outcome(first).windows[0].remaining == 99
    assert parse_outcome(third).windows[0].remaining == 98
    assert (coalescer.calls, coalescer.dropped) == (2, 1)


async def test_calls_wait_while_the_inflight_pipelines_are_out(redis: aioredis.Redis,
                                                               key_prefix: str) -> None:
    """With one pipeline allowed out, calls made meanwhile go together in the next one."""
    coalescer = Coalescer(redis, Scripts.register(redis).check, max_inflight=1)
    first = coalescer.queue(*counter_call(key_prefix, "a"))
    await asyncio.sleep(0)  # the first pipeline leaves
    rest = [coalescer.queue(*counter_call(key_prefix, f"b{i}")) for i in range(10)]
    await asyncio.gather(first, *rest)
    assert (coalescer.batches, coalescer.calls) == (2, 11)


async def test_a_call_leaves_beside_a_small_one_and_waits_behind_a_large_one(
        redis: aioredis.Redis, key_prefix: str) -> None:
    """A second call goes out at once while the one out carries fewer than ``overlap_below``
    checks (a lone check does not wait a round trip), and waits while it carries more (under
    load the next call grows instead)."""
    coalescer = Coalescer(redis, Scripts.register(redis).check, overlap_below=4)
    small = [coalescer.queue(*counter_call(key_prefix, f"small{i}")) for i in range(3)]
    await asyncio.sleep(0)
    lone = coalescer.queue(*counter_call(key_prefix, "lone"))
    await asyncio.sleep(0)
    assert coalescer.batches == 2  # beside the small call, before it was answered
    await asyncio.gather(*small, lone)
    large = [coalescer.queue(*counter_call(key_prefix, f"large{i}")) for i in range(4)]
    await asyncio.sleep(0)
    behind = [coalescer.queue(*counter_call(key_prefix, f"behind{i}")) for i in range(2)]
    await asyncio.sleep(0)
    assert coalescer.batches == 3  # waits for the large call
    replies = await asyncio.gather(*large, *behind)
    assert coalescer.batches == 4 and coalescer.calls == 10
    assert all(parse_outcome(reply).status is Status.ALLOWED for reply in replies)
    # what was out is all back: a small call and a lone check overlap again
    assert coalescer._out == coalescer._inflight == 0
    again = [coalescer.queue(*counter_call(key_prefix, f"again{i}")) for i in range(2)]
    await asyncio.sleep(0)
    again.append(coalescer.queue(*counter_call(key_prefix, "again-lone")))
    await asyncio.sleep(0)
    assert coalescer.batches == 6
    await asyncio.gather(*again)
    assert coalescer._out == coalescer._inflight == 0


async def test_an_unreadable_reply_fails_its_callers_and_frees_the_slot(
        redis: aioredis.Redis, key_prefix: str) -> None:
    """A script call whose reply is not one reply per request (here a script that answers a
    number) fails each of its callers as a Redis error (the limiter's fail modes answer),
    and the calls after it still go out: the batch does not keep its slot."""
    odd = LuaScript(redis, "odd", "return 42")
    coalescer = Coalescer(redis, odd, overlap_below=2)
    for _ in range(2):
        outcomes = await asyncio.wait_for(asyncio.gather(
            *(coalescer.queue(*counter_call(key_prefix, f"s{i}")) for i in range(3)),
            return_exceptions=True), 5)
        assert all(isinstance(o, ResponseError) and "could not be read" in str(o)
                   for o in outcomes), outcomes
        assert coalescer._out == coalescer._inflight == 0
    assert coalescer.batches == 2


async def test_after_settle_runs_once_the_batch_callers_ran_and_before_the_next_tick(
        redis: aioredis.Redis, key_prefix: str) -> None:
    """``after_settle`` runs after the done-callbacks of every future a batch settled and
    after the next call has left, and before anything those callbacks scheduled (the hot
    paths' outbox writes the answers a script call settled in the tick they are made)."""
    loop = asyncio.get_running_loop()
    coalescer = Coalescer(redis, Scripts.register(redis).check, overlap_below=3)
    events: list[str] = []
    coalescer.after_settle.append(lambda: events.append(f"after, {coalescer.batches} sent"))
    futures = [coalescer.queue(*counter_call(key_prefix, f"s{i}")) for i in range(3)]
    await asyncio.sleep(0)  # the first call leaves; one more waits behind its 3 checks
    later = coalescer.queue(*counter_call(key_prefix, "later"))

    def answered(name: str) -> Callable[[asyncio.Future[Any]], None]:
        def callback(future: asyncio.Future[Any]) -> None:
            events.append(name)
            loop.call_soon(events.append, f"{name} next")
        return callback

    for i, future in enumerate(futures):
        future.add_done_callback(answered(f"caller {i}"))
    await asyncio.gather(*futures)
    for _ in range(3):
        await asyncio.sleep(0)
    assert events[:7] == ["caller 0", "caller 1", "caller 2", "after, 2 sent",
                          "caller 0 next", "caller 1 next", "caller 2 next"]
    assert parse_outcome(await later).status is Status.ALLOWED
    await asyncio.sleep(0)  # (the hook was scheduled after this task's wake-up)
    assert events[7:] == ["after, 2 sent"]


async def test_batch_deadline_fails_every_call_with_a_timeout(key_prefix: str) -> None:
    """With its own deadline, a batch a server never answers fails each caller with a
    timeout (a RedisError or TimeoutError, both of which the Limiter translates)."""
    with socket.socket() as mute:  # accepts connections, never answers
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        port = mute.getsockname()[1]
        client = aioredis.Redis(port=port, retry=Retry(NoBackoff(), 0),
                                socket_connect_timeout=1.0, protocol=2)
        try:
            coalescer = Coalescer(client, Scripts.register(client).check, timeout=0.05)
            outcomes = await asyncio.gather(*(coalescer.queue(*counter_call(key_prefix, f"s{i}"))
                                              for i in range(3)), return_exceptions=True)
        finally:
            await client.aclose()
    assert all(isinstance(o, TimeoutError | RedisError) for o in outcomes), outcomes


def test_encoding_matches_redis_py() -> None:
    """The coalescer's own RESP encoding is byte for byte what redis-py would send."""
    keys = ["rk:{abc}:b", "rk:{abc}:tag", "é-key"]
    args: list[str | int] = ["", 1, 1, 1, "c", "0", 0, 2, 1000, 3_600_000, -5, "x y"]
    packed = b"".join(bytes(part) for part in
                      Connection().pack_command("EVALSHA", "f" * 40, len(keys), *keys, *args))
    assert encode_evalsha("f" * 40, keys, args) == packed
    assert encode_evalsha("f" * 40, keys, args) == packed  # from the encoding cache
    ascii_keys = keys[:2]  # encoded in one go (a non-ASCII one goes key by key)
    packed = b"".join(bytes(part) for part in Connection().pack_command(
        "EVALSHA", "f" * 40, len(ascii_keys), *ascii_keys, *args))
    assert encode_evalsha("f" * 40, ascii_keys, args) == packed
    source = "return {KEYS[1], ARGV[1]}"
    packed = b"".join(bytes(part) for part in
                      Connection().pack_command("EVAL", source, len(keys), *keys, *args))
    assert encode_eval(source, keys, args) == packed


async def test_readiness_sees_the_coalesced_script(redis: aioredis.Redis) -> None:
    """The limiter's readiness check loads and finds the coalesced script by its SHA."""
    limiter = Limiter(redis, timeout=1.0)
    limiter.scripts = coalesced(limiter.scripts, redis)
    await redis.script_flush()
    assert await limiter.ready()
    assert all(await redis.script_exists(*limiter.scripts.shas))


async def test_a_dead_pooled_connection_is_replaced_once(key_prefix: str) -> None:
    """After a Redis restart the pooled connection is dead: the batch goes again on a new
    one, once, and its hits are counted once (no persistence: counting starts over)."""
    with running_redis() as server:
        client = aioredis.Redis(port=server.port, retry=Retry(NoBackoff(), 0))
        try:
            coalescer = Coalescer(client, Scripts.register(client).check)
            first = await coalescer(*counter_call(key_prefix, "x"))
            assert parse_outcome(first).windows[0].remaining == 99
            server.restart()
            again = await asyncio.gather(*(coalescer.queue(*counter_call(key_prefix, "x"))
                                           for _ in range(3)))
            assert [parse_outcome(r).windows[0].remaining for r in again] == [99, 98, 97]
        finally:
            await client.aclose()


class MasterPool(BlockingConnectionPool):
    """A pool that says it is a Sentinel's master pool (``SentinelConnectionPool``'s flag)."""

    is_master = True


@pytest.mark.parametrize("pool_class", [BlockingConnectionPool, MasterPool])
async def test_readonly_through_a_sentinel_master_pool_goes_again_once(
        pool_class: type[BlockingConnectionPool], key_prefix: str) -> None:
    """READONLY through a Sentinel's master pool means the master was demoted while the
    connection stayed open: as redis-py does with such a connection, the coalescer drops it
    and, nothing having been written, sends the call once more on a fresh one; a replica
    still answering READONLY fails the caller with a ConnectionError. Through a plain pool
    the caller gets READONLY itself, on the one connection."""
    with running_redis() as master, running_redis(
            extra=("--replicaof", "127.0.0.1", str(master.port))) as replica:
        pool = pool_class.from_url(replica.url, max_connections=4, timeout=1.0,
                                   retry=Retry(NoBackoff(), 0))
        client = aioredis.Redis.from_pool(pool)
        try:
            coalescer = Coalescer(client, Scripts.register(client).check, timeout=2.0)
            before = int(replica.cli("INFO", "stats").split("total_connections_received:")[1]
                         .split()[0])
            with pytest.raises(RedisError) as raised:
                await coalescer.queue(*counter_call(key_prefix, "x"))
            after = int(replica.cli("INFO", "stats").split("total_connections_received:")[1]
                        .split()[0])
        finally:
            await client.aclose()
    if pool_class is MasterPool:
        assert isinstance(raised.value, RedisConnectionError)
        assert after - before == 3  # two connections (the call, once more), and our INFO
        assert coalescer._held == []
    else:
        assert isinstance(raised.value, ReadOnlyError)
        assert after - before == 2  # one connection, and our INFO
        assert len(coalescer._held) == 1
