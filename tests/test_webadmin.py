"""The admin page over HTTP against real Redis: sessions, CSRF, viewers, changes, health.

The browser tests (test_webadmin_browser.py) drive the same page in Chromium; these check
each rule of the page directly, with the exact requests a browser or an attacker would send.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from ratekeeper.admin.web.common import WEBADMIN
from ratekeeper.admin.web.session import SESSION_COOKIE, SESSION_SECONDS, SIGNIN_COOKIE
from ratekeeper.settings import AdminToken

from support.admin import (
    ALICE_TOKEN,
    CONFIG,
    VICTOR_TOKEN,
    admin_settings,
    call,
    check,
    dump,
    keys_under,
    runtime_of,
    wait_until,
)
from support.common import FakeClock
from support.redis_servers import RedisServer, start_redis

IP = "198.51.100.23"
CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')
Client = TestClient[Any, Any]


@pytest.fixture
def settings_for(redis_server: RedisServer, key_prefix: str) -> Callable[..., Any]:
    """Admin settings on the session's Redis with this test's prefix."""
    return lambda **overrides: admin_settings(redis_server.url, key_prefix, **overrides)


@pytest.fixture
async def client(make_client: Callable[..., Any], settings_for: Callable[..., Any]) -> Client:
    """The service with alice (admin) and victor (viewer) tokens."""
    made: Client = await make_client(CONFIG, app_settings=settings_for())
    return made


def csrf_of(html: str) -> str:
    """The CSRF token of the first form on a page."""
    found = CSRF_RE.search(html)
    assert found, html
    return found.group(1)


async def sign_in(client: Client, token: str = ALICE_TOKEN) -> str:
    """Sign in through the form; the CSRF token of the admin page it lands on."""
    form = await client.get("/admin/signin")
    response = await client.post("/admin/signin", allow_redirects=False,
                                 data={"csrf": csrf_of(await form.text()), "token": token})
    assert response.status == 303, await response.text()
    assert response.headers["Location"] == "/admin"
    page = await client.get("/admin", allow_redirects=False)
    assert page.status == 200
    return csrf_of(await page.text())


async def page(client: Client) -> str:
    """The admin page's HTML (signed in)."""
    response = await client.get("/admin", allow_redirects=False)
    assert response.status == 200, response.status
    return await response.text()


async def post(client: Client, path: str, data: dict[str, str], *, expect: int = 303,
               headers: dict[str, str] | None = None) -> str:
    """A form post; asserts the status and returns the body."""
    response = await client.post(path, data=data, headers=headers, allow_redirects=False)
    text = await response.text()
    assert response.status == expect, f"{path}: {response.status} {text}"
    if expect == 303:
        assert response.headers["Location"].startswith("/admin")
    return text


async def flags(client: Client) -> dict[str, Any]:
    """Every flag's state through the admin API."""
    body = await call(client, "GET", "/v1/admin/flags")
    return {flag["name"]: flag for flag in body["flags"]}


async def audit(client: Client) -> list[dict[str, Any]]:
    """The audit trail through the admin API."""
    events: list[dict[str, Any]] = (await call(client, "GET", "/v1/admin/audit"))["events"]
    return events


# -- signing in and out ----------------------------------------------------------------------

