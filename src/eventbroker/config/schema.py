"""The configuration's shape: frozen msgspec Structs, one per TOML section.

Units are in the field names. Each Struct checks what it can see alone
(``__post_init__`` raises ``"<field>: <reason>"``, which ``load`` turns into
an error naming the file and the key); ``registry`` checks across sections.
"""

from __future__ import annotations

import base64
import os
import socket
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

from eventbroker.protocol import DEFAULT_LISTEN, MAX_EVENT_FRAMING_BYTES, TYPE_NAME_PATTERN, parse_host_port

DEFAULT_ADMIN_LISTEN = "127.0.0.1:7481"
DEFAULT_EMBEDDED_PORT = 19092

TypeName = Annotated[str, Meta(pattern=TYPE_NAME_PATTERN)]
Priority = Literal["critical", "high", "normal", "low"]
Partitioning = Literal["key", "spread"]
AckMode = Literal["kafka", "spool"]  # when a type's events are acknowledged
# How a type's schema versions may evolve (docs/schemas.md).
Compatibility = Literal["backward", "backward_transitive", "forward", "forward_transitive", "full",
                        "full_transitive", "none"]
OnInvalid = Literal["reject", "dead_letter"]  # what an event its schema refuses gets
# How a type's record batches are compressed in Kafka (kafka/compression.py).
Compression = Literal["zstd", "lz4", "gzip", "snappy", "none"]
# Per codec: (lowest, highest, default) compression_level; snappy takes none.
# zstd's negative levels are its fast modes. The defaults were chosen from
# benchmarks/README.md ("compression"): zstd 1 gives about twice lz4's ratio
# on JSON events for about 0.1 us more per event.
COMPRESSION_LEVELS: dict[str, tuple[int, int, int]] = {"zstd": (-7, 22, 1), "lz4": (1, 12, 1), "gzip": (1, 9, 6)}

PRIORITY_ORDER: dict[str, int] = {"critical": 0, "high": 1, "normal": 2, "low": 3}
# Share of server.memory_budget_bytes up to which each priority is admitted.
PRIORITY_BUDGET_SHARE: dict[str, float] = {"critical": 1.0, "high": 0.85, "normal": 0.70, "low": 0.50}


