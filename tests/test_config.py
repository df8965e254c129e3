"""The rules file: the example is valid, and every kind of mistake is named with file and key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ratekeeper.config.rules import (
    Window,
    config_warnings,
    load_config,
    parse_config,
    parse_duration,
)
from ratekeeper.errors import ConfigError

from support.common import EXAMPLE

GOOD = """
[rules.r]
limit = "5 per 5 minutes, 20 per hour"
key = ["ip"]
[actions.a]
rules = ["r"]
flags = ["f"]
[flags.f]
description = "d"
"""


def test_example_config_mirrors_warehouse() -> None:
    """examples/pypi.toml loads, with Warehouse's limits and flag names."""
    config = load_config(EXAMPLE)
    assert config.rules["login-ip"].windows == (Window(10, 300),)
    assert config.rules["2fa-user"].windows == (Window(5, 300), Window(20, 3600),
                                                Window(50, 86400))
    assert config.rules["project-create-user"].windows == (Window(4, 86400),)
    assert config.rules["login-global"].key == ()
    assert set(config.flags) >= {"read-only", "disallow-new-user-registration",
                                 "disallow-new-project-registration", "disallow-new-upload",
                                 "disallow-deletion", "disallow-oidc"}
    assert config.subjects == {"ip", "user", "project"}


def test_two_windows_parse_and_sort() -> None:
    """'5 per 5 minutes, 20 per hour' is two windows, shortest first."""
    rule = parse_config(GOOD).rules["r"]
    assert rule.windows == (Window(5, 300), Window(20, 3600))
    assert rule.algorithm == "sliding-log" and rule.fail == "open" and not rule.shadow


CASES = [
    ("unknown top-level key", GOOD + "\n[extra]\n", "t.toml: extra: unknown key"),
    ("unknown rule key", GOOD.replace('key = ["ip"]', 'key = ["ip"]\nlimt = "x"'),
     "t.toml: rules.r.limt: unknown key"),
    ("unparsable limit", GOOD.replace("5 per 5 minutes, 20 per hour", "lots"),
     't.toml: rules.r.limit: cannot parse "lots"'),
    ("zero limit", GOOD.replace("5 per 5 minutes, 20 per hour", "0 per minute"),
     "t.toml: rules.r.limit: every limit must allow at least 1 hit"),
    ("same window twice", GOOD.replace("5 per 5 minutes, 20 per hour",
                                       "5 per minute; 7 per minute"),
     "t.toml: rules.r.limit: two limits share the 60-second window"),
    ("missing limit", GOOD.replace('limit = "5 per 5 minutes, 20 per hour"\n', ""),
     "t.toml: rules.r.limit: is required"),
    ("missing key", GOOD.replace('key = ["ip"]\n', ""), "t.toml: rules.r.key: is required"),
    ("key not a list", GOOD.replace('key = ["ip"]', 'key = "ip"'),
     "t.toml: rules.r.key: must be a list"),
    ("reserved key field", GOOD.replace('key = ["ip"]', 'key = ["cost"]'),
     't.toml: rules.r.key: "cost" is not a usable subject field name'),
    ("bad algorithm", GOOD.replace('key = ["ip"]', 'key = ["ip"]\nalgorithm = "gcra"'),
     't.toml: rules.r.algorithm: must be one of "sliding-log", "sliding-counter"'),
    ("bad fail mode", GOOD.replace('key = ["ip"]', 'key = ["ip"]\nfail = "maybe"'),
     "t.toml: rules.r.fail: must be one of"),
    ("bad shadow", GOOD.replace('key = ["ip"]', 'key = ["ip"]\nshadow = "yes"'),
     "t.toml: rules.r.shadow: must be true or false"),
    ("bad penalty", GOOD.replace('key = ["ip"]', 'key = ["ip"]\npenalty = "a while"'),
     "t.toml: rules.r.penalty: 'a while' is not a duration"),
    ("undeclared rule", GOOD.replace('rules = ["r"]', 'rules = ["r", "nope"]'),
     't.toml: actions.a.rules: "nope" is not a declared rule'),
    ("undeclared flag", GOOD.replace('flags = ["f"]', 'flags = ["g"]'),
     't.toml: actions.a.flags: "g" is not a declared flag'),
    ("bad name", GOOD.replace("[rules.r]", '[rules."R r"]').replace('["r"]', '["R r"]'),
     "t.toml: rules.R r: names use"),
    # `$` matched before a trailing newline: such a rule name passed check-config, then
    # broke every answer's RateLimit header (and, with allowed.py's forms, building the
    # Checker: `serve` could not start)
    ("name ending in a newline",
     GOOD.replace("[rules.r]", '[rules."r\\n"]').replace('["r"]', '["r\\n"]'),
     "t.toml: rules.r\n: names use"),
    # the same for a subject field: it passed, then msgspec.defstruct refused it at start
    ("subject field ending in a newline", GOOD.replace('key = ["ip"]', 'key = ["user\\n"]'),
     't.toml: rules.r.key: "user\n" is not a usable subject field name'),
    ("no actions", '[rules.r]\nlimit = "1/second"\nkey = []\n',
     "t.toml: actions: at least one action is required"),
    ("route to unknown action",
     GOOD + '\n[[routes]]\nmethod = "POST"\npath = "/x"\naction = "zz"\n',
     't.toml: routes[0].action: "zz" is not a declared action'),
    ("route bad method", GOOD + '\n[[routes]]\nmethod = "FETCH"\npath = "/x"\naction = "a"\n',
     "t.toml: routes[0].method: must be an HTTP method"),
    ("route bad path", GOOD + '\n[[routes]]\npath = "x"\naction = "a"\n',
     "t.toml: routes[0].path: must be a path glob"),
    ("ip prefix out of range", GOOD + "\n[ip]\nipv6_prefix = 200\n",
     "t.toml: ip.ipv6_prefix: must be an integer from 16 to 128"),
    ("invalid toml", "[rules.r\n", "t.toml: invalid TOML"),
]


