"""check.lua deciding many requests in one call, against a real redis-server and a real
cluster: the same answers and the same state as one call per request, and one request's
error fails only that request. The coalescer's side (one call per batch, each caller its own
reply) is checked on every transport, the embedded fakeredis included."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import Any

import fakeredis
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from ratekeeper.pipeline import Coalescer
from ratekeeper.scripts import LuaScript, Scripts, check_args, check_replies, read_script

from redis_servers import RedisServer

# Rules as check.lua's ARGV: algorithm, shadow, penalty_ms, nw, then (limit, window_ms) pairs.
RULES: dict[str, list[str | int]] = {
    "counter": ["c", "0", 0, 2, 3, 10_000, 5, 60_000],
    "boxed-log": ["l", "0", 4_000, 2, 2, 5_000, 3, 30_000],
    "shadow-log": ["l", "1", 0, 1, 1, 10_000],
    "shadow-boxed-counter": ["c", "1", 3_000, 1, 2, 10_000],
    "log": ["l", "0", 0, 1, 4, 20_000],
    "unknown": ["x", "0", 0, 0],  # an algorithm check.lua does not know
}
# An action's rules, in order.
ACTIONS = {
    "a": ["counter"],
    "b": ["boxed-log", "shadow-log"],
    "c": ["counter", "boxed-log", "shadow-boxed-counter"],
    "d": ["log", "counter"],
}
BROKEN = {"x": ["unknown"]}  # an action whose rule set check.lua rejects
SUBJECTS = ["s0", "s1", "s2", "s3"]
BANNED = "s3"
START_MS = 1_700_000_000_000


class Request:
    """One request: its action, its subject, a second subject it is banned by, its cost."""

    def __init__(self, action: str, subject: str, other: str | None, cost: int) -> None:
        self.action, self.subject, self.other, self.cost = action, subject, other, cost

    @property
    def rules(self) -> list[str]:
        return ACTIONS.get(self.action) or BROKEN[self.action]

    def rule_args(self) -> list[str | int]:
        return [arg for rule in self.rules for arg in RULES[rule]]

    def keys(self, prefix: str) -> list[str]:
        """Ban keys, then each rule's state key and penalty key, all in one slot."""
        bans = [self.subject] + ([self.other] if self.other else [])
        keys = [f"{prefix}:{{{prefix}}}:{subject}:ban" for subject in bans]
        for rule in self.rules:
            keys.append(f"{prefix}:{{{prefix}}}:{self.subject}:{rule}")
            if int(RULES[rule][2]) > 0:
                keys.append(f"{prefix}:{{{prefix}}}:{self.subject}:{rule}:p")
        return keys


def many_args(now: int, requests: Sequence[Request], prefix: str
              ) -> tuple[list[str], list[str | int]]:
    """KEYS and ARGV of one check.lua call deciding ``requests``, each action's rules sent once."""
    numbers: dict[str, int] = {}
    set_args: list[str | int] = []
    keys: list[str] = []
    tail: list[str | int] = []
    for request in requests:
        if request.action not in numbers:
            numbers[request.action] = len(numbers) + 1
            rule_args = request.rule_args()
            set_args += [len(rule_args), *rule_args]
        request_keys = request.keys(prefix)
        keys += request_keys
        tail += [request.cost, len(request_keys), numbers[request.action]]
    return keys, [now, len(requests), len(numbers), *set_args, *tail]


def raw_check(client: Any) -> LuaScript:
    """check.lua as a plain script: a call's whole answer, one entry per request."""
    return LuaScript(client, "check", read_script("check"))


async def ban(client: Any, prefix: str) -> None:
    await client.set(f"{prefix}:{{{prefix}}}:{BANNED}:ban", b"1", px=600_000)


async def state(client: Any, prefix: str) -> dict[str, Any]:
    """Every key of ``prefix`` (prefix removed): its value, and whether it has a TTL."""
    found: dict[str, Any] = {}
    async for key in client.scan_iter(match=f"{prefix}:*"):
        name = key.decode() if isinstance(key, bytes) else key
        kind = (await client.type(name)).decode()
        value = (await client.lrange(name, 0, -1) if kind == "list"
                 else await client.get(name))
        found[name.replace(prefix, "P")] = (kind, value, await client.pttl(name) > 0)
    return found


