"""The key store against a real PostgreSQL server, and races between processes.

One throwaway server per module (tests/pgserver.py), a fresh database per
test. The behaviour contract is the one the SQLite store passes
(tests/unit/test_key_store.py); the races run on both backends: two
processes creating the same users' keys at once, and ``forget`` racing
``fetch_or_create``. A server restart is survived by the reconnect.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import REPO
from eventbroker.errors import UsageError
from eventbroker.privacy.store import KeyStore, KeyStoreError, PostgresKeyStore, StoredKey, open_key_store
from pgserver import postgres_server
from unit.test_key_store import KeyStoreContract, Maker, SqliteBackend


@pytest.fixture(scope="module")
def pg():
    with postgres_server() as server:
        yield server


class PgBackend:
    def __init__(self, uri: str, base: Path) -> None:
        self.uri = uri
        self.base = base
        self.stores: list[KeyStore] = []

    def open(self) -> KeyStore:
        store = open_key_store(self.uri, self.base)
        self.stores.append(store)
        return store

    def _execute(self, sql: str, params: tuple) -> None:
        import psycopg

        with psycopg.connect(self.uri, autocommit=True) as conn:
            assert conn.execute(sql, params).rowcount == 1

    def set_forgotten_at(self, user: str, unix_s: float) -> None:
        self._execute("UPDATE eb_user_keys SET forgotten_at = to_timestamp(%s) WHERE user_id = %s",
                      (unix_s, user))

    def overwrite_key(self, user: str, key: StoredKey) -> None:
        self._execute("UPDATE eb_user_keys SET kek_id = %s, wrapped = %s WHERE user_id = %s",
                      (key.kek_id, key.wrapped, user))

    def close(self) -> None:
        for store in self.stores:
            store.close()


@pytest.fixture
def pg_backend(pg, tmp_path):
    backend = PgBackend(pg.new_database(), tmp_path)
    yield backend
    backend.close()


class TestPostgresKeyStore(KeyStoreContract):
    @pytest.fixture
    def backend(self, pg_backend):
        return pg_backend


@pytest.fixture(params=["sqlite", "postgres"])
def any_backend(request, tmp_path):
    if request.param == "sqlite":
        backend = SqliteBackend(tmp_path)
        yield backend
        backend.close()
    else:
        yield request.getfixturevalue("pg_backend")


# Opens the store only when told to go, so that the processes also race in creating the table; `make`
# can wait before making the first key so that all have read the (missing) rows before any inserts.
_RACER = """
import json, os, sys, time
from pathlib import Path
from eventbroker.privacy.store import StoredKey, open_key_store

uri, base, n, delay_s = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
users = [f"racer-{i:04d}" for i in range(n)]
made = []

def make(user):
    if not made:
        time.sleep(delay_s)
    made.append(user)
    return StoredKey(f"kek-{os.getpid()}", os.urandom(32))

