"""Personal data sealed at the edge under a key per user, and forgotten by deleting that key.

Rooms: ``store`` (the shared key store, SQLite or PostgreSQL), ``crypto``
(KEKs, wrapped data keys, sealed values opened), ``cache`` (a gateway's
unwrapped keys, filled off the loop, forgets applied), ``reader`` (reading
back for those allowed: events, PyArrow tables). The sealing itself is native
(``_fastpath``, personal.pxi). docs/privacy.md has the design.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from eventbroker.config import Config
from eventbroker.errors import KeyStoreError
from eventbroker.privacy.cache import KeyCache
from eventbroker.privacy.crypto import KekRing, load_keks, new_kek_line, open_value
from eventbroker.privacy.reader import FORGOTTEN_COLUMN, Decryptor, Opened
from eventbroker.privacy.store import Forgotten, KeyStore, StoredKey, mask_uri, open_store

log = logging.getLogger("eventbroker.privacy")


def open_key_cache(cfg: Config) -> KeyCache:
    """The gateway's key cache on the config's store; a SQLite store's KEK file is made on first start."""
    p = cfg.privacy
    keks = load_keks(p, create=p.key_store.startswith("sqlite:"))
    try:
        store: KeyStore | Callable[[], KeyStore] = open_store(p)
    except KeyStoreError as e:  # unreachable now: the cache opens it on first use (a bad URI is a ConfigError)
        log.warning("the key store cannot be opened yet (%s); trying again on each key load", e)
        store = functools.partial(open_store, p)
    return KeyCache(store, keks, max_users=p.cache_users, forget_poll_ms=p.forget_poll_ms,
                    uri=mask_uri(p.key_store))


def forget(cfg: Config, user: str) -> Forgotten:
    """Delete ``user``'s data key: every personal value sealed under it is unreadable from now on,
    wherever it was copied; gateways drop the key from their caches within ``forget_poll_ms``."""
    store = open_store(cfg.privacy, create=False)
    try:
        return store.forget(user)
    finally:
        store.close()


__all__ = ["FORGOTTEN_COLUMN", "Decryptor", "Forgotten", "KekRing", "KeyCache", "KeyStore", "Opened", "StoredKey",
           "forget", "load_keks", "new_kek_line", "open_key_cache", "open_store", "open_value"]
