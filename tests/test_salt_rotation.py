"""Salt rotation: with RATEKEEPER_IP_SALT_PREVIOUS set, a new salt hands no client a fresh
window, keeps penalty boxes and bans made under the old salt, and (on a single Redis and on
the cluster) copies a subject's counters once even when many checks race for it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from ratekeeper.decision.checker import Checker
from ratekeeper.decision.flags import FlagBoard
from ratekeeper.errors import SettingsError
from ratekeeper.identity.keys import Keyspace
from ratekeeper.settings import Settings
from ratekeeper.storage.limiter import Limiter

from support.common import FakeClock, config_from, opened

# every limiter and coalescer a test opens is closed when it ends
pytestmark = pytest.mark.usefixtures("closes_opened")

OLD, NEW = b"the-salt-before-the-rotation", b"the-salt-after-the-rotation!"

RULES = """
[rules.ip]
limit = "5 per minute"
key = ["ip"]
[rules.boxed]
limit = "1 per minute"
key = ["user"]
penalty = "1 hour"
[actions.a]
rules = ["ip"]
[actions.b]
rules = ["boxed"]
"""


def checker_for(client: Any, prefix: str, salt: bytes, previous: bytes | None = None,
                clock: FakeClock | None = None, text: str = RULES) -> Checker:
    config = config_from(text)
    keyspace = Keyspace(salt, prefix=prefix, grouping=config.ip, previous_salt=previous)
    return Checker(config, keyspace, opened(Limiter(client, timeout=2.0, clock=clock)),
                   FlagBoard(config.flags))


async def ask(checker: Checker, **fields: Any) -> Any:
    return await checker.check(checker.decode(json.dumps(fields).encode()))


def ip_ban_key(checker: Checker, ip: str) -> str:
    keyspace = checker.keyspace
    return keyspace.subject_ban_keys({"ip": keyspace.ip_value(ip)})[0]


def test_settings_take_the_previous_salt_only_with_a_new_one() -> None:
    """RATEKEEPER_IP_SALT_PREVIOUS needs RATEKEEPER_IP_SALT, 16 bytes, and a different value."""
    base = {"RATEKEEPER_REDIS_URL": "redis://127.0.0.1:1/0", "RATEKEEPER_IP_SALT": NEW.decode()}
    settings = Settings.from_env({**base, "RATEKEEPER_IP_SALT_PREVIOUS": OLD.decode()})
    assert settings.ip_salt_previous == OLD and OLD.decode() not in repr(settings)
    for env, words in [
        ({"RATEKEEPER_IP_SALT_PREVIOUS": OLD.decode()}, "needs RATEKEEPER_IP_SALT"),
        ({**base, "RATEKEEPER_IP_SALT_PREVIOUS": "short"}, "at least 16"),
        ({**base, "RATEKEEPER_IP_SALT_PREVIOUS": NEW.decode()}, "must differ"),
    ]:
        with pytest.raises(SettingsError, match=words):
            Settings.from_env(env)


async def test_rotation_keeps_windows_boxes_and_bans(store: Any, key_prefix: str,
                                                     clock: FakeClock) -> None:
    """Hits, a penalty box and a ban made under the old salt all still count under the new
    one while the old salt is honoured; a new subject starts fresh; the old keys are left."""
    before = checker_for(store, key_prefix, OLD, clock=clock)
    for _ in range(3):
        await ask(before, action="a", ip="192.0.2.1")
    assert (await ask(before, action="b", user="mallory")).allowed
    assert (await ask(before, action="b", user="mallory")).reason == "rate_limited"
    await store.set(ip_ban_key(before, "192.0.2.66"), "1", px=600_000)

    after = checker_for(store, key_prefix, NEW, previous=OLD, clock=clock)
    assert (await ask(after, action="a", ip="192.0.2.1")).limits[0].remaining == 1
    boxed = await ask(after, action="b", user="mallory")
    assert boxed.reason == "banned" and boxed.retry_after > 3000  # the penalty box holds
    assert (await ask(after, action="a", ip="192.0.2.66")).reason == "banned"
    assert (await ask(after, action="a", ip="192.0.2.2")).limits[0].remaining == 4
    # the copy has the window's TTL; the old key is still there (old-salt readers may exist)
    keyspace = after.keyspace
    new_key = keyspace.rule_keys(after.config.rules["ip"], {"ip": keyspace.ip_value("192.0.2.1")})
    assert 0 < await store.pttl(new_key[0]) <= 61_000
    old_key = before.keyspace.rule_keys(before.config.rules["ip"],
                                        {"ip": keyspace.ip_value("192.0.2.1")})
    assert await store.llen(old_key[0]) == 3
    # lifting the old-salt ban during the grace period works
    await store.delete(ip_ban_key(before, "192.0.2.66"))
    assert (await ask(after, action="a", ip="192.0.2.66")).allowed

    # after the grace period the old salt is dropped: state under the new salt goes on
    later = checker_for(store, key_prefix, NEW, clock=clock)
    assert (await ask(later, action="a", ip="192.0.2.1")).limits[0].remaining == 0


async def test_racing_checks_copy_the_old_counter_once(store: Any, key_prefix: str) -> None:
    """Two processes meeting one subject at once after a rotation: 3 old hits and a limit of
    20 admit exactly 17 of 100 concurrent checks."""
    text = RULES.replace('limit = "5 per minute"', 'limit = "20 per minute"')
    before = checker_for(store, key_prefix, OLD, text=text)
    for _ in range(3):
        await ask(before, action="a", ip="198.51.100.9")
    processes = [checker_for(store, key_prefix, NEW, previous=OLD, text=text)
                 for _ in range(2)]
    decisions = await asyncio.gather(*(ask(processes[i % 2], action="a", ip="198.51.100.9")
                                       for i in range(100)))
    assert not any(d.degraded for d in decisions)
    assert sum(d.allowed for d in decisions) == 17


async def test_previous_salt_reaches_the_app(make_client: Any, settings: Settings,
                                             key_prefix: str) -> None:
    """Settings with a previous salt make the served checker honour it (create_app wiring)."""
    old = Settings(redis_url=settings.redis_url, ip_salt=OLD, key_prefix=key_prefix)
    new = Settings(redis_url=settings.redis_url, ip_salt=NEW, ip_salt_previous=OLD,
                   key_prefix=key_prefix)
    old_client = await make_client(RULES, app_settings=old)
    for _ in range(4):
        await old_client.post("/v1/check", json={"action": "a", "ip": "2001:db8::1"})
    new_client = await make_client(RULES, app_settings=new)
    resp = await new_client.post("/v1/check", json={"action": "a", "ip": "2001:db8::2"})
    assert (await resp.json())["limits"][0]["remaining"] == 0  # same /64, old hits carried
