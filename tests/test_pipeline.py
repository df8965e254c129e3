"""The coalescer against a real redis-server: exactness, order, errors, NOSCRIPT, deadlines."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import trustme
import uvloop
from redis.asyncio.connection import BlockingConnectionPool, Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, RedisError, ResponseError

from ratekeeper.decision.checker import Checker
from ratekeeper.decision.flags import FlagBoard
from ratekeeper.errors import StoreUnavailable
from ratekeeper.identity.keys import Keyspace
from ratekeeper.settings import Settings
from ratekeeper.storage.coalescer import Coalescer, Request, encode_command
from ratekeeper.storage.limiter import Limiter, parse_outcome
from ratekeeper.storage.pipe import Endpoint, locate_for
from ratekeeper.storage.scripts import Scripts
from ratekeeper.storage.store import open_store

from support.common import ONE_RULE, SALT, config_from, opened
from support.redis_servers import RedisServer, free_port, running_redis, start_sentinel

# every limiter and coalescer a test opens is closed when it ends
pytestmark = pytest.mark.usefixtures("closes_opened")

NOW_MS = 1_700_000_000_000


def coalescer_for(redis: aioredis.Redis, **options: Any) -> Coalescer:
    options.setdefault("timeout", 2.0)
    return opened(Coalescer(locate_for(redis), Scripts.register(redis).check, **options))


def counter(prefix: str, subject: str, *, cost: int = 1, limit: int = 100,
            now: str | int = NOW_MS) -> Request:
    """One check of one sliding-counter rule of one window of a minute, no ban key."""
    return [f"{prefix}:{{{subject}}}:r"], now, cost, ("c", "0", 0, 1, limit, 60_000)


def remaining(reply: Any) -> int:
    return parse_outcome(reply).windows[0].remaining  # type: ignore[no-any-return]


async def ask(checker: Checker, **fields: Any) -> Any:
    return await checker.check(checker.decode(json.dumps(fields).encode()))


FIVE = ONE_RULE.format(limit="5 per minute", algorithm="sliding-counter")


def checker_on(redis: Any, prefix: str, text: str = FIVE, timeout: float = 2.0
               ) -> Checker:
    config = config_from(text)
    limiter = opened(Limiter(redis, timeout=timeout))
    return Checker(config, Keyspace(SALT, prefix=prefix, grouping=config.ip), limiter,
                   FlagBoard(config.flags))


async def five_of_six_decided(redis: Any, prefix: str) -> None:
    """Six checks of one IP under 5 a minute through ``redis``: five allowed, the sixth
    denied, none of them by a fail mode."""
    checker = checker_on(redis, prefix)
    decisions = [await ask(checker, action="a", ip="192.0.2.1") for _ in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert not any(d.degraded for d in decisions)


@pytest.mark.parametrize("algorithm", ["sliding-log", "sliding-counter"])
async def test_concurrent_checks_admit_exactly_the_limit(redis: aioredis.Redis,
                                                         key_prefix: str,
                                                         algorithm: str) -> None:
    """100 concurrent checks at a limit of 5 (one write or several): exactly 5 allowed."""
    checker = checker_on(redis, key_prefix,
                         ONE_RULE.format(limit="5 per minute", algorithm=algorithm))
    decisions = await asyncio.gather(*(ask(checker, action="a", ip="192.0.2.1")
                                       for _ in range(100)))
    assert sum(d.allowed for d in decisions) == 5
    assert not any(d.degraded for d in decisions)


async def test_one_tick_is_one_write_and_answers_go_to_their_callers(
        redis: aioredis.Redis, key_prefix: str) -> None:
    """Checks submitted in one tick leave in one write; each caller gets its own reply."""
    coalescer = coalescer_for(redis)
    futures = [future for i in range(10)
               for future in coalescer.submit([counter(key_prefix, f"s{i}", cost=i + 1)])]
    replies = await asyncio.gather(*futures)
    assert [remaining(r) for r in replies] == [100 - (i + 1) for i in range(10)]
    assert (coalescer.batches, coalescer.checks) == (1, 10)


async def test_a_large_group_goes_as_several_calls_in_order_in_one_write(
        redis: aioredis.Redis, key_prefix: str) -> None:
    """A group larger than one call's share is split into calls that run in order: each
    check sees what the ones before it took."""
    coalescer = coalescer_for(redis, max_checks=7)
    futures = coalescer.submit([counter(key_prefix, "same") for _ in range(30)])
    replies = await asyncio.gather(*futures)
    assert [remaining(r) for r in replies] == list(range(99, 69, -1))
    assert coalescer.batches == 1


async def test_a_group_is_never_split_between_writes(redis: aioredis.Redis,
                                                     key_prefix: str) -> None:
    """Writes take whole groups up to their size cap; a group larger than the cap goes whole."""
    coalescer = coalescer_for(redis, max_batch=4)
    first = coalescer.submit([counter(key_prefix, "a") for _ in range(3)])
    second = coalescer.submit([counter(key_prefix, "b") for _ in range(6)])
    third = coalescer.submit([counter(key_prefix, "c")])
    await asyncio.gather(*first, *second, *third)
    assert coalescer.batches == 3


async def test_a_script_error_fails_only_its_own_check(redis: aioredis.Redis,
                                                       key_prefix: str) -> None:
    """A check check.lua cannot decide fails alone; the checks beside it are answered."""
    coalescer = coalescer_for(redis)
    keys, now, cost, rule_set = counter(key_prefix, "bad")
    bad: Request = (keys, now, cost, ("x", *rule_set[1:]))  # an algorithm check.lua lacks
    good = coalescer.submit([counter(key_prefix, "ok")])
    wrong = coalescer.submit([bad])
    later = coalescer.submit([counter(key_prefix, "ok")])
    assert remaining(await good[0]) == 99
    with pytest.raises(ResponseError):
        await wrong[0]
    assert remaining(await later[0]) == 98


async def test_script_flush_is_recovered_within_the_write(redis: aioredis.Redis,
                                                          key_prefix: str) -> None:
    """After SCRIPT FLUSH the checks are answered (sent again as EVAL), each hit counted once,
    and the script is cached again."""
    coalescer = coalescer_for(redis)
    await coalescer.submit([counter(key_prefix, "x")])[0]
    await redis.script_flush()
    replies = await asyncio.gather(*coalescer.submit([counter(key_prefix, "x")] * 5))
    assert [remaining(r) for r in replies] == [98, 97, 96, 95, 94]
    assert (await redis.script_exists(coalescer.script.sha)) == [True]


async def test_an_unreachable_redis_is_each_checks_store_unavailable() -> None:
    """With Redis unreachable every check of the write gets StoreUnavailable from the
    limiter, and its breaker counts the failed write once, not once per check."""
    dead = aioredis.Redis(port=free_port(), socket_connect_timeout=0.5,
                          retry=Retry(NoBackoff(), 0))
    try:
        limiter = opened(Limiter(dead, timeout=1.0))
        calls = [([f"p:{{s{i}}}:r"], 1, 0, 1, ("c", "0", 0, 1, 5, 60_000)) for i in range(20)]
        replies = await limiter.decide(calls)
        assert all(isinstance(r, StoreUnavailable) for r in replies)
        assert limiter.breaker.state == "closed"  # one failure of the five that open it
    finally:
        await dead.aclose()


async def test_a_caller_that_gives_up_before_sending_is_not_sent(
        redis: aioredis.Redis, key_prefix: str) -> None:
    """A check cancelled before its write leaves never runs (its hit is not taken)."""
    coalescer = coalescer_for(redis)
    futures = [coalescer.submit([counter(key_prefix, "same")])[0] for _ in range(3)]
    futures[1].cancel()
    first, third = await asyncio.gather(futures[0], futures[2])
    assert (remaining(first), remaining(third)) == (99, 98)
    assert coalescer.checks == 2


async def test_checks_wait_while_the_writes_allowed_out_are_out(redis: aioredis.Redis,
                                                                key_prefix: str) -> None:
    """With one write allowed out, checks submitted meanwhile go together in the next."""
    coalescer = coalescer_for(redis, max_inflight=1)
    await coalescer.connect()  # (as readiness does: else they all wait for the connection)
    first = coalescer.submit([counter(key_prefix, "a")])
    await asyncio.sleep(0)  # the first write leaves
    rest = [f for i in range(10) for f in coalescer.submit([counter(key_prefix, f"b{i}")])]
    await asyncio.gather(*first, *rest)
    assert (coalescer.batches, coalescer.checks) == (2, 11)


async def test_time_spent_in_this_process_is_not_a_deadline_miss(
        redis: aioredis.Redis, key_prefix: str) -> None:
    """A check that waits in this process's queue while the event loop is busy far past the
    deadline is still decided by Redis: the deadline starts when its write leaves."""
    checker = checker_on(redis, key_prefix, timeout=0.02)
    tasks = [asyncio.ensure_future(ask(checker, action="a", ip="192.0.2.9"))
             for _ in range(10)]
    await asyncio.sleep(0)  # the checks are staged and queued
    time.sleep(0.2)  # the loop is busy (decoding a flood, say) for ten deadlines
    decisions = await asyncio.gather(*tasks)
    assert not any(d.degraded for d in decisions)
    assert sum(d.allowed for d in decisions) == 5


def test_a_reply_that_came_while_the_loop_was_busy_is_read_before_the_deadline_fails(
        redis_server: RedisServer, key_prefix: str) -> None:
    """On uvloop, whose timers run before it polls its sockets: a write that left, then an
    event loop busy past the deadline while Redis answered, is decided by that answer."""

    async def scenario() -> list[Any]:
        client = aioredis.Redis(port=redis_server.port)
        try:
            coalescer = coalescer_for(client, timeout=0.02)
            await coalescer.submit([counter(key_prefix, "warm")])[0]  # connected
            futures = coalescer.submit([counter(key_prefix, "busy")] * 3)
            for _ in range(5):  # the write leaves
                await asyncio.sleep(0)
            time.sleep(0.2)  # Redis answers meanwhile; the loop is busy
            replies = list(await asyncio.gather(*futures, return_exceptions=True))
            await coalescer.close()
            return replies
        finally:
            await client.aclose()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        replies = runner.run(scenario())
    assert [remaining(r) for r in replies] == [99, 98, 97]


async def test_a_large_batch_gets_a_deadline_its_size_needs(redis: aioredis.Redis,
                                                            key_prefix: str) -> None:
    """1,000 checks in one group under a 1 ms deadline: the budget grows with the size, so
    Redis decides every one (3 of each subject's rule allowed), none by the fail mode."""
    text = ONE_RULE.format(limit="3 per minute", algorithm="sliding-counter")
    checker = checker_on(redis, key_prefix, text, timeout=0.001)
    requests = [checker.decode(json.dumps({"action": "a", "ip": f"198.51.100.{i % 250}"})
                               .encode()) for i in range(1000)]
    decisions = await checker.check_batch(requests)
    assert not any(d.degraded for d in decisions)
    assert sum(d.allowed for d in decisions) == 250 * 3


async def test_a_stalled_redis_fails_the_write_at_its_deadline(lone_redis: RedisServer,
                                                               key_prefix: str) -> None:
    """A write Redis does not answer (the process is stopped) fails with a TimeoutError once
    its budget and grace are spent; once Redis runs again, the next write is answered."""
    client = aioredis.Redis(port=lone_redis.port)
    try:
        coalescer = coalescer_for(client, timeout=0.05)
        await coalescer.submit([counter(key_prefix, "x")])[0]
        os.kill(lone_redis.process.pid, signal.SIGSTOP)
        try:
            with pytest.raises(TimeoutError):
                await coalescer.submit([counter(key_prefix, "x")])[0]
        finally:
            os.kill(lone_redis.process.pid, signal.SIGCONT)
        reply = await coalescer.submit([counter(key_prefix, "x")])[0]
        assert remaining(reply) in (97, 98)  # the stalled write may have run once Redis woke
    finally:
        await client.aclose()


def test_encoding_matches_redis_py() -> None:
    """EVALSHA and EVAL are encoded byte for byte as redis-py's public pack_command would."""
    connection = Connection()
    keys, now, cost, rule_set = counter("p", "s")
    keys = [*keys, "p:caf\u00e9"]  # (a key is UTF-8, as redis-py sends it)
    args = [now, 1, 1, len(rule_set), *rule_set, cost, 2, 1, b"raw", "s", 0, -1]
    for name, first in ((b"EVALSHA", "a" * 40), (b"EVAL", "return 1")):
        ours = encode_command(name, first, keys, args)
        theirs = b"".join(connection.pack_command(name.decode(), first, len(keys), *keys,
                                                  *args))
        assert ours == theirs


async def test_readiness_loads_the_scripts(redis: aioredis.Redis) -> None:
    """ready() loads the scripts a SCRIPT FLUSH took."""
    limiter = opened(Limiter(redis, timeout=1.0))
    await redis.script_flush()
    assert await limiter.ready()
    assert all(await redis.script_exists(*limiter.scripts.shas))


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop],
                         ids=["asyncio", "uvloop"])
