"""Configuration: frozen msgspec Structs decoded from TOML and validated on load.

- ``schema``: the Structs, one per section, with their defaults and units;
- ``load``: reading a TOML file, error messages that name the file and key,
  command-line overrides;
- ``registry``: the event types with every default resolved (``EventType``);
- ``reload``: which keys a running daemon cannot change without a restart.

This package sits just above ``protocol`` and ``errors``: it imports nothing
of the gateway, Kafka, the spool or operations.
"""

from eventbroker.config.load import BUILT_IN_DEFAULTS, load_config, with_overrides
from eventbroker.config.registry import EventType, resolve_types
from eventbroker.config.reload import reload_blockers
from eventbroker.config.schema import (
    DEFAULT_ADMIN_LISTEN,
    DEFAULT_EMBEDDED_PORT,
    PRIORITY_BUDGET_SHARE,
    PRIORITY_ORDER,
    AuthConfig,
    AuthProducer,
    Config,
    EventTypeConfig,
    KafkaConfig,
    LimitsConfig,
    PrivacyConfig,
    SchemasConfig,
    ServerConfig,
    SpoolConfig,
    TlsConfig,
    TypeDefaults,
)

__all__ = [
    "BUILT_IN_DEFAULTS", "DEFAULT_ADMIN_LISTEN", "DEFAULT_EMBEDDED_PORT", "PRIORITY_BUDGET_SHARE", "PRIORITY_ORDER", "AuthConfig",
    "AuthProducer", "Config", "EventType", "EventTypeConfig", "KafkaConfig", "LimitsConfig", "PrivacyConfig", "SchemasConfig", "ServerConfig",
    "SpoolConfig", "TlsConfig", "TypeDefaults", "load_config", "reload_blockers", "resolve_types", "with_overrides",
]
