"""Held connections (``heldconn.py``) on every transport a redis:// URL can name: TCP, a Unix
socket and TLS, on asyncio's loop and on uvloop (the server's), against a real redis-server.

The coalescer takes a connection redis-py made and reads it itself: each of these must carry
batches both ways, count exactly, and go back to its pool usable."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import trustme
import uvloop

from ratekeeper.heldconn import HeldConnection
from ratekeeper.limiter import parse_outcome
from ratekeeper.pipeline import Coalescer
from ratekeeper.scripts import Scripts, check_args

from redis_servers import RedisServer, free_port, running_redis

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def one_request(prefix: str, subject: str) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of a one-request check.lua call: one sliding counter, 100 a minute."""
    keys = [f"{prefix}:{{{subject}}}:r"]
    return keys, check_args("", 1, len(keys), ["c", "0", 0, 1, 100, 60_000])


async def exercise(url: str, prefix: str, **client_args: Any) -> None:
    """Checks through a coalescer on ``url``: single, a tick of many, the connection given
    back to the pool and taken again."""
    client = aioredis.Redis.from_url(url, **client_args)
    try:
        coalescer = Coalescer(client, Scripts.register(client).check, timeout=5.0)
        assert coalescer._direct
        first = await coalescer.queue(*one_request(prefix, "a"))
        assert parse_outcome(first).windows[0].remaining == 99
        (held,) = coalescer._held
        assert isinstance(held, HeldConnection) and held.transport.get_protocol() is held
        tick = await asyncio.gather(*(coalescer.queue(*one_request(prefix, "a"))
                                      for _ in range(20)))
        assert sorted(parse_outcome(r).windows[0].remaining for r in tick) == list(
            range(79, 99))
        coalescer._drop_held()
        await asyncio.gather(*coalescer._tasks)
        assert held.closed
        assert await client.ping()  # the pool's connection, through redis-py again
        again = await coalescer.queue(*one_request(prefix, "a"))
        assert parse_outcome(again).windows[0].remaining == 78
    finally:
        await client.aclose()


@pytest.fixture(scope="module")
def unix_redis() -> Iterator[tuple[RedisServer, Path]]:
    socket_path = Path(tempfile.mkdtemp(prefix="rk-unix-")) / "redis.sock"
    with running_redis(extra=("--unixsocket", str(socket_path),
                              "--unixsocketperm", "700")) as server:
        yield server, socket_path


@pytest.fixture(scope="module")
def tls_redis() -> Iterator[tuple[RedisServer, int, Path]]:
    """A redis-server answering TLS on a port of its own, with a certificate for 127.0.0.1
    from a CA made for this test."""
    directory = Path(tempfile.mkdtemp(prefix="rk-tls-"))
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
    cert.private_key_pem.write_to_path(str(directory / "key.pem"))
    port = free_port()
    with running_redis(extra=("--tls-port", str(port),
                              "--tls-cert-file", str(directory / "cert.pem"),
                              "--tls-key-file", str(directory / "key.pem"),
                              "--tls-ca-cert-file", str(directory / "ca.pem"),
                              "--tls-auth-clients", "no")) as server:
        yield server, port, directory / "ca.pem"


@pytest.mark.parametrize("loop", LOOPS)
def test_tcp(loop: str, lone_redis: RedisServer, key_prefix: str) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(exercise(lone_redis.url, key_prefix))


@pytest.mark.parametrize("loop", LOOPS)
def test_unix_socket(loop: str, unix_redis: tuple[RedisServer, Path], key_prefix: str) -> None:
    _, socket_path = unix_redis
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(exercise(f"unix://{socket_path}", key_prefix))


@pytest.mark.parametrize("loop", LOOPS)
def test_tls(loop: str, tls_redis: tuple[RedisServer, int, Path], key_prefix: str) -> None:
    _, port, ca = tls_redis
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(exercise(f"rediss://127.0.0.1:{port}/0", key_prefix, ssl_ca_certs=str(ca)))
