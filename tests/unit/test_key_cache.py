"""The gateway's key cache on a real SQLite key store: loads off the loop,
first-sight creation shared with other gateways, the bound, and forgets."""

from __future__ import annotations

import asyncio
import base64
import os

import pytest

from eventbroker import _fastpath as fp
from eventbroker.config import PrivacyConfig
from eventbroker.errors import ConfigError, KeyStoreError
from eventbroker.privacy import Decryptor, KekRing, KeyCache, load_keks, open_store
from eventbroker.privacy.crypto import Kek
from eventbroker.privacy.store import open_key_store


def _keks(*ids: str) -> KekRing:
    return KekRing(Kek(i, os.urandom(32)) for i in ids or ("k1",))


async def _cache(tmp_path, keks=None, **kw) -> KeyCache:
    store = open_key_store(f"sqlite:///{tmp_path}/keys.db", tmp_path)
    kw.setdefault("max_users", 1000)
    kw.setdefault("forget_poll_ms", 50)
    c = KeyCache(store, keks or _keks(), **kw)
    await c.start()
    return c


async def _until(pred, within_s=5.0):
    async with asyncio.timeout(within_s):
        while not pred():
            await asyncio.sleep(0.005)


async def test_missing_users_are_loaded_in_one_batch_and_shared_with_another_gateway(tmp_path):
    keks = _keks()
    a, b = await _cache(tmp_path, keks), await _cache(tmp_path, keks)
    try:
        users = [b"u%d" % i for i in range(300)]
        hint = a._on_missing(users)
        assert 10 <= hint <= 1000
        a._on_missing(users[:10])  # asked again while loading: not queued twice
        await _until(lambda: a.cached_users == 300)
        assert a.stats.loads == 1 and a.stats.users_loaded == 300
        b._on_missing(users)
        await _until(lambda: b.cached_users == 300)
        assert all(len(a.native.keys[u]) == 32 and a.native.keys[u] == b.native.keys[u] for u in users)
    finally:
        await a.stop()
        await b.stop()


async def test_the_cache_is_bounded_oldest_first(tmp_path):
    c = await _cache(tmp_path, max_users=50)
    try:
        c._on_missing([b"a%d" % i for i in range(40)])
        await _until(lambda: c.cached_users == 40)
        c._on_missing([b"b%d" % i for i in range(40)])
        await _until(lambda: c.stats.users_loaded == 80)
        assert c.cached_users == 50 and c.stats.evicted == 30
        assert b"a0" not in c.native.keys and b"a39" in c.native.keys and b"b39" in c.native.keys
    finally:
        await c.stop()


async def test_a_forget_reaches_the_cache_within_the_poll_and_is_never_undone(tmp_path):
    c = await _cache(tmp_path)
    other = open_key_store(f"sqlite:///{tmp_path}/keys.db", tmp_path)
    try:
        c._on_missing([b"ann", b"bob"])
        await _until(lambda: c.cached_users == 2)
        other.forget("ann")
        await _until(lambda: c.native.keys.get(b"ann", b"") is None, within_s=2)
        assert c.stats.forgets_applied == 1 and len(c.native.keys[b"bob"]) == 32
        # Asking again (another part naming ann) loads the tombstone: still forgotten, no new key.
        del c.native.keys[b"ann"]
        c._on_missing([b"ann"])
        await _until(lambda: b"ann" in c.native.keys)
        assert c.native.keys[b"ann"] is None and other.counts()["forgotten"] == 1
        await asyncio.sleep(0.2)  # later polls re-read the lookback window: counted once
        assert c.stats.forgets_applied == 1
    finally:
        other.close()
        await c.stop()


async def test_a_key_wrapped_by_a_kek_this_gateway_lacks_is_a_load_error_not_a_crash(tmp_path, caplog):
    a = await _cache(tmp_path, _keks("old"))
    b = await _cache(tmp_path, _keks("new"))
    try:
        a._on_missing([b"cy"])
        await _until(lambda: a.cached_users == 1)
        b._on_missing([b"cy"])
        await _until(lambda: b.stats.load_errors == 1)
        assert b"cy" not in b.native.keys and "does not hold" in caplog.text
        b._on_missing([b"dee"])  # the loader goes on
        await _until(lambda: b"dee" in b.native.keys)
    finally:
        await a.stop()
        await b.stop()


def test_kek_ring_rotation_unwraps_old_and_wraps_new():
    old, new = Kek("k1", os.urandom(32)), Kek("k2", os.urandom(32))
    before = KekRing([old])
    sk = before.new_key("u")
    after = KekRing([new, old])
    assert after.unwrap("u", sk) == before.unwrap("u", sk)
    re = after.rewrap("u", sk)
    assert re.kek_id == "k2" and KekRing([new]).unwrap("u", re) == before.unwrap("u", sk)
    with pytest.raises(KeyStoreError, match="moved to another user"):
        before.unwrap("v", sk)


