"""What every command shares: the default config file and the event loop."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path("config/eventbroker.toml")
LOG_FORMATS = ("auto", "text", "json")


def global_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """-v and --log-format, accepted before the command and after it: the
    command's copies have no default, so they only set what was given there."""
    verbose: object = False if defaults else argparse.SUPPRESS
    fmt: object = "auto" if defaults else argparse.SUPPRESS
    parser.add_argument("-v", "--verbose", action="store_true", default=verbose, help="debug logging")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default=fmt,
                        help="log lines as JSON or text (auto: text on a terminal, else JSON)")


def command(sub, name: str, **kw) -> argparse.ArgumentParser:
    """A (sub)command parser that also takes the global options."""
    parser = sub.add_parser(name, **kw)
    global_options(parser, defaults=False)
    return parser


def config_path(arg: str | None) -> str | None:
    """The config file a command reads: the one given, else config/eventbroker.toml if present."""
    if arg:
        return arg
    return str(DEFAULT_CONFIG) if DEFAULT_CONFIG.exists() else None


def run(coro: Coroutine[Any, Any, int]) -> int:
    """Run a command's coroutine on uvloop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(coro)
    return uvloop.run(coro)
