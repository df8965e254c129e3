"""`make chaos`: faults under steady load against a real 2-worker `ratekeeper serve`; one table.

Steady load runs through every scenario: fresh subjects (a few hundred checks/s in all, each
subject sending FRESH_SENDS checks under a limit of FRESH_LIMIT per hour, fail open) and a few
abusers already past their limit (ABUSER_LIMIT per hour, fail closed), on keep-alive
connections, sent on a schedule whatever the answers. The scenarios, one after another:

    steady             no fault: what the load alone does
    redis-pause        SIGSTOP Redis for 2 s, then SIGCONT (Redis with AOF on, as below)
    redis-restart      SIGKILL Redis, 1 s down, start it again on its AOF file
    worker-kill        SIGKILL one worker; the supervisor starts another
    rolling-restart    SIGUSR2: every worker replaced, one at a time
    sentinel-failover  SENTINEL FAILOVER: master and replica swap
    cluster-reshard    half of one master's slots moved to another with CLUSTER SETSLOT and
                       MIGRATE, so that MOVED, ASK and TRYAGAIN meet the load
    cluster-failover   SIGKILL a master of the Cluster; its replica is promoted

Per scenario: errors (not a 200, or no answer); degraded answers; abusers admitted (any is
past the limit); admissions of fresh subjects past their limit (in brackets: how many of those
could have been degraded fail-open answers rather than Redis's decisions); the fault's length;
time to normal (from the fault's end to the last degraded or failed answer; "never" when
answers were not clean again for SETTLE s within CAP s); and state lost: a flag turned on, a
ban, the audit events and two counters, set before the fault and read after. Figures, never
a pass/fail. Each scenario has subjects of its own, so their counts never mix. The stages
and the faults are in chaos_stages.py.

    .venv/bin/python loadtest/chaos.py [--only NAME[,NAME...]]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
from redis.crc import key_slot

from ratekeeper.identity.keys import Keyspace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from chaos_stages import ORDER, STAGES, Fault, Stage  # noqa: E402
from support.overload import raise_fd_limit  # noqa: E402

FRESH_PER_S = 300  # checks of fresh subjects per second
FRESH_LIMIT, FRESH_SENDS, FRESH_POOL = 8, 12, 60  # a subject's checks spread over ~2.4 s
ABUSERS, ABUSER_PER_S, ABUSER_LIMIT = 4, 10, 5  # each abuser checks ABUSER_PER_S times a second
MARKER_LIMIT, MARKER_COST = 100, 3
TICK = 0.005  # the pacer's step, seconds
CONNECTIONS = 64  # keep-alive connections of the load, at most
CLIENT_TIMEOUT = 5.0  # seconds: no answer by then is an error
WARM = 2.0  # seconds of load before the fault
SETTLE = 3.0  # seconds of clean answers that count as back to normal
CAP = 30.0  # seconds after the fault's end to wait for that, at most
FLAG = "chaos-marker"
PREFIX = "chaos"  # the server's RATEKEEPER_KEY_PREFIX

RULES = f"""
[rules.fresh-ip]
limit = "{FRESH_LIMIT} per hour"
key = ["ip"]
[actions.browse]
rules = ["fresh-ip"]

[rules.abuser-ip]
limit = "{ABUSER_LIMIT} per hour"
key = ["ip"]
fail = "closed"
[actions.login]
rules = ["abuser-ip"]

[rules.marker-user]
limit = "{MARKER_LIMIT} per hour"
key = ["user"]
[actions.mark]
rules = ["marker-user"]

[flags.{FLAG}]
description = "Blocks nothing; the chaos run checks that it survives each fault"
"""


# -- the load ------------------------------------------------------------------------------

@dataclass
class Answer:
    """One check's outcome, as the load saw it."""

    kind: str  # "fresh" or "abuser"
    subject: str
    done: float  # time.monotonic() when answered or failed
    ok: bool  # a 200 with a decision
    allowed: bool = False
    degraded: bool = False


