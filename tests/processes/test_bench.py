"""`eventbroker bench --quick` works end to end (100k events: enough for
/proc's 10 ms CPU ticks to register, small enough for CI).

Speed targets live in benchmarks/README.md with recorded results, not here:
this only checks that the benchmark runs, measures and loses nothing.
"""

from __future__ import annotations

import subprocess
import sys

import orjson


def test_bench_quick_runs_and_loses_nothing(kafka_bootstrap):
    r = subprocess.run(
        [sys.executable, "-m", "eventbroker.cli", "bench", "--quick", "--events", "100000", "--kafka", kafka_bootstrap],
        capture_output=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    lines = r.stdout.decode().strip().splitlines()
    assert len(lines) == 1, "--quick prints exactly one JSON line"
    res = orjson.loads(lines[0])
    assert res["events"] == 100000
    assert res["events_lost"] == 0
    for key in ("e2e_daemon_events_per_cpu_s", "ceiling_daemon_events_per_cpu_s",
                "direct_librdkafka_events_per_cpu_s", "ratio_e2e_daemon_vs_direct_client_cpu_per_event",
                "p99_ack_latency_ms_at_50pct"):
        assert res[key] > 0, key
