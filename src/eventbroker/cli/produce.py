"""``eventbroker produce``: JSON lines from stdin as events of one type."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from collections import Counter

import orjson

from eventbroker.cli.base import command, run
from eventbroker.client import Producer
from eventbroker.errors import EventBrokerError, EventRejected, ProducerClosed
from eventbroker.ops.logs import plural
from eventbroker.protocol import DEFAULT_LISTEN

_CONNECT_WAIT_S = 10.0
_SHOWN_REJECTIONS = 20  # rejected lines printed (and listed in --json) with their reason


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
    counts: Counter[str] = Counter()
    futures: list[tuple[int, asyncio.Future[bytes]]] = []  # (line number, its answer)
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
            # Nothing listening fails at once; --connect-timeout keeps trying that long.
            # The CLI says why in one line: the SDK's own warning would repeat it.
            sdk_log = logging.getLogger("eventbroker.client")
            level = sdk_log.level
            sdk_log.setLevel(logging.ERROR)
            try:
                await producer.wait_connected(args.connect_timeout or _CONNECT_WAIT_S,
                                              until_refused=args.connect_timeout is None)
            finally:
                sdk_log.setLevel(level)
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
                    print(f"line {lineno}: not JSON ({e.msg} at column {e.colno}); skipped", file=sys.stderr)
                    continue
                key = None
                if key_field:
                    v = obj.get(key_field) if isinstance(obj, dict) else None
                    if v is not None:
                        key = v.encode() if isinstance(v, str) else orjson.dumps(v)
                    else:
                        if not counts["missing_key_field"]:
                            print(f"line {lineno}: no field {key_field!r}; sent with a null key (lines like it "
                                  "are counted in the summary)", file=sys.stderr)
                        counts["missing_key_field"] += 1
                counts["sent"] += 1
                futures.append((lineno, await producer.send(args.type, line, key=key,
                                                            schema_version=args.schema_version)))
        await producer.flush(args.timeout)
    except (asyncio.CancelledError, TimeoutError):
        if not interrupted.is_set():
            print(f"eventbroker: not all events were acknowledged within {args.timeout}s", file=sys.stderr)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        await producer.close(timeout_s=0 if interrupted.is_set() else 5)
    rejections: list[dict] = []  # the first _SHOWN_REJECTIONS, with their lines
    for lineno, f in futures:
        exc = f.exception() if f.done() and not f.cancelled() else ProducerClosed("not acknowledged")
        if exc is None:
            counts["persisted"] += 1
        elif isinstance(exc, EventRejected):
            counts[f"rejected:{exc.reason}"] += 1
            if len(rejections) < _SHOWN_REJECTIONS:
                rejections.append({"line": lineno, "reason": exc.reason, "detail": exc.detail})
                if not args.json:
                    print(f"line {lineno}: rejected {exc.reason}" + (f": {exc.detail}" if exc.detail else ""),
                          file=sys.stderr)
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
        "missing_key_field": counts["missing_key_field"],
        "rejections": rejections,
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
            text += f", skipped {plural(counts['invalid_json'], 'line')} that {'is' if counts['invalid_json'] == 1 else 'are'} not JSON"
        if counts["missing_key_field"]:
            text += f", {counts['missing_key_field']} without {key_field!r} (null key)"
        print(text)
    if interrupted.is_set():
        return 130
    ok = summary["persisted"] == summary["sent"] and not counts["invalid_json"]
    return 0 if ok else 1


def cmd_produce(args: argparse.Namespace) -> int:
    return run(_produce(args))


def add_parser(sub) -> None:
    pr = command(sub, "produce", help="send JSON lines from stdin as events of one type")
    pr.add_argument("--type", required=True, help="event type")
    pr.add_argument("--server", default=DEFAULT_LISTEN, help=f"gateway HOST:PORT[,HOST:PORT...] (default {DEFAULT_LISTEN})")
    pr.add_argument("--schema-version", type=int, default=None,
                    help="the schema version the lines are written against (default: the latest)")
    pr.add_argument("--key-field", help="use this JSON field of each line as the partition key")
    pr.add_argument("--client-id", default=None)
    pr.add_argument("--linger-ms", type=float, default=5.0)
    pr.add_argument("--connect-timeout", type=float, default=None,
                    help="keep trying to connect this long (s); by default give up at once when no gateway "
                    f"listens, and after {_CONNECT_WAIT_S:.0f}s when one does not answer")
    pr.add_argument("--json", action="store_true", help="print the summary as JSON")
    pr.add_argument("--timeout", type=float, default=300.0, help="give up waiting for acks after this long (s)")
    pr.add_argument("--token", help="producer token (default: $EVENTBROKER_TOKEN; the variable keeps it out of "
                    "the process list)")
    pr.add_argument("--tls", action="store_true", help="connect with TLS, verifying the server certificate")
    pr.add_argument("--ca-file", help="CA bundle for the server certificate (implies --tls)")
    pr.add_argument("--cert-file", help="client certificate for mutual TLS (implies --tls)")
    pr.add_argument("--key-file", help="its private key")
    pr.set_defaults(func=cmd_produce)