async def test_sign_in_sets_a_strict_httponly_cookie_and_keeps_no_token(
        client: Client, redis: aioredis.Redis, key_prefix: str) -> None:
    """Unsigned visitors are sent to the form; a good token starts a session whose cookie is
    HttpOnly and SameSite=Strict (not Secure over plain HTTP), lives 8 hours in Redis under a
    hash of its id, and neither the token nor the session id is anywhere in Redis."""
    first = await client.get("/admin", allow_redirects=False)
    assert (first.status, first.headers["Location"]) == (303, "/admin/signin")
    form = await client.get("/admin/signin")
    signin_cookie = form.cookies[SIGNIN_COOKIE]
    assert signin_cookie["httponly"] and signin_cookie["samesite"] == "Strict"
    response = await client.post("/admin/signin", allow_redirects=False,
                                 data={"csrf": csrf_of(await form.text()), "token": ALICE_TOKEN})
    assert response.status == 303
    cookie = response.cookies[SESSION_COOKIE]
    assert cookie["httponly"] is True and cookie["samesite"] == "Strict"
    assert not cookie["secure"] and cookie["path"] == "/admin"
    session_keys = [k for k in await keys_under(redis, key_prefix) if b"{session}" in k]
    assert len(session_keys) == 1
    ttl = await redis.ttl(session_keys[0])
    assert SESSION_SECONDS - 60 < ttl <= SESSION_SECONDS
    blob = await dump(redis, key_prefix)
    assert ALICE_TOKEN.encode() not in blob
    assert cookie.value.encode() not in blob
    html = await page(client)
    assert "alice" in html and "Sign out" in html and "Turn on" in html


@pytest.mark.parametrize("token", ["", "wrong-token", ALICE_TOKEN + "x", f"Bearer {ALICE_TOKEN}"])
async def test_a_wrong_token_starts_no_session(client: Client, token: str,
                                               redis: aioredis.Redis, key_prefix: str) -> None:
    """Empty, unknown or mangled tokens are sent back to the form with a fixed message."""
    form = await client.get("/admin/signin")
    response = await client.post("/admin/signin", allow_redirects=False,
                                 data={"csrf": csrf_of(await form.text()), "token": token})
    assert (response.status, response.headers["Location"]) == (303, "/admin/signin?note=failed")
    assert SESSION_COOKIE not in response.cookies
    assert not [k for k in await keys_under(redis, key_prefix) if b"{session}" in k]
    again = await client.get("/admin/signin?note=failed")
    assert "That token was not accepted." in await again.text()


@pytest.mark.parametrize("case", ["no-csrf", "wrong-csrf", "other-origin", "cross-site"])
async def test_sign_in_form_is_csrf_protected(client: Client, case: str) -> None:
    """The sign-in form needs its double-submit token and a same-origin post."""
    form = await client.get("/admin/signin")
    data = {"csrf": csrf_of(await form.text()), "token": ALICE_TOKEN}
    headers: dict[str, str] = {}
    if case == "no-csrf":
        del data["csrf"]
    elif case == "wrong-csrf":
        data["csrf"] = "x" * 43
    elif case == "other-origin":
        headers["Origin"] = "http://evil.example"
    else:
        headers["Sec-Fetch-Site"] = "cross-site"
    text = await post(client, "/admin/signin", data, expect=403, headers=headers)
    assert "Sign-in refused" in text
    assert (await client.get("/admin", allow_redirects=False)).status == 303


async def test_secure_cookie_behind_a_trusted_tls_proxy(
        make_client: Callable[..., Any], settings_for: Callable[..., Any]) -> None:
    """X-Forwarded-Proto: https from a trusted proxy (loopback) makes the cookie Secure; from
    an untrusted peer the header is ignored."""
    for trusted, secure in ((("127.0.0.0/8",), True), (("10.0.0.0/8",), False)):
        nets = tuple(ipaddress.ip_network(n) for n in trusted)
        client = await make_client(CONFIG, app_settings=settings_for(trusted_proxies=nets))
        headers = {"X-Forwarded-Proto": "https"}
        if secure:
            headers["Origin"] = f"https://{client.host}:{client.port}"
        form = await client.get("/admin/signin", headers=headers)
        signin_cookie = form.cookies[SIGNIN_COOKIE]
        assert bool(signin_cookie["secure"]) is secure
        # the test client keeps Secure cookies to itself over plain HTTP: send it by hand
        headers["Cookie"] = f"{SIGNIN_COOKIE}={signin_cookie.value}"
        response = await client.post(
            "/admin/signin", allow_redirects=False, headers=headers,
            data={"csrf": csrf_of(await form.text()), "token": ALICE_TOKEN})
        assert response.status == 303, await response.text()
        assert bool(response.cookies[SESSION_COOKIE]["secure"]) is secure