class Load:
    """Checks sent on a schedule, whatever the answers: fresh subjects in turn from a pool,
    each replaced by a new one once it has sent FRESH_SENDS checks, and the abusers."""

    def __init__(self, session: aiohttp.ClientSession, url: str, tag: int) -> None:
        self.session = session
        self.url = f"{url}/v1/check"
        self.tag = tag
        self.abusers = abusers_of(tag)
        self.answers: list[Answer] = []
        self.last_bad = float("-inf")  # when the last degraded or failed answer came
        self.pool: list[tuple[str, int]] = []
        self.made = 0
        self.turn = 0
        self.stopping = False
        self.pending: set[asyncio.Future[None]] = set()

    def next_fresh(self) -> str:
        slot = self.turn % FRESH_POOL
        self.turn += 1
        if slot == len(self.pool) or self.pool[slot][1] == FRESH_SENDS:
            ip = f"10.{self.tag}.{self.made // 256}.{self.made % 256}"
            self.made += 1
            if slot == len(self.pool):
                self.pool.append((ip, 0))
            else:
                self.pool[slot] = (ip, 0)
        ip, sent = self.pool[slot]
        self.pool[slot] = (ip, sent + 1)
        return ip

    async def run(self) -> None:
        """Send until stop() is called, then wait for the answers still out."""
        start = time.monotonic()
        fresh = abusive = 0
        while not self.stopping:
            await asyncio.sleep(TICK)
            elapsed = time.monotonic() - start
            while fresh < elapsed * FRESH_PER_S:
                self.send("fresh", "browse", self.next_fresh())
                fresh += 1
            while abusive < elapsed * ABUSER_PER_S * ABUSERS:
                self.send("abuser", "login", self.abusers[abusive % ABUSERS])
                abusive += 1
        await asyncio.gather(*self.pending)

    def stop(self) -> None:
        self.stopping = True

    def send(self, kind: str, action: str, ip: str) -> None:
        future = asyncio.ensure_future(self.one(kind, action, ip))
        self.pending.add(future)
        future.add_done_callback(self.pending.discard)

    async def one(self, kind: str, action: str, ip: str) -> None:
        answer = Answer(kind, ip, 0.0, ok=False)
        try:
            async with self.session.post(self.url, json={"action": action, "ip": ip}) as resp:
                if resp.status == 200:
                    body = await resp.json()
                    answer.ok, answer.allowed = True, bool(body["allowed"])
                    answer.degraded = bool(body["degraded"])
                else:
                    await resp.read()
        except (TimeoutError, aiohttp.ClientError):
            pass
        answer.done = time.monotonic()
        if answer.degraded or not answer.ok:
            self.last_bad = max(self.last_bad, answer.done)
        self.answers.append(answer)


def abusers_of(tag: int) -> list[str]:
    return [f"192.0.2.{tag * ABUSERS + i}" for i in range(ABUSERS)]


# -- state set before a fault and read after -----------------------------------------------

class Admin:
    """The admin API and the check API, for setting and reading state (retrying a 503 or a
    degraded answer for a while, so that what is read is Redis's)."""

    def __init__(self, session: aiohttp.ClientSession, url: str, token: str) -> None:
        self.session = session
        self.url = url
        self.headers = {"Authorization": f"Bearer {token}"}

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        deadline = time.monotonic() + 10
        while True:
            try:
                async with self.session.request(method, self.url + path, json=body,
                                                headers=self.headers) as resp:
                    answer = await resp.json()
                    usable = resp.status < 500 and not (isinstance(answer, dict)
                                                        and answer.get("degraded"))
                    if usable or time.monotonic() > deadline:
                        if resp.status >= 400:
                            raise RuntimeError(f"{method} {path}: {resp.status} {answer}")
                        return answer
            except aiohttp.ClientError:
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.1)

    async def check(self, action: str, cost: int = 1, **subject: str) -> Any:
        return await self.call("POST", "/v1/check", {"action": action, "cost": cost, **subject})


@dataclass
class Marks:
    """What a scenario set before its fault."""

    message: str
    ban: str
    audit: set[str]
    tag: int