def random_requests(rng: random.Random, count: int) -> list[Request]:
    return [Request(rng.choice("abcd"), rng.choice(SUBJECTS),
                    rng.choice([None, None, None, BANNED, "s1"]), rng.choice([1, 1, 1, 2, 0]))
            for _ in range(count)]


def same(got: Sequence[Any], expected: Sequence[Any]) -> bool:
    """Replies equal, but for wait_ms of a ban or a box: a PTTL, which runs on Redis's own
    clock while the calls compared were made a moment apart."""
    if len(got) != len(expected):
        return False
    for have, want in zip(got, expected, strict=True):
        if isinstance(want, list) and want[0] in (2, 3) and isinstance(have, list):
            if have[:4] != want[:4] or abs(have[4] - want[4]) > 2_000 or len(have) != 5:
                return False
        elif have != want:
            return False
    return True


async def one_by_one(client: Any, prefix: str, chunks: Sequence[tuple[int, list[Request]]]
                     ) -> list[Any]:
    """Each request as its own call (CheckScript: one request, its flat reply)."""
    script = Scripts.register(client).check
    replies = []
    for now, requests in chunks:
        for request in requests:
            keys = request.keys(prefix)
            replies.append(await script(keys=keys, args=check_args(
                now, request.cost, len(keys), request.rule_args())))
    return replies


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_a_call_of_many_requests_answers_as_one_call_each(
        store: Any, key_prefix: str, seed: int) -> None:
    """Random mixes of log and counter rules, bans, penalty boxes, shadow rules, costs 0 to
    2 and repeated subjects, decided in calls of 1 to 40 requests, answer exactly as one
    call per request in the same order, and leave the same keys behind."""
    rng = random.Random(seed)
    chunks: list[tuple[int, list[Request]]] = []
    now = START_MS
    for _ in range(25):
        now += rng.choice([0, 1, 700, 3_000, 9_000, 40_000])
        chunks.append((now, random_requests(rng, rng.randint(1, 40))))
    one, many = f"{key_prefix}a", f"{key_prefix}b"
    await ban(store, one)
    await ban(store, many)
    expected = await one_by_one(store, one, chunks)

    script = raw_check(store)
    got: list[Any] = []
    for now, requests in chunks:
        keys, args = many_args(now, requests, many)
        got += check_replies(await script(keys=keys, args=args))
    assert same(got, expected)
    statuses = {reply[0] for reply in got}
    assert statuses == {0, 1, 2, 3}, "the mix should allow, limit, ban and box"
    assert await state(store, many) == await state(store, one)


async def test_a_later_request_sees_what_an_earlier_one_took(redis: aioredis.Redis,
                                                             key_prefix: str) -> None:
    """Four hits of one subject in one call count down 2, 1, 0, then denied, exactly as
    four calls would."""
    requests = [Request("a", "s0", None, 1) for _ in range(4)]
    keys, args = many_args(START_MS, requests, key_prefix)
    replies = check_replies(await raw_check(redis)(keys=keys, args=args))
    assert [reply[0] for reply in replies] == [1, 1, 1, 0]
    assert [reply[5] for reply in replies] == [2, 1, 0, 0]


async def test_one_requests_error_fails_only_that_request(redis: aioredis.Redis,
                                                          key_prefix: str) -> None:
    """A request whose log key holds a string (WRONGTYPE) and a request whose rule set is
    malformed are answered with their own errors; the requests around them are decided and
    take their hits."""
    wrong = Request("d", "s1", None, 1)  # its log key is made a string below
    await redis.set(wrong.keys(key_prefix)[1], b"not a list")
    requests = [Request("a", "s0", None, 1), wrong, Request("x", "s2", None, 1),
                Request("a", "s0", None, 1)]
    keys, args = many_args(START_MS, requests, key_prefix)
    first, error, malformed, second = check_replies(
        await raw_check(redis)(keys=keys, args=args))
    assert isinstance(error, ResponseError) and "WRONGTYPE" in str(error)
    assert isinstance(malformed, ResponseError) and "unknown algorithm" in str(malformed)
    assert (first[0], first[5]) == (1, 2)
    assert (second[0], second[5]) == (1, 1)
    assert await redis.get(wrong.keys(key_prefix)[1]) == b"not a list"


