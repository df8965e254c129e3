"""A PyPI-shaped load against the sidecar's check API, for locust.

Who is in the mix (class weights are relative):
- ``Login``: a sign-in peeks at the login limits (cost 0); a share of passwords fail, and
  only a failure is counted (cost 1), as Warehouse does.
- ``Register``: new accounts, each from its own address.
- ``ProjectCreate``: a look before creating, a hit after the project exists.
- ``Upload``: release files by user, project and address.
- ``Spammer``: a wave of a few hundred IPv6 addresses rotating inside a handful of /64s
  (ratekeeper counts a /64 as one client), registering and creating projects.
- ``Flood``: a project-creation flood from thousands of addresses and accounts, each
  well within its own limits (what per-client limits cannot stop, and a tripwire can), from
  RK_FLOOD_AT for RK_FLOOD_FOR seconds. A tripwire on ``project-create`` in the server's
  config trips on it and turns its kill switch on; from then on the flood and the ordinary
  creations are answered ``disabled`` by that switch, which is expected.
- ``Watcher``: looks at ``GET /v1/admin/tripwires`` every second and prints a line when a
  tripwire trips. With RK_WEBHOOK_PORT set, the run also listens on 127.0.0.1:<port> for the
  server's alerts (list ``http://127.0.0.1:<port>/`` in the config's ``[alerts]``) and prints
  each one as it arrives.
- ``EdgeUpload``: the reverse proxy's ``GET /v1/authz`` for ``POST /legacy/``, where 204,
  429 and 403 are all answers the contract allows.
- ``Admin``: one admin who turns the ``disallow-new-user-registration`` kill switch on
  mid-run through ``PUT /v1/admin/flags/{name}`` and off again later. A run that ends while
  it is on turns it off as it stops, and a run that finds it on at the start turns it off
  first, so no run leaves the switch to the next.

Every answer is judged against what this traffic should get: a denial the mix provokes (a
spammer rate limited or boxed, registration disabled while the switch is on, the site-wide
login cap reached) is a success; a 4xx/5xx, a degraded answer, a disabled answer with the
switch off, an allowed registration with the switch on, or a ban nobody issued is a
failure. At the end a table of answers per action is printed, then the tripwires' trips
and the alerts received. A kill switch a tripwire turned on during the run is turned off as
the run stops.

Environment: RK_ADMIN_TOKEN (the token the server has in RATEKEEPER_ADMIN_TOKENS),
RK_KILL_AT and RK_KILL_FOR (seconds after start; defaults 20 and 20), RK_SPAM_AT and
RK_SPAM_FOR (defaults 10 and 30), RK_FLOOD_AT and RK_FLOOD_FOR (defaults 30 and 15),
RK_WEBHOOK_PORT (unset: no receiver), RK_FLAG_GRACE (seconds a flip may take to reach every
worker; default 5). See loadtest/README.md for the command.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import random
import threading
import time
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from locust import FastHttpUser, between, constant, events, task

ADMIN_TOKEN = os.environ.get("RK_ADMIN_TOKEN", "locust-admin-token")
KILL_AT = float(os.environ.get("RK_KILL_AT", "20"))
KILL_FOR = float(os.environ.get("RK_KILL_FOR", "20"))
SPAM_AT = float(os.environ.get("RK_SPAM_AT", "10"))
SPAM_FOR = float(os.environ.get("RK_SPAM_FOR", "30"))
GRACE = float(os.environ.get("RK_FLAG_GRACE", "5"))
FLOOD_AT = float(os.environ.get("RK_FLOOD_AT", "30"))
FLOOD_FOR = float(os.environ.get("RK_FLOOD_FOR", "15"))
WEBHOOK_PORT = int(os.environ.get("RK_WEBHOOK_PORT", "0"))
KILL_SWITCH = "disallow-new-user-registration"
SPAM_NETWORKS = 6  # the /64s the spam wave rotates in
SPAM_ADDRESSES = 300  # distinct addresses across them

STARTED = time.monotonic()
# answers per action and outcome, printed when the run ends
OUTCOMES: collections.Counter[tuple[str, str]] = collections.Counter()
# the kill switch as the admin API last accepted it, and when (monotonic clock); one locust
# process holds it, so run without --processes
SWITCH: dict[str, Any] = {"on": False, "at": 0.0, "confirmed": False}
_serial = itertools.count()
# the server's tripwires: name -> its flag; and each trip seen, as a line for the summary
WIRES: dict[str, str] = {}
TRIPS: list[str] = []
ALERTS: list[str] = []  # the ``text`` of every alert the receiver took


def elapsed() -> float:
    """Seconds since this locust process started."""
    return time.monotonic() - STARTED


def client_ip(rng: random.Random) -> str:
    """An address of a well-behaved client: 198.18.0.0/15, set aside for benchmarks."""
    i = rng.randrange(131_072)
    return f"198.{18 + i // 65536}.{i // 256 % 256}.{i % 256}"


def spam_ip(rng: random.Random) -> str:
    """One of the spam wave's addresses: a few hundred spread over a few /64s."""
    n = rng.randrange(SPAM_ADDRESSES)
    net = n % SPAM_NETWORKS
    return f"2001:db8:5a:{net:x}::{n // SPAM_NETWORKS + 1:x}:{rng.randrange(1 << 16):x}"


