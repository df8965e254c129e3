"""POST /v1/refund: a check's hits given back once, forged and stale tokens refused."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import redis.asyncio as aioredis

from ratekeeper.settings import Settings

from support.common import SALT, FakeClock, config_from
from support.redis_servers import free_port

CREATE = """
[rules.create-ip]
limit = "2 per day"
key = ["ip"]
[rules.create-user]
limit = "3 per hour"
key = ["user"]
algorithm = "sliding-counter"
[actions.project-create]
rules = ["create-ip", "create-user"]
[actions.free]
rules = []
"""
ALICE = {"action": "project-create", "ip": "203.0.113.7", "user": "alice"}


def remaining(body: dict[str, Any]) -> list[int]:
    return [item["remaining"] for item in body["limits"]]


async def peek(client: Any, **fields: Any) -> dict[str, Any]:
    resp = await client.post("/v1/check", json={**ALICE, **fields, "cost": 0})
    assert resp.status == 200
    body: dict[str, Any] = await resp.json()
    assert "refund" not in body
    return body


async def take(client: Any, **fields: Any) -> dict[str, Any]:
    resp = await client.post("/v1/check", json={**ALICE, **fields})
    assert resp.status == 200
    body: dict[str, Any] = await resp.json()
    return body


async def test_hit_then_refund_gives_back_every_rule(make_client: Any, clock: FakeClock) -> None:
    """A refund restores remaining on both rules, and the next hits are counted as before."""
    client = await make_client(CREATE, clock=clock)
    first = await take(client)
    assert first["allowed"] is True and remaining(first) == [1, 2]
    clock.advance(5)
    second = await take(client)
    assert remaining(second) == [0, 1]
    resp = await client.post("/v1/refund", json={"token": second["refund"]})
    assert resp.status == 200
    assert await resp.json() == {"refunded": True, "reason": None, "degraded": False}
    assert remaining(await peek(client)) == [1, 2]
    # the first hit still counts: one more fits on the IP rule, then it is full again
    assert remaining(await take(client)) == [0, 1]
    assert (await take(client))["allowed"] is False


async def test_second_and_concurrent_refunds_give_back_once(make_client: Any,
                                                            clock: FakeClock) -> None:
    """Ten concurrent refunds of one token: exactly one gives back, the rest say so."""
    client = await make_client(CREATE, clock=clock)
    await take(client)
    body = await take(client)
    responses = await asyncio.gather(*(client.post("/v1/refund", json={"token": body["refund"]})
                                       for _ in range(10)))
    answers = [await r.json() for r in responses]
    assert all(r.status == 200 for r in responses)
    assert sum(a["refunded"] for a in answers) == 1
    assert [a["reason"] for a in answers if not a["refunded"]] == ["already_refunded"] * 9
    assert remaining(await peek(client)) == [1, 2]


async def test_forged_altered_and_foreign_tokens_are_400_and_change_nothing(
        make_client: Any, clock: FakeClock, redis: aioredis.Redis, key_prefix: str,
        settings: Settings) -> None:
    """Bad signature, altered payload, another salt's token, junk: 400, counters untouched."""
    client = await make_client(CREATE, clock=clock)
    token = (await take(client))["refund"]
    version, payload, signature = token.split(".")
    claim = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claim[2] = 50  # try to give back 50 hits
    altered = base64.urlsafe_b64encode(json.dumps(claim).encode()).rstrip(b"=").decode()
    other_salt = Settings(redis_url=settings.redis_url, ip_salt=b"another-salt-entirely-123",
                          key_prefix=key_prefix)
    foreign_client = await make_client(CREATE, clock=clock, app_settings=other_salt)
    foreign = (await take(foreign_client, user="bob"))["refund"]
    flipped = signature[:-2] + ("AA" if signature[-2:] != "AA" else "BB")
    before = await peek(client)
    for bad in (f"{version}.{altered}.{signature}", f"{version}.{payload}.{flipped}", foreign,
                "r1..", "r2.x.y", "not a token", token + "x", "r1.\u00e9.\u00e9"):
        resp = await client.post("/v1/refund", json={"token": bad})
        assert resp.status == 400, bad
        assert await resp.json() == {"error": "the refund token is not valid"}
    assert await peek(client) == before
    assert [k async for k in redis.scan_iter(match=f"{key_prefix}:*:r:*")] == []


async def test_expired_token_is_400(make_client: Any, clock: FakeClock) -> None:
    """Once the longest window has passed, the token is refused as expired."""
    client = await make_client(CREATE, clock=clock)
    token = (await take(client))["refund"]
    clock.advance(86_400 + 1)
    resp = await client.post("/v1/refund", json={"token": token})
    assert resp.status == 400
    assert "expired" in (await resp.json())["error"]


