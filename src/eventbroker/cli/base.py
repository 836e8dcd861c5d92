"""What every command shares: the default config file and the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path("config/eventbroker.toml")


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
