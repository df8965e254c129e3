"""The ``ratekeeper`` command: ``serve``, ``check-config`` and the admin commands."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import secrets
import sys
import tempfile
from collections.abc import Sequence

from ratekeeper._version import __version__
from ratekeeper.admin import cli as admin_cli
from ratekeeper.config.rules import Config, config_warnings, load_config
from ratekeeper.errors import ConfigError, SettingsError
from ratekeeper.logs import configure_logging
from ratekeeper.settings import AdminToken, Settings

__all__ = ["main"]

log = logging.getLogger("ratekeeper")

# A token shorter than this can be guessed by a patient script against the admin API.
MIN_TOKEN_LENGTH = 16
ONE_OFF_ADMIN = "local-admin"

DESCRIPTION = """\
Rate limiting and abuse control sidecar: serve the check API, validate a rules file, and
manage kill switches, bans and counters through the admin API."""

EPILOG = """\
environment:
  RATEKEEPER_REDIS_URL     redis://, rediss://, redis+cluster://, redis+sentinel:// or memory://
                           (the default: in-process, one worker, nothing shared or kept)
  RATEKEEPER_IP_SALT       secret for hashing client addresses (required with a real Redis)
  RATEKEEPER_ADMIN_TOKENS  name:token[,name:token...] for the admin API, CLI and page
  RATEKEEPER_CONFIG        the rules file when serve has no --config
  RATEKEEPER_URL, RATEKEEPER_TOKEN
                           the server and token the admin commands use

examples:
  ratekeeper serve --config examples/pypi.toml --port 8080
  ratekeeper check-config examples/pypi.toml
  ratekeeper flags on read-only --reason "maintenance" --expires-in 2h

Run `ratekeeper COMMAND --help` for a command's options."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ratekeeper", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ratekeeper {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="serve the check API, the admin API and page",
                                description="Serve the rules of a config file over HTTP.")
    serve.add_argument("--config", metavar="FILE",
                       help="rules file (default: $RATEKEEPER_CONFIG)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8080,
                       help="TCP port to listen on (default: %(default)s)")
    serve.add_argument("--workers", type=int, default=1, metavar="N",
                       help="worker processes sharing the port; more than 1 needs a real "
                            "Redis (default: %(default)s)")
    serve.add_argument("--log-format", choices=("text", "json"),
                       help="text or JSON lines (default: $RATEKEEPER_LOG_FORMAT or text)")
    check = commands.add_parser(
        "check-config", help="validate a rules file offline",
        description="Validate a rules file without starting anything: exit 0 (warnings, if "
                    "any, on stderr), or 1 with every error, each naming the file and key.")
    check.add_argument("file")
    admin_cli.add_commands(commands)
    return parser


def _load(path: str) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()
    except BrokenPipeError:
        # the reader went away (`ratekeeper flags list | head -2`): what it read is all it
        # wanted, so no traceback; the interpreter's last flush goes nowhere instead
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command in admin_cli.COMMANDS:
        return admin_cli.run(args)
    configure_logging("text")
    if args.command == "check-config":
        config = _load(args.file)
        if config is None:
            return 1
        warnings = config_warnings(config)
        for line in warnings:
            print(line, file=sys.stderr)
        counts = [_many(len(config.rules), "rule"), _many(len(config.actions), "action"),
                  _many(len(config.flags), "flag"), _many(len(config.routes), "route")]
        if config.tripwires:
            counts.append(_many(len(config.tripwires), "tripwire"))
        if warnings:
            counts.append(_many(len(warnings), "warning"))
        print(f"{args.file}: ok ({', '.join(counts)})")
        return 0
    return _serve(args)


def _many(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"ratekeeper: {exc}", file=sys.stderr)
        return 2
    if args.log_format:
        settings = dataclasses.replace(settings, log_format=args.log_format)
    configure_logging(settings.log_format, settings.log_level)
    path = args.config or settings.config_path
    if not path:
        print("ratekeeper: give --config FILE or set RATEKEEPER_CONFIG", file=sys.stderr)
        return 2
    if args.workers < 1:
        print("ratekeeper: --workers must be at least 1", file=sys.stderr)
        return 2
    config = _load(path)
    if config is None:
        return 1
    for line in config_warnings(config):
        log.warning("%s", line)
    if settings.is_memory:
        if args.workers > 1:
            print("ratekeeper: memory:// keeps state inside one process; use --workers 1 or "
                  "set RATEKEEPER_REDIS_URL", file=sys.stderr)
            return 2
        log.warning("RATEKEEPER_REDIS_URL is not set: using memory://, whose state is neither "
                    "shared with other processes nor durable")
    if settings.ephemeral_salt:
        log.warning("RATEKEEPER_IP_SALT is not set: using a random salt for this process only")
    _warn_short_tokens(settings)
    if settings.is_memory and not settings.admin_tokens and not settings.viewer_tokens:
        settings = _one_off_admin(settings, args.host, args.port)
    if args.workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # before anything imports prometheus_client: workers then share their metrics
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="ratekeeper-metrics-")
    from ratekeeper.process.runner import serve

    return serve(settings, config, args.host, args.port, args.workers)


def _warn_short_tokens(settings: Settings) -> None:
    for variable, tokens in (("RATEKEEPER_ADMIN_TOKENS", settings.admin_tokens),
                             ("RATEKEEPER_VIEWER_TOKENS", settings.viewer_tokens)):
        for token in tokens:
            if len(token.token) < MIN_TOKEN_LENGTH:
                log.warning("%s: the token of %r is shorter than %d characters and could be "
                            "guessed; make one with `openssl rand -hex 16`", variable,
                            token.name, MIN_TOKEN_LENGTH)


def _one_off_admin(settings: Settings, host: str, port: int) -> Settings:
    """A random admin token for this process, so the embedded store's admin page can be used.

    Only with ``memory://``: its state dies with the process, and so does this token. It is
    printed once to the terminal, never logged.
    """
    token = secrets.token_urlsafe(24)
    shown = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
    url = f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"
    print(f"ratekeeper: RATEKEEPER_ADMIN_TOKENS is not set, so this process made a one-off "
          f"admin token ({ONE_OFF_ADMIN}); it ends with the process.\n"
          f"  admin page: {url}/admin  (sign in with the token)\n"
          f"  admin CLI:  export RATEKEEPER_URL={url} RATEKEEPER_TOKEN={token}\n"
          f"  token:      {token}", file=sys.stderr, flush=True)
    return dataclasses.replace(settings, admin_tokens=(AdminToken(ONE_OFF_ADMIN, token),))