async def test_sign_out_ends_the_session_everywhere(client: Client, redis: aioredis.Redis,
                                                    key_prefix: str) -> None:
    """After signing out, the old cookie is worthless: its record is gone from Redis."""
    csrf = await sign_in(client)
    old = client.session.cookie_jar.filter_cookies(client.make_url("/admin"))[SESSION_COOKIE]
    response = await client.post("/admin/signout", data={"csrf": csrf}, allow_redirects=False)
    assert response.headers["Location"] == "/admin/signin?note=signed-out"
    assert not [k for k in await keys_under(redis, key_prefix) if b"{session}" in k]
    replay = await client.get("/admin", allow_redirects=False,
                              headers={"Cookie": f"{SESSION_COOKIE}={old.value}"})
    assert (replay.status, replay.headers["Location"]) == (303, "/admin/signin")


async def test_signing_in_again_replaces_the_session(client: Client, redis: aioredis.Redis,
                                                     key_prefix: str) -> None:
    """A new sign-in gets a new session id (no fixation) and ends the one before it."""
    await sign_in(client)
    first = client.session.cookie_jar.filter_cookies(client.make_url("/admin"))[SESSION_COOKIE]
    # a signed-in browser is sent past the form, so post the double-submit pair directly
    pair = "k" * 43
    response = await client.post("/admin/signin", allow_redirects=False,
                                 headers={"Cookie": f"{SIGNIN_COOKIE}={pair}; "
                                                    f"{SESSION_COOKIE}={first.value}"},
                                 data={"csrf": pair, "token": ALICE_TOKEN})
    assert response.status == 303
    assert response.cookies[SESSION_COOKIE].value != first.value
    assert len([k for k in await keys_under(redis, key_prefix) if b"{session}" in k]) == 1


async def test_sign_out_needs_the_sessions_csrf_token(client: Client) -> None:
    """A forged sign-out post (wrong token) is refused and the session goes on."""
    await sign_in(client)
    await post(client, "/admin/signout", {"csrf": "forged"}, expect=403)
    await page(client)


async def test_a_session_expires(client: Client) -> None:
    """Sessions end by themselves (a 1-second session here; 8 hours by default)."""
    client.app[WEBADMIN].sessions.seconds = 1  # type: ignore[index]
    await sign_in(client)

    async def ended() -> bool:
        response = await client.get("/admin", allow_redirects=False)
        return response.status == 303

    await wait_until(ended, timeout=5)


async def test_a_removed_token_ends_its_sessions(
        make_client: Callable[..., Any], settings_for: Callable[..., Any]) -> None:
    """A session made with a token that is no longer configured (or was replaced) is over."""
    first = await make_client(CONFIG, app_settings=settings_for())
    await sign_in(first)
    cookie = first.session.cookie_jar.filter_cookies(first.make_url("/admin"))[SESSION_COOKIE]
    rotated = settings_for(admin_tokens=(AdminToken("alice", "a-brand-new-token-123"),))
    second = await make_client(CONFIG, app_settings=rotated)
    response = await second.get("/admin", allow_redirects=False,
                                headers={"Cookie": f"{SESSION_COOKIE}={cookie.value}"})
    assert response.status == 303
    still = await first.get("/admin", allow_redirects=False)  # deleted for every process
    assert still.status == 303


# -- changes through the page ----------------------------------------------------------------

