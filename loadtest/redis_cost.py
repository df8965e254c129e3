"""What the sidecar costs Redis: commands and CPU (INFO commandstats), memory (MEMORY USAGE)."""

from __future__ import annotations

import random
import re
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import hiredis
import redis

from ratekeeper.config.rules import Config
from ratekeeper.identity.keys import Keyspace
from ratekeeper.storage.scripts import read_script

from procs import ROOT

__all__ = ["DEBUG_ARGS", "CheckCalls", "CommandStats", "cpu_per_decision",
           "fill_counter_subjects", "log_bytes_per_entry", "rehashing", "script_commands",
           "snapshot", "wait_for_rehash"]

STAT = re.compile(r"calls=(\d+),usec=(\d+)")
# redis-server arguments that let this process ask whether the keyspace is being rehashed
DEBUG_ARGS = ("--enable-debug-command", "local")


def script_commands() -> frozenset[str]:
    """Every command ratekeeper's Lua scripts call (INFO counts those calls as well)."""
    names: set[str] = set()
    for path in (ROOT / "lua").glob("*.lua"):
        names.update(m.lower() for m in re.findall(r"redis\.call\('([A-Za-z]+)'",
                                                   path.read_text()))
    return frozenset(names)


@dataclass(frozen=True)
class CommandStats:
    """Calls and usec per command since the server started."""

    calls: dict[str, int]
    usec: dict[str, int]

    def minus(self, before: CommandStats) -> CommandStats:
        """The difference ``self - before``."""
        return CommandStats(
            calls={k: v - before.calls.get(k, 0) for k, v in self.calls.items()},
            usec={k: v - before.usec.get(k, 0) for k, v in self.usec.items()})

    def sent(self, inner: frozenset[str]) -> int:
        """Commands clients sent: script calls plus every command no script runs.

        Commands a script runs are counted by INFO as well; they are not round trips and
        are left out (a GET that a client sends is left out with them, an undercount only
        for commands the sidecar sends besides its scripts, e.g. a periodic flag read).
        The bench's own INFO calls are left out too.
        """
        return sum(v for k, v in self.calls.items() if k not in inner and k != "info")

    def total(self) -> int:
        """Every command Redis executed, those run inside scripts included."""
        return sum(v for k, v in self.calls.items() if k != "info")


def snapshot(client: redis.Redis) -> CommandStats:
    """INFO commandstats now."""
    raw: dict[str, Any] = client.info("commandstats")
    calls, usec = {}, {}
    for name, value in raw.items():
        command = name.removeprefix("cmdstat_").lower()
        if isinstance(value, dict):
            calls[command], usec[command] = int(value["calls"]), int(value["usec"])
        else:
            match = STAT.search(str(value))
            if match:
                calls[command], usec[command] = int(match[1]), int(match[2])
    return CommandStats(calls=calls, usec=usec)


