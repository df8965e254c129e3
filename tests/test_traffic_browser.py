"""A spam wave against a real `ratekeeper serve` (two workers, real Redis), watched in a real
headless Chromium: the tripwire trips, its kill switch turns on and off by itself, the
webhook gets a signed alert without an IP, the audit trail shows the trip, and the admin
page's live chart shows the wave without the page being reloaded.

Set RATEKEEPER_TRAFFIC_SCREENSHOT=docs/traffic.png to keep the screenshot of the page.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from playwright.sync_api import BrowserContext, Page, expect

from ratekeeper.identity.keys import Keyspace, contains_ip

from support.admin import ALICE_TOKEN, SALT
from support.common import EXAMPLE
from support.processes import ServerProcess
from support.redis_servers import RedisServer
from support.webhooks import Receiver, receiver, signed_by

SECRET = "webhook-secret-for-the-browser-test"
FLAG = "disallow-new-project-registration"
WIRE = """
[tripwires.project-flood]
action = "project-create"
count = "allowed"
threshold = "30 per 10 minutes"
flag = "disallow-new-project-registration"
duration = "{duration}"

[tripwires.register-watch]
action = "register"
count = "denied"
threshold = "50 per 10 minutes"
flag = "disallow-new-user-registration"
duration = "1 hour"
shadow = true