@pytest.mark.parametrize(("name", "text", "message"), CASES, ids=[c[0] for c in CASES])
def test_every_mistake_names_file_and_key(name: str, text: str, message: str) -> None:
    """Each mistake raises ConfigError whose text names the file and the key."""
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="t.toml")
    assert any(line.startswith(message) for line in caught.value.errors), caught.value.errors


def test_all_errors_are_reported_together() -> None:
    """Several mistakes in one file are all listed."""
    text = GOOD.replace('key = ["ip"]', 'key = ["ip"]\nfail = "x"\nshadow = 3')
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="t.toml")
    assert len(caught.value.errors) == 2


@pytest.mark.parametrize(("text", "seconds"), [
    (3600, 3600), ("90s", 90), ("2h", 7200), ("1 hour", 3600), ("30 minutes", 1800),
    ("1d", 86400), ("2 weeks", 1209600)])
def test_durations(text: object, seconds: int) -> None:
    """Durations accept seconds and short or long unit names."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", [-1, True, "x", "5 fortnights", 1.5, ""])
def test_bad_durations(text: object) -> None:
    """Anything else is a ValueError with a hint."""
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ratekeeper", *args], capture_output=True,
                          text=True, timeout=30)


def test_check_config_ok_exits_0() -> None:
    """check-config on the example exits 0 and summarises it."""
    out = run_cli("check-config", str(EXAMPLE))
    assert out.returncode == 0
    assert "ok" in out.stdout


def test_check_config_errors_exit_1(tmp_path: Path) -> None:
    """check-config lists every error with file and key, and exits 1."""
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace('rules = ["r"]', 'rules = ["nope"]').replace(
        'key = ["ip"]', 'key = ["ip"]\ncolour = 1'))
    out = run_cli("check-config", str(bad))
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert f"{bad}: rules.r.colour: unknown key" in lines[0]
    assert f'{bad}: actions.a.rules: "nope" is not a declared rule' in lines[1]


def test_check_config_missing_file_exits_1(tmp_path: Path) -> None:
    """A missing file is an error naming the file."""
    out = run_cli("check-config", str(tmp_path / "none.toml"))
    assert out.returncode == 1
    assert "none.toml: cannot read the file" in out.stderr


def test_check_config_warns_and_exits_0(tmp_path: Path) -> None:
    """A valid file with a misspelt subject field, an unused rule, an unused flag and an
    action that does nothing passes (exit 0), with one "warning:" line per finding naming the
    file and the key."""
    odd = tmp_path / "odd.toml"
    odd.write_text(GOOD + """
