"""Faults at each step of the way to Redis, against a real redis-server behind a TCP proxy.

Each test drives the real app over HTTP. Before a fault, checks are decided by Redis; while
it lasts, every answer is a 200 (a fail-open rule allows, a fail-closed one that could not
ask Redis denies); once it is over, checks are decided by Redis again within a few breaker
cooldowns, and exactly: a fresh subject gets its limit admitted, no more, no less. A fault
that leaves the sidecar wedged (calls it never sends again) fails the last part. A call that
Redis ran and whose reply was lost is counted once: it is never sent again.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from ratekeeper.settings import Settings
from ratekeeper.storage.scripts import read_script

from support.common import SALT
from support.fault_proxy import FaultProxy
from support.redis_servers import RedisServer

LIMIT = 5
CONFIG = f"""
[rules.small]
limit = "{LIMIT} per minute"
key = ["ip"]
fail = "open"
[rules.strict]
limit = "{LIMIT} per minute"
key = ["ip"]
fail = "closed"
[rules.wide]
limit = "1000000 per minute"
key = ["ip"]
[actions.open]
rules = ["small"]
[actions.closed]
rules = ["strict"]
[actions.probe]
rules = ["wide"]
"""
# Short, so that a stalled call costs little, yet far above what CPU lag on a loaded test
# machine adds to a call Redis answers.
DEADLINE_MS = 400
# Recovery is promised within about the breaker's cooldown (0.5 s) plus a round trip; the
# cap only bounds how long a sidecar that never recovers makes the test wait.
RECOVERY_CAP = 8.0
_CHECK_SOURCE = read_script("check")
# What marks a check.lua call on the wire: its SHA1 (EVALSHA), or its own header line (EVAL:
# the source opens with the shared counter.lua, which refund.lua's shares)
CHECK_CALL = (hashlib.sha1(_CHECK_SOURCE.encode()).hexdigest().encode(),
              next(line for line in _CHECK_SOURCE.splitlines()
                   if line.startswith("-- check.lua")).encode())


class Rig:
    """The app, the proxy it reaches Redis through, and that redis-server."""

    def __init__(self, client: Any, proxy: FaultProxy, redis: RedisServer) -> None:
        self.client = client
        self.proxy = proxy
        self.redis = redis
        self._subjects = itertools.count(1)

    def fresh_ip(self) -> str:
        """An IP no check of this test has used (each in its own /64)."""
        return f"2001:db8:{next(self._subjects):x}::1"

    async def check(self, action: str, ip: str) -> dict[str, Any]:
        """POST /v1/check; the answer, which must be a 200."""
        resp = await self.client.post("/v1/check", json={"action": action, "ip": ip})
        text = await resp.text()
        assert resp.status == 200, f"{resp.status}: {text}"
        body: dict[str, Any] = await resp.json()
        return body


@pytest.fixture
async def proxy(lone_redis: RedisServer) -> AsyncIterator[FaultProxy]:
    """A fault proxy in front of this test's own redis-server, watching check.lua calls."""
    proxy = await FaultProxy(lone_redis.port, watch=CHECK_CALL).start()
    yield proxy
    await proxy.close()


@pytest.fixture
async def rig(make_client: Callable[..., Awaitable[Any]], proxy: FaultProxy,
              lone_redis: RedisServer, key_prefix: str) -> Rig:
    """The app reaching Redis through ``proxy``, with a short deadline."""
    settings = Settings(redis_url=proxy.url, ip_salt=SALT, key_prefix=key_prefix,
                        redis_timeout_ms=DEADLINE_MS)
    return Rig(await make_client(CONFIG, app_settings=settings), proxy, lone_redis)


async def until(holds: Callable[[], Awaitable[bool]], what: str,
                cap: float = RECOVERY_CAP) -> None:
    """Poll ``holds`` every 20 ms until it is true; fail after ``cap`` seconds."""
    deadline = time.monotonic() + cap
    while not await holds():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {cap} s")
        await asyncio.sleep(0.02)


async def decided_before(rig: Rig) -> None:
    """Before the fault: checks are decided by Redis (one subject's hits counted down)."""
    ip = rig.fresh_ip()
    for remaining in (LIMIT - 1, LIMIT - 2):
        body = await rig.check("open", ip)
        assert body["allowed"] and not body["degraded"], body
        assert body["limits"][0]["remaining"] == remaining, body
    assert rig.proxy.calls > 0, "the proxy saw no check.lua call: CHECK_CALL is out of date"


async def answered_during(rig: Rig, *, unreachable: bool = False) -> list[dict[str, Any]]:
    """Checks while the fault lasts (one of each action, together): each a 200; the
    fail-open rule allows; the fail-closed one denies when Redis could not decide.
    ``unreachable``: the fault leaves Redis no way to answer, so every answer is degraded
    (which also shows the fault was in the way)."""
    ip = rig.fresh_ip()
    bodies = await asyncio.gather(*(rig.check(action, ip)
                                    for action in ("open", "closed", "probe")))
    opened, closed, _ = bodies
    assert opened["allowed"], opened
    # a fresh subject: allowed when Redis decides, denied when the fail mode does
    assert closed["allowed"] != closed["degraded"], closed
    if unreachable:
        assert all(body["degraded"] for body in bodies), bodies
    return bodies


