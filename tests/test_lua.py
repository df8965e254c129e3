"""check.lua against a real redis-server and a real cluster: windows, all-or-nothing, TTLs,
NOSCRIPT recovery. Every test runs once per topology in conftest.STORES."""

from __future__ import annotations

import random
from typing import Any

import limits.storage.memory
import pytest
from limits import RateLimitItemPerSecond
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from ratekeeper.decision.checker import Checker
from ratekeeper.decision.flags import FlagBoard
from ratekeeper.identity.keys import Keyspace
from ratekeeper.storage.limiter import Limiter

from support.common import ONE_RULE, SALT, FakeClock, config_from, opened

# every limiter and coalescer a test opens is closed when it ends
pytestmark = pytest.mark.usefixtures("closes_opened")

SLACK_MS = 1000


def checker_for(text: str, redis: Any, prefix: str,
                clock: FakeClock | None = None) -> Checker:
    config = config_from(text)
    limiter = opened(Limiter(redis, timeout=2.0, clock=clock))
    return Checker(config, Keyspace(SALT, prefix=prefix, grouping=config.ip), limiter,
                   FlagBoard(config.flags))


async def ask(checker: Checker, **fields: Any) -> Any:
    return await checker.check(checker.decoder.decode(_json(fields)))


def _json(fields: dict[str, Any]) -> bytes:
    import json

    return json.dumps(fields).encode()


@pytest.mark.parametrize("algorithm", ["sliding-log", "sliding-counter"])
async def test_walk_then_deny_then_recover(store: Any, key_prefix: str,
                                           clock: FakeClock, algorithm: str) -> None:
    """Five per minute: remaining 4..0, then denied with a retry, then allowed after it."""
    checker = checker_for(ONE_RULE.format(limit="5 per minute", algorithm=algorithm), store,
                          key_prefix, clock)
    seen = []
    for _ in range(5):
        decision = await ask(checker, action="a", ip="198.51.100.1")
        assert decision.allowed
        seen.append(decision.limits[0].remaining)
        clock.advance(1)
    assert seen == [4, 3, 2, 1, 0]
    denied = await ask(checker, action="a", ip="198.51.100.1")
    assert not denied.allowed and denied.reason == "rate_limited"
    assert 0 < denied.retry_after <= 120
    # reset is when remaining next goes up, so for a denied single hit it equals the retry
    assert denied.limits[0].reset == denied.retry_after
    clock.advance(denied.retry_after)
    assert (await ask(checker, action="a", ip="198.51.100.1")).allowed


async def test_sliding_log_retry_after_is_exact(store: Any, key_prefix: str,
                                                clock: FakeClock) -> None:
    """The log's retry_after is when the oldest hit leaves; one ms earlier is still denied."""
    checker = checker_for(ONE_RULE.format(limit="2 per 10 seconds", algorithm="sliding-log"),
                          store, key_prefix, clock)
    await ask(checker, action="a", ip="192.0.2.1")
    clock.advance(3)
    await ask(checker, action="a", ip="192.0.2.1")
    denied = await ask(checker, action="a", ip="192.0.2.1")
    assert denied.retry_after == 7
    clock.advance(6.999)
    assert not (await ask(checker, action="a", ip="192.0.2.1")).allowed
    clock.advance(0.001)
    assert (await ask(checker, action="a", ip="192.0.2.1")).allowed


@pytest.mark.parametrize("algorithm", ["sliding-log", "sliding-counter"])
async def test_peek_consumes_nothing(store: Any, key_prefix: str, clock: FakeClock,
                                     algorithm: str) -> None:
    """cost 0 reports whether one more hit would pass, and takes nothing."""
    checker = checker_for(ONE_RULE.format(limit="2 per minute", algorithm=algorithm), store,
                          key_prefix, clock)
    for _ in range(5):
        peek = await ask(checker, action="a", ip="192.0.2.9", cost=0)
        assert peek.allowed and peek.limits[0].remaining == 2
    await ask(checker, action="a", ip="192.0.2.9", cost=2)
    peek = await ask(checker, action="a", ip="192.0.2.9", cost=0)
    assert not peek.allowed and peek.limits[0].remaining == 0


