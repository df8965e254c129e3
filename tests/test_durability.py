"""Durability: with AOF on (appendonly yes, appendfsync always) the counters survive a Redis
crash and restart, and the sidecar goes on counting from them without an error."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ratekeeper.decision.checker import Checker
from ratekeeper.decision.flags import FlagBoard
from ratekeeper.identity.keys import Keyspace
from ratekeeper.settings import Settings
from ratekeeper.storage.limiter import Limiter
from ratekeeper.storage.store import open_store

from support.common import SALT, FakeClock, config_from, opened
from support.redis_servers import start_redis

# every limiter and coalescer a test opens is closed when it ends
pytestmark = pytest.mark.usefixtures("closes_opened")

RULES = """
[rules.log]
limit = "5 per hour"
key = ["ip"]
[rules.counter]
limit = "5 per hour"
key = ["user"]
algorithm = "sliding-counter"
[actions.a]
rules = ["log", "counter"]
"""


async def ask(checker: Checker, **fields: Any) -> Any:
    return await checker.check(checker.decode(json.dumps(fields).encode()))


async def test_counters_survive_a_crash_with_aof(key_prefix: str, clock: FakeClock) -> None:
    """3 hits, SIGKILL, restart from the AOF: the next check sees 1 left in both rules."""
    server = start_redis(extra=("--appendonly", "yes", "--appendfsync", "always"))
    store = open_store(Settings(redis_url=server.url, ip_salt=SALT, redis_timeout_ms=2000))
    try:
        config = config_from(RULES)
        checker = Checker(config, Keyspace(SALT, prefix=key_prefix),
                          opened(Limiter(store.redis, timeout=2.0, clock=clock)),
                          FlagBoard(config.flags))
        for expected in (4, 3, 2):
            decision = await ask(checker, action="a", ip="192.0.2.1", user="alice")
            assert [lim.remaining for lim in decision.limits] == [expected, expected]
        server.kill()  # a crash: nothing is flushed on the way out
        server.restart()
        decision = await ask(checker, action="a", ip="192.0.2.1", user="alice")
        assert not decision.degraded
        assert [lim.remaining for lim in decision.limits] == [1, 1]
    finally:
        await store.close()
        server.stop()
