"""The evolution rules: what changed between two versions of a type's
schema, and whether each change keeps old data readable by the new version
(backward) and new data readable by the old one (forward).

The modes mean what Confluent Schema Registry's do, applied strictly to the
sets of documents a version accepts: ``backward``: every document the
previous version accepted, the new one accepts; ``forward``: the other way
round; ``full``: both; ``*_transitive``: against every earlier version, not
only the previous; ``none``: no check.

The rules are sound: when no change ``changes`` reports breaks backward,
every document valid under the old node is valid under the new one (and
likewise forward). Where a rule cannot be decided exactly (two different
patterns), the change is reported as breaking. Each node is compared part by
part: its types, its enum, the bounds and string rules of the types both
sides have, array items, and the object's fields. An undeclared field of an
open object is a field of any value (or of ``additionalProperties``' schema),
so declaring it, or dropping a declared one, compares that schema with the
field's. Annotations (``x-*``, titles, descriptions) are not changes.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from typing import Any, NamedTuple

from eventbroker.errors import SchemaError
from eventbroker.schema.compile import format_matches
from eventbroker.schema.model import Node, Version

MODES = ("backward", "backward_transitive", "forward", "forward_transitive", "full", "full_transitive", "none")

_ALL = frozenset({"null", "boolean", "number", "string", "array", "object"})  # number holds integer
_NUMERIC = frozenset({"integer", "number"})


class Change(NamedTuple):
    path: str  # JSON path of what changed: "$.track", "$.geo.lat", "$.tags[]", "$.meta.*"
    text: str  # "adds required field `track`", "type of `$.track` changes from integer to string"
    breaks_backward: bool  # a document valid under the old version is refused by the new
    breaks_forward: bool  # a document valid under the new version is refused by the old


def changes(old: Node, new: Node, path: str = "$") -> list[Change]:
    """Every change from ``old`` to ``new``, with what it breaks (both flags
    false: a change that keeps every document valid both ways)."""
    if old.enum is not None or new.enum is not None:
        return _enum_changes(old, new, path)
    if _any(old) and _any(new):
        return []
    if _any(old) or _any(new):  # the other side only narrows (or widens) from there
        return [Change(path, f"type of {_where(path)} changes from {old.describe_type()} to "
                             f"{new.describe_type()}", _any(old), _any(new))]
    out: list[Change] = []
    ot, nt = old.types or _ALL, new.types or _ALL
    removed, added = _uncovered(ot, nt), _uncovered(nt, ot)
    if ot != nt:
        out.append(Change(path, f"type of {_where(path)} changes from {old.describe_type()} to "
                                f"{new.describe_type()}", bool(removed), bool(added)))
    if ot & _NUMERIC and nt & _NUMERIC:
        out += _number_changes(old, new, path)
    if "string" in ot and "string" in nt:
        out += _bound_changes("minLength", "maxLength", old.min_length, old.max_length,
                              new.min_length, new.max_length, path)
        for what in ("pattern", "format"):
            out += _rule_change(what, getattr(old, what), getattr(new, what), path)
    if "array" in ot and "array" in nt:
        out += _bound_changes("minItems", "maxItems", old.min_items, old.max_items, new.min_items, new.max_items,
                              path)
        out += changes(old.items or Node(), new.items or Node(), f"{path}[]")
    if "object" in ot and "object" in nt:
        out += _object_changes(old, new, path)
    return out


def check_chain(type_name: str, versions: dict[int, Version], mode: str) -> list[str]:
    """One message per change that breaks ``mode``, each version against the
    previous one (or every earlier one, for the transitive modes); empty when
    the chain obeys it."""
    if mode not in MODES:
        raise SchemaError(f"{type_name}: compatibility mode {mode!r} is unknown (use one of {', '.join(MODES)})")
    if mode == "none":
        return []
    base = mode.removesuffix("_transitive")
    directions = [d for d in ("backward", "forward") if base in (d, "full")]
    numbers = sorted(versions)
    problems: list[str] = []
    for i, n in enumerate(numbers[1:], 1):
        earlier = numbers[:i] if mode.endswith("_transitive") else [numbers[i - 1]]
        for o in reversed(earlier):  # the previous version first
            for c in changes(versions[o].root, versions[n].root):
                for d in directions:
                    if c.breaks_backward if d == "backward" else c.breaks_forward:
                        problems.append(f"{type_name} v{n} {c.text}: not {d} compatible with v{o}")
    return problems


# -- parts of a node ------------------------------------------------------------------------------------------


def _any(n: Node) -> bool:
    return not n.types and n.accepts_anything


def _where(path: str) -> str:
    return "the event" if path == "$" else f"`{path}`"


def _field_name(path: str) -> str:
    return path[2:] if path.startswith("$.") else path


def _uncovered(a: Iterable[str], b: frozenset[str]) -> set[str]:
    """Types of ``a`` that ``b`` does not accept (integer is inside number)."""
    return {t for t in a if t not in b and not (t == "integer" and "number" in b)}


def _values(vals: Iterable[Any]) -> str:
    return ", ".join(json.dumps(v) for v in vals)


def _has(values: Iterable[Any], v: Any) -> bool:
    """``v in values`` without 1 == True == 1.0 (JSON keeps them apart)."""
    return any(type(x) is type(v) and x == v for x in values)


def _finite(n: Node) -> list[Any] | None:
    """Every value ``n`` accepts, when they are few; None: too many to list."""
    if n.enum is not None:
        return list(n.enum)
    if n.types and n.types <= {"null", "boolean"}:
        return ([None] if "null" in n.types else []) + ([True, False] if "boolean" in n.types else [])
    return None


def _accepts(n: Node, v: Any) -> bool:
    """Whether ``n`` accepts the scalar ``v`` (an enum value: a string, an
    integer or null; or a boolean). False where unsure, which only makes a
    change look breaking."""
    if n.enum is not None:
        return _has(n.enum, v)
    if _any(n):
        return True
    types = n.types or _ALL
    if v is None:
        return "null" in types
    if isinstance(v, bool):
        return "boolean" in types
    if isinstance(v, int):
        if not types & _NUMERIC:
            return False
        return ((n.minimum is None or v >= n.minimum) and (n.maximum is None or v <= n.maximum)
                and (n.exclusive_minimum is None or v > n.exclusive_minimum)
                and (n.exclusive_maximum is None or v < n.exclusive_maximum))
    if isinstance(v, str):
        if "string" not in types:
            return False
        if (n.min_length is not None and len(v) < n.min_length) or (n.max_length is not None
                                                                    and len(v) > n.max_length):
            return False
        if n.pattern is not None and re.search(n.pattern, v) is None:
            return False
        return n.format is None or format_matches(n.format, v)
    return False


def _enum_changes(old: Node, new: Node, path: str) -> list[Change]:
    where = _where(path)
    if old.enum is not None and new.enum is not None:
        out = []
        gone = [v for v in old.enum if not _has(new.enum, v)]
        more = [v for v in new.enum if not _has(old.enum, v)]
        if gone:
            out.append(Change(path, f"enum of {where} drops {_values(gone)}", True, False))
        if more:
            out.append(Change(path, f"enum of {where} adds {_values(more)}", False, True))
        return out
    if new.enum is not None:  # restricted from here on
        assert old.enum is None
        was = _finite(old)
        back = was is None or not all(_accepts(new, v) for v in was)
        fwd = not all(_accepts(old, v) for v in new.enum)
        return [Change(path, f"{where} is restricted to enum {_values(new.enum)}", back, fwd)]
    assert old.enum is not None
    now = _finite(new)
    back = not all(_accepts(new, v) for v in old.enum)
    fwd = now is None or not all(_accepts(old, v) for v in now)
    return [Change(path, f"{where} is no longer restricted to enum {_values(old.enum)} "
                         f"(now {new.describe_type()})", back, fwd)]


# A bound is (value, exclusive). Lower bounds: the greater value is stricter,
# and at one value the exclusive one; upper bounds the other way round.
_Bound = tuple[float, bool]


def _stricter(a: _Bound | None, b: _Bound | None, lower: bool) -> bool:
    """Whether bound ``a`` refuses a value ``b`` accepts (None: no bound)."""
    if a is None:
        return False
    if b is None:
        return True
    if a[0] != b[0]:
        return a[0] > b[0] if lower else a[0] < b[0]
    return a[1] and not b[1]


def _on_integers(b: _Bound | None, lower: bool) -> _Bound | None:
    """The same bound over integers only, inclusive: > 1.5 is >= 2."""
    if b is None:
        return None
    v, exclusive = b
    if lower:
        return (math.floor(v) + 1 if exclusive else math.ceil(v)), False
    return (math.ceil(v) - 1 if exclusive else math.floor(v)), False


def _effective(n: Node, lower: bool) -> _Bound | None:
    inclusive, exclusive = (n.minimum, n.exclusive_minimum) if lower else (n.maximum, n.exclusive_maximum)
    a = (inclusive, False) if inclusive is not None else None
    b = (exclusive, True) if exclusive is not None else None
    return b if _stricter(b, a, lower) else a


def _show(b: _Bound) -> str:
    return f"{b[0]}{' (exclusive)' if b[1] else ''}"


def _number_changes(old: Node, new: Node, path: str) -> list[Change]:
    out = []
    old_int = not (old.types or _ALL) & {"number"}  # old accepts integers only
    new_int = not (new.types or _ALL) & {"number"}
    for lower, what in ((True, "minimum"), (False, "maximum")):
        a, b = _effective(old, lower), _effective(new, lower)
        if a == b:
            continue
        # backward: over the values old accepts, does the new bound refuse one?
        back = _stricter(_on_integers(b, lower), _on_integers(a, lower), lower) if old_int \
            else _stricter(b, a, lower)
        fwd = _stricter(_on_integers(a, lower), _on_integers(b, lower), lower) if new_int \
            else _stricter(a, b, lower)
        out.append(_bound_change(what, a, b, _stricter(b, a, lower) == lower, path, back, fwd))
    return out


def _bound_changes(lo_name: str, hi_name: str, old_lo: int | None, old_hi: int | None, new_lo: int | None,
                   new_hi: int | None, path: str) -> list[Change]:
    out = []
    for lower, what, a, b in ((True, lo_name, old_lo, new_lo), (False, hi_name, old_hi, new_hi)):
        if a == b:
            continue
        ab = (float(a), False) if a is not None else None
        bb = (float(b), False) if b is not None else None
        back, fwd = _stricter(bb, ab, lower), _stricter(ab, bb, lower)
        out.append(_bound_change(what, (a, False) if a is not None else None, (b, False) if b is not None else None,
                                 back == lower, path, back, fwd))
    return out


def _bound_change(what: str, a: _Bound | None, b: _Bound | None, raised: bool, path: str, back: bool,
                  fwd: bool) -> Change:
    where = _where(path)
    if a is None:
        assert b is not None
        text = f"{what} of {where} set to {_show(b)}"
    elif b is None:
        text = f"{what} of {where} removed (was {_show(a)})"
    elif not back and not fwd:
        text = f"{what} of {where} changes from {_show(a)} to {_show(b)}"  # the same over the values there
    else:
        text = f"{what} of {where} {'raised' if raised else 'lowered'} from {_show(a)} to {_show(b)}"
    return Change(path, text, back, fwd)


def _rule_change(what: str, a: str | None, b: str | None, path: str) -> list[Change]:
    if a == b:
        return []
    where = _where(path)
    if a is None:
        text = f"{what} of {where} set to {json.dumps(b)}"
    elif b is None:
        text = f"{what} of {where} removed (was {json.dumps(a)})"
    else:
        text = f"{what} of {where} changes from {json.dumps(a)} to {json.dumps(b)}"
    return [Change(path, text, b is not None, a is not None)]


# -- objects --------------------------------------------------------------------------------------------------


def _rest(n: Node) -> Node | None:
    """The schema of an undeclared field (None: refused)."""
    if not n.additional:
        return None
    return n.additional_schema if n.additional_schema is not None else Node()


def _object_changes(old: Node, new: Node, path: str) -> list[Change]:
    out: list[Change] = []
    old_rest, new_rest = _rest(old), _rest(new)
    keys = list(new.properties) + [k for k in old.properties if k not in new.properties]
    keys += sorted((old.required | new.required) - set(keys))
    for k in keys:
        fpath = f"{path}.{k}"
        name = _field_name(fpath)
        was, now = k in old.required, k in new.required
        declared_old, declared_new = k in old.properties, k in new.properties
        if not declared_old and not declared_new:  # required only: its value is an undeclared field's (below)
            if was != now:
                out.append(Change(fpath, f"field `{name}` becomes {'required' if now else 'optional'}", now, was))
            continue
        if declared_old and declared_new:
            if was != now:
                out.append(Change(fpath, f"field `{name}` becomes {'required' if now else 'optional'}", now, was))
            out += changes(old.properties[k], new.properties[k], fpath)
            continue
        old_p = old.properties.get(k, old_rest)
        new_p = new.properties.get(k, new_rest)
        subs = changes(old_p, new_p, fpath) if old_p is not None and new_p is not None else []
        broken = [s for s in subs if s.breaks_backward or s.breaks_forward]
        back = (now and not was) or (old_p is not None and new_p is None) or any(s.breaks_backward for s in subs)
        fwd = (was and not now) or (old_p is None and new_p is not None) or any(s.breaks_forward for s in subs)
        if declared_new:
            text = f"adds {'required' if now else 'optional'} field `{name}`"
            if broken:
                text += (" (undeclared fields were allowed: "
                         + "; ".join(s.text for s in broken) + ")")
        else:
            text = f"removes {'required' if was else 'optional'} field `{name}`"
            if broken:
                text += (" (undeclared fields are allowed: "
                         + "; ".join(s.text for s in broken) + ")")
        out.append(Change(fpath, text, back, fwd))
    if old_rest is not None and new_rest is None:
        out.append(Change(path, f"{_where(path)} no longer allows undeclared fields", True, False))
    elif old_rest is None and new_rest is not None:
        out.append(Change(path, f"{_where(path)} allows undeclared fields", False, True))
    elif old_rest is not None and new_rest is not None:
        out += changes(old_rest, new_rest, f"{path}.*")
    return out
