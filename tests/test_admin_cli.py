"""The `ratekeeper` command: the admin commands against a running `ratekeeper serve` and real
Redis, help and version texts, and what `serve` says about admin tokens at start."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

import ratekeeper
from ratekeeper.process.cli import main

from support.admin import ALICE_TOKEN, CONFIG, VICTOR_TOKEN
from support.processes import ServerProcess
from support.redis_servers import RedisServer, free_port

IP = "203.0.113.41"


@pytest.fixture
def server(serve_process: Any, redis_server: RedisServer, key_prefix: str) -> ServerProcess:
    """One `ratekeeper serve` with an admin and a viewer token."""
    env = {"RATEKEEPER_REDIS_URL": redis_server.url, "RATEKEEPER_IP_SALT": "x" * 24,
           "RATEKEEPER_KEY_PREFIX": key_prefix,
           "RATEKEEPER_ADMIN_TOKENS": f"alice:{ALICE_TOKEN}",
           "RATEKEEPER_VIEWER_TOKENS": f"victor:{VICTOR_TOKEN}"}
    process: ServerProcess = serve_process(CONFIG, env)
    return process


@pytest.fixture
def admin_env(server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """RATEKEEPER_URL and RATEKEEPER_TOKEN pointing at the server, as an admin would set."""
    monkeypatch.setenv("RATEKEEPER_URL", server.url)
    monkeypatch.setenv("RATEKEEPER_TOKEN", ALICE_TOKEN)
    yield


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process; exit code, stdout, stderr."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def check(url: str, **fields: Any) -> dict[str, Any]:
    request = urllib.request.Request(f"{url}/v1/check", data=json.dumps(fields).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        body: dict[str, Any] = json.loads(response.read())
    return body


@pytest.mark.slow
def test_flags_on_off_and_list(server: ServerProcess, admin_env: None,
                               capsys: pytest.CaptureFixture[str]) -> None:
    """`flags on` with message, reason and --expires-in 2h blocks the action, `flags list`
    shows a readable table with who and until when, `flags off` undoes it."""
    code, out, _ = run(capsys, "flags", "list")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split()[:4] == ["FLAG", "STATE", "UPDATED", "BY"]
    assert [row.split()[:2] for row in rows] == [["disallow-new-user-registration", "off"],
                                                 ["read-only", "off"], ["shadow-mode", "off"]]

    code, out, _ = run(capsys, "flags", "on", "disallow-new-user-registration",
                       "--message", "Registrations are paused.", "--reason", "spam wave",
                       "--expires-in", "2h")
    assert code == 0 and out.startswith("disallow-new-user-registration is on until ")
    decision = check(server.url, action="register", ip=IP)
    assert (decision["reason"], decision["message"]) == ("disabled", "Registrations are paused.")

    code, out, _ = run(capsys, "flags", "list")
    row = next(line for line in out.splitlines() if line.startswith("disallow-new-user"))
    assert " on " in row and "alice" in row and "Registrations are paused." in row

    code, out, _ = run(capsys, "flags", "off", "disallow-new-user-registration")
    assert (code, out.strip()) == (0, "disallow-new-user-registration is off")
    assert check(server.url, action="register", ip=IP)["allowed"]

    code, out, _ = run(capsys, "audit", "--limit", "5")
    lines = out.splitlines()
    assert lines[0].split() == ["AT", "ACTOR", "KIND", "TARGET", "DETAIL", "REASON"]
    assert "enabled=False" in lines[1] and "enabled=True" in lines[2]
    assert "spam wave" in lines[2] and "expires_in=7200" in lines[2]


@pytest.mark.slow
def test_bans_add_list_lift(server: ServerProcess, admin_env: None,
                            capsys: pytest.CaptureFixture[str]) -> None:
    """`bans add ip …` bans (and prints the id), `bans list` shows the hash not the IP,
    `bans lift ID` lifts it; `top` and `reset` work too."""
    code, out, _ = run(capsys, "bans", "add", "ip", IP, "--duration", "1h", "--reason", "spam")
    assert code == 0 and out.startswith("banned ip as ")
    ban_id = out.split()[3]
    assert check(server.url, action="register", ip=IP)["reason"] == "banned"

    code, out, _ = run(capsys, "bans", "list")
    assert code == 0 and ban_id in out and IP not in out and "spam" in out

    code, out, _ = run(capsys, "bans", "lift", ban_id, "--reason", "appeal")
    assert (code, out.strip()) == (0, f"lifted {ban_id}")
    assert check(server.url, action="register", ip=IP)["allowed"]

    for _ in range(4):
        check(server.url, action="register", ip=IP)
    code, out, _ = run(capsys, "top", "per-ip")
    assert code == 0 and out.splitlines()[1].split()[1] == "2" and IP not in out
    code, out, _ = run(capsys, "reset", "--action", "register", f"ip={IP}", "--reason", "ok")
    assert code == 0 and "per-ip" in out
    assert check(server.url, action="register", ip=IP)["allowed"]

    code, out, _ = run(capsys, "bans", "list", "--json")
    assert json.loads(out) == {"bans": []}


@pytest.mark.slow
def test_failures_exit_non_zero_with_a_clear_message(
        server: ServerProcess, admin_env: None, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A refused token, a viewer trying a change, an unknown flag, a bad duration, no token
    and an unreachable server each exit non-zero with one line on stderr, nothing on stdout."""
    cases = [
        (("flags", "on", "read-only", "--token", "wrong"), 1, "failed with 401: a valid admin"),
        (("flags", "on", "read-only", "--token", VICTOR_TOKEN), 1, "403: token 'victor' may "
                                                                   "only read"),
        (("flags", "on", "no-such-flag"), 1, "failed with 404: unknown flag"),
        (("bans", "add", "ip", "1.2.3", "--duration", "60"), 1, "failed with 400: "),
        (("bans", "add", "ip", IP, "--duration", "soon"), 2, "--duration: 'soon' is not a"),
        (("bans", "lift", "AAAAAAAAAAAAAAAAAAAAAA"), 1, "failed with 404: no active ban"),
        (("audit", "--url", f"http://127.0.0.1:{free_port()}"), 1, "cannot reach"),
    ]
    for args, expected_code, needle in cases:
        code, out, err = run(capsys, *args)
        assert (code, out) == (expected_code, ""), args
        assert err.startswith("ratekeeper: ") and needle in err, (args, err)
        assert len(err.strip().splitlines()) == 1
    # the viewer token may read
    code, out, _ = run(capsys, "flags", "list", "--token", VICTOR_TOKEN)
    assert code == 0 and "read-only" in out
    monkeypatch.delenv("RATEKEEPER_TOKEN")
    code, out, err = run(capsys, "flags", "list")
    assert (code, out) == (2, "") and "RATEKEEPER_TOKEN" in err
    assert check(server.url, action="register", ip=IP)["allowed"]  # nothing changed


