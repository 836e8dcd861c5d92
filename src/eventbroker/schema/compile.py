"""A ``Node`` tree compiled into msgspec types, so one ``Decoder.decode``
call validates a whole batch part in C (``validate.BatchValidator``).

What JSON Schema says and what msgspec checks line up as follows; where they
would differ, the compiler picks the JSON Schema reading or refuses the
schema at load:

* ``integer`` is a JSON number without a fraction or exponent (``1.0`` is
  refused; JSON Schema would accept it). ``number`` takes integers too.
* optional fields are ``UNSET`` when absent, so an optional non-nullable field
  sent as ``null`` is refused, as JSON Schema says.
* ``format: uuid`` is checked by pattern (8-4-4-4-12 hex, either case): no
  UUID object is made; ``format: date-time`` by pattern too, RFC 3339 with an
  offset (``T`` and ``Z`` either case, the days of each month, no leap
  second, as ``jsonschema`` reads it): msgspec's datetime would also take a
  space for ``T`` and offsets without a colon. Patterns end in ``\\Z``, as
  ``$`` would let a final newline through.
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Annotated, Any, Literal, Union

import msgspec
from msgspec import Meta

from eventbroker import _fastpath as fp
from eventbroker.errors import SchemaError
from eventbroker.schema.model import Node

_UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z"
_DATE_TIME_PATTERN = (
    r"^(?!0000)(?:[0-9]{4}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
    r"|02-(?:0[1-9]|1[0-9]|2[0-8]))|(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:[02468][048]|[13579][26])00)"
    r"-02-29)[Tt](?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]+)?(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])\Z")
_FORMATS = {"uuid": re.compile(_UUID_PATTERN), "date-time": re.compile(_DATE_TIME_PATTERN)}
_names = itertools.count()


def format_matches(fmt: str, value: str) -> bool:
    """Whether ``value`` has ``format`` as the compiled validator checks it."""
    return _FORMATS[fmt].search(value) is not None


def compile_node(node: Node, name: str) -> Any:
    """The msgspec type that accepts exactly what ``node`` accepts."""
    if node.enum is not None:
        values = tuple(v for v in node.enum if v is not None)
        parts: list[Any] = [Literal[values]] if values else []
        if None in node.enum:
            parts.append(None)
        return _union(parts, name)
    if not node.types:
        return Any
    parts = []
    for t in ("null", "boolean", "integer", "number", "string", "array", "object"):
        if t in node.types:
            parts.append(_one(node, t, name))
    return _union(parts, name)


def _union(parts: list[Any], name: str) -> Any:
    if len(parts) == 1:
        return parts[0]
    try:
        t: Any = Union.__getitem__(tuple(parts))  # built at run time
        msgspec.json.Decoder(t)
    except TypeError as e:
        raise SchemaError(f"{name}: this combination of types cannot be validated: {e}") from None
    return t


def _num_meta(node: Node) -> dict[str, Any]:
    """msgspec takes one lower and one upper bound: the stricter of each pair."""
    m: dict[str, Any] = {}
    lo, lo_x = node.minimum, node.exclusive_minimum
    if lo_x is not None and (lo is None or lo_x >= lo):
        m["gt"] = lo_x
    elif lo is not None:
        m["ge"] = lo
    hi, hi_x = node.maximum, node.exclusive_maximum
    if hi_x is not None and (hi is None or hi_x <= hi):
        m["lt"] = hi_x
    elif hi is not None:
        m["le"] = hi
    return m


def _annotated(base: Any, meta: dict[str, Any], name: str = "") -> Any:
    try:
        return Annotated[base, Meta(**meta)] if meta else base
    except ValueError as e:  # e.g. integer bounds beyond 64 bits
        raise SchemaError(f"{name}: cannot be validated: {e}".split(". If you need")[0]) from None


def _one(node: Node, t: str, name: str) -> Any:
    if t == "null":
        return None
    if t == "boolean":
        return bool
    if t == "integer":
        m = _num_meta(node)
        # msgspec compares an int field's bounds as integers: round inwards.
        for k, f in (("ge", _ceil), ("le", _floor), ("gt", _floor), ("lt", _ceil)):
            if k in m:
                m[k] = f(m[k])
        return _annotated(int, m, name)
    if t == "number":
        return _annotated(float, {k: float(v) for k, v in _num_meta(node).items()})
    if t == "string":
        if node.format == "date-time":
            return Annotated[str, Meta(pattern=_DATE_TIME_PATTERN)]
        m = {}
        if node.min_length is not None:
            m["min_length"] = node.min_length
        if node.max_length is not None:
            m["max_length"] = node.max_length
        if node.format == "uuid":
            if node.pattern is not None:
                raise SchemaError(f"{name}: format uuid beside pattern is not supported")
            m["pattern"] = _UUID_PATTERN
        elif node.pattern is not None:
            m["pattern"] = node.pattern
        return _annotated(str, m)
    if t == "array":
        item = compile_node(node.items, f"{name}[]") if node.items is not None else Any
        m = {}
        if node.min_items is not None:
            m["min_length"] = node.min_items
        if node.max_items is not None:
            m["max_length"] = node.max_items
        return _annotated(list[item], m)  # type: ignore[valid-type]
    assert t == "object"
    if not node.properties and not node.required:
        value = compile_node(node.additional_schema, f"{name}.*") if node.additional_schema is not None else Any
        if not node.additional:
            return _annotated(dict[str, Any], {"max_length": 0})
        return dict[str, value]  # type: ignore[valid-type]
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    rename: dict[str, str] = {}
    names = list(node.properties) + sorted(node.required - node.properties.keys())
    for i, key in enumerate(names):
        sub = node.properties.get(key, Node())
        ftype = compile_node(sub, f"{name}.{key}")
        attr = f"f{i}"
        rename[attr] = key
        if key in node.required:
            fields.append((attr, ftype))
        else:
            fields.append((attr, Union[ftype, msgspec.UnsetType], msgspec.UNSET))  # noqa: UP007
    fields.sort(key=lambda f: len(f) == 3)  # required fields first, as a Struct needs
    try:
        return msgspec.defstruct(f"S{next(_names)}", fields, rename=rename,
                                 forbid_unknown_fields=not node.additional, gc=False, kw_only=True)
    except (TypeError, ValueError) as e:  # ValueError: a field name with '"', '\\' or a control character
        raise SchemaError(f"{name}: cannot be validated: {e}") from None


def _floor(v: float) -> int:
    return math.floor(v)


def _ceil(v: float) -> int:
    return math.ceil(v)


_FLAT_KINDS = {"string": 1, "integer": 2, "number": 4, "boolean": 8, "null": 16}
_FLAT_FORMATS = {None: 0, "uuid": 1, "date-time": 2}
_INT_LIMIT = 10**18  # the native path reads integers of up to 18 digits


def flat_schema(root: Node) -> fp.FlatSchema | None:
    """The native accept-path for ``root`` (``_native/flat_schema.pxi``), or
    None when the schema is not flat and closed: then msgspec checks every
    event. The native path only accepts what this compiled type accepts too,
    and hands everything else to it."""
    if root.additional or root.additional_schema is not None or not root.properties or \
            len(root.properties) > 64 or not root.required <= root.properties.keys():
        return None
    fields = []
    for name, n in root.properties.items():
        if not name.isascii() or n.pattern is not None or n.items is not None or n.properties or \
                n.min_items is not None or n.max_items is not None or n.format not in _FLAT_FORMATS:
            return None
        kinds = 0
        enum: list[bytes] | None = None
        enum_null = False
        if n.enum is not None:
            if any(not isinstance(v, str) or not v.isascii() for v in n.enum if v is not None):
                return None  # integer enums: msgspec
            enum = [v.encode() for v in n.enum if v is not None]
            enum_null = None in n.enum
            kinds = _FLAT_KINDS["string"] if enum else 0
        elif not n.types or not n.types <= _FLAT_KINDS.keys():
            return None
        else:
            for t in n.types:
                kinds |= _FLAT_KINDS[t]
        lo, hi = _int_bounds(n)
        fields.append((name.encode(), kinds, _FLAT_FORMATS[n.format], name in root.required,
                       n.min_length if n.min_length is not None else -1,
                       n.max_length if n.max_length is not None else -1, lo, hi, enum, enum_null))
    return fp.FlatSchema(fields)


def _int_bounds(n: Node) -> tuple[int | None, int | None]:
    """Inclusive bounds for integer values (the native path reads no
    fractions), clamped to what 18 digits can hold."""
    los = [math.ceil(n.minimum)] if n.minimum is not None else []
    if n.exclusive_minimum is not None:
        los.append(math.floor(n.exclusive_minimum) + 1)
    his = [math.floor(n.maximum)] if n.maximum is not None else []
    if n.exclusive_maximum is not None:
        his.append(math.ceil(n.exclusive_maximum) - 1)
    lo = max(los) if los else None
    hi = min(his) if his else None
    lo = None if lo is None else max(-_INT_LIMIT, min(_INT_LIMIT, lo))
    hi = None if hi is None else max(-_INT_LIMIT, min(_INT_LIMIT, hi))
    return lo, hi