async def test_counts_that_do_not_add_up_fail_the_call_before_any_write(
        redis: aioredis.Redis, key_prefix: str) -> None:
    """A call whose nk do not add up to its KEYS is refused whole, and writes nothing."""
    keys, args = many_args(START_MS, [Request("a", "s0", None, 1)] * 3, key_prefix)
    with pytest.raises(ResponseError, match="do not add up"):
        await raw_check(redis)(keys=keys[:-1], args=args)
    assert [key async for key in redis.scan_iter(match=f"{key_prefix}:*")] == []


class PipelinedRedis(aioredis.Redis):
    """Not exactly redis.asyncio.Redis, so the Coalescer takes redis-py's pipeline."""


@pytest.mark.parametrize("transport", ["direct", "redis-py pipeline", "fakeredis"])
async def test_the_coalescer_answers_every_caller_as_one_call_each(
        redis_server: RedisServer, key_prefix: str, transport: str) -> None:
    """One tick of 80 random calls goes as one check.lua call; each caller gets the reply
    its request gets when sent alone, in order, and the caller whose key has the wrong type
    gets its own ResponseError."""
    client: Any
    if transport == "fakeredis":
        client = fakeredis.FakeAsyncRedis()
    else:
        kind = aioredis.Redis if transport == "direct" else PipelinedRedis
        client = kind.from_url(redis_server.url)
    try:
        rng = random.Random(7)
        requests = random_requests(rng, 80)
        one, many = f"{key_prefix}a", f"{key_prefix}b"
        for prefix in (one, many):
            await ban(client, prefix)
            await client.set(f"{prefix}:{{{prefix}}}:s2:log", b"not a list")
        expected: list[Any] = []
        for request in requests:
            try:
                expected += await one_by_one(client, one, [(START_MS, [request])])
            except ResponseError as exc:
                expected.append(exc)

        coalescer = Coalescer(client, Scripts.register(client).check)
        futures = []
        for request in requests:
            keys = request.keys(many)
            futures.append(coalescer.queue(keys, check_args(START_MS, request.cost, len(keys),
                                                            request.rule_args())))
        got = await asyncio.gather(*futures, return_exceptions=True)
        assert (coalescer.batches, coalescer.script_calls, coalescer.calls) == (1, 1, 80)
        errors = [i for i, reply in enumerate(expected) if isinstance(reply, BaseException)]
        assert errors, "one of the requests should hit the wrongly typed key"
        for i, (want, have) in enumerate(zip(expected, got, strict=True)):
            if i in errors:
                assert isinstance(have, ResponseError) and "WRONGTYPE" in str(have)
            else:
                assert same([have], [want]), f"caller {i}"
        assert await state(client, many) == await state(client, one)
    finally:
        await client.aclose()


async def test_calls_with_another_clock_go_as_another_call_in_order(
        redis: aioredis.Redis, key_prefix: str) -> None:
    """Calls of one tick with test clocks t, t, t + 1 s, t go as three check.lua calls, in
    the order they were queued."""
    coalescer = Coalescer(redis, Scripts.register(redis).check)
    request = Request("a", "s0", None, 1)
    keys = request.keys(key_prefix)
    clocks = [START_MS, START_MS, START_MS + 1000, START_MS]
    futures = [coalescer.queue(keys, check_args(at, 1, len(keys), request.rule_args()))
               for at in clocks]
    replies = await asyncio.gather(*futures)
    assert coalescer.script_calls == 3
    assert [(reply[1], reply[5]) for reply in replies] == list(zip(clocks, [2, 1, 0, 0],
                                                                   strict=True))


