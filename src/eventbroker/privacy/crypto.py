"""Key-encryption keys, wrapped data keys, and sealed values opened (docs/privacy.md).

The gateway seals personal values natively (``_fastpath``, personal.pxi,
OpenSSL); everything here uses the ``cryptography`` package, an independent
implementation of the same AES-256-GCM, so a test that opens what the
gateway sealed checks one against the other.

* A **data key** is 32 random bytes per user (``os.urandom``), never derived
  from anything: deleting it shreds that user alone.
* It is stored **wrapped** by a key-encryption key (KEK):
  ``0x01 || nonce[12] || AES-256-GCM(KEK, data key, aad = "eb-dk1" || user)``,
  with the KEK's id beside it, so a wrapped key cannot be moved to another user.
* A **KEK ring** is the config's list of KEKs, lines ``<id> <base64 of 32
  bytes>``: the first wraps new keys, every one unwraps (rotation).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from eventbroker import _fastpath as fp
from eventbroker.config import PrivacyConfig
from eventbroker.errors import ConfigError, KeyStoreError
from eventbroker.privacy.store import StoredKey

KEK_BYTES = 32
DATA_KEY_BYTES = fp.PERSONAL_KEY_BYTES
_NONCE, _TAG = fp.PERSONAL_NONCE_BYTES, fp.PERSONAL_TAG_BYTES  # of sealed values and of wrapped keys alike
_WRAP_VERSION = b"\x01"
_WRAP_AAD = b"eb-dk1"
_KEK_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
CIPHER_PREFIX: bytes = fp.CIPHER_PREFIX  # "ep1:"
FORGOTTEN_VALUE: bytes = fp.FORGOTTEN_VALUE  # "ep1:forgotten": a value of a user forgotten before it arrived


class Kek(NamedTuple):
    id: str
    key: bytes


class KekRing:
    """The KEKs a process holds: ``current`` wraps, all of them unwrap."""

    def __init__(self, keks: Iterable[Kek]) -> None:
        self.keks = list(keks)
        if not self.keks:
            raise ConfigError("no key-encryption key")
        self.current = self.keks[0]
        self._by_id = {k.id: AESGCM(k.key) for k in self.keks}
        if len(self._by_id) != len(self.keks):
            raise ConfigError("two key-encryption keys share an id")

    @classmethod
    def parse(cls, text: str, where: str) -> KekRing:
        keks = []
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2 or not _KEK_ID.match(parts[0]):
                raise ConfigError(f"{where}: line {n}: expected '<id> <base64 of {KEK_BYTES} bytes>'")
            try:
                key = base64.b64decode(parts[1], validate=True)
            except binascii.Error:
                key = b""
            if len(key) != KEK_BYTES:
                # never echo the line: it is key material
                raise ConfigError(f"{where}: line {n}: the key is not base64 of {KEK_BYTES} bytes")
            keks.append(Kek(parts[0], key))
        if not keks:
            raise ConfigError(f"{where}: holds no key-encryption key")
        return cls(keks)

    def wrap(self, user: str, data_key: bytes) -> StoredKey:
        nonce = os.urandom(_NONCE)
        ct = self._by_id[self.current.id].encrypt(nonce, data_key, _WRAP_AAD + user.encode("utf-8"))
        return StoredKey(self.current.id, _WRAP_VERSION + nonce + ct)

    def unwrap(self, user: str, stored: StoredKey) -> bytes:
        aead = self._by_id.get(stored.kek_id)
        if aead is None:
            raise KeyStoreError(f"a data key is wrapped by key-encryption key {stored.kek_id!r}, which this "
                                f"process does not hold (it holds {', '.join(k.id for k in self.keks)})")
        w = stored.wrapped
        if w[:1] != _WRAP_VERSION or len(w) != 1 + _NONCE + DATA_KEY_BYTES + _TAG:
            raise KeyStoreError("a wrapped data key has an unknown format")
        try:
            return aead.decrypt(w[1:1 + _NONCE], w[1 + _NONCE:], _WRAP_AAD + user.encode("utf-8"))
        except InvalidTag:
            raise KeyStoreError(f"a data key does not unwrap with key-encryption key {stored.kek_id!r} "
                                "(a wrong key under that id, or a row moved to another user)") from None

    def new_key(self, user: str) -> StoredKey:
        """A fresh random data key for ``user``, wrapped (the store's ``make``)."""
        return self.wrap(user, os.urandom(DATA_KEY_BYTES))

    def new_key_pair(self, user: str) -> tuple[StoredKey, bytes]:
        """A fresh random data key, wrapped and in clear (a gateway need not unwrap what it made)."""
        key = os.urandom(DATA_KEY_BYTES)
        return self.wrap(user, key), key

    def rewrap(self, user: str, stored: StoredKey) -> StoredKey:
        """``stored`` unwrapped and wrapped again by the current KEK (``keys rotate``)."""
        return self.wrap(user, self.unwrap(user, stored))


def new_kek_line(kek_id: str | None = None) -> str:
    """A fresh KEK as a line of a KEK file."""
    kek_id = kek_id or "k" + secrets.token_hex(4)
    if not _KEK_ID.match(kek_id):
        raise ConfigError(f"KEK id {kek_id!r}: 1-64 of A-Z a-z 0-9 _ . -")
    return f"{kek_id} {base64.b64encode(os.urandom(KEK_BYTES)).decode()}"


def load_keks(cfg: PrivacyConfig, create: bool = False) -> KekRing:
    """The config's KEK ring: from ``$kek_env`` when set, else ``kek_file``;
    with ``create``, a missing file is made (mode 0600) with one new KEK."""
    env = os.environ.get(cfg.kek_env, "") if cfg.kek_env else ""
    if env.strip():
        return KekRing.parse(env, f"${cfg.kek_env}")
    path = cfg.state_path(cfg.kek_file)
    if create and not path.exists():
        _create_kek_file(path)
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no key-encryption key file (privacy.kek_file; or set ${cfg.kek_env}); "
                          "make one with `eventbroker keys new-kek`") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the key-encryption key file: {e.strerror}") from None
    if mode & 0o077:
        raise ConfigError(f"{path}: the key-encryption key file is readable by others (mode {mode & 0o777:o}); "
                          "chmod 600 it")
    return KekRing.parse(text, str(path))


