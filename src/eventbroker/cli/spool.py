"""``eventbroker spool check`` and ``eventbroker spool replay``: offline tools
for a spool directory (spool/log.py and spool/layout.py describe it)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import orjson

from eventbroker.cli.base import command, config_path
from eventbroker.config import Config, load_config
from eventbroker.errors import SpoolLocked, UsageError
from eventbroker.spool.layout import all_type_dirs
from eventbroker.spool.log import check_directory, lock_for_offline_use
from eventbroker.spool.replay import replay


def _spool_root(args: argparse.Namespace, cfg: Config) -> Path | None:
    root = Path(args.dir) if args.dir else cfg.spool.resolved_dir()
    if root.is_dir():
        return root
    if args.dir:
        raise UsageError(f"{root}: no such spool directory")
    print(f"{root}: no spool here yet (it is made when a type with ack = \"spool\" first runs; "
          "--dir names another)", file=sys.stderr)
    return None


def _type_dirs(root: Path, only: str | None) -> list[Path]:
    dirs = all_type_dirs(root)
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
        except SpoolLocked:
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


def _print_replay(forwarders) -> int:
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
    return _print_replay(asyncio.run(replay(cfg, bootstrap, dirs, args.timeout)))


def add_parser(sub) -> None:
    sp = command(sub, "spool", help="inspect, repair or deliver a disk spool offline")
    ssub = sp.add_subparsers(dest="spool_command", required=True)
    c = command(ssub, "check", help="verify every record; with --repair truncate torn or damaged tails")
    r = command(ssub, "replay", help="deliver everything a spool holds to Kafka, then exit")
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