class _Base(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    pass


_TEN_YEARS_MS = 10 * 366 * 24 * 3600 * 1000


class ServerConfig(_Base, frozen=True):
    listen: str = DEFAULT_LISTEN
    server_id: str = ""
    max_frame_bytes: Annotated[int, Meta(ge=1024, le=64 * 1024 * 1024)] = 1024 * 1024
    max_event_bytes: Annotated[int, Meta(ge=1)] = 512 * 1024
    max_events_per_batch: Annotated[int, Meta(ge=1, le=1_000_000)] = 65536
    # Events timestamped further ahead of the gateway's clock (behind it) are
    # rejected invalid_timestamp, so one producer's bad clock costs only its
    # own events; keep them at least as strict as the topics'
    # message.timestamp.after.max.ms / before.max.ms. 0: no limit.
    max_timestamp_ahead_ms: Annotated[int, Meta(ge=0, le=_TEN_YEARS_MS)] = 3_600_000
    max_timestamp_behind_ms: Annotated[int, Meta(ge=0, le=_TEN_YEARS_MS)] = 0
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
        fits = self.max_frame_bytes - MAX_EVENT_FRAMING_BYTES
        if self.max_event_bytes > fits:
            raise ValueError(f"max_event_bytes: {self.max_event_bytes} can never arrive in a frame of max_frame_bytes "
                             f"= {self.max_frame_bytes} (an event needs up to {MAX_EVENT_FRAMING_BYTES} bytes of "
                             f"framing besides its key and payload): at most {fits}")
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


def state_path(value: str) -> Path:
    """A relative path taken from $STATE_DIRECTORY (systemd) when it is set, else from the current directory."""
    p = Path(value)
    if not p.is_absolute():
        state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
        p = Path(state) / p if state else Path.cwd() / p
    return p


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
        return state_path(self.dir)


class SchemasConfig(_Base, frozen=True):
    # Event schemas: <dir>/<schema>/<N>.json, N = 1, 2, ... (docs/schemas.md).
    # A relative dir is taken from the config file's folder (load_config
    # makes it absolute), else from the current directory.
    dir: str = "schemas"


class PrivacyConfig(_Base, frozen=True):
    # Personal fields (x-personal in a schema) are sealed under a data key per
    # user (docs/privacy.md). The key store every gateway and tool shares:
    # sqlite:///<path> (a relative path is taken from $STATE_DIRECTORY, else
    # the current directory, as the spool's) or postgresql://user@host/db.
    key_store: str = "sqlite:///keys/keys.db"
    # The key-encryption keys wrapping the data keys: lines "<id> <base64 of
    # 32 bytes>", the first wraps new keys, the others only unwrap (rotation:
    # `eventbroker keys rotate`). Read from the environment variable kek_env
    # when it is set, else from kek_file (relative: as key_store), which a
    # gateway on a SQLite key store creates on first start.
    kek_file: str = "keys/kek"
    kek_env: str = "EVENTBROKER_KEK"
    # Unwrapped keys a gateway keeps in memory (about 160 bytes each).
    cache_users: Annotated[int, Meta(ge=1, le=100_000_000)] = 100_000
    # How often a gateway asks the key store for users forgotten since it last
    # asked; a forget reaches every gateway within about this time.
    forget_poll_ms: Annotated[int, Meta(ge=50, le=60_000)] = 1000

    def state_path(self, value: str) -> Path:
        """A path of this section, a relative one taken from the state directory."""
        return state_path(value)


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


TOKEN_HASH_SCHEME = "sha256"


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def parse_token_hash(value: str) -> tuple[bytes, bytes]:
    """``(salt, digest)`` of a stored token hash ``sha256$<salt>$<digest>``
    (base64url, as ``eventbroker token create`` prints it); ValueError says
    what is wrong. security/tokens.py makes and checks these hashes."""
    parts = value.split("$")
    if len(parts) != 3 or parts[0] != TOKEN_HASH_SCHEME:
        raise ValueError(f"expected {TOKEN_HASH_SCHEME}$<salt>$<digest> (from `eventbroker token create`); "
                         "never the token itself")
    try:
        salt, digest = _unb64(parts[1]), _unb64(parts[2])
    except (ValueError, TypeError):
        raise ValueError("salt and digest must be base64url") from None
    if len(salt) < 8 or len(digest) != 32:
        raise ValueError("salt or digest has the wrong length")
    return salt, digest


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
        for i, h in enumerate(self.token_hashes):
            try:
                parse_token_hash(h)
            except ValueError as e:
                raise ValueError(f"token_hashes: entry {i}: {e}") from None
        if self.require_cert and not self.cert_subject:
            raise ValueError("require_cert: needs cert_subject")


class AuthConfig(_Base, frozen=True):
    # true: every producer must authenticate (a token in HELLO, or a client
    # certificate named in [auth.producers]); false: anonymous producers may
    # send every type, and tokens are still checked when presented. Unset:
    # true as soon as [auth.producers] names anyone (the secure choice), else false.
    required: bool | None = None
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

    @property
    def must_authenticate(self) -> bool:
        return self.required if self.required is not None else bool(self.producers)

    @property
    def open_despite_producers(self) -> bool:
        """Producers are configured, yet anonymous ones may send every type."""
        return bool(self.producers) and not self.must_authenticate


class LimitsConfig(_Base, frozen=True):
    handshake_timeout_ms: Annotated[int, Meta(ge=100)] = 10_000
    # A connection that sends nothing (not even a heartbeat) this long is closed.
    idle_timeout_ms: Annotated[int, Meta(ge=1000)] = 60_000
    max_connections: Annotated[int, Meta(ge=1)] = 100_000
    max_connections_per_address: Annotated[int, Meta(ge=1)] = 10_000
    # Bytes of a connection's batches accepted but not yet answered; above it
    # the connection is not read from until acks bring it back under.
    max_inflight_bytes_per_connection: Annotated[int, Meta(ge=1024 * 1024)] = 64 * 1024 * 1024
    # Bytes of partial HELLOs held for connections that have not finished
    # their handshake, all together; above it new partial HELLOs are refused
    # (CONNECTION_LIMIT). Each is at most 65,802 bytes (a HELLO's largest size).
    max_handshake_bytes: Annotated[int, Meta(ge=1024 * 1024)] = 64 * 1024 * 1024
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
    ack: AckMode = "kafka"
    compatibility: Compatibility = "backward"
    on_invalid: OnInvalid = "reject"
    compression: Compression = "zstd"
    compression_level: int | None = None  # None: the codec's default (COMPRESSION_LEVELS)


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
    ack: AckMode | None = None
    # The folder under [schemas] dir holding this type's versions; none: the
    # payloads are not looked at (free-form types).
    schema: TypeName | None = None
    compatibility: Compatibility | None = None
    # "reject": answered rejected schema_violation in the ACK; "dead_letter":
    # acknowledged, and written to dead_letter_topic with the failure in the
    # eb.error header.
    on_invalid: OnInvalid | None = None
    dead_letter_topic: str | None = None  # default: "events.<type>.invalid"
    # The payload field naming the user whose key seals the type's personal
    # fields, when the schema marks none "x-user" (docs/privacy.md).
    user_field: str | None = None
    # Record batches compressed once per batch in Kafka; the level falls back
    # to [defaults] compression_level only when the codec is the default's.
    compression: Compression | None = None
    compression_level: int | None = None


class Config(_Base, frozen=True):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    kafka: KafkaConfig = msgspec.field(default_factory=KafkaConfig)
    spool: SpoolConfig = msgspec.field(default_factory=SpoolConfig)
    schemas: SchemasConfig = msgspec.field(default_factory=SchemasConfig)
    privacy: PrivacyConfig = msgspec.field(default_factory=PrivacyConfig)
    tls: TlsConfig = msgspec.field(default_factory=TlsConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    defaults: TypeDefaults = msgspec.field(default_factory=TypeDefaults)
    types: dict[TypeName, EventTypeConfig] = msgspec.field(default_factory=dict)


def default_server_id() -> str:
    return socket.gethostname()
