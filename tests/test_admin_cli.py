"""`ratekeeper flags|bans|audit|top|reset` against a running `ratekeeper serve` and real Redis."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from ratekeeper.cli import main

from admin_support import ALICE_TOKEN, CONFIG, VICTOR_TOKEN
from conftest import ServerProcess
from redis_servers import RedisServer, free_port

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
        (("flags", "on", "no-such-flag"), 1, "failed with 404: unknown flag 'no-such-flag'"),
        (("bans", "add", "ip", "1.2.3", "--duration", "60"), 1, "400: ip is not a valid"),
        (("bans", "add", "ip", IP, "--duration", "soon"), 2, "--duration: 'soon' is not a"),
        (("bans", "lift", "AAAAAAAAAAAAAAAAAAAAAA"), 1, "404: no active ban"),
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
