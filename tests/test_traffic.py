"""The shared traffic picture against real Redis: every decision lands in its category
(penalty-boxed apart from rate-limited), two servers' counts add up, the admin API and the
page's frame show them, and the chart is plain server-drawn SVG."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from ratekeeper.admin.web.traffic import chart
from ratekeeper.control.traffic import MINUTES, category

from support.admin import CONFIG, admin_of, admin_settings, call, check
from support.redis_servers import RedisServer

IP = "198.51.100.61"


@pytest.fixture
def start(make_client: Callable[..., Any], redis_server: RedisServer,
          key_prefix: str) -> Callable[..., Any]:
    """A server of the admin tests' config on this test's keys."""
    return lambda: make_client(CONFIG, app_settings=admin_settings(redis_server.url,
                                                                   key_prefix))


@pytest.mark.parametrize(("rule", "outcome", "expected"), [
    ("", "allowed", "allowed"), ("r", "shadow", "allowed"), ("r", "rate_limited", "limited"),
    ("r", "banned", "boxed"), ("", "banned", "banned"), ("", "disabled", "disabled"),
    ("", "degraded", "degraded")])
def test_each_outcome_has_one_category(rule: str, outcome: str, expected: str) -> None:
    """A penalty box (a ban naming its rule) is apart from an admin's ban and from a rule's
    window; shadow-mode denials let the request through."""
    assert category(rule, outcome) == expected


async def test_two_servers_counts_add_up_by_category(start: Callable[..., Any]) -> None:
    """Decisions of two servers on one Redis are one picture: allowed, rate limited, boxed,
    banned and switched off per action, and the rules that denied, each category apart."""
    one, two = await start(), await start()
    for client in (one, two):
        for _ in range(3):
            await check(client, action="everything", ip=IP)
    for _ in range(4):  # 2 allowed, then the penalty box's rule denies, then the box
        await check(one, action="create", ip=IP)
    await call(one, "PUT", "/v1/admin/flags/read-only", json={"enabled": True})
    await check(two, action="register", ip="198.51.100.62")
    await call(one, "POST", "/v1/admin/bans", json={"user": "mallory", "duration": 60},
               expect=201)
    await check(one, action="login", ip=IP, user="mallory")
    for client in (one, two):
        await admin_of(client).tripwires.flush()
    picture = await call(two, "GET", "/v1/admin/traffic")
    actions = {a["action"]: {k: sum(v) for k, v in a["minutes"].items()}
               for a in picture["actions"]}
    assert actions["everything"] == {"allowed": 6}
    assert actions["create"] == {"allowed": 2, "limited": 1, "boxed": 1}
    assert actions["register"] == {"disabled": 1}
    assert actions["login"] == {"banned": 1}
    assert picture["rules"] == {"boxed": {"limited": 1, "boxed": 1}}
    assert all(len(v) == MINUTES for a in picture["actions"] for v in a["minutes"].values())


async def test_the_frame_draws_the_picture_as_svg(start: Callable[..., Any]) -> None:
    """Signed in, /admin/traffic is a page that reloads itself, only this site may frame,
    with one SVG chart per busy action and no script; signed out it is a 401."""
    client = await start()
    for _ in range(5):
        await check(client, action="create", ip=IP)
    await admin_of(client).tripwires.flush()
    assert (await client.get("/admin/traffic")).status == 401
    form = await client.get("/admin/signin")
    csrf = re.search(r'name="csrf" value="([^"]+)"', await form.text())
    assert csrf is not None
    await client.post("/admin/signin", data={"csrf": csrf[1],
                                             "token": "alice-secret-token-4f1c9e"},
                      allow_redirects=False)
    response = await client.get("/admin/traffic")
    html = await response.text()
    assert response.status == 200
    assert "frame-ancestors 'self'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Frame-Options"] == "SAMEORIGIN"
    assert '<meta http-equiv="refresh" content="5">' in html
    assert "<script" not in html and "style=" not in html
    assert 'id="chart-create"' in html and 'class="k-boxed"' in html
    assert IP not in html
    page = await (await client.get("/admin")).text()
    assert '<iframe src="/admin/traffic"' in page


def test_bars_stack_in_a_round_scale() -> None:
    """A minute's bar stacks its categories bottom up; the scale's top is the first of 1, 2,
    5, 10, 20, 50... at or above the busiest minute; empty minutes draw nothing."""
    series = {"allowed": [0] * MINUTES, "limited": [0] * MINUTES}
    series["allowed"][-1], series["limited"][-1] = 30, 12
    series["allowed"][0] = 5
    drawn = chart("upload", series)
    assert (drawn.peak, drawn.total, drawn.denied) == (50, 47, 12)
    last = [s for s in drawn.segments if s.minute == 0]
    assert [s.kind for s in last] == ["allowed", "limited"]
    assert last[1].y + last[1].height == pytest.approx(last[0].y)
    assert last[0].y + last[0].height == drawn.base
    assert len(drawn.segments) == 3
