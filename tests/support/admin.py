"""Helpers for the admin tests: tokens, a config with flags and rules, waiting, Redis dumps."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from ratekeeper.admin.api import ADMIN as ADMIN_STATE
from ratekeeper.admin.api import AdminState
from ratekeeper.server.state import RUNTIME, Runtime
from ratekeeper.settings import AdminToken, Settings

SALT = b"test-salt-that-is-long-enough"
ALICE_TOKEN = "alice-secret-token-4f1c9e"
VICTOR_TOKEN = "victor-viewer-token-77ab20"
ADMIN = {"Authorization": f"Bearer {ALICE_TOKEN}"}
VIEWER = {"Authorization": f"Bearer {VICTOR_TOKEN}"}

CONFIG = """
[rules.per-ip]
limit = "3 per minute"
key = ["ip"]

[rules.per-user]
limit = "5 per minute"
key = ["user"]

[rules.boxed]
limit = "2 per minute"
key = ["ip"]
penalty = "1 hour"

[rules.trial]
limit = "1 per minute"
key = ["ip"]
shadow = true

[rules.global]
limit = "100 per minute"
key = []

[actions.register]
rules = ["per-ip"]
flags = ["read-only", "disallow-new-user-registration"]

[actions.signup-page]        # no rules: a check costs no Redis call, only the flags decide
rules = []
flags = ["read-only", "disallow-new-user-registration"]

[actions.login]
rules = ["per-ip", "per-user"]

[actions.create]
rules = ["boxed"]

[actions.try]
rules = ["trial"]

[actions.everything]
rules = ["global"]

[flags.read-only]
description = "Read-only mode"
message = "Read-only mode: writes are disabled."

[flags.disallow-new-user-registration]
description = "Disallow new user registrations"
"""


def admin_settings(redis_url: str, prefix: str, **overrides: Any) -> Settings:
    """Settings with one admin token (alice) and one viewer token (victor)."""
    values: dict[str, Any] = {
        "redis_url": redis_url, "ip_salt": SALT, "key_prefix": prefix,
        "admin_tokens": (AdminToken("alice", ALICE_TOKEN),),
        "viewer_tokens": (AdminToken("victor", VICTOR_TOKEN),),
        "sync_interval_ms": 100,
        # as conftest's TEST_DEADLINE_MS: 50 ms can pass from CPU lag alone on a busy machine
        "redis_timeout_ms": 2000,
    }
    values.update(overrides)
    return Settings(**values)


def runtime_of(client: TestClient[Any, Any]) -> Runtime:
    """The Runtime of a test client's app."""
    return client.app[RUNTIME]  # type: ignore[index]


def admin_of(client: TestClient[Any, Any]) -> AdminState:
    """The AdminState of a test client's app."""
    return client.app[ADMIN_STATE]  # type: ignore[index]


async def check(client: TestClient[Any, Any], **fields: Any) -> dict[str, Any]:
    """POST /v1/check and return the decision."""
    response = await client.post("/v1/check", json=fields)
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def call(client: TestClient[Any, Any], method: str, path: str, *,
               headers: dict[str, str] | None = None, expect: int = 200,
               **kwargs: Any) -> Any:
    """An admin call with alice's token (unless other headers), asserting the status."""
    response = await client.request(method, path, headers=ADMIN if headers is None else headers,
                                    **kwargs)
    text = await response.text()
    assert response.status == expect, f"{method} {path}: {response.status} {text}"
    return await response.json() if text else None


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout: float = 3.0) -> float:
    """Poll ``predicate`` until true; the seconds it took. Fails after ``timeout``."""
    start = time.monotonic()
    while not await predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


async def dump(redis: aioredis.Redis, prefix: str) -> bytes:
    """Every key under ``prefix`` and every value in it, as one blob to search."""
    out = bytearray()
    async for key in redis.scan_iter(match=f"{prefix}:*", count=1000):
        out += key + b"\n"
        kind = (await redis.type(key)).decode()
        if kind == "string":
            out += await redis.get(key) or b""
        elif kind == "list":
            out += b" ".join(await redis.lrange(key, 0, -1))
        elif kind == "hash":
            for field, value in (await redis.hgetall(key)).items():
                out += field + b"=" + value + b" "
        elif kind == "zset":
            out += b" ".join(m for m, _ in await redis.zrange(key, 0, -1, withscores=True))
        elif kind == "stream":
            for _, fields in await redis.xrange(key):
                for field, value in fields.items():
                    out += field + b"=" + value + b" "
        out += b"\n"
    return bytes(out)


async def keys_under(redis: aioredis.Redis, prefix: str) -> list[bytes]:
    """Every key under ``prefix``, sorted."""
    return sorted([key async for key in redis.scan_iter(match=f"{prefix}:*", count=1000)])
