"""The per-user data-key store (eventbroker.privacy.store) on SQLite.

``KeyStoreContract`` is the behaviour both backends share; this module runs
it against a SQLite file, tests/integration/test_key_store_pg.py against a
real PostgreSQL server. A ``backend`` fixture gives the contract a fresh
database: ``open()`` a store on it (any number of instances, closed at the
end), ``set_forgotten_at(user, unix_s)`` to move a tombstone in time and
``overwrite_key(user, key)`` to change a row behind the stores' backs.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from eventbroker.errors import ConfigError, EventBrokerError, UsageError
from eventbroker.privacy.store import (
    LOOKBACK_S,
    Forgotten,
    KeyStore,
    KeyStoreError,
    SqliteKeyStore,
    StoredKey,
    open_key_store,
)


class Maker:
    """A ``make`` that records whom it was called for; keys are unique per call."""

    def __init__(self, kek_id: str = "kek-a") -> None:
        self.kek_id = kek_id
        self.calls: list[str] = []

    def __call__(self, user: str) -> StoredKey:
        self.calls.append(user)
        return StoredKey(self.kek_id, os.urandom(32))


def _reverse_into(kek_id: str, seen: list[tuple[str, StoredKey]]):
    def fn(user: str, key: StoredKey) -> StoredKey:
        seen.append((user, key))
        return StoredKey(kek_id, key.wrapped[::-1])
    return fn


class KeyStoreContract:
    """What every KeyStore does; subclasses provide the ``backend`` fixture."""

    @pytest.fixture
    def store(self, backend) -> KeyStore:
        return backend.open()

    def test_fetch_or_create_makes_each_missing_key_once(self, store, backend):
        make = Maker()
        got = store.fetch_or_create(["alice", "bob", "alice", "bob", "carol"], make)
        assert sorted(make.calls) == ["alice", "bob", "carol"]
        assert set(got) == {"alice", "bob", "carol"}
        assert all(isinstance(k, StoredKey) and k.kek_id == "kek-a" and len(k.wrapped) == 32
                   for k in got.values())
        assert len({k.wrapped for k in got.values()}) == 3

        again = Maker()
        more = store.fetch_or_create(["carol", "alice", "dave"], again)
        assert again.calls == ["dave"]
        assert more == {"carol": got["carol"], "alice": got["alice"], "dave": store.fetch(["dave"])["dave"]}
        # Another instance (another process, in real life) sees the same rows.
        other = backend.open()
        assert other.fetch(["alice", "bob", "nobody"]) == {"alice": got["alice"], "bob": got["bob"]}
        assert store.fetch([]) == {} and store.fetch_or_create([], Maker()) == {}

    def test_more_users_than_one_statement_holds(self, store):
        users = [f"user-{i:05d}" for i in range(1203)]
        make = Maker()
        got = store.fetch_or_create(users + users[:10], make)
        assert len(make.calls) == 1203 and len(got) == 1203
        assert store.fetch(users) == got
        assert store.counts()["users"] == 1203
        assert store.fetch_or_create(users, Maker()) == got

    def test_forget_leaves_a_tombstone_that_blocks_new_keys(self, store, backend):
        key = store.fetch_or_create(["alice", "bob"], Maker())
        before = datetime.now(UTC)
        first = store.forget("alice")
        assert isinstance(first, Forgotten)
        assert first.user == "alice" and first.existed is True
        assert first.forgotten_at.tzinfo is not None and first.forgotten_at.utcoffset().total_seconds() == 0
        assert abs((first.forgotten_at - before).total_seconds()) < 30

        assert store.fetch(["alice", "bob"]) == {"alice": None, "bob": key["bob"]}
        make = Maker()
        assert store.fetch_or_create(["alice", "bob"], make) == {"alice": None, "bob": key["bob"]}
        assert make.calls == []
        assert backend.open().fetch_or_create(["alice"], make) == {"alice": None} and make.calls == []

        second = store.forget("alice")
        assert second == Forgotten("alice", False, first.forgotten_at)
        # Also when the clock has moved on: the tombstone keeps the first forget's time.
        backend.set_forgotten_at("alice", 1_700_000_000.25)
        third = store.forget("alice")
        assert third == Forgotten("alice", False, datetime.fromtimestamp(1_700_000_000.25, UTC))

        # A user never seen gets a tombstone too: no key is created later.
        never = store.forget("zoe")
        assert never.existed is False
        assert store.fetch_or_create(["zoe"], make) == {"zoe": None} and make.calls == []
        assert store.counts() == {"users": 1, "forgotten": 2, "by_kek": {"kek-a": 1}}

    def test_forgotten_since_pages_by_cursor_with_a_lookback(self, store, backend):
        users, cursor0 = store.forgotten_since(None)
        assert users == [] and isinstance(cursor0, float)
        assert abs(cursor0 - time.time()) < 30

        store.fetch_or_create(["a", "b"], Maker())
        store.forget("a")
        store.forget("b")
        users, cursor1 = store.forgotten_since(cursor0)
        assert users == ["a", "b"]
        assert cursor1 >= cursor0
        # The lookback returns them again; callers deduplicate.
        users, cursor2 = store.forgotten_since(cursor1)
        assert users == ["a", "b"] and cursor2 >= cursor1

        # A forget whose transaction committed late: its timestamp is before the cursor already
        # handed out, yet within the lookback, so the next call still reports it.
        store.forget("late")
        backend.set_forgotten_at("late", cursor2 - 30)
        backend.set_forgotten_at("a", cursor2 - LOOKBACK_S - 5)  # older than the lookback: done with
        users, cursor3 = store.forgotten_since(cursor2)
        assert users == ["late", "b"]
        assert cursor3 >= cursor2
        with pytest.raises(UsageError):
            store.forgotten_since("yesterday")

    def test_rewrap_replaces_only_live_keys_of_other_keks(self, store):
        users = [f"u{i}" for i in range(10)]
        keys = store.fetch_or_create(users, Maker("a"))
        store.forget("u3")
        already = store.fetch_or_create(["v-already-b"], Maker("b"))["v-already-b"]
        seen: list[tuple[str, StoredKey]] = []

        assert store.rewrap(_reverse_into("b", seen), "b", batch=3) == 9
        assert sorted(seen) == sorted((u, keys[u]) for u in users if u != "u3")
        after = store.fetch([*users, "v-already-b"])
        assert after["u3"] is None
        assert after["v-already-b"] == already
        for u in users:
            if u != "u3":
                assert after[u] == StoredKey("b", keys[u].wrapped[::-1])
        assert store.counts() == {"users": 10, "forgotten": 1, "by_kek": {"b": 10}}

        seen.clear()
        assert store.rewrap(_reverse_into("b", seen), "b") == 0
        assert seen == []

    def test_rewrap_is_compare_and_set(self, store, backend):
        keys = store.fetch_or_create(["p", "q", "r"], Maker("a"))
        other = backend.open()

        def fn(user: str, key: StoredKey) -> StoredKey:
            if user == "q":  # forgotten between the read and the write
                other.forget("q")
            if user == "r":  # rewrapped by someone else meanwhile
                backend.overwrite_key("r", StoredKey("c", b"other"))
            return StoredKey("b", key.wrapped[::-1])

        # p and r were read in the batch; q's forget and r's other rewrap win; p is rewrapped.
        assert store.rewrap(fn, "b") == 1
        after = store.fetch(["p", "q", "r"])
        assert after["p"] == StoredKey("b", keys["p"].wrapped[::-1])
        assert after["q"] is None
        assert after["r"] == StoredKey("c", b"other")

    def test_rewrap_refuses_a_key_wrapped_by_another_kek(self, store):
        keys = store.fetch_or_create(["x"], Maker("a"))
        with pytest.raises(UsageError, match="current KEK"):
            store.rewrap(lambda u, k: StoredKey("a2", k.wrapped), "b")
        with pytest.raises(UsageError):
            store.rewrap(lambda u, k: k, "b", batch=0)
        assert store.fetch(["x"]) == keys

    def test_user_ids_are_at_most_256_bytes(self, store):
        ok = "é" * 128  # 256 bytes of UTF-8
        assert store.fetch_or_create([ok], Maker())[ok] is not None
        assert store.forget(ok).existed is True
        for bad in ("é" * 129, "x" * 257, "", "nul\x00inside", "\ud800"):
            with pytest.raises(UsageError):
                store.fetch_or_create(["fine", bad], Maker())
            with pytest.raises(UsageError):
                store.forget(bad)
        with pytest.raises(UsageError):
            store.fetch("alice")  # a string is not a list of users
        with pytest.raises(UsageError):
            store.fetch([42])
        assert store.fetch(["fine"]) == {}  # a refused batch creates nothing

    def test_make_must_return_a_stored_key_and_its_errors_store_nothing(self, store):
        with pytest.raises(UsageError):
            store.fetch_or_create(["m"], lambda u: b"raw key")
        with pytest.raises(UsageError):
            store.fetch_or_create(["m"], lambda u: StoredKey("", b"x"))

        def failing(user: str) -> StoredKey:
            if user == "n2":
                raise RuntimeError("KMS down")
            return StoredKey("a", b"k")

        with pytest.raises(RuntimeError, match="KMS down"):
            store.fetch_or_create(["n1", "n2", "n3"], failing)
        assert store.fetch(["m", "n1", "n2", "n3"]) == {}
        # A plain tuple is accepted and comes back as a StoredKey.
        assert store.fetch_or_create(["t"], lambda u: ("a", bytearray(b"kk"))) == {"t": StoredKey("a", b"kk")}

    def test_made_in_one_thread_used_in_another(self, backend):
        store = backend.open()
        out: dict[str, object] = {}

        def use() -> None:
            try:
                out["got"] = store.fetch_or_create(["thread-user"], Maker())
                out["forgot"] = store.forget("thread-user")
            except BaseException as err:  # surfaced below
                out["error"] = err

        t = threading.Thread(target=use)
        t.start()
        t.join(10)
        assert "error" not in out, out.get("error")
        assert out["forgot"].existed is True

    def test_a_closed_store_refuses_calls(self, backend):
        store = backend.open()
        store.close()
        store.close()
        with pytest.raises(UsageError, match="closed"):
            store.fetch(["a"])

    def test_errors_are_one_family(self):
        assert issubclass(KeyStoreError, EventBrokerError)
        assert not issubclass(KeyStoreError, UsageError)


class SqliteBackend:
    def __init__(self, base: Path, name: str = "keys.db") -> None:
        self.base = base
        self.uri = f"sqlite:///{name}"
        self.path = base / name
        self.stores: list[KeyStore] = []

    def open(self) -> KeyStore:
        store = open_key_store(self.uri, self.base)
        self.stores.append(store)
        return store

    def set_forgotten_at(self, user: str, unix_s: float) -> None:
        with sqlite3.connect(self.path) as db:
            assert db.execute("UPDATE eb_user_keys SET forgotten_at = ? WHERE user_id = ?",
                              (unix_s, user)).rowcount == 1
        db.close()

    def overwrite_key(self, user: str, key: StoredKey) -> None:
        with sqlite3.connect(self.path) as db:
            assert db.execute("UPDATE eb_user_keys SET kek_id = ?, wrapped = ? WHERE user_id = ?",
                              (key.kek_id, key.wrapped, user)).rowcount == 1
        db.close()

    def close(self) -> None:
        for store in self.stores:
            store.close()


@pytest.fixture
def sqlite_backend(tmp_path):
    backend = SqliteBackend(tmp_path)
    yield backend
    backend.close()


class TestSqliteKeyStore(KeyStoreContract):
    @pytest.fixture
    def backend(self, sqlite_backend):
        return sqlite_backend


# -- SQLite only ---------------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_relative_path_is_under_base_dir_with_private_modes(tmp_path):
    (tmp_path / "existing").mkdir(mode=0o755)
    os.chmod(tmp_path / "existing", 0o755)
    store = open_key_store("sqlite:///existing/new/deeper/keys.db", tmp_path)
    try:
        assert isinstance(store, SqliteKeyStore)
        assert store.path == tmp_path / "existing" / "new" / "deeper" / "keys.db"
        assert store.uri == "sqlite:///existing/new/deeper/keys.db"
        store.fetch_or_create(["alice"], Maker())
        assert _mode(tmp_path / "existing") == 0o755  # not ours: left alone
        assert _mode(tmp_path / "existing" / "new") == 0o700
        assert _mode(tmp_path / "existing" / "new" / "deeper") == 0o700
        for name in ("keys.db", "keys.db-wal", "keys.db-shm"):
            assert _mode(store.path.with_name(name)) == 0o600, name
    finally:
        store.close()


def test_absolute_path_and_the_file_layout(tmp_path):
    path = tmp_path / "abs" / "keys.db"
    store = open_key_store(f"sqlite:///{path}", Path("/nonexistent-base"))
    try:
        assert store.path == path
        store.fetch_or_create(["alice", "bob"], Maker())
        store.forget("bob")
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            rows = dict(db.execute("SELECT user_id, typeof(created_at) || ',' || typeof(forgotten_at) "
                                   "FROM eb_user_keys").fetchall())
            (forgotten_at,) = db.execute("SELECT forgotten_at FROM eb_user_keys WHERE user_id = 'bob'").fetchone()
        db.close()
        assert rows == {"alice": "real,null", "bob": "real,real"}
        assert abs(forgotten_at - time.time()) < 30  # Unix seconds
    finally:
        store.close()


@pytest.mark.parametrize("uri", [
    "mysql://admin:s3cret@db.example/keys",
    "sqlite://host/keys.db",
    "sqlite:///",
    "sqlite:///folder/",
    "sqlite:///:memory:",
    "keys.db",
    "host=db.example password=s3cret",
])
def test_bad_uris_are_config_errors_that_hide_the_password(tmp_path, uri):
    with pytest.raises(ConfigError) as info:
        open_key_store(uri, tmp_path)
    message = str(info.value)
    assert "s3cret" not in message
    assert "sqlite:///relative/path.db" in message and "postgresql://" in message
    if "s3cret" in uri:
        assert "***" in message
    assert list(tmp_path.iterdir()) == []


def test_missing_psycopg_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # makes `import psycopg` fail
    with pytest.raises(ConfigError, match=r"pip install 'eventbroker\[postgres\]'"):
        open_key_store("postgresql://u:s3cret@127.0.0.1:1/db", tmp_path)


def test_unreachable_postgres_is_a_key_store_error_with_the_password_masked(tmp_path):
    pytest.importorskip("psycopg")
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(KeyStoreError) as info:
        open_key_store(f"postgres://u:s3cret@127.0.0.1:{port}/db", tmp_path)
    message = str(info.value)
    assert f"postgres://u:***@127.0.0.1:{port}/db" in message and "s3cret" not in message


def test_a_lock_held_too_long_is_a_key_store_error(sqlite_backend, monkeypatch):
    store = sqlite_backend.open()
    monkeypatch.setattr(SqliteKeyStore, "BUSY_TIMEOUT_MS", 200)
    impatient = sqlite_backend.open()
    holder = sqlite3.connect(sqlite_backend.path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        with pytest.raises(KeyStoreError) as info:
            impatient.fetch_or_create(["private-user"], Maker())
        assert time.monotonic() - started < 5
        message = str(info.value)
        assert "sqlite:///keys.db" in message and "fetch_or_create" in message and "locked" in message
        assert "private-user" not in message
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    # The failed call left no transaction behind: both instances carry on.
    assert impatient.fetch_or_create(["private-user"], Maker()) == store.fetch(["private-user"])


def test_two_instances_open_the_same_new_file(tmp_path):
    a = open_key_store("sqlite:///same.db", tmp_path)
    b = open_key_store("sqlite:///same.db", tmp_path)
    try:
        assert a.fetch_or_create(["u"], Maker()) == b.fetch_or_create(["u"], Maker())
    finally:
        a.close()
        b.close()
