"""The gateway's cache of unwrapped data keys, filled from the key store off the event loop.

The splitter reads ``native.keys`` (``_fastpath.UserKeys``) per event in C.
A part naming a user that is not cached is answered ``RETRY_LATER
key_unavailable`` and the splitter calls ``_on_missing`` with the users it
lacked, once per part; they are queued and loaded in batches (one
``fetch_or_create`` per batch: a user's key is made on first sight, race-free
between gateways) by one worker thread, so neither SQLite nor PostgreSQL
blocks the loop. The producer's retry then finds them.

Forgetting: every ``forget_poll_ms`` the same thread asks the store who was
forgotten since; those users' entries become None, which the splitter reads
as "shred at the edge". The thread runs loads and polls one at a time and
their results are applied on the loop in the order they ran, so a load that
read a key just before a forget can never overwrite the forget.

The cache is bounded (``cache_users``): past it the oldest entries go first.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from eventbroker import _fastpath as fp
from eventbroker.errors import EventBrokerError, KeyStoreError
from eventbroker.privacy.crypto import KekRing
from eventbroker.privacy.store import KeyStore, StoredKey

log = logging.getLogger("eventbroker.privacy")

_LOAD_BATCH = 2000  # users per key-store call
_RETRY_MIN_MS, _RETRY_MAX_MS = 10, 1000


class KeyCacheStats:
    __slots__ = ("loads", "users_loaded", "load_seconds", "load_errors", "forgets_applied", "last_forget_poll",
                 "evicted")

    def __init__(self) -> None:
        self.loads = 0
        self.users_loaded = 0
        self.load_seconds = 0.0
        self.load_errors = 0
        self.forgets_applied = 0
        self.last_forget_poll = 0.0  # time.time() of the last successful poll
        self.evicted = 0


class KeyCache:
    """One per gateway process; shared by every type with personal fields."""

    def __init__(self, store: KeyStore | Callable[[], KeyStore], keks: KekRing, *, max_users: int,
                 forget_poll_ms: int, uri: str = "") -> None:
        # The store, or how to open it: a gateway whose store is down at start
        # starts anyway (its other types flow) and opens it on first use.
        self.store: KeyStore | None = store if isinstance(store, KeyStore) else None
        self._open = None if isinstance(store, KeyStore) else store
        self.uri = self.store.uri if self.store is not None else uri
        self.keks = keks
        self.max_users = max_users
        self.forget_poll_s = forget_poll_ms / 1000
        self.native = fp.UserKeys(self._on_missing)
        self.stats = KeyCacheStats()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="eventbroker-keys")
        self._queued: list[bytes] = []
        self._wanted: set[bytes] = set()  # queued or loading
        self._loader: asyncio.Task[None] | None = None
        self._poller: asyncio.Task[None] | None = None
        self._cursor: object | None = None
        self._last_load_ms = 20.0

    @property
    def cached_users(self) -> int:
        return len(self.native.keys)

    # lifecycle

    async def start(self) -> None:
        """Read the forget cursor (a gateway starts with an empty cache) and poll from then on.
        A store that cannot be reached is reported and tried again by each load and poll."""
        loop = asyncio.get_running_loop()
        try:
            self._cursor = await loop.run_in_executor(self._pool, self._first_cursor)
            self.stats.last_forget_poll = time.time()
        except KeyStoreError as e:
            log.warning("the key store cannot be used yet (%s): types with personal fields are answered "
                        "retry-later key_unavailable until it can", e)
        self._poller = loop.create_task(self._poll_forgets(), name="eventbroker-forget-poll")

    def _get_store(self) -> KeyStore:
        """In the worker thread: the store, opened on first use when it was down at start."""
        if self.store is None:
            assert self._open is not None
            self.store = self._open()
        return self.store

    def _first_cursor(self) -> object:
        return self._get_store().forgotten_since(None)[1]

    def _close_store(self) -> None:
        if self.store is not None:
            self.store.close()

    async def stop(self) -> None:
        for t in (self._poller, self._loader):
            if t is not None:
                t.cancel()
        for t in (self._poller, self._loader):
            if t is not None:
                try:
                    await t
                except (asyncio.CancelledError, Exception):  # noqa: S110 - stopping
                    pass
        await asyncio.get_running_loop().run_in_executor(self._pool, self._close_store)
        self._pool.shutdown(wait=True)
        self.native.keys.clear()

    # the splitter's callback (once per part that lacked keys)

    def _on_missing(self, users: list[bytes]) -> int:
        new = [u for u in users if u not in self._wanted]
        self._wanted.update(new)
        self._queued.extend(new)
        if self._loader is None or self._loader.done():
            self._loader = asyncio.get_running_loop().create_task(self._load(), name="eventbroker-key-load")
        backlog = len(self._queued) / _LOAD_BATCH + 1
        return int(min(_RETRY_MAX_MS, max(_RETRY_MIN_MS, self._last_load_ms * backlog * 1.5)))

    async def _load(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queued:
            batch, self._queued = self._queued[:_LOAD_BATCH], self._queued[_LOAD_BATCH:]
            t0 = time.monotonic()
            try:
                got = await loop.run_in_executor(self._pool, self._fetch, batch)
            except (EventBrokerError, OSError, UnicodeDecodeError) as e:
                self.stats.load_errors += 1
                self._last_load_ms = _RETRY_MAX_MS  # producers retry at the slowest hint until a load succeeds
                log.warning("could not load %d users' keys: %s (their events are answered retry-later)",
                            len(batch), e)
                self._wanted.difference_update(batch)
                await asyncio.sleep(0.5)
                continue
            except asyncio.CancelledError:
                self._wanted.difference_update(batch)
                raise
            dt = time.monotonic() - t0
            self._last_load_ms = dt * 1000
            self.stats.loads += 1
            self.stats.users_loaded += len(got)
            self.stats.load_seconds += dt
            self._insert(got)
            self._wanted.difference_update(batch)

    def _fetch(self, users: list[bytes]) -> dict[bytes, bytes | None]:
        """In the worker thread: the users' keys, made where they have none, unwrapped
        (a key this call made and the store kept is used as made, not unwrapped again).
        A user whose key does not unwrap is left out (and stays missing); the others load."""
        raws, names = [], []
        for raw in users:  # the splitter passes ids of validated JSON strings: this is a second guard
            try:
                names.append(raw.decode("utf-8"))
                raws.append(raw)
            except UnicodeDecodeError:
                continue
        made: dict[str, tuple[StoredKey, bytes]] = {}

        def make(user: str) -> StoredKey:
            made[user] = self.keks.new_key_pair(user)
            return made[user][0]

        stored = self._get_store().fetch_or_create(names, make)
        out: dict[bytes, bytes | None] = {}
        failed: list[KeyStoreError] = []
        for raw, name in zip(raws, names, strict=True):
            sk = stored.get(name)
            if sk is None:
                out[raw] = None
            elif name in made and made[name][0] == sk:
                out[raw] = made[name][1]
            else:  # another gateway made it first, or it existed
                try:
                    out[raw] = self.keks.unwrap(name, sk)
                except KeyStoreError as e:
                    failed.append(e)
        if failed:
            self.stats.load_errors += 1
            log.warning("%d of %d users' keys do not unwrap: %s (their events are answered retry-later)",
                        len(failed), len(raws), failed[0])
        return out

    def _insert(self, got: dict[bytes, bytes | None]) -> None:
        keys = self.native.keys
        keys.update(got)
        excess = len(keys) - self.max_users
        if excess > 0:
            for u in list(itertools.islice(keys, excess)):  # the oldest: dicts keep insertion order
                del keys[u]
            self.stats.evicted += excess

    # forgetting

    async def _poll_forgets(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.forget_poll_s)
            try:
                users = await loop.run_in_executor(self._pool, self._poll)
            except (EventBrokerError, OSError) as e:
                log.warning("could not ask the key store who was forgotten: %s", e)
                continue
            self.stats.last_forget_poll = time.time()
            self.apply_forgets(users)

    def _poll(self) -> list[bytes]:
        """In the worker thread: who was forgotten since the cursor (re-read over the lookback window)."""
        store = self._get_store()
        if self._cursor is None:  # the store was down at start: nothing was cached from it before now
            self._cursor = store.forgotten_since(None)[1]
            return []
        users, self._cursor = store.forgotten_since(self._cursor)
        return [u.encode("utf-8") for u in users]

    def apply_forgets(self, users: list[bytes]) -> int:
        """Drop these users' keys: their later events are shredded at the edge. Only users
        holding a key are touched: one not cached loads its tombstone from the store (and a
        load that read a key before the forget was applied before this, in the order the
        worker thread ran them), so a bulk forget neither fills the cache nor evicts it."""
        keys = self.native.keys
        n = 0
        for raw in users:
            if keys.get(raw) is not None:
                keys[raw] = None
                n += 1
        if n:
            self.stats.forgets_applied += n
            log.info("applied %d forget(s) from the key store", n)
        return n
