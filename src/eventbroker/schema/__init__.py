"""Event schemas: JSON Schema files per type, validated at the edge.

- ``model``: schema files read into one normalized tree, unsupported
  keywords refused;
- ``compile``: that tree as msgspec types;
- ``validate``: a batch part validated in one decode call, failures as
  rule and JSON path (never values);
- ``compat``: the evolution rules (backward, forward, full, transitive);
- ``registry``: every configured type's versions, loaded and checked.

Sits beside ``kafka`` and ``security``: it imports ``config``, ``errors`` and
``_fastpath``; the gateway imports it. Docs: docs/schemas.md.
"""

from eventbroker.schema.registry import (
    RULES,
    SchemaRegistry,
    SchemaStats,
    SchemaVersion,
    TypeSchemas,
    load_registry,
    load_versions,
)

__all__ = ["RULES", "SchemaRegistry", "SchemaStats", "SchemaVersion", "TypeSchemas", "load_registry",
           "load_versions"]
