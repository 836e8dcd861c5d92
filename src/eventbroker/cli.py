"""The ``eventbroker`` command: serve, produce, tail."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from collections import Counter
from pathlib import Path

import orjson

from eventbroker import cli_spool, cli_status
from eventbroker.config import (
    DEFAULT_EMBEDDED_PORT,
    DEFAULT_LISTEN,
    load_config,
    resolve_types,
    with_overrides,
)
from eventbroker.errors import ConfigError, EventBrokerError, EventRejected, ProducerClosed
from eventbroker.logs import setup_logging

log = logging.getLogger("eventbroker")

_DEFAULT_CONFIG = Path("config/eventbroker.toml")


def _setup_logging(verbose: bool) -> None:
    setup_logging(verbose, "auto")


def _config_path(arg: str | None) -> str | None:
    if arg:
        return arg
    return str(_DEFAULT_CONFIG) if _DEFAULT_CONFIG.exists() else None


def _run(coro) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(coro)
    return uvloop.run(coro)


# serve


def _usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, as set by taskset or
    systemd's CPUAffinity=), else all of them."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cmd_serve(args: argparse.Namespace) -> int:
    from eventbroker.daemon import Daemon

    path = _config_path(args.config)
    overrides = {k: v for k, v in (("listen", args.listen), ("kafka", args.kafka), ("sink", args.sink)) if v is not None}
    cfg = with_overrides(load_config(path), **overrides)
    if args.worker_of is not None and os.getppid() != args.worker_of:
        raise EventBrokerError("worker: its supervisor is gone")  # died before PDEATHSIG was set
    if args.worker_of is None and not args.single_process:
        from eventbroker.supervisor import run_supervisor

        n = args.workers if args.workers is not None else (cfg.server.workers or _usable_cores())
        if n < 1:
            raise ConfigError("--workers: must be at least 1 (or use --single-process)")
        return asyncio.run(run_supervisor(cfg, path, overrides, n, args.log_format, args.verbose))
    daemon = Daemon(cfg, config_path=path, overrides=overrides, control_socket=args.control_socket,
                    worker_index=args.worker_index, reuse_port=True if args.worker_of is not None else None)

    async def main() -> int:
        await daemon.run_until_signalled()
        return 0

    return _run(main())


# produce


class _StdinLines:
    """Lines of stdin, read in a daemon thread in chunks: lines typed at a
    terminal are sent at once, piped input stays fast, and Ctrl-C never waits
    for the read to return."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=64)
        self._loop = loop
        threading.Thread(target=self._read, name="stdin", daemon=True).start()

    def _read(self) -> None:
        stdin = sys.stdin.buffer
        rest = b""
        try:
            while True:
                chunk = stdin.read1(1 << 16) if hasattr(stdin, "read1") else stdin.readline()
                if not chunk:
                    break
                lines = (rest + chunk).split(b"\n")
                rest = lines.pop()
                if lines:
                    asyncio.run_coroutine_threadsafe(self._queue.put(b"\n".join(lines)), self._loop).result()
            if rest:
                asyncio.run_coroutine_threadsafe(self._queue.put(rest), self._loop).result()
        except (RuntimeError, ValueError, OSError):  # the loop closed under us: we are exiting
            return
        asyncio.run_coroutine_threadsafe(self._queue.put(None), self._loop)

    async def chunks(self):
        while (block := await self._queue.get()) is not None:
            yield block.split(b"\n")


