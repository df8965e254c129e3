"""No raw IP, no salt in Redis, and a TTL on every counter key, after varied traffic."""

from __future__ import annotations

import ipaddress
import random
from typing import Any

import redis.asyncio as aioredis

from ratekeeper.identity.keys import parse_ip

from support.common import SALT

EMBEDDINGS = ("::ffff:", "::ffff:0:", "64:ff9b::")  # IPv6 forms of an IPv4 client

CONFIG = """
[rules.log-ip]
limit = "3 per minute, 10 per hour"
key = ["ip"]
algorithm = "sliding-log"
penalty = "10 minutes"
[rules.counter-ip]
limit = "5 per minute"
key = ["ip"]
algorithm = "sliding-counter"
[rules.pair]
limit = "2 per minute"
key = ["ip", "user"]
[actions.a]
rules = ["log-ip", "counter-ip", "pair"]
"""


def textual_forms(address: str) -> set[bytes]:
    """Every way an address (and its /64 or /24) could be written down."""
    ip = ipaddress.ip_address(address)
    forms = {str(ip), ip.exploded}
    if isinstance(ip, ipaddress.IPv6Address):
        net = ipaddress.ip_network(f"{ip}/64", strict=False)
        forms |= {str(net.network_address), net.network_address.exploded[:19],
                  str(net.network_address).rstrip(":"), ip.exploded.replace(":", "")}
        forms.add(":".join(f"{int(g, 16):x}" for g in ip.exploded.split(":")[:4]))
    else:
        forms.add(".".join(str(ip).split(".")[:3]) + ".")
    out = {f.encode() for f in forms if len(f) >= 7}
    out.add(ip.packed)
    return out


async def all_values(redis: aioredis.Redis, key: bytes) -> list[bytes]:
    kind = (await redis.type(key)).decode()
    if kind == "string":
        return [await redis.get(key) or b""]
    if kind == "list":
        return list(await redis.lrange(key, 0, -1))
    if kind == "hash":
        items = await redis.hgetall(key)
        return [*items.keys(), *items.values()]
    if kind == "zset":
        return [m for m, _ in await redis.zrange(key, 0, -1, withscores=True)]
    if kind == "set":
        return list(await redis.smembers(key))
    if kind == "stream":
        values: list[bytes] = []
        for _, fields in await redis.xrange(key):
            values += [*fields.keys(), *fields.values()]
        return values
    raise AssertionError(f"unexpected key type {kind}")


async def test_redis_holds_no_raw_ip_no_salt_and_every_key_expires(
        make_client: Any, redis: aioredis.Redis, key_prefix: str) -> None:
    """Hundreds of IPv4 and IPv6 clients later, no key or value reveals an address."""
    client = await make_client(CONFIG)
    rng = random.Random(7)
    addresses = [str(ipaddress.IPv4Address(rng.getrandbits(32) | 0x01000000))
                 for _ in range(200)]
    addresses += [str(ipaddress.IPv6Address((0x2001_0db8 << 96) | rng.getrandbits(96)))
                  for _ in range(200)]
    addresses += [f"{embedding}{a}" for a in addresses[:20] for embedding in EMBEDDINGS]
    for index, address in enumerate(addresses):
        for _ in range(rng.choice([1, 2, 6])):
            resp = await client.post("/v1/check", json={"action": "a", "ip": address,
                                                        "user": f"user{index % 7}"})
            assert resp.status == 200
            for value in resp.headers.values():
                assert address not in value
    needles = set()
    for address in addresses:
        needles |= textual_forms(str(parse_ip(address)))
    needles.add(SALT)
    keys = [k async for k in redis.scan_iter(match=f"{key_prefix}:*", count=1000)]
    assert len(keys) > 400
    for key in keys:
        ttl = await redis.pttl(key)
        assert 0 < ttl <= 3_600_000 + 1000, key
        for blob in [key, *await all_values(redis, key)]:
            for needle in needles:
                assert needle not in blob, (key, needle)
