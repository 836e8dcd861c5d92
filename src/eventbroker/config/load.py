"""Reading a config file: TOML, decoded into the Structs, every error naming
the file, the key and what was expected; command-line overrides the same way."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import msgspec

from eventbroker.config.registry import resolve_types
from eventbroker.config.schema import TYPE_NAME_PATTERN, AuthProducer, Config, EventTypeConfig
from eventbroker.errors import ConfigError
from eventbroker.protocol import parse_host_port


def _explain(exc: msgspec.ValidationError, prefix: str = "") -> str:
    """``key 'a.b.c': what was wrong`` from a msgspec error."""
    msg = str(exc)
    m = re.search(r" - at `(key` in `)?\$(.*)`$", msg)
    path, what = (m.group(2).replace("[...]", ".<name>"), msg[: m.start()]) if m else ("", msg)
    key = ".".join(x for x in (prefix, path.lstrip(".")) if x)
    if m and m.group(1):
        return f"a name under '{key}': {what}"
    unknown = re.match(r"Object contains unknown field `(.+)`$", what)
    if unknown:
        key = f"{key}.{unknown.group(1)}" if key else unknown.group(1)
        what = "unknown key"
    field = re.match(r"(\w+): (.*)$", what)  # raised by __post_init__ as "<field>: <reason>"
    if field:
        key, what = f"{key}.{field.group(1)}", field.group(2)
    return f"key '{key}': {what}" if key else what


def _named_entry_error(entries: dict, struct: type, prefix: str) -> str:
    """msgspec does not say which entry of a ``[prefix.<name>]`` table failed; find it."""
    for name, entry in entries.items():
        try:
            msgspec.convert(entry, type=struct)
        except msgspec.ValidationError as e:
            return _explain(e, prefix=f"{prefix}.{name}")
    return ""


def load_config(path: str | Path | None) -> Config:
    """Load and validate a TOML file; None gives the built-in defaults."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read config file: {getattr(e, 'strerror', None) or e}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    try:
        cfg = msgspec.convert(data, type=Config)
    except msgspec.ValidationError as e:
        detail = _explain(e)
        types = data.get("types")
        if isinstance(types, dict) and "types.<name>" in detail:
            detail = _named_entry_error(types, EventTypeConfig, "types") or detail
        elif "auth.producers.<name>" in detail:
            producers = (data.get("auth") or {}).get("producers") or {}
            detail = _named_entry_error(producers, AuthProducer, "auth.producers") or detail
        elif isinstance(types, dict) and detail.startswith("a name under 'types'"):
            bad = [n for n in types if not re.match(TYPE_NAME_PATTERN, str(n))]
            detail = f"type name {bad[0]!r} under [types] is not allowed: use 1-64 of a-z 0-9 _ . - " \
                "starting with a letter or digit" if bad else detail
        raise ConfigError(f"{p}: {detail}") from None
    try:
        resolve_types(cfg)
    except ValueError as e:
        raise ConfigError(f"{p}: {e}") from None
    return cfg


def with_overrides(
    cfg: Config, *, listen: str | None = None, kafka: str | None = None, sink: str | None = None
) -> Config:
    """Apply command-line overrides, validated like the file."""
    server, kafka_cfg = cfg.server, cfg.kafka
    if listen is not None:
        try:
            parse_host_port(listen)
        except ValueError as e:
            raise ConfigError(f"--listen: {e}") from None
        server = msgspec.structs.replace(server, listen=listen)
    if kafka is not None:
        kafka_cfg = msgspec.structs.replace(kafka_cfg, bootstrap_servers=kafka)
    if sink is not None:
        if sink not in ("kafka", "null"):
            raise ConfigError(f"--sink: {sink!r} is not 'kafka' or 'null'")
        kafka_cfg = msgspec.structs.replace(kafka_cfg, sink=sink)
    return msgspec.structs.replace(cfg, server=server, kafka=kafka_cfg)
