"""Tripwires against real Redis: shared counting, exactly one trip however many processes
flush at once, the flag on with an expiry, the audit event, disarm and re-arm, shadow mode,
the keys' TTLs, and the config checks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from ratekeeper.config.rules import Config, parse_config
from ratekeeper.control.alerts import Alerts
from ratekeeper.control.audit import AuditLog
from ratekeeper.control.flagstore import FlagStore
from ratekeeper.control.sync import StateSync
from ratekeeper.control.traffic import Traffic
from ratekeeper.control.tripwires import Tripwires
from ratekeeper.decision.cache import LocalCache
from ratekeeper.decision.flags import FlagBoard, FlagState
from ratekeeper.errors import ConfigError, StoreUnavailable
from ratekeeper.identity.keys import Keyspace
from ratekeeper.metrics import Metrics
from ratekeeper.process.cli import main

from support.admin import admin_of, admin_settings, call, check, wait_until
from support.common import ROOT, SALT, FakeClock
from support.redis_servers import RedisServer
from support.webhooks import receiver, signed_by

WIRES = """
[rules.per-ip]
limit = "1000 per minute"
key = ["ip"]

[actions.project-create]
rules = ["per-ip"]
flags = ["disallow-new-project-registration"]

[actions.register]
rules = ["per-ip"]
flags = ["disallow-new-user-registration"]

[flags.disallow-new-project-registration]
description = "Disallow new project registrations"

[flags.disallow-new-user-registration]
description = "Disallow new user registrations"

[tripwires.project-flood]
action = "project-create"
count = "allowed"
threshold = "{threshold} per minute"
flag = "disallow-new-project-registration"
duration = "{duration}"

[tripwires.register-watch]
action = "register"
count = "all"
threshold = "5 per minute"
flag = "disallow-new-user-registration"
duration = "1 hour"
shadow = true
"""


def wires(threshold: int = 10, duration: str = "1 hour") -> Config:
    return parse_config(WIRES.format(threshold=threshold, duration=duration), source="t.toml")


@dataclass
class Process:
    """One process's share of tripwire state: its metrics tally, flag board and tripwires."""

    metrics: Metrics
    board: FlagBoard
    tripwires: Tripwires

    def decided(self, action: str, outcome: str = "allowed", count: int = 1,
                rule: str = "") -> None:
        self.metrics.decision(action, rule, outcome, count)


def process(config: Config, redis: Any, keyspace: Keyspace, clock: FakeClock, *,
            flags_redis: Any = None) -> Process:
    """One process's tripwires on ``redis`` (its flags on ``flags_redis``, when given), on
    the test clock."""
    metrics = Metrics()
    board = FlagBoard(config.flags)
    flagstore = FlagStore(flags_redis or redis, keyspace.flags_key())
    audit = AuditLog(redis, keyspace.audit_key())
    wall = lambda: clock() / 1000  # noqa: E731
    sync = StateSync(redis, keyspace.events_channel(), flagstore, board, LocalCache(0),
                     audit, wall=wall, interval=1.0, listen=False)
    traffic = Traffic(redis, keyspace, metrics, wall, now_ms=clock)
    return Process(metrics, board, Tripwires(traffic, lambda: config, board, flagstore, audit,
                                             sync, Alerts((), b"", metrics), metrics, wall))


@pytest.fixture
def processes(redis: aioredis.Redis, key_prefix: str, clock: FakeClock
              ) -> Callable[..., Process]:
    """Make processes sharing this test's Redis keys, on the test clock (their alerts have
    no webhook, so there is nothing to stop)."""
    keyspace = Keyspace(SALT, prefix=key_prefix)
    return lambda config: process(config, redis, keyspace, clock)


