"""The schema registry: every type's schema versions, loaded, compiled and
checked against the type's compatibility mode.

``load_registry`` reads what the config names; a failure of any file or rule
raises ``SchemaError`` naming the file, and nothing is applied (at start the
daemon refuses to start; on SIGHUP the running registry stays in force). The
gateway hangs each type's ``TypeSchemas`` on its ring; the splitter asks it
for the version a part is written against (``resolve``), validates the part
with ``SchemaVersion.check`` and reports with ``tally``. Counters live in
``SchemaStats`` objects that a reload carries over, so metrics never go
backwards.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eventbroker import _fastpath as fp
from eventbroker.config import Config, EventType
from eventbroker.errors import SchemaError
from eventbroker.protocol import MAX_DETAIL_BYTES, utf8_prefix
from eventbroker.schema.compat import check_chain
from eventbroker.schema.compile import flat_schema
from eventbroker.schema.model import Version, read_versions
from eventbroker.schema.personal import Personal, check_personal_chain, personal_fields, type_personal
from eventbroker.schema.validate import RULES, BatchValidator, Failure


@dataclass
class SchemaStats:
    """Counters of one type and version (metrics, ``eventbroker status``)."""

    validated: int = 0  # events that passed
    invalid: dict[str, int] = field(default_factory=dict)  # rule -> events refused


class SchemaVersion:
    """One version of a type, compiled; what the splitter calls per part."""

    __slots__ = ("number", "header", "dead_letter", "validator", "flat", "stats", "version", "personal",
                 "personal_fields")

    def __init__(self, etype: EventType, version: Version, stats: SchemaStats,
                 personal: Personal | None = None) -> None:
        self.number = version.number
        self.version = version
        self.header = fp.record_header(fp.HEADER_SCHEMA_VERSION, str(version.number).encode())
        self.dead_letter = etype.dead_letter
        self.validator = BatchValidator(version.root, f"{etype.name} v{version.number}")
        self.flat = flat_schema(version.root)  # the native accept-path, for flat closed schemas
        self.stats = stats
        # Personal fields sealed by the splitter (personal.pxi), or None: the
        # type's, every name personal in any of its versions (TypeSchemas).
        self.personal_fields = personal
        self.personal = fp.PersonalFields(etype.name, personal.user_field, personal.fields) if personal else None

    def check(self, buf: bytearray, seps: Any, n: int) -> list[Failure] | None:
        return self.validator.check(buf, seps, n)

    def tally(self, n_valid: int, rules: list[str] | None) -> None:
        st = self.stats
        st.validated += n_valid
        if rules:
            for r in rules:
                st.invalid[r] = st.invalid.get(r, 0) + 1

    def dead_letter_headers(self, detail: str) -> bytes:
        """The record headers of a dead-lettered event: its version and why it failed."""
        return self.header + fp.record_header(fp.HEADER_ERROR, utf8_prefix(detail, MAX_DETAIL_BYTES))


class TypeSchemas:
    """A type's versions; version 0 in ``resolve`` means the latest."""

    __slots__ = ("etype", "versions", "latest", "has_personal")

    def __init__(self, etype: EventType, versions: dict[int, Version], stats: dict[tuple[str, int], SchemaStats]):
        self.etype = etype
        personal = type_personal(versions, etype.user_field)
        self.versions = {n: SchemaVersion(etype, v, stats.setdefault((etype.name, n), SchemaStats()), personal)
                         for n, v in versions.items()}
        self.latest = max(versions)
        self.has_personal = any(sv.personal is not None for sv in self.versions.values())

    def resolve(self, number: int) -> SchemaVersion | None:
        return self.versions.get(number or self.latest)


class SchemaRegistry:
    """Every type's schemas; ``types`` holds only the types that have one."""

    def __init__(self, schemas_dir: Path, types: dict[str, TypeSchemas],
                 stats: dict[tuple[str, int], SchemaStats]) -> None:
        self.dir = schemas_dir
        self.types = types
        self.stats = stats

    def get(self, name: str) -> TypeSchemas | None:
        return self.types.get(name)

    @property
    def has_personal(self) -> bool:
        """Whether some type has personal fields (the gateway then needs its key store)."""
        return any(ts.has_personal for ts in self.types.values())


def schemas_dir(cfg: Config) -> Path:
    return Path(cfg.schemas.dir)


def load_versions(cfg: Config, etype: EventType) -> dict[int, Version]:
    """A type's versions read and checked against its compatibility mode."""
    assert etype.schema is not None
    versions = read_versions(schemas_dir(cfg), etype.schema)
    problems = check_chain(etype.name, versions, etype.compatibility)
    problems += check_personal_chain(etype.name, versions, etype.user_field)
    if etype.dead_letter and any(personal_fields(v, etype.user_field) for v in versions.values()):
        problems.append("a type with personal fields cannot dead-letter invalid events (their personal values "
                        "could not be found to seal): set on_invalid = \"reject\"")
    if problems:
        raise SchemaError(f"{schemas_dir(cfg) / etype.schema}: " + "; ".join(problems))
    return versions


def load_registry(cfg: Config, types: dict[str, EventType], running: SchemaRegistry | None = None) -> SchemaRegistry:
    """Load every type's schemas. With ``running`` (a reload), a version the
    running registry has must be unchanged: versions are immutable once in
    use (events name them); add a new one instead."""
    stats = running.stats if running is not None else {}
    out: dict[str, TypeSchemas] = {}
    for name, et in types.items():
        if et.schema is None:
            continue
        versions = load_versions(cfg, et)
        old = running.get(name) if running is not None else None
        if old is not None:
            for n, sv in old.versions.items():
                # A removed version is allowed (producers naming it get
                # unknown_schema_version; a rolled-back reload removes one).
                if n in versions and _canonical(versions[n].document) != _canonical(sv.version.document):
                    raise SchemaError(f"{versions[n].path}: {name} v{n} changed in place; versions are immutable "
                                      f"once in use: add v{max(versions) + 1} instead")
        out[name] = TypeSchemas(et, versions, stats)
    return SchemaRegistry(schemas_dir(cfg), out, stats)


def _canonical(doc: Any) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


__all__ = ["RULES", "SchemaRegistry", "SchemaStats", "SchemaVersion", "TypeSchemas", "load_registry",
           "load_versions"]
