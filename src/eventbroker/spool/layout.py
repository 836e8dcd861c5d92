"""Where spools live on disk, and what each directory says about itself.

- ``<spool.dir>/<type>/``: a type's log (log.py) in the single-process layout;
- ``<spool.dir>/slot-<n>/<type>/``: the same under ``serve --workers``, where
  each worker holds one slot (``slot.lock``) for its lifetime;
- ``<type>/type.json``: the type's topic and settings, written when its lane
  opens the log, so whoever delivers the spool later (another worker, the
  adopter, ``spool replay``) never guesses the topic.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import orjson

from eventbroker.config import EventType, TypeDefaults
from eventbroker.spool.log import list_segments

META_FILE = "type.json"
SLOT_LOCK = "slot.lock"
SLOT_PREFIX = "slot-"


def slot_dir(base: Path, index: int) -> Path:
    return base / f"{SLOT_PREFIX}{index}"


def write_meta(type_dir: Path, et: EventType) -> None:
    """Remember the type's topic beside its spool, for whoever delivers it later."""
    data = orjson.dumps({"name": et.name, "topic": et.topic, "partitioning": et.partitioning,
                         "priority": et.priority, "max_event_bytes": et.max_event_bytes})
    tmp = type_dir / (META_FILE + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, type_dir / META_FILE)


def default_type(name: str, defaults: TypeDefaults, meta: dict | None = None) -> EventType:
    """A spooled type from what its type.json says (``meta``), else ``[defaults]``."""
    m = meta or {}
    return EventType(name=name, topic=m.get("topic", f"events.{name}"),
                     priority=m.get("priority", defaults.priority),
                     max_event_bytes=m.get("max_event_bytes", defaults.max_event_bytes),
                     partitioning=m.get("partitioning", defaults.partitioning),
                     ring_bytes=defaults.ring_bytes, enabled=True, ack="spool")


def read_meta(type_dir: Path, defaults: TypeDefaults, known: dict[str, EventType] | None = None) -> EventType | None:
    """The type a spool belongs to: from its type.json, else from the config;
    None when neither says (its topic would be a guess)."""
    try:
        m = orjson.loads((type_dir / META_FILE).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        if known and type_dir.name in known:
            return known[type_dir.name]
        return None
    return default_type(type_dir.name, defaults, m)


def lock_slot(slot: Path) -> int | None:
    """Hold ``slot`` (a worker's spool directory) for this process; None if taken."""
    slot.mkdir(parents=True, exist_ok=True)
    fd = os.open(slot / SLOT_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def is_slot(p: Path) -> bool:
    """A worker's slot (``slot-<n>`` holding ``slot.lock``), not a type that happens to be named so."""
    return p.name.startswith(SLOT_PREFIX) and p.name[len(SLOT_PREFIX):].isdigit() and (p / SLOT_LOCK).exists()


def is_type_dir(p: Path) -> bool:
    return p.is_dir() and not is_slot(p) and ((p / "lock").exists() or bool(list_segments(p)))


def type_dirs(d: Path) -> list[Path]:
    """The type directories directly under ``d`` (a spool root or one slot)."""
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if is_type_dir(p))


def slots(base: Path) -> list[Path]:
    return sorted(p for p in base.glob(f"{SLOT_PREFIX}*") if is_slot(p))


def all_type_dirs(root: Path) -> list[Path]:
    """Every type directory of a spool: ``<root>/<type>`` and ``<root>/slot-<n>/<type>``."""
    dirs = type_dirs(root)
    for slot in slots(root):
        dirs += type_dirs(slot)
    return dirs
