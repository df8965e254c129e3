"""Alerts posted to real webhook receivers: signed, readable, free of IPs and subject hashes,
and never in the way of a check, whether the receiver answers, is down or hangs."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from ratekeeper.control.alerts import Alerts, BreakerWatch, sign
from ratekeeper.identity.keys import contains_ip
from ratekeeper.metrics import Metrics

from support.admin import CONFIG, admin_settings, call, check, wait_until
from support.common import sample
from support.redis_servers import RedisServer, free_port
from support.webhooks import receiver, signed_by

SECRET = b"webhook-secret-for-tests-91c3"
IP = "203.0.113.77"


def with_hooks(*urls: str) -> str:
    """The admin tests' config with these webhooks."""
    return CONFIG + "\n[alerts]\nwebhooks = [" + ", ".join(json.dumps(u) for u in urls) + "]\n"


@pytest.fixture
def serve(make_client: Callable[..., Any], redis_server: RedisServer,
          key_prefix: str) -> Callable[..., Any]:
    """Start the app with admin tokens, the webhook secret and these webhooks."""

    async def start(*urls: str) -> Any:
        settings = admin_settings(redis_server.url, key_prefix, webhook_secret=SECRET)
        return await make_client(with_hooks(*urls), app_settings=settings)

    return start


async def test_an_admin_flag_change_is_posted_signed_with_a_text_line(serve: Any) -> None:
    """Turning a flag on through the admin API posts one JSON alert to every webhook: a
    human line in ``text``, the event's fields, and a valid HMAC-SHA256 signature of the
    exact body under the webhook secret."""
    with receiver() as first, receiver() as second:
        client = await serve(first.url, second.url)
        await call(client, "PUT", "/v1/admin/flags/read-only",
                   json={"enabled": True, "reason": "maintenance", "expires_in": 7200})
        for hook in (first, second):
            (delivery,) = await hook.arrived(1)
            assert signed_by(SECRET, delivery)
            assert delivery.headers["Content-Type"] == "application/json"
            alert = delivery.json
            assert alert["text"] == "alice turned read-only on for 2 h: maintenance"
            assert (alert["kind"], alert["flag"], alert["enabled"], alert["by"],
                    alert["expires_in"]) == ("flag", "read-only", True, "alice", 7200)


async def test_bans_are_alerted_without_the_ip_or_its_hash(serve: Any) -> None:
    """A ban on an IP and its lift are alerted naming the kind of subject and who did it;
    neither the address nor the subject hash (the ban's id) appears in any alert."""
    with receiver() as hook:
        client = await serve(hook.url)
        ban = await call(client, "POST", "/v1/admin/bans",
                         json={"ip": IP, "duration": "1d", "reason": "project spam"},
                         expect=201)
        await call(client, "DELETE", f"/v1/admin/bans/{ban['id']}",
                   json={"reason": "false positive"})
        added, lifted = await hook.arrived(2)
        assert added.json["text"] == "alice banned an ip for 1 d: project spam"
        assert (added.json["kind"], added.json["field"]) == ("ban", "ip")
        assert lifted.json["text"] == "alice lifted a ban: false positive"
        for delivery in (added, lifted):
            assert IP.encode() not in delivery.body
            assert ban["id"].encode() not in delivery.body
            assert not contains_ip(delivery.body.decode())


async def test_a_hanging_receiver_holds_up_no_check_and_no_change(serve: Any) -> None:
    """While the only webhook hangs on an alert, checks are decided and further admin
    changes are answered; the alerts wait in the queue instead."""
    with receiver("hang") as hook:
        client = await serve(hook.url)
        await call(client, "PUT", "/v1/admin/flags/read-only", json={"enabled": True})
        await hook.arrived(1, attempts=True)  # the sender is now stuck on that request
        for _ in range(5):
            assert (await check(client, action="register", ip=IP))["reason"] == "disabled"
        await call(client, "PUT", "/v1/admin/flags/read-only", json={"enabled": False})
        assert (await check(client, action="register", ip=IP))["allowed"]
        assert hook.attempts == 1 and hook.deliveries == []