print("ready", flush=True)
sys.stdin.readline()
store = open_key_store(uri, Path(base))
got = store.fetch_or_create(users + users[:7], make)
store.close()
print(json.dumps({"made": len(made), "keys": {u: [k.kek_id, k.wrapped.hex()] for u, k in got.items()}}))
"""


def _race(backend, processes: int, users: int, delay_s: float) -> list[dict]:
    """Start the racers, let them all import, then tell them to go at once; their results."""
    racers = [subprocess.Popen([sys.executable, "-c", _RACER, backend.uri, str(backend.base), str(users),
                                str(delay_s)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=REPO)
              for _ in range(processes)]
    try:
        for p in racers:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        for p in racers:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = []
        for p in racers:
            out, err = p.communicate(timeout=30)
            assert p.returncode == 0, err
            results.append(json.loads(out))
        return results
    finally:
        for p in racers:
            if p.poll() is None:
                p.kill()
                p.wait()


def _as_json(keys: dict[str, StoredKey | None]) -> dict[str, list[str]]:
    return {u: [k.kek_id, k.wrapped.hex()] for u, k in keys.items() if k is not None}


def test_two_processes_creating_the_same_keys_get_the_same_rows(any_backend):
    n = 200
    a, b = _race(any_backend, 2, n, delay_s=0.3)
    # Both really raced: each found no rows and made every key, yet they agree on what was stored.
    assert a["made"] == n and b["made"] == n
    assert len(a["keys"]) == n
    assert a["keys"] == b["keys"]
    store = any_backend.open()
    assert _as_json(store.fetch(list(a["keys"]))) == a["keys"]
    assert store.counts()["users"] == n and store.counts()["forgotten"] == 0


def test_processes_opening_a_new_store_at_once(any_backend):
    # Six processes create the file or table at once (SQLite's switch to WAL and PostgreSQL's
    # CREATE TABLE both fail under contention unless guarded), then race for five keys.
    results = _race(any_backend, 6, 5, delay_s=0)
    assert all(r["keys"] == results[0]["keys"] for r in results)
    assert len(results[0]["keys"]) == 5
    assert any_backend.open().counts()["users"] == 5


def test_forget_racing_fetch_or_create_never_leaves_a_key(any_backend):
    creator, forgetter, checker = any_backend.open(), any_backend.open(), any_backend.open()
    rounds = 150
    barrier = threading.Barrier(2, timeout=10)
    created: list[StoredKey | None] = []
    forgotten = []

    # Up to 3 ms of jitter on either side, so that both orders happen on any backend and machine.
    jitter = random.Random(7)

    def create() -> None:
        for i in range(rounds):
            barrier.wait()
            time.sleep(jitter.random() * 0.003)
            created.append(creator.fetch_or_create([f"racing-{i}"], Maker())[f"racing-{i}"])

    def forget() -> None:
        for i in range(rounds):
            barrier.wait()
            time.sleep(jitter.random() * 0.003)
            forgotten.append(forgetter.forget(f"racing-{i}"))
            # Once forget has returned, no instance hands out a key for the user again.
            assert checker.fetch_or_create([f"racing-{i}"], Maker()) == {f"racing-{i}": None}

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(create), pool.submit(forget)]
        for f in futures:
            f.result(timeout=60)

    for i, (key, gone) in enumerate(zip(created, forgotten, strict=True)):
        # The creator got a key exactly when its key was stored before the tombstone.
        assert (key is not None) == gone.existed, i
    # The race went both ways: some keys were stored first, some tombstones.
    assert 0 < sum(g.existed for g in forgotten) < rounds
    everyone = [f"racing-{i}" for i in range(rounds)]
    assert checker.fetch(everyone) == dict.fromkeys(everyone)
    assert checker.counts() == {"users": 0, "forgotten": rounds, "by_kek": {}}


def test_a_server_restart_is_survived_by_reconnecting(pg, pg_backend):
    store = pg_backend.open()
    assert isinstance(store, PostgresKeyStore)
    keys = store.fetch_or_create(["before-1", "before-2"], Maker())
    pid = store._conn.info.backend_pid
    pg.restart()
    assert store.fetch(["before-1", "before-2"]) == keys
    assert store.reconnects == 1
    assert store._conn.info.backend_pid != pid
    assert store.forget("before-1").existed is True
    assert store.fetch_or_create(["before-1", "after"], Maker())["before-1"] is None


def test_database_errors_are_key_store_errors_naming_the_store(pg_backend):
    import psycopg

    store = pg_backend.open()
    store.fetch_or_create(["secret-user"], Maker())
    with psycopg.connect(pg_backend.uri, autocommit=True) as conn:
        conn.execute("DROP TABLE eb_user_keys")
    with pytest.raises(KeyStoreError) as info:
        store.fetch(["secret-user"])
    message = str(info.value)
    assert pg_backend.uri in message and "fetch" in message and "eb_user_keys" in message
    assert "secret-user" not in message
    assert store.reconnects == 0  # not a connection problem: no retry


def test_a_server_gone_for_good_is_a_key_store_error(tmp_path):
    with postgres_server() as server:
        store = open_key_store(server.uri.replace("postgres@", "postgres:pw@"), tmp_path)
        store.fetch_or_create(["u"], Maker())
        server.stop()
        with pytest.raises(KeyStoreError) as info:
            store.fetch(["u"])
        assert "postgres:***@" in str(info.value) and ":pw@" not in str(info.value)
        assert store.reconnects == 1
        store.close()
        with pytest.raises(UsageError):
            store.fetch(["u"])


def test_the_uri_is_masked_and_its_own_settings_win(pg, tmp_path):
    uri = pg.new_database().replace("postgres@", "postgres:pw@") + "?application_name=mine"
    store = open_key_store(uri, tmp_path)
    try:
        assert store.uri == uri.replace(":pw@", ":***@")
        assert repr(store) == f"PostgresKeyStore({store.uri!r})"
        assert store._conn.info.parameter_status("application_name") == "mine"
    finally:
        store.close()
    assert os.listdir(tmp_path) == []
