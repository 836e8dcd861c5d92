"""The per-user data-key store behind crypto-shredding.

Every user (a string id) has one random data key, kept here only *wrapped* by
a key-encryption key (KEK): the store sees opaque ``(kek_id, wrapped)`` pairs
and never a plaintext key. Forgetting a user deletes the key, which makes the
user's encrypted data unreadable, and leaves a tombstone so that no key is
ever created for that user again. Every gateway process and tool shares one
store: a SQLite file (the embedded default, several processes on one
machine) or a PostgreSQL database (a fleet).

Table layout (the same columns in both databases)::

    eb_user_keys(
        user_id      TEXT PRIMARY KEY,   -- at most 256 bytes of UTF-8
        kek_id       TEXT NULL,          -- NULL on a tombstone
        wrapped      BLOB/BYTEA NULL,    -- NULL on a tombstone
        created_at   timestamp,          -- when the row was first written
        forgotten_at timestamp NULL,     -- NULL on a live key
        CHECK (a row is either live or a tombstone, never both)
    )
    INDEX eb_user_keys_forgotten_at ON eb_user_keys(forgotten_at)

A live row has ``kek_id`` and ``wrapped`` and no ``forgotten_at``; a tombstone
has only ``forgotten_at``. Timestamps come from the database's clock: in
PostgreSQL ``timestamptz``; in SQLite a REAL holding Unix seconds (UTC),
computed by SQLite from ``julianday('now')`` (millisecond resolution), which
is the clock of the one machine sharing the file.

Why this is race-free. There is exactly one row per user, and a row is never
deleted: forgetting turns it into a tombstone. So every writer meets every
other writer on the same primary-key entry and the database serializes them:

* ``fetch_or_create`` reads the users' rows; for the missing ones it calls
  ``make`` (outside any transaction or lock: it may call a KMS), then
  ``INSERT ... ON CONFLICT (user_id) DO NOTHING`` and reads those rows again
  in the same write transaction. Two processes creating the same user's key
  at once both return whichever row was stored first; the loser's freshly
  made key is dropped without ever having been returned. PostgreSQL runs
  that transaction in READ COMMITTED: an insert that conflicts with another
  transaction's uncommitted row waits for it, and the following SELECT (a new
  snapshot) sees the committed winner. SQLite takes the write lock up front
  (``BEGIN IMMEDIATE``), so writers run one at a time.
* ``forget`` writes the tombstone over the row (or inserts one), under the
  row lock: a concurrent ``fetch_or_create`` either stored its key first (and
  ``forget`` reports ``existed=True`` and wipes it) or finds the tombstone
  (and returns None). It never ends with both a key and a tombstone, and
  once ``forget`` has returned no call returns the key again.
* Multi-row writes (inserts, rewraps) go in ``user_id`` order, so two
  PostgreSQL transactions never wait on each other's rows in a cycle.

The propagation cursor. ``forgotten_since(cursor)`` tells other systems (a
cache, a search index) whom to forget. The cursor is a float, Unix seconds on
the database's clock, that callers may persist (JSON) and pass back. A call
returns every user whose ``forgotten_at`` is at or after ``cursor -
LOOKBACK_S`` and a new cursor, the database's time at the read. A forget's
timestamp is taken inside its transaction, slightly before it commits, so a
reader can pass a forget's timestamp before it can see the row; re-reading
the last ``LOOKBACK_S`` seconds on every call catches any forget that commits
within a minute of its timestamp (and clock steps back of less than that), at
the price of returning users again: callers deduplicate.

Each instance holds one database connection; it may be created in one thread
and used from another, one call at a time (a lock guards every call). The
``make`` and ``fn`` callbacks must not call back into the same store. Open
one store per process: a connection does not survive ``fork``.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sqlite3
import threading
import time
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from eventbroker.errors import ConfigError, KeyStoreError, UsageError

if TYPE_CHECKING:
    import psycopg

    from eventbroker.config import PrivacyConfig

__all__ = [
    "LOOKBACK_S",
    "Forgotten",
    "KeyStore",
    "KeyStoreError",
    "PostgresKeyStore",
    "SqliteKeyStore",
    "StoredKey",
    "open_key_store",
    "open_store",
]

LOOKBACK_S = 60.0
MAX_USER_ID_BYTES = 256
_CHUNK = 500  # users per statement (IN lists, arrays, executemany)
_TABLE = "eb_user_keys"
# pg_advisory_xact_lock key for the DDL: "ebkeys" in ASCII, any constant would do.
_DDL_LOCK_KEY = 0x6562_6B65_7973


class StoredKey(NamedTuple):
    kek_id: str
    wrapped: bytes


class Forgotten(NamedTuple):
    user: str
    existed: bool  # whether the user had a key before
    forgotten_at: datetime  # timezone-aware UTC, from the database's clock


def mask_uri(uri: str) -> str:
    """The URI with any password (in the authority or a ``password=`` query
    parameter) replaced by ``***``."""
    if "://" not in uri:  # not a URI; perhaps a libpq "key=value" string: hide its password
        return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", uri, flags=re.IGNORECASE)
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError:
        return "<unparsable URI>"
    netloc = parts.netloc
    userinfo, at, host = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = userinfo.split(":", 1)[0] + ":***@" + host
    pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    query = parts.query
    if any(k == "password" for k, _ in pairs):
        query = "&".join(f"{k}=***" if k == "password" else
                         f"{urllib.parse.quote(k)}={urllib.parse.quote(v)}" for k, v in pairs)
    if netloc == parts.netloc and query == parts.query:
        return uri  # nothing to hide: keep it exactly as given
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _check_users(users: Sequence[str]) -> list[str]:
    """The distinct user ids, sorted (the lock order of multi-row writes)."""
    if isinstance(users, (str, bytes)):
        raise UsageError("users must be a sequence of user ids, not one string")
    distinct = set()
    for user in users:
        if not isinstance(user, str):
            raise UsageError(f"a user id must be a str, not {type(user).__name__}")
        try:
            n = len(user.encode("utf-8"))
        except UnicodeEncodeError:
            raise UsageError("a user id must be valid Unicode text (it holds a lone surrogate)") from None
        if n == 0 or n > MAX_USER_ID_BYTES:
            raise UsageError(f"a user id must be 1 to {MAX_USER_ID_BYTES} bytes of UTF-8, not {n}")
        if "\x00" in user:
            raise UsageError("a user id must not contain NUL characters")
        distinct.add(user)
    return sorted(distinct)


def _check_key(value: object, what: str) -> StoredKey:
    if (not isinstance(value, tuple) or len(value) != 2 or not isinstance(value[0], str) or not value[0]
            or not isinstance(value[1], (bytes, bytearray, memoryview))):
        raise UsageError(f"{what} must return a StoredKey(kek_id: str, wrapped: bytes), not {value!r:.80}")
    wrapped = bytes(value[1])
    if not wrapped:
        raise UsageError(f"{what} returned an empty wrapped key")
    return StoredKey(value[0], wrapped)


def _chunks(items: list[Any], size: int = _CHUNK) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _check_cursor(cursor: object) -> float:
    if isinstance(cursor, bool) or not isinstance(cursor, (int, float)) or not math.isfinite(cursor):
        raise UsageError(f"a forgotten_since cursor is a float returned by forgotten_since, not {cursor!r:.80}")
    return float(cursor)


class KeyStore(ABC):
    """The shared store of users' wrapped data keys; see the module docstring.
    ``open_key_store`` picks the implementation from the URI."""

    uri: str  # as given, with any password replaced by *** (for logs)

    def __init__(self, uri: str) -> None:
        self.uri = mask_uri(uri)
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _call(self) -> Iterator[None]:
        with self._lock:
            if self._closed:
                raise UsageError(f"key store {self.uri} is closed")
            yield

    def fetch_or_create(self, users: Sequence[str], make: Callable[[str], StoredKey]
                        ) -> dict[str, StoredKey | None]:
        """Every user in ``users`` (duplicates allowed) maps to its stored key; a
        user with no row gets ``make(user)`` inserted first; a forgotten user maps
        to None and never gets a key. Two callers creating the same user's key at
        once both return the row stored first, so ``make`` may be called for a
        user whose key then comes from another process. Batched: a few
        statements per 500 users, not a round trip per user."""
        distinct = _check_users(users)
        with self._call():
            if not distinct:
                return {}
            return self._fetch_or_create(distinct, make)

    def fetch(self, users: Sequence[str]) -> dict[str, StoredKey | None]:
        """Like ``fetch_or_create`` without creating: users without a row are
        absent from the result; forgotten users map to None."""
        distinct = _check_users(users)
        with self._call():
            if not distinct:
                return {}
            return self._fetch(distinct)

    def forget(self, user: str) -> Forgotten:
        """Delete the user's key and leave a tombstone, also for a user who never
        had a key. Forgetting twice is fine: ``existed`` is False the second time
        and ``forgotten_at`` stays that of the first."""
        (checked,) = _check_users([user])
        with self._call():
            existed, at = self._forget(checked)
        return Forgotten(checked, existed, at)

    def forgotten_since(self, cursor: object | None) -> tuple[list[str], object]:
        """Users forgotten since ``cursor`` (oldest first) and the next cursor.
        ``None`` starts at the database's present: ``([], cursor)``. Every call
        also returns the users forgotten in the ``LOOKBACK_S`` seconds before the
        cursor again (a forget may commit after its timestamp): deduplicate."""
        since = None if cursor is None else _check_cursor(cursor)
        with self._call():
            users, now = self._forgotten_since(since)
        return users, now

    def rewrap(self, fn: Callable[[str, StoredKey], StoredKey], current_kek_id: str, batch: int = 500) -> int:
        """KEK rotation: every live key whose ``kek_id`` is not ``current_kek_id``
        goes through ``fn(user, key)`` and is replaced by what it returns (which
        must carry ``current_kek_id``), compare-and-set so that a key forgotten or
        rewrapped meanwhile is left alone; committed per batch of ``batch`` keys
        (``fn`` runs outside the transaction). Returns how many rows were
        rewrapped. Tombstones are never touched."""
        if not isinstance(current_kek_id, str) or not current_kek_id:
            raise UsageError("current_kek_id must be a non-empty str")
        if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= _CHUNK:
            raise UsageError(f"batch must be an int from 1 to {_CHUNK}, not {batch!r}")
        total = 0
        after = ""  # keyset pagination by user_id: each key is offered to fn at most once per call
        while True:
            with self._call():
                rows = self._stale_keys(current_kek_id, after, batch)
            if not rows:
                return total
            updates = []
            for user, old in rows:
                new = _check_key(fn(user, old), "rewrap's fn")
                if new.kek_id != current_kek_id:
                    raise UsageError(f"rewrap's fn returned a key wrapped by {new.kek_id!r}, "
                                     f"not the current KEK {current_kek_id!r}")
                updates.append((user, old, new))
            with self._call():
                total += self._compare_and_set(updates)
            after = rows[-1][0]

    def counts(self) -> dict[str, object]:
        """``{"users": live keys, "forgotten": tombstones, "by_kek": {kek_id: n}}``."""
        with self._call():
            users, forgotten, by_kek = self._counts()
        return {"users": users, "forgotten": forgotten, "by_kek": by_kek}

    def close(self) -> None:
        """Close the connection; idempotent. Any later call raises UsageError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._close()

    # The backend's side: called with the lock held, users checked, distinct and sorted.
    @abstractmethod
    def _fetch_or_create(self, users: list[str], make: Callable[[str], StoredKey]
                         ) -> dict[str, StoredKey | None]: ...

    @abstractmethod
    def _fetch(self, users: list[str]) -> dict[str, StoredKey | None]: ...

    @abstractmethod
    def _forget(self, user: str) -> tuple[bool, datetime]: ...

    @abstractmethod
    def _forgotten_since(self, since: float | None) -> tuple[list[str], float]: ...

    @abstractmethod
    def _stale_keys(self, current_kek_id: str, after: str, limit: int) -> list[tuple[str, StoredKey]]: ...

    @abstractmethod
    def _compare_and_set(self, updates: list[tuple[str, StoredKey, StoredKey]]) -> int: ...

    @abstractmethod
    def _counts(self) -> tuple[int, int, dict[str, int]]: ...

    @abstractmethod
    def _close(self) -> None: ...

    def _error(self, what: str, err: Exception) -> KeyStoreError:
        # KeyStoreError (eventbroker.errors): the message names the store, its password masked,
        # and the failed operation.
        return KeyStoreError(f"key store {self.uri}: {what} failed: {type(err).__name__}: {_describe(err)}")