async def _produce(args: argparse.Namespace) -> int:
    from eventbroker.client import Producer

    counts: Counter[str] = Counter()
    futures: list[asyncio.Future[bytes]] = []
    key_field = args.key_field
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    main_task = asyncio.current_task()

    def on_sigint() -> None:
        interrupted.set()
        if main_task is not None:
            main_task.cancel()

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    producer = Producer(args.server, client_id=args.client_id, linger_ms=args.linger_ms,
                        token=args.token or os.environ.get("EVENTBROKER_TOKEN") or None,
                        tls=args.tls, ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file)
    await producer.start()
    try:
        try:
            await producer.wait_connected(args.connect_timeout)
        except (ConnectionError, EventBrokerError) as e:
            print(f"eventbroker: {e}", file=sys.stderr)
            return 1
        lineno = 0
        async for lines in _StdinLines(loop).chunks():
            for line in lines:
                lineno += 1
                line = line.strip()
                if not line:
                    continue
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError as e:
                    counts["invalid_json"] += 1
                    print(f"line {lineno}: not JSON ({e}); skipped", file=sys.stderr)
                    continue
                key = None
                if key_field:
                    v = obj.get(key_field) if isinstance(obj, dict) else None
                    if v is not None:
                        key = v.encode() if isinstance(v, str) else orjson.dumps(v)
                counts["sent"] += 1
                futures.append(await producer.send(args.type, line, key=key))
        await producer.flush(args.timeout)
    except (asyncio.CancelledError, TimeoutError):
        if not interrupted.is_set():
            print(f"eventbroker: not all events were acknowledged within {args.timeout}s", file=sys.stderr)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        await producer.close(timeout_s=0 if interrupted.is_set() else 5)
    for f in futures:
        exc = f.exception() if f.done() and not f.cancelled() else ProducerClosed("not acknowledged")
        if exc is None:
            counts["persisted"] += 1
        elif isinstance(exc, EventRejected):
            counts[f"rejected:{exc.reason}"] += 1
        else:
            counts["unacknowledged"] += 1
    rejected = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("rejected:")}
    summary = {
        "type": args.type,
        "sent": counts["sent"],
        "persisted": counts["persisted"],
        "rejected": rejected,
        "unacknowledged": counts["unacknowledged"],
        "invalid_json": counts["invalid_json"],
    }
    if args.json:
        print(orjson.dumps(summary).decode())
    else:
        text = f"{args.type}: sent {summary['sent']}, persisted {summary['persisted']}"
        if rejected:
            text += ", rejected " + ", ".join(f"{v} {k}" for k, v in sorted(rejected.items()))
        if counts["unacknowledged"]:
            text += f", {counts['unacknowledged']} not acknowledged (send them again)"
        if counts["invalid_json"]:
            text += f", skipped {counts['invalid_json']} lines that are not JSON"
        print(text)
    if interrupted.is_set():
        return 130
    ok = summary["persisted"] == summary["sent"] and not counts["invalid_json"]
    return 0 if ok else 1


def cmd_produce(args: argparse.Namespace) -> int:
    return _run(_produce(args))


# tail


async def _tail(args: argparse.Namespace) -> int:
    from aiokafka import AIOKafkaConsumer

    cfg = load_config(_config_path(args.config))
    types = resolve_types(cfg)
    topic = types[args.type].topic if args.type in types else f"events.{args.type}"
    if args.type not in types:
        log.warning("type %r is not in the config; reading topic %s", args.type, topic)
    bootstrap = args.kafka or cfg.kafka.bootstrap_servers or f"127.0.0.1:{cfg.kafka.embedded_port}"
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="latest" if args.new_only else "earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    try:
        await consumer.start()
        topics = await consumer.topics()
    except BaseException:
        await consumer.stop()
        raise
    if topic not in topics:
        # Otherwise the consumer waits for it forever, silently.
        log.warning("topic %s does not exist (yet): no event of type %r has been delivered to %s; waiting for it",
                    topic, args.type, bootstrap)
    seen = 0
    out = sys.stdout
    try:
        idle_ms = 0
        while args.max_events is None or seen < args.max_events:
            batch = await consumer.getmany(timeout_ms=500, max_records=1000)
            if not batch:
                idle_ms += 500
                if args.idle_exit_ms is not None and idle_ms >= args.idle_exit_ms:
                    break
                continue
            idle_ms = 0
            for tp in sorted(batch):
                for m in batch[tp]:
                    headers = dict(m.headers or ())
                    if args.payload_only:
                        out.write(m.value.decode("utf-8", "replace") + "\n")
                    else:
                        rec = {
                            "partition": m.partition,
                            "offset": m.offset,
                            "id": headers.get("eb.id", b"").hex(),
                            "type": headers.get("eb.type", b"").decode("utf-8", "replace"),
                            "timestamp_ms": m.timestamp,
                            "key": m.key.decode("utf-8", "replace") if m.key is not None else None,
                            "payload": _payload_json(m.value),
                        }
                        out.write(orjson.dumps(rec).decode() + "\n")
                    seen += 1
                    if args.max_events is not None and seen >= args.max_events:
                        break
                if args.max_events is not None and seen >= args.max_events:
                    break
            out.flush()
    finally:
        await consumer.stop()
    return 0


def _payload_json(value: bytes):
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        return value.decode("utf-8", "replace")


def cmd_tail(args: argparse.Namespace) -> int:
    return _run(_tail(args))


# bench


def cmd_bench(bench_args: list[str]) -> int:
    """Run benchmarks/bench.py from the source checkout this package is installed from."""
    bench_dir = Path(__file__).resolve().parents[2] / "benchmarks"
    if not (bench_dir / "bench.py").exists():
        print("eventbroker bench runs from a source checkout: git clone, then pip install -e '.[bench]'",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(bench_dir))
    import bench

    return int(bench.main(bench_args) or 0)


