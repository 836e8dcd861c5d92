"""The gateway addresses a producer is given: ``host:port[,host:port...]``."""

from __future__ import annotations

from collections.abc import Sequence

from eventbroker.errors import UsageError
from eventbroker.protocol import parse_host_port


def parse_servers(servers: str | Sequence[str]) -> list[tuple[str, int]]:
    """``(host, port)`` for each address, in the order they are tried."""
    if isinstance(servers, str):
        servers = [s for s in servers.split(",") if s]
    if not servers:
        raise UsageError("at least one server address is needed")
    try:
        return [parse_host_port(s) for s in servers]
    except ValueError as e:
        raise UsageError(f"server address {e}") from None
