"""The registry of event types: every configured type with its defaults resolved.

``resolve_types`` is the one place that knows how a ``[types.<name>]`` entry
falls back to ``[defaults]`` and which cross-section rules a type must keep.
"""

from __future__ import annotations

import re

from msgspec import Struct

from eventbroker.config.schema import (
    COMPRESSION_LEVELS,
    AckMode,
    Compatibility,
    Compression,
    Config,
    OnInvalid,
    Partitioning,
    Priority,
)


class EventType(Struct, frozen=True, kw_only=True):
    """One event type with every default resolved."""

    name: str
    topic: str
    priority: Priority
    max_event_bytes: int
    partitioning: Partitioning
    ring_bytes: int
    enabled: bool
    ack: AckMode = "kafka"
    schema: str | None = None  # folder of its schema versions under [schemas] dir
    compatibility: Compatibility = "backward"
    on_invalid: OnInvalid = "reject"
    dead_letter_topic: str = ""
    user_field: str | None = None  # names the user of personal fields when the schema has no x-user
    compression: Compression = "none"
    compression_level: int = 0  # resolved: the codec's default when none was given; 0 for none and snappy

    @property
    def dead_letter(self) -> bool:
        """Whether schema failures go to ``dead_letter_topic``."""
        return self.schema is not None and self.on_invalid == "dead_letter"


def _compression(name: str, codec: Compression | None, level: int | None, default_codec: Compression,
                 default_level: int | None) -> dict:
    """A type's codec and level, with [defaults] applied and the level checked."""
    key = f"types.{name}.compression_level"
    if codec is None or codec == default_codec:
        if level is None:
            level = default_level
            key = "defaults.compression_level"
        codec = default_codec
    if codec not in COMPRESSION_LEVELS:
        if level is not None:
            raise ValueError(f"key '{key}': {codec} takes no level")
        return {"compression": codec, "compression_level": 0}
    lo, hi, default = COMPRESSION_LEVELS[codec]
    if level is None:
        level = default
    elif not lo <= level <= hi:
        raise ValueError(f"key '{key}': {level} is outside {lo}..{hi} for {codec}")
    return {"compression": codec, "compression_level": level}


_TOPIC_RE = re.compile(r"^[A-Za-z0-9._\-]{1,249}$")


def resolve_types(cfg: Config) -> dict[str, EventType]:
    """The registry: every configured type with defaults applied, validated."""
    d = cfg.defaults
    _compression("", None, None, d.compression, d.compression_level)  # a bad default level, even if unused
    out: dict[str, EventType] = {}
    for name, t in sorted(cfg.types.items()):
        topic = t.topic if t.topic is not None else f"events.{name}"
        dead_letter_topic = t.dead_letter_topic if t.dead_letter_topic is not None else f"events.{name}.invalid"
        for key, value in (("topic", topic), ("dead_letter_topic", dead_letter_topic)):
            if not _TOPIC_RE.match(value):
                raise ValueError(f"key 'types.{name}.{key}': {value!r} is not a valid Kafka topic name")
        et = EventType(
            name=name,
            topic=topic,
            priority=t.priority or d.priority,
            max_event_bytes=t.max_event_bytes or d.max_event_bytes,
            partitioning=t.partitioning or d.partitioning,
            ring_bytes=t.ring_bytes or d.ring_bytes,
            enabled=d.enabled if t.enabled is None else t.enabled,
            ack=t.ack or d.ack,
            schema=t.schema,
            compatibility=t.compatibility or d.compatibility,
            on_invalid=t.on_invalid or d.on_invalid,
            dead_letter_topic=dead_letter_topic,
            user_field=t.user_field,
            **_compression(name, t.compression, t.compression_level, d.compression, d.compression_level),
        )
        if et.dead_letter and dead_letter_topic == topic:
            raise ValueError(f"key 'types.{name}.dead_letter_topic': must differ from the type's topic")
        if et.ring_bytes < 2 * cfg.server.max_frame_bytes:
            raise ValueError(
                f"key 'types.{name}.ring_bytes': {et.ring_bytes} is less than twice server.max_frame_bytes "
                f"({cfg.server.max_frame_bytes})"
            )
        out[name] = et
    return out
