"""JSON Schema documents read into one normalized tree (``Node``).

Event schemas are JSON Schema draft 2020-12 documents restricted to the
keywords event schemas use (``SUPPORTED``). Any other keyword is refused with
the file and the keyword, never ignored: a schema that says more than the
gateway checks would promise what nobody enforces. Keywords starting with
``x-`` are annotations, kept on the node (``Node.annotations``) and ignored by
validation. ``$ref`` may point into the same file (``#/$defs/...``) or at
another file in the schemas folder (``../common/geo.json``,
``geo.json#/$defs/point``); it never leaves the folder, and a reference cycle
is refused.

Both the validator compiler (``compile``) and the evolution rules
(``compat``) read the ``Node`` tree, so they agree on what a schema means.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eventbroker.errors import SchemaError

DRAFT = "https://json-schema.org/draft/2020-12/schema"

# keyword -> what it does, for the docs and for error messages
SUPPORTED = {
    "type": "string, integer, number, boolean, null, object, array, or a list of them (\"null\" makes it nullable)",
    "properties": "the object's named fields",
    "required": "fields that must be present",
    "additionalProperties": "false refuses undeclared fields; true (the default) or a schema (objects without "
                            "properties only) allows them",
    "enum": "one of the listed strings, integers or null",
    "const": "exactly this string, integer or null",
    "items": "the schema of every array element",
    "minItems": "array length at least", "maxItems": "array length at most",
    "minimum": "number at least", "maximum": "number at most",
    "exclusiveMinimum": "number greater than", "exclusiveMaximum": "number less than",
    "minLength": "string length (code points) at least", "maxLength": "string length at most",
    "pattern": "the string matches this regular expression (unanchored, as JSON Schema says)",
    "format": "date-time (RFC 3339 with an offset) or uuid (8-4-4-4-12 hex)",
    "anyOf": "only as a nullable union: a schema and {\"type\": \"null\"}",
    "$ref": "a schema in this file (#/$defs/name) or another file of the schemas folder",
    "$defs": "schemas for $ref",
}
ANNOTATIONS = {"$schema", "$id", "$comment", "title", "description", "default", "examples", "deprecated",
               "readOnly", "writeOnly"}
TYPES = ("null", "boolean", "integer", "number", "string", "array", "object")
FORMATS = ("date-time", "uuid")
_FLOAT_MAX = 1.7976931348623157e308  # sys.float_info.max: a bound beyond it is no number


@dataclass(eq=False)
class Node:
    """One (sub)schema, normalized. ``types`` empty: any JSON value."""

    types: frozenset[str] = frozenset()
    properties: dict[str, Node] = field(default_factory=dict)
    required: frozenset[str] = frozenset()
    additional: bool = True  # undeclared object fields allowed
    additional_schema: Node | None = None  # their schema (objects without properties)
    items: Node | None = None
    enum: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    exclusive_maximum: float | None = None
    min_length: int | None = None
    max_length: int | None = None
    min_items: int | None = None
    max_items: int | None = None
    pattern: str | None = None
    format: str | None = None
    annotations: dict[str, Any] = field(default_factory=dict)

    @property
    def accepts_anything(self) -> bool:
        return (not self.types and self.enum is None and self.pattern is None and self.format is None
                and all(getattr(self, k) is None for k in _BOUNDS))

    def describe_type(self) -> str:
        return " or ".join(t for t in TYPES if t in self.types) if self.types else "any value"


_BOUNDS = ("minimum", "maximum", "exclusive_minimum", "exclusive_maximum", "min_length", "max_length",
           "min_items", "max_items")
_VERSION_FILE = re.compile(r"^([1-9][0-9]{0,5})\.json$")


class _Reader:
    """Reads one version's document and the files it refers to."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.docs: dict[Path, Any] = {}

    def where(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)

    def document(self, path: Path) -> Any:
        path = path.resolve()
        if path not in self.docs:
            try:
                self.docs[path] = json.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise SchemaError(f"{self.where(path)}: no such schema file") from None
            except (OSError, UnicodeDecodeError) as e:
                raise SchemaError(f"{self.where(path)}: cannot read: {getattr(e, 'strerror', None) or e}") from None
            except json.JSONDecodeError as e:
                raise SchemaError(f"{self.where(path)}: not valid JSON: {e}") from None
        return self.docs[path]

    def resolve(self, ref: str, base: Path, where: str) -> tuple[Any, Path, str]:
        file_part, _, pointer = ref.partition("#")
        target = base
        if file_part:
            if "://" in file_part or file_part.startswith("/"):
                raise SchemaError(f"{where}: $ref {ref!r}: only references within the schemas folder are supported")
            target = (base.parent / file_part).resolve()
            if self.root not in target.parents:
                raise SchemaError(f"{where}: $ref {ref!r} leaves the schemas folder")
        doc = self.document(target)
        node = doc
        if pointer:
            if not pointer.startswith("/"):
                raise SchemaError(f"{where}: $ref {ref!r}: the part after # must be a JSON pointer (#/$defs/name)")
            for token in pointer[1:].split("/"):
                token = token.replace("~1", "/").replace("~0", "~")
                if isinstance(node, dict) and token in node:
                    node = node[token]
                elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
                    node = node[int(token)]
                else:
                    raise SchemaError(f"{where}: $ref {ref!r}: {self.where(target)} has nothing at {pointer}")
        return node, target, f"{self.where(target)}#{pointer}"

    def node(self, s: Any, file: Path, where: str, active: tuple[str, ...] = ()) -> Node:
        """``where``: "file: $.path" for messages."""
        if s is True or s == {}:
            return Node()
        if not isinstance(s, dict):
            raise SchemaError(f"{where}: a schema must be an object (or true), not {json.dumps(s)[:40]}")
        for k in s:
            if k not in SUPPORTED and k not in ANNOTATIONS and not k.startswith("x-"):
                raise SchemaError(f"{where}: keyword {k!r} is not supported (supported: "
                                  f"{', '.join(sorted(SUPPORTED))}; x-* annotations)")
        if "$schema" in s and s["$schema"].rstrip("#") != DRAFT:
            raise SchemaError(f"{where}: $schema {s['$schema']!r}: only draft 2020-12 ({DRAFT}) is supported")
        if "$ref" in s:
            others = [k for k in s if k not in ANNOTATIONS and k != "$ref" and k != "$defs" and not k.startswith("x-")]
            if others:
                raise SchemaError(f"{where}: $ref beside {', '.join(others)} is not supported: put them in the "
                                  f"referenced schema")
            target, tfile, key = self.resolve(s["$ref"], file, where)
            if key in active:
                raise SchemaError(f"{where}: $ref {s['$ref']!r} is recursive (through {' -> '.join(active)})")
            n = self.node(target, tfile, f"{key}", (*active, key))
            n.annotations = {**n.annotations, **_annotations(s)}
            return n
        if "anyOf" in s:
            return self._nullable(s, file, where, active)
        n = Node(annotations=_annotations(s))
        t = s.get("type")
        if t is not None:
            ts = [t] if isinstance(t, str) else t
            if not isinstance(ts, list) or not ts or any(x not in TYPES for x in ts) or len(set(ts)) != len(ts):
                raise SchemaError(f"{where}: type {json.dumps(t)}: use one of {', '.join(TYPES)} or a list of them")
            n.types = frozenset(ts)
            if "integer" in n.types and "number" in n.types:
                n.types = n.types - {"integer"}
        if "enum" in s or "const" in s:
            if "enum" in s and "const" in s:
                raise SchemaError(f"{where}: enum and const together: use one")
            values = s["enum"] if "enum" in s else [s["const"]]
            if not isinstance(values, list) or not values:
                raise SchemaError(f"{where}: enum must be a non-empty list")
            for v in values:
                if not (v is None or isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool))):
                    raise SchemaError(f"{where}: enum value {json.dumps(v)[:40]}: only strings, integers and null "
                                      f"are supported")
            if n.types:  # values the type excludes can never be valid
                values = [v for v in values if _json_type(v) in n.types
                          or (_json_type(v) == "integer" and "number" in n.types)]
                if not values:
                    raise SchemaError(f"{where}: no enum value is of type {n.describe_type()}")
            n.enum = tuple(dict.fromkeys(values))
            extra = [k for k in s if k in SUPPORTED and k not in ("type", "enum", "const")]
            if extra:
                raise SchemaError(f"{where}: enum/const beside {', '.join(extra)}: list only the allowed values")
        self._numbers(n, s, where)
        self._strings(n, s, where)
        self._arrays(n, s, file, where, active)
        self._objects(n, s, file, where, active)
        if not n.types and not n.accepts_anything:
            if n.enum is None:
                raise SchemaError(f"{where}: a schema with constraints must say its type")
        return n

    def _nullable(self, s: dict, file: Path, where: str, active: tuple[str, ...]) -> Node:
        branches = s["anyOf"]
        others = [k for k in s if k not in ANNOTATIONS and k != "anyOf" and k != "$defs" and not k.startswith("x-")]
        if not isinstance(branches, list) or others or len(branches) != 2:
            raise SchemaError(f"{where}: anyOf is supported only as a nullable union: "
                              f"{{\"anyOf\": [<schema>, {{\"type\": \"null\"}}]}}")
        nulls = [b for b in branches if b == {"type": "null"}]
        if len(nulls) != 1:
            raise SchemaError(f"{where}: anyOf is supported only as a nullable union: one branch must be "
                              f"{{\"type\": \"null\"}}")
        other = next(b for b in branches if b is not nulls[0])
        n = self.node(other, file, where, active)
        if n.types:  # no types: any value (or, with an enum, only its values)
            n.types = n.types | {"null"}
        if n.enum is not None and None not in n.enum:
            n.enum = (*n.enum, None)
        n.annotations = {**n.annotations, **_annotations(s)}
        return n

    def _numbers(self, n: Node, s: dict, where: str) -> None:
        for key, attr in (("minimum", "minimum"), ("maximum", "maximum"),
                          ("exclusiveMinimum", "exclusive_minimum"), ("exclusiveMaximum", "exclusive_maximum")):
            if key in s:
                v = s[key]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not abs(v) <= _FLOAT_MAX:  # finite, also as a float
                    raise SchemaError(f"{where}: {key} must be a number")
                _needs(n, key, ("integer", "number"), where)
                setattr(n, attr, v)

    def _strings(self, n: Node, s: dict, where: str) -> None:
        _counts(n, s, (("minLength", "min_length"), ("maxLength", "max_length")), "string", where)
        if "pattern" in s:
            _needs(n, "pattern", ("string",), where)
            try:
                re.compile(s["pattern"])
            except (re.error, TypeError) as e:
                raise SchemaError(f"{where}: pattern {s['pattern']!r} is not a valid regular expression: {e}") from None
            n.pattern = s["pattern"]
        if "format" in s:
            _needs(n, "format", ("string",), where)
            if s["format"] not in FORMATS:
                raise SchemaError(f"{where}: format {s['format']!r} is not supported (supported: "
                                  f"{', '.join(FORMATS)})")
            if s["format"] == "date-time" and any(k in s for k in ("minLength", "maxLength", "pattern")):
                raise SchemaError(f"{where}: format date-time beside minLength, maxLength or pattern is not supported")
            n.format = s["format"]

    def _arrays(self, n: Node, s: dict, file: Path, where: str, active: tuple[str, ...]) -> None:
        _counts(n, s, (("minItems", "min_items"), ("maxItems", "max_items")), "array", where)
        if "items" in s:
            _needs(n, "items", ("array",), where)
            n.items = self.node(s["items"], file, f"{where}[]", active)

    def _objects(self, n: Node, s: dict, file: Path, where: str, active: tuple[str, ...]) -> None:
        if "properties" in s:
            _needs(n, "properties", ("object",), where)
            if not isinstance(s["properties"], dict):
                raise SchemaError(f"{where}: properties must be an object")
            n.properties = {k: self.node(v, file, f"{where}.{k}", active) for k, v in s["properties"].items()}
        if "required" in s:
            req = s["required"]
            _needs(n, "required", ("object",), where)
            if not isinstance(req, list) or not all(isinstance(x, str) for x in req) or len(set(req)) != len(req):
                raise SchemaError(f"{where}: required must be a list of distinct field names")
            n.required = frozenset(req)
        if "additionalProperties" in s:
            _needs(n, "additionalProperties", ("object",), where)
            a = s["additionalProperties"]
            if a is False:
                n.additional = False
            elif a is True or a == {}:
                n.additional = True
            else:
                if n.properties or n.required:
                    raise SchemaError(f"{where}: additionalProperties as a schema beside properties or required "
                                      f"is not supported: declare the fields, or use false")
                n.additional_schema = self.node(a, file, f"{where}.*", active)
        if n.additional is False:
            missing = sorted(n.required - n.properties.keys())
            if missing:
                raise SchemaError(f"{where}: required field {missing[0]!r} is not in properties, and "
                                  f"additionalProperties is false: no event could be valid")


