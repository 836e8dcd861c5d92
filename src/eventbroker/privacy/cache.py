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
import logging
import time
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

    def __init__(self, store: KeyStore, keks: KekRing, *, max_users: int, forget_poll_ms: int) -> None:
        self.store = store
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
        """Read the forget cursor (a gateway starts with an empty cache) and poll from then on."""
        loop = asyncio.get_running_loop()
        _, self._cursor = await loop.run_in_executor(self._pool, self.store.forgotten_since, None)
        self.stats.last_forget_poll = time.time()
        self._poller = loop.create_task(self._poll_forgets(), name="eventbroker-forget-poll")

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
        await asyncio.get_running_loop().run_in_executor(self._pool, self.store.close)
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
        (a key this call made and the store kept is used as made, not unwrapped again)."""
        names = [u.decode("utf-8") for u in users]  # the splitter passes ids from validated JSON strings
        made: dict[str, tuple[StoredKey, bytes]] = {}

        def make(user: str) -> StoredKey:
            made[user] = self.keks.new_key_pair(user)
            return made[user][0]

        stored = self.store.fetch_or_create(names, make)
        out: dict[bytes, bytes | None] = {}
        for raw, name in zip(users, names, strict=True):
            sk = stored.get(name)
            if sk is None:
                out[raw] = None
            elif name in made and made[name][0] == sk:
                out[raw] = made[name][1]
            else:  # another gateway made it first, or it existed
                out[raw] = self.keks.unwrap(name, sk)
        return out

    def _insert(self, got: dict[bytes, bytes | None]) -> None:
        keys = self.native.keys
        keys.update(got)
        excess = len(keys) - self.max_users
        if excess > 0:
            for u in [u for _, u in zip(range(excess), iter(keys), strict=False)]:
                del keys[u]
            self.stats.evicted += excess

    # forgetting

    async def _poll_forgets(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.forget_poll_s)
            try:
                users, self._cursor = await loop.run_in_executor(self._pool, self.store.forgotten_since,
                                                                 self._cursor)
            except (KeyStoreError, OSError) as e:
                log.warning("could not ask the key store who was forgotten: %s", e)
                continue
            self.stats.last_forget_poll = time.time()
            self.apply_forgets(users)

    def apply_forgets(self, users: list[str]) -> int:
        """Drop these users' keys: their later events are shredded at the edge."""
        keys = self.native.keys
        n = 0
        for u in users:
            raw = u.encode("utf-8")
            if keys.get(raw, b"") is not None:  # cached with a key, or not cached
                n += 1
            keys[raw] = None
        if n:
            self.stats.forgets_applied += n
            log.info("applied %d forget(s) from the key store", n)
        excess = len(keys) - self.max_users
        if excess > 0:
            self._insert({})
        return n