@pytest.mark.slow
def test_the_installed_command(server: ServerProcess) -> None:
    """`python -m ratekeeper flags on …` as a separate process, configured by --url/--token."""
    base = [sys.executable, "-m", "ratekeeper"]
    done = subprocess.run([*base, "flags", "on", "read-only", "--url", server.url,
                           "--token", ALICE_TOKEN], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "read-only is on"
    assert check(server.url, action="register", ip=IP)["reason"] == "disabled"
    failed = subprocess.run([*base, "flags", "off", "read-only", "--url", server.url,
                             "--token", "nope"], capture_output=True, text=True, timeout=30)
    assert failed.returncode == 1 and "401" in failed.stderr
    assert check(server.url, action="register", ip=IP)["reason"] == "disabled"


WIRE = """
[tripwires.register-flood]
action = "register"
count = "all"
threshold = "4 per hour"
flag = "disallow-new-user-registration"
duration = "1 hour"
"""


@pytest.mark.slow
def test_tripwires_list_disarm_and_arm(serve_process: Any, redis_server: RedisServer,
                                       key_prefix: str, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """`tripwires list` shows each wire armed, with its count against its threshold;
    `tripwires disarm` (with a reason) and `tripwires arm` change it; re-armed, a wave
    trips it, which turns its flag on and shows in the list; an unknown wire exits 1."""
    env = {"RATEKEEPER_REDIS_URL": redis_server.url, "RATEKEEPER_IP_SALT": "x" * 24,
           "RATEKEEPER_KEY_PREFIX": key_prefix,
           "RATEKEEPER_ADMIN_TOKENS": f"alice:{ALICE_TOKEN}"}
    server: ServerProcess = serve_process(CONFIG + WIRE, env)
    monkeypatch.setenv("RATEKEEPER_URL", server.url)
    monkeypatch.setenv("RATEKEEPER_TOKEN", ALICE_TOKEN)
    code, out, _ = run(capsys, "tripwires", "list")
    assert code == 0
    header, row = out.splitlines()
    assert header.split()[:3] == ["TRIPWIRE", "STATE", "COUNT"]
    assert row.split()[:3] == ["register-flood", "armed", "0/4"]

    code, out, _ = run(capsys, "tripwires", "disarm", "register-flood", "--reason", "import")
    assert (code, out) == (0, "register-flood is disarmed\n")
    assert run(capsys, "tripwires", "list")[1].splitlines()[1].split()[1] == "disarmed"
    code, out, _ = run(capsys, "tripwires", "arm", "register-flood")
    assert (code, out) == (0, "register-flood is armed\n")

    for n in range(5):
        check(server.url, action="register", ip=f"198.51.100.{n + 1}")
    deadline = time.monotonic() + 10
    while "tripped" not in run(capsys, "tripwires", "list")[1]:
        assert time.monotonic() < deadline, "the wave did not trip the wire"
        time.sleep(0.1)
    assert check(server.url, action="register", ip="198.51.100.9")["reason"] == "disabled"
    code, _, err = run(capsys, "tripwires", "arm", "nope")
    assert code == 1 and "404" in err


def test_version_and_help_texts(capsys: pytest.CaptureFixture[str]) -> None:
    """`--version` names the version; `--help` is plain text (no module names, no rst
    markup) and lists every command; `serve --help` explains --host, --port and --workers."""
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"ratekeeper {ratekeeper.__version__}"

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert ".py" not in text and "``" not in text
    for command in ("serve", "check-config", "flags", "bans", "audit", "top", "reset",
                    "tripwires"):
        assert f"    {command}" in text

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--host HOST address to listen on (default: 127.0.0.1)" in text
    assert "--port PORT TCP port to listen on (default: 8080)" in text
    assert "--workers N worker processes sharing the port" in text


def cli_into_closed_pipe(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI with its stdout a pipe whose reader has already gone, as `| head` leaves
    it once it has read enough."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([sys.executable, "-m", "ratekeeper", *args], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=30)
    finally:
        os.close(write)


@pytest.mark.slow
def test_a_closed_pipe_ends_quietly(server: ServerProcess) -> None:
    """`ratekeeper flags list | head -2` and `ratekeeper --help | head -2`: the reader going
    away ends the command without a traceback."""
    done = cli_into_closed_pipe("flags", "list", "--url", server.url, "--token", ALICE_TOKEN)
    assert (done.returncode, done.stderr) == (1, "")
    done = cli_into_closed_pipe("--help")
    assert done.stderr == ""


@pytest.mark.slow
def test_times_read_as_iso_8601_and_empty_tables_say_none(
        server: ServerProcess, admin_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    """Empty lists print "none" rather than a bare header; the audit table shows its times,
    including those inside the detail, as ISO 8601 in UTC, and nested details as name:value."""
    assert run(capsys, "bans", "list") == (0, "none (no active bans)\n", "")
    code, out, _ = run(capsys, "top", "per-ip")
    assert (code, out) == (0, "none (per-ip denied no one in the last hour)\n")

    code, out, _ = run(capsys, "bans", "add", "user", "dora", "--duration", "1d")
    ban_id = out.split()[3]
    code, out, _ = run(capsys, "audit", "--limit", "1")
    assert code == 0
    row = out.splitlines()[1]
    iso = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
    assert re.match(iso + " ", row), row
    assert re.search(f"expires_at={iso}( |$)", row), row
    run(capsys, "bans", "lift", ban_id)

    run(capsys, "reset", "--action", "register", f"ip={IP}")
    code, out, _ = run(capsys, "audit", "--limit", "1")
    row = out.splitlines()[1]
    assert re.search(r"subjects=per-ip:[\w-]{22}( |$)", row) and "{" not in row, row


@pytest.mark.slow
@pytest.mark.parametrize(("duration", "seconds"), [
    ("3600", 3600), ("90s", 90), ("2h", 7200), ("1d", 86400), ("1 day", 86400),
    (" 30m ", 1800)])
def test_durations_accepted_alike(server: ServerProcess, admin_env: None, duration: str,
                                  seconds: int, capsys: pytest.CaptureFixture[str]) -> None:
    """`bans add --duration` takes plain seconds and a number with a unit alike."""
    code, out, err = run(capsys, "bans", "add", "user", "dora", "--duration", duration,
                         "--json")
    assert code == 0, err
    ban = json.loads(out)
    assert round(ban["expires_at"] - ban["created_at"]) == seconds
    run(capsys, "bans", "lift", ban["id"])


def serve_log(process: ServerProcess) -> str:
    """What the server has written so far."""
    return process.log.read_text()


@pytest.mark.slow
def test_embedded_store_without_tokens_makes_a_one_off_admin_token(
        serve_process: Any) -> None:
    """With memory:// and no tokens, serve prints a one-off admin token and how to sign in;
    that token works on the admin API. It is printed once, never logged again."""
    process: ServerProcess = serve_process(CONFIG, {"RATEKEEPER_REDIS_URL": "memory://",
                                                    "RATEKEEPER_ADMIN_TOKENS": "",
                                                    "RATEKEEPER_VIEWER_TOKENS": ""})
    log = serve_log(process)
    token = re.search(r"RATEKEEPER_TOKEN=(\S+)", log)
    assert token is not None, log
    assert f"admin page: {process.url}/admin" in log
    assert f"export RATEKEEPER_URL={process.url} RATEKEEPER_TOKEN=" in log
    assert log.count(token[1]) == 2  # the export line and the token line
    request = urllib.request.Request(f"{process.url}/v1/admin/flags",
                                     headers={"Authorization": f"Bearer {token[1]}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200


@pytest.mark.slow
def test_no_one_off_token_with_a_real_redis_and_short_tokens_warned(
        serve_process: Any, redis_server: RedisServer, key_prefix: str) -> None:
    """With a real Redis and no tokens nothing is made up (the admin API refuses everyone);
    a configured token under 16 characters draws a warning naming its owner, not the token."""
    base = {"RATEKEEPER_REDIS_URL": redis_server.url, "RATEKEEPER_IP_SALT": "x" * 24,
            "RATEKEEPER_KEY_PREFIX": key_prefix, "RATEKEEPER_VIEWER_TOKENS": ""}
    bare = serve_process(CONFIG, {**base, "RATEKEEPER_ADMIN_TOKENS": ""})
    assert "one-off" not in serve_log(bare) and "RATEKEEPER_TOKEN=" not in serve_log(bare)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{bare.url}/v1/admin/flags", timeout=5)
    refused.value.close()
    assert refused.value.code == 401

    short = serve_process(CONFIG, {**base, "RATEKEEPER_ADMIN_TOKENS": "bob:k9z2q"})
    log = serve_log(short)
    assert "RATEKEEPER_ADMIN_TOKENS: the token of 'bob' is shorter than 16 characters" in log
    assert "k9z2q" not in log and "one-off" not in log