def test_a_connection_redis_closed_is_replaced_before_the_next_write(
        key_prefix: str, loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
    """After a Redis restart, on either event loop (uvloop reads the end of the connection
    before the next tick's write, asyncio's own loop after it, where the pipe finds it in
    the socket): the write goes on a new connection, and its hits are counted once (no
    persistence: counting starts over)."""

    async def scenario(server: RedisServer) -> list[Any]:
        client = aioredis.Redis(port=server.port)
        coalescer = coalescer_for(client)
        try:
            assert remaining(await coalescer.submit([counter(key_prefix, "x")])[0]) == 99
            server.restart()
            return list(await asyncio.gather(*coalescer.submit([counter(key_prefix, "x")] * 3)))
        finally:
            await coalescer.close()
            await client.aclose()

    with running_redis() as server, asyncio.Runner(loop_factory=loop_factory) as runner:
        again = runner.run(scenario(server))
    assert [remaining(r) for r in again] == [99, 98, 97]


class MasterPool(BlockingConnectionPool):
    """A pool that says it is a Sentinel's master pool (``SentinelConnectionPool``'s flag)."""

    is_master = True


def connections_received(server: RedisServer) -> int:
    return int(server.cli("INFO", "stats").split("total_connections_received:")[1].split()[0])


@pytest.mark.parametrize("pool_class", [BlockingConnectionPool, MasterPool])
async def test_readonly_through_a_sentinel_master_pool_goes_again_once(
        pool_class: type[BlockingConnectionPool], key_prefix: str) -> None:
    """READONLY through a Sentinel's master pool means the master was demoted under an open
    connection: the coalescer drops it and, nothing having been answered, sends the write
    once more on a fresh one; a replica still answering READONLY fails the checks with a
    ConnectionError. Through a plain pool the check gets READONLY itself."""
    with running_redis() as master, running_redis(
            extra=("--replicaof", "127.0.0.1", str(master.port))) as replica:
        pool = pool_class.from_url(replica.url, max_connections=4, timeout=1.0,
                                   retry=Retry(NoBackoff(), 0))
        client = aioredis.Redis.from_pool(pool)
        try:
            coalescer = coalescer_for(client, sentinel=pool_class is MasterPool)
            before = connections_received(replica)
            with pytest.raises(RedisError) as raised:
                await coalescer.submit([counter(key_prefix, "x")])[0]
            after = connections_received(replica)
        finally:
            await client.aclose()
    if pool_class is MasterPool:
        assert isinstance(raised.value, RedisConnectionError)
        assert after - before == 3  # two connections (the write, once more), and our INFO
    else:
        assert isinstance(raised.value, ReadOnlyError)
        assert after - before == 2  # one connection, and our INFO


@pytest.mark.parametrize(("url", "endpoint"), [
    ("redis://127.0.0.1:1/0", Endpoint("127.0.0.1", 1)),
    ("redis://reader:secret@127.0.0.1:2/3", Endpoint("127.0.0.1", 2, username="reader",
                                                     password="secret", db=3)),
    ("redis://:secret@localhost:3", Endpoint("localhost", 3, password="secret")),
    ("unix:///run/redis.sock?db=4", Endpoint(path="/run/redis.sock", db=4)),
])
async def test_the_checks_connect_where_the_stores_client_does(url: str, endpoint: Endpoint
                                                               ) -> None:
    """The coalesced checks' connection goes where the store's client connects, with its
    credentials and database."""
    store = open_store(Settings(redis_url=url, ip_salt=SALT))
    try:
        assert await locate_for(store.redis)() == endpoint
    finally:
        await store.close()


async def test_the_checks_over_tls_use_the_clients_tls_settings() -> None:
    """rediss://: the checks' connection is wrapped in the TLS context redis-py builds from
    the URL (certificates not required here, as the URL says)."""
    store = open_store(Settings(redis_url="rediss://127.0.0.1:1/0?ssl_cert_reqs=none",
                                ip_salt=SALT))
    try:
        endpoint = await locate_for(store.redis)()
        assert endpoint.tls is not None
        assert endpoint.tls.verify_mode == ssl.CERT_NONE
        plain = aioredis.Redis(port=1)
        assert (await locate_for(plain)()).tls is None
        await plain.aclose()
    finally:
        await store.close()


async def test_the_checks_authenticate_and_select_the_database(key_prefix: str) -> None:
    """Behind a password, on database 2: the checks log in and count there; a wrong
    password makes every check unavailable rather than wrong."""
    with running_redis() as server:
        server.cli("CONFIG", "SET", "requirepass", "s3cret")
        url = f"redis://:s3cret@127.0.0.1:{server.port}/2"
        store = open_store(Settings(redis_url=url, ip_salt=SALT))
        try:
            await five_of_six_decided(store.redis, key_prefix)
            assert int(server.cli("-a", "s3cret", "-n", "2", "DBSIZE")) > 0
            assert int(server.cli("-a", "s3cret", "-n", "0", "DBSIZE")) == 0
        finally:
            await store.close()
        wrong = open_store(Settings(redis_url=f"redis://:nope@127.0.0.1:{server.port}/2",
                                    ip_salt=SALT))
        try:
            limiter = opened(Limiter(wrong.redis, timeout=1.0))
            [reply] = await limiter.decide([([f"{key_prefix}:{{x}}:r"], 1, 0, 1,
                                             ("c", "0", 0, 1, 5, 60_000))])
            assert isinstance(reply, StoreUnavailable)
        finally:
            await wrong.close()


async def test_a_demoted_master_behind_a_sentinel_pool_is_asked_once_more(
        key_prefix: str) -> None:
    """The master turns replica under the checks' connection (no failover: the Sentinel still
    names it). Its READONLY for the write's first call means nothing of the write ran: the
    write goes once more, on a connection opened to the master the Sentinel names then, and
    as that is still a replica, the check fails saying so."""
    servers = start_sentinel()
    store = open_store(Settings(redis_url=servers.url, ip_salt=SALT))
    try:
        coalescer = coalescer_for(store.redis, sentinel=True)
        assert remaining(await coalescer.submit([counter(key_prefix, "x")])[0]) == 99
        servers.master.cli("REPLICAOF", "127.0.0.1", str(servers.replica.port))
        with pytest.raises(RedisConnectionError, match="the master is now a replica"):
            await coalescer.submit([counter(key_prefix, "x")])[0]
        await coalescer.close()
    finally:
        await store.close()
        servers.stop()


async def test_closing_fails_what_waits_and_sends_nothing_more(key_prefix: str) -> None:
    """Checks queued when the coalescer closes fail with a ConnectionError at once, and no
    connection is opened for them or for checks submitted later."""
    with running_redis() as server:
        client = aioredis.Redis(port=server.port)
        try:
            coalescer = coalescer_for(client)
            await coalescer.connect()
            before = connections_received(server)
            queued = coalescer.submit([counter(key_prefix, "x")])
            await coalescer.close()
            with pytest.raises(RedisConnectionError):
                await queued[0]
            later = coalescer.submit([counter(key_prefix, "x")])
            with pytest.raises(RedisConnectionError):
                await asyncio.wait_for(later[0], 2)
            await asyncio.sleep(0.05)
            assert connections_received(server) - before == 1  # (our INFO alone)
            assert server.cli("EXISTS", f"{key_prefix}:{{x}}:r") == "0"
        finally:
            await client.aclose()


async def test_a_check_that_cannot_be_encoded_fails_alone(redis: aioredis.Redis,
                                                          key_prefix: str) -> None:
    """A check whose key is not text fails by itself; the connection and the checks after it
    are unharmed."""
    coalescer = coalescer_for(redis)
    await coalescer.connect()
    _, now, cost, rule_set = counter(key_prefix, "x")
    odd: Any = ([b"not text"], now, cost, rule_set)
    with pytest.raises(AttributeError):
        await coalescer.submit([odd])[0]
    assert remaining(await coalescer.submit([counter(key_prefix, "x")])[0]) == 99


async def test_a_server_that_answers_garbage_fails_the_write_not_the_process(
        key_prefix: str) -> None:
    """Bytes that are not RESP end the connection: the write fails with a ConnectionError
    (the fail modes decide), and the next write opens a new connection."""
    accepted = 0

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        await reader.read(65536)
        writer.write(b"!this is not RESP\r\n")
        await writer.drain()
        await reader.read()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        coalescer = opened(Coalescer(locate_for(aioredis.Redis(port=port)),
                                     Scripts.register(aioredis.Redis(port=port)).check,
                                     timeout=2.0))
        for _ in range(2):
            with pytest.raises(RedisConnectionError, match="not RESP"):
                await coalescer.submit([counter(key_prefix, "x")])[0]
        assert accepted == 2
    finally:
        server.close()
        await server.wait_closed()


async def test_writes_pipelined_behind_a_demoted_masters_first_each_go_again(
        key_prefix: str) -> None:
    """Two writes out on the connection when the master's READONLY comes back: each is sent
    once more on one new connection (neither is failed for the other), and, the server
    still being a replica, each fails saying so."""
    with running_redis() as master, running_redis(
            extra=("--replicaof", "127.0.0.1", str(master.port))) as replica:
        client = aioredis.Redis.from_pool(MasterPool.from_url(replica.url, max_connections=4))
        try:
            coalescer = coalescer_for(client, sentinel=True)
            await client.script_load(coalescer.script.script)
            await coalescer.connect()
            before = connections_received(replica)
            first = coalescer.submit([counter(key_prefix, "a")])
            await asyncio.sleep(0)  # (the first write leaves alone)
            second = coalescer.submit([counter(key_prefix, "b")])
            results = await asyncio.gather(*first, *second, return_exceptions=True)
            after = connections_received(replica)
        finally:
            await client.aclose()
    assert coalescer.batches == 2
    assert all(isinstance(r, RedisConnectionError) and "now a replica" in str(r)
               for r in results), results
    assert after - before == 2  # one new connection for both, and our INFO


async def test_the_embedded_store_lets_no_one_else_in(key_prefix: str) -> None:
    """memory:// serves its store to its own checks on a Unix socket in a directory only its
    user may enter (fakeredis checks no password), and the checks are decided there; the
    socket is gone once the store is closed."""
    store = open_store(Settings(redis_url="memory://", ip_salt=SALT))
    try:
        assert store.checks is not None
        endpoint = await store.checks()
        directory = Path(endpoint.path).parent
        assert directory.stat().st_mode & 0o777 == 0o700
        limiter = opened(Limiter(store.redis, timeout=2.0, checks=store.checks))
        [reply] = await limiter.decide([([f"{key_prefix}:{{x}}:r"], 1, 0, 1,
                                         ("c", "0", 0, 1, 5, 60_000))])
        assert not isinstance(reply, StoreUnavailable) and remaining(reply) == 4
        await limiter.close()
    finally:
        await store.close()
    assert not directory.exists()


async def test_the_checks_go_over_tls_where_the_url_says(tmp_path: Path,
                                                        key_prefix: str) -> None:
    """rediss:// with the URL's CA: the checks' connection is TLS, verified (Redis sees it on
    its TLS port), and the checks are decided by Redis."""
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    ca_file, cert_file, key_file = (tmp_path / name for name in ("ca.pem", "cert.pem",
                                                                  "key.pem"))
    ca.cert_pem.write_to_path(str(ca_file))
    issued.cert_chain_pems[0].write_to_path(str(cert_file))
    issued.private_key_pem.write_to_path(str(key_file))
    tls_port = free_port()
    with running_redis(extra=("--tls-port", str(tls_port), "--tls-cert-file", str(cert_file),
                              "--tls-key-file", str(key_file), "--tls-ca-cert-file",
                              str(ca_file), "--tls-auth-clients", "no")) as server:
        url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={ca_file}"
        store = open_store(Settings(redis_url=url, ip_salt=SALT))
        try:
            await five_of_six_decided(store.redis, key_prefix)
            clients = server.cli("CLIENT", "LIST").splitlines()
            assert any(f"laddr=127.0.0.1:{tls_port}" in line and "cmd=evalsha" in line
                       for line in clients), clients
        finally:
            await store.close()
