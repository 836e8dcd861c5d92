"""Producer identities: tokens, their hashes, and which types each may send.

A token is ``ebt1.<producer>.<secret>``: the producer's name (so the server
finds its entry without trying every hash) and 32 random bytes, base64url.
The config stores only ``sha256$<salt>$<digest>``: HMAC-SHA-256 of the secret
keyed by a random per-token salt. The secret has 256 bits of entropy, so a
fast hash is enough (a slow password hash such as scrypt protects guessable
passwords and would let a connection flood buy CPU); both hashing and
comparing (``hmac.compare_digest``) use the standard library.

Every failure (unknown producer, wrong secret, malformed token, a token where
none is configured) gets the same answer, so a caller learns nothing about
which part was wrong; the server logs the real reason.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from eventbroker.config.schema import TOKEN_HASH_SCHEME, parse_token_hash
from eventbroker.errors import AuthFailed

TOKEN_PREFIX = "ebt1"
_SECRET_BYTES = 32
_SECRET_CHARS = 43  # base64url of 32 bytes, unpadded
_B64_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).decode().rstrip("=")


def hash_secret(secret: bytes, salt: bytes | None = None) -> str:
    salt = secrets.token_bytes(16) if salt is None else salt
    digest = hmac.new(salt, secret, hashlib.sha256).digest()
    return f"{TOKEN_HASH_SCHEME}${_b64(salt)}${_b64(digest)}"


def create_token(producer: str) -> tuple[str, str]:
    """A new token for ``producer`` and the hash to put in the config."""
    secret = secrets.token_bytes(_SECRET_BYTES)
    return f"{TOKEN_PREFIX}.{producer}.{_b64(secret)}", hash_secret(secret)


def _verify(secret: bytes, stored: str) -> bool:
    salt, want = parse_token_hash(stored)  # the config checked its format on load
    got = hmac.new(salt, secret, hashlib.sha256).digest()
    return hmac.compare_digest(got, want)


_DUMMY_HASH = hash_secret(secrets.token_bytes(_SECRET_BYTES))  # matches no secret


@dataclass(frozen=True)
class Identity:
    name: str
    type_patterns: tuple[str, ...]

    def may_send(self, type_name: str) -> bool:
        return any(fnmatch.fnmatchcase(type_name, p) for p in self.type_patterns)


class Authenticator:
    """Token and client-certificate checks against ``[auth.producers.<name>]``."""

    def __init__(self, producers: dict) -> None:
        # name -> AuthProducer (config/schema.py): token_hashes, types, cert_subject
        self.producers = producers

    def identity(self, name: str) -> Identity:
        p = self.producers[name]
        return Identity(name, tuple(p.types))

    def by_token(self, token: bytes) -> Identity:
        secret = b""
        name = ""
        try:
            prefix, name, secret_s = token.decode("ascii").split(".", 2)
            if prefix == TOKEN_PREFIX and len(secret_s) == _SECRET_CHARS and _B64_ALPHABET.issuperset(secret_s):
                secret = base64.urlsafe_b64decode(secret_s + "=")
                if _b64(secret) != secret_s:  # the last character's 2 spare bits set: not the token we issued
                    secret = b""
        except (UnicodeDecodeError, ValueError, TypeError):
            pass
        entry = self.producers.get(name) if secret else None
        hashes = list(entry.token_hashes) if entry is not None else []
        # The same work whatever was wrong: at least one HMAC, compared in constant time.
        ok = False
        for h in hashes or [_DUMMY_HASH]:
            ok |= _verify(secret or b"\0" * 32, h)
        if not secret:
            raise AuthFailed("malformed token")
        if entry is None:
            raise AuthFailed(f"unknown producer {name[:64]!r}")
        if not hashes:
            raise AuthFailed(f"producer {name!r} has no token configured (certificate only)")
        if not ok:
            raise AuthFailed(f"wrong secret for producer {name!r}")
        return self.identity(name)

    def by_certificate(self, subject_cn: str) -> Identity:
        for name, p in self.producers.items():
            if p.cert_subject and p.cert_subject == subject_cn:
                return self.identity(name)
        raise AuthFailed(f"no producer for certificate subject CN={subject_cn[:64]!r}")