async def normal_again(rig: Rig) -> None:
    """Poll until a check is decided by Redis again."""

    async def decided() -> bool:
        return not (await rig.check("probe", rig.fresh_ip()))["degraded"]

    await until(decided, "checks decided by Redis again")


async def decided_exactly_after(rig: Rig) -> None:
    """After the fault: checks are decided by Redis again, and exactly: ten concurrent
    checks of a fresh subject admit its limit, for the fail-open and the fail-closed rule."""
    await normal_again(rig)
    for action in ("open", "closed"):
        ip = rig.fresh_ip()
        bodies = await asyncio.gather(*(rig.check(action, ip) for _ in range(2 * LIMIT)))
        assert not [body for body in bodies if body["degraded"]], bodies
        assert sum(body["allowed"] for body in bodies) == LIMIT, bodies


# -- the faults: each starts, is met by checks, and ends


async def connect_refused(rig: Rig) -> None:
    """Nothing listens where Redis was, and every pooled connection is reset."""
    await rig.proxy.refuse()
    rig.proxy.drop_all(reset=True)
    await answered_during(rig, unreachable=True)
    await rig.proxy.accept()


async def connect_stalled(rig: Rig) -> None:
    """Every pooled connection is closed, and new ones are accepted but carry nothing either
    way, so the client's connection handshake gets no answer within the deadline."""
    rig.proxy.hold_new = True
    rig.proxy.drop_all()
    await answered_during(rig, unreachable=True)
    rig.proxy.clear()


async def taken_dead(rig: Rig) -> None:
    """Every pooled connection is reset while idle, and every connection (a new one too,
    its handshake done) dies as a check call is written on it."""
    closed = rig.proxy.closed_on_use
    rig.proxy.drop_all(reset=True)
    rig.proxy.close_on_use = True
    await answered_during(rig, unreachable=True)
    assert rig.proxy.closed_on_use > closed
    rig.proxy.clear()


async def write_stalled(rig: Rig) -> None:
    """What the client writes towards Redis stops on the way, on every connection."""
    rig.proxy.hold_writes = True
    await answered_during(rig, unreachable=True)
    rig.proxy.clear()


async def reply_stalled(rig: Rig) -> None:
    """Redis runs the calls, but its replies stop on the way, on every connection."""
    rig.proxy.hold_replies = True
    await answered_during(rig, unreachable=True)
    rig.proxy.clear()


async def reply_cut(rig: Rig) -> None:
    """A check call's reply comes in part, then its connection closes."""
    cuts = rig.proxy.cuts
    rig.proxy.cut_next_reply()
    await answered_during(rig)
    assert rig.proxy.cuts == cuts + 1
    rig.proxy.clear()


async def closed_between_calls(rig: Rig) -> None:
    """Every connection is closed while no call is out on it: with a FIN, then a reset."""
    for reset in (False, True):
        rig.proxy.drop_all(reset=reset)
        await answered_during(rig)


async def script_flush(rig: Rig) -> None:
    """SCRIPT FLUSH, three times, each met by checks: Redis still decides every one."""
    for _ in range(3):
        rig.redis.cli("SCRIPT", "FLUSH")
        bodies = await answered_during(rig)
        assert not [body for body in bodies if body["degraded"]], bodies


async def lose_a_ran_call(rig: Rig, check: Callable[[], Awaitable[Any]], how: str) -> Any:
    """Run ``check`` with the replies held at the proxy; once Redis has answered its call
    (the reply held), lose the reply ``how``: "kill" (CLIENT KILL TYPE normal: Redis closes
    the connection) or "reset" (the proxy resets every connection). ``check``'s result."""
    replies = rig.proxy.replies
    rig.proxy.hold_replies = True
    pending = asyncio.ensure_future(check())

    async def ran() -> bool:
        return rig.proxy.replies > replies

    await until(ran, "Redis answered the check call", cap=5.0)
    lost = rig.proxy.lost
    if how == "kill":
        rig.redis.cli("CLIENT", "KILL", "TYPE", "normal")
    else:
        rig.proxy.drop_all(reset=True)

    async def gone() -> bool:
        return rig.proxy.lost > lost

    await until(gone, "the held reply went with its connection", cap=5.0)
    rig.proxy.clear()
    return await pending


async def client_kill(rig: Rig) -> None:
    """CLIENT KILL TYPE normal: Redis closes the sidecar's connections, first while no call
    is out, then while a check call's reply is on its way."""
    rig.redis.cli("CLIENT", "KILL", "TYPE", "normal")
    await answered_during(rig)
    await lose_a_ran_call(rig, lambda: answered_during(rig), "kill")


async def redis_restarted(rig: Rig) -> None:
    """redis-server is killed (SIGKILL: its connections and script cache gone), met by
    checks, then started again on its port (empty: no persistence)."""
    rig.redis.kill()
    await answered_during(rig, unreachable=True)
    rig.redis.restart()