@pytest.mark.parametrize("algorithm", ["sliding-log", "sliding-counter"])
async def test_multi_window_rule_needs_every_window(store: Any, key_prefix: str,
                                                    clock: FakeClock, algorithm: str) -> None:
    """'3 per 10 seconds, 5 per minute': the short window frees up, the long one still binds."""
    checker = checker_for(
        ONE_RULE.format(limit="3 per 10 seconds, 5 per minute", algorithm=algorithm),
        store, key_prefix, clock)
    for _ in range(3):
        assert (await ask(checker, action="a", ip="192.0.2.7")).allowed
    assert not (await ask(checker, action="a", ip="192.0.2.7")).allowed
    clock.advance(21)  # two buckets later, so even the counter has forgotten the short window
    results = [(await ask(checker, action="a", ip="192.0.2.7")).allowed for _ in range(3)]
    assert results == [True, True, False]
    denied = await ask(checker, action="a", ip="192.0.2.7")
    assert [lim.window for lim in denied.limits] == [10, 60]
    assert denied.limits[1].remaining == 0


ALL_OR_NOTHING = """
[rules.ip]
limit = "10 per minute"
key = ["ip"]
algorithm = "{algorithm}"
[rules.user]
limit = "2 per minute"
key = ["user"]
algorithm = "{algorithm}"
[actions.a]
rules = ["ip", "user"]
"""


@pytest.mark.parametrize("algorithm", ["sliding-log", "sliding-counter"])
async def test_denied_request_consumes_nothing(store: Any, key_prefix: str,
                                               clock: FakeClock, algorithm: str) -> None:
    """After the user rule denies, the IP rule's remaining has not moved."""
    checker = checker_for(ALL_OR_NOTHING.format(algorithm=algorithm), store, key_prefix, clock)
    for _ in range(2):
        assert (await ask(checker, action="a", ip="203.0.113.5", user="alice")).allowed
    before = await ask(checker, action="a", ip="203.0.113.5", user="bob", cost=0)
    assert before.limits[0].remaining == 8
    for _ in range(3):
        denied = await ask(checker, action="a", ip="203.0.113.5", user="alice")
        assert not denied.allowed and denied.limits[0].remaining == 8
    after = await ask(checker, action="a", ip="203.0.113.5", user="bob", cost=0)
    assert after.limits[0].remaining == 8


@pytest.mark.parametrize("algorithm", ["sliding-log", "sliding-counter"])
async def test_every_key_gets_a_ttl_of_its_window_plus_slack(
        store: Any, key_prefix: str, algorithm: str) -> None:
    """Every key the script writes has a TTL, no longer than the longest window + slack."""
    checker = checker_for(ONE_RULE.format(limit="5 per 30 seconds, 9 per 2 minutes",
                                          algorithm=algorithm), store, key_prefix)
    for i in range(20):
        await ask(checker, action="a", ip=f"192.0.2.{i}")
    keys = [k async for k in store.scan_iter(match=f"{key_prefix}:*")]
    assert len(keys) == 20
    for key in keys:
        ttl = await store.pttl(key)
        assert 0 < ttl <= 120_000 + SLACK_MS


async def test_script_flush_mid_traffic_recovers(store: Any, key_prefix: str,
                                                 clock: FakeClock) -> None:
    """A SCRIPT FLUSH between checks is recovered from without an error, counts intact."""
    checker = checker_for(ONE_RULE.format(limit="5 per minute", algorithm="sliding-log"),
                          store, key_prefix, clock)
    remaining = []
    for i in range(5):
        if i in (2, 4):
            await store.script_flush()
        decision = await ask(checker, action="a", ip="192.0.2.200")
        assert not decision.degraded
        remaining.append(decision.limits[0].remaining)
    assert remaining == [4, 3, 2, 1, 0]


async def test_script_flush_during_concurrent_traffic(store: Any, key_prefix: str) -> None:
    """Flushes racing 300 concurrent checks: no error, no degraded answer, exact counts."""
    import asyncio

    checker = checker_for(ONE_RULE.format(limit="10 per minute", algorithm="sliding-log"),
                          store, key_prefix)
    stop = asyncio.Event()

    async def flusher() -> int:
        flushes = 0
        while not stop.is_set():
            await store.script_flush()
            flushes += 1
            await asyncio.sleep(0)
        return flushes

    flushing = asyncio.create_task(flusher())
    decisions = await asyncio.gather(*(ask(checker, action="a", ip=f"192.0.2.{i % 30}")
                                       for i in range(300)))
    stop.set()
    assert await flushing > 0
    assert not any(d.degraded for d in decisions)
    assert sum(d.allowed for d in decisions) == 30 * 10