def test_kek_files_are_checked_and_made_private(tmp_path, monkeypatch):
    monkeypatch.delenv("EVENTBROKER_KEK", raising=False)
    cfg = PrivacyConfig(kek_file=str(tmp_path / "keys" / "kek"))
    with pytest.raises(ConfigError, match="no key-encryption key file"):
        load_keks(cfg)
    ring = load_keks(cfg, create=True)
    assert (tmp_path / "keys" / "kek").stat().st_mode & 0o777 == 0o600
    assert load_keks(cfg).current == ring.current
    (tmp_path / "keys" / "kek").chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        load_keks(cfg)
    secret = base64.b64encode(b"x" * 31).decode()
    monkeypatch.setenv("EVENTBROKER_KEK", f"k9 {secret}")
    with pytest.raises(ConfigError, match="not base64 of 32 bytes") as e:
        load_keks(cfg)
    assert secret not in str(e.value)  # key material is never echoed


def test_readers_refuse_a_missing_store_and_users_it_never_saw(tmp_path, monkeypatch):
    monkeypatch.delenv("EVENTBROKER_KEK", raising=False)
    cfg = PrivacyConfig(key_store=f"sqlite:///{tmp_path}/keys.db", kek_file=str(tmp_path / "kek"))
    load_keks(cfg, create=True)
    with pytest.raises(ConfigError, match="no key store at"):  # e.g. a relative path from another folder
        Decryptor.from_config(cfg)
    assert not (tmp_path / "keys.db").exists()
    keks = load_keks(cfg)
    with open_store(cfg) as store:
        store.fetch_or_create(["known"], keks.new_key)
        store.forget("gone")
        key = keks.unwrap("known", store.fetch(["known"])["known"])
    eid = os.urandom(16)
    doc = b'{"user":"%s","ip":%s}'
    sealed = fp.seal_value(key, b"t", b"ip", eid, b'"1.2.3.4"')
    dec = Decryptor.from_config(cfg)
    try:
        got = dec.open_events("t", "user", ["ip"], [(eid, doc % (b"known", sealed)),
                                                    (eid, doc % (b"gone", b'"ep1:forgotten"')),
                                                    (eid, doc % (b"never-sealed", b"null"))])
        assert [(o.payload["ip"], o.forgotten) for o in got] == [("1.2.3.4", False), (None, True), (None, False)]
        with pytest.raises(KeyStoreError, match="1 of 1 users with sealed values have no row"):
            dec.open_events("t", "user", ["ip"], [(eid, doc % (b"stranger", sealed))])
    finally:
        dec.close()


def _first_start(path: str, n: int) -> list[str]:
    """In a child process: the KEK ring a gateway reads when it starts, n times."""
    out = []
    for i in range(n):
        cfg = PrivacyConfig(kek_file=f"{path}/{i}/kek")
        try:
            out.append(load_keks(cfg, create=True).current.id)
        except ConfigError as e:
            out.append(f"error: {e}")
    return out


def test_workers_starting_at_once_all_read_the_one_kek_made(tmp_path, monkeypatch):
    import multiprocessing

    monkeypatch.delenv("EVENTBROKER_KEK", raising=False)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(4) as pool:
        runs = pool.starmap(_first_start, [(str(tmp_path), 60)] * 4)
    for i in range(60):
        ids = {r[i] for r in runs}
        assert len(ids) == 1 and not next(iter(ids)).startswith("error"), (i, ids)
    assert not list(tmp_path.rglob(".kek-*"))


async def test_a_bulk_forget_touches_only_cached_users(tmp_path):
    c = await _cache(tmp_path, max_users=100)
    other = open_key_store(f"sqlite:///{tmp_path}/keys.db", tmp_path)
    try:
        c._on_missing([b"u%d" % i for i in range(50)])
        await _until(lambda: c.cached_users == 50)
        other.fetch_or_create([f"x{i}" for i in range(500)], _keks().new_key)
        for i in range(500):
            other.forget(f"x{i}")
        other.forget("u7")
        await _until(lambda: c.native.keys[b"u7"] is None, within_s=2)
        assert c.cached_users == 50 and c.stats.evicted == 0 and c.stats.forgets_applied == 1
    finally:
        other.close()
        await c.stop()


async def test_a_store_down_at_start_is_opened_on_first_use(tmp_path):
    opened = []

    def open_later():
        if not opened:
            opened.append(False)
            raise KeyStoreError("not yet")
        opened.append(True)
        return open_key_store(f"sqlite:///{tmp_path}/keys.db", tmp_path)

    c = KeyCache(open_later, _keks(), max_users=10, forget_poll_ms=50, uri="sqlite:///keys.db")
    await c.start()  # reports, does not raise
    try:
        c._on_missing([b"late"])
        await _until(lambda: b"late" in c.native.keys)
        assert opened == [False, True] and len(c.native.keys[b"late"]) == 32
    finally:
        await c.stop()