def _resp(*args: bytes | str | int) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class RawPipe:
    """A bare RESP connection for pipelining a million script calls without client overhead."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.reader = hiredis.Reader()
        self.pending = 0

    def send(self, commands: Sequence[bytes]) -> None:
        """Send commands without waiting for their replies (``drain`` reads them)."""
        self.sock.sendall(b"".join(commands))
        self.pending += len(commands)

    def drain(self, keep: int = 0) -> list[Any]:
        """Read replies until at most ``keep`` are outstanding; raise on an error reply."""
        replies: list[Any] = []
        while self.pending > keep:
            reply = self.reader.gets()
            if reply is False:
                self.reader.feed(self.sock.recv(1 << 20))
                continue
            if isinstance(reply, hiredis.ReplyError):
                raise RuntimeError(f"redis: {reply}")
            replies.append(reply)
            self.pending -= 1
        return replies

    def run(self, commands: Sequence[bytes]) -> list[Any]:
        """Send every command in one write and read every reply."""
        self.send(commands)
        return self.drain()

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


def _ipv4(i: int) -> bytes:
    """Keyspace.ip_value of 198.18.0.0 + i with /32 grouping, without parsing a string."""
    return b"4" + bytes([32]) + (0xC6120000 + i).to_bytes(4, "big")


class CheckCalls:
    """The EVALSHA commands the sidecar sends for one hit of each IP of the bench pool.

    The KEYS and ARGV are the ones ``Checker.decide`` builds for ``action`` (one ban key per
    subject, then each rule's state key), ``per_call`` requests to a check.lua call as the
    coalescer sends a batch of that many, encoded as the coalescer encodes them.
    """

    def __init__(self, pipe: RawPipe, config: Config, keyspace: Keyspace, action: str) -> None:
        from ratekeeper.decision.checker import Checker
        from ratekeeper.decision.flags import FlagBoard

        if keyspace.ip_value("198.18.0.7") != _ipv4(7):
            raise RuntimeError("Keyspace.ip_value changed: update loadtest/redis_cost.py")
        no_limiter: Any = None  # only the ARGV plan is wanted: nothing is decided here
        plan = Checker(config, keyspace, no_limiter, FlagBoard(config.flags)).plans[action]
        self.rules = plan.action.rules
        self.keyspace = keyspace
        self.sha = pipe.run([_resp("SCRIPT", "LOAD", read_script("check"))])[0].decode()
        self.rule_set: list[str | int] = [len(plan.rule_args), *plan.rule_args]
        # one request: cost 1, its KEYS (one ban key and the rules' keys), rule set 1
        self.request: list[str | int] = [1, 1 + len(self.rules), 1]

    def commands(self, subjects: range, per_call: int = 1) -> tuple[list[bytes], list[str]]:
        """The commands for ``subjects``, ``per_call`` of them a call, and the counter keys
        they write."""
        from ratekeeper.storage.coalescer import encode_command

        keyspace, commands, written = self.keyspace, [], []
        for start in range(subjects.start, subjects.stop, per_call):
            chunk = range(start, min(start + per_call, subjects.stop))
            keys: list[str] = []
            args: list[str | int] = ["", len(chunk), 1, *self.rule_set]
            for i in chunk:
                subject = keyspace.subject((("ip", _ipv4(i)),))
                counters = [keyspace.counter_key(subject, rule) for rule in self.rules]
                keys += [keyspace.ban_key(subject), *counters]
                args += self.request
                written.extend(counters)
            commands.append(encode_command(b"EVALSHA", self.sha, keys, args))
        return commands, written


def fill_counter_subjects(port: int, config: Config, keyspace: Keyspace, action: str,
                          subjects: range, *, chunk: int = 4000, per_call: int = 16
                          ) -> list[str]:
    """Decide one hit for each IP of ``subjects`` with the real check.lua, ``per_call``
    requests a call, as the sidecar does; a chunk is built while Redis runs the one before.
    The counter keys written."""
    pipe = RawPipe(port)
    calls = CheckCalls(pipe, config, keyspace, action)
    written: list[str] = []
    for start in range(subjects.start, subjects.stop, chunk):
        batch, keys = calls.commands(range(start, min(start + chunk, subjects.stop)), per_call)
        pipe.send(batch)
        pipe.drain(keep=len(batch))  # one chunk stays in flight
        written.extend(keys)
    pipe.drain()
    pipe.close()
    return written


def cpu_per_decision(client: redis.Redis, port: int, config: Config, keyspace: Keyspace,
                     action: str, subjects: range, *, per_call: int = 1,
                     chunk: int = 5000) -> dict[str, float]:
    """Redis's cost of one decision for each IP of ``subjects``, the client idle meanwhile.

    The decisions go ``per_call`` to a check.lua call, as the coalescer sends a batch of
    that many. Every command is built first; then each chunk of decisions is sent and
    waited for, so Redis has a core to itself as far as the machine allows.
    ``commandstats_usec`` is EVALSHA's usec per call (wall time inside the command, inflated
    if Redis is descheduled) divided by the decisions per call; ``cpu_usec`` is the main
    thread's CPU time per decision, parsing and replying included.
    """
    pipe = RawPipe(port)
    calls = CheckCalls(pipe, config, keyspace, action)
    commands, _ = calls.commands(subjects, per_call)
    step = max(1, chunk // per_call)
    before, cpu_before = snapshot(client), _main_thread_cpu(client)
    for start in range(0, len(commands), step):
        pipe.run(commands[start:start + step])
    spent, cpu = snapshot(client).minus(before), _main_thread_cpu(client) - cpu_before
    pipe.close()
    n = spent.calls["evalsha"]
    decisions = len(subjects)
    return {"calls": n, "decisions": decisions, "per_call": decisions / n,
            "commandstats_usec": spent.usec["evalsha"] / decisions,
            "commandstats_usec_per_call": spent.usec["evalsha"] / n,
            "cpu_usec": cpu * 1e6 / decisions}


def rehashing(client: redis.Redis) -> bool | None:
    """Whether db 0's key or expiry table is being rehashed (None: DEBUG is not allowed)."""
    try:
        stats = client.execute_command("DEBUG", "HTSTATS", "0")
    except redis.ResponseError:
        return None
    text = stats.decode() if isinstance(stats, bytes) else str(stats)
    return "rehashing target" in text


