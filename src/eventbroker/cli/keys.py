"""``eventbroker forget`` and ``eventbroker keys``: users' data keys (docs/privacy.md)."""

from __future__ import annotations

import argparse
import json
import sys

from eventbroker.cli.base import command, config_path
from eventbroker.config import load_config
from eventbroker.privacy import load_keks, new_kek_line, open_store


def cmd_forget(args: argparse.Namespace) -> int:
    cfg = load_config(config_path(args.config))
    out = []
    store = open_store(cfg.privacy, create=False)
    try:
        forgotten = [store.forget(user) for user in args.users]
    finally:
        store.close()
    for f in forgotten:
        out.append({"user": f.user, "had_key": f.existed, "forgotten_at": f.forgotten_at.isoformat()})
        if not args.json:
            state = "key deleted" if f.existed else ("had no key (already forgotten, or not seen yet); recorded as "
                                                     "forgotten: no key will ever be made for this id")
            print(f"forgot {f.user}: {state}, at {f.forgotten_at.isoformat()}; gateways drop it within "
                  f"{cfg.privacy.forget_poll_ms} ms")
    if args.json:
        json.dump(out, sys.stdout)
        print()
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    if args.action == "new-kek":
        print(new_kek_line(args.id))
        return 0
    cfg = load_config(config_path(args.config))
    store = open_store(cfg.privacy, create=False)
    try:
        if args.action == "rotate":
            keks = load_keks(cfg.privacy)
            n = store.rewrap(keks.rewrap, keks.current.id)
            print(f"rewrapped {n} data key(s) with key-encryption key {keks.current.id}; "
                  "no event was touched")
            return 0
        counts = store.counts()
        counts["store"] = store.uri
        if args.json:
            json.dump(counts, sys.stdout)
            print()
        else:
            by = ", ".join(f"{k}: {v}" for k, v in sorted(dict(counts["by_kek"]).items())) or "none"  # type: ignore[call-overload]
            print(f"key store {store.uri}: {counts['users']} users with a key ({by}), "
                  f"{counts['forgotten']} forgotten")
        return 0
    finally:
        store.close()


def add_parser(sub) -> None:
    f = command(sub, "forget", help="delete users' data keys: their personal fields become unreadable everywhere")
    f.add_argument("users", nargs="+", metavar="USER", help="user id, as the type's user field holds it")
    f.add_argument("--config", help="config file ([privacy] key_store)")
    f.add_argument("--json", action="store_true", help="print the result as JSON")
    f.set_defaults(func=cmd_forget)
    k = command(sub, "keys", help="the key store: status, KEK rotation, a new KEK")
    k.add_argument("action", choices=("status", "rotate", "new-kek"),
                   help="status: counts; rotate: rewrap every data key with the first KEK of the config; "
                   "new-kek: print a new KEK line for a KEK file")
    k.add_argument("--config", help="config file ([privacy])")
    k.add_argument("--id", help="new-kek: the new KEK's id (default: random)")
    k.add_argument("--json", action="store_true", help="status as JSON")
    k.set_defaults(func=cmd_keys)