async def test_flag_on_and_off_from_the_page(client: Client) -> None:
    """A flag turned on from the page blocks its actions, with the message, and is audited
    with the signed-in name; turning it off is audited too; each post redirects to the page,
    whose next view says what happened once."""
    csrf = await sign_in(client)
    await post(client, "/admin/flags/read-only", {
        "csrf": csrf, "enabled": "on", "message": "Back soon.", "reason": "maintenance",
        "expires_in": "2h"})
    decision = await check(client, action="register", ip=IP)
    assert (decision["reason"], decision["flag"], decision["message"]) == (
        "disabled", "read-only", "Back soon.")
    state = (await flags(client))["read-only"]
    assert state["enabled"] and state["updated_by"] == "alice"
    assert 7190 < state["expires_at"] - state["updated_at"] <= 7200
    event = (await audit(client))[0]
    assert (event["actor"], event["kind"], event["target"], event["reason"]) == (
        "alice", "flag", "read-only", "maintenance")
    assert event["detail"] == {"enabled": True, "expires_in": 7200, "message": "Back soon."}
    html = await page(client)
    assert "read-only is on for 2 h." in html
    assert "read-only is on for" not in await page(client)  # said once
    await post(client, "/admin/flags/read-only", {"csrf": csrf, "enabled": "off",
                                                  "reason": "done"})
    assert (await check(client, action="register", ip=IP))["allowed"]
    assert (await audit(client))[0]["detail"] == {"enabled": False}


@pytest.mark.parametrize(("form", "said"), [
    ({"enabled": "on", "expires_in": "soon"}, "the expiry must be a duration"),
    ({"enabled": "on", "reason": f"from {IP}"}, "reason must not contain an IP address"),
    ({"enabled": "on", "message": ALICE_TOKEN}, "message must not contain an admin token"),
    ({"enabled": "maybe"}, "say whether to turn the flag on or off"),
    ({"enabled": "on", "message": "x" * 1001}, "Expected `str` of length &lt;= 1000"),
])
async def test_bad_flag_forms_change_nothing(client: Client, form: dict[str, str],
                                             said: str) -> None:
    """The page validates with the API's rules: a bad form is a message, nothing changes,
    and the message never repeats an IP or a token."""
    csrf = await sign_in(client)
    await post(client, "/admin/flags/read-only", {"csrf": csrf, **form})
    assert not (await flags(client))["read-only"]["enabled"]
    assert await audit(client) == []
    html = await page(client)
    assert said in html and "Nothing was changed" in html
    assert IP not in html and ALICE_TOKEN not in html


async def test_unknown_flag(client: Client) -> None:
    """A post for a flag the config does not declare changes nothing."""
    csrf = await sign_in(client)
    await post(client, "/admin/flags/no-such-flag", {"csrf": csrf, "enabled": "on"})
    assert "there is no such flag" in await page(client)
    assert await audit(client) == []


async def test_ban_and_lift_from_the_page(client: Client, redis: aioredis.Redis,
                                          key_prefix: str) -> None:
    """An IP banned from the page is denied and listed only by its hash (the page and Redis
    never hold the IP); lifting it from the page lets it through again, both audited."""
    csrf = await sign_in(client)
    await post(client, "/admin/bans", {"csrf": csrf, "field": "ip", "value": IP,
                                       "duration": "1d", "reason": "spam"})
    assert (await check(client, action="register", ip=IP))["reason"] == "banned"
    bans = (await call(client, "GET", "/v1/admin/bans"))["bans"]
    assert [(b["field"], b["created_by"], b["reason"]) for b in bans] == [("ip", "alice", "spam")]
    ban_id = bans[0]["id"]
    html = await page(client)
    assert ban_id in html and IP not in html
    assert f"Banned ip {ban_id} for 1 d." in html
    assert IP.encode() not in await dump(redis, key_prefix)
    await post(client, f"/admin/bans/{ban_id}/lift", {"csrf": csrf, "reason": "false positive"})
    assert (await check(client, action="register", ip=IP))["allowed"]
    kinds = [(e["kind"], e["actor"], e["target"]) for e in await audit(client)]
    assert kinds == [("lift", "alice", f"ban:{ban_id}"), ("ban", "alice", f"ban:{ban_id}")]
    assert f"Lifted the ban on {ban_id}." in await page(client)


