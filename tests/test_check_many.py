"""Many requests decided together, against a real redis-server and a real cluster: check.lua
deciding many requests in one call, the coalescer (``Coalescer.submit``) sending many callers'
checks in one write, the limiter (``Limiter.decide``) and the checker
(``Checker.check_batch``) deciding many checks at once. Each gives the answers and leaves the
state that one call per request would, and one request's error fails only that request."""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Sequence
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from redis.asyncio import BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ReadOnlyError, ResponseError

from ratekeeper.api.wire import Decision
from ratekeeper.decision.checker import Checker
from ratekeeper.decision.flags import FlagBoard
from ratekeeper.errors import StoreUnavailable
from ratekeeper.identity.keys import Keyspace
from ratekeeper.metrics import Metrics
from ratekeeper.settings import Settings
from ratekeeper.storage.coalescer import Coalescer
from ratekeeper.storage.coalescer import Request as Check
from ratekeeper.storage.limiter import CheckCall, Limiter, parse_outcome
from ratekeeper.storage.pipe import locate_for
from ratekeeper.storage.scripts import LuaScript, Scripts, check_args, check_replies, read_script
from ratekeeper.storage.store import Store, open_store

from support.common import SALT, FakeClock, config_from, opened, sample
from support.redis_servers import RedisServer, running_redis

# every limiter and coalescer a test opens is closed when it ends
pytestmark = pytest.mark.usefixtures("closes_opened")

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
    """Each request as its own call: its flat reply, or its ResponseError."""
    script = Scripts.register(client).check
    replies = []
    for now, requests in chunks:
        for request in requests:
            keys = request.keys(prefix)
            raw = await script(keys=keys, args=check_args(now, request.cost, len(keys),
                                                         request.rule_args()))
            replies += check_replies(raw)
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


def evalsha_calls(server: RedisServer) -> int:
    """EVALSHA calls Redis has run since it started (INFO commandstats)."""
    stats = server.cli("INFO", "commandstats")
    found = re.search(r"cmdstat_evalsha:calls=(\d+)", stats)
    return int(found[1]) if found else 0


def as_check(request: Request, prefix: str, now: int = START_MS) -> Check:
    """``request`` as the coalescer takes it."""
    return request.keys(prefix), now, request.cost, tuple(request.rule_args())


@pytest.mark.parametrize("transport", ["redis", "fakeredis"])
async def test_the_coalescer_answers_every_caller_as_one_call_each(
        request: pytest.FixtureRequest, key_prefix: str, transport: str) -> None:
    """80 random checks submitted by 80 callers in one tick go as one write of one
    check.lua call (counted by Redis); each caller gets the reply its request gets when sent
    alone, in order, and the caller whose key has the wrong type gets its own
    ResponseError."""
    client: Any
    server: RedisServer | None = None
    store: Store | None = None
    if transport == "fakeredis":  # (the embedded store, as memory:// opens it)
        store = open_store(Settings(redis_url="memory://", ip_salt=SALT))
        client = store.redis
    else:
        server = request.getfixturevalue("lone_redis")
        client = aioredis.Redis(port=server.port)
    try:
        rng = random.Random(7)
        requests = random_requests(rng, 80)
        one, many = f"{key_prefix}a", f"{key_prefix}b"
        for prefix in (one, many):
            await ban(client, prefix)
            await client.set(f"{prefix}:{{{prefix}}}:s2:log", b"not a list")
        expected = await one_by_one(client, one, [(START_MS, requests)])

        locate = locate_for(client) if store is None or store.checks is None else store.checks
        coalescer = opened(Coalescer(locate, Scripts.register(client).check, timeout=2.0))
        before = evalsha_calls(server) if server is not None else 0
        futures = [future for r in requests
                   for future in coalescer.submit([as_check(r, many)])]
        got = await asyncio.gather(*futures, return_exceptions=True)
        assert (coalescer.batches, coalescer.checks) == (1, 80)
        if server is not None:
            assert evalsha_calls(server) - before == 1
        errors = [i for i, reply in enumerate(expected) if isinstance(reply, BaseException)]
        assert errors, "one of the requests should hit the wrongly typed key"
        for i, (want, have) in enumerate(zip(expected, got, strict=True)):
            if i in errors:
                assert isinstance(have, ResponseError) and "WRONGTYPE" in str(have)
            else:
                assert same([have], [want]), f"caller {i}"
        assert await state(client, many) == await state(client, one)
    finally:
        if store is not None:
            await store.close()
        else:
            await client.aclose()


