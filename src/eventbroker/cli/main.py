"""The ``eventbroker`` command: one module per subcommand, wired up here."""

from __future__ import annotations

import argparse
import logging
import sys

from eventbroker import __version__
from eventbroker.cli import bench, keys, produce, schema, serve, spool, status, tail, token
from eventbroker.cli.base import global_options
from eventbroker.errors import ConfigError, EventBrokerError
from eventbroker.kafka.errors import KafkaConnectionError, KafkaError
from eventbroker.ops.logs import is_json, setup_logging

log = logging.getLogger("eventbroker")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eventbroker", description="Event delivery gateway into per-type Kafka topics.")
    p.add_argument("--version", action="version", version=f"eventbroker {__version__}")
    global_options(p, defaults=True)
    sub = p.add_subparsers(dest="command", required=True)
    for command in (serve, produce, schema, token, tail, keys, spool, status, bench):
        command.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its options belong to benchmarks/bench.py
        setup_logging(False, "auto")
        return bench.cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, args.log_format)

    daemon = args.command == "serve"
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        return _fail(f"config error: {e}", 2, daemon)
    except (EventBrokerError, RuntimeError) as e:
        return _fail(str(e), 1, daemon)
    except KafkaConnectionError as e:
        return _fail(f"cannot reach Kafka: {e}", 1, daemon)
    except KafkaError as e:
        return _fail(f"Kafka error: {e!r}", 1, daemon)
    except OSError as e:
        return _fail(f"{e.strerror or e}" + (f" ({e.filename})" if e.filename else ""), 1, daemon)
    except KeyboardInterrupt:
        return 130


def _fail(message: str, code: int, daemon: bool) -> int:
    """A fatal error: a log line for a daemon logging JSON, else a line on stderr."""
    if daemon and is_json():
        log.critical("%s", message)
    else:
        print(f"eventbroker: {message}", file=sys.stderr)
    return code