@pytest.mark.parametrize(("form", "said"), [
    ({"field": "ip", "value": "not-an-ip", "duration": "1d"}, "ip is not a valid"),
    ({"field": "ip", "value": IP, "duration": "forever"}, "the duration must be a duration"),
    ({"field": "ip", "value": IP, "duration": "0"}, "at least one second"),
    ({"field": "password", "value": "x", "duration": "1d"}, "choose what kind of subject"),
    ({"field": "user", "value": "", "duration": "1d"}, "give the user to ban"),
    ({"field": "user", "value": "bob", "duration": "1d", "reason": f"seen at {IP}"},
     "reason must not contain an IP address"),
])
async def test_bad_ban_forms_change_nothing(client: Client, form: dict[str, str],
                                            said: str, redis: aioredis.Redis,
                                            key_prefix: str) -> None:
    """Bad ban forms are explained (without repeating an IP, in the page or in the message
    the session keeps in Redis), ban nothing and record nothing."""
    csrf = await sign_in(client)
    await post(client, "/admin/bans", {"csrf": csrf, **form})
    assert (await call(client, "GET", "/v1/admin/bans"))["bans"] == []
    assert await audit(client) == []
    assert IP.encode() not in await dump(redis, key_prefix)
    html = await page(client)
    assert said in html and IP not in html


async def test_lifting_an_unknown_ban(client: Client) -> None:
    """Lifting a ban that is not there says so and records nothing."""
    csrf = await sign_in(client)
    await post(client, "/admin/bans/AAAAAAAAAAAAAAAAAAAAAA/lift", {"csrf": csrf})
    assert "already ended or been lifted" in await page(client)
    await post(client, "/admin/bans/not-a-hash/lift", {"csrf": csrf})
    assert "22-character subject hash" in await page(client)
    assert await audit(client) == []


async def test_top_list_with_a_ban_button(client: Client) -> None:
    """The most-limited subjects show per rule by hash, with a ban form for single-field rules
    that bans exactly that subject."""
    csrf = await sign_in(client)
    for _ in range(6):
        await check(client, action="register", ip=IP)  # per-ip: 3 per minute
    html = await page(client)
    top = (await call(client, "GET", "/v1/admin/top?rule=per-ip"))["subjects"]
    assert top and top[0]["denied"] == 3
    subject = top[0]["subject"]
    assert subject in html and "Ban ip" in html and IP not in html
    await post(client, "/admin/bans", {"csrf": csrf, "field": "subject_hash", "value": subject,
                                       "duration": "1h", "reason": "most limited by per-ip"})
    assert (await check(client, action="login", ip=IP, user="x"))["reason"] == "banned"


# -- refusals --------------------------------------------------------------------------------

FORGERIES = {
    "no-csrf": ({}, {}),
    "wrong-csrf": ({"csrf": "A" * 43}, {}),
    "empty-csrf": ({"csrf": ""}, {}),
    "other-origin": (None, {"Origin": "http://evil.example"}),
    "null-origin": (None, {"Origin": "null"}),
    "same-site": (None, {"Sec-Fetch-Site": "same-site"}),
    "cross-site": (None, {"Sec-Fetch-Site": "cross-site"}),
}