async def test_reaching_the_threshold_trips_once_and_turns_the_flag_on(
        processes: Callable[..., Process], clock: FakeClock, redis: aioredis.Redis,
        key_prefix: str) -> None:
    """Nine allowed decisions leave the wire armed; the tenth trips it: the flag is on in
    Redis and in the process, expiring after the duration, and the audit trail has one
    event by tripwire:project-flood of kind tripwire with the count. More decisions while
    the flag is on do not trip it again."""
    one = processes(wires())
    one.decided("project-create", count=9)
    one.decided("project-create", "rate_limited", count=50, rule="per-ip")  # not counted
    assert await one.tripwires.flush() == []
    one.decided("project-create")
    tripped = await one.tripwires.flush()
    assert [(w.name, count) for w, count in tripped] == [("project-flood", 10)]
    now = clock() / 1000
    state = one.board.get("disallow-new-project-registration")
    assert (state.enabled, state.updated_by, state.expires_at) == (
        True, "tripwire:project-flood", now + 3600)
    stored = {s.name: s for s in await one.tripwires.flagstore.load() or []}
    assert stored["disallow-new-project-registration"].expires_at == now + 3600
    (event,) = await one.tripwires.audit.recent(10)
    assert (event.actor, event.kind, event.target) == (
        "tripwire:project-flood", "tripwire", "disallow-new-project-registration")
    assert (event.detail["count"], event.detail["threshold"], event.detail["window"]) == (
        10, 10, 60)
    one.decided("project-create", count=100)
    assert await one.tripwires.flush() == []
    assert len(await one.tripwires.audit.recent(10)) == 1


async def test_many_processes_flushing_at_once_trip_it_exactly_once(
        processes: Callable[..., Process]) -> None:
    """Twenty processes, each with 3 decisions, flush together against a threshold of 10:
    the wire trips once, in one process, and the audit trail has one trip."""
    config = wires()
    many = [processes(config) for _ in range(20)]
    for process in many:
        process.decided("project-create", count=3)
    results = await asyncio.gather(*(p.tripwires.flush() for p in many))
    assert sum(len(r) for r in results) == 1
    events = await many[0].tripwires.audit.recent(50)
    assert [e.kind for e in events] == ["tripwire"]


