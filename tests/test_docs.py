"""The README and the docs, as a new user would follow them: every shell and Python snippet runs
as written against servers this test starts, the site builds, and `make run` gives a way in.

A snippet is a fenced ``console``, ``sh``, ``bash`` or ``python`` block of README.md or
docs/*.md, unless the line before it is ``<!-- illustrative -->``. A ``console`` block runs its
``$ `` lines (output lines are what a person would see, not checked); the others run whole. Each
snippet gets a fresh `ratekeeper serve` of examples/pypi.toml on real Redis, with a key prefix
of its own and an admin token in RATEKEEPER_TOKEN; ``8080`` in a snippet is rewritten to that
server's port. A snippet that starts its own server (``ratekeeper serve``) gets a free port for
it instead, and whatever it leaves running is stopped after it. A locust run's ``-t 60s`` is
cut to a few seconds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ratekeeper.config.rules import config_warnings, parse_config

from support.common import EXAMPLE, ROOT
from support.processes import ServerProcess
from support.redis_servers import RedisServer, free_port

DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
RUNNABLE = {"console", "sh", "bash", "shell", "python"}
ILLUSTRATIVE = "<!-- illustrative -->"
TOKEN = "docs-admin-token-5c81e0b2f4"
LOCUST_SECONDS = 5
FENCE = re.compile(r"^```(\S*)\s*$")
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Block:
    """One fenced block of a page."""

    page: Path
    line: int
    lang: str
    text: str
    illustrative: bool

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def starts_a_server(self) -> bool:
        return "ratekeeper serve" in self.text


def blocks(pages: list[Path]) -> Iterator[Block]:
    """Every fenced block of ``pages``, with the language of its fence."""
    for page in pages:
        lines = page.read_text().splitlines()
        i = 0
        while i < len(lines):
            opened = FENCE.match(lines[i])
            if opened is None:
                i += 1
                continue
            before = next((line.strip() for line in reversed(lines[:i]) if line.strip()), "")
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            yield Block(page, i + 1, opened.group(1), "\n".join(lines[i + 1:end]) + "\n",
                        before == ILLUSTRATIVE)
            i = end + 1


ALL_BLOCKS = list(blocks(PAGES))
SNIPPETS = [b for b in ALL_BLOCKS if b.lang in RUNNABLE and not b.illustrative]


def console_commands(text: str) -> str:
    """The commands of a console block: its ``$ `` lines, with their continuation lines."""
    commands: list[str] = []
    continued = False
    for line in text.splitlines():
        if continued:
            commands.append(line)
        elif line.startswith("$ "):
            commands.append(line[2:])
        else:
            continue
        continued = line.endswith("\\")
    return "\n".join(commands) + "\n"


def for_this_run(text: str, port: int) -> str:
    """The snippet with the server's port for 8080 and a short locust run."""
    text = re.sub(r"\b(localhost|127\.0\.0\.1):8080\b", f"127.0.0.1:{port}", text)
    text = text.replace("--port 8080", f"--port {port}")
    return re.sub(r"(\blocust\b.*) -t 60s", rf"\1 -t {LOCUST_SECONDS}s", text)


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM what is left of the process group ``process`` leads, then SIGKILL after 20 s."""
    pid = process.pid
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        process.poll()  # reaps the leader, which would otherwise keep the group alive
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def run_in_group(args: list[str], env: dict[str, str], log: Path,
                 timeout: float = 180) -> tuple[int, str]:
    """Run a command in a process group of its own (output to ``log``, so a background job
    holding it open cannot keep us waiting); stop the group afterwards."""
    with log.open("wb") as out:
        process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        try:
            code = process.wait(timeout)
        finally:
            stop_group(process)
            process.wait(5)
    return code, log.read_text(errors="replace")


@pytest.fixture
def snippet_env(redis_server: RedisServer, key_prefix: str) -> dict[str, str]:
    """What a reader's shell would have: the virtualenv first on PATH, a real Redis, a salt
    and an admin token (as `make run` prints one), the CLI pointed at the server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RATEKEEPER_", "RK_"))}
    env.update({
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RATEKEEPER_REDIS_URL": redis_server.url,
        "RATEKEEPER_IP_SALT": "docs-salt-that-is-long-enough",
        "RATEKEEPER_KEY_PREFIX": key_prefix,
        "RATEKEEPER_ADMIN_TOKENS": f"admin:{TOKEN}",
        "RATEKEEPER_TOKEN": TOKEN,
        "RATEKEEPER_REDIS_TIMEOUT_MS": "2000",
    })
    return env


