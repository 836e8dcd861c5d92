"""What a running daemon can take from a new config on reload (SIGHUP), and
what needs a restart."""

from __future__ import annotations

from eventbroker.config.registry import resolve_types
from eventbroker.config.schema import Config

# Keys a running daemon cannot change on reload (SIGHUP): they need a restart.
_RESTART_KEYS = {
    "server": ("listen", "admin_listen", "workers", "reuse_port", "server_id"),
    "kafka": ("bootstrap_servers", "sink", "client_id", "embedded_port", "max_inflight_batches_per_type",
              "max_inflight_requests", "request_timeout_ms", "create_topics", "topic_partitions",
              "replication_factor", "security_protocol", "sasl_mechanism", "sasl_username", "sasl_password_file",
              "ssl_ca_file", "ssl_cert_file", "ssl_key_file"),
    "spool": ("dir", "fsync", "fsync_interval_ms", "segment_bytes"),
    "tls": ("cert_file", "key_file", "client_ca_file", "client_auth", "min_version"),
    "privacy": ("key_store", "cache_users", "forget_poll_ms"),  # the KEKs are re-read on reload
}


def reload_blockers(old: Config, new: Config) -> list[str]:
    """What differs between two configs that a reload cannot apply; empty: reloadable."""
    out = []
    for section, keys in _RESTART_KEYS.items():
        a, b = getattr(old, section), getattr(new, section)
        out += [f"{section}.{k}" for k in keys if getattr(a, k) != getattr(b, k)]
    old_types, new_types = resolve_types(old), resolve_types(new)
    for name in sorted(old_types.keys() & new_types.keys()):
        for k in ("topic", "ack", "dead_letter_topic"):
            if getattr(old_types[name], k) != getattr(new_types[name], k):
                out.append(f"types.{name}.{k}")
        if old_types[name].dead_letter != new_types[name].dead_letter:  # its topic is created at start
            out.append(f"types.{name}.on_invalid")
    return out