def cmd_token_create(args: argparse.Namespace) -> int:
    import re

    from eventbroker.auth import create_token

    if not re.match(r"^[A-Za-z0-9_\-]{1,64}$", args.name):
        raise ConfigError(f"producer name {args.name!r}: use 1-64 of A-Z a-z 0-9 _ -")
    token, digest = create_token(args.name)
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    print(token)
    print("# The token above is shown once and stored nowhere: hand it to the producer\n"
          "# (for example as EVENTBROKER_TOKEN). Add this to the config, then reload\n"
          "# (systemctl reload eventbroker):", file=sys.stderr)
    print(f"[auth.producers.{args.name}]\ntoken_hashes = [\"{digest}\"]\ntypes = {orjson.dumps(types).decode()}",
          file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eventbroker", description="Event delivery gateway into per-type Kafka topics.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--log-format", choices=["auto", "text", "json"], default="auto",
                   help="log lines as JSON or text (auto: text on a terminal, else JSON)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the daemon")
    s.add_argument("--config", help=f"TOML config file (default: {_DEFAULT_CONFIG} if present)")
    s.add_argument("--listen", help=f"HOST:PORT to accept producers on (default {DEFAULT_LISTEN})")
    s.add_argument("--kafka", help="Kafka bootstrap servers; without it an embedded development broker is started")
    s.add_argument("--sink", choices=["kafka", "null"], help="override [kafka] sink (null: discard, for benchmarks)")
    s.add_argument("--workers", type=int, help="worker processes sharing the port (default: server.workers, "
                   "else one per core); a supervisor restarts them, reloads them on SIGHUP and replaces them "
                   "without downtime on SIGUSR2")
    s.add_argument("--single-process", action="store_true",
                   help="run the daemon in this process, without a supervisor (development, debugging)")
    # Set by the supervisor for its workers.
    s.add_argument("--worker-of", type=int, help=argparse.SUPPRESS)
    s.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    s.add_argument("--control-socket", help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_serve)

    pr = sub.add_parser("produce", help="send JSON lines from stdin as events of one type")
    pr.add_argument("--type", required=True, help="event type")
    pr.add_argument("--server", default=DEFAULT_LISTEN, help=f"gateway HOST:PORT[,HOST:PORT...] (default {DEFAULT_LISTEN})")
    pr.add_argument("--key-field", help="use this JSON field of each line as the partition key")
    pr.add_argument("--client-id", default=None)
    pr.add_argument("--linger-ms", type=float, default=5.0)
    pr.add_argument("--connect-timeout", type=float, default=10.0, help="give up if no connection within (s)")
    pr.add_argument("--json", action="store_true", help="print the summary as JSON")
    pr.add_argument("--timeout", type=float, default=300.0, help="give up waiting for acks after this long (s)")
    pr.add_argument("--token", help="producer token (default: $EVENTBROKER_TOKEN; the variable keeps it out of "
                    "the process list)")
    pr.add_argument("--tls", action="store_true", help="connect with TLS, verifying the server certificate")
    pr.add_argument("--ca-file", help="CA bundle for the server certificate (implies --tls)")
    pr.add_argument("--cert-file", help="client certificate for mutual TLS (implies --tls)")
    pr.add_argument("--key-file", help="its private key")
    pr.set_defaults(func=cmd_produce)

    tk = sub.add_parser("token", help="producer tokens")
    tsub = tk.add_subparsers(dest="token_command", required=True)
    tc = tsub.add_parser("create", help="print a new token for a producer, and the config lines to add")
    tc.add_argument("name", help="the producer's name (letters, digits, _ and -)")
    tc.add_argument("--types", default="", help="event types it may send, comma separated (names or patterns)")
    tc.set_defaults(func=cmd_token_create)

    t = sub.add_parser("tail", help="print the events in one type's topic")
    t.add_argument("--type", required=True, help="event type")
    t.add_argument("--config", help="config file, for the type's topic and the Kafka address")
    t.add_argument("--kafka", help=f"Kafka bootstrap servers (default: config, else 127.0.0.1:{DEFAULT_EMBEDDED_PORT})")
    t.add_argument("--new-only", action="store_true", help="skip events already in the topic")
    t.add_argument("--max-events", type=int, default=None, help="exit after this many events")
    t.add_argument("--idle-exit-ms", type=int, default=None, help="exit after this long without events")
    t.add_argument("--payload-only", action="store_true", help="print only each payload")
    t.set_defaults(func=cmd_tail)

    cli_spool.add_parser(sub, _config_path)
    cli_status.add_parser(sub, _config_path)

    b = sub.add_parser("bench", help="benchmarks against producing to Kafka directly (see benchmarks/README.md)",
                       add_help=False)
    b.set_defaults(func=lambda _args: cmd_bench(["--help"]))
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its options belong to benchmarks/bench.py
        _setup_logging(False)
        return cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, args.log_format)
    from aiokafka.errors import KafkaConnectionError, KafkaError

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
    from eventbroker.logs import is_json

    if daemon and is_json():
        log.critical("%s", message)
    else:
        print(f"eventbroker: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
