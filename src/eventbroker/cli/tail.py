"""``eventbroker tail``: print the events in one type's topic."""

from __future__ import annotations

import argparse
import logging
import sys

import orjson

from eventbroker.cli.base import command, config_path, run
from eventbroker.config import DEFAULT_EMBEDDED_PORT, load_config, resolve_types
from eventbroker.errors import UsageError
from eventbroker.kafka.errors import KafkaConnectionError
from eventbroker.kafka.reader import open_topic
from eventbroker.privacy import Decryptor
from eventbroker.protocol import HEADER_ERROR, HEADER_EVENT_ID, HEADER_EVENT_TYPE, HEADER_SCHEMA_VERSION
from eventbroker.schema import load_registry

log = logging.getLogger("eventbroker")

# aiokafka gives header keys as str
_ID, _TYPE = HEADER_EVENT_ID.decode(), HEADER_EVENT_TYPE.decode()
_SCHEMA, _ERROR = HEADER_SCHEMA_VERSION.decode(), HEADER_ERROR.decode()


async def _tail(args: argparse.Namespace) -> int:
    cfg = load_config(config_path(args.config))
    types = resolve_types(cfg)
    if args.dead_letters:
        topic = types[args.type].dead_letter_topic if args.type in types else f"events.{args.type}.invalid"
    else:
        topic = types[args.type].topic if args.type in types else f"events.{args.type}"
    if args.type not in types:
        log.warning("type %r is not in the config; reading topic %s", args.type, topic)
    opener = _Opener(cfg, types, args.type) if args.decrypt else None
    bootstrap = args.kafka or cfg.kafka.bootstrap_servers or f"127.0.0.1:{cfg.kafka.embedded_port}"
    try:
        consumer, exists = await open_topic(cfg.kafka, bootstrap, topic, from_start=not args.new_only)
    except KafkaConnectionError:
        hint = " (the embedded broker runs only while `eventbroker serve` does)" if not (
            args.kafka or cfg.kafka.bootstrap_servers) else ""
        raise UsageError(f"cannot reach Kafka at {bootstrap}{hint}; --kafka HOST:PORT names another") from None
    if not exists and not args.wait:
        await consumer.stop()
        raise UsageError(f"topic {topic} does not exist: no event of type {args.type!r} has been delivered to "
                         f"{bootstrap} yet; --wait waits for the first one")
    if not exists:
        log.warning("topic %s does not exist yet: waiting for the first event of type %r", topic, args.type)
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
                opened = opener.open(batch[tp]) if opener is not None else None
                for i, m in enumerate(batch[tp]):
                    headers = dict(m.headers or ())
                    if args.payload_only:
                        out.write((orjson.dumps(opened[i][0]).decode() if opened is not None
                                   else m.value.decode("utf-8", "replace")) + "\n")
                    else:
                        rec = {
                            "partition": m.partition,
                            "offset": m.offset,
                            "id": headers.get(_ID, b"").hex(),
                            "type": headers.get(_TYPE, b"").decode("utf-8", "replace"),
                            "timestamp_ms": m.timestamp,
                            "key": m.key.decode("utf-8", "replace") if m.key is not None else None,
                            "payload": opened[i][0] if opened is not None else _payload_json(m.value),
                        }
                        if opened is not None and opened[i][1]:
                            rec["forgotten"] = True  # its user was forgotten: personal fields are null
                        if _SCHEMA in headers:  # types with a schema: the version it was validated against
                            rec["schema_version"] = int(headers[_SCHEMA] or b"0")
                        if _ERROR in headers:  # dead letters: why the schema refused it
                            rec["error"] = headers[_ERROR].decode("utf-8", "replace")
                        out.write(orjson.dumps(rec).decode() + "\n")
                    seen += 1
                    if args.max_events is not None and seen >= args.max_events:
                        break
                if args.max_events is not None and seen >= args.max_events:
                    break
            out.flush()
    finally:
        await consumer.stop()
        if opener is not None:
            opener.close()
    return 0


class _Opener:
    """--decrypt: each fetched batch's personal values opened, the key store asked once per batch."""

    def __init__(self, cfg, types, type_name: str) -> None:
        self.type_name = type_name
        self.versions = None
        self.decryptor = None
        if type_name not in types or types[type_name].schema is None:
            log.warning("--decrypt: type %r has no schema in the config, so no personal fields: printing the "
                        "events as they are", type_name)
            return
        self.versions = load_registry(cfg, {type_name: types[type_name]}).types[type_name]
        if self.versions.has_personal:
            self.decryptor = Decryptor.from_config(cfg)

    def open(self, messages) -> list[tuple[object, bool]]:
        if self.versions is None or self.decryptor is None:
            return [(_payload_json(m.value), False) for m in messages]
        out: list[tuple[object, bool] | None] = [None] * len(messages)
        groups: dict[int, list[int]] = {}
        for i, m in enumerate(messages):
            headers = dict(m.headers or ())
            sv = self.versions.resolve(int(headers.get(_SCHEMA, b"0") or b"0"))
            if sv is None or sv.personal_fields is None or _ID not in headers:
                out[i] = (_payload_json(m.value), False)
            else:
                groups.setdefault(sv.number, []).append(i)
        for number, idxs in groups.items():
            pf = self.versions.versions[number].personal_fields
            assert pf is not None
            events = [(dict(messages[i].headers)[_ID], messages[i].value) for i in idxs]
            for i, o in zip(idxs, self.decryptor.open_events(self.type_name, pf.user_field, pf.fields, events),
                            strict=True):
                out[i] = (o.payload, o.forgotten)
        return out  # type: ignore[return-value]

    def close(self) -> None:
        if self.decryptor is not None:
            self.decryptor.close()


def _payload_json(value: bytes):
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        return value.decode("utf-8", "replace")


def cmd_tail(args: argparse.Namespace) -> int:
    return run(_tail(args))


def add_parser(sub) -> None:
    t = command(sub, "tail", help="print the events in one type's topic")
    t.add_argument("--type", required=True, help="event type")
    t.add_argument("--config", help="config file, for the type's topic and the Kafka address")
    t.add_argument("--kafka", help=f"Kafka bootstrap servers (default: config, else 127.0.0.1:{DEFAULT_EMBEDDED_PORT})")
    t.add_argument("--new-only", action="store_true", help="skip events already in the topic")
    t.add_argument("--wait", action="store_true", help="if the type's topic does not exist yet, wait for it "
                   "(default: say so and exit)")
    t.add_argument("--max-events", type=int, default=None, help="exit after this many events")
    t.add_argument("--idle-exit-ms", type=int, default=None, help="exit after this long without events")
    t.add_argument("--payload-only", action="store_true", help="print only each payload")
    t.add_argument("--decrypt", action="store_true",
                   help="open personal fields with their users' keys ([privacy] key store and KEK); forgotten "
                   "users' fields print as null with \"forgotten\": true (with --payload-only: null alone). "
                   "Without it they print sealed")
    t.add_argument("--dead-letters", action="store_true",
                   help="read the type's dead-letter topic (events its schema refused, with the reason)")
    t.set_defaults(func=cmd_tail)