async def test_sliding_log_agrees_with_limits_moving_window(
        store: Any, key_prefix: str, clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On random hit sequences the log decides exactly as limits' MovingWindowRateLimiter."""

    class LimitsClock:
        @staticmethod
        def time() -> float:
            return clock.ms / 1000

    monkeypatch.setattr(limits.storage.memory, "time", LimitsClock)
    rng = random.Random(1234)
    # hit times step in multiples of 7 ms, so no two hits are exactly one window apart
    # (windows are whole seconds), where limits and we differ on inclusivity by design
    for trial, (amount, seconds) in enumerate([(5, 2), (10, 5), (3, 1), (20, 3), (1, 2)]):
        text = ONE_RULE.format(limit=f"{amount} per {seconds} seconds", algorithm="sliding-log")
        checker = checker_for(text, store, f"{key_prefix}{trial}", clock)
        oracle = MovingWindowRateLimiter(MemoryStorage())
        item = RateLimitItemPerSecond(amount, seconds)
        for step in range(400):
            clock.ms += 7 * rng.choice([0, 1, 3, 10, 40, 150])
            cost = rng.choice([1, 1, 1, 2, 0])
            expected = oracle.hit(item, "k", cost=cost) if cost else oracle.test(item, "k")
            got = (await ask(checker, action="a", ip="192.0.2.50", cost=cost)).allowed
            assert got == expected, f"trial {trial} step {step} cost {cost}"


async def test_sliding_counter_stays_within_its_bound(store: Any, key_prefix: str,
                                                      clock: FakeClock) -> None:
    """The counter admits at most L per aligned bucket and under 2L in any rolling window."""
    limit, window_ms = 20, 10_000
    checker = checker_for(ONE_RULE.format(limit=f"{limit} per 10 seconds",
                                          algorithm="sliding-counter"), store, key_prefix, clock)
    rng = random.Random(99)
    admitted: list[int] = []
    for _ in range(3000):
        clock.ms += rng.choice([1, 5, 20, 50, 200, 900])
        if (await ask(checker, action="a", ip="192.0.2.77")).allowed:
            admitted.append(clock.ms)
    assert len(admitted) > 0
    worst_rolling = 0
    start = 0
    for end, at in enumerate(admitted):
        while admitted[start] <= at - window_ms:
            start += 1
        worst_rolling = max(worst_rolling, end - start + 1)
    per_bucket: dict[int, int] = {}
    for at in admitted:
        per_bucket[at // window_ms] = per_bucket.get(at // window_ms, 0) + 1
    assert max(per_bucket.values()) <= limit
    assert worst_rolling < 2 * limit
    # over the long run it admits the configured rate, give or take one window's worth
    duration = admitted[-1] - admitted[0]
    assert len(admitted) <= limit * (duration / window_ms + 2)


@pytest.mark.parametrize("limit", ["5 per 300 seconds", "3 per 10 seconds, 20 per hour",
                                   "1 per minute", "50 per 5 seconds"])
async def test_sliding_counter_reset_never_exceeds_the_window(
        store: Any, key_prefix: str, clock: FakeClock, limit: str) -> None:
    """On random sequences of hits, looks and waits (some landing on a bucket's first ms),
    every window of a sliding-counter rule answers 0 <= reset <= its window, allowed or
    denied."""
    checker = checker_for(ONE_RULE.format(limit=limit, algorithm="sliding-counter"), store,
                          key_prefix, clock)
    windows_ms = [window.seconds * 1000 for window in checker.config.rules["r"].windows]
    rng = random.Random(limit)
    for step in range(400):
        if rng.random() < 0.1:  # to the start of a bucket: the counter's worst reset
            window_ms = rng.choice(windows_ms)
            clock.ms = (clock.ms // window_ms + 1) * window_ms
        else:
            clock.ms += rng.choice([0, 1, 7, 150, 999, *(w // d for w in windows_ms
                                                         for d in (40, 7, 2))])
        cost = rng.choice([0, 1, 1, 1, 2, 3])
        decision = await ask(checker, action="a", ip="192.0.2.88", cost=cost)
        for state in decision.limits:
            assert 0 <= state.reset <= state.window, (step, cost, decision)