FAULTS = [connect_refused, connect_stalled, taken_dead, write_stalled, reply_stalled,
          reply_cut, closed_between_calls, script_flush, client_kill, redis_restarted]


# -- one test per step of the way to Redis


async def test_connect_refused(rig: Rig) -> None:
    """Connecting to Redis is refused: checks are answered by the fail modes; once Redis
    listens again they are decided by it, exactly."""
    await decided_before(rig)
    await connect_refused(rig)
    await decided_exactly_after(rig)


async def test_connect_stalled_past_the_deadline(rig: Rig) -> None:
    """A new connection's handshake gets no answer within the deadline: checks are answered
    by the fail modes; once connections carry bytes again, checks are decided exactly."""
    await decided_before(rig)
    await connect_stalled(rig)
    await decided_exactly_after(rig)


async def test_connection_taken_from_the_pool_is_dead(rig: Rig) -> None:
    """The pooled connections are dead when taken, and a new one dies at its first call:
    checks are answered by the fail modes; then decided exactly again."""
    await decided_before(rig)
    await taken_dead(rig)
    await decided_exactly_after(rig)


async def test_write_stalled(rig: Rig) -> None:
    """The write of a check call never reaches Redis within the deadline: checks are
    answered by the fail modes; then decided exactly again."""
    await decided_before(rig)
    await write_stalled(rig)
    await decided_exactly_after(rig)


async def test_read_stalled(rig: Rig) -> None:
    """Redis runs a check call but its reply does not arrive within the deadline: checks are
    answered by the fail modes; then decided exactly again (no late reply is taken for
    another call's)."""
    await decided_before(rig)
    await reply_stalled(rig)
    await decided_exactly_after(rig)


async def test_reply_cut_midway(rig: Rig) -> None:
    """A check call's reply is cut off part way and its connection closed: checks are 200s;
    then decided exactly again."""
    await decided_before(rig)
    await reply_cut(rig)
    await decided_exactly_after(rig)


async def test_connection_closed_between_calls(rig: Rig) -> None:
    """Idle pooled connections are closed (FIN, then reset) between calls: checks are 200s
    and, after, decided exactly."""
    await decided_before(rig)
    await closed_between_calls(rig)
    await decided_exactly_after(rig)


async def test_script_flush_never_degrades(rig: Rig) -> None:
    """SCRIPT FLUSH empties Redis's script cache: every check is still decided by Redis
    (never degraded), before, between and after the flushes, and exactly."""
    await decided_before(rig)
    await script_flush(rig)
    ip = rig.fresh_ip()
    bodies = [await rig.check("open", ip) for _ in range(2 * LIMIT)]
    assert not [body for body in bodies if body["degraded"]], bodies
    assert sum(body["allowed"] for body in bodies) == LIMIT
    await decided_exactly_after(rig)


async def test_client_kill(rig: Rig) -> None:
    """CLIENT KILL TYPE normal, idle and with a check call out: checks are 200s; then
    decided exactly again."""
    await decided_before(rig)
    await client_kill(rig)
    await decided_exactly_after(rig)


async def test_redis_restarted(rig: Rig) -> None:
    """redis-server killed, then started again empty: checks are answered by the fail modes
    while it is down, then decided exactly again (its script cache refilled)."""
    await decided_before(rig)
    await redis_restarted(rig)
    await decided_exactly_after(rig)


@pytest.mark.parametrize("fault", FAULTS, ids=[fault.__name__ for fault in FAULTS])
async def test_never_wedged_after_a_fault_twice(rig: Rig,
                                                fault: Callable[[Rig], Awaitable[None]]
                                                ) -> None:
    """The same fault twice in a row, then normal Redis: checks are decided by Redis again,
    exactly, and 200 more checks (twenty at a time) are all decided, none degraded."""
    await decided_before(rig)
    await fault(rig)
    await fault(rig)
    await decided_exactly_after(rig)
    for _ in range(10):
        bodies = await asyncio.gather(*(rig.check("probe", rig.fresh_ip())
                                        for _ in range(20)))
        assert not [body for body in bodies if body["degraded"]], bodies


@pytest.mark.parametrize("how", ["cut", "kill", "reset"])
async def test_a_call_redis_ran_counts_once(rig: Rig, how: str) -> None:
    """A check call that Redis ran but whose reply was lost (cut part way; the connection
    killed by CLIENT KILL, or reset, with the reply on its way) took one hit, never two: its
    answer is degraded or says one hit was taken, and the subject's next check, once Redis
    answers again, says two were."""
    await decided_before(rig)
    ip = rig.fresh_ip()
    if how == "cut":
        rig.proxy.cut_next_reply()
        body = await rig.check("open", ip)
        assert rig.proxy.cuts == 1
        rig.proxy.clear()
    else:
        body = await lose_a_ran_call(rig, lambda: rig.check("open", ip), how)
    assert body["allowed"], body
    assert body["degraded"] or body["limits"][0]["remaining"] == LIMIT - 1, body
    await normal_again(rig)
    after = await rig.check("open", ip)
    assert not after["degraded"], after
    assert after["limits"][0]["remaining"] == LIMIT - 2, after