@pytest.mark.parametrize("case", list(FORGERIES))
async def test_forged_posts_change_nothing(client: Client, case: str,
                                           redis: aioredis.Redis, key_prefix: str) -> None:
    """Posts with a missing or wrong CSRF token, or from another origin or site (even with
    the right token), are refused with 403 and change no flag, ban or audit entry."""
    csrf = await sign_in(client)
    form, headers = FORGERIES[case]
    before = await dump(redis, key_prefix)
    payload = {"csrf": csrf} if form is None else dict(form)
    for path, fields in (("/admin/flags/read-only", {"enabled": "on"}),
                         ("/admin/bans", {"field": "user", "value": "bob", "duration": "1d"}),
                         ("/admin/bans/AAAAAAAAAAAAAAAAAAAAAA/lift", {})):
        text = await post(client, path, {**payload, **fields}, expect=403, headers=headers)
        assert "Nothing was changed" in text
    assert not (await flags(client))["read-only"]["enabled"]
    assert await audit(client) == []
    assert (await call(client, "GET", "/v1/admin/bans"))["bans"] == []
    after = await dump(redis, key_prefix)
    assert _without_sessions(before) == _without_sessions(after)


def _without_sessions(blob: bytes) -> bytes:
    return b"\n".join(line for line in blob.split(b"\n") if b"{session}" not in line
                      and b'"csrf"' not in line)


async def test_posts_without_a_session_are_refused(client: Client) -> None:
    """Without a session (never signed in, or signed out) a post is a 401 and changes
    nothing."""
    text = await post(client, "/admin/flags/read-only", {"enabled": "on", "csrf": "x"},
                      expect=401)
    assert "Not signed in" in text
    assert not (await flags(client))["read-only"]["enabled"]


async def test_viewer_sees_everything_and_changes_nothing(client: Client) -> None:
    """A viewer token signs in and sees flags, bans and audit, but no form except sign-out,
    and its posts (with its own valid CSRF token) are refused with 403."""
    await call(client, "PUT", "/v1/admin/flags/read-only", json={"enabled": True})
    await call(client, "POST", "/v1/admin/bans", json={"user": "bob", "duration": 60},
               expect=201)
    csrf = await sign_in(client, VICTOR_TOKEN)
    html = await page(client)
    assert "victor" in html and "viewer" in html and "read-only" in html
    assert html.count("<form") == 1 and "/admin/signout" in html
    assert "Turn on" not in html and "Turn off" not in html and "Lift" not in html
    ban_id = (await call(client, "GET", "/v1/admin/bans"))["bans"][0]["id"]
    assert ban_id in html
    for path, fields in (("/admin/flags/read-only", {"enabled": "off"}),
                         ("/admin/bans", {"field": "user", "value": "eve", "duration": "1d"}),
                         (f"/admin/bans/{ban_id}/lift", {})):
        text = await post(client, path, {"csrf": csrf, **fields}, expect=403)
        assert "may only read" in text
    assert (await flags(client))["read-only"]["enabled"]
    assert len((await call(client, "GET", "/v1/admin/bans"))["bans"]) == 1
    assert [e["actor"] for e in await audit(client)] == ["alice", "alice"]


# -- the page itself -------------------------------------------------------------------------

async def test_headers_assets_and_escaping(client: Client) -> None:
    """Pages carry a strict CSP and no-store; every link, form and asset points back to
    /admin (nothing from outside); the stylesheet is served; free text is escaped."""
    await call(client, "PUT", "/v1/admin/flags/read-only",
               json={"enabled": True, "message": "<script>alert(1)</script> & more"})
    await sign_in(client)
    response = await client.get("/admin")
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp
    assert "style-src 'self'" in csp and "form-action 'self'" in csp
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["X-Frame-Options"] == "DENY"
    html = await response.text()
    assert "<script" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in html
    urls = re.findall(r'(?:href|src|action)="([^"]*)"', html)
    assert urls and all(url.startswith("/admin") for url in urls), urls
    for asset, kind in (("admin.css", "text/css"), ("icon.svg", "image/svg+xml")):
        served = await client.get(f"/admin/static/{asset}")
        assert served.status == 200 and served.content_type == kind
    assert (await client.get("/admin/static/../admin.py")).status == 404