async def test_counts_from_every_process_add_up_within_the_window(
        processes: Callable[..., Process], clock: FakeClock) -> None:
    """Counts of several processes in one window add up; the previous window's count still
    weighs by the share of the window that covers it (a sliding-window estimate), and is
    gone after two windows."""
    config = wires(threshold=100)
    one, two = processes(config), processes(config)
    clock.ms = (clock.ms // 60_000) * 60_000  # the start of a window
    one.decided("project-create", count=30)
    two.decided("project-create", count=30)
    await one.tripwires.flush()
    await two.tripwires.flush()
    assert (await one.tripwires.view("project-flood")).seen == 60  # type: ignore[union-attr]
    clock.advance(75)  # a quarter into the next window: 3/4 of the previous one weighs
    assert (await two.tripwires.view("project-flood")).seen == 45  # type: ignore[union-attr]
    one.decided("project-create", count=5)
    await one.tripwires.flush()
    assert (await two.tripwires.view("project-flood")).seen == 50  # type: ignore[union-attr]
    clock.advance(120)
    assert (await two.tripwires.view("project-flood")).seen == 0  # type: ignore[union-attr]


async def test_a_disarmed_wire_counts_but_never_trips_until_re_armed(
        processes: Callable[..., Process]) -> None:
    """Disarmed, a wire past its threshold does not trip (its count shows); re-armed, the
    next decision trips it. Both changes are in the audit trail under the admin's name."""
    one = processes(wires())
    wire = one.tripwires.get("project-flood")
    assert wire is not None
    await one.tripwires.set_armed(wire, False, "alice", "load test tonight")
    one.decided("project-create", count=25)
    assert await one.tripwires.flush() == []
    view = await one.tripwires.view("project-flood")
    assert view is not None
    assert (view.armed, view.seen, view.disarmed_by, view.reason, view.tripped_until) == (
        False, 25, "alice", "load test tonight", None)
    await one.tripwires.set_armed(wire, True, "alice", "")
    one.decided("project-create")
    assert len(await one.tripwires.flush()) == 1
    view = await one.tripwires.view("project-flood")
    assert view is not None and view.armed and view.tripped_until is not None
    kinds = [(e.kind, e.actor) for e in await one.tripwires.audit.recent(10)]
    assert kinds == [("tripwire", "tripwire:project-flood"), ("tripwire-arm", "alice"),
                     ("tripwire-disarm", "alice")]


async def test_a_flag_already_on_blocks_a_trip(processes: Callable[..., Process],
                                               clock: FakeClock) -> None:
    """While its flag is on (an admin turned it on), a wire does not trip, so it never
    shortens or replaces the admin's switch."""
    one = processes(wires())
    one.board.update(FlagState("disallow-new-project-registration", enabled=True,
                               updated_by="alice", updated_at=clock() / 1000))
    one.decided("project-create", count=50)
    assert await one.tripwires.flush() == []
    assert one.board.get("disallow-new-project-registration").updated_by == "alice"


async def test_a_shadow_wire_records_and_never_turns_the_flag_on(
        processes: Callable[..., Process]) -> None:
    """A shadow wire past its threshold writes its audit event (detail shadow) and leaves the
    flag off; it does not trip again while its trip lasts."""
    one = processes(wires())
    one.decided("register", count=3)
    one.decided("register", "rate_limited", count=3, rule="per-ip")  # count = "all"
    assert [w.name for w, _ in await one.tripwires.flush()] == ["register-watch"]
    assert not one.board.get("disallow-new-user-registration").enabled
    (event,) = await one.tripwires.audit.recent(10)
    assert (event.actor, event.detail["shadow"], event.detail["count"]) == (
        "tripwire:register-watch", True, 6)
    one.decided("register", count=10)
    assert await one.tripwires.flush() == []


async def test_every_key_but_the_disarmed_list_expires(
        processes: Callable[..., Process], redis: aioredis.Redis, key_prefix: str) -> None:
    """The minute's counts live until an hour after the minute began, a wire's counter two
    windows and a second, its trip key its duration; only the list of disarmed wires (an
    admin's decision, like a flag) has no TTL."""
    one = processes(wires(duration="2 hours"))
    wire = one.tripwires.get("register-watch")
    assert wire is not None
    await one.tripwires.set_armed(wire, False, "alice", "")
    one.decided("project-create", count=3)
    await one.tripwires.flush()
    one.decided("project-create", count=20)
    await one.tripwires.flush()
    one.decided("project-create", count=1)
    await one.tripwires.flush()
    keys = Keyspace(SALT, prefix=key_prefix)
    ttls = {key.decode(): await redis.pttl(key)
            async for key in redis.scan_iter(match=f"{key_prefix}:{{traffic}}*")}
    assert ttls.pop(keys.tripwires_disarmed_key()) == -1
    assert 0 < ttls.pop(keys.tripwire_trip_key("project-flood")) <= 7_200_000
    assert 0 < ttls.pop(keys.tripwire_counter_key("project-flood")) <= 121_000
    (minute,) = [k for k in ttls if k.startswith(keys.traffic_minute_key(0)[:-1])]
    assert 3_540_000 <= ttls.pop(minute) <= 3_600_000
    assert ttls == {}


async def test_counts_that_cannot_reach_redis_wait_for_the_next_flush(
        processes: Callable[..., Process], lone_redis: RedisServer, key_prefix: str,
        clock: FakeClock) -> None:
    """A flush that meets a stopped Redis raises; its counts are kept and reach Redis with
    the next flush, so a wave during an outage still trips the wire."""
    store = aioredis.Redis.from_url(lone_redis.url)
    try:
        one = process(wires(), store, Keyspace(SALT, prefix=key_prefix), clock)
        metrics, tripwires = one.metrics, one.tripwires
        metrics.decision("project-create", "", "allowed", 8)
        lone_redis.stop()
        with pytest.raises(StoreUnavailable):
            await tripwires.flush()
        lone_redis.restart()
        metrics.decision("project-create", "", "allowed", 2)
        assert len(await tripwires.flush()) == 1
    finally:
        await store.aclose()


async def test_a_trip_whose_flag_cannot_be_written_is_acted_on_at_the_next_flush(
        redis: aioredis.Redis, lone_redis: RedisServer, key_prefix: str,
        clock: FakeClock) -> None:
    """A process that wins a trip while the flags' Redis is stopped raises, and at its next
    flush (no new decision needed: no other process will act on that trip) turns the flag
    on, expiring a duration after the trip was won, and audits it once."""
    flags_store = aioredis.Redis.from_url(lone_redis.url)
    try:
        one = process(wires(), redis, Keyspace(SALT, prefix=key_prefix), clock,
                      flags_redis=flags_store)
        metrics, board, tripwires = one.metrics, one.board, one.tripwires
        audit = tripwires.audit
        won = clock() / 1000
        metrics.decision("project-create", "", "allowed", 12)
        lone_redis.stop()
        with pytest.raises(StoreUnavailable):
            await tripwires.flush()
        assert not board.get("disallow-new-project-registration").enabled
        lone_redis.restart()
        clock.advance(30)
        assert [(w.name, n) for w, n in await tripwires.flush()] == [("project-flood", 12)]
        state = board.get("disallow-new-project-registration")
        assert (state.enabled, state.expires_at) == (True, won + 3600)
        assert [e.kind for e in await audit.recent(10)] == ["tripwire"]
        assert await tripwires.flush() == []
    finally:
        await flags_store.aclose()


# -- the config ------------------------------------------------------------------------------

@pytest.mark.parametrize(("change", "error"), [
    ('action = "project-create"', 'action = "nope"'),
    ('count = "allowed"', 'count = "most"'),
    ('threshold = "10 per minute"', 'threshold = "ten a minute"'),
    ('threshold = "10 per minute"', 'threshold = "10 per minute; 20 per hour"'),
    ('threshold = "10 per minute"', 'threshold = "0 per minute"'),
    ('flag = "disallow-new-project-registration"', 'flag = "no-such-flag"'),
    ('duration = "1 hour"', 'duration = "a while"'),
    ('duration = "1 hour"', 'duration = "1 hour"\nwhen = "always"'),
], ids=["action", "count", "threshold", "several-limits", "zero", "flag", "duration",
     "unknown-key"])
def test_check_config_names_a_bad_tripwire(change: tuple[str, str], error: str,
                                           tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """`ratekeeper check-config` exits 1 and names the file and the tripwire's key for an
    unknown action or flag, a bad count or threshold (unreadable, several limits, none
    allowed), a bad duration or an unknown key."""
    text = WIRES.format(threshold=10, duration="1 hour").replace(change, error, 1)
    assert text != WIRES
    path = tmp_path / "wires.toml"
    path.write_text(text)
    assert main(["check-config", str(path)]) == 1
    err = capsys.readouterr().err
    key = error.split("\n")[-1].split(" =")[0]
    assert f"{path}: tripwires.project-flood.{key}:" in err, err


def test_check_config_counts_the_tripwires_of_the_example(
        capsys: pytest.CaptureFixture[str]) -> None:
    """`ratekeeper check-config examples/tripwires.toml` exits 0 without a warning, and its
    summary counts the tripwires beside the rules, actions, flags and routes."""
    example = ROOT / "examples" / "tripwires.toml"
    assert main(["check-config", str(example)]) == 0
    out = capsys.readouterr()
    assert out.err == ""
    assert out.out == f"{example}: ok (2 rules, 1 action, 1 flag, 0 routes, 2 tripwires)\n"


def test_a_valid_tripwire_and_webhooks_parse() -> None:
    """The contract's example parses into its parts; webhooks must be http(s) URLs."""
    config = wires(threshold=300)
    wire = config.tripwires["project-flood"]
    assert (wire.action, wire.counted, wire.threshold, wire.window, wire.flag, wire.duration,
            wire.shadow) == ("project-create", "allowed", 300, 60,
                             "disallow-new-project-registration", 3600, False)
    text = WIRES.format(threshold=1, duration="1h")
    hooks = parse_config(text + '[alerts]\nwebhooks = ["https://hooks.example/ratekeeper"]\n')
    assert hooks.alerts.webhooks == ("https://hooks.example/ratekeeper",)
    with pytest.raises(ConfigError, match=r"alerts\.webhooks\[0\]: must be an http"):
        parse_config(text + '[alerts]\nwebhooks = ["file:///etc/passwd"]\n')


# -- a running server ------------------------------------------------------------------------

SECRET = b"webhook-secret-for-tests-91c3"
WAVE_IP = "203.0.113.99"


async def test_a_spam_wave_trips_the_wire_of_a_running_server(
        make_client: Callable[..., Any], redis_server: RedisServer, key_prefix: str) -> None:
    """Twelve project creations against a threshold of 10: within the flush interval the
    flag turns on (further creations are disabled), the audit names the tripwire and the
    count, the webhook gets one signed alert without an IP, the admin API lists the wire as
    tripped, and after its 2-second duration the flag turns itself off again."""
    with receiver() as hook:
        text = WIRES.format(threshold=10, duration="2s") + (
            f'\n[alerts]\nwebhooks = ["{hook.url}"]\n')
        settings = admin_settings(redis_server.url, key_prefix, webhook_secret=SECRET)
        client = await make_client(text, app_settings=settings)
        for i in range(12):
            await check(client, action="project-create", ip=WAVE_IP if i % 2 else "::1")

        async def disabled() -> bool:
            decision = await check(client, action="project-create", ip="198.51.100.1")
            return decision["reason"] == "disabled"

        await wait_until(disabled, timeout=5)
        (alert,) = await hook.arrived(1)
        assert signed_by(SECRET, alert)
        body = alert.json
        assert (body["kind"], body["tripwire"], body["flag"], body["shadow"]) == (
            "tripwire", "project-flood", "disallow-new-project-registration", False)
        assert body["count"] >= 10
        assert "Tripwire project-flood tripped" in body["text"]
        assert WAVE_IP.encode() not in alert.body and b"::1" not in alert.body
        events = (await call(client, "GET", "/v1/admin/audit"))["events"]
        trip = next(e for e in events if e["kind"] == "tripwire")
        assert trip["actor"] == "tripwire:project-flood" and trip["detail"]["count"] >= 10
        listed = (await call(client, "GET", "/v1/admin/tripwires"))["tripwires"]
        flood = next(w for w in listed if w["name"] == "project-flood")
        assert flood["armed"] and flood["tripped_until"] is not None

        async def enabled_again() -> bool:
            decision = await check(client, action="project-create", ip="198.51.100.1")
            return bool(decision["allowed"])

        await wait_until(enabled_again, timeout=6)
        flags = (await call(client, "GET", "/v1/admin/flags"))["flags"]
        assert not next(f for f in flags if f["name"] == "disallow-new-project-registration")[
            "enabled"]


async def test_admin_api_disarms_and_re_arms_a_wire(
        make_client: Callable[..., Any], redis_server: RedisServer, key_prefix: str) -> None:
    """PUT /v1/admin/tripwires/{name} disarms and re-arms (audited under the token's name);
    an unknown wire is a 404, a viewer's change a 403, an IP in the reason a 400."""
    settings = admin_settings(redis_server.url, key_prefix)
    client = await make_client(WIRES.format(threshold=10, duration="1h"), app_settings=settings)
    view = await call(client, "PUT", "/v1/admin/tripwires/project-flood",
                      json={"armed": False, "reason": "migration"})
    assert (view["armed"], view["disarmed_by"], view["reason"]) == (False, "alice", "migration")
    await call(client, "PUT", "/v1/admin/tripwires/nope", json={"armed": False}, expect=404)
    await call(client, "PUT", "/v1/admin/tripwires/project-flood", json={"armed": True},
               headers={"Authorization": "Bearer victor-viewer-token-77ab20"}, expect=403)
    await call(client, "PUT", "/v1/admin/tripwires/project-flood",
               json={"armed": True, "reason": "from 198.51.100.4"}, expect=400)
    view = await call(client, "PUT", "/v1/admin/tripwires/project-flood", json={"armed": True})
    assert view["armed"] and view["disarmed_by"] is None
    kinds = [e["kind"] for e in (await call(client, "GET", "/v1/admin/audit"))["events"]]
    assert kinds == ["tripwire-arm", "tripwire-disarm"]
    assert admin_of(client).tripwires.get("register-watch") is not None


async def test_on_a_cluster_one_slot_holds_every_traffic_key(
        cluster_client: Any, key_prefix: str, clock: FakeClock) -> None:
    """On a Redis Cluster the flush, the trip, disarm and re-arm, the state and the picture
    all work: every key they touch shares the {traffic} hash tag."""
    one = process(wires(), cluster_client, Keyspace(SALT, prefix=key_prefix), clock)
    metrics, board, tripwires = one.metrics, one.board, one.tripwires
    traffic = tripwires.traffic
    wire = tripwires.get("project-flood")
    assert wire is not None
    await tripwires.set_armed(wire, False, "alice", "")
    metrics.decision("project-create", "", "allowed", 12)
    metrics.decision("project-create", "per-ip", "rate_limited", 4)
    assert await tripwires.flush() == []
    await tripwires.set_armed(wire, True, "alice", "")
    metrics.decision("project-create", "", "allowed", 1)
    assert len(await tripwires.flush()) == 1
    assert board.get("disallow-new-project-registration").enabled
    picture = await traffic.picture()
    assert picture.total("project-create", ["allowed"]) == 13
    assert picture.rules == {"per-ip": {"limited": 4}}
