"""The admin page in a real headless Chromium (Debian's package, driven by playwright)
against a real `ratekeeper serve` and a real Redis.

One browser per module, with a fresh profile; each test gets its own context (no cookies).
Nothing downloads a browser: playwright is pointed at /usr/bin/chromium, which `make test`
installs. Set RATEKEEPER_SCREENSHOT=docs/admin.png to keep the screenshot the last test takes.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import (
    BrowserContext,
    Page,
    expect,
)

from ratekeeper.identity.keys import contains_ip

from support.admin import ALICE_TOKEN, CONFIG, SALT, VICTOR_TOKEN
from support.common import EXAMPLE
from support.processes import ServerProcess
from support.redis_servers import RedisServer

IP = "203.0.113.7"
Serve = Callable[..., ServerProcess]


@pytest.fixture
def page(context: BrowserContext) -> Page:
    """A tab in this test's context."""
    return context.new_page()


def env_for(redis_server: RedisServer, key_prefix: str) -> dict[str, str]:
    """The server's environment: real Redis, alice (admin) and victor (viewer)."""
    return {"RATEKEEPER_REDIS_URL": redis_server.url, "RATEKEEPER_IP_SALT": SALT.decode(),
            "RATEKEEPER_KEY_PREFIX": key_prefix,
            "RATEKEEPER_ADMIN_TOKENS": f"alice:{ALICE_TOKEN}",
            "RATEKEEPER_VIEWER_TOKENS": f"victor:{VICTOR_TOKEN}"}


@pytest.fixture
def server(serve_process: Serve, redis_server: RedisServer, key_prefix: str) -> ServerProcess:
    """`ratekeeper serve` with the admin tests' config."""
    return serve_process(CONFIG, env_for(redis_server, key_prefix))


