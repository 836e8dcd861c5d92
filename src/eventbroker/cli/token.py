"""``eventbroker token create``: a new producer token and its config lines."""

from __future__ import annotations

import argparse
import re
import sys

import orjson

from eventbroker.cli.base import command
from eventbroker.errors import ConfigError
from eventbroker.security.tokens import create_token


def cmd_token_create(args: argparse.Namespace) -> int:
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


def add_parser(sub) -> None:
    tk = command(sub, "token", help="producer tokens")
    tsub = tk.add_subparsers(dest="token_command", required=True)
    tc = command(tsub, "create", help="print a new token for a producer, and the config lines to add")
    tc.add_argument("name", help="the producer's name (letters, digits, _ and -)")
    tc.add_argument("--types", default="", help="event types it may send, comma separated (names or patterns)")
    tc.set_defaults(func=cmd_token_create)