async def test_calls_with_another_clock_go_as_another_call_in_order(
        lone_redis: RedisServer, key_prefix: str) -> None:
    """Checks of one tick with test clocks t, t, t + 1 s, t go in one write as three
    check.lua calls (counted by Redis), run in the order they were submitted."""
    client = aioredis.Redis(port=lone_redis.port)
    try:
        coalescer = opened(Coalescer(locate_for(client), Scripts.register(client).check,
                                      timeout=2.0))
        await client.script_load(coalescer.script.script)
        before = evalsha_calls(lone_redis)
        request = Request("a", "s0", None, 1)
        clocks = [START_MS, START_MS, START_MS + 1000, START_MS]
        futures = [future for at in clocks
                   for future in coalescer.submit([as_check(request, key_prefix, at)])]
        replies = await asyncio.gather(*futures)
        assert evalsha_calls(lone_redis) - before == 3
        assert coalescer.batches == 1
        assert [(reply[1], reply[5]) for reply in replies] == list(zip(clocks, [2, 1, 0, 0],
                                                                       strict=True))
    finally:
        await client.aclose()


def remaining(answer: Any) -> int:
    """The first window's hits left in a decided check's reply."""
    assert not isinstance(answer, StoreUnavailable), answer
    return parse_outcome(answer).windows[0].remaining


LOG_RULE: tuple[str | int, ...] = ("l", "0", 0, 1, 1000, 60_000)


def log_call(prefix: str, name: str) -> CheckCall:
    """A check of one sliding-log rule with one ban key, as the checker sends it."""
    return [f"{prefix}:{name}:b", f"{prefix}:{name}:s"], 1, 1, 1, LOG_RULE


async def test_one_bad_request_in_a_batch_does_not_open_the_circuit(
        redis: aioredis.Redis, key_prefix: str) -> None:
    """Calls of which one fails (WRONGTYPE) and the rest are decided, eight times over:
    the failed one is its own StoreUnavailable, the others are Redis's answers, and Redis
    having answered every write, the breaker stays closed."""
    await redis.set(f"{key_prefix}:bad:s", "not a list")
    limiter = opened(Limiter(redis, timeout=2.0))
    assert limiter.coalescer is not None
    for round_ in range(8):
        answers = await limiter.decide([log_call(key_prefix, "bad")] + [
            log_call(key_prefix, f"ok{round_}-{j}") for j in range(10)])
        assert isinstance(answers[0], StoreUnavailable)
        assert [remaining(answer) for answer in answers[1:]] == [999] * 10
    assert limiter.breaker.state == "closed"


def test_a_coalescer_used_from_a_new_event_loop_answers_there(
        redis_server: RedisServer, key_prefix: str) -> None:
    """A check submitted in an event loop's last iteration never leaves (the loop stopped
    before the write); on the next loop the coalescer starts afresh: a check there is
    answered, and the one left behind took nothing."""
    client = aioredis.Redis(port=redis_server.port)
    coalescer = Coalescer(locate_for(client), Scripts.register(client).check, timeout=0.3)
    check = as_check(Request("a", "s0", None, 1), key_prefix)
    first = asyncio.new_event_loop()
    first.call_soon(coalescer.submit, [check])
    first.call_soon(first.stop)
    first.run_forever()
    first.close()

    async def on_the_next_loop() -> Any:
        try:
            return await asyncio.wait_for(coalescer.submit([check])[0], 2)
        finally:
            await coalescer.close()
            await client.aclose()

    reply = asyncio.run(on_the_next_loop())
    assert (reply[0], reply[5]) == (1, 2)  # the first of the counter's 3 a minute


class MasterPool(BlockingConnectionPool):
    """A pool that says it is a Sentinel's master pool (``SentinelConnectionPool``'s flag)."""

    is_master = True


async def test_readonly_is_the_calls_error_so_clients_find_the_new_master(
        key_prefix: str) -> None:
    """On a replica check.lua's write fails READONLY as the whole call's ReadOnlyError.
    Through a Sentinel's master pool the limiter takes it for a demoted master: every check
    of the write is unavailable, counted as a ConnectionError (the connection is dropped, so
    the next one asks for the master again); once the server is a master, checks are
    decided."""
    rule: list[str | int] = ["c", "0", 0, 1, 10, 60_000]
    keys = [f"{key_prefix}:r:b", f"{key_prefix}:r:s"]
    with running_redis() as master, running_redis(
            extra=("--replicaof", "127.0.0.1", str(master.port))) as replica:
        pool = MasterPool.from_url(replica.url, max_connections=4, timeout=1.0,
                                   retry=Retry(NoBackoff(), 0))
        client = aioredis.Redis.from_pool(pool)
        try:
            with pytest.raises(ReadOnlyError):
                await raw_check(client)(keys=keys, args=check_args("", 1, 2, rule))
            metrics = Metrics()
            limiter = opened(Limiter(client, timeout=2.0, metrics=metrics))
            calls: list[CheckCall] = [(keys, 1, 1, 1, rule)] * 3
            answers = await limiter.decide(calls)
            assert all(isinstance(answer, StoreUnavailable) for answer in answers)
            text = metrics.exposition()[0].decode()
            assert sample(text, "ratekeeper_redis_errors_total", op="check",
                          error="ConnectionError") == 1
            await client.replicaof("NO", "ONE")
            assert [remaining(a) for a in await limiter.decide(calls)] == [9, 8, 7]
        finally:
            await client.aclose()