def wait_for_rehash(client: redis.Redis, *, timeout: float = 60.0) -> float | None:
    """Wait until the keyspace's hash tables stop rehashing; seconds waited (None: unknown).

    A table that outgrows a power of two (2**20 keys: just past 1,048,576) is moved to one
    twice the size a bucket at a time, by every command that touches it and by a 1 ms slice
    of each `hz` tick: at the default 10 ticks a second, a million keys take about a minute,
    and every key lookup meanwhile costs two tables and a step of the move. Redis does this
    once per doubling of the keyspace, so it is left out of the steady figure (and measured
    on its own): while waiting, `hz` is raised to 100, and restored before returning.
    """
    if rehashing(client) is None:
        return None
    hz = client.config_get("hz").get("hz", "10")
    started = time.monotonic()
    client.config_set("hz", 100)
    try:
        while rehashing(client) and time.monotonic() - started < timeout:
            time.sleep(0.2)
    finally:
        client.config_set("hz", hz)
    return time.monotonic() - started


def _main_thread_cpu(client: redis.Redis) -> float:
    info: dict[str, Any] = client.info("cpu")
    return float(info["used_cpu_user_main_thread"]) + float(info["used_cpu_sys_main_thread"])


def memory_usage(client: redis.Redis, keys: Sequence[str], sample: int,
                 seed: int = 7) -> float:
    """Mean MEMORY USAGE (every element counted: SAMPLES 0) of ``sample`` random keys."""
    chosen = random.Random(seed).sample(list(keys), min(sample, len(keys)))
    pipe = client.pipeline(transaction=False)
    for key in chosen:
        pipe.memory_usage(key, samples=0)
    sizes = [int(v) for v in pipe.execute()]
    return sum(sizes) / len(sizes)


def log_bytes_per_entry(client: redis.Redis, port: int, config: Config, keyspace: Keyspace,
                        rule_name: str, entries: int) -> float:
    """MEMORY USAGE of one sliding log holding ``entries`` hits, divided by ``entries``.

    The hits are 7 ms apart (distinct times, as real hits have), taken with check.lua's
    test clock on the rule's own key name; the limit is set to ``entries`` in ARGV so the
    log keeps them all.
    """
    rule = config.rules[rule_name]
    subject = keyspace.subject((("ip", _ipv4(10**6 + entries)),))
    key = keyspace.counter_key(subject, rule)
    window_ms = rule.windows[0].seconds * 1000
    pipe = RawPipe(port)
    sha = pipe.run([_resp("SCRIPT", "LOAD", read_script("check"))])[0].decode()
    start = int(time.time() * 1000)
    # one request a call: one rule set (6 arguments), then cost 1, one key, rule set 1
    calls = [_resp("EVALSHA", sha, 1, key, start + 7 * i, 1, 1, 6, "l", "0", 0, 1, entries,
                   window_ms, 1, 1, 1) for i in range(entries)]
    replies = pipe.run(calls)
    pipe.close()
    if any(int(r[0][0]) != 1 for r in replies) or client.llen(key) != entries:
        raise RuntimeError("the sliding log did not take every hit")
    usage = client.memory_usage(key, samples=0)
    return int(usage or 0) / entries
