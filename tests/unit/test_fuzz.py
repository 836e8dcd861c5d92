"""The long fuzzers in fuzz/fuzz_targets.py, run as tests: a short run in CI,
a million inputs per target with EVENTBROKER_FUZZ_LONG=1. Each run fails on
any exception other than the documented answer to bad input, and on resident
memory growing by more than 16 MiB after the warm-up (a leak)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

LONG = bool(os.environ.get("EVENTBROKER_FUZZ_LONG"))
INPUTS = 1_000_000 if LONG else 20_000


@pytest.mark.parametrize("target", ["protocol", "spool"])
def test_fuzz_target(target):
    r = subprocess.run([sys.executable, str(REPO / "fuzz" / "fuzz_targets.py"), target, "--inputs", str(INPUTS)],
                       capture_output=True, text=True, timeout=3600, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    print(f"\n{out}")
    assert out["inputs"] == INPUTS and out["crashes"] == 0
    assert out["frames" if target == "protocol" else "records"] > INPUTS // 10  # reached past the checksum
    assert out["rss_growth_mb"] < 16