@pytest.mark.slow
@pytest.mark.parametrize("block", SNIPPETS, ids=[b.id for b in SNIPPETS])
def test_snippet_runs_as_written(block: Block, snippet_env: dict[str, str],
                                 serve_process: Callable[..., ServerProcess],
                                 tmp_path: Path) -> None:
    """The snippet exits 0 with no traceback, against a fresh server of the example config."""
    env = dict(snippet_env)
    # a snippet that starts its own server needs the port free, not another server on it
    port = free_port() if block.starts_a_server else serve_process(EXAMPLE.read_text(), env).port
    env["RATEKEEPER_URL"] = f"http://127.0.0.1:{port}"
    if block.lang == "python":
        script = tmp_path / "snippet.py"
        script.write_text(for_this_run(block.text, port))
        args = [sys.executable, str(script)]
    else:
        body = console_commands(block.text) if block.lang == "console" else block.text
        args = ["bash", "-c", "set -eu\n" + for_this_run(body, port)]
    code, output = run_in_group(args, env, tmp_path / "snippet.log")
    assert code == 0, f"{block.id} exited {code}:\n{output}"
    assert "Traceback" not in output, f"{block.id}:\n{output}"


def test_illustrative_blocks_are_few() -> None:
    """Nearly every command shown is run; only long-running ones are marked illustrative."""
    illustrative = [b.id for b in ALL_BLOCKS if b.lang in RUNNABLE and b.illustrative]
    assert len(illustrative) <= 5, illustrative
    assert len(SNIPPETS) >= 25


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.lang == "toml"],
                         ids=[b.id for b in ALL_BLOCKS if b.lang == "toml"])
def test_toml_blocks_are_valid(block: Block) -> None:
    """Every TOML block parses; one with actions is a valid config that draws no warning."""
    data = tomllib.loads(block.text)
    if "actions" in data:
        config = parse_config(block.text, source=block.id)
        assert config_warnings(config) == []


def test_nginx_block_is_the_example_file() -> None:
    """The nginx setup in the docs is examples/nginx.conf (which tests/test_nginx.py runs),
    less its header comment."""
    shown = [b for b in ALL_BLOCKS if b.lang == "nginx"]
    assert [b.page.name for b in shown] == ["integration.md"]
    lines = (ROOT / "examples" / "nginx.conf").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert shown[0].text == "\n".join(lines[start:]).rstrip() + "\n"


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """`mkdocs build --strict`: every page in the nav, every link and anchor resolves."""
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                           "--site-dir", str(tmp_path / "site")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "check-api" / "index.html").exists()


LINKED = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "loadtest" / "README.md", *DOCS]
LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", LINKED, ids=[str(p.relative_to(ROOT)) for p in LINKED])
def test_links_point_at_files_the_repository_has(page: Path) -> None:
    """Every relative link of README, CHANGELOG, loadtest/README and the docs resolves."""
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{page.relative_to(ROOT)} links to missing {target}"


HISTORY = re.compile(
    r"\bsessions? \d|\bissues? #?\d|\bwork periods?\b|\bPR #?\d|research/|"
    r"\b\d\d:\d\d(:\d\d)? UTC\b|\bas of (session|issue)", re.IGNORECASE)


