"""Metrics summed over workers with no subject labels; JSON-lines logs without raw IPs."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

import aiohttp
import pytest

from ratekeeper.decision.observe import DenialLog

from support.common import sample
from support.redis_servers import RedisServer

CONFIG = """
[rules.per-ip]
limit = "3 per minute"
key = ["ip"]
[actions.login]
rules = ["per-ip"]
flags = ["stop"]
[flags.stop]
description = "stop logins"
"""
TOKEN = "observability-admin-token"


def env(redis_server: RedisServer, prefix: str, **extra: str) -> dict[str, str]:
    return {"RATEKEEPER_REDIS_URL": redis_server.url, "RATEKEEPER_IP_SALT": "observe-salt-0123456",
            "RATEKEEPER_KEY_PREFIX": prefix, "RATEKEEPER_ADMIN_TOKENS": f"alice:{TOKEN}",
            "RATEKEEPER_REDIS_TIMEOUT_MS": "2000", **extra}


async def test_metrics_sum_over_two_workers_and_carry_no_subject(
        serve_process: Any, redis_server: RedisServer, key_prefix: str) -> None:
    """Decisions counted by action, rule and outcome across both workers; no IP or hash."""
    server = serve_process(CONFIG, env(redis_server, key_prefix), workers=2)
    ips = [f"198.51.100.{i}" for i in range(10)]
    connector = aiohttp.TCPConnector(force_close=True)  # spread over both workers
    async with aiohttp.ClientSession(connector=connector) as session:

        async def decide(ip: str) -> None:
            async with session.post(f"{server.url}/v1/check",
                                    json={"action": "login", "ip": ip}) as resp:
                assert resp.status == 200

        async def pid() -> int:
            async with session.get(f"{server.url}/healthz") as resp:
                return int((await resp.json())["pid"])

        pids: set[int] = set()
        for _ in range(100):  # until both workers have answered (the second may start late)
            pids.update(await asyncio.gather(*(pid() for _ in range(8))))
            if len(pids) == 2:
                break
            await asyncio.sleep(0.05)
        # all at once, so both workers take some: 3 allowed, 2 rate limited per IP
        await asyncio.gather(*(decide(ip) for ip in ips for _ in range(5)))
        for _ in range(40):  # each worker adds its counts to the shared ones once a second
            async with session.get(f"{server.url}/metrics") as resp:
                assert resp.status == 200
                text = await resp.text()
            allowed = sample(text, "ratekeeper_decisions_total", action="login",
                             outcome="allowed")
            limited = sample(text, "ratekeeper_decisions_total", action="login",
                             rule="per-ip", outcome="rate_limited")
            if allowed + limited >= 50:
                break
            await asyncio.sleep(0.1)
    assert len(pids) == 2
    assert (allowed, limited) == (30, 20)
    # one observation per check.lua call: the 50 concurrent checks went as fewer calls
    assert 1 <= sample(text, "ratekeeper_redis_seconds_count", op="check") <= 50
    assert "ratekeeper_circuit_breaker_state" in text
    assert sample(text, "ratekeeper_flag_enabled", flag="stop") == 0
    for ip in ips:
        assert ip not in text
    assert not re.search(r'"[A-Za-z0-9_-]{22}"', text)  # no subject hash as a label value


async def test_json_logs_denials_hashed_sampled_and_admin_actor(
        serve_process: Any, redis_server: RedisServer, key_prefix: str) -> None:
    """JSON lines: a denial names action, rule and hashed subject (one line per kind of
    denial per 10 s: the second rate_limited denial is only counted); admin changes name
    the actor."""
    server = serve_process(CONFIG, env(redis_server, key_prefix, RATEKEEPER_LOG_FORMAT="json"))
    ip = "2001:db8:77::5"
    async with aiohttp.ClientSession() as session:
        for _ in range(5):
            async with session.post(f"{server.url}/v1/check",
                                    json={"action": "login", "ip": ip}) as resp:
                assert resp.status == 200
        async with session.put(f"{server.url}/v1/admin/flags/stop",
                               json={"enabled": True, "reason": "spam wave"},
                               headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            assert resp.status == 200
        async with session.post(f"{server.url}/v1/check",
                                json={"action": "login", "ip": ip}) as resp:
            assert (await resp.json())["reason"] == "disabled"
    log = server.stop()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert lines and all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
    denials = [line for line in lines if line["logger"] == "ratekeeper.decisions"]
    assert [d["reason"] for d in denials] == ["rate_limited", "disabled"]
    assert denials[0]["rule"] == "per-ip" and denials[0]["action"] == "login"
    assert denials[0]["suppressed"] == 0
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", denials[0]["subjects"]["ip"])
    assert denials[1]["flag"] == "stop"
    assert any("alice" in line["msg"] for line in lines if "flag" in line["msg"])
    assert "2001:db8" not in log and TOKEN not in log


def test_denial_log_writes_one_line_per_kind_per_interval_and_counts_the_rest() -> None:
    """The first denial of a kind is logged; repeats within the interval are counted and
    reported by the next line of that kind; other kinds are independent; memory is bounded."""
    now = [1000.0]
    sampler = DenialLog(lambda: now[0], every=10.0, max_tracked=3)
    assert sampler.admit("a") == 0
    assert [sampler.admit("a") for _ in range(4)] == [None] * 4
    assert sampler.admit("b") == 0
    now[0] += 9.9
    assert sampler.admit("a") is None
    now[0] += 0.1
    assert sampler.admit("a") == 5  # the five not written since the first line
    assert sampler.admit("a") is None
    assert sampler.admit("c") == 0
    assert sampler.admit("d") == 0  # a fourth kind: the table starts over
    assert sampler.admit("a") == 0 and len(sampler._seen) == 2


async def test_a_batch_counts_every_decision(make_client: Any) -> None:
    """Every decision of a batch reaches the metrics: 3 allowed and 2 limited per IP, by
    action, deciding rule and outcome."""
    client = await make_client(CONFIG)
    checks = [{"action": "login", "ip": f"192.0.2.{i}"} for i in (1, 2) for _ in range(5)]
    resp = await client.post("/v1/check/batch", json={"checks": checks})
    assert resp.status == 200
    assert [r["allowed"] for r in (await resp.json())["results"]] == [True] * 3 + [False] * 2 + [
        True] * 3 + [False] * 2
    text = await (await client.get("/metrics")).text()
    assert sample(text, "ratekeeper_decisions_total", action="login", outcome="allowed") == 6
    assert sample(text, "ratekeeper_decisions_total", action="login", rule="per-ip",
                  outcome="rate_limited") == 4


SPAM_CONFIG = """
[rules.signup-ip]
limit = "1 per minute"
key = ["ip"]
penalty = "1 hour"
[rules.signup-user]
limit = "5 per minute"
key = ["user"]
[actions.signup]
rules = ["signup-ip", "signup-user"]
flags = ["stop-signups"]
[flags.stop-signups]
description = "stop signups"
"""


async def test_a_wave_with_rotating_names_logs_one_line_per_culprit(
        make_client: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A boxed IP sending 30 signups under 30 user names is one `banned` line naming the IP's
    hash alone (not one line per name); a kill switch's denials are one line per flag."""
    from ratekeeper.decision.flags import FlagState
    from ratekeeper.server.state import RUNTIME

    client = await make_client(SPAM_CONFIG)
    caplog.set_level(logging.INFO, logger="ratekeeper.decisions")

    async def signup(i: int) -> dict[str, Any]:
        resp = await client.post("/v1/check", json={"action": "signup", "ip": "192.0.2.7",
                                                    "user": f"spam-{i}"})
        body: dict[str, Any] = await resp.json()
        return body

    reasons = [(await signup(i))["reason"] for i in range(32)]
    assert reasons[:3] == [None, "rate_limited", "banned"] and set(reasons[2:]) == {"banned"}
    lines = [r for r in caplog.records if r.name == "ratekeeper.decisions"]
    assert [(r.reason, r.rule) for r in lines] == [("rate_limited", "signup-ip"),  # type: ignore[attr-defined]
                                                   ("banned", "signup-ip")]
    banned = lines[1]
    assert list(banned.subjects) == ["ip"]  # type: ignore[attr-defined]
    assert banned.subjects["ip"] == lines[0].subjects["ip"]  # type: ignore[attr-defined]

    caplog.clear()
    client.app[RUNTIME].flags.update(FlagState("stop-signups", enabled=True))
    assert {(await signup(100 + i))["reason"] for i in range(20)} == {"disabled"}
    lines = [r for r in caplog.records if r.name == "ratekeeper.decisions"]
    assert len(lines) == 1 and lines[0].flag == "stop-signups"  # type: ignore[attr-defined]
