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


def test_bench_privacy_scenario_seals_every_value_and_loses_nothing(kafka_bootstrap, tmp_path):
    out = tmp_path / "privacy.json"
    r = subprocess.run(
        [sys.executable, "-m", "eventbroker.cli", "bench", "--scenarios", "privacy", "--rounds", "0", "--events",
         "40000", "--privacy-rounds", "1", "--kafka", kafka_bootstrap, "--output", str(out)],
        capture_output=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    runs = {run["scenario"]: run for run in orjson.loads(out.read_bytes())["runs"]}
    assert set(runs) == {"e2e-privacy-none", "e2e-privacy-cold", "e2e-privacy-warm", "e2e-privacy-cold-existing",
                         "privacy-cache-memory"}
    for name in ("e2e-privacy-none", "e2e-privacy-cold", "e2e-privacy-warm", "e2e-privacy-cold-existing"):
        assert runs[name]["events"] == 40000 and runs[name]["events_lost"] == 0, name
    # loadgen's json10p user is index % 100,000, index = connection << 32 | n over 4 connections of 10,000
    users = {((c << 32) | i) % 100_000 for c in range(4) for i in range(1, 10_001)}
    assert runs["e2e-privacy-cold"]["users_loaded"] == len(users)
    assert runs["e2e-privacy-warm"]["users_loaded"] == 0 and runs["e2e-privacy-warm"]["values_sealed"] == 80000
    assert runs["e2e-privacy-warm"]["forget_propagation_ms"] > 0
    assert runs["privacy-cache-memory"]["bytes_per_cached_user"] > 32
