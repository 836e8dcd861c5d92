"""docs/protocol.md against the code: the defaults in section 6, the codes of section 5."""

from __future__ import annotations

import re

import pytest

from conftest import REPO
from eventbroker.config import Config
from eventbroker.protocol import ErrorCode, Reason

DOC = (REPO / "docs" / "protocol.md").read_text()


def _section(title: str) -> str:
    start = DOC.index(title)
    end = DOC.find("\n## ", start + 1)
    return DOC[start:end]


def _rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("|---")]


def _config_default(key: str) -> int:
    section, name = key.split(".", 1)
    return getattr(getattr(Config(), section), name)


LIMITS = [row for row in _rows(_section("## 6. Limits")) if re.match(r"`\w+\.\w+`", row[0])]


def test_section_6_names_every_limit_a_producer_meets():
    keys = {re.match(r"`(\w+\.\w+)`", row[0]).group(1) for row in LIMITS}  # type: ignore[union-attr]
    assert {"server.max_frame_bytes", "server.max_events_per_batch", "server.max_event_bytes",
            "server.heartbeat_interval_ms", "limits.idle_timeout_ms", "limits.handshake_timeout_ms",
            "limits.max_connections", "limits.max_connections_per_address",
            "limits.max_inflight_bytes_per_connection", "auth.max_failures_per_minute",
            "server.drain_timeout_ms", "defaults.ring_bytes", "defaults.max_event_bytes",
            "server.memory_budget_bytes", "kafka.stall_timeout_ms", "kafka.retry_backoff_max_ms"} <= keys


@pytest.mark.parametrize("row", LIMITS, ids=[row[0] for row in LIMITS])
def test_section_6_defaults_are_the_configs(row):
    key = re.match(r"`(\w+\.\w+)`", row[0]).group(1)  # type: ignore[union-attr]
    documented = int(re.match(r"[\d  ]+", row[2]).group(0).replace(" ", "").replace("\u202f", ""))  # type: ignore[union-attr]
    assert documented == _config_default(key), f"{key}: docs/protocol.md says {row[2]}"


@pytest.mark.parametrize(("title", "enum"), [("### 5.2 ACK reasons", Reason), ("### 5.3 ERROR codes", ErrorCode)])
def test_section_5_lists_every_code(title, enum):
    documented = {int(row[0]): row[1].strip("`").lower() for row in _rows(_section(title)[:DOC.index("\n### ", DOC.index(title) + 1) - DOC.index(title)])
                  if row[0].isdigit()}
    assert documented == {m.value: m.name.lower() for m in enum}