[rules.by-user]
limit = "5 per minute"
key = ["user"]
[rules.by-usr]
limit = "5 per minute"
key = ["usr"]
[rules.spare]
limit = "5 per minute"
key = ["ip"]
[actions.login]
rules = ["by-user", "by-usr"]
[actions.noop]
rules = []
[flags.forgotten]
description = "never listed"
""")
    out = run_cli("check-config", str(odd))
    assert out.returncode == 0, out.stderr
    assert "4 warnings" in out.stdout
    warnings = out.stderr.strip().splitlines()
    assert sorted(line.split(": warning: ")[0] for line in warnings) == [
        f"{odd}: actions.noop", f"{odd}: flags.forgotten", f"{odd}: rules.by-usr.key",
        f"{odd}: rules.spare"]
    typo = next(line for line in warnings if "rules.by-usr.key" in line)
    assert '"usr" looks like a misspelling of "user"' in typo


@pytest.mark.parametrize("key", ['["usr"]', '["ips"]', '["prject"]', '["user", "porject"]'])
def test_a_subject_one_edit_from_a_common_one_is_flagged(key: str) -> None:
    """A key field one edit (or one swap) away from ip, user or project is flagged."""
    config = parse_config(GOOD.replace('key = ["ip"]', f"key = {key}"), source="t.toml")
    assert [w for w in config_warnings(config) if "rules.r.key" in w], config_warnings(config)


@pytest.mark.parametrize("key", ['["user"]', '["org"]', '["project_id"]', '["id"]',
                                 '["email", "owner"]'])
def test_deliberate_subjects_draw_no_warning(key: str) -> None:
    """Common fields, short names and names far from any other field are left alone."""
    config = parse_config(GOOD.replace('key = ["ip"]', f"key = {key}"), source="t.toml")
    assert config_warnings(config) == []


def test_a_field_beside_a_more_used_one_is_flagged() -> None:
    """Of two uncommon fields one edit apart, the one fewer rules use is the suspect."""
    text = GOOD + """
[rules.a1]
limit = "1 per minute"
key = ["tenant"]
[rules.a2]
limit = "1 per minute"
key = ["tenant"]
[rules.a3]
limit = "1 per minute"
key = ["tenent"]
[actions.b]
rules = ["a1", "a2", "a3"]
"""
    warnings = config_warnings(parse_config(text, source="t.toml"))
    assert len(warnings) == 1 and 'rules.a3.key: warning: "tenent"' in warnings[0]


def test_a_tripwire_whose_flag_blocks_nothing_is_flagged() -> None:
    """A tripwire turning on a flag no action lists (a banner only, notify = true, included)
    is warned about; one whose flag an action lists or the origin reads (origin = true) is
    not."""
    text = GOOD + """
[flags.banner]
description = "b"
notify = true
[flags.scanning]
description = "s"
origin = true
""" + "".join(f"""
[tripwires.t-{flag}]
action = "a"
threshold = "100 per minute"
flag = "{flag}"
duration = "1 hour"
""" for flag in ("f", "banner", "scanning"))
    warnings = config_warnings(parse_config(text, source="t.toml"))
    assert warnings == ['t.toml: tripwires.t-banner.flag: warning: no action lists flag '
                        '"banner", so a trip blocks nothing (unless the origin reads it: then '
                        'set origin = true on it)']


def test_the_example_config_draws_no_warning() -> None:
    """examples/pypi.toml uses every rule and flag it declares; shadow-mode is built in."""
    assert config_warnings(load_config(EXAMPLE)) == []
    out = run_cli("check-config", str(EXAMPLE))
    assert (out.returncode, out.stderr) == (0, "")