CHECKER_CONFIG = """
[rules.ip-log]
limit = "3 per minute"
key = ["ip"]
algorithm = "sliding-log"
[rules.user-counter]
limit = "4 per minute; 6 per hour"
key = ["user"]
algorithm = "sliding-counter"
[rules.boxed]
limit = "2 per minute"
key = ["ip"]
penalty = "1 hour"
[rules.pair]
limit = "2 per minute"
key = ["ip", "user"]
[actions.login]
rules = ["ip-log", "user-counter"]
[actions.upload]
rules = ["pair", "boxed"]
[actions.look]
rules = ["ip-log"]
"""


def checker_on(client: Any, prefix: str, clock: FakeClock) -> Checker:
    config = config_from(CHECKER_CONFIG)
    limiter = opened(Limiter(client, timeout=2.0, clock=clock))
    return Checker(config, Keyspace(SALT, prefix=prefix, grouping=config.ip), limiter,
                   FlagBoard(config.flags))


def shown(decision: Decision) -> dict[str, Any]:
    """A decision as the API shows it, its refund token only said to be there; the wait of
    a ban or a penalty box to the second, since its milliseconds are what is left of a
    Redis key's life at the moment it was read, in Redis's own time."""
    body: dict[str, Any] = msgspec.to_builtins(decision)
    if body.get("refund"):
        body["refund"] = "<token>"
    if body["reason"] == "banned":  # (a ban, or a penalty box)
        body["retry_after_ms"] = "<the key's time to live>"
    return body


@pytest.mark.parametrize("seed", [1, 2])
async def test_a_checkers_batch_answers_as_its_checks_one_by_one(
        store: Any, key_prefix: str, clock: FakeClock, seed: int) -> None:
    """Random checks of actions with log and counter rules, a penalty box and a two-field
    rule, repeated subjects and costs 0 to 2, decided by ``check_batch`` in batches of 1
    to 30: each decision is the one ``check`` gives when the same checks are asked one at
    a time, and no decision is degraded."""
    rng = random.Random(seed)
    one = checker_on(store, f"{key_prefix}a", clock)
    many = checker_on(store, f"{key_prefix}b", clock)
    for _ in range(6):
        requests = [one.decode(msgspec.json.encode({
            "action": rng.choice(["login", "upload", "look"]),
            "ip": rng.choice(["192.0.2.1", "192.0.2.2", "2001:db8::1"]),
            "user": rng.choice(["ann", "bob"]), "cost": rng.choice([0, 1, 1, 2])}))
            for _ in range(rng.randint(1, 30))]
        singles = [await one.check(request) for request in requests]
        batch = await many.check_batch(requests)
        assert [shown(d) for d in batch] == [shown(d) for d in singles]
        assert not any(d.degraded for d in batch)
        clock.advance(rng.choice([0, 5, 30]))


async def test_checks_of_one_subject_in_a_batch_are_decided_in_order(
        store: Any, key_prefix: str, clock: FakeClock) -> None:
    """A batch of costs 2, 1, 1 against 3 a minute: the first two are allowed (1, then 0
    left) and the third is denied, as when asked one after another."""
    checker = checker_on(store, key_prefix, clock)
    requests = [checker.decode(msgspec.json.encode({"action": "look", "ip": "192.0.2.1",
                                                    "cost": cost})) for cost in (2, 1, 1)]
    decisions = await checker.check_batch(requests)
    assert [(d.allowed, d.limits[0].remaining) for d in decisions] == [
        (True, 1), (True, 0), (False, 0)]


async def test_a_reply_not_of_the_actions_shape_is_refused(store: Any, key_prefix: str,
                                                           clock: FakeClock) -> None:
    """A reply with a window too few or too many, or a status check.lua never gives, is a
    ValueError (answered as a server error), never a decision."""
    checker = checker_on(store, key_prefix, clock)
    plan = checker.plans["login"]  # three windows: the log's minute, the counter's two
    good = [1, 0, 0, 0, 0, 2, 1500, 0, 3, 1500, 0, 5, 1500, 0]
    decision = checker.decision(plan, good)
    assert decision.allowed and [item.remaining for item in decision.limits] == [2, 3, 5]
    assert [item.reset for item in decision.limits] == [2, 2, 2]
    for bad in (good[:-3], [*good, 1, 1, 0], [7, *good[1:]]):
        with pytest.raises(ValueError, match=r"check\.lua answered"):
            checker.decision(plan, bad)