def switch_state() -> str:
    """'on', 'off' or 'moving' (within the grace after a flip, either answer is right)."""
    if SWITCH["at"] and time.monotonic() - SWITCH["at"] < GRACE:
        return "moving"
    return "on" if SWITCH["on"] else "off"


class CheckUser(FastHttpUser):
    """Sends checks and judges the answers."""

    abstract = True
    rng: random.Random

    def on_start(self) -> None:
        self.rng = random.Random(next(_serial))

    def check(self, action: str, name: str, *,
              expect: frozenset[str] | Callable[[], frozenset[str]],
              **fields: Any) -> dict[str, Any] | None:
        """POST /v1/check; a reason outside ``expect`` (None = allowed) is a failure. A callable
        ``expect`` is asked once the answer is in (for answers that depend on a moving switch)."""
        body = {"action": action, **fields}
        with self.client.post("/v1/check", json=body, name=name,
                              catch_response=True) as resp:
            if resp.status_code != 200:
                OUTCOMES[(action, f"HTTP {resp.status_code}")] += 1
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return None
            try:
                answer: dict[str, Any] = resp.json()
            except ValueError:
                OUTCOMES[(action, "bad JSON")] += 1
                resp.failure("the answer is not JSON")
                return None
            reason = answer.get("reason") if not answer.get("allowed") else None
            outcome = "allowed" if reason is None else str(reason)
            if answer.get("degraded"):
                outcome += " (degraded)"
            OUTCOMES[(action, outcome)] += 1
            if answer.get("degraded"):
                resp.failure("degraded: the sidecar could not ask Redis")
            elif reason not in (wanted := expect() if callable(expect) else expect) and not (
                    reason is None and "allowed" in wanted):
                resp.failure(f"unexpected answer for {action}: {outcome}")
            else:
                resp.success()
            return answer


ALLOWED = frozenset({"allowed"})
LIMITED = frozenset({"allowed", "rate_limited"})
ANY_DENIAL = frozenset({"allowed", "rate_limited", "banned", "disabled"})
# a registration's answers by the kill switch's state (see switch_state)
SWITCH_ANSWERS = {"on": frozenset({"disabled"}), "off": ALLOWED,
                  "moving": frozenset({"allowed", "disabled"})}


class Login(CheckUser):
    """Sign-ins: peek, and count a failed password (about one in five)."""

    weight = 30
    wait_time = between(0.2, 1.0)

    @task
    def sign_in(self) -> None:
        who = {"ip": client_ip(self.rng), "user": f"user{self.rng.randrange(50_000)}"}
        # the site-wide cap (login-global) is reached when failures pile up: expected
        peek = self.check("login", "login: peek", expect=LIMITED, cost=0, **who)
        if peek and peek.get("allowed") and self.rng.random() < 0.2:
            self.check("login", "login: failed password", expect=LIMITED, **who)


class Register(CheckUser):
    """New accounts; disabled while the admin's kill switch is on."""

    weight = 5
    wait_time = between(0.5, 2.0)

    @task
    def register(self) -> None:
        state = switch_state()
        # the admin may flip the switch while this check is out: what it allows is judged by the
        # switch as it stood when the check was sent and as it stands when the answer is in
        answer = self.check("register", f"register (switch {state})",
                            expect=lambda: SWITCH_ANSWERS[state] | SWITCH_ANSWERS[switch_state()],
                            ip=client_ip(self.rng))
        if answer and answer.get("reason") == "disabled" and answer.get("flag") != KILL_SWITCH:
            OUTCOMES[("register", "disabled by another flag")] += 1


class ProjectCreate(CheckUser):
    """A look before creating a project, a hit once it exists."""

    weight = 5
    wait_time = between(0.5, 2.0)

    @task
    def create(self) -> None:
        who = {"ip": client_ip(self.rng), "user": f"maintainer{self.rng.randrange(20_000)}"}
        # a tripwire may turn project creation off (the flood is there to trip it)
        expect = LIMITED | frozenset({"disabled"}) if WIRES else LIMITED
        peek = self.check("project-create", "project-create: peek", expect=expect, cost=0,
                          **who)
        if peek and peek.get("allowed"):
            self.check("project-create", "project-create: hit", expect=expect, **who)