async def test_a_call_of_several_requests_is_refused_by_the_coalescer(
        redis: aioredis.Redis, key_prefix: str) -> None:
    """The coalescer takes one request per call: a call of two fails alone."""
    coalescer = Coalescer(redis, Scripts.register(redis).check)
    request = Request("a", "s0", None, 1)
    keys, args = many_args(START_MS, [request, request], key_prefix)
    single = request.keys(key_prefix)
    bad = coalescer.queue(keys, args)
    good = coalescer.queue(single, check_args(START_MS, 1, len(single), request.rule_args()))
    error, reply = await asyncio.gather(bad, good, return_exceptions=True)
    assert isinstance(error, ValueError)
    assert reply[5] == 2


async def test_one_bad_request_in_a_batch_does_not_open_the_circuit(
        redis: aioredis.Redis, key_prefix: str) -> None:
    """A batch whose one request fails (WRONGTYPE) and the rest succeed counts as _call
    counts: the answered requests are successes, so the breaker stays closed."""
    from ratekeeper.errors import StoreUnavailable
    from ratekeeper.limiter import Limiter, Outcome
    from ratekeeper.pipeline import coalesced

    rule = ["l", "0", 0, 1, 1000, 60000]
    await redis.set(f"{key_prefix}:bad:s", "not a list")
    limiter = Limiter(redis, timeout=2.0)
    limiter.scripts = coalesced(limiter.scripts, redis, limiter.timeout)

    def call(name: str) -> Any:
        return ([f"{key_prefix}:{name}:b", f"{key_prefix}:{name}:s"], 1, 1, 1, rule)

    for round_ in range(8):
        answers = await limiter.check_many([call("bad")] + [call(f"ok{round_}-{j}")
                                                            for j in range(10)])
        assert isinstance(answers[0], StoreUnavailable)
        assert all(isinstance(a, Outcome) for a in answers[1:])
    assert limiter.breaker.state == "closed"


def test_a_coalescer_moved_to_another_loop_keeps_its_deadlines(
        redis_server: RedisServer, key_prefix: str) -> None:
    """A call queued in an event loop's last iteration leaves no state that a later loop
    inherits: a check on the next loop is answered (or times out) within its deadline."""
    from ratekeeper.limiter import Limiter
    from ratekeeper.pipeline import coalesced

    rule = ["l", "0", 0, 1, 1000, 60000]
    client = aioredis.Redis.from_url(redis_server.url)
    limiter = Limiter(client, timeout=0.3)
    limiter.scripts = coalesced(limiter.scripts, client, limiter.timeout)
    coalescer = limiter.scripts.check
    assert isinstance(coalescer, Coalescer)
    first = asyncio.new_event_loop()
    first.call_soon(coalescer.queue, [f"{key_prefix}:a:b", f"{key_prefix}:a:s"],
                    check_args("", 1, 2, rule))
    first.call_soon(first.stop)
    first.run_forever()
    first.close()

    async def on_the_next_loop() -> Any:
        fresh = aioredis.Redis.from_url(redis_server.url)
        coalescer.redis = limiter.redis = fresh
        try:
            return await asyncio.wait_for(
                limiter.check([f"{key_prefix}:b:b", f"{key_prefix}:b:s"], 1, 1, 1, rule), 2)
        finally:
            await fresh.aclose()

    outcome = asyncio.run(on_the_next_loop())
    assert outcome.status == 1


async def test_readonly_is_the_calls_error_so_clients_find_the_new_master(
        redis_server: RedisServer, key_prefix: str) -> None:
    """On a replica a request's write fails READONLY: that is the whole call's error, with
    redis-py's ReadOnlyError (which makes a Sentinel client look for the master again)."""
    from redis.exceptions import ReadOnlyError

    from redis_servers import start_redis

    replica = start_redis()
    client = aioredis.Redis.from_url(replica.url)
    try:
        await client.replicaof("127.0.0.1", redis_server.port)
        script = raw_check(client)
        with pytest.raises(ReadOnlyError):
            await script(keys=[f"{key_prefix}:r:b", f"{key_prefix}:r:s"],
                         args=check_args("", 1, 2, ["c", "0", 0, 1, 10, 60000]))
    finally:
        await client.aclose()
        replica.stop()