async def test_health_line_counts_decisions_per_second(
        make_client: Callable[..., Any], settings_for: Callable[..., Any],
        clock: FakeClock) -> None:
    """Decisions are counted in the process and flushed once a second into Redis; the page
    shows every process's rate over the last ten complete seconds, and Redis as reachable."""
    client = await make_client(CONFIG, clock=clock, app_settings=settings_for())
    await sign_in(client)
    for i in range(25):
        await check(client, action="signup-page", ip=f"192.0.2.{i}")
    rate = client.app[WEBADMIN].rate  # type: ignore[index]
    await rate.flush()
    clock.advance(3)
    assert rate.here() == 2.5
    assert await rate.everywhere() == 2.5
    html = await page(client)
    assert "Redis reachable (redis)" in html and "circuit closed" in html
    assert '<strong class="rate">2.5</strong> decisions/s' in html
    clock.advance(20)
    assert '<strong class="rate">0.0</strong> decisions/s' in await page(client)


async def test_redis_outage_is_a_clear_page_not_an_error(
        make_client: Callable[..., Any], key_prefix: str) -> None:
    """With Redis gone the page and its forms answer 503 with a sentence, never a 5xx error
    page from the framework, and the check API keeps answering (degraded)."""
    server = start_redis()
    try:
        client = await make_client(CONFIG, app_settings=admin_settings(server.url, key_prefix))
        csrf = await sign_in(client)
        server.stop()
        response = await client.get("/admin", allow_redirects=False)
        assert response.status == 503
        assert "Redis is unreachable" in await response.text()
        response = await client.post("/admin/flags/read-only", allow_redirects=False,
                                     data={"csrf": csrf, "enabled": "on"})
        assert response.status == 503
        assert (await check(client, action="register", ip=IP))["degraded"]
    finally:
        server.stop()


async def test_changes_announce_to_other_processes(
        make_client: Callable[..., Any], settings_for: Callable[..., Any]) -> None:
    """A flag turned on from one process's page reaches another process through the same
    pub/sub as the admin API."""
    one = await make_client(CONFIG, app_settings=settings_for())
    other = await make_client(CONFIG, app_settings=settings_for())
    csrf = await sign_in(one)
    await post(one, "/admin/flags/disallow-new-user-registration",
               {"csrf": csrf, "enabled": "on"})

    async def blocked() -> bool:
        return runtime_of(other).flags.is_on("disallow-new-user-registration", time.time())

    await wait_until(blocked)
    assert (await check(other, action="register", ip=IP))["reason"] == "disabled"


async def test_the_page_on_a_redis_cluster(make_client: Callable[..., Any],
                                           redis_cluster: Any, key_prefix: str,
                                           clock: FakeClock) -> None:
    """On a Redis Cluster: sessions, a flag, a ban, the top lists and the decision rate (one
    MGET of per-second counters that share a slot) all work from the page."""
    client = await make_client(CONFIG, clock=clock,
                               app_settings=admin_settings(redis_cluster.url, key_prefix))
    csrf = await sign_in(client)
    await post(client, "/admin/flags/read-only", {"csrf": csrf, "enabled": "on"})
    await post(client, "/admin/bans", {"csrf": csrf, "field": "user", "value": "bob",
                                       "duration": "1h"})
    for _ in range(5):
        await check(client, action="login", ip=IP, user="carol")
    rate = client.app[WEBADMIN].rate  # type: ignore[index]
    await rate.flush()
    clock.advance(3)
    assert await rate.everywhere() == 0.5
    html = await page(client)
    assert "Banned user" in html and "Redis reachable (cluster)" in html
    assert (await check(client, action="register", ip=IP))["reason"] == "disabled"
    assert (await check(client, action="login", ip="192.0.2.1", user="bob"))["reason"] == "banned"


async def _try_sign_in(client: Client, token: str, ip: str) -> Any:
    headers = {"X-Forwarded-For": ip}  # the test client's peer is loopback: a trusted proxy
    form = await client.get("/admin/signin", headers=headers)
    return await client.post("/admin/signin", allow_redirects=False, headers=headers,
                             data={"csrf": csrf_of(await form.text()), "token": token})