def _create_kek_file(path: Path) -> None:
    """A new KEK file, whole or not at all: written under a temporary name and
    linked into place, so a worker starting at the same moment reads either no
    file or a complete one (the first link wins; the others read it)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=".kek-", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write("# eventbroker key-encryption keys: '<id> <base64>', the first wraps new keys.\n"
                    "# Losing this file shreds every user's data; back it up apart from the key store.\n")
            f.write(new_kek_line() + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process made it first: read theirs
    finally:
        os.unlink(tmp)


def open_value(key: bytes | None, type_name: str, field: str, event_id: bytes, sealed: str) -> bytes | None:
    """The JSON text a personal value held, from its sealed string (``ep1:...``,
    without quotes); None when its user was forgotten (``key`` None, or the
    value was shredded at the edge). Raises KeyStoreError for a value that is
    not a sealed one or does not open (tampered, moved)."""
    raw = sealed.encode("ascii", "replace") if isinstance(sealed, str) else sealed
    if raw == FORGOTTEN_VALUE or key is None:
        return None
    if not raw.startswith(CIPHER_PREFIX):
        raise KeyStoreError(f"{type_name}.{field}: not a sealed value")
    try:
        blob = base64.b64decode(raw[len(CIPHER_PREFIX):], validate=True)
    except binascii.Error:
        raise KeyStoreError(f"{type_name}.{field}: a sealed value that is not base64") from None
    if len(blob) < _NONCE + _TAG:
        raise KeyStoreError(f"{type_name}.{field}: a sealed value too short")
    aad = fp.personal_aad(type_name.encode(), field.encode(), event_id)
    try:
        return AESGCM(key).decrypt(blob[:_NONCE], blob[_NONCE:], aad)
    except InvalidTag:
        raise KeyStoreError(f"{type_name}.{field}: a sealed value does not open (tampered, or moved from "
                            "another event or field)") from None