class Flood(CheckUser):
    """A project-creation flood from thousands of addresses and accounts, each within its
    own limits: allowed until a tripwire turns project creation off."""

    weight = 5
    wait_time = constant(0.02)

    @task
    def flood(self) -> None:
        if not FLOOD_AT <= elapsed() < FLOOD_AT + FLOOD_FOR:
            time.sleep(0.5)
            return
        n = self.rng.randrange(1 << 20)
        # a switch turned on by a trip may take a moment to reach every worker: until the
        # watcher has seen the trip, either answer is right
        self.check("project-create", "flood: project-create",
                   expect=ALLOWED | frozenset({"disabled"}),
                   ip=f"100.{64 + n % 64}.{n // 64 % 256}.{n // 16384 % 256 + 1}",
                   user=f"flood{n}")


class Watcher(FastHttpUser):
    """Prints a line when a tripwire trips (GET /v1/admin/tripwires once a second)."""

    fixed_count = 1
    wait_time = constant(1.0)

    @task
    def look(self) -> None:
        if not WIRES:
            return
        with self.client.get("/v1/admin/tripwires", name="admin: GET /v1/admin/tripwires",
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                             catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            resp.success()
            wires = resp.json()["tripwires"]
        for wire in wires:
            seen = any(line.startswith(f"tripwire {wire['name']} ") for line in TRIPS)
            if wire["tripped_until"] and not seen:
                line = (f"tripwire {wire['name']} tripped (+{elapsed():.0f} s): "
                        f"{wire['action']} reached {wire['threshold']} in {wire['window']} s; "
                        f"{wire['flag']} is on" + (" (shadow: not really)" if wire["shadow"]
                                                   else ""))
                TRIPS.append(line)
                print(line, flush=True)


class Upload(CheckUser):
    """Release files: user, project and address."""

    weight = 15
    wait_time = between(0.2, 1.0)

    @task
    def upload(self) -> None:
        n = self.rng.randrange(5_000)
        self.check("upload", "upload", expect=LIMITED, ip=client_ip(self.rng),
                   user=f"maintainer{n}", project=f"project{n}-{self.rng.randrange(3)}")


class Spammer(CheckUser):
    """The spam wave: a few hundred IPv6 addresses in a few /64s, as fast as they can."""

    weight = 5
    wait_time = constant(0.05)

    @task
    def spam(self) -> None:
        if not SPAM_AT <= elapsed() < SPAM_AT + SPAM_FOR:
            time.sleep(0.5)
            return
        ip = spam_ip(self.rng)
        if self.rng.random() < 0.5:
            self.check("register", "spam: register", expect=ANY_DENIAL, ip=ip)
        else:
            self.check("project-create", "spam: project-create", expect=ANY_DENIAL, ip=ip,
                       user=f"spam{self.rng.randrange(SPAM_ADDRESSES)}")


class EdgeUpload(FastHttpUser):
    """nginx auth_request for an upload: 204 go, 429 limited, 403 disabled or banned."""

    weight = 3
    wait_time = between(0.2, 1.0)

    def on_start(self) -> None:
        self.rng = random.Random(next(_serial))

    @task
    def authz(self) -> None:
        headers = {"X-Original-Method": "POST", "X-Original-URI": "/legacy/",
                   "X-Real-IP": client_ip(self.rng)}
        with self.client.get("/v1/authz", headers=headers, name="authz: POST /legacy/",
                             catch_response=True) as resp:
            OUTCOMES[("authz upload", f"HTTP {resp.status_code}")] += 1
            if resp.status_code in (204, 429, 403):
                resp.success()
            else:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")


class Admin(FastHttpUser):
    """One admin: kill switch on at RK_KILL_AT, off again RK_KILL_FOR seconds later."""

    fixed_count = 1
    wait_time = constant(0.5)
    tried_at = -1e9

    @task
    def flip(self) -> None:
        now = elapsed()
        want_on = KILL_AT <= now < KILL_AT + KILL_FOR
        if want_on == SWITCH["on"] or now - self.tried_at < 5:
            return
        self.tried_at = now
        SWITCH["at"] = time.monotonic()  # moving from the moment the change is sent
        body: dict[str, Any] = {"enabled": want_on, "reason": "locust kill-switch drill",
                                "message": "Registrations are paused by the load test."}
        if want_on:
            body["expires_in"] = int(KILL_FOR * 3)
        with self.client.put(f"/v1/admin/flags/{KILL_SWITCH}", json=body,
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                             name="admin: PUT /v1/admin/flags/{name}",
                             catch_response=True) as resp:
            OUTCOMES[("admin flag", f"HTTP {resp.status_code}")] += 1
            if not 200 <= resp.status_code < 300:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return  # not flipped: registrations stay judged as before
            resp.success()
        SWITCH.update(on=want_on, at=time.monotonic(), confirmed=True)


def flip_switch(host: str, enabled: bool, reason: str) -> None:
    """Set the kill switch through the admin API, outside the measured traffic."""
    body = json.dumps({"enabled": enabled, "reason": reason}).encode()
    request = urllib.request.Request(
        f"{host.rstrip('/')}/v1/admin/flags/{KILL_SWITCH}", data=body, method="PUT",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5):
        pass


def switch_is_on(host: str) -> bool:
    """The kill switch's state as the admin API reports it."""
    request = urllib.request.Request(f"{host.rstrip('/')}/v1/admin/flags",
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        flags = json.load(response)["flags"]
    return any(f["name"] == KILL_SWITCH and f["enabled"] for f in flags)


def admin_get(host: str, path: str) -> Any:
    """An admin API read, outside the measured traffic."""
    request = urllib.request.Request(f"{host.rstrip('/')}{path}",
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)


class AlertHandler(BaseHTTPRequestHandler):
    """The run's webhook: prints each alert's text line as it comes."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        try:
            text = str(json.loads(body).get("text", ""))
        except ValueError:
            text = "(not JSON)"
        signed = "signed" if self.headers.get("Ratekeeper-Signature") else "unsigned"
        ALERTS.append(text)
        print(f"alert received ({signed}): {text}", flush=True)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@events.test_start.add_listener
def find_tripwires(environment: Any, **kwargs: Any) -> None:
    """Learn the server's tripwires; listen for its alerts when RK_WEBHOOK_PORT is set."""
    if WEBHOOK_PORT:
        server = ThreadingHTTPServer(("127.0.0.1", WEBHOOK_PORT), AlertHandler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        print(f"listening for alerts on http://127.0.0.1:{WEBHOOK_PORT}/")
    if not environment.host:
        return
    try:
        wires = admin_get(environment.host, "/v1/admin/tripwires")["tripwires"]
    except OSError as exc:
        print(f"tripwires: could not list them ({exc})")
        return
    WIRES.update({w["name"]: w["flag"] for w in wires})
    armed = ", ".join(f"{w['name']} ({w['action']}, {w['threshold']} per {w['window']} s)"
                      for w in wires if w["armed"])
    print(f"tripwires armed: {armed or 'none'}; the flood starts at +{FLOOD_AT:.0f} s")


@events.test_start.add_listener
def switch_off_at_start(environment: Any, **kwargs: Any) -> None:
    """A run that was killed mid-drill may have left the switch on: start from off."""
    if not environment.host:
        return
    try:
        if switch_is_on(environment.host):
            flip_switch(environment.host, False, "locust: a previous run left it on")
    except OSError as exc:  # a wrong token or no server: the run's own requests will say so
        print(f"kill switch: could not check it before the run ({exc})")


@events.test_stop.add_listener
def switch_off_at_stop(environment: Any, **kwargs: Any) -> None:
    """The run ended inside the drill (e.g. -t 30s): turn the switch off again."""
    if not (environment.host and SWITCH["on"]):
        return
    try:
        flip_switch(environment.host, False, "locust: the run ended")
    except OSError as exc:
        print(f"kill switch: could not turn {KILL_SWITCH} off ({exc}); it is still on")
        return
    SWITCH.update(on=False, at=time.monotonic())


@events.test_stop.add_listener
def tripped_switches_off_at_stop(environment: Any, **kwargs: Any) -> None:
    """Turn off what a tripwire turned on during the run, so the next run starts clean."""
    if not (environment.host and TRIPS):
        return
    try:
        flags = admin_get(environment.host, "/v1/admin/flags")["flags"]
        for flag in flags:
            if flag["enabled"] and str(flag["updated_by"]).startswith("tripwire:"):
                body = json.dumps({"enabled": False, "reason": "locust: the run ended"})
                request = urllib.request.Request(
                    f"{environment.host.rstrip('/')}/v1/admin/flags/{flag['name']}",
                    data=body.encode(), method="PUT",
                    headers={"Authorization": f"Bearer {ADMIN_TOKEN}",
                             "Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=5):
                    pass
    except OSError as exc:
        print(f"tripwires: could not turn their switches off ({exc})")


@events.quitting.add_listener
def print_outcomes(environment: Any, **kwargs: Any) -> None:
    """The answers per action, and whether the kill switch was ever accepted."""
    print("\nanswers per action (ratekeeper's view of the mix):")
    for (action, outcome), count in sorted(OUTCOMES.items()):
        print(f"  {action:16s} {outcome:28s} {count:8d}")
    print(f"  kill switch accepted by the admin API: {SWITCH['confirmed']}")
    if WIRES:
        print("tripwires tripped during the run:")
        for line in TRIPS or ["  none"]:
            print(f"  {line}")
    if WEBHOOK_PORT:
        print(f"alerts received: {len(ALERTS)}")
        for text in ALERTS:
            print(f"  {text}")