async def test_failed_sign_ins_are_throttled_per_client_network(
        client: Client, redis: aioredis.Redis, key_prefix: str) -> None:
    """Ten failed sign-ins from one network and it is refused (429, even with a good token)
    for the window; another network is not; the count is under a hash with a TTL."""
    attacker, neighbour, other = "2001:db8:66::1", "2001:db8:66::2", "203.0.113.50"
    for i in range(10):
        response = await _try_sign_in(client, f"guess-{i}", attacker)
        assert response.headers["Location"] == "/admin/signin?note=failed"
    for ip in (attacker, neighbour):  # the same /64
        refused = await _try_sign_in(client, ALICE_TOKEN, ip)
        assert refused.status == 429, await refused.text()
        assert 14 * 60 < int(refused.headers["Retry-After"]) <= 15 * 60
        assert "Too many failed sign-ins" in await refused.text()
        assert SESSION_COOKIE not in refused.cookies
    welcome = await _try_sign_in(client, ALICE_TOKEN, other)
    assert (welcome.status, welcome.headers["Location"]) == (303, "/admin")
    counters = [k for k in await keys_under(redis, key_prefix) if k.endswith(b":signin")]
    assert len(counters) == 1 and 0 < await redis.pttl(counters[0]) <= 15 * 60 * 1000
    blob = await dump(redis, key_prefix)
    assert b"2001:db8" not in blob and b"203.0.113" not in blob


async def test_a_good_sign_in_clears_the_failures(client: Client) -> None:
    """Nine failures then a success: the count starts over, so nine more are still answered."""
    ip = "198.51.100.77"
    for round_ in range(2):
        for i in range(9):
            response = await _try_sign_in(client, f"typo-{round_}-{i}", ip)
            assert response.headers["Location"] == "/admin/signin?note=failed"
        good = await _try_sign_in(client, ALICE_TOKEN, ip)
        assert good.status == 303 and good.headers["Location"] == "/admin"
        client.session.cookie_jar.clear()  # a signed-in browser gets the page, not the form


UNREADABLE_BODIES = [
    ("multipart/form-data", b"--x\r\n"),  # no boundary
    ("multipart/form-data; boundary=xx", b"--xx\r\nbad header line\r\n\r\nv\r\n--xx--\r\n"),
    ("application/x-www-form-urlencoded", b"csrf=%ff%fe&token=\xff"),
    ("application/x-www-form-urlencoded; charset=no-such-charset", b"csrf=x"),
]


@pytest.mark.parametrize(("content_type", "body"), UNREADABLE_BODIES,
                         ids=["no-boundary", "bad-part-header", "not-utf8", "unknown-charset"])
async def test_a_form_body_that_cannot_be_read_is_a_400_page(
        client: Client, redis: aioredis.Redis, key_prefix: str, content_type: str,
        body: bytes) -> None:
    """Every form the page takes, signed in or not, answers an unreadable body with a 400
    page that changes nothing (never a 500)."""
    for path in ("/admin/signin", "/admin/signout"):
        resp = await client.post(path, data=body, headers={"Content-Type": content_type},
                                 allow_redirects=False)
        assert resp.status == 400, (path, await resp.text())
        assert "The form could not be read" in await resp.text()
    await sign_in(client)
    before = await dump(redis, key_prefix)
    for path in ("/admin/flags/read-only", "/admin/bans",
                 "/admin/bans/AAAAAAAAAAAAAAAAAAAAAA/lift"):
        resp = await client.post(path, data=body, headers={"Content-Type": content_type},
                                 allow_redirects=False)
        assert resp.status == 400, (path, await resp.text())
    assert (await flags(client))["read-only"]["enabled"] is False
    assert await dump(redis, key_prefix) == before