async def test_an_unreachable_receiver_is_retried_then_counted_as_dropped() -> None:
    """A webhook nobody listens on is tried ``attempts`` times, then the alert is dropped and
    counted in /metrics under reason="undelivered"; a second, working webhook still gets it."""
    metrics = Metrics()
    dead = f"http://127.0.0.1:{free_port()}/hook"
    with receiver() as alive:
        alerts = Alerts([dead, alive.url], SECRET, metrics, attempts=3, backoff=0.01)
        await alerts.start()
        try:
            alerts.send("flag", "alice turned read-only on", flag="read-only")
            await alive.arrived(1)
        finally:
            await alerts.stop(grace=5)
    assert (alerts.sent, alerts.dropped) == (1, 1)
    text = metrics.exposition()[0].decode()
    assert sample(text, "ratekeeper_alerts_dropped_total", reason="undelivered") == 1
    assert sample(text, "ratekeeper_alerts_sent_total") == 1


async def test_a_failing_receiver_is_retried_with_backoff() -> None:
    """A receiver answering 500 gets every attempt; then the alert is dropped."""
    metrics = Metrics()
    with receiver("fail") as hook:
        alerts = Alerts([hook.url], SECRET, metrics, attempts=3, backoff=0.01)
        await alerts.start()
        try:
            alerts.send("flag", "x")
            await hook.arrived(3, attempts=True)
        finally:
            await alerts.stop(grace=5)
    assert (hook.attempts, alerts.dropped) == (3, 1)


async def test_a_slow_receiver_times_out_and_a_full_queue_drops_the_newest() -> None:
    """With a receiver that never answers, each attempt ends at the timeout; alerts beyond
    the queue's size are dropped at once (reason="queue_full") rather than waited for."""
    metrics = Metrics()
    with receiver("hang") as hook:
        alerts = Alerts([hook.url], SECRET, metrics, timeout=0.2, attempts=2, backoff=0.01,
                        queue_size=2)
        await alerts.start()
        try:
            for i in range(5):  # no await between them: the sender has taken none yet
                alerts.send("flag", f"alert {i}")
            assert alerts.dropped == 3
            await hook.arrived(2, attempts=True)  # the first alert, tried twice
        finally:
            await alerts.stop(grace=0.1)
    text = metrics.exposition()[0].decode()
    assert sample(text, "ratekeeper_alerts_dropped_total", reason="queue_full") == 3


async def test_unsigned_without_a_secret() -> None:
    """Without RATEKEEPER_WEBHOOK_SECRET the body is posted without a signature header."""
    with receiver() as hook:
        alerts = Alerts([hook.url], b"", None)
        await alerts.start()
        try:
            alerts.send("flag", "x")
            (delivery,) = await hook.arrived(1)
        finally:
            await alerts.stop()
    assert "Ratekeeper-Signature" not in delivery.headers


def test_the_signature_is_hmac_sha256_of_the_body() -> None:
    """``sign`` is "sha256=" and the hex HMAC-SHA256 of the body under the secret."""
    assert sign(b"key", b"The quick brown fox jumps over the lazy dog") == (
        "sha256=f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8")


async def test_the_breaker_opening_and_closing_are_alerted_once_each() -> None:
    """The breaker watch alerts when the circuit leaves closed (open or probing) and when it
    closes again, once per change however often it looks."""
    with receiver() as hook:
        alerts = Alerts([hook.url], SECRET, None)
        await alerts.start()
        try:
            watch = BreakerWatch(alerts)
            for state in ("closed", "open", "half-open", "open", "closed", "closed"):
                watch.look(state)
            opened, closed = await hook.arrived(2)
        finally:
            await alerts.stop()
    assert (opened.json["kind"], opened.json["state"]) == ("breaker", "open")
    assert (closed.json["kind"], closed.json["state"]) == ("breaker", "closed")
    assert "fail modes" in opened.json["text"]


async def test_the_breaker_of_a_running_server_alerts_when_redis_stops(
        make_client: Callable[..., Any], lone_redis: RedisServer, key_prefix: str) -> None:
    """A server whose Redis stops answering alerts that its circuit opened; once Redis is
    back and a check reaches it, it alerts that the circuit closed."""
    with receiver() as hook:
        settings = admin_settings(lone_redis.url, key_prefix, webhook_secret=SECRET,
                                  redis_timeout_ms=200)
        client = await make_client(with_hooks(hook.url), app_settings=settings)
        lone_redis.pause()
        try:
            for _ in range(8):  # failures in a row open the circuit
                assert (await check(client, action="register", ip=IP))["degraded"]
            (opened,) = await hook.arrived(1)
        finally:
            lone_redis.resume()
        assert opened.json["state"] == "open"

        async def decided_by_redis() -> bool:
            return not (await check(client, action="register", ip=IP))["degraded"]

        await wait_until(decided_by_redis, timeout=10)
        _, closed = await hook.arrived(2)
        assert closed.json["state"] == "closed"
