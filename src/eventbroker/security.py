"""Who may connect and what they may send: TLS, producer identities, limits.

``Security`` is built from the [tls], [auth] and [limits] sections and shared
by every connection of a listener; a reload swaps in a new one (TLS settings
need a restart, the rest apply at once, also to open connections).
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
import time
from collections import deque
from collections.abc import Iterable

from eventbroker.auth import Authenticator, AuthFailed, Identity
from eventbroker.config import AuthConfig, LimitsConfig, TlsConfig

log = logging.getLogger("eventbroker.security")

# TLS 1.2 suites with forward secrecy and AEAD only (TLS 1.3 suites are all fine).
_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


class SecurityStats:
    __slots__ = ("auth_failures", "auth_refused_addresses", "handshake_timeouts", "idle_timeouts",
                 "refused_total_limit", "refused_address_limit", "inflight_pauses")

    def __init__(self) -> None:
        self.auth_failures = 0
        self.auth_refused_addresses = 0
        self.handshake_timeouts = 0
        self.idle_timeouts = 0
        self.refused_total_limit = 0
        self.refused_address_limit = 0
        self.inflight_pauses = 0


def server_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(_TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.client_auth != "none":
        ctx.load_verify_locations(cafile=tls.client_ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.client_auth == "required" else ssl.CERT_OPTIONAL
    return ctx


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def certificate_cn(peercert: dict | None) -> str:
    """The subject commonName of a verified peer certificate, or "".
    A subject with several CNs is refused: which one names the producer
    would be a guess."""
    if not peercert:
        return ""
    cns = [str(value) for rdn in peercert.get("subject", ()) for key, value in rdn if key == "commonName"]
    if len(cns) > 1:
        raise AuthFailed(f"client certificate has {len(cns)} subject CNs")
    return cns[0] if cns else ""


class Security:
    def __init__(self, tls: TlsConfig, auth: AuthConfig, limits: LimitsConfig, type_names: Iterable[str]) -> None:
        self.tls = tls
        self.auth = auth
        self.limits = limits
        self.authenticator = Authenticator(auth.producers)
        self.type_names = sorted(type_names)
        self.stats = SecurityStats()
        self._failures: dict[str, deque[float]] = {}
        self.trusted = frozenset(limits.trusted_proxies)

    def replace(self, auth: AuthConfig, limits: LimitsConfig, type_names: Iterable[str]) -> None:
        """A reload: new producers, patterns and limits (TLS needs a restart)."""
        self.auth = auth
        self.limits = limits
        self.authenticator = Authenticator(auth.producers)
        self.type_names = sorted(type_names)
        self.trusted = frozenset(limits.trusted_proxies)

    def ssl_context(self) -> ssl.SSLContext | None:
        return server_ssl_context(self.tls) if self.tls.enabled else None

    # identities

    def authenticate(self, token: bytes, peercert: dict | None) -> Identity | None:
        """The producer's identity (None: anonymous, allowed when auth is not
        required). Raises AuthFailed with the reason for the log."""
        cn = certificate_cn(peercert)
        cert_id = None
        if cn:
            try:
                cert_id = self.authenticator.by_certificate(cn)
            except AuthFailed:
                # A certificate that names no producer never passes with a
                # token (a stolen token must not work with any certificate).
                if token or self.auth.required:
                    raise
        if token:
            ident = self.authenticator.by_token(token)
            if cert_id is not None and cert_id.name != ident.name:
                raise AuthFailed(f"token of {ident.name!r} over the certificate of {cert_id.name!r}")
            if self.authenticator.producers[ident.name].require_cert and cert_id is None:
                raise AuthFailed(f"producer {ident.name!r} must present its client certificate")
            return ident
        if cert_id is not None:
            return cert_id
        if self.auth.required:
            raise AuthFailed("no token and no known client certificate")
        return None

    def allowed(self, ident: Identity | None) -> frozenset[bytes] | None:
        """Type names (bytes) ``ident`` may send; None: every type."""
        if ident is None:
            return None
        if ident.name not in self.authenticator.producers:  # removed by a reload
            return frozenset()
        ident = self.authenticator.identity(ident.name)  # patterns as reloaded
        return frozenset(n.encode() for n in self.type_names if ident.may_send(n))

    # failed handshakes per address

    def note_failure(self, addr: str) -> None:
        self.stats.auth_failures += 1
        if addr in self.trusted:  # a load balancer: every producer behind it shares the address
            return
        q = self._failures.setdefault(addr, deque())
        q.append(time.monotonic())
        if len(self._failures) > 100_000:  # bound the table under a spread-out attack
            self._failures.pop(next(iter(self._failures)))

    def refused(self, addr: str) -> bool:
        q = self._failures.get(addr)
        if not q:
            return False
        cutoff = time.monotonic() - 60
        while q and q[0] < cutoff:
            q.popleft()
        if not q:
            del self._failures[addr]
            return False
        return len(q) >= self.auth.max_failures_per_minute
