"""Reading a config file: TOML, decoded into the Structs, every error naming
the file, the key and what was expected; command-line overrides the same way."""

from __future__ import annotations

import re
import tomllib
import types
import typing
from pathlib import Path

import msgspec

from eventbroker.config.registry import resolve_types
from eventbroker.config.schema import AuthProducer, Config, EventTypeConfig
from eventbroker.errors import ConfigError
from eventbroker.protocol import TYPE_NAME_PATTERN, parse_host_port


def _unwrap(tp: typing.Any) -> list[typing.Any]:
    """The types a field may hold: Optional, unions and Annotated taken apart."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return [t for arg in typing.get_args(tp) for t in _unwrap(arg)]
    return [tp]


def choices(key: str) -> list[str]:
    """The allowed values of an enum-like key (``types.<name>.priority``), from the Structs."""
    tps: list[typing.Any] = [Config]
    for part in key.split("."):
        nxt: list[typing.Any] = []
        for tp in tps:
            if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
                hint = typing.get_type_hints(tp, include_extras=True).get(part)
                if hint is not None:
                    nxt += _unwrap(hint)
            elif typing.get_origin(tp) is dict:
                nxt += _unwrap(typing.get_args(tp)[1])  # ``part`` is an entry's name
        tps = nxt
    return [repr(v) for tp in tps if typing.get_origin(tp) is typing.Literal for v in typing.get_args(tp)]


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
    if what.startswith("Invalid enum value") and choices(key):
        what += f"; expected one of {', '.join(choices(key))}"
    return f"key '{key}': {what}" if key else what


def _named_entry_error(entries: dict, struct: type, prefix: str) -> str:
    """msgspec does not say which entry of a ``[prefix.<name>]`` table failed; find it."""
    for name, entry in entries.items():
        try:
            msgspec.convert(entry, type=struct)
        except msgspec.ValidationError as e:
            return _explain(e, prefix=f"{prefix}.{name}")
    return ""


BUILT_IN_DEFAULTS = "the built-in defaults"  # how a config-less run is named in messages


def load_config(path: str | Path | None) -> Config:
    """Load and validate a TOML file; None gives the built-in defaults.

    A relative ``[schemas] dir`` is taken from the file's folder (where its
    reviewers see it) and made absolute."""
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
    if not Path(cfg.schemas.dir).is_absolute():  # beside the config file, as its reviewers see it
        cfg = msgspec.structs.replace(
            cfg, schemas=msgspec.structs.replace(cfg.schemas, dir=str((p.parent / cfg.schemas.dir).resolve())))
    return cfg


def with_overrides(
    cfg: Config, *, listen: str | None = None, kafka: str | None = None, sink: str | None = None,
    admin_listen: str | None = None, embedded_port: int | None = None,
) -> Config:
    """Apply command-line overrides, validated like the file."""
    server, kafka_cfg = cfg.server, cfg.kafka
    for flag, value in (("--listen", listen), ("--admin-listen", admin_listen or None)):
        if value is not None:
            try:
                parse_host_port(value)
            except ValueError as e:
                raise ConfigError(f"{flag}: {e}") from None
    if listen is not None:
        server = msgspec.structs.replace(server, listen=listen)
    if admin_listen is not None:  # "" turns the admin endpoint off
        server = msgspec.structs.replace(server, admin_listen=admin_listen)
    if kafka is not None:
        kafka_cfg = msgspec.structs.replace(kafka_cfg, bootstrap_servers=kafka)
    if sink is not None:
        if sink not in ("kafka", "null"):
            raise ConfigError(f"--sink: {sink!r} is not 'kafka' or 'null'")
        kafka_cfg = msgspec.structs.replace(kafka_cfg, sink=sink)
    if embedded_port is not None:
        if not 0 <= embedded_port <= 65535:
            raise ConfigError(f"--embedded-port: {embedded_port} is not a port number")
        kafka_cfg = msgspec.structs.replace(kafka_cfg, embedded_port=embedded_port)
    return msgspec.structs.replace(cfg, server=server, kafka=kafka_cfg)