def bench_help() -> str:
    done = subprocess.run([sys.executable, str(ROOT / "loadtest" / "bench.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("name", ["README.md", "docs", "loadtest/README.md", "Makefile",
                                  "CHANGELOG.md", "bench --help"])
def test_no_development_history(name: str) -> None:
    """No numbered work periods, issue numbers, dated run logs or links into files the
    repository does not have."""
    if name == "bench --help":
        texts = {name: bench_help()}
    elif name == "docs":
        texts = {str(p.relative_to(ROOT)): p.read_text() for p in DOCS}
    else:
        texts = {name: (ROOT / name).read_text()}
    for source, text in texts.items():
        found = [m.group(0) for m in HISTORY.finditer(text)]
        assert not found, f"{source}: {found}"


def test_readme_is_short() -> None:
    """The README is an introduction, not the manual."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_license_matches_pyproject() -> None:
    """LICENSE is the Apache License 2.0 that pyproject.toml declares."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert (project["license"], project["license-files"]) == ("Apache-2.0", ["LICENSE"])
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def make_dry_run(target: str, tmp_path: Path) -> str:
    """What `make TARGET` would run on a fresh machine (a virtualenv that does not exist)."""
    done = subprocess.run(["make", "-n", target, f"VENV={tmp_path / 'venv'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_run_installs_only_the_package_and_make_test_builds_the_docs(
        tmp_path: Path) -> None:
    """`make run` installs the package alone (no dev extras); `make test` installs the dev
    extras, runs pytest and builds the docs strictly."""
    run = make_dry_run("run", tmp_path)
    assert "pip install --quiet -e ." in run and "[dev]" not in run
    assert "ratekeeper serve --config examples/pypi.toml --host 127.0.0.1 --port 8080" in run
    test = make_dry_run("test", tmp_path)
    assert "pip install --quiet -e '.[dev]'" in test
    assert "pytest" in test and "mkdocs build --strict" in test
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["dev"]
    assert {"mkdocs", "mkdocs-material", "locust"} <= {re.split(r"[<>=\[]", d)[0] for d in dev}


def get_json(url: str, token: str) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Poll /readyz until it answers 200 (a process start, not a timing assertion)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"not ready: {log.read_text()}")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_run_prints_a_way_into_the_admin_page(tmp_path: Path) -> None:
    """`make run` (embedded store, no tokens) serves the example config and prints a one-off
    admin token, the admin page's address and an export line; the token opens the admin API."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RATEKEEPER_")}
    stamp = ROOT / ".venv" / ".run-installed"
    current = subprocess.run(["make", "-q", str(stamp.relative_to(ROOT))], cwd=ROOT,
                             capture_output=True).returncode == 0
    # a checkout set up by hand rather than by make: use its virtualenv as it is
    keep = [] if current else ["-o", str(stamp.relative_to(ROOT))]
    log = tmp_path / "make-run.log"
    with log.open("wb") as out:
        process = subprocess.Popen(["make", "--no-print-directory", *keep, "run",
                                    f"PORT={port}"], cwd=ROOT, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, process, log)
        text = log.read_text()
        token = re.search(r"RATEKEEPER_TOKEN=(\S+)", text)
        assert token is not None, text
        assert f"admin page: {url}/admin" in text
        assert "memory://" in text
        flags = get_json(f"{url}/v1/admin/flags", token[1])["flags"]
        assert "disallow-new-user-registration" in {f["name"] for f in flags}
        with urllib.request.urlopen(f"{url}/admin", timeout=5) as page:
            assert page.status == 200
    finally:
        stop_group(process)
        process.wait(5)


@pytest.mark.slow
def test_a_locust_run_leaves_no_kill_switch_on(
        snippet_env: dict[str, str], serve_process: Callable[..., ServerProcess],
        tmp_path: Path) -> None:
    """A locust run that ends in the middle of its kill-switch drill turns the switch off as
    it stops, with an audit event saying so."""
    if importlib.util.find_spec("locust") is None:  # not imported here: it patches the process
        pytest.skip("locust is not installed (make setup installs it)")
    server = serve_process(EXAMPLE.read_text(), snippet_env)
    env = {**snippet_env, "RK_ADMIN_TOKEN": TOKEN, "RK_KILL_AT": "1", "RK_KILL_FOR": "600",
           "RK_SPAM_AT": "600"}
    code, output = run_in_group(
        [str(BIN / "locust"), "-f", "loadtest/locustfile.py", "--headless", "-u", "10", "-r",
         "10", "-t", "4s", "--host", server.url, "--only-summary"], env,
        tmp_path / "locust.log")
    assert "kill switch accepted by the admin API: True" in output, output
    assert code == 0, output
    flags = {f["name"]: f for f in get_json(f"{server.url}/v1/admin/flags", TOKEN)["flags"]}
    assert flags["disallow-new-user-registration"]["enabled"] is False
    events = get_json(f"{server.url}/v1/admin/audit?limit=5", TOKEN)["events"]
    assert events[0]["reason"] == "locust: the run ended"