def _needs(n: Node, key: str, kinds: tuple[str, ...], where: str) -> None:
    if n.types and not n.types & set(kinds):
        raise SchemaError(f"{where}: {key} needs type {' or '.join(kinds)}, the schema says {n.describe_type()}")
    if not n.types:
        raise SchemaError(f"{where}: {key} needs \"type\": {json.dumps(kinds[0])} beside it")


def _counts(n: Node, s: dict, keys: tuple[tuple[str, str], ...], kind: str, where: str) -> None:
    """Length bounds (minLength, minItems, ...): non-negative integers on a node of ``kind``."""
    for key, attr in keys:
        if key in s:
            v = s[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise SchemaError(f"{where}: {key} must be a non-negative integer")
            _needs(n, key, (kind,), where)
            setattr(n, attr, v)


def _json_type(v: Any) -> str:
    return "null" if v is None else "string" if isinstance(v, str) else "integer"


def _annotations(s: dict) -> dict[str, Any]:
    return {k: v for k, v in s.items() if k.startswith("x-")}


@dataclass(eq=False)
class Version:
    """One version of a type's schema, as read from its file."""

    number: int
    path: Path
    root: Node
    document: Any  # the file's JSON, for comparing a reloaded file with the running one


def read_version(schemas_dir: Path, path: Path, number: int) -> Version:
    reader = _Reader(schemas_dir)
    doc = reader.document(path)
    where = reader.where(path.resolve())
    root = reader.node(doc, path.resolve(), f"{where}: $")
    if root.types != frozenset({"object"}):
        raise SchemaError(f"{where}: the top-level schema must be \"type\": \"object\" (an event is a JSON object)")
    docs = {reader.where(p): d for p, d in sorted(reader.docs.items())}
    return Version(number, path, root, docs)


def read_versions(schemas_dir: Path, folder: str) -> dict[int, Version]:
    """Every ``<N>.json`` in ``schemas_dir/folder``, by version number (other
    ``.json`` files there are only for ``$ref``)."""
    d = schemas_dir / folder
    if not d.is_dir():
        raise SchemaError(f"{d}: no such schema folder")
    found: dict[int, Version] = {}
    for p in sorted(d.iterdir()):
        m = _VERSION_FILE.match(p.name)
        if m:
            found[int(m.group(1))] = read_version(schemas_dir, p, int(m.group(1)))
        elif p.suffix == ".json" and p.stem.isdigit():
            raise SchemaError(f"{p}: a version file is named <N>.json with N from 1, without leading zeros")
    if not found:
        raise SchemaError(f"{d}: no schema versions (files named 1.json, 2.json, ...)")
    return dict(sorted(found.items()))
