"""Reading sealed personal values back, for those allowed (``tail --decrypt``, analysts).

``Decryptor`` asks the key store once per batch for the distinct users in it
(never per event), unwraps their keys with the KEK ring, and opens each
sealed value. A forgotten user (no key any more, or a value shredded at the
edge) comes back as None with a marker (``forgotten``), never as an error
that stops a job; a value that is not a sealed one or does not open (tampered
with, moved from another event) raises ``KeyStoreError``.

    dec = Decryptor.from_config(cfg)
    table = dec.open_table(table, "play", ["client_ip"], user_column="user")

``open_table`` takes a PyArrow table with the event id (16 bytes), the user
and the sealed columns (what a lake table of the type holds) and returns it
with those columns opened and a boolean column ``eb_forgotten``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import orjson

from eventbroker.config import Config, PrivacyConfig
from eventbroker.errors import KeyStoreError, UsageError
from eventbroker.privacy.crypto import CIPHER_PREFIX, FORGOTTEN_VALUE, KekRing, load_keks, open_value
from eventbroker.privacy.store import KeyStore, open_store

FORGOTTEN_COLUMN = "eb_forgotten"
_PREFIX = CIPHER_PREFIX.decode()
_FORGOTTEN = FORGOTTEN_VALUE.decode()


class Opened(NamedTuple):
    payload: Any  # the event's JSON with its personal values opened (None where forgotten)
    forgotten: bool  # its user's personal values could not be opened: the user was forgotten


def user_id(value: Any) -> str:
    """A user field's value as the key store names it (the gateway keys on the JSON text of an integer)."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise UsageError(f"a user id is a string or an integer, not {type(value).__name__}")
    return value if isinstance(value, str) else str(value)


def _open(key: bytes | None, type_name: str, field: str, event_id: bytes, value: Any) -> tuple[Any, bool]:
    """(the value opened, whether its user was forgotten); a value that is not sealed, as it is."""
    if not (isinstance(value, str) and value.startswith(_PREFIX)):
        return value, False
    text = open_value(key, type_name, field, event_id, value)
    return (None, True) if text is None else (orjson.loads(text), False)


def _sealed(value: Any) -> bool:
    """A value sealed under a key (the forgotten marker needs none)."""
    return isinstance(value, str) and value.startswith(_PREFIX) and value != _FORGOTTEN


class Decryptor:
    def __init__(self, store: KeyStore, keks: KekRing) -> None:
        self.store = store
        self.keks = keks

    @classmethod
    def from_config(cls, cfg: Config | PrivacyConfig) -> Decryptor:
        p = cfg.privacy if isinstance(cfg, Config) else cfg
        return cls(open_store(p, create=False), load_keks(p))

    def close(self) -> None:
        self.store.close()

    def keys_for(self, users: Iterable[str]) -> dict[str, bytes | None]:
        """The users' data keys, in one store call; None for a forgotten user. A user
        the store has never heard of raises KeyStoreError: their values were sealed
        under a key of another store (the wrong ``key_store``), not shredded."""
        wanted = sorted(set(users))
        stored = self.store.fetch(wanted) if wanted else {}
        unknown = len(wanted) - len(stored)
        if unknown:
            raise KeyStoreError(f"{unknown} of {len(wanted)} users with sealed values have no row in the key store "
                                f"{self.store.uri} (neither a key nor a forget): is it the store the gateways use?")
        return {u: (self.keks.unwrap(u, sk) if (sk := stored[u]) is not None else None) for u in wanted}

    def open_events(self, type_name: str, user_field: str, fields: Sequence[str],
                    events: Sequence[tuple[bytes, bytes]]) -> list[Opened]:
        """(event id, payload JSON) pairs of one type, opened; keys fetched once for the batch."""
        docs = [orjson.loads(p) for _, p in events]
        keys = self.keys_for(user_id(d[user_field]) for d in docs if isinstance(d, dict) and user_field in d
                             and any(_sealed(d.get(f)) for f in fields))
        out = []
        for (eid, _), doc in zip(events, docs, strict=True):
            if not isinstance(doc, dict) or user_field not in doc:
                out.append(Opened(doc, False))
                continue
            key = keys.get(user_id(doc[user_field]))  # absent: only forgotten markers
            forgotten = False
            for f in fields:
                if f in doc:
                    doc[f], gone = _open(key, type_name, f, eid, doc[f])
                    forgotten |= gone
            out.append(Opened(doc, forgotten))
        return out

    def open_table(self, table: Any, type_name: str, fields: Sequence[str], *, user_column: str,
                   id_column: str = "event_id") -> Any:
        """A PyArrow table with ``fields`` opened (values decoded from their JSON) and ``eb_forgotten`` added."""
        import pyarrow as pa  # noqa: PLC0415 - optional: only this API needs PyArrow

        for c in (*fields, user_column, id_column):
            if c not in table.column_names:
                raise UsageError(f"the table has no column {c!r} (it has {', '.join(table.column_names)})")
        users = [None if u is None else user_id(u) for u in table.column(user_column).to_pylist()]
        ids = table.column(id_column).to_pylist()
        columns = {f: table.column(f).to_pylist() for f in fields}
        keys = self.keys_for(u for i, u in enumerate(users)
                             if u is not None and any(_sealed(columns[f][i]) for f in fields))
        forgotten = [False] * table.num_rows
        for f in fields:
            opened: list[Any] = []
            for i, v in enumerate(columns[f]):
                u = users[i]
                value, gone = _open(keys.get(u) if u is not None else None, type_name, f, ids[i], v)
                opened.append(value)
                forgotten[i] |= gone
            table = table.set_column(table.column_names.index(f), f, pa.array(opened))
        if FORGOTTEN_COLUMN in table.column_names:
            table = table.drop_columns([FORGOTTEN_COLUMN])
        return table.append_column(FORGOTTEN_COLUMN, pa.array(forgotten, pa.bool_()))

