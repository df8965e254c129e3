"""The ``ratekeeper`` command: serve, check-config, and the admin commands (admin_cli.py)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
from collections.abc import Sequence

from . import admin_cli
from .config import Config, load_config
from .errors import ConfigError, SettingsError
from .logs import configure_logging
from .settings import Settings

__all__ = ["main"]

log = logging.getLogger("ratekeeper")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ratekeeper", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the check API")
    serve.add_argument("--config", help="rules file (default: $RATEKEEPER_CONFIG)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument("--log-format", choices=("text", "json"),
                       help="text or JSON lines (default: $RATEKEEPER_LOG_FORMAT or text)")
    check = commands.add_parser("check-config", help="validate a rules file offline")
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
    args = _parser().parse_args(argv)
    if args.command in admin_cli.COMMANDS:
        return admin_cli.run(args)
    configure_logging("text")
    if args.command == "check-config":
        config = _load(args.file)
        if config is None:
            return 1
        print(f"{args.file}: ok ({len(config.rules)} rules, {len(config.actions)} actions, "
              f"{len(config.flags)} flags, {len(config.routes)} routes)")
        return 0
    return _serve(args)


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
    if settings.is_memory:
        if args.workers > 1:
            print("ratekeeper: memory:// keeps state inside one process; use --workers 1 or "
                  "set RATEKEEPER_REDIS_URL", file=sys.stderr)
            return 2
        log.warning("RATEKEEPER_REDIS_URL is not set: using memory://, whose state is neither "
                    "shared with other processes nor durable")
    if settings.ephemeral_salt:
        log.warning("RATEKEEPER_IP_SALT is not set: using a random salt for this process only")
    if args.workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # before anything imports prometheus_client: workers then share their metrics
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="ratekeeper-metrics-")
    from .runner import serve

    return serve(settings, config, args.host, args.port, args.workers)