def request(server: ServerProcess, method: str, path: str, body: Any = None, *,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request that follows no redirect: status, headers, body."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(server.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.build_opener(NoRedirect).open(req, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def api(server: ServerProcess, method: str, path: str, body: Any = None) -> Any:
    """An admin API call with alice's token."""
    status, _, raw = request(server, method, path, body,
                             headers={"Authorization": f"Bearer {ALICE_TOKEN}"})
    assert status < 300, (status, raw)
    return json.loads(raw)


def check(server: ServerProcess, **fields: Any) -> dict[str, Any]:
    """POST /v1/check."""
    status, _, raw = request(server, "POST", "/v1/check", fields)
    assert status == 200, raw
    decision: dict[str, Any] = json.loads(raw)
    return decision


def sign_in(page: Page, server: ServerProcess, token: str = ALICE_TOKEN) -> None:
    """Open /admin, get sent to the form, sign in, land on the page."""
    page.goto(server.url + "/admin")
    expect(page).to_have_url(server.url + "/admin/signin")
    page.fill("#token", token)
    page.click("button[type=submit]")
    expect(page).to_have_url(server.url + "/admin")
    expect(page.locator("#flags")).to_be_visible()


def no_raw_ip(page: Page) -> None:
    """Nothing on the page (text or markup) is an IP address."""
    assert not contains_ip(page.inner_text("body"))
    assert IP not in page.content()


@contextmanager
def other_site(html: str) -> Iterator[str]:
    """A page served from another origin (127.0.0.1 on another port: same site, so the
    SameSite=Strict cookie IS sent; only the CSRF token and the origin checks stand)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


def post_from_page(page: Page, action: str, fields: dict[str, str]) -> int:
    """Build a form in the open page (as someone at the devtools would) and submit it; the
    status of the answer (the browser sends its own Origin and Sec-Fetch-Site)."""
    with page.expect_navigation() as navigation:
        page.evaluate("""([action, fields]) => {
            const form = document.createElement("form");
            form.method = "post"; form.action = action;
            for (const [name, value] of Object.entries(fields)) {
                const input = document.createElement("input");
                input.type = "hidden"; input.name = name; input.value = value;
                form.appendChild(input);
            }
            document.body.appendChild(form);
            form.submit();
        }""", [action, fields])
    response = navigation.value
    assert response is not None
    return response.status


# -- the tests -------------------------------------------------------------------------------

def test_sign_in_and_turn_a_flag_on(serve_process: Serve, redis_server: RedisServer,
                                    key_prefix: str, page: Page) -> None:
    """Signed in with the admin token on a 2-worker server, turning read-only on from the
    page makes /v1/check (on either worker) deny with reason disabled and the message typed
    in; the audit trail names alice; turning it off from the page lets requests through."""
    server = serve_process(CONFIG, env_for(redis_server, key_prefix), workers=2)
    sign_in(page, server)
    row = page.locator("#flag-read-only")
    expect(row.locator(".badge")).to_have_text("off")
    row.locator("input[name=message]").fill("Back at five.")
    row.locator("input[name=reason]").fill("database migration")
    row.locator("input[name=expires_in]").fill("2h")
    row.get_by_role("button", name="Turn on").click()
    expect(page).to_have_url(server.url + "/admin#outcome")
    expect(page.locator(".flash.ok")).to_have_text("read-only is on for 2 h.")
    expect(row.locator(".badge")).to_have_text("ON")
    for _ in range(10):  # new connections, spread over both workers
        decision = check(server, action="register", ip=IP)
        assert (decision["reason"], decision["flag"], decision["message"]) == (
            "disabled", "read-only", "Back at five.")
    event = api(server, "GET", "/v1/admin/audit")["events"][0]
    assert (event["actor"], event["kind"], event["target"], event["reason"]) == (
        "alice", "flag", "read-only", "database migration")
    expect(page.locator("#audit")).to_contain_text("database migration")
    row.locator("input[name=reason]").fill("done")
    row.get_by_role("button", name="Turn off").click()
    expect(page.locator(".flash.ok")).to_have_text("read-only is off.")
    assert all(check(server, action="register", ip=IP)["allowed"] for _ in range(3))


def test_ban_from_the_page_then_lift_it(server: ServerProcess, page: Page) -> None:
    """An IP banned with the page's form is denied and shown only by its hash; lifting the
    ban from the page lets the same client through again."""
    sign_in(page, server)
    add = page.locator("#add-ban")
    add.locator("select[name=field]").select_option("ip")
    add.locator("input[name=value]").fill(IP)
    add.locator("input[name=duration]").fill("1d")
    add.locator("input[name=reason]").fill("project spam")
    add.get_by_role("button", name="Ban").click()
    assert check(server, action="register", ip=IP)["reason"] == "banned"
    ban_id = api(server, "GET", "/v1/admin/bans")["bans"][0]["id"]
    expect(page.locator(".flash.ok")).to_have_text(f"Banned ip {ban_id} for 1 d.")
    row = page.locator(f"#ban-{ban_id}")
    expect(row).to_contain_text("project spam")
    no_raw_ip(page)
    row.locator("input[name=reason]").fill("false positive")
    row.get_by_role("button", name="Lift").click()
    expect(page.locator(".flash.ok")).to_have_text(f"Lifted the ban on {ban_id}.")
    expect(page.locator("#bans")).to_contain_text("No active bans.")
    assert check(server, action="register", ip=IP)["allowed"]
    kinds = [(e["kind"], e["actor"]) for e in api(server, "GET", "/v1/admin/audit")["events"]]
    assert kinds == [("lift", "alice"), ("ban", "alice")]


# whether the element a selector names is wholly in the window and not under the sticky bar
UNCOVERED = """selector => {
    const bar = document.querySelector("header.bar").getBoundingClientRect();
    const box = document.querySelector(selector).getBoundingClientRect();
    return box.height > 0 && box.top >= bar.bottom && box.bottom <= window.innerHeight;
}"""


def test_the_outcome_of_a_form_is_in_view(server: ServerProcess, page: Page) -> None:
    """In a short window, after forms far down the page (the ban form, a ban's Lift) and a
    switch at the top are posted, the page comes back showing its message (what changed, or
    why nothing did) whole and below the sticky bar; a link to a section lands below the bar
    too."""
    page.set_viewport_size({"width": 1440, "height": 480})
    sign_in(page, server)
    assert page.eval_on_selector("header.bar", "bar => getComputedStyle(bar).position") == (
        "sticky")
    add = page.locator("#add-ban")
    outcomes = (("2h", "ok", "Banned user "), ("soon", "error", "Nothing was changed: "))
    for duration, kind, text in outcomes:
        page.evaluate("window.scrollTo(0, document.body.scrollHeight)")  # down to the form
        assert not page.evaluate(UNCOVERED, "#flags h2")
        add.locator("select[name=field]").select_option("user")
        add.locator("input[name=value]").fill("mallory")
        add.locator("input[name=duration]").fill(duration)
        add.get_by_role("button", name="Ban").click()
        expect(page).to_have_url(server.url + "/admin#outcome")
        expect(page.locator(f"#outcome.{kind}")).to_contain_text(text)
        page.wait_for_function(UNCOVERED, arg="#outcome")
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
    ban = page.locator("#bans tbody tr").first
    ban.get_by_role("button", name="Lift").click()
    expect(page.locator("#outcome.ok")).to_contain_text("Lifted the ban on ")
    page.wait_for_function(UNCOVERED, arg="#outcome")
    row = page.locator("#flag-read-only")
    row.locator("input[name=expires_in]").fill("2h")
    row.get_by_role("button", name="Turn on").click()
    expect(page.locator("#outcome.ok")).to_have_text("read-only is on for 2 h.")
    page.wait_for_function(UNCOVERED, arg="#outcome")
    page.goto(server.url + "/admin#bans")
    page.wait_for_function(UNCOVERED, arg="#bans h2")


def test_forged_form_posts_change_nothing(server: ServerProcess, context: BrowserContext,
                                          page: Page) -> None:
    """While alice is signed in, forms posted from another origin (her cookie goes along:
    same site) and forms built inside her own page without the CSRF token or with a wrong
    one are all refused with 403: the flag stays off and the audit trail stays empty."""
    sign_in(page, server)
    before = (api(server, "GET", "/v1/admin/flags"), api(server, "GET", "/v1/admin/audit"))
    target = f"{server.url}/admin/flags/read-only"
    evil = f"""<!doctype html><title>cat pictures</title>
        <form id="no-token" method="post" action="{target}">
          <input type="hidden" name="enabled" value="on"><button>one</button></form>
        <form id="bad-token" method="post" action="{target}">
          <input type="hidden" name="enabled" value="on">
          <input type="hidden" name="csrf" value="{'A' * 43}"><button>two</button></form>"""
    with other_site(evil) as url:
        attacker = context.new_page()
        try:
            for form in ("#no-token", "#bad-token"):
                attacker.goto(url)
                with attacker.expect_navigation() as navigation:
                    attacker.click(f"{form} button")
                response = navigation.value
                assert response is not None and response.status == 403
                expect(attacker.locator("h2")).to_have_text("Change refused")
        finally:
            attacker.close()
    page.goto(server.url + "/admin")
    assert post_from_page(page, "/admin/flags/read-only", {"enabled": "on"}) == 403
    expect(page.locator("main")).to_contain_text("CSRF token is missing or wrong")
    page.goto(server.url + "/admin")
    assert post_from_page(page, "/admin/flags/read-only",
                          {"enabled": "on", "csrf": "A" * 43}) == 403
    after = (api(server, "GET", "/v1/admin/flags"), api(server, "GET", "/v1/admin/audit"))
    assert after == before
    assert not {f["name"]: f for f in after[0]["flags"]}["read-only"]["enabled"]
    assert after[1]["events"] == []
    assert check(server, action="register", ip=IP)["allowed"]


def test_viewer_sees_no_controls_and_its_post_is_refused(server: ServerProcess,
                                                         page: Page) -> None:
    """A viewer sees the switches, bans and audit but no control; a form it builds itself,
    with its own valid CSRF token, is refused with 403 and changes nothing."""
    api(server, "POST", "/v1/admin/bans", {"user": "mallory", "duration": 3600,
                                          "reason": "spam"})
    sign_in(page, server, VICTOR_TOKEN)
    expect(page.locator(".who")).to_contain_text("victor")
    expect(page.locator(".flash.info")).to_contain_text("viewer token")
    expect(page.locator("#flag-read-only")).to_be_visible()
    expect(page.locator("#bans")).to_contain_text("spam")
    assert page.locator("form").count() == 1  # sign out, nothing else
    assert page.locator("button").all_inner_texts() == ["Sign out"]
    assert page.locator("input:not([type=hidden]), select").count() == 0
    csrf = page.locator("form.who input[name=csrf]").get_attribute("value")
    assert csrf
    assert post_from_page(page, "/admin/flags/read-only", {"enabled": "on", "csrf": csrf}) == 403
    expect(page.locator("main")).to_contain_text("Token 'victor' may only read")
    flags = {f["name"]: f for f in api(server, "GET", "/v1/admin/flags")["flags"]}
    assert not flags["read-only"]["enabled"]
    assert [e["kind"] for e in api(server, "GET", "/v1/admin/audit")["events"]] == ["ban"]


def test_sign_out_ends_the_session(server: ServerProcess, context: BrowserContext,
                                   page: Page) -> None:
    """The session cookie is HttpOnly and SameSite=Strict; after signing out the page asks
    for a token again, and the old cookie, replayed by hand, opens nothing."""
    sign_in(page, server)
    cookie = next(c for c in context.cookies() if c["name"] == "ratekeeper_admin")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and not cookie["secure"]
    assert cookie["path"] == "/admin"
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(server.url + "/admin/signin?note=signed-out")
    expect(page.locator(".flash.ok")).to_have_text("Signed out.")
    page.goto(server.url + "/admin")
    expect(page).to_have_url(server.url + "/admin/signin")
    status, headers, _ = request(server, "GET", "/admin",
                                 headers={"Cookie": f"ratekeeper_admin={cookie['value']}"})
    assert (status, headers["Location"]) == (303, "/admin/signin")


def test_screenshot_of_a_busy_page(serve_process: Serve, redis_server: RedisServer,
                                   key_prefix: str, tmp_path: Path, page: Page) -> None:
    """With Warehouse's config, two switches on, two bans and clients over their limits, the
    page shows all of it (and no IP) in a laptop-sized window; the screenshot is kept when
    RATEKEEPER_SCREENSHOT names a file."""
    server = serve_process(EXAMPLE.read_text(), env_for(redis_server, key_prefix))
    for i, extra in enumerate((37, 21, 9)):  # before project creation is switched off
        for _ in range(4 + extra):
            check(server, action="project-create", ip=f"198.51.100.{i + 10}", user=f"u{i}")
    sign_in(page, server)
    row = page.locator("#flag-disallow-new-project-registration")
    row.locator("input[name=reason]").fill("spam wave")
    row.locator("input[name=expires_in]").fill("2h")
    row.get_by_role("button", name="Turn on").click()
    row = page.locator("#flag-disallow-new-user-registration")
    row.locator("input[name=message]").fill(
        "New user registration is paused while we deal with a spam wave.")
    row.locator("input[name=reason]").fill("spam wave")
    row.get_by_role("button", name="Turn on").click()
    add = page.locator("#add-ban")
    for field, value, duration, reason in (("ip", IP, "1d", "project spam"),
                                           ("user", "spammer42", "7d", "malware uploads")):
        add.locator("select[name=field]").select_option(field)
        add.locator("input[name=value]").fill(value)
        add.locator("input[name=duration]").fill(duration)
        add.locator("input[name=reason]").fill(reason)
        add.get_by_role("button", name="Ban").click()
        expect(page.locator(".flash.ok")).to_contain_text(f"Banned {field}")
    for i, extra in enumerate((26, 12)):
        for _ in range(10 + extra):
            check(server, action="login", ip=f"2001:db8:{i}::7", user=f"victim{i}")
    # the health line counts whole seconds every process has flushed: wait for them
    deadline = time.monotonic() + 8
    while True:
        page.goto(server.url + "/admin")
        if page.locator("#health .rate").inner_text() != "0.0" or time.monotonic() > deadline:
            break
        page.wait_for_timeout(200)
    expect(page.locator("#health .rate")).not_to_have_text("0.0")
    expect(page.locator(".badge.on")).to_have_count(2)
    expect(page.locator("#bans tbody tr")).to_have_count(2)
    expect(page.locator("#top table")).not_to_have_count(0)
    expect(page.locator("#audit tbody tr")).to_have_count(4)
    no_raw_ip(page)
    shot = tmp_path / "admin.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    keep = os.environ.get("RATEKEEPER_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)
