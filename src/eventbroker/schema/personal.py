"""Which fields of a schema version hold personal data, and whose (docs/privacy.md).

A top-level property marked ``"x-personal": true`` is sealed at the edge
under its user's data key; the property marked ``"x-user": true`` (or named
by the type's ``user_field`` setting) names that user and stays readable.
The rules, checked when the schemas load (``eventbroker schema check``, start,
SIGHUP), each refused with the file:

* only top-level properties may be personal (the gateway's native scan reads
  the top level only);
* a version with personal fields has exactly one user field, declared,
  required, a string or an integer, and not itself personal;
* a field personal in a version stays personal in every later version that
  has it, so no new version writes in clear what an older one protected;
* every version that marks personal fields names the same user field.

What the gateway seals is the type's: every name personal in any version,
in every version (``type_personal``), so an open older version, or a newer
one that no longer declares a field, cannot carry it in clear.
"""

from __future__ import annotations

from typing import NamedTuple

from eventbroker.errors import SchemaError
from eventbroker.schema.model import Node, Version


class Personal(NamedTuple):
    user_field: str
    fields: tuple[str, ...]  # in the schema's order


def _flag(node: Node, key: str, where: str) -> bool:
    v = node.annotations.get(key, False)
    if not isinstance(v, bool):
        raise SchemaError(f"{where}: {key} must be true or false, not {v!r}")
    return v


def _nested_marks(node: Node, path: str, out: list[str], seen: set[int]) -> None:
    if id(node) in seen:
        return
    seen.add(id(node))
    for name, child in node.properties.items():
        if _flag(child, "x-personal", f"{path}.{name}") or _flag(child, "x-user", f"{path}.{name}"):
            out.append(f"{path}.{name}")
        _nested_marks(child, f"{path}.{name}", out, seen)
    for sub in (node.items, node.additional_schema):
        if sub is not None:
            _nested_marks(sub, f"{path}[]", out, seen)


def personal_fields(version: Version, user_field: str | None = None) -> Personal | None:
    """The version's personal fields and user field; None when it has none."""
    root, where = version.root, str(version.path)
    nested: list[str] = []
    for name, child in root.properties.items():
        _nested_marks(child, f"$.{name}", nested, set())
    for sub in (root.items, root.additional_schema):
        if sub is not None:
            _nested_marks(sub, "$[]", nested, set())
    if nested:
        raise SchemaError(f"{where}: {nested[0]}: only top-level properties can be x-personal or x-user")
    fields = tuple(n for n, c in root.properties.items() if _flag(c, "x-personal", f"{where}: $.{n}"))
    users = [n for n, c in root.properties.items() if _flag(c, "x-user", f"{where}: $.{n}")]
    if len(users) > 1:
        raise SchemaError(f"{where}: x-user marks {', '.join(users)}: one field names the user")
    if user_field is not None and users and users[0] != user_field:
        raise SchemaError(f"{where}: x-user marks {users[0]} but the type's user_field is {user_field}")
    if not fields:
        return None
    user = user_field or (users[0] if users else None)
    if user is None:
        raise SchemaError(f"{where}: personal fields ({', '.join(fields)}) but no user field: mark the property "
                          "naming the user \"x-user\": true (or set the type's user_field)")
    node = root.properties.get(user)
    if node is None:
        raise SchemaError(f"{where}: the user field {user} is not a property of the schema")
    if user in fields:
        raise SchemaError(f"{where}: the user field {user} cannot be x-personal: it names the key "
                          "(pseudonymise it in the producer instead, docs/privacy.md)")
    if user not in root.required:
        raise SchemaError(f"{where}: the user field {user} must be required")
    if not node.types or not node.types <= {"string", "integer"}:
        raise SchemaError(f"{where}: the user field {user} must be a string or an integer, not "
                          f"{node.describe_type()}")
    for name in (*fields, user):
        if "\\" in name or '"' in name or len(name.encode()) > 255:
            raise SchemaError(f"{where}: field {name[:64]!r}: personal and user field names are plain, "
                              "up to 255 bytes")
    return Personal(user, fields)


def type_personal(versions: dict[int, Version], user_field: str | None = None) -> Personal | None:
    """The type's personal fields: the union over its versions, in order of appearance; None when none has any.
    ``check_personal_chain`` has made sure the versions agree on the user field."""
    user = None
    fields: dict[str, None] = {}
    for n in sorted(versions):
        p = personal_fields(versions[n], user_field)
        if p is not None:
            user = user or p.user_field
            fields.update(dict.fromkeys(p.fields))
    if user is None:
        return None
    if len(fields) > 32:
        raise SchemaError(f"{versions[max(versions)].path}: {len(fields)} personal fields over the type's versions; "
                          "at most 32")
    return Personal(user, tuple(fields))


def check_personal_chain(type_name: str, versions: dict[int, Version], user_field: str | None) -> list[str]:
    """Problems with a type's versions read in order: a field that stops being personal, another user field."""
    problems = []
    before: dict[str, int] = {}
    users: dict[str, int] = {}
    for n in sorted(versions):
        p = personal_fields(versions[n], user_field)
        if p is not None:
            users.setdefault(p.user_field, n)
        now = set(p.fields) if p is not None else set()
        for f, since in sorted(before.items()):
            if f in versions[n].root.properties and f not in now:
                problems.append(f"v{n}: field {f} is personal in v{since} and must stay x-personal")
        for f in now:
            before.setdefault(f, n)
    if len(users) > 1:
        problems.append("the versions name different user fields (" + ", ".join(f"{u} in v{n}" for u, n in
                                                                         users.items()) + "): one names the key")
    return problems