async def set_marks(admin: Admin, tag: int) -> Marks:
    """A flag on, a ban, a counter consumed, the abusers past their limit; the audit ids."""
    message = f"chaos scenario {tag}"
    await admin.call("PUT", f"/v1/admin/flags/{FLAG}",
                     {"enabled": True, "message": message, "reason": "chaos run"})
    ban = await admin.call("POST", "/v1/admin/bans",
                           {"user": f"banned{tag}", "duration": 3600, "reason": "chaos run"})
    await admin.check("mark", MARKER_COST, user=f"marker{tag}")
    for ip in abusers_of(tag):
        for _ in range(ABUSER_LIMIT):
            await admin.check("login", ip=ip)
    audit = await admin.call("GET", "/v1/admin/audit?limit=1000")
    return Marks(message, str(ban["id"]), {e["id"] for e in audit["events"]}, tag)


async def lost_marks(admin: Admin, marks: Marks) -> list[str]:
    """What of ``marks`` is gone or changed, read through the API."""
    lost = []
    flags = await admin.call("GET", "/v1/admin/flags")
    flag = next(f for f in flags["flags"] if f["name"] == FLAG)
    if flags.get("stale") or not flag["enabled"] or flag["message"] != marks.message:
        lost.append("flag")
    bans = await admin.call("GET", "/v1/admin/bans")
    if marks.ban not in {b["id"] for b in bans["bans"]}:
        lost.append("ban")
    audit = await admin.call("GET", "/v1/admin/audit?limit=1000")
    gone = marks.audit - {e["id"] for e in audit["events"]}
    if gone:
        lost.append(f"audit ({len(gone)} events)")
    marker = await admin.check("mark", 0, user=f"marker{marks.tag}")
    if marker["degraded"] or marker["limits"][0]["remaining"] != MARKER_LIMIT - MARKER_COST:
        lost.append("marker counter")
    for ip in abusers_of(marks.tag):
        abuser = await admin.check("login", 0, ip=ip)
        if abuser["degraded"] or abuser["limits"][0]["remaining"] != 0:
            lost.append("abuser counter")
            break
    return lost


# -- one scenario, measured ----------------------------------------------------------------

@dataclass
class Row:
    """One line of the table."""

    name: str
    checks: int = 0
    errors: int = 0
    degraded: int = 0
    abusers: str = ""
    fresh_over: str = ""
    fault: str = ""
    to_normal: str = ""
    lost: str = ""
    note: str = ""


async def measure(name: str, fault: Fault, stage: Stage, tag: int, token: str) -> Row:
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)
    connector = aiohttp.TCPConnector(limit=CONNECTIONS)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        admin = Admin(session, stage.server.url, token)
        marks = await set_marks(admin, tag)
        load = Load(session, stage.server.url, tag)
        running = asyncio.ensure_future(load.run())
        try:
            await asyncio.sleep(WARM)
            started = time.monotonic()
            ended, note = await fault(stage)
            while True:
                now = time.monotonic()
                if now - max(ended, load.last_bad) >= SETTLE or now - ended >= CAP:
                    break
                await asyncio.sleep(0.1)
            clean = time.monotonic() - max(ended, load.last_bad) >= SETTLE
        finally:
            load.stop()
            await running
        lost = await lost_marks(admin, marks)
    row = tabulate(name, load.answers, started, ended, clean, load.last_bad, lost)
    row.note = note
    if stage.lost_slots:
        row.note += "; " + slot_split(load.answers, stage.lost_slots, stage.salt)
    return row


def slot_split(answers: list[Answer], lost: frozenset[int], salt: bytes) -> str:
    """Degraded answers on the slots a dead node held, and on the healthy nodes' slots (each
    check's keys share its subject's slot: the hash tag is the subject's keyed hash)."""
    keyspace = Keyspace(salt, prefix=PREFIX)
    on_lost = on_healthy = 0
    for answer in answers:
        if not answer.degraded:
            continue
        subject = keyspace.subject((("ip", keyspace.ip_value(answer.subject)),))
        if key_slot(keyspace.ban_key(subject).encode()) in lost:
            on_lost += 1
        else:
            on_healthy += 1
    return (f"degraded answers on the dead master's slots {on_lost}, on the healthy masters' "
            f"slots {on_healthy}")