def _describe(err: Exception) -> str:
    # The primary message only: a PostgreSQL error's DETAIL can quote row values (user ids).
    diag = getattr(err, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    text = primary or str(err).split("\nDETAIL:", 1)[0]
    return text.strip() or "no message"


def _rows_to_keys(rows: Sequence[tuple[str, str | None, bytes | None]], out: dict[str, StoredKey | None]) -> None:
    for user, kek_id, wrapped in rows:
        out[user] = None if kek_id is None or wrapped is None else StoredKey(kek_id, bytes(wrapped))


# -- SQLite ---------------------------------------------------------------------------------------------

_SQLITE_NOW = "((julianday('now') - 2440587.5) * 86400.0)"
_SQLITE_DDL = f"""
CREATE TABLE IF NOT EXISTS {_TABLE} (
    user_id TEXT PRIMARY KEY NOT NULL,
    kek_id TEXT NULL,
    wrapped BLOB NULL,
    created_at REAL NOT NULL,
    forgotten_at REAL NULL,
    CHECK ((kek_id IS NULL) = (wrapped IS NULL) AND (kek_id IS NULL) = (forgotten_at IS NOT NULL))
);
CREATE INDEX IF NOT EXISTS {_TABLE}_forgotten_at ON {_TABLE}(forgotten_at);
"""


class SqliteKeyStore(KeyStore):
    """The store in a SQLite file (WAL mode, shared by the processes of one
    machine). Timestamps are REAL Unix seconds; writes take the write lock up
    front (``BEGIN IMMEDIATE``) and wait up to 10 s for it."""

    BUSY_TIMEOUT_MS = 10_000

    def __init__(self, uri: str, path: Path) -> None:
        super().__init__(uri)
        self.path = path
        try:
            _create_private_file(path)
            self._db = sqlite3.connect(str(path), timeout=self.BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                       check_same_thread=False)
        except (OSError, sqlite3.Error) as err:
            raise self._error("opening", err) from None
        try:
            self._db.execute(f"PRAGMA busy_timeout = {self.BUSY_TIMEOUT_MS}")
            self._set_wal()
            # A lost key makes data unreadable and a lost forget breaks a promise: sync every commit.
            self._db.execute("PRAGMA synchronous = FULL")
            with self._write():
                for statement in _SQLITE_DDL.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
        except sqlite3.Error as err:
            self._db.close()
            raise self._error("opening", err) from None

    def _set_wal(self) -> None:
        # Switching a new file to WAL needs an exclusive lock, and SQLite answers "database is
        # locked" at once, without waiting, when another process is switching it too: retry.
        deadline = time.monotonic() + self.BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                break
            except sqlite3.OperationalError as err:
                contended = "locked" in str(err) or "busy" in str(err)
                if not contended or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"journal_mode is {mode}: WAL could not be set")

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN DEFERRED")
        try:
            yield self._db
        finally:
            if self._db.in_transaction:
                self._db.execute("COMMIT")

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @contextlib.contextmanager
    def _driver_errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as err:
            if self._db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            raise self._error(what, err) from None

    def _select(self, db: sqlite3.Connection, users: list[str], out: dict[str, StoredKey | None]) -> None:
        for chunk in _chunks(users):
            marks = ",".join("?" * len(chunk))
            rows = db.execute(f"SELECT user_id, kek_id, wrapped FROM {_TABLE} WHERE user_id IN ({marks})",
                              chunk).fetchall()
            _rows_to_keys(rows, out)

    def _fetch(self, users: list[str]) -> dict[str, StoredKey | None]:
        out: dict[str, StoredKey | None] = {}
        with self._driver_errors("fetch"), self._read() as db:
            self._select(db, users, out)
        return out

    def _fetch_or_create(self, users: list[str], make: Callable[[str], StoredKey]
                         ) -> dict[str, StoredKey | None]:
        out = self._fetch(users)
        missing = [u for u in users if u not in out]
        if not missing:
            return out
        made = [(u, _check_key(make(u), "make")) for u in missing]
        with self._driver_errors("fetch_or_create"), self._write() as db:
            db.executemany(f"INSERT INTO {_TABLE} (user_id, kek_id, wrapped, created_at) "
                           f"VALUES (?, ?, ?, {_SQLITE_NOW}) ON CONFLICT (user_id) DO NOTHING",
                           [(u, k.kek_id, k.wrapped) for u, k in made])
            self._select(db, missing, out)
        return out

    def _forget(self, user: str) -> tuple[bool, datetime]:
        with self._driver_errors("forget"), self._write() as db:
            row = db.execute(f"SELECT kek_id FROM {_TABLE} WHERE user_id = ?", (user,)).fetchone()
            db.execute(f"INSERT INTO {_TABLE} (user_id, kek_id, wrapped, created_at, forgotten_at) "
                       f"VALUES (?, NULL, NULL, {_SQLITE_NOW}, {_SQLITE_NOW}) "
                       f"ON CONFLICT (user_id) DO UPDATE SET kek_id = NULL, wrapped = NULL, "
                       f"forgotten_at = COALESCE({_TABLE}.forgotten_at, excluded.forgotten_at)", (user,))
            (at,) = db.execute(f"SELECT forgotten_at FROM {_TABLE} WHERE user_id = ?", (user,)).fetchone()
        return row is not None and row[0] is not None, datetime.fromtimestamp(at, UTC)

    def _forgotten_since(self, since: float | None) -> tuple[list[str], float]:
        with self._driver_errors("forgotten_since"), self._read() as db:
            (now,) = db.execute(f"SELECT {_SQLITE_NOW}").fetchone()
            if since is None:
                return [], float(now)
            rows = db.execute(f"SELECT user_id FROM {_TABLE} WHERE forgotten_at >= ? "
                              f"ORDER BY forgotten_at, user_id", (since - LOOKBACK_S,)).fetchall()
        return [r[0] for r in rows], float(now)

    def _stale_keys(self, current_kek_id: str, after: str, limit: int) -> list[tuple[str, StoredKey]]:
        with self._driver_errors("rewrap"), self._read() as db:
            rows = db.execute(f"SELECT user_id, kek_id, wrapped FROM {_TABLE} WHERE kek_id IS NOT NULL "
                              f"AND kek_id <> ? AND user_id > ? ORDER BY user_id LIMIT ?",
                              (current_kek_id, after, limit)).fetchall()
        return [(u, StoredKey(k, bytes(w))) for u, k, w in rows]

    def _compare_and_set(self, updates: list[tuple[str, StoredKey, StoredKey]]) -> int:
        with self._driver_errors("rewrap"), self._write() as db:
            cur = db.executemany(f"UPDATE {_TABLE} SET kek_id = ?, wrapped = ? "
                                 f"WHERE user_id = ? AND kek_id = ? AND wrapped = ?",
                                 [(new.kek_id, new.wrapped, u, old.kek_id, old.wrapped)
                                  for u, old, new in updates])
            return max(cur.rowcount, 0)

    def _counts(self) -> tuple[int, int, dict[str, int]]:
        with self._driver_errors("counts"), self._read() as db:
            users, forgotten = db.execute(
                f"SELECT COALESCE(SUM(kek_id IS NOT NULL), 0), COALESCE(SUM(kek_id IS NULL), 0) "
                f"FROM {_TABLE}").fetchone()
            by_kek = db.execute(f"SELECT kek_id, COUNT(*) FROM {_TABLE} WHERE kek_id IS NOT NULL "
                                f"GROUP BY kek_id ORDER BY kek_id").fetchall()
        return int(users), int(forgotten), {k: int(n) for k, n in by_kek}

    def _close(self) -> None:
        self._db.close()