async def test_token_carries_no_ip_and_no_user(make_client: Any) -> None:
    """The payload holds keyed hashes only: neither the IP nor the user name appears."""
    client = await make_client(CREATE)
    token = (await take(client, ip="2001:db8::7", user="alice-the-user"))["refund"]
    payload = token.split(".")[1]
    decoded = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    for needle in (b"2001", b"db8", b"alice"):
        assert needle not in decoded and needle.decode() not in token
    action, subjects, cost, _at_ms, _nonce = json.loads(decoded)
    assert action == "project-create" and cost == 1 and len(subjects) == 2
    assert all(len(s) == 22 for s in subjects)


async def test_no_token_when_nothing_was_taken(make_client: Any) -> None:
    """Peeks, denials and rule-less actions carry no refund field; batches carry one each."""
    client = await make_client(CREATE)
    await take(client)
    await take(client)
    denied = await take(client)
    assert denied["allowed"] is False and "refund" not in denied
    resp = await client.post("/v1/check", json={"action": "free", "ip": "192.0.2.1"})
    assert "refund" not in await resp.json()
    resp = await client.post("/v1/check/batch", json={"checks": [
        {**ALICE, "ip": "192.0.2.10"}, {**ALICE, "ip": "192.0.2.11", "cost": 0}]})
    results = (await resp.json())["results"]
    assert results[0]["refund"].startswith("r1.") and "refund" not in results[1]


async def test_marker_key_expires_with_the_longest_window(
        make_client: Any, redis: aioredis.Redis, key_prefix: str) -> None:
    """The double-refund marker lives no longer than the longest window plus the slack."""
    client = await make_client(CREATE)
    token = (await take(client))["refund"]
    assert (await (await client.post("/v1/refund", json={"token": token})).json())["refunded"]
    markers = [k async for k in redis.scan_iter(match=f"{key_prefix}:*:r:*")]
    assert len(markers) == 1
    assert 0 < await redis.pttl(markers[0]) <= 86_400_000 + 1000


async def test_token_for_an_action_gone_from_the_config_is_400(make_client: Any) -> None:
    """After a config change that drops the action, its tokens are refused."""
    token = (await take(await make_client(CREATE)))["refund"]
    other = await make_client(CREATE.replace("project-create", "renamed"))
    resp = await other.post("/v1/refund", json={"token": token})
    assert resp.status == 400
    assert "current config" in (await resp.json())["error"]


async def test_bad_bodies_are_400(make_client: Any) -> None:
    """Malformed JSON, a missing token, a wrong type and unknown fields: 400 with a sentence."""
    client = await make_client(CREATE)
    for body in (b"{", b"{}", b'{"token": 5}', b'{"token": "x", "extra": 1}', b'{"token": ""}'):
        resp = await client.post("/v1/refund", data=body)
        assert resp.status == 400, body
        assert isinstance((await resp.json())["error"], str)


async def test_refund_when_redis_is_unreachable_is_degraded_not_5xx(
        make_client: Any, settings: Settings) -> None:
    """With Redis gone the answer is 200, refunded false, reason unavailable, degraded."""
    token = (await take(await make_client(CREATE)))["refund"]
    dead = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", ip_salt=SALT,
                    key_prefix=settings.key_prefix, redis_timeout_ms=200)
    client = await make_client(config_from(CREATE), app_settings=dead)
    resp = await client.post("/v1/refund", json={"token": token})
    assert resp.status == 200
    assert await resp.json() == {"refunded": False, "reason": "unavailable", "degraded": True}


def test_a_token_is_signed_with_keyed_blake2b_as_documented() -> None:
    """The signature is keyed BLAKE2b-128 over ``r1.<payload>``, whichever way it is computed:
    tokens issued before a release stay valid after it."""
    import base64
    import hashlib

    from ratekeeper.decision.refunds import RefundSigner

    key = bytes(range(32))
    signer = RefundSigner(key)
    for at_ms in (0, 1_700_000_000_000, 1_700_000_000_001):
        token = signer.issue("login", ["A" * 22, "b" * 22], 3, at_ms)
        version, payload, signature = token.split(".")
        expected = hashlib.blake2b(f"{version}.{payload}".encode(), key=key,
                                   digest_size=16).digest()
        assert base64.urlsafe_b64encode(expected).rstrip(b"=").decode() == signature
        claim, _ = signer.open(token)
        assert (claim.action, claim.subjects, claim.cost, claim.at_ms) == (
            "login", ["A" * 22, "b" * 22], 3, at_ms)
