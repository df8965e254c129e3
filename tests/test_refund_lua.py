"""refund.lua against a real redis-server and a real cluster: gives back exactly what check.lua
took. Every test runs once per topology in conftest.STORES."""

from __future__ import annotations

from typing import Any

import pytest

from ratekeeper.errors import StoreUnavailable
from ratekeeper.identity.keys import Keyspace
from ratekeeper.storage.limiter import Limiter, Outcome, Status, parse_outcome

from support.common import SALT, FakeClock, config_from, opened

# every limiter and coalescer a test opens is closed when it ends
pytestmark = pytest.mark.usefixtures("closes_opened")

RULES = """
[rules.r]
limit = "3 per minute, 5 per hour"
key = ["ip"]
algorithm = "{algorithm}"
[actions.a]
rules = ["r"]
"""


async def _check(limiter: Limiter, keys: list[str], cost: int, rule_args: Any) -> Outcome:
    """One check of one rule and no ban key, as the checker would send it."""
    [reply] = await limiter.decide([(keys, cost, 0, 1, rule_args)])
    assert not isinstance(reply, StoreUnavailable)
    return parse_outcome(reply)


@pytest.mark.parametrize("algorithm", ["sliding-log", "sliding-counter"])
async def test_refund_gives_back_only_what_was_taken(store: Any, key_prefix: str,
                                                     clock: FakeClock, algorithm: str) -> None:
    """A refund restores remaining; refunding at a time nothing was taken gives back nothing."""
    from ratekeeper.decision.checker import _plan

    config = config_from(RULES.format(algorithm=algorithm))
    keyspace = Keyspace(SALT, prefix=key_prefix)
    plan = _plan(config.actions["a"], keyspace)
    rule = config.rules["r"]
    key = keyspace.counter_key(keyspace.subject([("ip", keyspace.ip_value("192.0.2.1"))]), rule)
    limiter = opened(Limiter(store, timeout=2.0, clock=clock))

    taken = await _check(limiter, [key], 2, plan.rule_args)
    assert taken.status is Status.ALLOWED and taken.windows[0].remaining == 1
    clock.advance(1)
    kept = await _check(limiter, [key], 1, plan.rule_args)
    assert kept.windows[0].remaining == 0
    # nothing was taken two hours earlier: nothing to give back (the counter only knows
    # buckets, the log knows the exact millisecond)
    assert await limiter.refund([key], 1, taken.now_ms - 7_200_000, plan.refund_args) == [0]
    assert await limiter.refund([key], 2, taken.now_ms, plan.refund_args) == [2]
    peek = await _check(limiter, [key], 0, plan.rule_args)
    assert [w.remaining for w in peek.windows] == [2, 4]
    assert 0 < await store.pttl(key) <= 3_600_000 + 1000
