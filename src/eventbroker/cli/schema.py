"""``eventbroker schema check | diff | test``: event schemas, before a deploy."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import orjson

from eventbroker.cli.base import command, config_path
from eventbroker.config import Config, EventType, load_config, resolve_types
from eventbroker.errors import ConfigError, SchemaError
from eventbroker.schema import load_registry, load_versions
from eventbroker.schema.compat import changes
from eventbroker.schema.model import read_versions
from eventbroker.schema.validate import BatchValidator


def _load(args: argparse.Namespace) -> tuple[Config, dict[str, EventType]]:
    cfg = load_config(config_path(args.config))
    return cfg, resolve_types(cfg)


def _schema_type(types: dict[str, EventType], name: str) -> EventType:
    et = types.get(name)
    if et is None:
        raise ConfigError(f"no type {name!r} in the config (types: {', '.join(sorted(types)) or 'none'})")
    if et.schema is None:
        raise ConfigError(f"type {name!r} has no schema (set schema = \"...\" under [types.{name}])")
    return et


def cmd_check(args: argparse.Namespace) -> int:
    """Every schema loads and every chain obeys its type's compatibility mode."""
    cfg, types = _load(args)
    registry = load_registry(cfg, types)  # SchemaError: the first problem, with its file
    for name, et in sorted(types.items()):
        ts = registry.get(name)
        if ts is None:
            print(f"{name}: no schema")
        else:
            print(f"{name}: {len(ts.versions)} version{'s' if len(ts.versions) != 1 else ''} "
                  f"(latest v{ts.latest}), {et.compatibility}, invalid events "
                  + (f"to the dead-letter topic {et.dead_letter_topic}" if et.dead_letter else "rejected"))
            latest = ts.versions[ts.latest].personal_fields
            if latest is not None:
                print(f"  personal (sealed under the key of {latest.user_field}, v{ts.latest}): "
                      + ", ".join(latest.fields))
    print("ok")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    cfg, types = _load(args)
    et = _schema_type(types, args.type)
    versions = read_versions(Path(cfg.schemas.dir), et.schema or "")  # unchecked: diff explains broken chains too
    for v in (args.v1, args.v2):
        if v not in versions:
            raise SchemaError(f"{args.type} has no v{v} (versions: {', '.join(f'v{n}' for n in versions)})")
    found = changes(versions[args.v1].root, versions[args.v2].root)
    print(f"{args.type} v{args.v1} -> v{args.v2}: " + (f"{len(found)} change{'s' if len(found) != 1 else ''}"
                                                          if found else "no changes"))
    for c in found:
        marks = [m for m, broken in (("breaks backward", c.breaks_backward), ("breaks forward", c.breaks_forward))
                 if broken]
        print(f"  {c.text} ({', '.join(marks) if marks else 'compatible'})")
    back = not any(c.breaks_backward for c in found)
    fwd = not any(c.breaks_forward for c in found)
    verdict = {"backward": back, "forward": fwd, "full": back and fwd, "none": True}
    print("  " + ", ".join(f"{mode}: {'yes' if ok else 'no'}" for mode, ok in verdict.items()))
    mode = et.compatibility.removesuffix("_transitive")
    print(f"  this type's mode is {et.compatibility}: "
          + ("compatible" if verdict[mode] else "NOT compatible"))
    return 0 if verdict[mode] else 1


def cmd_test(args: argparse.Namespace) -> int:
    """Validate JSON lines from stdin against a version; each failure with its line."""
    cfg, types = _load(args)
    et = _schema_type(types, args.type)
    versions = load_versions(cfg, et)
    number = args.version or max(versions)
    if number not in versions:
        raise SchemaError(f"{args.type} has no v{number} (versions: {', '.join(f'v{n}' for n in versions)})")
    validator = BatchValidator(versions[number].root, f"{args.type} v{number}")
    total = bad = 0
    for lineno, raw in enumerate(sys.stdin.buffer, 1):
        line = raw.strip()
        if not line:
            continue
        total += 1
        f = validator.check_one(line)
        if f is not None:
            bad += 1
            if args.json:
                print(orjson.dumps({"line": lineno, "rule": f.rule, "detail": f.detail}).decode())
            else:
                print(f"line {lineno}: {f.detail} ({f.rule})")
    print(f"{args.type} v{number}: {total - bad} of {total} valid", file=sys.stderr)
    return 1 if bad else 0


def add_parser(sub) -> None:
    sc = command(sub, "schema", help="check event schemas, compare versions, test sample events")
    ssub = sc.add_subparsers(dest="schema_command", required=True)
    c = command(ssub, "check", help="every schema loads and every type's versions obey its compatibility mode")
    d = command(ssub, "diff", help="what changed between two versions, and whether each change is compatible")
    d.add_argument("type")
    d.add_argument("v1", type=int)
    d.add_argument("v2", type=int)
    t = command(ssub, "test", help="validate JSON lines from stdin; print each failure with its line")
    t.add_argument("type")
    t.add_argument("--version", type=int, default=None, help="the version to test against (default: the latest)")
    t.add_argument("--json", action="store_true", help="one JSON object per failure")
    for p in (c, d, t):
        p.add_argument("--config", help="config file (default: config/eventbroker.toml if present)")
    c.set_defaults(func=cmd_check)
    d.set_defaults(func=cmd_diff)
    t.set_defaults(func=cmd_test)