def _create_private_file(path: Path) -> None:
    """Create the database file (mode 0600) and any missing parent folders
    (mode 0700) before SQLite opens it; SQLite gives its -wal and -shm files
    the database file's mode."""
    missing = []
    parent = path.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, 0o600)  # the umask may have taken bits away; it cannot have added any
    finally:
        os.close(fd)


# -- PostgreSQL -----------------------------------------------------------------------------------------

_PG_DDL = [
    f"""CREATE TABLE IF NOT EXISTS {_TABLE} (
        user_id TEXT PRIMARY KEY,
        kek_id TEXT NULL,
        wrapped BYTEA NULL,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        forgotten_at TIMESTAMPTZ NULL,
        CHECK ((kek_id IS NULL) = (wrapped IS NULL) AND (kek_id IS NULL) = (forgotten_at IS NOT NULL))
    )""",
    f"CREATE INDEX IF NOT EXISTS {_TABLE}_forgotten_at ON {_TABLE}(forgotten_at)",
]


class PostgresKeyStore(KeyStore):
    """The store in a PostgreSQL database, through one psycopg 3 connection
    (autocommit, explicit transactions in READ COMMITTED). A call that fails
    with ``psycopg.OperationalError`` (a restarted server, a dropped
    connection) reconnects and runs once more before raising KeyStoreError;
    that is safe because every unit of work is idempotent, except that a
    ``forget`` whose commit was lost with the connection reports
    ``existed=False`` when run again."""

    CONNECT_TIMEOUT_S = 10

    def __init__(self, uri: str, psycopg_module: Any) -> None:
        super().__init__(uri)
        self._pg = psycopg_module
        self._conninfo = uri
        self._conn: psycopg.Connection[Any] | None = None
        self.reconnects = 0  # for tests and metrics: connections replaced after an OperationalError
        try:
            self._run("connecting", self._create_table)
        except BaseException:
            self._drop_connection()
            raise

    def _connect(self) -> psycopg.Connection[Any]:
        pg = self._pg
        try:
            params = pg.conninfo.conninfo_to_dict(self._conninfo)
        except pg.ProgrammingError as err:
            raise ConfigError(f"key store {self.uri}: not a valid PostgreSQL URI: {_describe(err)}") from None
        defaults = {"application_name": "eventbroker-keystore", "connect_timeout": self.CONNECT_TIMEOUT_S}
        extra = {k: v for k, v in defaults.items() if k not in params}  # the URI's own settings win
        conn: psycopg.Connection[Any] = pg.connect(self._conninfo, autocommit=True, **extra)
        self._conn = conn
        return conn

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _run(self, what: str, work: Callable[[psycopg.Connection[Any]], Any]) -> Any:
        """``work(conn)`` (one transaction), once more on a fresh connection after an OperationalError."""
        pg = self._pg
        for attempt in (1, 2):
            try:
                conn = self._conn
                if conn is None or conn.closed or conn.broken:
                    self._drop_connection()
                    conn = self._connect()
                return work(conn)
            except pg.OperationalError as err:
                self._drop_connection()
                if attempt == 2:
                    raise self._error(what, err) from None
                self.reconnects += 1
            except pg.Error as err:
                raise self._error(what, err) from None
        raise AssertionError("unreachable")

    @staticmethod
    def _create_table(conn: psycopg.Connection[Any]) -> None:
        with conn.transaction():
            # Two processes starting at once would otherwise race in CREATE TABLE IF NOT EXISTS
            # (a unique violation on the catalog); the lock is released at commit.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_DDL_LOCK_KEY,))
            for statement in _PG_DDL:
                conn.execute(statement)

    @staticmethod
    def _select(conn: psycopg.Connection[Any], users: list[str], out: dict[str, StoredKey | None]) -> None:
        for chunk in _chunks(users):
            rows = conn.execute(f"SELECT user_id, kek_id, wrapped FROM {_TABLE} WHERE user_id = ANY(%s)",
                                (chunk,)).fetchall()
            _rows_to_keys(rows, out)

    def _fetch(self, users: list[str]) -> dict[str, StoredKey | None]:
        def work(conn: psycopg.Connection[Any]) -> dict[str, StoredKey | None]:
            out: dict[str, StoredKey | None] = {}
            with conn.transaction():
                self._select(conn, users, out)
            return out

        result: dict[str, StoredKey | None] = self._run("fetch", work)
        return result

    def _fetch_or_create(self, users: list[str], make: Callable[[str], StoredKey]
                         ) -> dict[str, StoredKey | None]:
        made: dict[str, StoredKey] = {}

        def work(conn: psycopg.Connection[Any]) -> dict[str, StoredKey | None]:
            out: dict[str, StoredKey | None] = {}
            with conn.transaction():
                self._select(conn, users, out)
            missing = [u for u in users if u not in out]
            if not missing:
                return out
            for u in missing:  # outside the transaction: make may be slow; kept across a retry
                if u not in made:
                    made[u] = _check_key(make(u), "make")
            with conn.transaction():
                for chunk in _chunks(missing):
                    conn.execute(
                        f"INSERT INTO {_TABLE} (user_id, kek_id, wrapped) "
                        f"SELECT user_id, kek_id, wrapped "
                        f"FROM unnest(%s::text[], %s::text[], %s::bytea[]) WITH ORDINALITY "
                        f"AS v(user_id, kek_id, wrapped, n) ORDER BY n ON CONFLICT (user_id) DO NOTHING",
                        (chunk, [made[u].kek_id for u in chunk], [made[u].wrapped for u in chunk]))
                self._select(conn, missing, out)
            return out

        result: dict[str, StoredKey | None] = self._run("fetch_or_create", work)
        return result

    def _forget(self, user: str) -> tuple[bool, datetime]:
        def work(conn: psycopg.Connection[Any]) -> tuple[bool, datetime]:
            with conn.transaction():
                for _ in range(3):
                    row = conn.execute(f"SELECT kek_id FROM {_TABLE} WHERE user_id = %s FOR UPDATE",
                                       (user,)).fetchone()
                    if row is not None:
                        updated = conn.execute(
                            f"UPDATE {_TABLE} SET kek_id = NULL, wrapped = NULL, "
                            f"forgotten_at = COALESCE(forgotten_at, clock_timestamp()) "
                            f"WHERE user_id = %s RETURNING forgotten_at", (user,)).fetchone()
                        if updated is not None:  # always: the row is locked
                            return row[0] is not None, updated[0]
                        continue
                    # No row yet. The insert waits for a concurrent uncommitted insert of the same
                    # user; if that one commits, nothing is inserted and the SELECT, in a new
                    # snapshot, finds and locks its row. Rows are never deleted, so this ends.
                    inserted = conn.execute(
                        f"INSERT INTO {_TABLE} (user_id, forgotten_at) VALUES (%s, clock_timestamp()) "
                        f"ON CONFLICT (user_id) DO NOTHING RETURNING forgotten_at", (user,)).fetchone()
                    if inserted is not None:
                        return False, inserted[0]
            raise self._pg.OperationalError("the user's row neither appeared nor could be inserted")

        existed, at = self._run("forget", work)
        return existed, at.astimezone(UTC)

    def _forgotten_since(self, since: float | None) -> tuple[list[str], float]:
        def work(conn: psycopg.Connection[Any]) -> tuple[list[str], float]:
            with conn.transaction():
                (now,) = conn.execute("SELECT extract(epoch FROM now())::float8").fetchone() or (0.0,)
                if since is None:
                    return [], float(now)
                rows = conn.execute(f"SELECT user_id FROM {_TABLE} WHERE forgotten_at >= to_timestamp(%s) "
                                    f"ORDER BY forgotten_at, user_id", (since - LOOKBACK_S,)).fetchall()
            return [r[0] for r in rows], float(now)

        result: tuple[list[str], float] = self._run("forgotten_since", work)
        return result

    def _stale_keys(self, current_kek_id: str, after: str, limit: int) -> list[tuple[str, StoredKey]]:
        def work(conn: psycopg.Connection[Any]) -> list[tuple[str, StoredKey]]:
            with conn.transaction():
                rows = conn.execute(f"SELECT user_id, kek_id, wrapped FROM {_TABLE} WHERE kek_id IS NOT NULL "
                                    f"AND kek_id <> %s AND user_id > %s ORDER BY user_id LIMIT %s",
                                    (current_kek_id, after, limit)).fetchall()
            return [(u, StoredKey(k, bytes(w))) for u, k, w in rows]

        result: list[tuple[str, StoredKey]] = self._run("rewrap", work)
        return result

    def _compare_and_set(self, updates: list[tuple[str, StoredKey, StoredKey]]) -> int:
        def work(conn: psycopg.Connection[Any]) -> int:
            with conn.transaction(), conn.cursor() as cur:
                # One statement per row, pipelined, in user_id order (the lock order).
                cur.executemany(f"UPDATE {_TABLE} SET kek_id = %s, wrapped = %s "
                                f"WHERE user_id = %s AND kek_id = %s AND wrapped = %s",
                                [(new.kek_id, new.wrapped, u, old.kek_id, old.wrapped)
                                 for u, old, new in updates])
                return max(cur.rowcount, 0)

        result: int = self._run("rewrap", work)
        return result

    def _counts(self) -> tuple[int, int, dict[str, int]]:
        def work(conn: psycopg.Connection[Any]) -> tuple[int, int, dict[str, int]]:
            with conn.transaction():
                users, forgotten = conn.execute(
                    f"SELECT count(*) FILTER (WHERE kek_id IS NOT NULL), count(*) FILTER (WHERE kek_id IS NULL) "
                    f"FROM {_TABLE}").fetchone() or (0, 0)
                by_kek = conn.execute(f"SELECT kek_id, count(*) FROM {_TABLE} WHERE kek_id IS NOT NULL "
                                      f"GROUP BY kek_id ORDER BY kek_id").fetchall()
            return int(users), int(forgotten), {k: int(n) for k, n in by_kek}

        result: tuple[int, int, dict[str, int]] = self._run("counts", work)
        return result

    def _close(self) -> None:
        self._drop_connection()


