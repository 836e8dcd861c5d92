"""``eventbroker spool check`` and ``eventbroker spool replay``: offline tools
for a spool directory (see spool.py for its layout)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import orjson

from eventbroker.config import Config, EventType, load_config, resolve_types
from eventbroker.errors import UsageError
from eventbroker.spool import SpoolError, check_directory, list_segments, lock_for_offline_use


def _spool_root(args: argparse.Namespace, cfg: Config) -> Path | None:
    root = Path(args.dir) if args.dir else cfg.spool.resolved_dir()
    if root.is_dir():
        return root
    if args.dir:
        raise UsageError(f"{root}: no such spool directory")
    print(f"{root}: no spool here yet (it is made when a type with ack = \"spool\" first runs; "
          "--dir names another)", file=sys.stderr)
    return None


def _is_type_dir(p: Path) -> bool:
    return p.is_dir() and ((p / "lock").exists() or bool(list_segments(p)))


def _type_dirs(root: Path, only: str | None) -> list[Path]:
    """The type directories of a spool: ``<root>/<type>`` (one process) and
    ``<root>/slot-<n>/<type>`` (the slots of ``serve --workers``)."""
    dirs = sorted(p for p in root.iterdir() if _is_type_dir(p))
    for slot in sorted(root.glob("slot-*")):
        dirs += sorted(p for p in slot.iterdir() if _is_type_dir(p))
    if only:
        dirs = [p for p in dirs if p.name == only]
        if not dirs:
            raise UsageError(f"{root}: holds no spool for type {only!r}")
    return dirs


def cmd_spool_check(args: argparse.Namespace, cfg: Config) -> int:
    root = _spool_root(args, cfg)
    if root is None:
        if args.json:
            print("[]")
        return 0
    reports = []
    bad = 0
    for d in _type_dirs(root, args.type):
        lock_fd = -1
        try:
            lock_fd = lock_for_offline_use(d)
            live = False
        except SpoolError:
            if args.repair:
                raise
            live = True  # a running daemon may be mid-write at the newest tail
        try:
            report = check_directory(d, repair=args.repair)
        finally:
            if lock_fd >= 0:
                os.close(lock_fd)
        report["in_use"] = live
        reports.append(report)
        if report["problems"] and not report["repaired"]:
            bad += 1
    if args.json:
        print(orjson.dumps(reports, option=orjson.OPT_INDENT_2).decode())
    else:
        for r in reports:
            segs = r["segments"]
            state = "in use by a running daemon; " if r["in_use"] else ""
            where = Path(r["dir"]).relative_to(root)
            print(f"{where}: {state}{len(segs)} segment(s), {r['pending_events']} undelivered events "
                  f"({r['pending_bytes']} bytes), checkpoint {r['checkpoint']}")
            for p in r["problems"]:
                print(f"  problem: {p}")
            for p in r["repaired"]:
                print(f"  repaired: {p}")
        if not reports:
            print(f"{root}: no type spools")
    return 1 if bad else 0


async def _replay(cfg: Config, bootstrap: str, dirs: list[Path], timeout_s: float) -> int:
    from eventbroker.router import PrioritySlots
    from eventbroker.sinks import KafkaSink
    from eventbroker.spool import SpoolLog
    from eventbroker.spool_lane import Forwarder

    known = resolve_types(cfg)
    types: dict[str, EventType] = {}
    for d in dirs:
        et = known.get(d.name)
        if et is None:
            d0 = cfg.defaults
            et = EventType(name=d.name, topic=f"events.{d.name}", priority=d0.priority,
                           max_event_bytes=d0.max_event_bytes, partitioning=d0.partitioning,
                           ring_bytes=d0.ring_bytes, enabled=True, ack="spool")
            print(f"{d.name}: not in the config; delivering to topic {et.topic}", file=sys.stderr)
        types[d.name] = et
    sink = KafkaSink(cfg.kafka, bootstrap)
    await sink.start(types)
    spools: list[SpoolLog] = []
    forwarders: list[Forwarder] = []
    slots = PrioritySlots(cfg.kafka.max_inflight_requests)
    deadline = 0.0
    try:
        for d in dirs:
            sp = SpoolLog(d, segment_bytes=cfg.spool.segment_bytes, fsync=cfg.spool.fsync, name=d.name)
            sp.open()
            spools.append(sp)
            f = Forwarder(sp, types[d.name], sink, cfg.kafka, slots)
            forwarders.append(f)
            print(f"{d.name}: {sp.pending_bytes} bytes to deliver to {types[d.name].topic}", file=sys.stderr)
            f.start()
        deadline = time.monotonic() + timeout_s
    finally:
        # Runs on error too: forwarders already started are stopped before
        # their spools close under them.
        await asyncio.gather(*(f.stop(deadline) for f in forwarders))
        for sp in spools:
            sp.close()
        await sink.stop()
    left = 0
    for f in forwarders:
        print(f"{f.etype.name}: delivered {f.stats.events_forwarded} events, "
              f"{f.backlog_bytes} bytes left, {f.stats.corrupt_records} damaged records skipped")
        left += f.backlog_bytes
    return 1 if left else 0


def cmd_spool_replay(args: argparse.Namespace, cfg: Config) -> int:
    root = _spool_root(args, cfg)
    if root is None:
        return 0
    bootstrap = args.kafka or cfg.kafka.bootstrap_servers
    if not bootstrap:
        raise UsageError("spool replay needs a Kafka cluster: --kafka HOST:PORT or [kafka] bootstrap_servers")
    dirs = _type_dirs(root, args.type)
    if not dirs:
        print(f"{root}: no type spools")
        return 0
    return asyncio.run(_replay(cfg, bootstrap, dirs, args.timeout))


def add_parser(sub, config_path) -> None:
    sp = sub.add_parser("spool", help="inspect, repair or deliver a disk spool offline")
    ssub = sp.add_subparsers(dest="spool_command", required=True)
    c = ssub.add_parser("check", help="verify every record; with --repair truncate torn or damaged tails")
    r = ssub.add_parser("replay", help="deliver everything a spool holds to Kafka, then exit")
    for x in (c, r):
        x.add_argument("--config", help="config file (its [spool] dir, types and Kafka)")
        x.add_argument("--dir", help="spool directory (default: [spool] dir of the config)")
        x.add_argument("--type", help="only this event type")
    c.add_argument("--repair", action="store_true", help="truncate what does not parse (needs the daemon stopped)")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    r.add_argument("--kafka", help="Kafka bootstrap servers (default: the config's)")
    r.add_argument("--timeout", type=float, default=600.0, help="give up after this long (s)")
    c.set_defaults(func=lambda a: cmd_spool_check(a, load_config(config_path(a.config))))
    r.set_defaults(func=lambda a: cmd_spool_replay(a, load_config(config_path(a.config))))
