"""``eventbroker bench``: benchmarks/bench.py from the source checkout."""

from __future__ import annotations

import sys
from pathlib import Path

from eventbroker.cli.base import command


def cmd_bench(bench_args: list[str]) -> int:
    """Run benchmarks/bench.py from the source checkout this package is installed from."""
    bench_dir = Path(__file__).resolve().parents[3] / "benchmarks"
    if not (bench_dir / "bench.py").exists():
        print("eventbroker bench runs from a source checkout: git clone, then pip install -e '.[bench]'",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(bench_dir))
    import bench

    return int(bench.main(bench_args) or 0)


def add_parser(sub) -> None:
    b = command(sub, "bench", help="benchmarks against producing to Kafka directly (see benchmarks/README.md)",
                       add_help=False)
    b.set_defaults(func=lambda _args: cmd_bench(["--help"]))