def tabulate(name: str, answers: list[Answer], started: float, ended: float, clean: bool,
             last_bad: float, lost: list[str]) -> Row:
    row = Row(name, checks=len(answers))
    row.errors = sum(not a.ok for a in answers)
    row.degraded = sum(a.degraded for a in answers)
    abused = [a for a in answers if a.kind == "abuser" and a.allowed]
    row.abusers = f"{len(abused)} ({sum(a.degraded for a in abused)})"
    admitted = Counter(a.subject for a in answers if a.kind == "fresh" and a.allowed)
    fail_open = Counter(a.subject for a in answers
                        if a.kind == "fresh" and a.allowed and a.degraded)
    over = {s: n - FRESH_LIMIT for s, n in admitted.items() if n > FRESH_LIMIT}
    row.fresh_over = (f"{sum(over.values())} "
                      f"({sum(min(n, fail_open[s]) for s, n in over.items())})")
    row.fault = f"{ended - started:.1f} s"
    if not clean:
        row.to_normal = "never"
    else:
        row.to_normal = f"{max(0.0, last_bad - ended):.2f} s"
    row.lost = ", ".join(lost) or "none"
    return row


def print_table(rows: list[Row]) -> None:
    head = ("scenario", "checks", "errors", "degraded", "abusers in", "fresh over",
            "fault", "to normal", "state lost")
    cells = [head] + [(r.name, str(r.checks), str(r.errors), str(r.degraded), r.abusers,
                       r.fresh_over, r.fault, r.to_normal, r.lost) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    for line in cells:
        print("  ".join(c.ljust(w) if i in (0, 8) else c.rjust(w)
                        for i, (c, w) in enumerate(zip(line, widths, strict=True))).rstrip())
    print(f"\nabusers in: abuser checks admitted, all past their limit (in brackets: how many "
          f"were degraded answers; their rule fails closed); fresh over: admissions past "
          f"{FRESH_LIMIT} per fresh subject (in brackets: how many could have been degraded "
          f"fail-open answers); fault: its length; to normal: from the fault's end to the "
          f"last degraded or failed answer (never: not {SETTLE:g} s clean within {CAP:g} s)")
    print()
    for row in rows:
        print(f"{row.name}: {row.note}")


# -- the run -------------------------------------------------------------------------------

async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="comma-separated scenarios: " + ", ".join(ORDER))
    args = parser.parse_args()
    chosen = args.only.split(",") if args.only else ORDER
    unknown = set(chosen) - set(ORDER)
    if unknown:
        parser.error("unknown scenario: " + ", ".join(sorted(unknown)))
    raise_fd_limit()
    token = secrets.token_urlsafe(16)
    rows: list[Row] = []
    logs: list[str] = []
    salt = secrets.token_hex(16)
    env = {"RATEKEEPER_IP_SALT": salt, "RATEKEEPER_KEY_PREFIX": PREFIX,
           "RATEKEEPER_ADMIN_TOKENS": f"chaos:{token}",
           "RATEKEEPER_REDIS_TIMEOUT_MS": ""}  # "": the product's own deadline
    for make_stage, faults in STAGES:
        wanted = [name for name in faults if name in chosen]
        if not wanted:
            continue
        stage = await asyncio.to_thread(make_stage, RULES, env)
        stage.salt = salt.encode()
        try:
            for name in wanted:
                print(f"{name} ...", file=sys.stderr, flush=True)
                try:
                    rows.append(await measure(name, faults[name], stage,
                                              ORDER.index(name) + 1, token))
                except Exception as exc:  # a fault that never ends is a finding too
                    rows.append(Row(name, lost="not measured", note=f"failed: {exc!r}"))
        finally:
            log = stage.server.stop()
            for stop in stage.stoppers:
                stop()
        logs.append(f"server log on {', '.join(wanted)}: "
                    f"{log.count(' WARNING ')} WARNING, {log.count(' ERROR ')} ERROR lines")
    print()
    print_table(rows)
    print()
    print("\n".join(logs))


if __name__ == "__main__":
    uvloop.run(main())