# -- opening --------------------------------------------------------------------------------------------

_ACCEPTED = ("sqlite:///relative/path.db (relative to the base directory), sqlite:////absolute/path.db, "
             "postgresql://user:password@host:port/database (or postgres://...)")


def open_key_store(uri: str, base_dir: Path, create: bool = True) -> KeyStore:
    """Open (and create, if need be) the key store at ``uri``:

    * ``sqlite:///relative/path.db``: a file relative to ``base_dir``; missing
      parent folders are created with mode 0700, a new file with mode 0600;
    * ``sqlite:////absolute/path.db``: an absolute path (taken literally, no
      percent-decoding);
    * ``postgresql://user:pw@host:port/db`` or ``postgres://...``: a libpq
      connection URI, handed to psycopg (``pip install 'eventbroker[postgres]'``).

    Creates the table if it does not exist; two processes may do so at once.
    With ``create`` false (the reading tools), a SQLite file that does not
    exist is a ConfigError: an empty store opened by mistake (a relative path
    from another folder) would make every user look forgotten. A bad URI or
    a missing driver raises ConfigError; a database that cannot be reached or
    used raises KeyStoreError."""
    if not isinstance(uri, str):
        raise ConfigError(f"a key store URI must be a str, not {type(uri).__name__}")
    scheme, sep, rest = uri.partition("://")
    scheme = scheme.lower()
    if sep and scheme == "sqlite":
        if not rest.startswith("/"):
            raise ConfigError(f"key store URI {mask_uri(uri)!r}: a SQLite URI has no host: use {_ACCEPTED}")
        raw = rest[1:]
        if not raw or raw.endswith("/") or raw == ":memory:" or "\x00" in raw:
            raise ConfigError(f"key store URI {mask_uri(uri)!r} names no database file: use {_ACCEPTED}")
        path = Path(raw)
        if not path.is_absolute():
            path = Path(base_dir) / path
        if not create and not path.exists():
            raise ConfigError(f"no key store at {path} (privacy.key_store {mask_uri(uri)!r}; a relative path is "
                              "taken from $STATE_DIRECTORY, else the current folder: run from the gateway's folder, "
                              "or give an absolute path)")
        return SqliteKeyStore(uri, path)
    if sep and scheme in ("postgresql", "postgres"):
        try:
            import psycopg
        except ImportError:
            raise ConfigError(f"key store URI {mask_uri(uri)!r} needs the PostgreSQL driver: "
                              "pip install 'eventbroker[postgres]'") from None
        return PostgresKeyStore(uri, psycopg)
    raise ConfigError(f"key store URI {mask_uri(uri)!r} is not supported: use {_ACCEPTED}")


def open_store(privacy: PrivacyConfig, create: bool = True) -> KeyStore:
    """The store of a config's ``[privacy]`` section: ``key_store``, a relative
    SQLite path taken from ``$STATE_DIRECTORY``, else the current directory;
    ``create`` false: a store that is not there is an error (the tools)."""
    return open_key_store(privacy.key_store, privacy.state_path("."), create)
