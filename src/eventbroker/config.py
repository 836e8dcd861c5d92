"""Configuration: frozen msgspec Structs decoded from TOML and validated on load.

Units are in the field names. A bad file is refused with an error that names
the file, the key and what was expected.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

from eventbroker.errors import ConfigError

DEFAULT_LISTEN = "127.0.0.1:7480"
DEFAULT_ADMIN_LISTEN = "127.0.0.1:7481"
DEFAULT_EMBEDDED_PORT = 19092

TYPE_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.\-]{0,63}$"
TypeName = Annotated[str, Meta(pattern=TYPE_NAME_PATTERN)]
Priority = Literal["critical", "high", "normal", "low"]
Partitioning = Literal["key", "spread"]
Ack = Literal["kafka", "spool"]

PRIORITY_ORDER: dict[str, int] = {"critical": 0, "high": 1, "normal": 2, "low": 3}
# Share of server.memory_budget_bytes up to which each priority is admitted.
PRIORITY_BUDGET_SHARE: dict[str, float] = {"critical": 1.0, "high": 0.85, "normal": 0.70, "low": 0.50}


class _Base(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    pass


class ServerConfig(_Base, frozen=True):
    listen: str = DEFAULT_LISTEN
    server_id: str = ""
    max_frame_bytes: Annotated[int, Meta(ge=1024, le=64 * 1024 * 1024)] = 1024 * 1024
    max_event_bytes: Annotated[int, Meta(ge=1)] = 512 * 1024
    max_events_per_batch: Annotated[int, Meta(ge=1, le=1_000_000)] = 65536
    heartbeat_interval_ms: Annotated[int, Meta(ge=100)] = 5000
    drain_timeout_ms: Annotated[int, Meta(ge=0)] = 10_000
    # All types' buffers together. Under pressure low types are answered
    # retry-later first (above 50% of it), then normal (70%), then high (85%);
    # critical types are admitted up to the whole budget.
    memory_budget_bytes: Annotated[int, Meta(ge=1024 * 1024)] = 256 * 1024 * 1024
    # /metrics, /healthz and /readyz over HTTP; "" turns them off.
    admin_listen: str = DEFAULT_ADMIN_LISTEN
    # Worker processes for `serve` (0: one per core); see supervisor.py.
    workers: Annotated[int, Meta(ge=0, le=256)] = 0
    # Bind the listener with SO_REUSEPORT (always on for workers).
    reuse_port: bool = False

    def __post_init__(self) -> None:
        try:
            parse_host_port(self.listen)
        except ValueError as e:
            raise ValueError(f"listen: {e}") from None
        if self.max_event_bytes > self.max_frame_bytes:
            raise ValueError("max_event_bytes: must not exceed max_frame_bytes")
        if self.memory_budget_bytes < 4 * self.max_frame_bytes:
            raise ValueError("memory_budget_bytes: must be at least 4 times max_frame_bytes")
        if self.admin_listen:
            try:
                parse_host_port(self.admin_listen)
            except ValueError as e:
                raise ValueError(f"admin_listen: {e}") from None


class KafkaConfig(_Base, frozen=True):
    # Empty: start the embedded development broker (Tansu) on embedded_port.
    bootstrap_servers: str = ""
    sink: Literal["kafka", "null"] = "kafka"
    client_id: str = "eventbroker"
    embedded_port: Annotated[int, Meta(ge=0, le=65535)] = DEFAULT_EMBEDDED_PORT
    linger_ms: Annotated[int, Meta(ge=0, le=10_000)] = 2
    batch_max_bytes: Annotated[int, Meta(ge=1024)] = 1_000_000
    max_inflight_batches_per_type: Annotated[int, Meta(ge=1, le=64)] = 4
    # Produce requests in flight over all types; when they are all taken,
    # waiting types are served by priority (critical first).
    max_inflight_requests: Annotated[int, Meta(ge=1, le=1024)] = 32
    request_timeout_ms: Annotated[int, Meta(ge=100)] = 30_000
    retry_backoff_ms: Annotated[int, Meta(ge=1)] = 100
    retry_backoff_max_ms: Annotated[int, Meta(ge=1)] = 5_000
    # A type that delivers nothing for this long hands its events back to the
    # producers (retry-later) so it cannot hold their windows; see router.py.
    stall_timeout_ms: Annotated[int, Meta(ge=100)] = 5_000
    create_topics: bool = True
    topic_partitions: Annotated[int, Meta(ge=1)] = 4
    replication_factor: Annotated[int, Meta(ge=1)] = 1
    # The daemon's own connection to Kafka (passed to aiokafka).
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    sasl_username: str = ""
    # A file holding the password (keeps it out of the config and the process list).
    sasl_password_file: str = ""
    ssl_ca_file: str = ""
    ssl_cert_file: str = ""
    ssl_key_file: str = ""

    def __post_init__(self) -> None:
        if self.security_protocol.startswith("SASL") and not (self.sasl_username and self.sasl_password_file):
            raise ValueError("sasl_username: SASL needs sasl_username and sasl_password_file")

    def client_security(self) -> dict:
        """aiokafka keyword arguments for security_protocol (reads the password file)."""
        kw: dict = {"security_protocol": self.security_protocol}
        if self.security_protocol in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context

            kw["ssl_context"] = create_ssl_context(cafile=self.ssl_ca_file or None,
                                                   certfile=self.ssl_cert_file or None,
                                                   keyfile=self.ssl_key_file or None)
        if self.security_protocol.startswith("SASL"):
            try:
                password = Path(self.sasl_password_file).read_text().strip()
            except OSError as e:
                raise ConfigError(f"kafka.sasl_password_file: cannot read {self.sasl_password_file}: "
                                  f"{e.strerror}") from None
            kw.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                      sasl_plain_password=password)
        return kw


class SpoolConfig(_Base, frozen=True):
    # Types with ack = "spool" keep a log per type under this directory. A
    # relative path is taken from $STATE_DIRECTORY (systemd) when it is set,
    # else from the current directory.
    dir: str = "spool"
    # always: fsync before every ack (survives power loss);
    # interval: ack after the write, fsync every fsync_interval_ms (survives a
    # crash of the daemon; a power cut may lose the last interval);
    # never: the OS decides when to write back.
    fsync: Literal["always", "interval", "never"] = "interval"
    fsync_interval_ms: Annotated[int, Meta(ge=1, le=60_000)] = 200
    segment_bytes: Annotated[int, Meta(ge=1024 * 1024)] = 64 * 1024 * 1024
    # Undelivered bytes one type may hold; above it the type answers retry-later.
    max_bytes_per_type: Annotated[int, Meta(ge=1024 * 1024)] = 1024 * 1024 * 1024
    # Free space the disk must keep; below it writes stop (retry-later).
    min_free_bytes: Annotated[int, Meta(ge=0)] = 64 * 1024 * 1024

    def resolved_dir(self) -> Path:
        p = Path(self.dir)
        if not p.is_absolute():
            state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
            p = Path(state) / p if state else Path.cwd() / p
        return p


class TlsConfig(_Base, frozen=True):
    # Setting cert_file and key_file turns TLS on for the producer listener.
    cert_file: str = ""
    key_file: str = ""
    # Mutual TLS: verify client certificates against this CA bundle.
    client_ca_file: str = ""
    client_auth: Literal["none", "optional", "required"] = "none"
    min_version: Literal["1.2", "1.3"] = "1.2"

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file: cert_file and key_file go together")
        if self.client_auth != "none" and not self.client_ca_file:
            raise ValueError("client_ca_file: needed when client_auth is not 'none'")
        if self.client_auth != "none" and not self.cert_file:
            raise ValueError("client_auth: client certificates need TLS (cert_file, key_file)")

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)


class AuthProducer(_Base, frozen=True):
    # Hashes from `eventbroker token create` (never the tokens themselves).
    token_hashes: list[str] = msgspec.field(default_factory=list)
    # The client certificate's subject CN that identifies this producer over
    # mutual TLS (empty: no certificate identifies it).
    cert_subject: str = ""
    # Event types it may send: names or shell-style patterns ("search.*").
    types: list[str] = msgspec.field(default_factory=list)
    # true: a token alone is not enough; the connection must also present
    # this producer's client certificate (cert_subject).
    require_cert: bool = False

    def __post_init__(self) -> None:
        from eventbroker.auth import check_hash_format

        for i, h in enumerate(self.token_hashes):
            why = check_hash_format(h)
            if why:
                raise ValueError(f"token_hashes: entry {i}: {why}")
        if self.require_cert and not self.cert_subject:
            raise ValueError("require_cert: needs cert_subject")


class AuthConfig(_Base, frozen=True):
    # true: every producer must authenticate (a token in HELLO, or a client
    # certificate named in [auth.producers]); false: anonymous producers may
    # send every type, and tokens are still checked when presented.
    required: bool = False
    producers: dict[Annotated[str, Meta(pattern=r"^[A-Za-z0-9_\-]{1,64}$")], AuthProducer] = \
        msgspec.field(default_factory=dict)
    # An address with this many failed handshakes in a minute is refused
    # for the rest of that minute.
    max_failures_per_minute: Annotated[int, Meta(ge=1)] = 10

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for name, p in self.producers.items():
            if p.cert_subject:
                if p.cert_subject in seen:
                    raise ValueError(f"producers: {name} and {seen[p.cert_subject]} have the same cert_subject "
                                     f"{p.cert_subject!r}")
                seen[p.cert_subject] = name


class LimitsConfig(_Base, frozen=True):
    handshake_timeout_ms: Annotated[int, Meta(ge=100)] = 10_000
    # A connection that sends nothing (not even a heartbeat) this long is closed.
    idle_timeout_ms: Annotated[int, Meta(ge=1000)] = 60_000
    max_connections: Annotated[int, Meta(ge=1)] = 100_000
    max_connections_per_address: Annotated[int, Meta(ge=1)] = 10_000
    # Bytes of a connection's batches accepted but not yet answered; above it
    # the connection is not read from until acks bring it back under.
    max_inflight_bytes_per_connection: Annotated[int, Meta(ge=1024 * 1024)] = 64 * 1024 * 1024
    # Addresses of load balancers: every producer behind one shares its
    # address, so the per-address limit and the failed-handshake refusal do
    # not apply to them (the load balancer must rate-limit instead).
    trusted_proxies: list[str] = msgspec.field(default_factory=list)


class TypeDefaults(_Base, frozen=True):
    priority: Priority = "normal"
    max_event_bytes: Annotated[int, Meta(ge=1)] = 512 * 1024
    partitioning: Partitioning = "key"
    ring_bytes: Annotated[int, Meta(ge=64 * 1024)] = 64 * 1024 * 1024
    enabled: bool = True
    ack: Ack = "kafka"


class EventTypeConfig(_Base, frozen=True):
    # Every field falls back to [defaults]; topic falls back to "events.<type>".
    topic: str | None = None
    priority: Priority | None = None
    max_event_bytes: Annotated[int, Meta(ge=1)] | None = None
    partitioning: Partitioning | None = None
    ring_bytes: Annotated[int, Meta(ge=64 * 1024)] | None = None
    enabled: bool | None = None
    # When the producer is told "persisted": after Kafka acknowledged the
    # events ("kafka"), or after they are in this daemon's disk spool ("spool").
    ack: Ack | None = None


class Config(_Base, frozen=True):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    kafka: KafkaConfig = msgspec.field(default_factory=KafkaConfig)
    spool: SpoolConfig = msgspec.field(default_factory=SpoolConfig)
    tls: TlsConfig = msgspec.field(default_factory=TlsConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    defaults: TypeDefaults = msgspec.field(default_factory=TypeDefaults)
    types: dict[TypeName, EventTypeConfig] = msgspec.field(default_factory=dict)


class EventType(Struct, frozen=True, kw_only=True):
    """One event type with every default resolved."""

    name: str
    topic: str
    priority: Priority
    max_event_bytes: int
    partitioning: Partitioning
    ring_bytes: int
    enabled: bool
    ack: Ack = "kafka"


_TOPIC_RE = re.compile(r"^[A-Za-z0-9._\-]{1,249}$")


def resolve_types(cfg: Config) -> dict[str, EventType]:
    """The registry: every configured type with defaults applied, validated."""
    d = cfg.defaults
    out: dict[str, EventType] = {}
    for name, t in sorted(cfg.types.items()):
        topic = t.topic if t.topic is not None else f"events.{name}"
        if not _TOPIC_RE.match(topic):
            raise ValueError(f"key 'types.{name}.topic': {topic!r} is not a valid Kafka topic name")
        et = EventType(
            name=name,
            topic=topic,
            priority=t.priority or d.priority,
            max_event_bytes=t.max_event_bytes or d.max_event_bytes,
            partitioning=t.partitioning or d.partitioning,
            ring_bytes=t.ring_bytes or d.ring_bytes,
            enabled=d.enabled if t.enabled is None else t.enabled,
            ack=t.ack or d.ack,
        )
        if et.ring_bytes < 2 * cfg.server.max_frame_bytes:
            raise ValueError(
                f"key 'types.{name}.ring_bytes': {et.ring_bytes} is less than twice server.max_frame_bytes "
                f"({cfg.server.max_frame_bytes})"
            )
        out[name] = et
    return out


def parse_host_port(value: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """Parse ``host:port`` (``[v6]:port`` too); raises ValueError with the reason."""
    host, sep, port_s = value.rpartition(":")
    if not sep:
        raise ValueError(f"{value!r} is not HOST:PORT")
    host = host.strip("[]") or default_host
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"{value!r}: port {port_s!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{value!r}: port out of range")
    return host, port


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


def default_server_id() -> str:
    return socket.gethostname()


# Keys a running daemon cannot change on reload (SIGHUP): they need a restart.
_RESTART_KEYS = {
    "server": ("listen", "admin_listen", "workers", "reuse_port", "server_id"),
    "kafka": ("bootstrap_servers", "sink", "client_id", "embedded_port", "max_inflight_batches_per_type",
              "max_inflight_requests", "request_timeout_ms", "create_topics", "topic_partitions",
              "replication_factor", "security_protocol", "sasl_mechanism", "sasl_username", "sasl_password_file",
              "ssl_ca_file", "ssl_cert_file", "ssl_key_file"),
    "spool": ("dir", "fsync", "fsync_interval_ms", "segment_bytes"),
    "tls": ("cert_file", "key_file", "client_ca_file", "client_auth", "min_version"),
}


def reload_blockers(old: Config, new: Config) -> list[str]:
    """What differs between two configs that a reload cannot apply; empty: reloadable."""
    out = []
    for section, keys in _RESTART_KEYS.items():
        a, b = getattr(old, section), getattr(new, section)
        out += [f"{section}.{k}" for k in keys if getattr(a, k) != getattr(b, k)]
    old_types, new_types = resolve_types(old), resolve_types(new)
    for name in sorted(old_types.keys() & new_types.keys()):
        for k in ("topic", "ack"):
            if getattr(old_types[name], k) != getattr(new_types[name], k):
                out.append(f"types.{name}.{k}")
    return out
