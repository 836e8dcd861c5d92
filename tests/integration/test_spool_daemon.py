"""A daemon with spooled types against a real broker."""

from __future__ import annotations

import subprocess
import sys

from conftest import make_config, open_spool, write_config
from eventbroker.kafka.embedded import free_port


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eventbroker.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_daemon_refuses_a_spool_directory_in_use(tmp_path, kafka_bootstrap):
    cfg = make_config(kafka_bootstrap, {"audit": {"ack": "spool"}}, spool={"dir": str(tmp_path / "spool")})
    held = open_spool(tmp_path / "spool" / "audit")
    try:
        conf = write_config(tmp_path, cfg)
        r = _cli("serve", "--single-process", "--config", str(conf), "--listen", f"127.0.0.1:{free_port()}",
                 timeout=60)
        assert r.returncode == 1
        assert "spool directory is in use by another eventbroker process" in r.stderr
    finally:
        held.close()