[alerts]
webhooks = ["{hook}"]
"""
Serve = Callable[..., ServerProcess]


@pytest.fixture
def hook() -> Iterator[Receiver]:
    """A webhook receiver that answers."""
    with receiver() as made:
        yield made


def start(serve_process: Serve, redis_server: RedisServer, key_prefix: str, hook: Receiver,
          duration: str) -> ServerProcess:
    """`ratekeeper serve` (2 workers) of the example config with the tripwires above."""
    env = {"RATEKEEPER_REDIS_URL": redis_server.url, "RATEKEEPER_IP_SALT": SALT.decode(),
           "RATEKEEPER_KEY_PREFIX": key_prefix,
           "RATEKEEPER_ADMIN_TOKENS": f"alice:{ALICE_TOKEN}",
           "RATEKEEPER_WEBHOOK_SECRET": SECRET, "RATEKEEPER_SYNC_INTERVAL_MS": "200"}
    config = EXAMPLE.read_text() + WIRE.format(duration=duration, hook=hook.url)
    return serve_process(config, env, workers=2)


def post(server: ServerProcess, path: str, body: Any, token: bool = False) -> Any:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {ALICE_TOKEN}"
    request = urllib.request.Request(server.url + path, data=json.dumps(body).encode(),
                                     headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def get(server: ServerProcess, path: str) -> Any:
    request = urllib.request.Request(server.url + path,
                                     headers={"Authorization": f"Bearer {ALICE_TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def create(server: ServerProcess, n: int) -> dict[str, Any]:
    """One project creation by spammer ``n`` (its own user and IPv6 /64)."""
    decision: dict[str, Any] = post(server, "/v1/check", {
        "action": "project-create", "ip": f"2001:db8:{n:x}::1", "user": f"spam{n}"})
    return decision


def wave(server: ServerProcess, first: int, count: int) -> list[dict[str, Any]]:
    """``count`` project creations by as many spammers."""
    return [create(server, n) for n in range(first, first + count)]


def poll(what: Callable[[], bool], timeout: float) -> None:
    """Until ``what()`` holds (a server's background work, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s")
        time.sleep(0.05)


def sign_in(page: Page, server: ServerProcess) -> None:
    page.goto(server.url + "/admin")
    page.fill("#token", ALICE_TOKEN)
    page.click("button[type=submit]")
    expect(page).to_have_url(server.url + "/admin")


def test_a_spam_wave_trips_the_wire_and_the_live_chart_shows_it(
        serve_process: Serve, redis_server: RedisServer, key_prefix: str, hook: Receiver,
        context: BrowserContext) -> None:
    """Forty project creations in a few seconds against a wire of 30 per 10 minutes: the
    flag turns on by itself and later creations are disabled; the webhook gets one signed
    alert naming the wire, without any IP; the audit trail shows the trip by
    tripwire:project-flood with its count; the page open before the wave shows it in its
    chart and the wire as tripped without being reloaded; after the wire's 6 seconds the
    flag turns itself off and creations are allowed again."""
    server = start(serve_process, redis_server, key_prefix, hook, "6s")
    page = context.new_page()
    sign_in(page, server)
    frame = page.frame_locator("iframe.live")
    expect(frame.locator("main#live")).to_contain_text("No decisions in the last hour")
    expect(page.locator("#tripwire-project-flood .badge")).to_have_text("armed")

    decisions = wave(server, 1, 40)
    assert all(d["allowed"] or d["reason"] == "disabled" for d in decisions)
    poll(lambda: create(server, 100)["reason"] == "disabled", timeout=10)
    assert create(server, 101)["flag"] == FLAG

    (alert,) = hook.wait_for(1)
    assert signed_by(SECRET.encode(), alert)
    body = alert.json
    assert (body["kind"], body["tripwire"], body["flag"]) == ("tripwire", "project-flood", FLAG)
    assert body["count"] >= 30 and "project-flood tripped" in body["text"]
    assert not contains_ip(alert.body.decode()) and b"2001:db8" not in alert.body
    events = get(server, "/v1/admin/audit")["events"]
    trip = next(e for e in events if e["kind"] == "tripwire")
    assert (trip["actor"], trip["target"]) == ("tripwire:project-flood", FLAG)
    assert trip["detail"]["count"] >= 30

    # the frame reloads by itself: the chart shows the wave, the wire its trip
    chart = frame.locator("#chart-project-create")
    expect(frame.locator("#wire-project-flood .badge")).to_have_text("TRIPPED",
                                                                     timeout=15_000)
    poll(lambda: int(chart.get_attribute("data-total") or 0) >= 42, timeout=15)
    expect(chart.locator("rect.k-allowed")).not_to_have_count(0)
    expect(chart.locator("rect.k-disabled")).not_to_have_count(0)
    assert not contains_ip(frame.locator("body").inner_text())

    poll(lambda: bool(create(server, 200)["allowed"]), timeout=15)
    flags = {f["name"]: f for f in get(server, "/v1/admin/flags")["flags"]}
    assert not flags[FLAG]["enabled"]
    # the resync that notices the expiry first records it (once, whichever process)
    poll(lambda: get(server, "/v1/admin/audit")["events"][0]["kind"] == "flag-expired", 5)
    kinds = [e["kind"] for e in get(server, "/v1/admin/audit")["events"]]
    assert kinds == ["flag-expired", "tripwire"]


def test_disarm_from_the_page_stops_a_trip(
        serve_process: Serve, redis_server: RedisServer, key_prefix: str, hook: Receiver,
        context: BrowserContext) -> None:
    """Disarmed from the page (with a reason), the wire lets a wave through; the page, the
    admin API and the audit trail say who disarmed it; re-armed from the page, the next
    creation trips it."""
    server = start(serve_process, redis_server, key_prefix, hook, "1 hour")
    page = context.new_page()
    sign_in(page, server)
    row = page.locator("#tripwire-project-flood")
    row.locator("input[name=reason]").fill("import of a mirror")
    row.get_by_role("button", name="Disarm").click()
    expect(page.locator("#outcome.ok")).to_have_text("project-flood is disarmed.")
    expect(row.locator(".badge")).to_have_text("disarmed")
    expect(row).to_contain_text("alice: import of a mirror")
    assert all(d["allowed"] for d in wave(server, 1, 35))
    wires = {w["name"]: w for w in get(server, "/v1/admin/tripwires")["tripwires"]}
    poll(lambda: get(server, "/v1/admin/tripwires")["tripwires"][0]["seen"] >= 35, 10)
    assert not wires["project-flood"]["armed"]
    row.get_by_role("button", name="Re-arm").click()
    expect(page.locator("#outcome.ok")).to_have_text("project-flood is armed.")
    create(server, 500)
    poll(lambda: create(server, 501)["reason"] == "disabled", timeout=10)
    kinds = [(e["kind"], e["actor"]) for e in get(server, "/v1/admin/audit")["events"]]
    assert kinds == [("tripwire", "tripwire:project-flood"), ("tripwire-arm", "alice"),
                     ("tripwire-disarm", "alice")]
    texts = [d.json["text"] for d in hook.wait_for(3)]
    assert texts[0] == "alice disarmed tripwire project-flood: import of a mirror"
    assert texts[1] == "alice re-armed tripwire project-flood"


def test_screenshot_of_a_spam_wave(serve_process: Serve, redis_server: RedisServer,
                                   key_prefix: str, hook: Receiver, context: BrowserContext,
                                   tmp_path: Path) -> None:
    """The page during a spam wave, in a laptop-sized window: the last half hour's ordinary
    traffic (seeded into the shared minute counts, as the servers' flushes would have left
    it) and a live wave of project creations, rate limited and boxed, that trips the wire.
    The screenshot is kept when RATEKEEPER_TRAFFIC_SCREENSHOT names a file."""
    server = start(serve_process, redis_server, key_prefix, hook, "1 hour")
    keys = Keyspace(SALT, prefix=key_prefix)
    client = redis.Redis.from_url(redis_server.url)
    now = int(time.time() // 60)
    for ago in range(1, 31):
        fields = {"project-create|allowed": 2 + ago % 3, "upload|allowed": 20 + (ago * 7) % 11,
                  "login|allowed": 30 + (ago * 5) % 13, "login|limited": ago % 4,
                  "rule|login-ip|limited": ago % 4}
        client.hset(keys.traffic_minute_key(now - ago), mapping=fields)
        client.expire(keys.traffic_minute_key(now - ago), 3700)
    client.close()
    for n in range(1, 33):  # a wave that trips the wire
        create(server, n)
    for n in range(1, 9):  # the same spammers again and again: limited, then boxed
        for _ in range(6):
            create(server, n)
    for i in range(12):
        post(server, "/v1/check", {"action": "login", "ip": f"198.51.100.{i}",
                                   "user": f"user{i}"})
    poll(lambda: create(server, 900)["reason"] == "disabled", timeout=10)
    page = context.new_page()
    sign_in(page, server)
    frame = page.frame_locator("iframe.live")
    expect(frame.locator("#chart-project-create rect.k-boxed")).not_to_have_count(0,
                                                                                 timeout=15_000)
    expect(frame.locator("#wire-project-flood .badge")).to_have_text("TRIPPED")
    expect(page.locator("#flag-disallow-new-project-registration .badge")).to_have_text("ON")
    assert not contains_ip(page.locator("body").inner_text())
    shot = tmp_path / "traffic.png"
    top, bottom = page.locator("#traffic").bounding_box(), page.locator("#tripwires").bounding_box()
    assert top is not None and bottom is not None
    margin = 12
    page.screenshot(path=str(shot), full_page=True, clip={
        "x": top["x"] - margin, "y": top["y"] - margin, "width": top["width"] + 2 * margin,
        "height": bottom["y"] + bottom["height"] - top["y"] + 2 * margin})
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    keep = os.environ.get("RATEKEEPER_TRAFFIC_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)


def test_the_frame_is_framed_only_by_this_site(
        serve_process: Serve, redis_server: RedisServer, key_prefix: str,
        hook: Receiver) -> None:
    """The live picture answers only a signed-in session, may be framed by this site alone,
    and carries no form and no script."""
    server = start(serve_process, redis_server, key_prefix, hook, "1 hour")
    try:
        urllib.request.urlopen(server.url + "/admin/traffic", timeout=10)
        raise AssertionError("answered without a session")
    except urllib.error.HTTPError as exc:
        assert exc.code == 401
        csp = exc.headers["Content-Security-Policy"]
    assert "frame-ancestors 'self'" in csp and "script-src" not in csp
    assert "form-action 'none'" in csp
